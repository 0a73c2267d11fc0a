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

from bnfold.graph import node_shape
from bnfold.passes.affine_view import ADD_TARGETS, AffineView, affine_view
from bnfold.passes.base import Change, PassResult, Rejection
from bnfold.passes.canonicalize import insert_affine
from bnfold.passes.commute import Affine, transfer_for
from bnfold.passes.fold import FoldIntoConsumer, FoldIntoProducer, erase_affine
from bnfold.passes.linear_ops import LinearOp, match_linear_op

__all__ = ["Propagate"]

aten = torch.ops.aten
_CAT = {torch.cat, torch.concat, aten.cat.default, aten.concat.default}


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


def _absorbs(gm: torch.fx.GraphModule, node: torch.fx.Node, aff: Affine) -> LinearOp | str:
    op = match_linear_op(gm, node)
    if not isinstance(op, LinearOp):
        return f"'{node.name}' is not a foldable conv/linear"
    if len(node.users) > 1:
        return f"{op.describe()} has other users"
    if aff.axis != op.channel_axis % len(aff.shape) or aff.a.numel() != op.out_channels:
        return f"{op.describe()} has its channels on another axis"
    return op


class Propagate:
    """Pull affines back through commuting ops to producers, or push them forward to consumers."""

    name = "propagate"

    def __init__(self, max_depth: int = 16) -> None:
        self.max_depth = max_depth

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        result = PassResult(False)
        for node in list(gm.graph.nodes):
            if node not in gm.graph.nodes:
                continue
            view = affine_view(gm, node)
            if view is None or not isinstance(FoldIntoProducer.check(gm, view), str) \
                    or not isinstance(FoldIntoConsumer.check(gm, view), str):
                continue  # folds where it is: the fold passes handle it
            shape = node_shape(view.x)
            if shape is None:
                continue
            aff = Affine(view.a, view.b, view.axis, shape)
            back = self._pull(gm, view.x, aff, 0, view.node)
            if back.absorbed and (back.leftovers == 0 or (back.leftovers == 1 and back.absorbed >= 1
                                                          and len(back.placements) > 1)):
                self._apply_back(gm, view, back, result)
                continue
            fwd = self.push_target(gm, view, aff)
            if isinstance(fwd, tuple):
                self._apply_forward(gm, view, fwd, result)
                continue
            if view.sources:
                why = "; ".join(dict.fromkeys(back.why)) or "no path"
                result.rejections.append(Rejection(
                    self.name, node.name,
                    f"cannot move it to a conv/linear: backward, {why}; forward, {fwd}", view.sources))
        result.modified = bool(result.changes)
        return result

    # -- pull back -------------------------------------------------------------------------------------------
    def _pull(self, gm: torch.fx.GraphModule, node: torch.fx.Node, aff: Affine, depth: int,
              user: torch.fx.Node) -> Plan:
        """Plan to apply ``aff`` on the edge ``node → user`` by moving it further back."""
        op = _absorbs(gm, node, aff)
        if isinstance(op, LinearOp):
            return Plan([(node, aff, True, user)], absorbed=1)
        leftover = Plan([(node, aff, False, user)], leftovers=1, why=[op])
        if depth >= self.max_depth or len(node.users) > 1:
            if len(node.users) > 1:
                leftover.why = [f"'{node.name}' has other users"]
            return leftover
        if node.op in ("call_function", "call_method") and node.target in ADD_TARGETS:
            return self._pull_add(gm, node, aff, depth) or leftover
        if node.op == "call_function" and node.target in _CAT:
            return self._pull_cat(gm, node, aff, depth) or leftover
        t = transfer_for(gm, node)
        if isinstance(t, str):
            leftover.why = [t]
            return leftover
        inner = t.backward(aff)
        if isinstance(inner, str):
            leftover.why = [f"through '{node.name}': {inner}"]
            return leftover
        return self._pull(gm, t.x, inner, depth + 1, node)

    def _pull_add(self, gm: torch.fx.GraphModule, node: torch.fx.Node, aff: Affine, depth: int) -> Plan | None:
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
            pu = self._pull(gm, u, Affine(aff.a, aff.b if shift_to_u else zero, aff.axis, aff.shape), depth + 1, node)
            pv = self._pull(gm, v, Affine(aff.a, zero if shift_to_u else aff.b, aff.axis, aff.shape), depth + 1, node)
            options.append(pu + pv)
        return min(options, key=lambda p: (p.leftovers, -p.absorbed))

    def _pull_cat(self, gm: torch.fx.GraphModule, node: torch.fx.Node, aff: Affine, depth: int) -> Plan | None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            return None
        dim %= len(aff.shape)
        plan = Plan()
        offset = 0
        for t in tensors:
            shape = node_shape(t)
            if not isinstance(t, torch.fx.Node) or shape is None:
                return None
            if dim == aff.axis:
                n = shape[dim]
                part = Affine(aff.a[offset:offset + n], aff.b[offset:offset + n], aff.axis, shape)
                offset += n
            else:
                part = Affine(aff.a, aff.b, aff.axis, shape)
            if sum(1 for x in tensors if x is t) > 1:
                return None  # the same tensor concatenated twice: one edge, several affines
            plan = plan + self._pull(gm, t, part, depth + 1, node)
        return plan

    def _apply_back(self, gm: torch.fx.GraphModule, view: AffineView, plan: Plan, result: PassResult) -> None:
        sources = view.sources
        for target, aff, absorbed, user in plan.placements:
            new = insert_affine(gm, target, aff.a, aff.b, aff.axis, before=target.next,
                                sources=sources if absorbed else (), hint=f"{view.node.name}_to_{target.name}")
            user.replace_input_with(target, new)
        erase_affine(gm, view, view.x)
        where = ", ".join(f"'{t.name}'" for t, _, _, _ in plan.placements)
        detail = f"moved back through commuting ops onto {where}"
        if plan.leftovers:
            detail += f" ({plan.leftovers} branch keeps an explicit affine)"
        result.changes.append(Change(self.name, view.node.name, detail, sources))

    # -- push forward ----------------------------------------------------------------------------------------
    def push_target(self, gm: torch.fx.GraphModule, view: AffineView, aff: Affine
              ) -> tuple[torch.fx.Node, Affine] | str:
        node = view.node
        for _ in range(self.max_depth):
            users = list(node.users)
            if len(users) != 1:
                return f"'{node.name}' has {len(users)} users"
            user = users[0]
            t = transfer_for(gm, user)
            if isinstance(t, str):
                return t
            nxt = t.forward(aff)
            if isinstance(nxt, str):
                return f"through '{user.name}': {nxt}"
            node, aff = user, nxt
            consumers = list(node.users)
            ops = [match_linear_op(gm, u) for u in consumers]
            if consumers and all(isinstance(o, LinearOp) and o.input is node
                                 and aff.axis == o.channel_axis % len(aff.shape) and aff.a.numel() == o.in_channels
                                 for o in ops):
                return node, aff
        return "no conv/linear consumer within reach"

    def _apply_forward(self, gm: torch.fx.GraphModule, view: AffineView, dest: tuple[torch.fx.Node, Affine],
                       result: PassResult) -> None:
        target, aff = dest
        users = list(target.users)
        new = insert_affine(gm, target, aff.a, aff.b, aff.axis, before=target.next, sources=view.sources,
                            hint=f"{view.node.name}_to_{target.name}")
        for u in users:
            u.replace_input_with(target, new)
        erase_affine(gm, view, view.x)
        result.changes.append(Change(self.name, view.node.name,
                                     f"moved forward past '{target.name}' to its conv/linear consumers",
                                     view.sources))
