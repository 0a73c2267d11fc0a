"""Rule ``correct_bias``: subtract from every conv/linear bias the expected output shift its int8 weights cause
(Nagel et al., ICCV 2019, §4.2)::

    y_int8 = Ŵ x + b = W x + b + ΔW x,     E[ΔW x] = ΔW E[x]     ⇒     b' = b − E[ΔW x]

``Ŵ`` is the weight exactly as ONNX Runtime's static quantization will store it (symmetric int8, per output channel or
per tensor: :func:`bnfold.ir.quant_math.fake_quantize_weight`), ``ΔW = Ŵ − W``. ``E[ΔW x]`` per output channel is
either

* *measured*: ``shifts`` maps a node name to the mean over calibration data of the layer's output computed with
  ``ΔW`` (zero-padded borders included), which ``bnfold.quantize`` measures before this rule runs; or
* *data-free* (``shifts=None``): ``ΔW`` times the per-channel mean of the layer's input that the BatchNorm statistics
  give (:func:`bnfold.passes.input_means.expected_values`: the clipped normal after a ReLU, …), with ``Σ_{c,k} ΔW[o, c,
  k] E[x_c]`` for a conv (its border ignored).

Every plan is made before any bias changes (a mean derived through an earlier layer's bias must be the float model's),
and a corrected op is marked so the rule never applies twice. The float model changes on purpose (category
``correct``): it is the int8 model whose error becomes zero-mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx

from bnfold.ir.affine_math import fold_into_consumer
from bnfold.ir.graph import module_path, node_shape
from bnfold.ir.linear_ops import LinearOp
from bnfold.ir.quant_math import fake_quantize_weight
from bnfold.passes.context import PassContext
from bnfold.passes.engine import Candidate, Category, Change, PassResult
from bnfold.passes.fold_targets import linear_op, replace_params
from bnfold.passes.input_means import Expectation, expected_values
from bnfold.passes.rule import Fail, Rule

__all__ = ["CORRECTED_KEY", "CorrectBias", "LayerMatch", "bias_id", "weight_error"]

f64 = torch.float64

CORRECTED_KEY = "bnfold_bias_corrected"
"""``node.meta`` key of a conv/linear whose bias ``correct_bias`` corrected (never twice)."""


def bias_id(node: torch.fx.Node) -> str:
    return f"bias:{node.name}"


def weight_error(op: LinearOp, *, per_channel: bool) -> torch.Tensor:
    """``ΔW = Ŵ − W`` (float64) for ``op``'s weight as ONNX Runtime quantizes it (output channels on dim 0)."""
    w = op.weight.detach()
    return fake_quantize_weight(w, per_channel=per_channel).to(f64) - w.to(f64)


@dataclass(frozen=True)
class LayerMatch:
    op: LinearOp

    @property
    def sources(self) -> tuple[str, ...]:
        return (bias_id(self.op.node),)


@dataclass(frozen=True)
class Correction:
    shift: torch.Tensor  # E[ΔW x] per output channel, float64


class CorrectBias(Rule[LayerMatch, Correction]):
    name = "correct_bias"
    category = Category.CORRECT

    def __init__(self, *, per_channel: bool = True, shifts: Mapping[str, torch.Tensor] | None = None) -> None:
        self.per_channel = per_channel
        self.shifts = shifts
        self._means: dict[torch.fx.Node, Expectation | Fail] = {}

    def match(self, ctx: PassContext, node: torch.fx.Node) -> LayerMatch | None:
        op = linear_op(ctx, node)
        if not isinstance(op, LinearOp) or node.meta.get(CORRECTED_KEY):
            return None
        return LayerMatch(op)

    def candidate(self, ctx: PassContext, m: LayerMatch) -> Candidate:
        return Candidate(bias_id(m.op.node), "layer bias", module_path(m.op.node))

    def check(self, ctx: PassContext, m: LayerMatch) -> Correction | Fail:
        op = m.op
        if op.kind not in ("conv", "linear"):
            return Fail(f"{op.describe()} is a conv-transpose (its quantization axis differs; not corrected)")
        if self.shifts is not None:
            shift = self.shifts.get(op.node.name)
            if shift is None:
                return Fail(f"{op.describe()} was not reached by the calibration data")
            return Correction(shift.to(f64))
        mean = self._means.get(op.input, Fail("its input's mean was not derived"))
        if isinstance(mean, Fail):
            return Fail(f"the mean of its input is unknown from BatchNorm statistics: {mean}")
        shape = node_shape(op.input)
        if shape is None or mean.axis != op.channel_axis % len(shape) or mean.mean.numel() != op.in_channels:
            return Fail(f"the known channel means do not line up with {op.describe()}'s input channels")
        _, shift = fold_into_consumer(weight_error(op, per_channel=self.per_channel), None,
                                      torch.ones_like(mean.mean), mean.mean, kind=op.kind, groups=op.groups)
        assert shift is not None
        return Correction(shift)

    def rewrite(self, ctx: PassContext, m: LayerMatch, plan: Correction) -> list[Change]:
        op = m.op
        bias = torch.zeros_like(plan.shift) if op.bias is None else op.bias.detach().to(f64)
        where = replace_params(ctx, op, op.weight, bias - plan.shift)
        op.node.meta[CORRECTED_KEY] = True
        source = "calibration data" if self.shifts is not None else "BatchNorm statistics"
        detail = (f"bias corrected by −E[ΔW x] (max |shift| {float(plan.shift.abs().max()):.3g}, from {source}; "
                  f"{'per-channel' if self.per_channel else 'per-tensor'} int8 weights)")
        return [self.change(op.node, detail, m.sources, into=where)]

    def run(self, ctx: PassContext, worklist: Sequence[torch.fx.Node]) -> PassResult:
        """Plan every layer first, then correct: a mean derived through a corrected bias would be the int8 model's,
        not the float model's."""
        self._means = expected_values(ctx) if self.shifts is None else {}
        result = PassResult()
        planned: list[tuple[LayerMatch, Correction]] = []
        for node in worklist:
            if not ctx.is_live(node):
                continue
            ctx.current = node
            m = self.match(ctx, node)
            if m is None:
                continue
            result.candidates.append(self.candidate(ctx, m))
            plan = self.check(ctx, m)
            if isinstance(plan, Fail):
                result.reject(node, self.name, plan.reason, m.sources)
                continue
            planned.append((m, plan))
        for m, plan in planned:
            ctx.current = m.op.node
            result.changes.extend(self.rewrite(ctx, m, plan))
        self._means = {}
        return result
