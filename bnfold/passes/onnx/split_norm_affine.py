"""ONNX rule ``split_norm_affine``: the affine part ``(γ, β)`` of a LayerNormalization / RMSNormalization /
GroupNormalization folds into its consumers — directly, or after a forward move — when it folds completely::

    op(γ ⊙ n(x) + β) = op'(n(x))        (op' as in :mod:`bnfold.passes.onnx.consumers`)

The norm stays with ``γ = 1`` and no ``β`` (zeros for GroupNormalization, where ``β`` is required). When a consumer
would take only the scale (zero padding), or the affine reaches no conv/linear, the norm stays whole and the report
says why (the torch rule's behaviour: a split is made only when the affine will fold). A per-group GroupNorm affine
(opsets 18–20: ``a[c] = γ[c // (C/G)]``) is expanded to channels first.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import torch

from bnfold.ir.fold_targets import shift_blocked
from bnfold.ir.onnx.ops import OnnxLinearOp
from bnfold.ir.onnx.shapes import shape
from bnfold.ir.onnx.sites import Site
from bnfold.ir.reasons import Fail
from bnfold.passes.engine import Category, Change
from bnfold.passes.onnx.canonicalize import identity_norm
from bnfold.passes.onnx.consumers import ConsumerFold, fold_consumers
from bnfold.passes.onnx.context import OnnxContext, OnnxRule
from bnfold.passes.onnx.moves import forward_targets
from bnfold.passes.split_norms import SplitNormAffine

__all__ = ["OnnxSplitNormAffine"]

_STAYS = "its affine stays in the norm: "


@dataclass(frozen=True)
class Split:
    fold: ConsumerFold


class OnnxSplitNormAffine(OnnxRule[Site, Split]):
    name = SplitNormAffine.name
    category = Category.CANONICALIZE

    def match(self, ctx: OnnxContext, node: onnx.NodeProto) -> Site | None:
        site = ctx.site(node)
        if site is None or not site.norm or site.problem is not None or identity_norm(site):
            return None
        return site

    def check(self, ctx: OnnxContext, m: Site) -> Split | Fail:
        per = self._per_channel(ctx, m)
        if isinstance(per, Fail):
            return per.prefixed(_STAYS)
        a, b = per
        moved = forward_targets(ctx.g, m.x, m.y, a, b, m.axis, moves=True)
        if isinstance(moved, Fail):
            return moved.prefixed(_STAYS)
        if shift_blocked(moved.ops, moved.b):
            return Fail(_STAYS + "a consumer conv pads with zeros, so the shift could not fold")
        return Split(ConsumerFold(moved, a, b, [], None))

    def rewrite(self, ctx: OnnxContext, m: Site, plan: Split) -> list[Change]:
        changes = [self.change(m.id, f"{m.kind.split(' ')[0]} split into norm + affine", m.sources)]
        ctx.reset_norm(m)
        return changes + fold_consumers(ctx, m, plan.fold)

    @staticmethod
    def _per_channel(ctx: OnnxContext, m: Site) -> tuple[torch.Tensor, torch.Tensor] | Fail:
        """``(a, b)`` per channel: a per-group GroupNorm affine expanded (its channel count from the input shape or
        the consumer)."""
        assert m.a is not None and m.b is not None
        if not m.groups:
            return m.a, m.b
        s = shape(ctx.g, m.x)
        c = s[1] if s is not None and len(s) > 1 and isinstance(s[1], int) else None
        if c is None:
            users = [ctx.targets.consumer_op(u) for u in ctx.g.users(m.y)]
            c = next((u.in_channels for u in users if isinstance(u, OnnxLinearOp)), None)
        if c is None:
            return Fail("its channel count is unknown")
        return m.per_channel(c)
