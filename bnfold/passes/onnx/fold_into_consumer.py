"""ONNX rule ``fold_into_consumer``: ``op(BN(x)) → op'(x)`` when every reader of the BatchNormalization is a Conv /
Gemm / MatMul reading it as its input, on its input-channel axis (math: :mod:`bnfold.passes.onnx.consumers`).

Checked by :func:`~bnfold.ir.fold_targets.consumer_targets` (the torch rule's predicate). A conv that reads zero
padding (or a conv-transpose) takes the scale only; the BatchNormalization becomes one ``Add`` of ``b/a`` in front
of it (reported as such). With ``a ≡ 1`` (nothing to fold) or a zero in ``a`` (``b/a`` undefined) it stays, with the
reason.
"""

from __future__ import annotations

import onnx

from bnfold.ir.onnx.sites import Site
from bnfold.ir.reasons import Fail
from bnfold.passes.engine import Category, Change
from bnfold.passes.fold_into_consumer import FoldIntoConsumer
from bnfold.passes.onnx.consumers import ConsumerFold, fold_consumers, plan_consumers
from bnfold.passes.onnx.context import OnnxContext, OnnxRule
from bnfold.passes.onnx.fold_into_producer import batchnorm
from bnfold.passes.onnx.moves import forward_targets

__all__ = ["OnnxFoldIntoConsumer", "remove_into_consumers"]


def remove_into_consumers(ctx: OnnxContext, site: Site, plan: ConsumerFold) -> list[Change]:
    """Fold the BatchNormalization ``site`` into its consumers (``plan``): it disappears, or becomes the shift
    ``b/a`` in front of consumers that take the scale only."""
    if plan.blocked:
        assert plan.rank is not None
        ctx.to_shift(site, plan.b / plan.a, plan.rank)
    else:
        ctx.bypass(site)
    return fold_consumers(ctx, site, plan)


class OnnxFoldIntoConsumer(OnnxRule[Site, ConsumerFold]):
    name = FoldIntoConsumer.name
    category = Category.FOLD

    def match(self, ctx: OnnxContext, node: onnx.NodeProto) -> Site | None:
        return batchnorm(ctx, node)

    def check(self, ctx: OnnxContext, m: Site) -> ConsumerFold | Fail:
        assert m.a is not None and m.b is not None
        moved = forward_targets(ctx.g, m.x, m.y, m.a, m.b, m.axis, moves=False)
        return moved if isinstance(moved, Fail) else plan_consumers(ctx, m, moved, m.a, m.b)

    def rewrite(self, ctx: OnnxContext, m: Site, plan: ConsumerFold) -> list[Change]:
        return remove_into_consumers(ctx, m, plan)
