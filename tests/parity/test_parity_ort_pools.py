"""The float64 reference of an ONNX graph with ``ceil_mode`` pools (:func:`bnfold.parity.ort.floor_exact_pools`):
``onnx.reference`` sizes a ``MaxPool(k=3, s=1, pads=1, ceil_mode=1)`` on 10 as 12 (onnx 1.23), so torchvision's
googlenet got no float64 reference; where floor rounding gives the same size the attribute is dropped (same
function), elsewhere it is kept."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from bnfold.parity.ort import OrtModel, floor_exact_pools


def _pool(stride: int, pad: int, size: int, elem: int = TensorProto.DOUBLE) -> onnx.ModelProto:
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[stride] * 2, pads=[pad] * 4,
                            ceil_mode=1)
    graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", elem, ["n", 2, size, size])],
                              [helper.make_tensor_value_info("y", elem, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _ceil(m: onnx.ModelProto) -> bool:
    return any(a.name == "ceil_mode" for a in m.graph.node[0].attribute)


def test_a_pool_whose_floor_size_is_exact_loses_ceil_mode_and_reference_agrees_with_ort() -> None:
    x = np.random.default_rng(0).standard_normal((2, 2, 10, 10))
    fixed = floor_exact_pools(_pool(1, 1, 10))
    assert not _ceil(fixed)
    got = ReferenceEvaluator(fixed).run(None, {"x": x})[0]
    want = OrtModel(_pool(1, 1, 10, TensorProto.FLOAT))(__import__("torch").from_numpy(x.astype(np.float32)))[0]
    assert got.shape == (2, 2, 10, 10)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)


def test_negative_a_pool_that_rounds_up_keeps_ceil_mode() -> None:
    """Negative twin: stride 2 on 8 — ceil gives 4, floor 3: the attribute matters and stays."""
    model = _pool(2, 0, 8)
    assert floor_exact_pools(model) is model and _ceil(model)
