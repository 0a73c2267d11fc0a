"""Rule ``split_norm_affine``: split the affine part off a LayerNorm / RMSNorm / GroupNorm / InstanceNorm so it
can fold into the next linear op(s)::

    LN(x; γ, β) = γ ⊙ n(x) + β = channel_affine(n(x), γ, β, axis)      (n: the parameter-free norm)

The split is made only when that affine then folds completely into every consumer (a Linear reading the last
axis, a conv without zero padding, possibly after a forward move through reshapes/pools); otherwise the norm
is left whole and the report says why. The check reads the norm's users as the affine's would-be consumers, so
nothing is split to be tested. A split affine that stays unfolded after all is merged back by
:mod:`~bnfold.passes.lower_affines`, so no graph ever gets worse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from bnfold.ir.graph import module_path, node_shape
from bnfold.ir.linear_ops import LinearOp
from bnfold.ir.norms import NormSplit, bare_norm, norm_label, norm_of
from bnfold.ir.uses import value_users
from bnfold.passes.commute import Affine
from bnfold.passes.context import PassContext
from bnfold.passes.engine import Candidate, Category, Change
from bnfold.passes.fold_targets import consumer_targets, linear_op, push_target, shift_blocked
from bnfold.passes.rule import Fail, Rule

__all__ = ["SplitNormAffine"]

f64 = torch.float64


@dataclass(frozen=True)
class Norm:
    node: torch.fx.Node
    label: str
    found: tuple[NormSplit, Any, torch.Tensor, torch.Tensor | None, int] | Fail

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.node.name,)


@dataclass(frozen=True)
class Split:
    split: NormSplit
    x: torch.fx.Node
    a: torch.Tensor
    b: torch.Tensor
    axis: int


class SplitNormAffine(Rule[Norm, Split]):
    name = "split_norm_affine"
    category = Category.CANONICALIZE
    # the check looks ahead along the norm's users (a move through commuting ops): a later fold downstream (a BN
    # between the norm and its conv folding into that conv) can make a rejected split possible — look again
    revisit_rejected = True

    def match(self, ctx: PassContext, node: torch.fx.Node) -> Norm | None:
        if node.meta.get("bnfold_split"):
            return None
        found = norm_of(ctx.gm, node)
        return None if found is None else Norm(node, norm_label(ctx.gm, node), found)

    def candidate(self, ctx: PassContext, m: Norm) -> Candidate:
        return Candidate(m.node.name, f"{m.label} (affine part)", module_path(m.node))

    def check(self, ctx: PassContext, m: Norm) -> Split | Fail:
        if isinstance(m.found, Fail):
            return m.found
        split, x, w, b, axis = m.found
        shape = node_shape(m.node)
        if shape is None or not isinstance(x, torch.fx.Node):
            return Fail("its input shape is unknown")
        axis %= len(shape)
        a = w.detach().to(f64).reshape(-1)
        bb = torch.zeros_like(a) if b is None else b.detach().to(f64).reshape(-1)
        why = _will_not_fold(ctx, m.node, Affine(a, bb, axis, shape))
        if why is not None:
            return why.prefixed("its affine stays in the norm: ")
        return Split(split, x, a, bb, axis)

    def rewrite(self, ctx: PassContext, m: Norm, plan: Split) -> list[Change]:
        node = m.node
        target, args = bare_norm(plan.split, plan.x)
        bare = ctx.call(target, args, before=node, like=node, origin=node)
        bare.meta["bnfold_split"] = plan.split
        affine = ctx.insert_affine(bare, plan.a, plan.b, plan.axis, before=node, sources=m.sources)
        ctx.bypass(node, affine)
        return [self.change(node, f"{m.label} split into norm + affine", m.sources)]


def _will_not_fold(ctx: PassContext, node: torch.fx.Node, aff: Affine) -> Fail | None:
    """None when ``aff`` on ``node``'s output folds completely into its consumers (directly or after a forward
    move); otherwise why not."""
    ops: list[LinearOp] | Fail = consumer_targets(ctx, node, aff.axis, len(aff.shape), aff.a.numel())
    shift = aff.b
    if isinstance(ops, Fail):
        dest = push_target(ctx, node, aff)
        if isinstance(dest, Fail):
            return Fail(f"{ops.reason}; moving it forward: {dest.reason}")
        ops = [op for op in (linear_op(ctx, u) for u in value_users(dest[0])) if isinstance(op, LinearOp)]
        shift = dest[1].b
    if shift_blocked(ops, shift):
        return Fail("a consumer conv pads with zeros, so the shift could not fold")
    return None
