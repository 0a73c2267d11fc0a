"""Where an affine can fold: the predicates that the fold, move and split rules share (no rule calls another's
``check``; they all ask these functions).

* :func:`producer_target`  — ``A(op(x))``: ``op`` is a conv / conv-transpose / linear with constant parameters,
  ``A`` is its only user and acts on its output-channel axis with as many channels;
* :func:`consumer_targets` — ``op(A(x))``: every user of ``A`` is such an op reading ``A`` as its input, on its
  input-channel axis;
* :func:`shift_blocked`    — the consumers that cannot take a shift exactly (zero padding, conv-transpose);
* :func:`push_target`      — the first node along a single-user chain of commuting ops whose users all are
  conv/linear consumers of the moved affine (a forward move that ends in folds).
"""

from __future__ import annotations

import torch
import torch.fx

from bnfold.passes import reasons
from bnfold.passes.affine_view import AffineView
from bnfold.passes.commute import Affine, transfer_for
from bnfold.passes.context import PassContext
from bnfold.passes.linear_ops import LinearOp, NotFoldable, match_linear_op

__all__ = ["absorbs", "consumer_targets", "describe", "linear_op", "producer_target", "push_target", "shift_blocked",
           "user_list"]


def linear_op(ctx: PassContext, node: torch.fx.Node) -> LinearOp | NotFoldable | None:
    """:func:`~bnfold.passes.linear_ops.match_linear_op`, remembered per node until an edit touches it."""
    return ctx.memo(node, "linear_op", lambda: match_linear_op(ctx.gm, node))


def user_list(node: torch.fx.Node) -> str:
    return ", ".join(f"'{u.name}'" for u in node.users)


def describe(node: torch.fx.Node) -> str:
    """What ``node`` is, in a few words (``module layer1.0.conv1``, ``relu``)."""
    if node.op == "call_module":
        return f"module {node.target}"
    t = node.target
    return getattr(t, "__name__", str(t))


def producer_target(ctx: PassContext, view: AffineView) -> LinearOp | str:
    """The conv/linear ``view`` folds into as its producer, or why there is none."""
    producer = view.x
    op = linear_op(ctx, producer)
    if op is None:
        what = "a graph input" if producer.op == "placeholder" else f"'{producer.name}' ({describe(producer)})"
        return reasons.not_a_linear_output(what)
    if isinstance(op, NotFoldable):
        return reasons.unusable("producer", producer.name, op.reason)
    if len(producer.users) > 1:
        return reasons.producer_shared(op.describe(), user_list(producer))
    if view.axis != op.channel_axis % view.rank:
        return reasons.producer_axis(view.axis, op.describe())
    if view.channels != op.out_channels:
        return reasons.producer_channels(view.channels, op.describe(), op.out_channels)
    return op


def consumer_targets(ctx: PassContext, node: torch.fx.Node, axis: int, rank: int, channels: int
                     ) -> list[LinearOp] | str:
    """The conv/linear users of ``node`` that read it on their input-channel axis ``axis``, or why not all do."""
    users = list(node.users)
    if not users:
        return "its output is unused"
    ops: list[LinearOp] = []
    for u in users:
        op = linear_op(ctx, u)
        if op is None:
            return reasons.consumer_not_linear(u.name, describe(u))
        if isinstance(op, NotFoldable):
            return reasons.unusable("consumer", u.name, op.reason)
        if op.input is not node:
            return reasons.consumer_other_argument(op.describe())
        if axis != op.channel_axis % rank:
            return reasons.consumer_axis(axis, op.describe())
        if channels != op.in_channels:
            return reasons.consumer_channels(channels, op.describe(), op.in_channels)
        ops.append(op)
    return ops


def shift_blocked(ops: list[LinearOp], shift: torch.Tensor) -> list[LinearOp]:
    """Consumers that cannot absorb ``shift`` exactly: a conv reading zero padding, or a conv-transpose."""
    if not bool((shift != 0).any()):
        return []
    return [op for op in ops if op.reads_padding_zeros() or op.kind == "conv_transpose"]


def absorbs(ctx: PassContext, node: torch.fx.Node, aff: Affine) -> LinearOp | str:
    """``node`` is a conv/linear that can take ``aff`` on its output (only user, channel axis, count)."""
    op = linear_op(ctx, node)
    if not isinstance(op, LinearOp):
        return f"'{node.name}' is not a foldable conv/linear"
    if len(node.users) > 1:
        return f"{op.describe()} has other users"
    if aff.axis != op.channel_axis % len(aff.shape) or aff.a.numel() != op.out_channels:
        return f"{op.describe()} has its channels on another axis"
    return op


def push_target(ctx: PassContext, start: torch.fx.Node, aff: Affine, max_depth: int = 16
                ) -> tuple[torch.fx.Node, Affine] | str:
    """Follow ``start``'s single-user chain through commuting ops; return the node after which ``aff`` (moved
    along) has only conv/linear consumers, with the moved affine, or why there is none within reach."""
    node = start
    for _ in range(max_depth):
        users = list(node.users)
        if len(users) != 1:
            return f"'{node.name}' has {len(users)} users"
        user = users[0]
        t = transfer_for(ctx.gm, user)
        if isinstance(t, str):
            return t
        nxt = t.forward(aff)
        if isinstance(nxt, str):
            return f"through '{user.name}': {nxt}"
        node, aff = user, nxt
        if not isinstance(consumer_targets(ctx, node, aff.axis, len(aff.shape), aff.a.numel()), str):
            return node, aff
    return "no conv/linear consumer within reach"
