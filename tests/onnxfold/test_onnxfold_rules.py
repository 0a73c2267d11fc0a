"""The ONNX fold on built cases: each rule's rewrite count, numerics (ONNX Runtime, float64 rule), the checker, and
negative twins that assert the reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from onnx_cases import ARCHS, BUILT, export, fold_file, shared_weight_model
from onnx_cases import bn_count as _bn

from bnfold.onnx import fold_model, load_onnx
from bnfold.parity.ort import onnx_parity


@pytest.mark.parametrize("name", ["convtranspose_g4_bn", "gemm_transB_bn", "bn_conv_pad0", "bn_flatten_gemm",
                                  "layernorm_matmul"])
def test_built_case_folds_with_parity(name: str, tmp_path: Path) -> None:
    model, shape = BUILT[name]()
    src = export(model, torch.randn(shape), tmp_path / f"{name}.onnx")
    original, folded, report, dest, _ = fold_file(src, tmp_path)
    assert report.folded and not report.skipped, report.render()
    assert _bn(folded) == 0
    parity = onnx_parity(original, dest)
    assert parity.passed, parity.summary()
    # the folded file also runs at a batch size other than the example's (dynamic batch kept)
    x = np.random.default_rng(0).standard_normal((5, *shape[1:])).astype(np.float32)
    sess = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"])
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], want, rtol=1e-4, atol=1e-5)


def test_convtranspose_groups_use_the_per_group_channel_map(tmp_path: Path) -> None:
    """Regression for the onnxscript rewriter's bug: scaling ConvTranspose weight axis 1 as if group were 1."""
    model, shape = BUILT["convtranspose_g4_bn"]()
    src = export(model, torch.randn(shape), tmp_path / "ct.onnx")
    _, _folded, report, dest, _ = fold_file(src, tmp_path)
    assert report.folded[0].rule == "fold_into_producer" and "ConvTranspose" in report.folded[0].into
    x = torch.randn(3, *shape[1:])
    got = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = model.double()(x.double()).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bn_before_zero_padding_conv_takes_scale_only(tmp_path: Path) -> None:
    model, shape = BUILT["bn_conv_pad1"]()
    src = export(model, torch.randn(shape), tmp_path / "pad1.onnx")
    original, folded, report, dest, _ = fold_file(src, tmp_path)
    assert _bn(folded) == 0
    assert "scale only" in report.folded[0].detail
    ops = [n.op_type for n in folded.graph.node]
    assert ops[:2] == ["Add", "Conv"]  # the pure shift b/a stays as one Add before the conv
    assert onnx_parity(original, dest).passed


def test_shared_initializer_is_cloned_not_overwritten(tmp_path: Path) -> None:
    src = shared_weight_model(tmp_path / "shared.onnx")
    original, folded, report, dest, _ = fold_file(src, tmp_path)
    assert len(report.folded) == 2 and _bn(folded) == 0
    weights = [n.input[1] for n in folded.graph.node if n.op_type == "Conv"]
    assert len(set(weights)) == 2  # one clone per conv (each has its own BN)
    assert onnx_parity(original, dest).passed
    assert next((p.key, p.value) for p in folded.metadata_props) == ("author", "tests")  # metadata kept


def test_graph_output_blocks_producer_fold_with_reason(tmp_path: Path) -> None:
    """Negative twin: the conv output is also a graph output; folding would change that output too."""
    src = shared_weight_model(tmp_path / "shared.onnx")
    m = onnx.load(str(src))
    m.graph.output.append(onnx.helper.make_tensor_value_info("c0", onnx.TensorProto.FLOAT, ["batch", 4, 8, 8]))
    onnx.save(m, str(src))
    loaded = load_onnx(src)
    report = fold_model(loaded.model, dry_run=True)
    left = {e.id: e.reason for e in report.skipped}
    assert "bn0" in left and "also feeds" in left["bn0"] and "a graph output" in left["bn0"]
    assert [e.id for e in report.folded] == ["bn1"]


def test_non_constant_statistics_are_left_with_reason(tmp_path: Path) -> None:
    src = shared_weight_model(tmp_path / "shared.onnx")
    m = onnx.load(str(src))
    m.graph.input.append(onnx.helper.make_tensor_value_info("v0", onnx.TensorProto.FLOAT, [4]))  # overridable
    onnx.save(m, str(src))
    report = fold_model(load_onnx(src).model, dry_run=True)
    left = {e.id: e for e in report.skipped}
    assert left["bn0"].rule == "canonicalize" and "also a graph input" in left["bn0"].reason


def test_negative_variance_reason_matches_torch_wording(tmp_path: Path) -> None:
    src = shared_weight_model(tmp_path / "shared.onnx")
    m = onnx.load(str(src))
    v = next(t for t in m.graph.initializer if t.name == "v1")
    v.CopyFrom(onnx.numpy_helper.from_array(np.array([-1, 1, 1, 1], np.float32), "v1"))
    onnx.save(m, str(src))
    report = fold_model(load_onnx(src).model, dry_run=True)
    left = {e.id: e.reason for e in report.skipped}
    assert left == {"bn1": "'bn1' has a negative running_var; its statistics are corrupt, recalibrate first"}


def test_external_data_stays_external(tmp_path: Path) -> None:
    model, shape = BUILT["bn_flatten_gemm"]()
    (tmp_path / "in").mkdir()
    src = export(model, torch.randn(shape), tmp_path / "in" / "m.onnx", external=True)
    original, _folded, _report, dest, written = fold_file(src, tmp_path)
    assert [p.name for p in written] == ["m.folded.onnx", "m.folded.onnx.data"]
    raw = onnx.load(str(dest), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in raw.graph.initializer)
    assert onnx_parity(original, dest).passed


def test_resnet18_matches_onnxsim_and_keeps_names(tmp_path: Path) -> None:
    make, shape = ARCHS["resnet18"]
    src = export(make(), torch.randn(shape), tmp_path / "r18.onnx")
    original, folded, report, dest, _ = fold_file(src, tmp_path)
    assert _bn(original) == 20 and _bn(folded) == 0 and not report.skipped
    assert [o.name for o in folded.graph.output] == ["y"]
    assert folded.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert folded.opset_import == original.opset_import
    kept = {n.name for n in original.graph.node if n.op_type in ("Conv", "Relu", "Add", "Gemm")}
    assert kept <= {n.name for n in folded.graph.node}
    assert report.op_counts["BatchNormalization"] == (20, 0)
    parity = onnx_parity(original, dest)
    assert parity.passed and parity.reference_fp64, parity.notes  # Conv has no ORT double kernel: onnx.reference


def test_cli_fold_inspect_and_bad_files(tmp_path: Path) -> None:
    model, shape = BUILT["gemm_transB_bn"]()
    src = export(model, torch.randn(shape), tmp_path / "g.onnx")
    bnfold = [sys.executable, "-m", "bnfold.cli"]
    r = subprocess.run([*bnfold, "inspect", str(src)], capture_output=True, text=True)
    assert r.returncode == 0 and "1 would fold" in r.stdout and "BatchNormalization" in r.stdout
    out = tmp_path / "g.folded.onnx"
    r = subprocess.run([*bnfold, "fold", str(src), "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "parity PASS" in r.stdout and "Model Size" in r.stdout and out.exists()
    data = src.read_bytes()
    for k, cut in enumerate((7, len(data) // 2, len(data) - 3)):
        bad = tmp_path / f"bad{k}.onnx"
        bad.write_bytes(data[:cut])
        dest = tmp_path / f"bad{k}.out.onnx"
        r = subprocess.run([*bnfold, "fold", str(bad), "-o", str(dest)], capture_output=True, text=True)
        assert r.returncode == 2, (cut, r.stdout, r.stderr)
        assert "error:" in r.stderr and not dest.exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_cli_compile_accepts_an_onnx_file(tmp_path: Path) -> None:
    """``bnfold compile model.onnx``: the ONNX rules fold it, TVM (Relax ONNX frontend) compiles the folded file,
    and the artifact matches ONNX Runtime on the folded file (untuned: a few seconds on a tiny model)."""
    pytest.importorskip("tvm")
    import json

    model, shape = BUILT["bn_conv_pad0"]()
    src = export(model, torch.randn(shape), tmp_path / "m.onnx", dynamic_batch=False)
    out = tmp_path / "m_tvm"
    r = subprocess.run([sys.executable, "-m", "bnfold.cli", "compile", str(src), "-o", str(out), "--json",
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["fold"]["folded"] == 1 and info["parity_vs_folded"]["passed"], info
    assert (out / "model.so").exists() and (out / "manifest.json").exists()
