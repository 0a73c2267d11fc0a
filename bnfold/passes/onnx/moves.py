"""How a per-channel affine crosses an ONNX op — the torch back end's mechanism (:mod:`bnfold.passes.commute`),
not a second one. Each ONNX op is expressed as the torch function that moves a coefficient tensor, and
:func:`~bnfold.passes.commute.index_transfer` / :func:`~bnfold.passes.commute.same` carry the affine through it,
forward (``P(A(x)) = A'(P(x))``) and backward (``A(P(x)) = P(A'(x))``)::

    Identity, Dropout (inference)          same values               A' = A
    GlobalAveragePool, AveragePool         Σw = 1 over one channel   A' = A   (channel axis 1; no padding averaged)
    MaxPool, GlobalMaxPool                 order-preserving          A' = A   when a > 0
    Relu                                   relu(a x) = a relu(x)     A' = A   when a > 0 and b = 0
    Reshape, Flatten, Squeeze, Unsqueeze   t.reshape(out_shape)      index map
    Transpose                              t.permute(perm)           index map
    Slice (constant starts/ends/axes/steps), Gather (constant indices)   t.index_select(axis, idx)   index map
    Concat along the channel axis          forward a' = [a, 1], b' = [b, 0]; backward (a, b) split per input

Shapes come from ONNX shape inference (:mod:`bnfold.passes.onnx.shapes`). A symbolic dimension (a dynamic batch)
is given a size, and the move is computed twice, with every symbol = 2 and = 3: it is accepted only when both
give the same per-channel affine on the same axis (a reshape that mixes the batch into the channels is refused,
not folded for one batch size). A dimension inference left unknown is solved from the element count when it is
the only one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from bnfold.passes.commute import (
    Affine,
    Crossing,
    avg_pool_exact,
    concat_forward,
    concat_split,
    index_transfer,
    no_check,
    positive_scale,
    positive_scale_no_shift,
    same,
    spatial_axis_guard,
)
from bnfold.passes.onnx.graph import OnnxGraph, attr
from bnfold.passes.onnx.shapes import Shape, shape

__all__ = ["SYMBOL_SIZES", "OnnxCrossing", "concat_backward", "concat_forward_onnx", "concrete", "concrete_shape",
           "crossing"]

SYMBOL_SIZES = (2, 3)
"""Sizes given to symbolic dimensions; a move must give the same affine for both."""

_POOLS = ("GlobalAveragePool", "AveragePool", "MaxPool", "GlobalMaxPool")
_RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def _label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def concrete(dims: Shape | None, v: int, *, symbols: set[str] | None = None, total: int | None = None
             ) -> tuple[int, ...] | None:
    """``dims`` with every symbol (of ``symbols``, or any symbol when None) set to ``v``; one dimension left
    unknown is solved from ``total`` elements. None when that is not possible."""
    if dims is None:
        return None
    out: list[int | None] = []
    for d in dims:
        if isinstance(d, int):
            out.append(d)
        elif isinstance(d, str) and (symbols is None or d in symbols):
            out.append(v)
        else:
            out.append(None)
    missing = [k for k, d in enumerate(out) if d is None]
    if missing:
        known = math.prod(d for d in out if d is not None)
        if total is None or len(missing) > 1 or known == 0 or total % known:
            return None
        out[missing[0]] = total // known
    return tuple(int(d) for d in out if d is not None)


def concrete_shape(g: OnnxGraph, value: str, v: int, *, total: int | None = None) -> tuple[int, ...] | None:
    """The shape of ``value`` with the graph's dynamic input dimensions set to ``v``: from shape inference run
    at that size (``g.shapes_at``), else from the symbolic shape (the inputs' symbols set to ``v``, one unknown
    dimension solved from ``total``)."""
    s = g.shapes_at.get(v, {}).get(value)
    if s is not None:
        return s
    roots = {d.dim_param for i in g.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
    return concrete(shape(g, value), v, symbols=roots, total=total)


@dataclass(frozen=True)
class OnnxCrossing:
    """How an affine crosses ``node`` (data input ``x``, output ``y``); ``forward``/``backward`` take and return
    affines whose shapes are the graph's with symbols set to ``SYMBOL_SIZES[0]``."""

    node: onnx.NodeProto
    x: str
    y: str
    forward: Crossing
    backward: Crossing


def crossing(g: OnnxGraph, node: onnx.NodeProto) -> OnnxCrossing | str:
    """The :class:`OnnxCrossing` of ``node``, or why an affine cannot cross it."""
    name, op = _label(node), node.op_type
    if node.domain not in ("", "ai.onnx") or not node.input or not node.input[0]:
        return f"'{name}' ({op}) does not commute with a per-channel affine"
    x, y = node.input[0], node.output[0]
    extra = [o for o in node.output[1:] if o and g.readers(o)]
    if extra:
        return f"'{name}' ({op}) also computes '{extra[0]}', which is read"
    per_size = []
    for v in SYMBOL_SIZES:
        in_s = concrete_shape(g, x, v)
        if in_s is None:
            return f"the shape before '{name}' is unknown"
        fns = _fns(g, node, in_s, v)
        if isinstance(fns, str):
            return fns
        per_size.append((in_s, fns))
    (in2, (fwd2, bwd2, out2)), (in3, (fwd3, bwd3, out3)) = per_size

    def agree(r2: Affine | str, make3: Callable[[], Affine | str]) -> Affine | str:
        if isinstance(r2, str):
            return r2
        r3 = make3()
        if isinstance(r3, str) or r3.axis != r2.axis or not (torch.equal(r3.a, r2.a) and torch.equal(r3.b, r2.b)):
            return f"how '{name}' maps channels depends on the batch (or another dynamic) size"
        return r2

    def forward(aff: Affine) -> Affine | str:
        if aff.shape != in2 or in3[aff.axis] != aff.a.numel():
            return f"the shape before '{name}' is unknown"
        return agree(fwd2(aff), lambda: fwd3(Affine(aff.a, aff.b, aff.axis, in3)))

    def backward(aff: Affine) -> Affine | str:
        if aff.shape != out2 or out3[aff.axis] != aff.a.numel():
            return f"the shape after '{name}' is unknown"
        return agree(bwd2(aff), lambda: bwd3(Affine(aff.a, aff.b, aff.axis, out3)))

    return OnnxCrossing(node, x, y, forward, backward)


def _fns(g: OnnxGraph, node: onnx.NodeProto, in_s: tuple[int, ...], v: int
         ) -> tuple[Crossing, Crossing, tuple[int, ...]] | str:
    """Forward, backward and the output shape of ``node`` for the concrete input shape ``in_s``."""
    name, op = _label(node), node.op_type
    total = math.prod(in_s)
    inferred = concrete_shape(g, node.output[0], v, total=total if op in ("Identity", "Dropout", *_RESHAPES)
                              else None)

    def with_out(fns: tuple[Crossing, Crossing] | str, out_s: tuple[int, ...] | None
                 ) -> tuple[Crossing, Crossing, tuple[int, ...]] | str:
        if isinstance(fns, str):
            return fns
        if out_s is None:
            return f"the shape after '{name}' is unknown"
        return fns[0], fns[1], out_s

    if op == "Identity":
        return with_out(same(in_s, in_s, no_check), in_s)
    if op == "Dropout":
        if len(node.input) > 2 and node.input[2] and not _false(g, node.input[2]):
            return f"dropout '{name}' runs in training mode"
        return with_out(same(in_s, in_s, no_check), in_s)
    if op in _POOLS:
        if inferred is None or len(inferred) != len(in_s):
            return f"the shape after '{name}' is unknown"
        if op == "AveragePool":
            pads = attr(node, "pads", []) or []
            if attr(node, "auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER") \
                    or int(attr(node, "ceil_mode", 0)):
                pads = [*pads, 1]  # border windows may reach past the input: padding, as far as the shift goes
            why = avg_pool_exact(pads or 0, bool(int(attr(node, "count_include_pad", 0))), None)
            if why:
                return why
            return with_out(same(in_s, inferred, spatial_axis_guard(no_check)), inferred)
        if op in ("MaxPool", "GlobalMaxPool"):
            return with_out(same(in_s, inferred, spatial_axis_guard(positive_scale)), inferred)
        return with_out(same(in_s, inferred, spatial_axis_guard(no_check)), inferred)
    if op == "Relu":
        return with_out(same(in_s, in_s, positive_scale_no_shift), in_s)
    if op == "Flatten":
        k = int(attr(node, "axis", 1))
        k = k + len(in_s) if k < 0 else k
        out_s = (math.prod(in_s[:k]), math.prod(in_s[k:]))
        return with_out(index_transfer(in_s, out_s, lambda t: t.reshape(out_s)), out_s)
    if op in _RESHAPES:
        out_s = _reshape_target(g, node, in_s) if op == "Reshape" else None
        out_s = out_s or inferred
        if out_s is None or math.prod(out_s) != total:
            return f"the shape after '{name}' is unknown"
        target = out_s
        return with_out(index_transfer(in_s, target, lambda t: t.reshape(target)), target)
    if op == "Transpose":
        perm = [int(p) for p in (attr(node, "perm", None) or range(len(in_s))[::-1])]
        if sorted(perm) != list(range(len(in_s))):
            return f"'{name}' (Transpose) has an unexpected permutation"
        out_s = tuple(in_s[p] for p in perm)
        return with_out(index_transfer(in_s, out_s, lambda t: t.permute(perm)), out_s)
    if op in ("Slice", "Gather"):
        fn = _slice(g, node, in_s) if op == "Slice" else _gather(g, node, in_s)
        if isinstance(fn, str):
            return fn
        out_s = tuple(fn(torch.zeros(in_s, dtype=torch.int8)).shape)
        return with_out(index_transfer(in_s, out_s, fn), out_s)
    return f"'{name}' ({op}) does not commute with a per-channel affine"


def _false(g: OnnxGraph, value: str) -> bool:
    c = g.constant(value)
    return c is not None and not bool(np.asarray(c).any())


def _ints(g: OnnxGraph, node: onnx.NodeProto, index: int) -> list[int] | str | None:
    """Input ``index`` of ``node`` as constant ints, None when absent, or why it is not constant."""
    if index >= len(node.input) or not node.input[index]:
        return None
    c = g.constant(node.input[index])
    if c is None:
        return f"'{_label(node)}' selects by values computed at run time"
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
           ) -> Callable[[torch.Tensor], torch.Tensor] | str:
    if g.opset() < 10:
        starts, ends, axes = attr(node, "starts", []), attr(node, "ends", []), attr(node, "axes", None)
        steps: list[int] | str | None = None
    else:
        starts, ends, axes, steps = (_ints(g, node, k) for k in (1, 2, 3, 4))
    for v in (starts, ends, axes, steps):
        if isinstance(v, str):
            return v
    assert isinstance(starts, list) and isinstance(ends, list)
    r = len(in_s)
    axes_l = [int(a) % r for a in (axes if isinstance(axes, list) else range(len(starts)))]
    steps_l = steps if isinstance(steps, list) else [1] * len(starts)
    if 0 in steps_l or not len(starts) == len(ends) == len(axes_l) == len(steps_l):
        return f"'{_label(node)}' is not a slice bnfold can replay"
    picks = [(ax, _slice_index(in_s[ax], s, e, st)) for ax, s, e, st in zip(axes_l, starts, ends, steps_l,
                                                                          strict=True)]

    def fn(t: torch.Tensor) -> torch.Tensor:
        for ax, idx in picks:
            t = t.index_select(ax, idx)
        return t

    return fn


def _gather(g: OnnxGraph, node: onnx.NodeProto, in_s: tuple[int, ...]
            ) -> Callable[[torch.Tensor], torch.Tensor] | str:
    if len(node.input) < 2 or g.constant(node.input[1]) is None:
        return f"'{_label(node)}' selects by values computed at run time"
    c = g.constant(node.input[1])
    assert c is not None
    ax = int(attr(node, "axis", 0)) % len(in_s)
    idx = torch.from_numpy(np.asarray(c).astype(np.int64))
    idx = torch.where(idx < 0, idx + in_s[ax], idx)
    if bool(((idx < 0) | (idx >= in_s[ax])).any()):
        return f"'{_label(node)}' gathers an index out of range"
    r = idx.dim()

    def fn(t: torch.Tensor) -> torch.Tensor:
        picked = t.movedim(ax, 0)[idx]  # idx.shape + (the other axes)
        order = list(range(r, r + ax)) + list(range(r)) + list(range(r + ax, picked.dim()))
        return picked.permute(order)

    return fn


def _concat_shapes(g: OnnxGraph, node: onnx.NodeProto, rank: int) -> tuple[int, list[tuple[int, ...]]] | str:
    """The concat axis and the input shapes (symbols set to ``SYMBOL_SIZES[0]``) of the Concat ``node``."""
    name = _label(node)
    dim = int(attr(node, "axis", 0)) % rank
    shapes = []
    for i in node.input:
        s, s3 = (concrete_shape(g, i, v) for v in SYMBOL_SIZES)
        if s is None or s3 is None or len(s) != rank or s[dim] != s3[dim]:
            return f"'{name}' concatenates along an axis or of shapes known only at run time"
        shapes.append(s)
    return dim, shapes


def concat_forward_onnx(g: OnnxGraph, node: onnx.NodeProto, source: str, aff: Affine) -> Affine | str:
    """``aff`` on the input ``source`` of the Concat ``node``, moved to its output
    (:func:`~bnfold.passes.commute.concat_forward`)."""
    if int(attr(node, "axis", 0)) % len(aff.shape) != aff.axis:
        return concat_forward(_label(node), [], [], int(attr(node, "axis", 0)) % len(aff.shape), aff, aff.shape)
    found = _concat_shapes(g, node, len(aff.shape))
    if isinstance(found, str):
        return found
    dim, shapes = found
    out = list(shapes[0])
    out[dim] = sum(s[dim] for s in shapes)
    return concat_forward(_label(node), [s[dim] for s in shapes], [i == source for i in node.input], dim, aff,
                          tuple(out))


def concat_backward(g: OnnxGraph, node: onnx.NodeProto, aff: Affine) -> list[Affine] | str:
    """``aff`` on the output of the Concat ``node`` as one affine per input
    (:func:`~bnfold.passes.commute.concat_split`)."""
    found = _concat_shapes(g, node, len(aff.shape))
    if isinstance(found, str):
        return found
    dim, shapes = found
    return concat_split(aff, dim, shapes)
