"""The ONNX rules run through the torch rules' engine (:mod:`bnfold.passes.engine`): one rule at a time on a built
graph (Before/Expected op lists, negative twins asserting the reason), the instruments (``Verify``, ``Until``,
``DumpIR``), typed failures from the shared predicates, and the one crossing table both back ends read."""

from __future__ import annotations

import io
from pathlib import Path

import onnx
import pytest
import torch.nn.functional as F
from helpers import onnx_conv_bn
from onnx import TensorProto, helper

from bnfold.errors import InputError
from bnfold.ir import reasons
from bnfold.ir.fold_targets import producer_target
from bnfold.ir.reasons import Fail
from bnfold.onnx import fold_model
from bnfold.passes.commute import CROSSINGS, FX_FUNCTIONS, Commutes
from bnfold.passes.engine import DumpIR, Pipeline, Verify
from bnfold.passes.onnx import FIXED_POINT, OnnxContext, OnnxFoldIntoConsumer, OnnxFoldIntoProducer, onnx_pipeline
from bnfold.passes.onnx.moves import ONNX_OPS


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _run(rule: object, model: onnx.ModelProto) -> tuple[OnnxContext, object]:
    ctx = OnnxContext(model)
    result = Pipeline([rule], instruments=[Verify()]).run_on(ctx)  # type: ignore[list-item]
    return ctx, result


def test_fold_into_producer_alone() -> None:
    model = onnx_conv_bn()
    assert _ops(model) == ["Conv", "BatchNormalization", "Relu"]  # Before
    _, result = _run(OnnxFoldIntoProducer(), model)
    assert _ops(model) == ["Conv", "Relu"]  # Expected
    assert [(c.rule, c.category.value) for c in result.changes] == [("fold_into_producer", "fold")]
    assert model.graph.node[0].output[0] == "n"  # the conv took over the BatchNormalization's output name


def test_negative_fold_into_producer_when_the_conv_output_is_read_elsewhere() -> None:
    """Negative twin: the conv's output is also a graph output — folding would change it."""
    model = onnx_conv_bn()
    model.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", 4, 8, 8]))
    before = _ops(model)
    _, result = _run(OnnxFoldIntoProducer(), model)
    assert _ops(model) == before  # Expected = Before
    (r,) = result.rejections
    assert r.rule == "fold_into_producer" and r.node == "bn"
    assert r.reason == reasons.producer_shared("Conv 'conv'", "'bn', a graph output")


def test_negative_fold_into_consumer_reads_the_shared_reason() -> None:
    """The consumer rule on Conv → BN → Relu: a Relu is no conv/linear — the torch rule's words."""
    model = onnx_conv_bn()
    _, result = _run(OnnxFoldIntoConsumer(), model)
    (r,) = result.rejections
    assert r.reason == reasons.consumer_not_linear("relu", "Relu")


def test_producer_target_returns_a_typed_failure_naming_the_node() -> None:
    model = onnx_conv_bn()
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3, 3, 3]))  # overridable
    ctx = OnnxContext(model)
    got = producer_target(ctx.targets, "c", 1, 4, 4)
    assert isinstance(got, Fail) and got.node == "conv"
    assert got.reason.startswith("producer 'conv' cannot be rewritten: its weight 'W' is an initializer that is also")


def test_the_whole_pipeline_verified_after_every_pass() -> None:
    model = onnx_conv_bn()
    verify = Verify()
    result = onnx_pipeline([verify]).run_on(OnnxContext(model))
    assert result.converged and verify.checked >= 1 and _ops(model) == ["Conv", "Relu"]
    assert [p.name for p in FIXED_POINT] == [p.name for p in onnx_pipeline().passes]


def test_until_stops_after_the_named_pass_and_the_report_says_so() -> None:
    model = onnx_conv_bn()
    model.graph.node.append(helper.make_node("BatchNormalization", ["y", "gamma", "beta", "mean", "var"], ["y2"],
                                             name="bn_after_relu"))
    model.graph.output[0].name = "y2"
    report = fold_model(model, until="fold_into_producer")
    assert report.stopped_after == "fold_into_producer" and not report.converged
    assert "stopped after pass fold_into_producer" in report.render()
    assert [e.id for e in report.folded] == ["bn"]


def test_until_names_a_pass_of_the_onnx_pipeline() -> None:
    with pytest.raises(InputError, match="names no pass of the ONNX pipeline"):
        fold_model(onnx_conv_bn(), until="fold_into_embedding")


def test_dump_ir_to_a_stream_and_to_a_folder(tmp_path: Path) -> None:
    stream = io.StringIO()
    fold_model(onnx_conv_bn(), dump_ir=stream)
    text = stream.getvalue()
    assert "# --- before fold_into_producer ---" in text and "BatchNormalization" in text.split("# --- after")[0]
    dump = DumpIR(folder=tmp_path)
    onnx_pipeline([dump]).run_on(OnnxContext(onnx_conv_bn()))
    assert [p.name for p in dump.written] == ["001-fold_into_producer.txt"]


def test_one_crossing_table_for_both_back_ends() -> None:
    """ONNX ``Relu`` and torch's ``F.relu`` read into the same family; the algebra is the one table's."""
    ctx = OnnxContext(onnx_conv_bn())
    relu = ctx.g.graph.node[2]
    onnx_facts = ONNX_OPS["Relu"](ctx.g, relu, (2, 4, 8, 8), 2)
    assert not isinstance(onnx_facts, Fail) and onnx_facts.how is Commutes.RELU
    fx_facts = FX_FUNCTIONS[F.relu](None, None, (2, 4, 8, 8), (2, 4, 8, 8))  # type: ignore[arg-type]
    assert not isinstance(fx_facts, Fail) and fx_facts.how is Commutes.RELU
    assert set(CROSSINGS) == set(Commutes)


def test_a_run_cut_short_by_the_round_limit_is_reported_as_not_converged() -> None:
    """The ONNX pipeline's result and report say a run stopped by the round limit did not converge (round 1 folded
    the BN, so one round cannot know it reached the fixed point)."""
    from bnfold.api import build_report

    model = onnx_conv_bn()
    result = Pipeline(onnx_pipeline().passes, max_rounds=1).run_on(OnnxContext(model))
    assert result.rounds == 1 and not result.converged and result.stopped_after is None
    assert _ops(model) == ["Conv", "Relu"]
    report = build_report("onnx", result)
    assert report.to_dict()["converged"] is False
    assert "without reaching a fixed point" in report.render()
    assert fold_model(onnx_conv_bn()).converged
