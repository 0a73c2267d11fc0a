"""``constant_fold`` on ONNX graphs (:mod:`bnfold.passes.onnx.constant_fold`): what torch's own exporter writes —
``torch.onnx.export(..., dynamo=True, optimize=False)`` gives a bias-less conv the zero bias
``Expand(CastLike(0, x), Slice(Shape(W)))`` — becomes an initializer, so the BatchNormalization folds; values that
depend on a graph input (an initializer that is also an input may be overridden) stay computed; shared initializers
stay as their other readers need them; names, dynamic axes, opset and declared ``value_info`` are kept."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnx import fold_model
from bnfold.parity.ort import onnx_parity
from bnfold.passes.onnx.constant_fold import fold_initializer_constants


def _init(name: str, a: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def _zero_bias(w: str, out: str, zero: str = "zero") -> list[onnx.NodeProto]:
    """The dynamo exporter's zero bias of a conv with weight ``w`` (its nodes unnamed, as onnx.helper leaves them)."""
    return [helper.make_node("Shape", [w], [f"{out}_shape"]),
            helper.make_node("Slice", [f"{out}_shape", "s0", "s1"], [f"{out}_n"]),
            helper.make_node("CastLike", [zero, "x"], [f"{out}_z"]),
            helper.make_node("Expand", [f"{out}_z", f"{out}_n"], [out])]


def dynamo_conv_bn(*, overridable_zero: bool = False, shared: bool = False, seed: int = 0) -> onnx.ModelProto:
    """``Conv(x, W, zero bias) → BatchNormalization → Relu`` with the exporter's zero-bias subgraph; ``shared``: a
    second Conv → BN reads the same ``W`` and the same bias value, and a third Conv reads ``W`` with no BN after it;
    ``overridable_zero``: the 0 comes from an initializer that is also a graph input."""
    rng = np.random.default_rng(seed)
    c = 4
    inits = [_init("W", rng.standard_normal((c, 3, 3, 3))), numpy_helper.from_array(np.array([0], np.int64), "s0"),
             numpy_helper.from_array(np.array([1], np.int64), "s1"), _init("zero", np.array(0.0)),
             _init("gamma", rng.standard_normal(c)), _init("beta", rng.standard_normal(c)),
             _init("mean", rng.standard_normal(c) * 0.5), _init("var", rng.uniform(0.1, 2.0, c))]
    nodes = [*_zero_bias("W", "bias"),
             helper.make_node("Conv", ["x", "W", "bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["y"], name="relu")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", c, 8, 8])]
    if shared:
        nodes += [helper.make_node("Conv", ["x", "W", "bias"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", ["c2", "gamma", "beta", "mean", "var"], ["y2"], name="bn2"),
                  helper.make_node("Conv", ["x", "W"], ["y3"], name="conv3", pads=[1, 1, 1, 1])]
        outputs += [helper.make_tensor_value_info(v, TensorProto.FLOAT, ["batch", c, 8, 8]) for v in ("y2", "y3")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])]
    if overridable_zero:
        inputs.append(helper.make_tensor_value_info("zero", TensorProto.FLOAT, []))
    graph = helper.make_graph(nodes, "dynamo_conv_bn", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], producer_name="bnfold-tests")
    onnx.checker.check_model(model, full_check=True)
    return model


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_the_exporters_zero_bias_becomes_an_initializer_and_the_bn_folds() -> None:
    model = dynamo_conv_bn()
    original = onnx.ModelProto()
    original.CopyFrom(model)
    assert _ops(model) == ["Shape", "Slice", "CastLike", "Expand", "Conv", "BatchNormalization", "Relu"]  # Before
    report = fold_model(model)
    assert _ops(model) == ["Conv", "Relu"]  # Expected
    assert [e.id for e in report.folded] == ["bn"] and not report.skipped, report.render()
    conv = model.graph.node[0]
    assert conv.name == "conv" and conv.input[2] in {t.name for t in model.graph.initializer}
    assert [c["rule"] for c in report.changes][:1] == ["constant_fold"]
    parity = onnx_parity(original, model)
    assert parity.passed and parity.reference_fp64, parity.summary()


def test_the_fold_is_what_it_was_without_the_constant_subgraph() -> None:
    """The folded conv equals the fold of the same model written with an explicit zero bias (same float64 math)."""
    model = dynamo_conv_bn()
    fold_model(model)
    plain = dynamo_conv_bn()
    plain.graph.initializer.append(_init("b0", np.zeros(4)))
    conv = next(n for n in plain.graph.node if n.name == "conv")
    conv.input[2] = "b0"
    del plain.graph.node[:4]
    fold_model(plain)

    def params(m: onnx.ModelProto) -> list[bytes]:
        inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        conv = next(n for n in m.graph.node if n.name == "conv")
        return [inits[i].tobytes() for i in conv.input[1:]]

    assert params(model) == params(plain)


def test_negative_a_value_from_an_overridable_initializer_stays_computed() -> None:
    """Negative twin: the zero is an initializer that is also a graph input (the caller may pass another value), so
    the bias is not a constant and the BatchNormalization stays — with the reason naming the computed bias."""
    model = dynamo_conv_bn(overridable_zero=True)
    report = fold_model(model)
    assert "Expand" in _ops(model) and "BatchNormalization" in _ops(model)
    (left,) = report.skipped
    assert left.rule == "fold_into_producer"
    assert "producer 'conv' cannot be rewritten: its bias 'bias' is computed by Expand" in left.reason, left.reason


def test_shared_weight_and_bias_stay_alias_safe() -> None:
    """Two Conv → BN pairs read one weight and one folded bias; a third Conv reads the weight with no BN: both BNs
    fold into their own copies, the third conv still reads the original weight."""
    model = dynamo_conv_bn(shared=True)
    w_before = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W")).copy()
    original = onnx.ModelProto()
    original.CopyFrom(model)
    report = fold_model(model)
    assert len(report.folded) == 2 and "BatchNormalization" not in _ops(model), report.render()
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    conv3 = next(n for n in model.graph.node if n.name == "conv3")
    np.testing.assert_array_equal(inits[conv3.input[1]], w_before)
    convs = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    assert len({convs["conv"].input[1], convs["conv2"].input[1], convs["conv3"].input[1]}) == 3
    parity = onnx_parity(original, model)
    assert parity.passed, parity.summary()


def test_names_axes_opset_and_declared_value_info_are_kept() -> None:
    model = dynamo_conv_bn()
    model.graph.value_info.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", 4, 8, 8]))
    done = fold_initializer_constants(model)
    assert done.modified and len(done.nodes) == 4
    assert [n.name for n in model.graph.node] == ["conv", "bn", "relu"]
    assert [vi.name for vi in model.graph.value_info] == ["c"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 20)]


def test_a_model_with_nothing_to_fold_is_left_byte_for_byte() -> None:
    from helpers import onnx_conv_bn

    model = onnx_conv_bn()
    before = model.SerializeToString()
    assert not fold_initializer_constants(model).modified
    assert model.SerializeToString() == before
