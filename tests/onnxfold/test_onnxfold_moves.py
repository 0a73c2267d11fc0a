"""Moves on the ONNX graph (:mod:`bnfold.passes.onnx.moves`, the torch back end's index-map mechanism): a
BatchNormalization moved back through Flatten / Transpose / Slice / Gather / Concat into its conv/linear producers,
and forward through a channel Concat into its consumer — each with parity (ONNX Runtime, float64 rule) and a
negative twin that asserts the reason in the torch back end's words."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
from onnx_cases import BUILT, export, fold_file
from onnx_cases import bn_count as _bn

from bnfold.onnx import fold_model, load_onnx
from bnfold.parity.ort import onnx_parity


def _bn_node(rng: np.random.Generator, x: str, y: str, c: int, name: str = "bn") -> tuple[onnx.NodeProto, list]:
    inits = [numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), f"{name}_g"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), f"{name}_b"),
             numpy_helper.from_array((rng.standard_normal(c) * 0.5).astype(np.float32), f"{name}_m"),
             numpy_helper.from_array(rng.uniform(0.1, 2, c).astype(np.float32), f"{name}_v")]
    return helper.make_node("BatchNormalization", [x, *(t.name for t in inits)], [y], name=name), inits


def _model(path: Path, nodes: list, inits: list, x_shape: list, y_shape: list) -> Path:
    graph = helper.make_graph(nodes, "moves", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bnfold-tests")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _conv_then(path: Path, op: onnx.NodeProto, extra: list, channels: int, out_ch: int = 8) -> Path:
    """x → Conv(out_ch) → ``op`` → BatchNormalization(channels) → y."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((out_ch, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(out_ch).astype(np.float32), "B"), *extra]
    bn, bn_inits = _bn_node(rng, "moved", "y", channels)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]), op, bn]
    return _model(path, nodes, inits + bn_inits, ["batch", 3, 6, 6], ["batch", channels, 6, 6])


def test_bn_after_slice_of_channels_folds_back_into_the_conv(tmp_path: Path) -> None:
    """Slice keeps channels 2..5 of 8: the conv's other channels get the identity (a = 1, b = 0)."""
    ints = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
            (("st", [2]), ("en", [6]), ("ax", [1]))]
    src = _conv_then(tmp_path / "slice.onnx", helper.make_node("Slice", ["c", "st", "en", "ax"], ["moved"],
                                                               name="slice"), ints, 4)
    original, folded, report, dest, _ = fold_file(src, tmp_path)
    assert _bn(folded) == 0 and report.folded[0].into == "Conv 'conv'", report.render(explain=True)
    assert "moved back through Slice 'slice'" in report.folded[0].detail
    assert onnx_parity(original, dest).passed


def test_bn_after_channel_gather_folds_back_into_the_conv(tmp_path: Path) -> None:
    idx = numpy_helper.from_array(np.array([2, 0, 3, 1], np.int64), "idx")
    src = _conv_then(tmp_path / "gather.onnx", helper.make_node("Gather", ["c", "idx"], ["moved"], name="gather",
                                                                axis=1), [idx], 4, out_ch=4)
    original, folded, report, dest, _ = fold_file(src, tmp_path)
    assert _bn(folded) == 0, report.render(explain=True)
    assert onnx_parity(original, dest).passed


def test_gather_reading_a_channel_twice_is_left_with_reason(tmp_path: Path) -> None:
    """Negative twin: channel 0 feeds two BN channels, so no single conv coefficient can take both."""
    idx = numpy_helper.from_array(np.array([0, 0, 3, 1], np.int64), "idx")
    src = _conv_then(tmp_path / "gather2.onnx", helper.make_node("Gather", ["c", "idx"], ["moved"], name="gather",
                                                                 axis=1), [idx], 4, out_ch=4)
    report = fold_model(load_onnx(src).model, dry_run=True)
    (left,) = report.skipped
    assert "backward, through 'gather': the op reads some element twice" in left.reason


def test_bn1d_after_transpose_folds_back_into_matmul(tmp_path: Path) -> None:
    """(B, N, C) → Transpose(0, 2, 1) → BatchNorm1d over C (a conformer/TCN pattern) → the MatMul's columns."""
    rng = np.random.default_rng(1)
    bn, bn_inits = _bn_node(rng, "t", "y", 8)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
             helper.make_node("Transpose", ["mm"], ["t"], name="tr", perm=[0, 2, 1]), bn]
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "W"), *bn_inits]
    src = _model(tmp_path / "tr.onnx", nodes, inits, ["batch", 5, 16], ["batch", 8, 5])
    original, folded, report, dest, _ = fold_file(src, tmp_path)
    assert _bn(folded) == 0 and report.folded[0].rule == "fold_into_producer", report.render(explain=True)
    assert onnx_parity(original, dest).passed


def test_reshape_that_mixes_the_batch_into_channels_is_left_with_reason(tmp_path: Path) -> None:
    """Negative twin of the dynamic-batch rule: (B, 4) → Reshape(2, -1) gives B·2 'channels'; the BN's 4 fit
    only at batch 2, so nothing moves."""
    rng = np.random.default_rng(2)
    bn, bn_inits = _bn_node(rng, "r", "y", 4)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
             helper.make_node("Reshape", ["mm", "shape"], ["r"], name="reshape"), bn]
    inits = [numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([2, -1], np.int64), "shape"), *bn_inits]
    src = _model(tmp_path / "mix.onnx", nodes, inits, ["batch", 3], [2, "c"])
    report = fold_model(load_onnx(src).model, dry_run=True)
    (left,) = report.skipped
    assert "backward, its channel axis has a size known only at run time" in left.reason, left.reason


def test_levit_linear_norm_folds_back_through_flatten(tmp_path: Path) -> None:
    """LeViT's LinearNorm exported: MatMul → Flatten(B·N, C) → BatchNormalization → Reshape (Shape of the MatMul
    output: a shape-only reader does not block the fold)."""
    model, shape = BUILT["levit_mlp"]()
    src = export(model, torch.randn(shape), tmp_path / "levit.onnx")
    original, folded, report, dest, _ = fold_file(src, tmp_path)
    assert _bn(original) == 2 and _bn(folded) == 0, report.render(explain=True)
    assert all(e.rule == "fold_into_producer" and "MatMul" in e.into for e in report.folded)
    parity = onnx_parity(original, dest)
    assert parity.passed, parity.summary()
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((3, *shape[1:])).astype(np.float32)  # another batch size
    got = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        want = model.double()(torch.from_numpy(x).double()).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_levit_matmul_read_elsewhere_is_left_with_reason(tmp_path: Path) -> None:
    """Negative twin: the MatMul's output is also a graph output (single-reader condition)."""
    model, shape = BUILT["levit_mlp"]()
    src = export(model, torch.randn(shape), tmp_path / "levit.onnx")
    m = onnx.load(str(src))
    mm = next(n for n in m.graph.node if n.op_type == "MatMul")
    m.graph.output.append(helper.make_tensor_value_info(mm.output[0], TensorProto.FLOAT, ["batch", 5, 32]))
    onnx.save(m, str(src))
    report = fold_model(load_onnx(src).model, dry_run=True)
    left = {e.id: e.reason for e in report.skipped}
    assert list(left) == ["/ln1/bn/BatchNormalization"], report.render(explain=True)
    assert f"backward, MatMul '{mm.name}' has other users" in left["/ln1/bn/BatchNormalization"]


@pytest.mark.parametrize("name", ["concat_forward_conv", "conv_concat_bn"])
def test_bn_moves_through_channel_concat(name: str, tmp_path: Path) -> None:
    model, shape = BUILT[name]()
    src = export(model, torch.randn(shape), tmp_path / f"{name}.onnx")
    original, folded, report, dest, _ = fold_file(src, tmp_path)
    assert _bn(folded) == 0 and not report.skipped, report.render(explain=True)
    changes = [c for c in report.changes if c["category"] == "fold"]
    if name == "conv_concat_bn":  # split into both convs
        assert sorted(c["into"] for c in changes) == ["Conv '/a/Conv'", "Conv '/b/Conv'"]
    else:  # into the consumer, the other branch's coefficients are the identity
        assert [c["into"] for c in changes] == ["Conv '/out/Conv'"] and "Concat" in changes[0]["detail"]
    parity = onnx_parity(original, dest)
    assert parity.passed, parity.summary()


def test_concat_along_another_axis_is_left_with_reason(tmp_path: Path) -> None:
    """Negative twin (forward): a Concat along a spatial axis would need the affine on the other input too."""
    from onnx_cases import concat_forward

    model, shape = concat_forward(dim=2)
    src = export(model, torch.randn(shape), tmp_path / "cat2.onnx")
    report = fold_model(load_onnx(src).model, dry_run=True)
    (left,) = report.skipped
    assert "concatenates along another axis than the affine's (the other inputs would need it too)" in left.reason


def test_concat_input_read_elsewhere_is_left_with_reason(tmp_path: Path) -> None:
    """Negative twin (backward): one concatenated conv output is also read by another op."""
    from onnx_cases import concat_backward

    model, shape = concat_backward(leak=True)
    src = export(model, torch.randn(shape), tmp_path / "leak.onnx")
    report = fold_model(load_onnx(src).model, dry_run=True)
    (left,) = report.skipped
    assert "backward, Conv '/a/Conv' has other users" in left.reason, left.reason
