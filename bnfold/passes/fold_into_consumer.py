"""Rule ``fold_into_consumer``: ``op(A(x)) → op'(x)`` when every user of the affine is a conv / linear.

    linear:          W'[:, i] = W[:, i] · a[i],     b' = b + W · b_A
    conv:            W'[o, i] = W[o, i] · a[g(o)·I_g + i],  b'[o] = b[o] + Σ_{i,k} W[o, i, k] · b_A[g(o)·I_g + i]

A conv that reads zero padding (or a conv-transpose) cannot take the shift exactly: it takes the scale, and the
affine becomes the pure shift ``a ⊙ x + b = a ⊙ (x + b/a)``, kept as one add in front of it (and reported).
With ``a ≡ 1`` (nothing to fold) or a zero in ``a`` (``b/a`` undefined) the affine is left, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from bnfold.ir import reasons
from bnfold.ir.affine_math import fold_into_consumer
from bnfold.ir.affine_view import AffineView
from bnfold.ir.linear_ops import LinearOp
from bnfold.passes.context import PassContext
from bnfold.passes.engine import FOLDED_KEY, Category, Change
from bnfold.passes.fold_targets import consumer_targets, replace_params, shift_blocked, untie_note
from bnfold.passes.rule import Fail, Rule

__all__ = ["FoldIntoConsumer"]


@dataclass(frozen=True)
class Plan:
    ops: list[LinearOp]
    blocked: list[LinearOp]  # take the scale only; the shift stays in front of them


class FoldIntoConsumer(Rule[AffineView, Plan]):
    name = "fold_into_consumer"
    category = Category.FOLD

    def match(self, ctx: PassContext, node: torch.fx.Node) -> AffineView | None:
        return ctx.affine(node)

    def check(self, ctx: PassContext, m: AffineView) -> Plan | Fail:
        ops = consumer_targets(ctx, m.node, m.axis, m.rank, m.channels)
        if isinstance(ops, Fail):
            return ops
        blocked = shift_blocked(ops, m.b)
        if blocked and (bool((m.a == 1).all()) or bool((m.a == 0).any())):
            return Fail(reasons.shift_blocked(blocked[0].describe(), m.a))
        return Plan(ops, blocked)

    def rewrite(self, ctx: PassContext, m: AffineView, plan: Plan) -> list[Change]:
        leftover: torch.fx.Node | None = None
        if plan.blocked:  # a ⊙ x + b = a ⊙ (x + b/a): the pure shift b/a stays in front of the blocked ops
            leftover = ctx.insert_affine(m.x, torch.ones_like(m.a), m.b / m.a, m.axis, before=m.node, sources=())
        changes = []
        for op in plan.ops:
            partial = op in plan.blocked
            w, b = fold_into_consumer(op.weight, op.bias, m.a, None if partial else m.b, kind=op.kind,
                                      groups=op.groups, out_dtype=op.weight.dtype)
            untied = untie_note(ctx, op)
            where = replace_params(ctx, op, w, b)
            op.node.meta[FOLDED_KEY] = (*op.node.meta.get(FOLDED_KEY, ()), *m.sources)
            ctx.replace_input(op.node, m.node, leftover if partial and leftover is not None else m.x)
            detail = f"folded into consumer {op.describe()}{untied}"
            if partial:
                detail += " (scale only: it pads with zeros, so the shift stays as one add before it)"
            changes.append(self.change(m.node, detail, m.sources, into=where))
        ctx.bypass(m.node, m.x)
        return changes
