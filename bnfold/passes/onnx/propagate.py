"""ONNX rule ``propagate``: a BatchNormalization with no conv/linear right before or after it moves exactly to where
it folds — the torch rule's mechanism (:mod:`bnfold.passes.propagate`), through the same crossing table
(:data:`bnfold.passes.commute.CROSSINGS`, ONNX ops in :data:`bnfold.passes.onnx.moves.ONNX_OPS`):

* back (:func:`~bnfold.passes.onnx.moves.pull_back`), ``A(P(x)) = P(A'(x))``: through Flatten / Reshape / Transpose /
  Squeeze / Unsqueeze / Slice / Gather / pools / Relu / Identity / Dropout and channel Concats (``(a, b)`` split per
  input), into every conv/linear producer it reaches; the op that wrote its input takes over its output name;
* forward (:func:`~bnfold.passes.onnx.moves.forward_targets`), ``P(A(x)) = A'(P(x))``: along a single-reader chain of
  the same ops and channel Concats (identity coefficients for the other inputs) to conv/linear consumers.

A move is made only when it ends in folds (look-ahead), so nothing oscillates; the move and its folds are one rewrite
(:mod:`bnfold.passes.onnx.consumers`). The rule looks past its neighbours, so it also revisits the BatchNormalizations
it rejected whenever a round changed something.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from bnfold.ir.affine_math import fold_into_producer
from bnfold.ir.fold_targets import consumer_targets, producer_target
from bnfold.ir.onnx.shapes import rank
from bnfold.ir.onnx.sites import Site
from bnfold.ir.reasons import Fail
from bnfold.passes.engine import Category, Change
from bnfold.passes.fold_into_producer import FoldIntoProducer
from bnfold.passes.onnx.consumers import ConsumerFold, plan_consumers
from bnfold.passes.onnx.context import OnnxContext, OnnxRule
from bnfold.passes.onnx.fold_into_consumer import remove_into_consumers
from bnfold.passes.onnx.fold_into_producer import batchnorm
from bnfold.passes.onnx.moves import Pulled, forward_targets, pull_back, start_affine
from bnfold.passes.propagate import Propagate

__all__ = ["OnnxPropagate"]


@dataclass(frozen=True)
class Move:
    """Back into producers (``back``), or forward into consumers (``forward``)."""

    back: Pulled | None
    forward: ConsumerFold | None


class OnnxPropagate(OnnxRule[Site, Move]):
    name = Propagate.name
    category = Category.MOVE
    revisit_rejected = True

    def match(self, ctx: OnnxContext, node: onnx.NodeProto) -> Site | None:
        site = batchnorm(ctx, node)
        if site is None:
            return None
        assert site.a is not None
        r, n = rank(ctx.g, site.x), site.a.numel()
        if not isinstance(producer_target(ctx.targets, site.x, site.axis, r, n), Fail) \
                or not isinstance(consumer_targets(ctx.targets, site.y, site.axis, r, n), Fail):
            return None  # folds where it is: the fold rules handle it
        return site

    def check(self, ctx: OnnxContext, m: Site) -> Move | Fail:
        assert m.a is not None and m.b is not None
        aff = start_affine(ctx.g, m.x, m.a, m.b, m.axis)
        back = aff if isinstance(aff, Fail) else pull_back(ctx.g, m.x, aff)
        if not isinstance(back, Fail):
            return Move(back, None)
        moved = forward_targets(ctx.g, m.x, m.y, m.a, m.b, m.axis, moves=True)
        fwd = moved if isinstance(moved, Fail) else plan_consumers(ctx, m, moved, m.a, m.b)
        if not isinstance(fwd, Fail):
            return Move(None, fwd)
        return Fail(f"cannot move it to a conv/linear: backward, {back.reason}; forward, {fwd.reason}")

    def rewrite(self, ctx: OnnxContext, m: Site, plan: Move) -> list[Change]:
        if plan.forward is not None:
            return remove_into_consumers(ctx, m, plan.forward)
        assert plan.back is not None
        where = [ctx.write_op(op, *fold_into_producer(op.weight, op.bias, part.a, part.b, kind=op.kind,
                                                       groups=op.groups))
                 for op, part in plan.back.targets]
        ctx.take_over(m)
        through = ", ".join(plan.back.through)
        changes = [self.change(m.id, f"moved back through {through} onto {', '.join(where)}", m.sources)]
        changes += [Change(FoldIntoProducer.name, m.id, f"folded into {w} (moved back through {through})",
                           Category.FOLD, m.sources, w) for w in where]
        return changes
