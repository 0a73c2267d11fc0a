"""Hostile and broken input files for the trust-and-safety tests (import as ``from hostile_files import ...``).

Every hostile payload, when unpickled or evaluated, creates the file ``marker`` (harmless, and observable):
a test asserts the marker never appears.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["TVM_BREAKS", "Opens", "break_tvm_folder", "build_files", "build_tvm_artifact", "evil_pickle", "rewrite_pt2"]


class Opens:
    """Unpickling this calls ``open(marker, "w")``: code from the file runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return (open, (self.marker, "w"))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(Opens(marker))


def evil_torch_save(marker: Path) -> bytes:
    """A ``torch.save`` zip whose ``data.pkl`` runs code (what ``torch.load(weights_only=False)`` unpickles)."""
    buf = io.BytesIO()
    torch.save(Opens(marker), buf)
    return buf.getvalue()


def rewrite_pt2(src: Path, dst: Path, *, replace: dict[str, bytes] | None = None,
                edit_json: dict[str, Callable[[dict], None]] | None = None,
                add: dict[str, bytes] | None = None, drop: list[str] | None = None) -> Path:
    """Copy the archive ``src`` to ``dst``, replacing members (keys: path suffix after the root folder),
    editing JSON members in place, adding members, or dropping them."""
    zin = zipfile.ZipFile(src)
    root = zin.namelist()[0].split("/", 1)[0] + "/"
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            rel = info.filename[len(root):]
            if drop and rel in drop:
                continue
            data = zin.read(info.filename)
            if replace and rel in replace:
                data = replace[rel]
            if edit_json and rel in edit_json:
                doc = json.loads(data)
                edit_json[rel](doc)
                data = json.dumps(doc).encode()
            zout.writestr(info.filename, data)
        for rel, data in (add or {}).items():
            zout.writestr(root + rel, data)
    return dst


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def _first_expr(doc: dict) -> dict:
    stack: list = [doc]
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            if "expr_str" in obj:
                return obj
            stack.extend(obj.values())
        elif isinstance(obj, list):
            stack.extend(obj)
    raise AssertionError("no expr_str in the archive")


def build_files(folder: Path, marker: Path) -> dict[str, Path]:
    """Write every file the hostile-input table uses into ``folder``; return name → path."""
    torch.manual_seed(0)
    model = _Net().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    f: dict[str, Path] = {}
    f["model.pt2"] = folder / "model.pt2"
    torch.export.save(ep, str(f["model.pt2"]))
    good = f["model.pt2"]
    mj = "models/model.json"
    f["evil_inputs.pt2"] = rewrite_pt2(good, folder / "evil_inputs.pt2",
                                       replace={"data/sample_inputs/model.pt": evil_pickle(marker)})

    def pickled_weight(doc: dict) -> None:
        doc["config"]["conv.weight"]["use_pickle"] = True

    weight_file = "data/weights/" + json.loads(zipfile.ZipFile(good).read(
        zipfile.ZipFile(good).namelist()[0].split("/")[0] + "/data/weights/model_weights_config.json")
    )["config"]["conv.weight"]["path_name"]
    f["evil_weight.pt2"] = rewrite_pt2(good, folder / "evil_weight.pt2",
                                       replace={weight_file: evil_torch_save(marker)},
                                       edit_json={"data/weights/model_weights_config.json": pickled_weight})

    def opaque(doc: dict) -> None:
        doc["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                 "tensor_meta": None}

    f["evil_object.pt2"] = rewrite_pt2(good, folder / "evil_object.pt2",
                                       edit_json={"data/constants/model_constants_config.json": opaque},
                                       add={"data/constants/opaque_obj_0": evil_pickle(marker)})
    f["evil_guard.pt2"] = rewrite_pt2(good, folder / "evil_guard.pt2", edit_json={
        mj: lambda d: d.__setitem__("guards_code", [f"open({str(marker)!r}, 'w') is None"])})
    f["evil_sympy.pt2"] = rewrite_pt2(good, folder / "evil_sympy.pt2", edit_json={
        mj: lambda d: _first_expr(d).__setitem__("expr_str", f"open({str(marker)!r}, 'w') and Symbol('s0')")})

    def bad_target(doc: dict) -> None:
        doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"

    f["evil_target.pt2"] = rewrite_pt2(good, folder / "evil_target.pt2", edit_json={mj: bad_target})
    f["evil_aoti.pt2"] = rewrite_pt2(good, folder / "evil_aoti.pt2",
                                     add={"data/aotinductor/model/model.so": b"\x7fELF not really"})
    f["truncated.pt2"] = folder / "truncated.pt2"
    f["truncated.pt2"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    f["pickled.pt"] = folder / "pickled.pt"
    torch.save(model, str(f["pickled.pt"]))

    rng = np.random.default_rng(0)
    arrays = {
        "calib.npz": rng.standard_normal((16, 3, 8, 8)).astype("float32"),
        "zero.npz": np.zeros((0, 3, 8, 8), "float32"),
        "wrong_shape.npz": np.zeros((4, 5, 8, 8), "float32"),
        "wrong_rank.npz": np.zeros((4, 3, 8), "float32"),
        "ints.npz": np.zeros((4, 3, 8, 8), "int64"),
        "bools.npz": np.zeros((4, 3, 8, 8), bool),
    }
    nan = rng.standard_normal((16, 3, 8, 8)).astype("float32")
    nan[5, 1, 2, 2] = np.nan
    arrays["nan.npz"] = nan
    inf = rng.standard_normal((16, 3, 8, 8)).astype("float32")
    inf[9, 0, 0, 0] = np.inf
    arrays["inf.npz"] = inf
    for name, a in arrays.items():
        f[name] = folder / name
        np.savez(f[name], x=a)
    f["objects.npz"] = folder / "objects.npz"
    np.savez(f["objects.npz"], x=np.array([Opens(marker)], dtype=object))
    f["evil_data.pt"] = folder / "evil_data.pt"
    f["evil_data.pt"].write_bytes(evil_torch_save(marker))
    f["mixed.pt"] = folder / "mixed.pt"
    torch.save([(torch.randn(2, 3, 8, 8),), (torch.randn(2, 3, 6, 6),)], str(f["mixed.pt"]))
    f["escape.onnx"] = _escaping_onnx(folder / "escape.onnx")
    f["notes.txt"] = folder / "notes.txt"
    f["notes.txt"].write_text("the user's own file\n")
    f["evil_tvm.so"] = _evil_shared_library(folder / "evil_tvm.so", marker)
    f.update(_onnx_files(folder))
    f["missing_weight.pt2"] = rewrite_pt2(good, folder / "missing_weight.pt2", drop=[weight_file])
    return f


def _onnx_files(folder: Path) -> dict[str, Path]:
    """ONNX models of the same shape as ``model.pt2``'s (``(N, 3, 8, 8)`` in): inline (``bn.onnx``), with external
    data (``ext.onnx`` + ``ext.onnx.data``), renamed after export (``orig.onnx``, whose tensors name
    ``model.onnx.data``), a user's ``out.onnx.data``, and a model with an op of a custom domain (``custom.onnx``)."""
    import onnx
    from helpers import onnx_conv_bn
    from onnx import helper

    f: dict[str, Path] = {}
    f["bn.onnx"] = folder / "bn.onnx"
    onnx.save(onnx_conv_bn(), str(f["bn.onnx"]))
    for name, location in (("ext.onnx", "ext.onnx.data"), ("orig.onnx", "model.onnx.data")):
        f[name], f[location] = folder / name, folder / location
        onnx.save_model(onnx_conv_bn(channels=16), str(f[name]), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=location, size_threshold=0)
    f["out.onnx.data"] = folder / "out.onnx.data"
    f["out.onnx.data"].write_text("the user's own notes, named like bnfold's external data\n")
    custom = onnx_conv_bn()
    relu = custom.graph.node[-1]
    relu.op_type, relu.domain = "FancyRelu", "com.example.vision"
    custom.opset_import.append(helper.make_opsetid("com.example.vision", 1))
    f["custom.onnx"] = folder / "custom.onnx"
    onnx.save(custom, str(f["custom.onnx"]))
    return f


TVM_BREAKS = ("truncated-so", "random-so", "foreign-so", "pickle-params", "no-signature")
"""How :func:`break_tvm_folder` breaks a compiled artifact (issue 28's audit cases)."""


def build_tvm_artifact(model: Path, dest: Path) -> Path:
    """Compile ``model`` untuned with TVM into the artifact folder ``dest`` (a few seconds)."""
    from bnfold.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["compile", str(model), "-o", str(dest), "--no-progress"])
    assert code == 0, code
    return dest


def break_tvm_folder(artifact: Path, dest: Path, how: str, files: dict[str, Path], marker: Path) -> Path:
    """A copy of ``artifact`` at ``dest`` broken as ``how`` says (:data:`TVM_BREAKS`); loading a foreign library
    or unpickling the parameters would create ``marker``."""
    shutil.copytree(artifact, dest)
    lib, manifest = dest / "model.so", dest / "manifest.json"
    if how == "truncated-so":  # `head -c 20000 tvm/model.so > t1/model.so`: was SIGBUS in dlopen
        lib.write_bytes(lib.read_bytes()[:20000])
    elif how == "random-so":
        lib.write_bytes(np.random.default_rng(0).bytes(lib.stat().st_size))
    elif how == "foreign-so":  # another library, whose constructor runs when loaded
        shutil.copy2(files["evil_tvm.so"], lib)
    elif how == "pickle-params":
        (dest / "params.pt").write_bytes(evil_torch_save(marker))
    elif how == "no-signature":
        doc = json.loads(manifest.read_text())
        del doc["signature"]
        manifest.write_text(json.dumps(doc))
    elif how != "intact":
        raise ValueError(how)
    return dest


def _evil_shared_library(path: Path, marker: Path) -> Path:
    """A shared library whose constructor creates ``marker`` as soon as it is loaded (a hostile ``model.so``);
    without a C compiler, bytes that only look like one (the refusal comes before any load either way)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        path.write_bytes(b"\x7fELF not really")
        return path
    src = path.with_suffix(".c")
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void run(void) '
                   f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(path), str(src)], check=True, capture_output=True)
    src.unlink()
    return path


def _escaping_onnx(path: Path) -> Path:
    """An ONNX model whose one initializer claims its data lives in ``../../etc/passwd``."""
    import onnx
    from onnx import TensorProto, helper

    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "16")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[w])
    onnx.save(helper.make_model(graph), str(path))
    return path
