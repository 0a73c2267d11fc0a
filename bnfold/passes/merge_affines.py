"""Rule ``merge_affines``: collapse two consecutive affines on the same axis into one; delete identities.

    A2(A1(x)) = a2 ⊙ (a1 ⊙ x + b1) + b2 = (a2·a1) ⊙ x + (a2·b1 + b2)        (A1 has no other user)
    1 ⊙ x + 0 = x
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx

from bnfold.ir.affine_math import compose
from bnfold.ir.affine_view import AffineView
from bnfold.ir.moments import moments_of, set_moments
from bnfold.ir.uses import value_users
from bnfold.passes.context import PassContext
from bnfold.passes.engine import Category, Change
from bnfold.passes.rule import Fail, Rule

__all__ = ["MergeAffines"]


@dataclass(frozen=True)
class Pair:
    outer: AffineView
    inner: AffineView | None  # None: `outer` alone, which may be an identity

    @property
    def sources(self) -> tuple[str, ...]:
        return ()  # merging is never a candidate's last word: nothing to report when it does not apply


class MergeAffines(Rule[Pair, str]):
    name = "merge_affines"
    category = Category.CANONICALIZE

    def match(self, ctx: PassContext, node: torch.fx.Node) -> Pair | None:
        outer = ctx.affine(node)
        if outer is None:
            return None
        inner = ctx.affine(outer.x)
        return Pair(outer, inner)

    def check(self, ctx: PassContext, m: Pair) -> str | Fail:
        v1, v2 = m.inner, m.outer
        if v1 is not None and len(value_users(v1.node)) == 1 and v1.axis == v2.axis and v1.channels == v2.channels:
            return "merge"
        if bool((v2.a == 1).all()) and bool((v2.b == 0).all()):
            return "identity"
        return Fail("not an identity and not preceded by a single-use affine on the same axis")

    def rewrite(self, ctx: PassContext, m: Pair, plan: str) -> list[Change]:
        v2 = m.outer
        if plan == "identity":  # nothing left to fold: for the report, folded away (into nothing)
            ctx.bypass(v2.node, v2.x)
            return [Change(self.name, v2.node.name, "an identity (a ≡ 1, b ≡ 0): removed", Category.FOLD,
                           v2.sources)]
        v1 = m.inner
        assert v1 is not None
        a, b = compose(v1.a, v1.b, v2.a, v2.b)
        sources = tuple(dict.fromkeys(v1.sources + v2.sources))
        merged = ctx.insert_affine(v1.x, a, b, v2.axis, before=v2.node, sources=sources)
        inner = moments_of(v1.node)
        set_moments(merged, moments_of(v2.node) or (inner.affine(v2.a, v2.b) if inner is not None else None))
        ctx.bypass(v2.node, merged)
        ctx.bypass(v1.node, v1.x)
        return [self.change(merged, f"merged '{v1.node.name}' and '{v2.node.name}' into one affine", sources,
                            into=merged.name)]
