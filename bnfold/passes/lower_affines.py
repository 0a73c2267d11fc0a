"""Rule ``lower_affines`` (run once, last): an affine no rule could fold becomes the cheapest exact aten op, with
``a``/``b`` cast once to ``x``'s dtype and shaped to broadcast along the axis::

    a ≡ 1 → x + b        b ≡ 0 → x * a        otherwise → addcmul(b, x, a)  (= b + x·a, one op)

never the BatchNorm formula. A split norm's affine that stayed unfolded goes back into its norm instead.
"""

from __future__ import annotations

import torch
import torch.fx

from bnfold.ir.affine_view import AffineView, sources_of
from bnfold.ir.graph import node_dtype
from bnfold.ir.norms import NormSplit, bare_norm
from bnfold.ir.ops import is_channel_affine
from bnfold.ir.uses import value_users
from bnfold.passes.context import PassContext
from bnfold.passes.engine import Category, Change
from bnfold.passes.rule import Rule

__all__ = ["LowerAffines"]

aten = torch.ops.aten


class LowerAffines(Rule[torch.fx.Node, str]):
    name = "lower_affines"
    category = Category.LOWER

    def match(self, ctx: PassContext, node: torch.fx.Node) -> torch.fx.Node | None:
        return node if is_channel_affine(node) else None

    def check(self, ctx: PassContext, m: torch.fx.Node) -> str:
        return "lower"

    def rewrite(self, ctx: PassContext, m: torch.fx.Node, plan: str) -> list[Change]:
        sources = sources_of(m)
        whole = merge_back(ctx, m)
        if whole is not None:
            return [self.change(m, "left unfolded; merged back into its norm", sources, into=whole.name)]
        view = ctx.affine(m)
        if view is None:
            return []
        lowered, form = _lower(ctx, view)
        lowered.meta["bnfold_sources"] = view.sources
        ctx.bypass(m, lowered)
        return [self.change(m, f"left unfolded; lowered to {form}", view.sources, into=lowered.name)]


def _lower(ctx: PassContext, view: AffineView) -> tuple[torch.fx.Node, str]:
    node = view.node
    dtype = node_dtype(view.x) or torch.float32
    shape = [1] * view.rank
    shape[view.axis] = view.channels
    a = view.a.to(dtype).reshape(shape)
    b = view.b.to(dtype).reshape(shape)
    if bool((view.a == 1).all()):
        args: tuple[object, ...] = (view.x, ctx.constant(b, f"{node.name}_b", before=node))
        target, form = aten.add.Tensor, "x + b"
    elif bool((view.b == 0).all()):
        args = (view.x, ctx.constant(a, f"{node.name}_a", before=node))
        target, form = aten.mul.Tensor, "x * a"
    else:
        args = (ctx.constant(b, f"{node.name}_b", before=node), view.x, ctx.constant(a, f"{node.name}_a", before=node))
        target, form = aten.addcmul.default, "addcmul(b, x, a)"
    return ctx.call(target, args, before=node, like=node, origin=node), form


def merge_back(ctx: PassContext, affine: torch.fx.Node) -> torch.fx.Node | None:
    """If ``affine`` follows a norm we split (and is its only user), put it back into the norm's weight/bias."""
    view = ctx.affine(affine)
    if view is None:
        return None
    bare = view.x
    split = bare.meta.get("bnfold_split")
    if not isinstance(split, NormSplit):
        return None
    norm_axis = 1 if split.kind in ("group_norm", "instance_norm") else view.rank - 1
    if len(value_users(bare)) != 1 or view.axis != norm_axis:
        return None
    if split.kind == "rms_norm" and bool((view.b != 0).any()):
        return None
    dtype = bare.meta["tensor_meta"].dtype if "tensor_meta" in bare.meta else torch.float32
    w = ctx.constant(view.a.to(dtype), f"{bare.name}_weight", before=bare, parameter=True)
    b = ctx.constant(view.b.to(dtype), f"{bare.name}_bias", before=bare, parameter=True) \
        if split.kind != "rms_norm" else None
    x = bare.args[0]
    target, args = bare_norm(split, x, w, b)  # type: ignore[arg-type]
    whole = ctx.call(target, args, before=affine, like=affine, origin=affine)
    ctx.bypass(affine, whole)
    ctx.erase(bare)
    return whole
