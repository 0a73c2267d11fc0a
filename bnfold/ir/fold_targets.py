"""Where a per-channel affine ``A(x) = a ⊙ x + b`` can fold — the predicates every graph back end shares, written once
over one description of a conv / conv-transpose / linear (:class:`LinearOpLike`) and one set of questions to the
graph (:class:`TargetGraph`). The torch.fx back end (:mod:`bnfold.passes.fold_targets`) and the ONNX back end
(:mod:`bnfold.ir.onnx.targets`) answer the questions; the decisions and the words of every reason are here.

* :func:`producer_target`  — ``A(op(x))``: ``op`` is a conv/linear whose output only ``A`` reads, on its
  output-channel axis, with as many channels (``W'[o] = a[o]·W[o]``, ``b'[o] = a[o]·b[o] + b_A[o]``);
* :func:`consumer_targets` — ``op(A(x))``: every reader of ``A``'s output is such an op reading it as its input,
  on its input-channel axis (``W'[:, i] = W[:, i]·a[i]``, ``b' = b + W·b_A``);
* :func:`shift_blocked`    — the consumers that cannot take a non-zero shift exactly: a conv that reads zero
  padding (``conv(pad₀(x + s)) ≠ conv(pad₀(x)) + conv(s)`` at the borders) or a conv-transpose (each output sums a
  position-dependent number of inputs);
* :func:`absorbs`          — the end of a backward move: ``x`` is a conv/linear output that can take the affine.

Each returns what it found or a :class:`~bnfold.ir.reasons.Fail`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, Protocol, TypeVar

import torch

from bnfold.ir import reasons
from bnfold.ir.affine_math import OpKind
from bnfold.ir.reasons import Fail

__all__ = ["LinearOpLike", "NotFoldable", "TargetGraph", "absorbs", "axis_fits", "consumer_targets",
           "producer_target", "shift_blocked"]

V = TypeVar("V")  # a value of the graph (torch.fx: the node computing it; ONNX: its name)
N = TypeVar("N")  # a node of the graph
Op = TypeVar("Op", bound="LinearOpLike")


class NotFoldable:
    """The node is a conv/linear, but its parameters cannot be rewritten (``reason`` says why)."""

    __slots__ = ("node", "reason")

    def __init__(self, node: Any, reason: str) -> None:
        self.node = node
        self.reason = reason

    def __repr__(self) -> str:
        return f"NotFoldable({self.reason!r})"


class LinearOpLike(Protocol):
    """A conv / conv-transpose / linear with constant parameters, as every back end describes it: which axis of its
    input and output indexes channels (``1`` for convolutions and Gemm, ``-1`` for a linear/MatMul, ``0`` for a
    Gemm with ``transA``), how many, its groups, and whether it reads zero padding."""

    @property
    def kind(self) -> OpKind: ...

    @property
    def groups(self) -> int: ...

    @property
    def in_channels(self) -> int: ...

    @property
    def out_channels(self) -> int: ...

    @property
    def in_axis(self) -> int: ...

    @property
    def out_axis(self) -> int: ...

    def describe(self) -> str: ...

    def reads_padding_zeros(self) -> bool: ...


class TargetGraph(Protocol, Generic[V, N, Op]):
    """The questions the predicates ask a graph back end. Reason texts are built here; the back end only says how
    it names things."""

    def producer_op(self, x: V) -> Op | NotFoldable | None:
        """The conv/linear whose output is ``x`` (None: ``x`` is no conv/linear output)."""
        ...

    def describe_value(self, x: V) -> str:
        """What computes ``x``, for a reason: ``a graph input``, ``'relu_3' (relu)``."""
        ...

    def value_name(self, x: V) -> str:
        """``x``'s name (without quotes)."""
        ...

    def shared_with(self, x: V) -> str | None:
        """None when one place reads ``x``'s values, else those places, quoted, for a reason."""
        ...

    def consumers(self, x: V) -> list[N] | Fail:
        """The nodes that read ``x``'s values (shape-only readers left out), or why ``x`` cannot have consumers to
        fold into (unused, a graph output, read inside a sub-graph)."""
        ...

    def consumer_op(self, node: N) -> Op | NotFoldable | None:
        """``node`` as a conv/linear (None: it is not one)."""
        ...

    def label(self, node: Any) -> str:
        """How a reason names ``node`` (without quotes)."""
        ...

    def op_name(self, node: N) -> str:
        """What ``node`` is, in a word (``relu``, ``Relu``)."""
        ...

    def reads_as_input(self, op: Op, x: V) -> bool:
        """``op`` reads ``x`` as its data input only (not as a weight, not twice)."""
        ...


def axis_fits(op_axis: int, axis: int, rank: int | None) -> bool | None:
    """Does an affine on ``axis`` of a rank-``rank`` value sit on an op's channel axis ``op_axis`` (``1``, ``-1`` or
    ``0``)? None when that depends on a rank that is not known."""
    if rank is not None:
        return axis % rank == op_axis % rank if rank else False
    if op_axis == -1:
        return True if axis == -1 else None
    if op_axis == 0:
        return axis == 0 or None
    return True if axis == 1 else None


def producer_target(g: TargetGraph[V, N, Op], x: V, axis: int, rank: int | None, channels: int) -> Op | Fail:
    """The conv/linear an affine on ``axis`` of ``x`` (``channels`` long) folds into as its producer, or why there
    is none."""
    op = g.producer_op(x)
    if op is None:
        return Fail(reasons.not_a_linear_output(g.describe_value(x)))
    if isinstance(op, NotFoldable):
        name = g.label(op.node)
        return Fail(reasons.unusable("producer", name, op.reason), name)
    shared = g.shared_with(x)
    if shared is not None:
        return Fail(reasons.producer_shared(op.describe(), shared))
    fits = axis_fits(op.out_axis, axis, rank)
    if fits is None:
        return Fail(f"the rank of its input is unknown, so its axis cannot be matched with {op.describe()}")
    if not fits:
        return Fail(reasons.producer_axis(axis, op.describe()))
    if channels != op.out_channels:
        return Fail(reasons.producer_channels(channels, op.describe(), op.out_channels))
    return op


def consumer_targets(g: TargetGraph[V, N, Op], x: V, axis: int, rank: int | None, channels: int
                     ) -> list[Op] | Fail:
    """The conv/linear readers of ``x`` that read it as their input on their input-channel axis ``axis``, or why
    not every reader does (readers of its shape only are not consumers: they see the same shape after the fold)."""
    users = g.consumers(x)
    if isinstance(users, Fail):
        return users
    ops: list[Op] = []
    for u in users:
        op = g.consumer_op(u)
        if op is None:
            return Fail(reasons.consumer_not_linear(g.label(u), g.op_name(u)), g.label(u))
        if isinstance(op, NotFoldable):
            return Fail(reasons.unusable("consumer", g.label(u), op.reason), g.label(u))
        if not g.reads_as_input(op, x):
            return Fail(reasons.consumer_other_argument(op.describe()), g.label(u))
        fits = axis_fits(op.in_axis, axis, rank)
        if fits is None:
            return Fail(f"its rank is unknown, so its axis cannot be matched with {op.describe()}", g.label(u))
        if not fits:
            return Fail(reasons.consumer_axis(axis, op.describe()), g.label(u))
        if channels != op.in_channels:
            return Fail(reasons.consumer_channels(channels, op.describe(), op.in_channels), g.label(u))
        ops.append(op)
    return ops


def shift_blocked(ops: Sequence[Op], shift: torch.Tensor) -> list[Op]:
    """The consumers among ``ops`` that cannot absorb ``shift`` exactly (module docstring); none when it is zero."""
    if not bool((shift != 0).any()):
        return []
    return [op for op in ops if op.reads_padding_zeros() or op.kind == "conv_transpose"]


def absorbs(g: TargetGraph[V, N, Op], x: V, axis: int, rank: int, channels: int) -> Op | Fail:
    """``x`` is the output of a conv/linear that can take an affine on ``axis`` (``channels`` long): the end of a
    backward move (only that path reads ``x``; its output-channel axis and count)."""
    op = g.producer_op(x)
    if op is None or isinstance(op, NotFoldable):
        return Fail(f"'{g.value_name(x)}' is not a foldable conv/linear")
    if g.shared_with(x) is not None:
        return Fail(f"{op.describe()} has other users")
    if not axis_fits(op.out_axis, axis, rank) or channels != op.out_channels:
        return Fail(f"{op.describe()} has its channels on another axis")
    return op
