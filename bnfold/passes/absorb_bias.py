"""Rule ``absorb_bias``: move a per-channel constant ``c`` out of a pair ``consumer(f(producer(x)))``
(:mod:`bnfold.passes.layer_pairs`) into the consumer's bias (Nagel et al., ICCV 2019, §4.1, "absorbing high biases")::

    b1'[i] = b1[i] − c_i,     b2' = b2 + W2 · c     (conv: b2'[o] = b2[o] + Σ_{i,k} W2[o, i, k] c_i)

so the tensor between the layers loses its per-channel offset, and with it range that an int8 activation grid would
spend on it. The ops between must let ``c`` through: ``f(y) − c = f(y − c)``.

* identity-like moves and pools (no activation): exact for any ``c``; ``c = mean`` centres every channel;
* ReLU / LeakyReLU (and a clamp whose lower bound is 0, i.e. ReLU6): ``relu(y) − c = relu(y − c)`` exactly where
  ``y ≥ c ≥ 0``, so ``c_i = max(0, mean_i − 3·std_i)``: by the normal model of the pre-activation
  (:mod:`bnfold.ir.moments`) the identity fails for 0.13 % of the values, and only by less than ``c``; an upper clamp
  bound becomes ``hi − c_i`` (exact), so a ReLU6 turns into ``minimum(relu(·), 6 − c_i)``.

``mean``/``std`` are the producer output's :class:`~bnfold.ir.moments.Moments` — the BatchNorm statistics that
preceded the fold, or moments measured on calibration data (``bnfold.quantize`` puts them there). Without them, a
consumer that reads zero padding (``c`` would be added to the padded border too), a lower clamp bound other than 0, or
an op the shift does not cross exactly, the pair is left with the reason (and, with ``move_clamps=False``, a
clamp whose upper bound would have to become per-channel). Changes are ``absorb``: the float model
changes (slightly, where ``y < c``) — ``bnfold.quantize`` measures by how much.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from bnfold.ir.affine_math import fold_into_consumer
from bnfold.ir.moments import Moments, moments_of, set_moments
from bnfold.passes.commute import Affine, transfer_for
from bnfold.passes.context import PassContext
from bnfold.passes.engine import Candidate, Category, Change
from bnfold.passes.equalize import PairMatch, match_pair, pair_candidate
from bnfold.passes.fold_targets import replace_params
from bnfold.passes.layer_pairs import Pair, kept_clamp, set_bounds
from bnfold.passes.rule import Fail, Rule

__all__ = ["STD_MARGIN", "AbsorbBias"]

f64 = torch.float64

STD_MARGIN = 3.0
"""``c = max(0, mean − 3·std)`` across a ReLU: P(y < c) = Φ(−3) = 0.13 % under the normal model."""


@dataclass(frozen=True)
class Shift:
    c: torch.Tensor  # float64, per channel
    kinked: bool  # a ReLU-like step: exact only where y ≥ c


class AbsorbBias(Rule[PairMatch, Shift]):
    name = "absorb_bias"
    category = Category.ABSORB

    def __init__(self, *, move_clamps: bool = True) -> None:
        self.move_clamps = move_clamps

    def match(self, ctx: PassContext, node: torch.fx.Node) -> PairMatch | None:
        return match_pair(ctx, node)

    def candidate(self, ctx: PassContext, m: PairMatch) -> Candidate:
        return pair_candidate(m)

    def check(self, ctx: PassContext, m: PairMatch) -> Shift | Fail:
        if isinstance(m.pair, Fail):
            return m.pair
        p = m.pair
        kept = None if self.move_clamps else kept_clamp(p)
        if kept is not None and any(s.kind == "clamp" and s.hi is not None and bool(torch.isfinite(s.hi).any())
                        for s in p.steps):
            return kept
        moments = moments_of(p.producer.node)
        if moments is None:
            return Fail(f"no statistics describe {p.producer.describe()}'s output (no BatchNorm was folded into it "
                        "and none were measured), so the offset to absorb is unknown")
        kinked = False
        for step in p.steps:
            if step.kind == "relu":
                kinked = True
            elif step.kind in ("clamp", "bound"):
                assert step.lo is not None
                if bool((step.lo == 0).all()):
                    kinked = True
                elif bool(torch.isfinite(step.lo).any()):
                    return Fail(f"{step.describe} clamps from below at a bound other than 0; absorbing a bias "
                                "across it is not supported")
        c = (moments.mean - STD_MARGIN * moments.std).clamp_min(0.0) if kinked else moments.mean.clone()
        if not bool(torch.isfinite(c).all()):
            return Fail(f"the statistics of {p.producer.describe()}'s output are not finite")
        if bool((c != 0).any()):
            if p.consumer.reads_padding_zeros():
                return Fail(f"{p.consumer.describe()} pads with zeros: an absorbed bias would be added to its zero "
                            "padding too (zero padding blocks the shift)")
            for step in p.steps:
                if step.kind != "move":
                    continue
                t = transfer_for(ctx.gm, step.node)
                shape = tuple(step.input.meta["tensor_meta"].shape)
                axis = _input_axis(p, step)
                moved = t if isinstance(t, Fail) else t.forward(Affine(torch.ones_like(c), -c, axis, shape))
                if isinstance(moved, Fail):
                    return moved.prefixed(f"a per-channel shift does not cross {step.describe}: ")
        return Shift(c, kinked)

    def rewrite(self, ctx: PassContext, m: PairMatch, plan: Shift) -> list[Change]:
        p = m.pair
        assert isinstance(p, Pair)
        c = plan.c
        if not bool((c != 0).any()):
            return []
        producer, consumer = p.producer, p.consumer
        b1 = torch.zeros_like(c) if producer.bias is None else producer.bias.detach().to(f64)
        _, b2 = fold_into_consumer(consumer.weight, consumer.bias, torch.ones_like(c), c, kind=consumer.kind,
                                   groups=consumer.groups)
        for step in p.steps:
            if step.kind in ("clamp", "bound") and step.hi is not None and bool(torch.isfinite(step.hi).any()):
                assert step.lo is not None
                set_bounds(ctx, step, step.lo, step.hi - c)
        into_p = replace_params(ctx, producer, producer.weight, b1 - c)
        into_c = replace_params(ctx, consumer, consumer.weight, b2)
        moments = moments_of(producer.node)
        if moments is not None:
            set_moments(producer.node, Moments(moments.mean - c, moments.std))
        how = (f"exact where the pre-activation ≥ c (c = max(0, mean − {STD_MARGIN:g}·std))" if plan.kinked
               else "exact (c = the channel means)")
        detail = (f"absorbed a bias of up to {float(c.abs().max()):.3g} ({int((c != 0).sum())} of {c.numel()} "
                  f"channels) from {producer.describe()} into {consumer.describe()}: {how}")
        return [self.change(consumer.node, detail, m.sources, into=f"{into_p}, {into_c}")]


def _input_axis(p: Pair, step: object) -> int:
    """The channel axis of ``step``'s input: the previous step's axis, or the producer's."""
    prev_axis = None
    for s in p.steps:
        if s is step:
            break
        prev_axis = s.axis
    if prev_axis is not None:
        return prev_axis
    shape = p.producer.node.meta["tensor_meta"].shape
    return p.producer.channel_axis % len(shape)
