"""Move affines that cannot fold where they are to a place where they can.

*Pull back* (towards producers): ``A(P(x)) = P(A'(x))`` through every op in :mod:`~bnfold.passes.commute`,
and through multi-input ops::

    residual add:  A(u + v) = (a u + b) + (a v)          each branch takes its share
    concat:        A(cat(u₁…uₙ, axis)) = cat(A₁(u₁)…Aₙ(uₙ))  with (a, b) split per input

until every branch ends at a conv/linear that can absorb it (its output has no other user).
*Push forward* (towards consumers): ``P(A(x)) = A'(P(x))`` along a single-user chain until every user is a
conv/linear (``flatten`` between a BatchNorm2d and a Linear, for instance).

A move is made only when it ends in folds (look-ahead), so the pass never trades one affine for several and
cannot oscillate. "Into every branch that can take it": a residual add or concat may leave at most one
branch's part as an explicit affine (no more ops than before) when at least one other branch absorbs its part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

from bnfold.ir.affine_view import ADD_TARGETS, AffineView
from bnfold.ir.graph import node_shape
from bnfold.ir.linear_ops import LinearOp
from bnfold.ir.uses import value_users
from bnfold.passes.commute import CAT, Affine, concat_split, transfer_for
from bnfold.passes.context import PassContext
from bnfold.passes.engine import Category, Change
from bnfold.passes.fold_targets import absorbs, consumer_targets, producer_target, push_target
from bnfold.passes.rule import Fail, Rule

__all__ = ["Propagate"]

aten = torch.ops.aten
_CAT = CAT


@dataclass
class Plan:
    """Affines to insert on the outputs of ``node`` s; ``absorbed`` of them land on a foldable producer."""

    # (node, affine, absorbed, user): the affine goes on the edge node → user
    placements: list[tuple[torch.fx.Node, Affine, bool, torch.fx.Node]] = field(default_factory=list)
    absorbed: int = 0
    leftovers: int = 0
    why: list[str] = field(default_factory=list)

    def __add__(self, other: Plan) -> Plan:
        return Plan(self.placements + other.placements, self.absorbed + other.absorbed,
                    self.leftovers + other.leftovers, self.why + other.why)


@dataclass(frozen=True)
class Move:
    """Where the affine goes: back along ``plan``, or forward to ``forward`` (node, moved affine)."""

    back: Plan | None
    forward: tuple[torch.fx.Node, Affine] | None


class Propagate(Rule[AffineView, Move]):
    """Pull affines back through commuting ops to producers, or push them forward to consumers.

    A move's look-ahead reaches past the node's neighbours, so the pass also revisits the affines it rejected
    whenever anything changed in a round.
    """

    name = "propagate"
    category = Category.MOVE
    revisit_rejected = True

    def __init__(self, max_depth: int = 16) -> None:
        self.max_depth = max_depth

    def match(self, ctx: PassContext, node: torch.fx.Node) -> AffineView | None:
        view = ctx.affine(node)
        if view is None or node_shape(view.x) is None:
            return None
        if not isinstance(producer_target(ctx, view), Fail) \
                or not isinstance(consumer_targets(ctx, view.node, view.axis, view.rank, view.channels), Fail):
            return None  # folds where it is: the fold rules handle it
        return view

    def check(self, ctx: PassContext, m: AffineView) -> Move | Fail:
        shape = node_shape(m.x)
        assert shape is not None
        aff = Affine(m.a, m.b, m.axis, shape)
        back = self._pull(ctx, m.x, aff, 0, m.node)
        if back.absorbed and (back.leftovers == 0 or (back.leftovers == 1 and back.absorbed >= 1
                                                      and len(back.placements) > 1)):
            return Move(back, None)
        fwd = push_target(ctx, m.node, aff, self.max_depth)
        if isinstance(fwd, tuple):
            return Move(None, fwd)
        why = "; ".join(dict.fromkeys(back.why)) or "no path"
        return Fail(f"cannot move it to a conv/linear: backward, {why}; forward, {fwd.reason}")

    def rewrite(self, ctx: PassContext, m: AffineView, plan: Move) -> list[Change]:
        if plan.back is not None:
            return self._apply_back(ctx, m, plan.back)
        assert plan.forward is not None
        return self._apply_forward(ctx, m, plan.forward)

    # -- pull back -------------------------------------------------------------------------------------------
    def _pull(self, ctx: PassContext, node: torch.fx.Node, aff: Affine, depth: int,
              user: torch.fx.Node) -> Plan:
        """Plan to apply ``aff`` on the edge ``node → user`` by moving it further back."""
        op = absorbs(ctx, node, aff)
        if isinstance(op, LinearOp):
            return Plan([(node, aff, True, user)], absorbed=1)
        leftover = Plan([(node, aff, False, user)], leftovers=1, why=[op.reason])
        if depth >= self.max_depth or len(value_users(node)) > 1:
            if len(value_users(node)) > 1:
                leftover.why = [f"'{node.name}' has other users"]
            return leftover
        if node.op in ("call_function", "call_method") and node.target in ADD_TARGETS:
            return self._pull_add(ctx, node, aff, depth) or leftover
        if node.op == "call_function" and node.target in _CAT:
            return self._pull_cat(ctx, node, aff, depth) or leftover
        t = transfer_for(ctx.gm, node)
        if isinstance(t, Fail):
            leftover.why = [t.reason]
            return leftover
        inner = t.backward(aff)
        if isinstance(inner, Fail):
            leftover.why = [f"through '{node.name}': {inner.reason}"]
            return leftover
        return self._pull(ctx, t.x, inner, depth + 1, node)

    def _pull_add(self, ctx: PassContext, node: torch.fx.Node, aff: Affine, depth: int) -> Plan | None:
        if len(node.args) != 2 or node.kwargs or not all(isinstance(a, torch.fx.Node) for a in node.args):
            return None
        u, v = node.args
        if u is v:
            return None
        if node_shape(u) != aff.shape or node_shape(v) != aff.shape:
            return None  # broadcasting add: branches see different shapes
        zero = torch.zeros_like(aff.b)
        options = []
        for shift_to_u in (True, False):
            pu = self._pull(ctx, u, Affine(aff.a, aff.b if shift_to_u else zero, aff.axis, aff.shape), depth + 1, node)
            pv = self._pull(ctx, v, Affine(aff.a, zero if shift_to_u else aff.b, aff.axis, aff.shape), depth + 1, node)
            options.append(pu + pv)
        return min(options, key=lambda p: (p.leftovers, -p.absorbed))

    def _pull_cat(self, ctx: PassContext, node: torch.fx.Node, aff: Affine, depth: int) -> Plan | None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            return None
        dim %= len(aff.shape)
        if len({id(t) for t in tensors}) != len(tensors):
            return None  # the same tensor concatenated twice: one edge, several affines
        shapes = [node_shape(t) if isinstance(t, torch.fx.Node) else None for t in tensors]
        if any(s is None for s in shapes):
            return None
        plan = Plan()
        for t, part in zip(tensors, concat_split(aff, dim, [s for s in shapes if s is not None]), strict=True):
            plan = plan + self._pull(ctx, t, part, depth + 1, node)
        return plan

    def _apply_back(self, ctx: PassContext, view: AffineView, plan: Plan) -> list[Change]:
        sources = view.sources
        for target, aff, absorbed, user in plan.placements:
            new = ctx.insert_affine(target, aff.a, aff.b, aff.axis, before=target.next,
                                    sources=sources if absorbed else ())
            ctx.replace_input(user, target, new)
        ctx.bypass(view.node, view.x)
        where = ", ".join(f"'{t.name}'" for t, _, _, _ in plan.placements)
        detail = f"moved back through commuting ops onto {where}"
        if plan.leftovers:
            detail += f" ({plan.leftovers} branch keeps an explicit affine)"
        return [self.change(view.node, detail, sources)]

    def _apply_forward(self, ctx: PassContext, view: AffineView, dest: tuple[torch.fx.Node, Affine]
                       ) -> list[Change]:
        target, aff = dest
        users = value_users(target)  # shape-only users keep reading ``target``: the move keeps its shape
        new = ctx.insert_affine(target, aff.a, aff.b, aff.axis, before=target.next, sources=view.sources)
        for u in users:
            ctx.replace_input(u, target, new)
        ctx.bypass(view.node, view.x)
        return [self.change(view.node, f"moved forward past '{target.name}' to its conv/linear consumers",
                            view.sources)]
