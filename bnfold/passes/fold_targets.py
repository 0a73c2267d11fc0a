"""Where an affine can fold: the predicates that the fold, move and split rules share (no rule calls another's
``check``; they all ask these functions).

* :func:`producer_target`  — ``A(op(x))``: ``op`` is a conv / conv-transpose / linear with constant parameters,
  ``A`` is its only user and acts on its output-channel axis with as many channels;
* :func:`consumer_targets` — ``op(A(x))``: every user of ``A`` is such an op reading ``A`` as its input, on its
  input-channel axis;
* :func:`shift_blocked`    — the consumers that cannot take a shift exactly (zero padding, conv-transpose);
* :func:`replace_params`   — write a fold's parameters back, clone-on-fold;
* :func:`push_target`      — the first node along a single-user chain of commuting ops (and channel concats,
  where the other inputs get the identity) whose users all are conv/linear consumers of the moved affine (a
  forward move that ends in folds).
"""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import nn

from bnfold.ir import fold_targets as targets
from bnfold.ir.affine_view import AffineView
from bnfold.ir.graph import normalized_kwargs, unique_attr_name
from bnfold.ir.linear_ops import LinearOp, NotFoldable, match_linear_op
from bnfold.ir.reasons import Fail
from bnfold.ir.uses import value_users
from bnfold.passes.commute import CAT, Affine, cat_forward, transfer_for
from bnfold.passes.context import PassContext

__all__ = ["FxTargets", "absorbs", "consumer_targets", "describe", "linear_op", "producer_target", "push_target",
           "replace_params", "shift_blocked", "untie_note", "user_list"]

shift_blocked = targets.shift_blocked

aten = torch.ops.aten


def linear_op(ctx: PassContext, node: torch.fx.Node) -> LinearOp | NotFoldable | None:
    """:func:`~bnfold.ir.linear_ops.match_linear_op`, remembered per node until an edit touches it."""
    return ctx.memo(node, "linear_op", lambda: match_linear_op(ctx.gm, node))


def user_list(node: torch.fx.Node) -> str:
    """The users of ``node`` that read its values, quoted (metadata-only uses never block a fold)."""
    return ", ".join(f"'{u.name}'" for u in value_users(node))


def describe(node: torch.fx.Node) -> str:
    """What ``node`` is, in a few words (``module layer1.0.conv1``, ``relu``)."""
    if node.op == "call_module":
        return f"module {node.target}"
    t = node.target
    return getattr(t, "__name__", str(t))


class FxTargets:
    """The torch.fx answers to :class:`~bnfold.ir.fold_targets.TargetGraph` (values are the nodes computing them)."""

    def __init__(self, ctx: PassContext) -> None:
        self.ctx = ctx

    def producer_op(self, x: torch.fx.Node) -> LinearOp | NotFoldable | None:
        return linear_op(self.ctx, x)

    def describe_value(self, x: torch.fx.Node) -> str:
        return "a graph input" if x.op == "placeholder" else f"'{x.name}' ({describe(x)})"

    def value_name(self, x: torch.fx.Node) -> str:
        return x.name

    def shared_with(self, x: torch.fx.Node) -> str | None:
        return user_list(x) if len(value_users(x)) > 1 else None

    def consumers(self, x: torch.fx.Node) -> list[torch.fx.Node] | Fail:
        return value_users(x) or Fail("its output is unused")

    def consumer_op(self, node: torch.fx.Node) -> LinearOp | NotFoldable | None:
        return linear_op(self.ctx, node)

    def label(self, node: torch.fx.Node) -> str:
        return node.name

    def op_name(self, node: torch.fx.Node) -> str:
        return describe(node)

    def reads_as_input(self, op: LinearOp, x: torch.fx.Node) -> bool:
        return op.input is x


def producer_target(ctx: PassContext, view: AffineView) -> LinearOp | Fail:
    """The conv/linear ``view`` folds into as its producer, or why there is none."""
    return targets.producer_target(FxTargets(ctx), view.x, view.axis, view.rank, view.channels)


def consumer_targets(ctx: PassContext, node: torch.fx.Node, axis: int, rank: int, channels: int
                     ) -> list[LinearOp] | Fail:
    """The conv/linear users of ``node`` that read it on their input-channel axis ``axis``, or why not all do."""
    return targets.consumer_targets(FxTargets(ctx), node, axis, rank, channels)


def absorbs(ctx: PassContext, node: torch.fx.Node, aff: Affine) -> LinearOp | Fail:
    """``node`` is a conv/linear that can take ``aff`` on its output (only user, channel axis, count)."""
    return targets.absorbs(FxTargets(ctx), node, aff.axis, len(aff.shape), aff.a.numel())


def push_target(ctx: PassContext, start: torch.fx.Node, aff: Affine, max_depth: int = 16
                ) -> tuple[torch.fx.Node, Affine] | Fail:
    """Follow ``start``'s single-user chain through commuting ops; return the node after which ``aff`` (moved
    along) has only conv/linear consumers, with the moved affine, or why there is none within reach."""
    node = start
    for _ in range(max_depth):
        users = value_users(node)
        if len(users) != 1:
            return Fail(f"'{node.name}' has {len(users)} users")
        user = users[0]
        if user.op == "call_function" and user.target in CAT:
            nxt = cat_forward(user, node, aff)
        else:
            t = transfer_for(ctx.gm, user)
            if isinstance(t, Fail):
                return t
            nxt = t.forward(aff)
        if isinstance(nxt, Fail):
            return nxt.prefixed(f"through '{user.name}': ")
        node, aff = user, nxt
        if not isinstance(consumer_targets(ctx, node, aff.axis, len(aff.shape), aff.a.numel()), Fail):
            return node, aff
    return Fail("no conv/linear consumer within reach")


def untie_note(ctx: PassContext, op: LinearOp) -> str:
    """What the report says when ``op``'s weight is tied to another parameter (before :func:`replace_params`, which
    always gives the folded site its own tensors, so the other user — a tied input embedding — is unchanged)."""
    if not ctx.tied(op.weight):
        return ""
    return "; its weight was tied to another parameter: untied, the folded site has its own copy and the other " \
           "keeps the original"


def replace_params(
    ctx: PassContext, op: LinearOp, weight: torch.Tensor, bias: torch.Tensor | None
) -> str:
    """Give ``op`` new parameters (cast once to the old weight's dtype/device); return where they went.

    ``weight`` and ``bias`` are fresh results of the fold arithmetic that nothing else holds: they are stored as
    they are (no copy). Clone-on-fold: a module called from several sites (``ctx.call_sites``, counted once and
    maintained) is copied for this site, and a functional op gets fresh constants, so no other user of the old
    parameters ever sees the folded values. Tied parameters elsewhere stay tied. The op's output keeps its shape,
    so its metadata stays valid.
    """
    dtype, device = op.weight.dtype, op.weight.device
    new_w = weight.to(dtype=dtype, device=device)
    new_b = None if bias is None else bias.to(dtype=dtype, device=device)
    node = op.node
    gm = ctx.gm
    if op.module is not None:
        target = str(node.target)
        module = op.module
        if ctx.call_sites(target) > 1:
            module = copy.deepcopy(module)
            target = unique_attr_name(gm, f"{target}_bnfold")
            gm.add_submodule(target, module)
            ctx.retarget(node, target)
        if new_w is op.weight:  # rewritten in place (ctx.writable): the parameter already holds it
            op.weight.requires_grad_(False)
        else:
            module.weight = nn.Parameter(new_w, requires_grad=False)
        module.bias = None if new_b is None else nn.Parameter(new_b, requires_grad=False)
        ctx.touch(node)
        return target
    if op.matmul:
        w_t = ctx.constant(new_w.t().contiguous(), f"{node.name}_weight", before=node, parameter=True, copy=False)
        if new_b is None:
            ctx.set_call(node, aten.mm.default, (op.input, w_t), {})
        else:
            b = ctx.constant(new_b, f"{node.name}_bias", before=node, parameter=True, copy=False)
            ctx.set_call(node, aten.addmm.default, (b, op.input, w_t), {})
        return node.name
    kwargs = normalized_kwargs(gm, node)
    if kwargs is None:
        raise ValueError(f"cannot normalize the arguments of {node.format_node()}")
    kwargs["weight"] = ctx.constant(new_w, f"{node.name}_weight", before=node, parameter=True, copy=False)
    kwargs["bias"] = (
        None if new_b is None else ctx.constant(new_b, f"{node.name}_bias", before=node, parameter=True, copy=False)
    )
    ctx.set_call(node, node.target, (), kwargs)
    return node.name
