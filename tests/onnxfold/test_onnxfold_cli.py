"""``bnfold fold model.onnx --data inputs.npz`` (parity on the user's inputs) and ``bnfold optimize model.onnx
--target llvm`` (an untuned TVM build of the folded file, dynamic batch kept, parity vs ONNX Runtime)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from onnx_cases import BUILT, export

BNFOLD = [sys.executable, "-m", "bnfold.cli"]


def test_fold_checks_parity_on_the_users_data(tmp_path: Path) -> None:
    model, shape = BUILT["gemm_transB_bn"]()
    src = export(model, torch.randn(shape), tmp_path / "g.onnx")
    data = tmp_path / "inputs.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((7, *shape[1:])).astype(np.float32))
    out = tmp_path / "g.folded.onnx"
    r = subprocess.run([*BNFOLD, "fold", str(src), "-o", str(out), "--data", str(data), "--batch-size", "4",
                        "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    parity = json.loads(r.stdout)["parity"]
    assert parity["passed"] and parity["inputs"] == "user", parity
    assert not any("random inputs" in n for n in parity.get("notes", [])), parity
    out2 = tmp_path / "g.shape.onnx"  # --input-shape: random inputs, and the report says so
    r = subprocess.run([*BNFOLD, "fold", str(src), "-o", str(out2), "--input-shape", ",".join(map(str, shape)),
                        "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    parity = json.loads(r.stdout)["parity"]
    assert parity["inputs"] == "random", parity


def test_fold_data_that_does_not_fit_the_model_exits_2(tmp_path: Path) -> None:
    model, shape = BUILT["gemm_transB_bn"]()
    src = export(model, torch.randn(shape), tmp_path / "g.onnx")
    data = tmp_path / "two.npz"
    np.savez(data, x=np.zeros((2, *shape[1:]), np.float32), z=np.zeros((2, 3), np.float32))
    out = tmp_path / "g.folded.onnx"
    r = subprocess.run([*BNFOLD, "fold", str(src), "-o", str(out), "--data", str(data)], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "the model takes 1" in r.stderr and not out.exists(), (r.stdout, r.stderr)


def test_optimize_onnx_builds_tvm_with_a_dynamic_batch(tmp_path: Path) -> None:
    """Untuned llvm build of the folded file: the ONNX input's dynamic batch becomes the artifact's batch range,
    and the artifact matches ONNX Runtime at a batch size other than the parity batch."""
    pytest.importorskip("tvm")
    model, shape = BUILT["bn_flatten_gemm"]()
    src = export(model, torch.randn(shape), tmp_path / "m.onnx")
    out = tmp_path / "opt"
    r = subprocess.run([*BNFOLD, "optimize", str(src), "-o", str(out), "--target", "llvm", "--json",
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    tvm_info = report["stages"]["tvm"]
    assert report["passed"] and tvm_info["parity_vs_folded"]["passed"], tvm_info
    assert tvm_info["signature"]["batch_range"] == [1, 64] and tvm_info["signature"]["inputs"][0]["shape"][0] == \
        "batch"
    assert report["stages"]["fold"]["folded"] and (out / "folded.onnx").exists()

    from bnfold.parity.ort import OrtModel
    from bnfold.targets.tvm import load_artifact

    artifact = load_artifact(out / "tvm")
    x = torch.randn(5, *shape[1:])
    got = artifact(x)
    got = got[0] if isinstance(got, (tuple, list)) else got
    torch.testing.assert_close(got, OrtModel(out / "folded.onnx")(x)[0], rtol=1e-4, atol=1e-5)


def _sums(folder: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_issue28_renamed_model_keeps_its_external_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 28: the exporter wrote model.onnx + model.onnx.data, the user renamed the model to orig.onnx (its tensors
    still name model.onnx.data); ``bnfold fold orig.onnx -o model.onnx`` wrote its own external data over the file
    orig.onnx reads (exit 0, "parity PASS", orig.onnx computed zeros afterwards). Now refused before any work."""
    from bnfold.cli import main

    model, shape = BUILT["bn_conv_pad0"]()
    export(model, torch.randn(shape), tmp_path / "model.onnx", external=True)
    (tmp_path / "model.onnx").rename(tmp_path / "orig.onnx")
    before = _sums(tmp_path)
    assert main(["fold", str(tmp_path / "orig.onnx"), "-o", str(tmp_path / "model.onnx")]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and "model.onnx.data, the external data of the input" in err, err
    assert _sums(tmp_path) == before  # no model.onnx, no staging folder, the data untouched
    assert main(["fold", str(tmp_path / "orig.onnx"), "-o", str(tmp_path / "model.onnx"), "--force"]) == 2
    assert _sums(tmp_path) == before


def test_folded_model_references_exactly_its_own_data_file(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``OUT.onnx`` + ``OUT.onnx.data``, every external tensor of OUT.onnx in OUT.onnx.data; ``--force`` replaces that
    pair (bnfold's own), and a later output without external data removes the old data file with its model."""
    from bnfold.cli import main
    from bnfold.io.references import onnx_external_files

    model, shape = BUILT["bn_flatten_gemm"]()  # a 2.8 KiB Gemm weight: kept outside (tensors of 1 KiB and more)
    src = export(model, torch.randn(shape), tmp_path / "m.onnx", external=True)
    out = tmp_path / "out.onnx"
    inputs = _sums(tmp_path)
    assert main(["fold", str(src), "-o", str(out)]) == 0
    assert onnx_external_files(out) == [tmp_path / "out.onnx.data"]
    assert main(["fold", str(src), "-o", str(out)]) == 2 and "already exists" in capsys.readouterr().err
    assert main(["fold", str(src), "-o", str(out), "--force"]) == 0
    assert onnx_external_files(out) == [tmp_path / "out.onnx.data"]
    inline = export(model, torch.randn(shape), tmp_path / "inline.onnx")
    assert main(["fold", str(inline), "-o", str(out), "--force"]) == 0
    assert onnx_external_files(out) == [] and not (tmp_path / "out.onnx.data").exists()
    after = _sums(tmp_path)
    assert {k: after[k] for k in inputs} == inputs and set(after) == {*inputs, "inline.onnx", "out.onnx"}


def test_fold_until_and_dump_ir_on_an_onnx_model(tmp_path: Path) -> None:
    """``bnfold fold model.onnx --until fold_into_producer --dump-ir DIR``: the ONNX pipeline stops after that pass,
    DIR gets one file per pass that changed the graph, and the report says where it stopped."""
    model, shape = BUILT["gemm_transB_bn"]()
    src = export(model, torch.randn(shape), tmp_path / "m.onnx")
    dump = tmp_path / "ir"
    out = tmp_path / "m.folded.onnx"
    r = subprocess.run([*BNFOLD, "fold", str(src), "-o", str(out), "--until", "fold_into_producer", "--dump-ir",
                        str(dump), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["stopped_after"] == "fold_into_producer" and out.exists()
    files = sorted(p.name for p in dump.iterdir())
    assert files and all(f.endswith(".txt") for f in files) and files[-1].endswith("fold_into_producer.txt"), files
    assert "# --- after fold_into_producer" in (dump / files[-1]).read_text()


@pytest.mark.parametrize("args, message", [
    (["--until", "fold_into_embedding"], "names no pass of the ONNX pipeline"),
    (["--dump-ir", "{taken}"], "the folder is not empty"),
])
def test_negative_until_and_dump_ir_refusals(tmp_path: Path, args: list[str], message: str) -> None:
    model, shape = BUILT["gemm_transB_bn"]()
    src = export(model, torch.randn(shape), tmp_path / "g.onnx")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    out = tmp_path / "g.folded.onnx"
    r = subprocess.run([*BNFOLD, "fold", str(src), "-o", str(out), *[a.format(taken=taken) for a in args]],
                       capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and not out.exists(), (r.stdout, r.stderr)
    assert (taken / "notes.txt").read_text() == "mine"
