"""The ONNX fold of norm affines written with the ONNX norm ops themselves (graphs built with ``onnx.helper``):
RMSNormalization (opset 23) → MatMul, GroupNormalization (opset 21, per-channel γ/β) → 1x1 Conv, and the negative
twin (a zero-padded 3x3 Conv cannot take the shift: the norm stays whole, with the reason). Parity with ONNX Runtime
against the float64 rule."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
from onnx_cases import fold_file

from bnfold.parity.ort import onnx_parity

RNG = np.random.default_rng(0)


def _f32(*shape: int, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return RNG.uniform(low, high, shape).astype(np.float32)


def _save(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], x_shape: list[object], y_shape: list[object],
          opset: int, path: Path) -> Path:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _supported(path: Path) -> None:
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # an ONNX Runtime without the op: nothing to compare against
        pytest.skip(f"ONNX Runtime {ort.__version__} cannot run it: {exc}")


def test_rmsnorm_scale_folds_into_the_matmul(tmp_path: Path) -> None:
    src = _save([helper.make_node("RMSNormalization", ["x", "gamma"], ["n"], axis=-1, epsilon=1e-5),
                 helper.make_node("MatMul", ["n", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                {"gamma": _f32(16, low=0.5, high=2.0), "w": _f32(16, 8), "b": _f32(8)},
                ["batch", 5, 16], ["batch", 5, 8], 23, tmp_path / "rms.onnx")
    _supported(src)
    _, folded, report, dest, _ = fold_file(src, tmp_path)
    assert len(report.folded) == 1 and not report.skipped, report
    gamma = next(numpy_helper.to_array(t) for t in folded.graph.initializer if t.name.startswith("gamma")
                 or t.name in {i for n in folded.graph.node if n.op_type == "RMSNormalization" for i in n.input[1:]})
    assert np.all(gamma == 1)  # the norm keeps only its normalization
    assert onnx_parity(src, dest).passed


def test_groupnorm_affine_folds_into_a_pointwise_conv(tmp_path: Path) -> None:
    src = _save([helper.make_node("GroupNormalization", ["x", "gamma", "beta"], ["n"], num_groups=2,
                                  epsilon=1e-5),
                 helper.make_node("Conv", ["n", "w", "b"], ["y"], kernel_shape=[1, 1])],
                {"gamma": _f32(4, low=0.5, high=2.0), "beta": _f32(4), "w": _f32(6, 4, 1, 1), "b": _f32(6)},
                ["batch", 4, 5, 5], ["batch", 6, 5, 5], 21, tmp_path / "gn.onnx")
    _supported(src)
    _, _, report, dest, _ = fold_file(src, tmp_path)
    assert len(report.folded) == 1 and not report.skipped, report
    assert onnx_parity(src, dest).passed


def test_negative_groupnorm_before_zero_padded_conv_stays_whole(tmp_path: Path) -> None:
    src = _save([helper.make_node("GroupNormalization", ["x", "gamma", "beta"], ["n"], num_groups=2,
                                  epsilon=1e-5),
                 helper.make_node("Conv", ["n", "w", "b"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
                {"gamma": _f32(4, low=0.5, high=2.0), "beta": _f32(4), "w": _f32(6, 4, 3, 3), "b": _f32(6)},
                ["batch", 4, 5, 5], ["batch", 6, 5, 5], 21, tmp_path / "gn3.onnx")
    _supported(src)
    _, _, report, dest, _ = fold_file(src, tmp_path)
    assert not report.folded and len(report.skipped) == 1
    assert "pads with zeros" in report.skipped[0].reason
    assert onnx_parity(src, dest).passed
