"""Rule ``fold_into_producer``: ``A(op(x)) → op'(x)`` for a conv / conv-transpose / linear producer.

    conv / linear:   W'[o] = a[o] · W[o],     b'[o] = a[o] · b[o] + b_A[o]
    conv-transpose:  W'[i, j] = a[g(i)·O_g + j] · W[i, j]     (weight (in, out/groups, k…))

Checked (:func:`~bnfold.passes.fold_targets.producer_target`): the affine is the producer's only user and acts
on its output-channel axis. Math in :func:`bnfold.ir.affine_math.fold_into_producer` (float64, cast once).
A module's weight that only this call site uses, in state bnfold owns (``ctx.writable``), is rewritten in place
(no second copy of the weight is allocated); anything shared is cloned on fold by ``replace_params``.
"""

from __future__ import annotations

import torch.fx

from bnfold.ir.affine_math import fold_into_producer
from bnfold.ir.affine_view import AffineView
from bnfold.ir.linear_ops import LinearOp
from bnfold.ir.moments import moments_of, set_moments
from bnfold.passes.context import PassContext
from bnfold.passes.engine import FOLDED_KEY, Category, Change
from bnfold.passes.fold_targets import producer_target, replace_params, untie_note
from bnfold.passes.rule import Fail, Rule

__all__ = ["FoldIntoProducer"]


class FoldIntoProducer(Rule[AffineView, LinearOp]):
    name = "fold_into_producer"
    category = Category.FOLD

    def match(self, ctx: PassContext, node: torch.fx.Node) -> AffineView | None:
        return ctx.affine(node)

    def check(self, ctx: PassContext, m: AffineView) -> LinearOp | Fail:
        return producer_target(ctx, m)

    def rewrite(self, ctx: PassContext, m: AffineView, plan: LinearOp) -> list[Change]:
        in_place = plan.module is not None and ctx.call_sites(str(plan.node.target)) == 1 \
            and ctx.writable(plan.weight)
        w, b = fold_into_producer(plan.weight, plan.bias, m.a, m.b, kind=plan.kind, groups=plan.groups,
                                  out_dtype=plan.weight.dtype, out=plan.weight if in_place else None)
        untied = untie_note(ctx, plan)
        where = replace_params(ctx, plan, w, b)
        plan.node.meta[FOLDED_KEY] = (*plan.node.meta.get(FOLDED_KEY, ()), *m.sources)
        before = moments_of(plan.node)  # the op's output is now A(output): what BN statistics say about it
        set_moments(plan.node, moments_of(m.node) or (before.affine(m.a, m.b) if before is not None else None))
        ctx.bypass(m.node, plan.node)
        return [self.change(m.node, f"folded into {plan.describe()}{untied}", m.sources, into=where)]
