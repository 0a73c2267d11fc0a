"""Folding an affine into its consumers on an ONNX graph — what ``fold_into_consumer``, ``split_norm_affine`` and
``propagate`` (forward) share: the plan (which consumers take the shift) and the rewrite.

    linear:  W'[:, i] = W[:, i] · a[i],   b' = b + W · b_A
    conv:    W'[o, i] = W[o, i] · a[g(o)·I_g + i],   b'[o] = b[o] + Σ_{i,k} W[o, i, k] · b_A[g(o)·I_g + i]

A conv that reads zero padding (or a conv-transpose) takes only the scale
(:func:`~bnfold.ir.fold_targets.shift_blocked`); a BatchNormalization in front of it becomes the pure shift
``a ⊙ x + b = a ⊙ (x + b/a)``: one ``Add``. On an ONNX graph there is no affine op between a move and the fold it ends
in, so a move and its fold are one rewrite; the fold is reported under the fold rule's name, as on torch.fx graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bnfold.ir import reasons
from bnfold.ir.affine_math import fold_into_consumer
from bnfold.ir.fold_targets import shift_blocked
from bnfold.ir.onnx.ops import OnnxLinearOp
from bnfold.ir.onnx.shapes import rank
from bnfold.ir.onnx.sites import Site
from bnfold.ir.reasons import Fail
from bnfold.passes.engine import Category, Change
from bnfold.passes.fold_into_consumer import FoldIntoConsumer
from bnfold.passes.onnx.context import OnnxContext
from bnfold.passes.onnx.moves import Moved
from bnfold.passes.propagate import Propagate

__all__ = ["ConsumerFold", "fold_consumers", "plan_consumers"]


@dataclass(frozen=True)
class ConsumerFold:
    """Fold ``(a, b)`` (per channel at the site) into ``moved.ops``; ``blocked``: they take the scale only, the shift
    ``b/a`` stays as an ``Add`` of rank ``rank``."""

    moved: Moved
    a: torch.Tensor
    b: torch.Tensor
    blocked: list[OnnxLinearOp]
    rank: int | None


def plan_consumers(ctx: OnnxContext, site: Site, moved: Moved, a: torch.Tensor, b: torch.Tensor
                   ) -> ConsumerFold | Fail:
    """Which consumers take the shift, or why the affine cannot fold into them."""
    blocked = shift_blocked(moved.ops, moved.b)
    if blocked and (bool((a == 1).all()) or bool((a == 0).any())):
        return Fail(reasons.shift_blocked(blocked[0].describe(), a))
    r = rank(ctx.g, site.x)
    if blocked and r is None:
        r = next((op.weight.dim() for op in moved.ops if op.kind != "linear"), None)
        if r is None:
            return Fail("its input shape is unknown")
    return ConsumerFold(moved, a, b, blocked, r)


def fold_consumers(ctx: OnnxContext, site: Site, plan: ConsumerFold) -> list[Change]:
    """Write the consumers' folded parameters; the changes: the move (when the affine crossed ops to reach them) and
    one fold per consumer. The site itself is the caller's (removed, turned into a shift, or reset)."""
    moved = plan.moved
    changes = []
    if moved.through:
        changes.append(Change(Propagate.name, site.id, f"moved forward through {', '.join(moved.through)} to its "
                              "conv/linear consumers", Category.MOVE, site.sources))
    via = f" (moved through {', '.join(moved.through)})" if moved.through else ""
    for op in moved.ops:
        w, b = fold_into_consumer(op.weight, op.bias, moved.a, None if plan.blocked else moved.b, kind=op.kind,
                                  groups=op.groups)
        where = ctx.write_op(op, w, b)
        detail = f"folded into consumer {where}{via}"
        if plan.blocked:
            detail += " (scale only: it pads with zeros, so the shift stays as one add before it)"
        changes.append(Change(FoldIntoConsumer.name, site.id, detail, Category.FOLD, site.sources, where))
    return changes
