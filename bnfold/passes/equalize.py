"""Rule ``equalize``: cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight Equalization and
Bias Correction", ICCV 2019) of a pair ``consumer(f(producer(x)))`` (:mod:`bnfold.passes.layer_pairs`)::

    W1'[i] = W1[i] / s_i,   b1'[i] = b1[i] / s_i,   W2'[:, i] = W2[:, i] · s_i,   s_i = √(r1_i r2_i) / r2_i

with ``r1_i`` the range of the producer's output channel ``i`` and ``r2_i`` that of the consumer's input channel ``i``
(:mod:`bnfold.ir.quant_math`); afterwards both are ``√(r1_i r2_i)``. Exact because every op between is positively
homogeneous: ``f(y/s) = f(y)/s`` for ReLU, LeakyReLU, identity-like moves and max/avg pooling; a ReLU6 or another
clamp is exact only with its bounds divided by ``s`` too, so it becomes a per-channel clamp (``relu`` then
``minimum`` with ``6/s_i``: the clamp *moves* with the scale, and the change says so). The arithmetic is the fold's
(:func:`~bnfold.ir.affine_math.fold_into_producer` with ``a = 1/s``, :func:`~bnfold.ir.affine_math.fold_into_consumer`
with ``a = s``): float64, each weight rounded once into its dtype.

Depthwise convs are ordinary pairs on both sides (a depthwise consumer reads channel ``i`` in its own filter only), so
``conv → dw → conv`` is equalized by its two pairs. Each pair moves the scales of its shared channels only, so the rule
runs to a fixed point (a pair is left alone once ``max |ln s_i| ≤ tolerance``): on a chain the ranges converge to the
geometric balance Nagel's method computes. Never across a residual connection, a tensor read twice, a concat, a
non-homogeneous activation (SiLU, GELU, hardswish …) or a weight used at two call sites; each is reported with its
reason. BatchNorm moments (:mod:`bnfold.ir.moments`) of the producer's output are divided by ``s`` with it.
``move_clamps=False`` leaves pairs with a fixed-bound clamp between them instead (ONNX Runtime fuses a Relu or a
scalar Clip into its int8 conv, but runs a per-channel ``Min`` as a float op between dequantize and quantize).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from bnfold.ir.affine_math import fold_into_consumer, fold_into_producer
from bnfold.ir.graph import module_path
from bnfold.ir.linear_ops import LinearOp
from bnfold.ir.moments import Moments, moments_of, set_moments
from bnfold.ir.quant_math import equalization_scales, input_ranges, output_ranges
from bnfold.passes.context import PassContext
from bnfold.passes.engine import Candidate, Category, Change
from bnfold.passes.fold_targets import linear_op, replace_params
from bnfold.passes.layer_pairs import Pair, find_pair, kept_clamp, pair_id, set_bounds
from bnfold.passes.rule import Fail, Rule

__all__ = ["DEFAULT_TOLERANCE", "Equalize", "PairMatch", "match_pair", "pair_candidate"]

f64 = torch.float64

DEFAULT_TOLERANCE = 1e-3
"""A pair counts as balanced when every channel's scale is within ``e^±0.001`` of 1 (0.1 % of a range)."""


@dataclass(frozen=True)
class PairMatch:
    """A conv/linear (the second layer) and the pair it closes, or why it closes none."""

    consumer: LinearOp
    pair: Pair | Fail

    @property
    def sources(self) -> tuple[str, ...]:
        return (pair_id(self.consumer.node),)


@dataclass(frozen=True)
class Scales:
    s: torch.Tensor  # float64, per channel


def match_pair(ctx: PassContext, node: torch.fx.Node) -> PairMatch | None:
    """A :class:`PairMatch` at every conv/linear whose input is not a graph input (shared by the pair rules)."""
    op = linear_op(ctx, node)
    if not isinstance(op, LinearOp):
        return None
    found = find_pair(ctx, op)
    return None if found is None else PairMatch(op, found)


def pair_candidate(m: PairMatch) -> Candidate:
    """The report candidate of a pair: named by both layers' module paths when it was found."""
    if isinstance(m.pair, Pair):
        path = f"{module_path(m.pair.producer.node)} → {module_path(m.consumer.node)}"
    else:
        path = module_path(m.consumer.node)
    return Candidate(pair_id(m.consumer.node), "layer pair", path)


class Equalize(Rule[PairMatch, Scales]):
    name = "equalize"
    category = Category.EQUALIZE

    def __init__(self, tolerance: float = DEFAULT_TOLERANCE, *, move_clamps: bool = True) -> None:
        self.tolerance = tolerance
        self.move_clamps = move_clamps

    def match(self, ctx: PassContext, node: torch.fx.Node) -> PairMatch | None:
        return match_pair(ctx, node)

    def candidate(self, ctx: PassContext, m: PairMatch) -> Candidate:
        return pair_candidate(m)

    def check(self, ctx: PassContext, m: PairMatch) -> Scales | Fail:
        if isinstance(m.pair, Fail):
            return m.pair
        p = m.pair
        kept = None if self.move_clamps else kept_clamp(p)
        if kept is not None:
            return kept
        r1 = output_ranges(p.producer.weight, p.producer.kind)
        r2 = input_ranges(p.consumer.weight, p.consumer.kind, p.consumer.groups)
        return Scales(equalization_scales(r1, r2))

    def rewrite(self, ctx: PassContext, m: PairMatch, plan: Scales) -> list[Change]:
        p = m.pair
        assert isinstance(p, Pair)
        s = plan.s
        if float(s.log().abs().max()) <= self.tolerance:
            return []  # balanced: nothing to change (the fixed point)
        producer, consumer = p.producer, p.consumer
        w1, b1 = fold_into_producer(producer.weight, producer.bias, 1.0 / s, torch.zeros_like(s),
                                    kind=producer.kind, groups=producer.groups, out_dtype=producer.weight.dtype)
        w2, _ = fold_into_consumer(consumer.weight, None, s, None, kind=consumer.kind, groups=consumer.groups)
        notes = []
        for step in p.steps:
            if step.kind in ("clamp", "bound"):
                assert step.lo is not None and step.hi is not None
                became = set_bounds(ctx, step, step.lo / s, step.hi / s)
                if step.kind == "clamp":
                    notes.append(f"{became} (its clamp moved with the scales: clamp(x/s, lo/s, hi/s) = "
                                 "clamp(x, lo, hi)/s)")
        into_p = replace_params(ctx, producer, w1, None if producer.bias is None else b1)
        into_c = replace_params(ctx, consumer, w2, consumer.bias)
        before = moments_of(producer.node)
        if before is not None:
            set_moments(producer.node, Moments(before.mean / s, before.std / s))
        lo, hi = float(s.min()), float(s.max())
        detail = (f"rescaled {s.numel()} channels (s in [{lo:.3g}, {hi:.3g}], max |ln s| "
                  f"{float(s.log().abs().max()):.3g}) between {p.describe()}")
        if notes:
            detail += "; " + "; ".join(notes)
        return [self.change(consumer.node, detail, m.sources, into=f"{into_p}, {into_c}")]

