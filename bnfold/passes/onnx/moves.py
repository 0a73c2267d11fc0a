"""How a per-channel affine moves through an ONNX graph — the torch back end's mechanism, not a second one.

Which family each ONNX op belongs to is :data:`ONNX_OPS`; how an affine crosses an op of that family is the one table
both back ends read, :data:`bnfold.passes.commute.CROSSINGS` (forward ``P(A(x)) = A'(P(x))``, backward
``A(P(x)) = P(A'(x))``)::

    Identity, Dropout (inference)          VALUE     A' = A
    GlobalAveragePool, AveragePool         SPATIAL   A' = A   (channel axis 1; no padding averaged)
    MaxPool, GlobalMaxPool                 MAX       A' = A   when a > 0
    Relu                                   RELU      A' = A   when a > 0 and b = 0
    Reshape, Flatten, Squeeze, Unsqueeze   INDEX     t.reshape(out_shape)
    Transpose                              INDEX     t.permute(perm)
    Slice, Gather (constant arguments)     INDEX     t.index_select(axis, idx)
    Concat along the channel axis          forward a' = [a, 1], b' = [b, 0]; backward (a, b) split per input

Shapes come from ONNX shape inference (:mod:`bnfold.ir.onnx.shapes`). A symbolic dimension (a dynamic batch)
is given a size, and the move is computed twice, with every symbol = 2 and = 3: it is accepted only when both
give the same per-channel affine on the same axis (a reshape that mixes the batch into the channels is refused,
not folded for one batch size). A dimension inference left unknown is solved from the element count when it is
the only one.

The moves themselves — the ONNX twins of :func:`bnfold.passes.fold_targets.push_target` and of ``propagate``'s pull:

* :func:`forward_targets` — along a single-reader chain of such ops (and channel Concats, identity coefficients for
  the other inputs) to conv/linear consumers;
* :func:`pull_back` — back through such ops and channel Concats (``(a, b)`` split per input) into every conv/linear
  producer it reaches, each branch read only along that path (``Shape`` readers aside).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from bnfold.ir.fold_targets import NotFoldable, absorbs, consumer_targets
from bnfold.ir.onnx.graph import OnnxGraph, attr
from bnfold.ir.onnx.ops import OnnxLinearOp
from bnfold.ir.onnx.shapes import SYMBOL_SIZES, concrete_shape, rank
from bnfold.ir.onnx.targets import OnnxTargets, label
from bnfold.ir.reasons import Fail
from bnfold.passes.commute import (
    Affine,
    Commutes,
    Crossing,
    Facts,
    avg_pool_exact,
    concat_forward,
    concat_split,
    crossings,
    reshape_axes,
)

__all__ = ["MAX_MOVE", "ONNX_OPS", "Moved", "OnnxCrossing", "Pulled", "concat_backward", "concat_forward_onnx",
           "crossing", "forward_targets", "pull_back", "start_affine"]

MAX_MOVE = 16
"""How many ops a move crosses at the most."""

_label = label


@dataclass(frozen=True)
class OnnxCrossing:
    """How an affine crosses ``node`` (data input ``x``, output ``y``); ``forward``/``backward`` take and return
    affines whose shapes are the graph's with symbols set to ``SYMBOL_SIZES[0]``."""

    node: onnx.NodeProto
    x: str
    y: str
    forward: Crossing
    backward: Crossing


def crossing(g: OnnxGraph, node: onnx.NodeProto) -> OnnxCrossing | Fail:
    """The :class:`OnnxCrossing` of ``node``, or why an affine cannot cross it."""
    name, op = _label(node), node.op_type
    if node.domain not in ("", "ai.onnx") or not node.input or not node.input[0]:
        return Fail(f"'{name}' ({op}) does not commute with a per-channel affine", name)
    x, y = node.input[0], node.output[0]
    extra = [o for o in node.output[1:] if o and g.readers(o)]
    if extra:
        return Fail(f"'{name}' ({op}) also computes '{extra[0]}', which is read", name)
    per_size = []
    for v in SYMBOL_SIZES:
        in_s = concrete_shape(g, x, v)
        if in_s is None:
            return Fail(f"the shape before '{name}' is unknown", name)
        facts = _facts(g, node, in_s, v)
        if isinstance(facts, Fail):
            return facts
        per_size.append((in_s, facts.out_shape, *crossings(facts)))
    (in2, out2, fwd2, bwd2), (in3, out3, fwd3, bwd3) = per_size

    def agree(r2: Affine | Fail, make3: Callable[[], Affine | Fail]) -> Affine | Fail:
        if isinstance(r2, Fail):
            return r2
        r3 = make3()
        if isinstance(r3, Fail) or r3.axis != r2.axis or not (torch.equal(r3.a, r2.a) and torch.equal(r3.b, r2.b)):
            return Fail(f"how '{name}' maps channels depends on the batch (or another dynamic) size", name)
        return r2

    def forward(aff: Affine) -> Affine | Fail:
        if aff.shape != in2 or in3[aff.axis] != aff.a.numel():
            return Fail(f"the shape before '{name}' is unknown", name)
        return agree(fwd2(aff), lambda: fwd3(Affine(aff.a, aff.b, aff.axis, in3)))

    def backward(aff: Affine) -> Affine | Fail:
        if aff.shape != out2 or out3[aff.axis] != aff.a.numel():
            return Fail(f"the shape after '{name}' is unknown", name)
        return agree(bwd2(aff), lambda: bwd3(Affine(aff.a, aff.b, aff.axis, out3)))

    return OnnxCrossing(node, x, y, forward, backward)


# -- which family each ONNX op is, and its facts ------------------------------------------------------------------

OnnxReader = Callable[[OnnxGraph, onnx.NodeProto, tuple[int, ...], int], "Facts | Fail"]
"""Reads the :class:`~bnfold.passes.commute.Facts` of one ONNX op at input shape ``in_s`` (symbols set to ``v``)."""


def _out(g: OnnxGraph, node: onnx.NodeProto, v: int, total: int | None = None) -> tuple[int, ...] | None:
    return concrete_shape(g, node.output[0], v, total=total)


def _unknown_after(node: onnx.NodeProto) -> Fail:
    return Fail(f"the shape after '{_label(node)}' is unknown", _label(node))


def _identity(g: OnnxGraph, node: onnx.NodeProto, in_s: tuple[int, ...], v: int) -> Facts | Fail:
    return Facts(Commutes.VALUE, in_s, in_s)


def _dropout(g: OnnxGraph, node: onnx.NodeProto, in_s: tuple[int, ...], v: int) -> Facts | Fail:
    if len(node.input) > 2 and node.input[2] and not _false(g, node.input[2]):
        return Fail(f"dropout '{_label(node)}' runs in training mode", _label(node))
    return Facts(Commutes.VALUE, in_s, in_s)


def _pool(how: Commutes) -> OnnxReader:
    def read(g: OnnxGraph, node: onnx.NodeProto, in_s: tuple[int, ...], v: int) -> Facts | Fail:
        out_s = _out(g, node, v)
        if out_s is None or len(out_s) != len(in_s):
            return _unknown_after(node)
        if node.op_type == "AveragePool":
            pads = attr(node, "pads", []) or []
            if attr(node, "auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER") or int(attr(node, "ceil_mode", 0)):
                pads = [*pads, 1]  # border windows may reach past the input: padding, as far as the shift goes
            why = avg_pool_exact(pads or 0, bool(int(attr(node, "count_include_pad", 0))), None)
            if why:
                return why
        return Facts(how, in_s, out_s)
    return read


def _relu(g: OnnxGraph, node: onnx.NodeProto, in_s: tuple[int, ...], v: int) -> Facts | Fail:
    return Facts(Commutes.RELU, in_s, in_s)


def _reshaped(in_s: tuple[int, ...], out_s: tuple[int, ...]) -> Facts:
    return Facts(Commutes.INDEX, in_s, out_s, move=lambda t: t.reshape(out_s), axes=reshape_axes(in_s, out_s))


def _flatten(g: OnnxGraph, node: onnx.NodeProto, in_s: tuple[int, ...], v: int) -> Facts | Fail:
    k = int(attr(node, "axis", 1))
    k = k + len(in_s) if k < 0 else k
    return _reshaped(in_s, (math.prod(in_s[:k]), math.prod(in_s[k:])))


def _reshape(g: OnnxGraph, node: onnx.NodeProto, in_s: tuple[int, ...], v: int) -> Facts | Fail:
    total = math.prod(in_s)
    out_s = _reshape_target(g, node, in_s) if node.op_type == "Reshape" else None
    out_s = out_s or _out(g, node, v, total)
    if out_s is None or math.prod(out_s) != total:
        return _unknown_after(node)
    return _reshaped(in_s, out_s)


def _transpose(g: OnnxGraph, node: onnx.NodeProto, in_s: tuple[int, ...], v: int) -> Facts | Fail:
    perm = [int(p) for p in (attr(node, "perm", None) or range(len(in_s))[::-1])]
    if sorted(perm) != list(range(len(in_s))):
        return Fail(f"'{_label(node)}' (Transpose) has an unexpected permutation", _label(node))
    return Facts(Commutes.INDEX, in_s, tuple(in_s[p] for p in perm), move=lambda t: t.permute(perm),
                 axes=(list(perm).index, list(perm).__getitem__))


def _select(g: OnnxGraph, node: onnx.NodeProto, in_s: tuple[int, ...], v: int) -> Facts | Fail:
    fn = _slice(g, node, in_s) if node.op_type == "Slice" else _gather(g, node, in_s)
    if isinstance(fn, Fail):
        return fn
    return Facts(Commutes.INDEX, in_s, tuple(fn(torch.zeros(in_s, dtype=torch.int8)).shape), move=fn)


ONNX_OPS: dict[str, OnnxReader] = {
    "Identity": _identity,
    "Dropout": _dropout,
    "GlobalAveragePool": _pool(Commutes.SPATIAL),
    "AveragePool": _pool(Commutes.SPATIAL),
    "MaxPool": _pool(Commutes.MAX),
    "GlobalMaxPool": _pool(Commutes.MAX),
    "Relu": _relu,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Squeeze": _reshape,
    "Unsqueeze": _reshape,
    "Transpose": _transpose,
    "Slice": _select,
    "Gather": _select,
}
"""ONNX op types (default domain) → how to read their facts; the family is in the facts, the algebra in
:data:`~bnfold.passes.commute.CROSSINGS`."""


def _facts(g: OnnxGraph, node: onnx.NodeProto, in_s: tuple[int, ...], v: int) -> Facts | Fail:
    read = ONNX_OPS.get(node.op_type)
    if read is None:
        return Fail(f"'{_label(node)}' ({node.op_type}) does not commute with a per-channel affine", _label(node))
    return read(g, node, in_s, v)


def _false(g: OnnxGraph, value: str) -> bool:
    c = g.constant(value)
    return c is not None and not bool(np.asarray(c).any())


def _ints(g: OnnxGraph, node: onnx.NodeProto, index: int) -> list[int] | Fail | None:
    """Input ``index`` of ``node`` as constant ints, None when absent, or why it is not constant."""
    if index >= len(node.input) or not node.input[index]:
        return None
    c = g.constant(node.input[index])
    if c is None:
        return Fail(f"'{_label(node)}' selects by values computed at run time")
    return [int(i) for i in np.asarray(c).reshape(-1)]


def _reshape_target(g: OnnxGraph, node: onnx.NodeProto, in_s: tuple[int, ...]) -> tuple[int, ...] | None:
    """The output shape of a Reshape with a constant shape input (``0`` copies, ``-1`` is inferred)."""
    dims = _ints(g, node, 1)
    if not isinstance(dims, list):
        return None
    allowzero = int(attr(node, "allowzero", 0))
    out = [in_s[k] if d == 0 and not allowzero and k < len(in_s) else d for k, d in enumerate(dims)]
    if out.count(-1) > 1:
        return None
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        if known == 0 or math.prod(in_s) % known:
            return None
        out[out.index(-1)] = math.prod(in_s) // known
    return tuple(out)


def _slice_index(dim: int, start: int, end: int, step: int) -> torch.Tensor:
    """The indices ONNX ``Slice`` keeps along one axis of size ``dim``."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return torch.arange(start, end, step)


def _slice(g: OnnxGraph, node: onnx.NodeProto, in_s: tuple[int, ...]
           ) -> Callable[[torch.Tensor], torch.Tensor] | Fail:
    if g.opset() < 10:
        starts, ends, axes = attr(node, "starts", []), attr(node, "ends", []), attr(node, "axes", None)
        steps: list[int] | Fail | None = None
    else:
        starts, ends, axes, steps = (_ints(g, node, k) for k in (1, 2, 3, 4))
    for v in (starts, ends, axes, steps):
        if isinstance(v, Fail):
            return v
    assert isinstance(starts, list) and isinstance(ends, list)
    r = len(in_s)
    axes_l = [int(a) % r for a in (axes if isinstance(axes, list) else range(len(starts)))]
    steps_l = steps if isinstance(steps, list) else [1] * len(starts)
    if 0 in steps_l or not len(starts) == len(ends) == len(axes_l) == len(steps_l):
        return Fail(f"'{_label(node)}' is not a slice bnfold can replay")
    picks = [(ax, _slice_index(in_s[ax], s, e, st)) for ax, s, e, st in zip(axes_l, starts, ends, steps_l,
                                                                          strict=True)]

    def fn(t: torch.Tensor) -> torch.Tensor:
        for ax, idx in picks:
            t = t.index_select(ax, idx)
        return t

    return fn


def _gather(g: OnnxGraph, node: onnx.NodeProto, in_s: tuple[int, ...]
            ) -> Callable[[torch.Tensor], torch.Tensor] | Fail:
    if len(node.input) < 2 or g.constant(node.input[1]) is None:
        return Fail(f"'{_label(node)}' selects by values computed at run time")
    c = g.constant(node.input[1])
    assert c is not None
    ax = int(attr(node, "axis", 0)) % len(in_s)
    idx = torch.from_numpy(np.asarray(c).astype(np.int64))
    idx = torch.where(idx < 0, idx + in_s[ax], idx)
    if bool(((idx < 0) | (idx >= in_s[ax])).any()):
        return Fail(f"'{_label(node)}' gathers an index out of range")
    r = idx.dim()

    def fn(t: torch.Tensor) -> torch.Tensor:
        picked = t.movedim(ax, 0)[idx]  # idx.shape + (the other axes)
        order = list(range(r, r + ax)) + list(range(r)) + list(range(r + ax, picked.dim()))
        return picked.permute(order)

    return fn


def _concat_shapes(g: OnnxGraph, node: onnx.NodeProto, rank: int) -> tuple[int, list[tuple[int, ...]]] | Fail:
    """The concat axis and the input shapes (symbols set to ``SYMBOL_SIZES[0]``) of the Concat ``node``."""
    name = _label(node)
    dim = int(attr(node, "axis", 0)) % rank
    shapes = []
    for i in node.input:
        s, s3 = (concrete_shape(g, i, v) for v in SYMBOL_SIZES)
        if s is None or s3 is None or len(s) != rank or s[dim] != s3[dim]:
            return Fail(f"'{name}' concatenates along an axis or of shapes known only at run time")
        shapes.append(s)
    return dim, shapes


def concat_forward_onnx(g: OnnxGraph, node: onnx.NodeProto, source: str, aff: Affine) -> Affine | Fail:
    """``aff`` on the input ``source`` of the Concat ``node``, moved to its output
    (:func:`~bnfold.passes.commute.concat_forward`)."""
    if int(attr(node, "axis", 0)) % len(aff.shape) != aff.axis:
        return concat_forward(_label(node), [], [], int(attr(node, "axis", 0)) % len(aff.shape), aff, aff.shape)
    found = _concat_shapes(g, node, len(aff.shape))
    if isinstance(found, Fail):
        return found
    dim, shapes = found
    out = list(shapes[0])
    out[dim] = sum(s[dim] for s in shapes)
    return concat_forward(_label(node), [s[dim] for s in shapes], [i == source for i in node.input], dim, aff,
                          tuple(out))


def concat_backward(g: OnnxGraph, node: onnx.NodeProto, aff: Affine) -> list[Affine] | Fail:
    """``aff`` on the output of the Concat ``node`` as one affine per input
    (:func:`~bnfold.passes.commute.concat_split`)."""
    found = _concat_shapes(g, node, len(aff.shape))
    if isinstance(found, Fail):
        return found
    dim, shapes = found
    return concat_split(aff, dim, shapes)


# -- the moves -----------------------------------------------------------------------------------------------------

def start_affine(g: OnnxGraph, value: str, a: torch.Tensor, b: torch.Tensor, axis: int) -> Affine | Fail:
    """``(a, b)`` on ``axis`` of ``value`` as an :class:`~bnfold.passes.commute.Affine` on its shape (symbols set
    as :func:`crossing` does), or why its shape is not known well enough to move it."""
    s, s3 = (concrete_shape(g, value, v) for v in SYMBOL_SIZES)
    if s is None or s3 is None:
        return Fail("the shape of its input is unknown")
    ax = axis if axis >= 0 else axis + len(s)
    if not 0 <= ax < len(s) or s[ax] != a.numel() or s3[ax] != a.numel():
        return Fail("its channel axis has a size known only at run time")
    return Affine(a, b, ax, s)


@dataclass
class Moved:
    """The affine ``(a, b)`` on ``axis`` of ``value`` after a forward move (``through``: the ops moved through,
    empty when the consumers read the site's output directly), and the consumers ``ops`` that take it."""

    value: str
    a: torch.Tensor
    b: torch.Tensor
    axis: int
    rank: int | None
    through: list[str] = field(default_factory=list)
    ops: list[OnnxLinearOp] = field(default_factory=list)


def forward_targets(g: OnnxGraph, x: str, y: str, a: torch.Tensor, b: torch.Tensor, axis: int, *, moves: bool
                    ) -> Moved | Fail:
    """Consumers of an affine ``(a, b)`` on ``axis`` from ``x`` to ``y``: the readers of ``y``, or (``moves``) the
    readers at the end of a single-reader chain of ops it crosses exactly (:func:`crossing`, channel concats)."""
    r = rank(g, x)
    direct = consumer_targets(OnnxTargets(g), y, axis, r, a.numel())
    if not isinstance(direct, Fail):
        return Moved(y, a, b, axis, r, ops=direct)
    if not moves:
        return direct
    aff = start_affine(g, x, a, b, axis)
    if isinstance(aff, Fail):
        return aff
    value, through = y, []
    for _ in range(MAX_MOVE):
        users = g.value_users(value)
        if len(users) != 1 or g.value_readers(value) != 1:
            p = g.producer(value)
            return Fail(f"'{value if p is None else _label(p)}' has {g.value_readers(value)} users")
        user = users[0]
        if user.op_type == "Concat" and user.domain in ("", "ai.onnx"):
            nxt: Affine | Fail = concat_forward_onnx(g, user, value, aff)
        else:
            c = crossing(g, user)
            if isinstance(c, Fail):
                return c
            nxt = c.forward(aff)
        if isinstance(nxt, Fail):
            return nxt.prefixed(f"through '{_label(user)}': ")
        value, aff = user.output[0], nxt
        through.append(f"{user.op_type} '{_label(user)}'")
        ops = consumer_targets(OnnxTargets(g), value, aff.axis, len(aff.shape), aff.a.numel())
        if not isinstance(ops, Fail):
            return Moved(value, aff.a, aff.b, aff.axis, len(aff.shape), through, ops)
    return Fail("no conv/linear consumer within reach")


@dataclass
class Pulled:
    """Where an affine lands after a backward move: one ``(producer, affine on its output)`` per branch."""

    targets: list[tuple[OnnxLinearOp, Affine]]
    through: list[str]


def pull_back(g: OnnxGraph, value: str, aff: Affine, depth: int = 0) -> Pulled | Fail:
    """Move ``aff`` (on ``value``) back through commuting ops (:func:`crossing`) and channel concats (split per
    input) until every branch ends at a conv/linear whose output only that path reads
    (:func:`~bnfold.ir.fold_targets.absorbs`), or say why not."""
    t = OnnxTargets(g)
    p = g.producer(value)
    if p is None:
        return Fail(f"'{value}' is not a foldable conv/linear")
    name = _label(p)
    op = t.producer_op(value)
    if isinstance(op, OnnxLinearOp):
        found = absorbs(t, value, aff.axis, len(aff.shape), aff.a.numel())
        return found if isinstance(found, Fail) else Pulled([(found, aff)], [])
    if isinstance(op, NotFoldable):
        return Fail(f"producer '{name}' cannot be rewritten: {op.reason}", name)
    if g.value_readers(value) > 1:
        return Fail(f"'{name}' has other users", name)
    if depth >= MAX_MOVE:
        return Fail("no conv/linear producer within reach")
    if p.op_type == "Concat" and p.domain in ("", "ai.onnx"):
        if len(set(p.input)) != len(p.input):
            return Fail(f"'{name}' concatenates the same tensor twice", name)
        parts = concat_backward(g, p, aff)
        if isinstance(parts, Fail):
            return parts
        pulled = Pulled([], [f"Concat '{name}'"])
        for i, part in zip(p.input, parts, strict=True):
            got = pull_back(g, i, part, depth + 1)
            if isinstance(got, Fail):
                return got
            pulled.targets += got.targets
            pulled.through += got.through
        return pulled
    c = crossing(g, p)
    if isinstance(c, Fail):
        return c
    inner = c.backward(aff)
    if isinstance(inner, Fail):
        return inner.prefixed(f"through '{name}': ")
    got = pull_back(g, c.x, inner, depth + 1)
    if isinstance(got, Fail):
        return got
    return Pulled(got.targets, [f"{p.op_type} '{name}'", *got.through])
