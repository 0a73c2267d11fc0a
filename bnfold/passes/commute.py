"""Which ops a per-channel affine ``A(x) = a ⊙ x + b`` commutes with, and how its axis moves through them.

For a unary op ``P`` we need ``P(A(x)) = A'(P(x))`` (push forward) or ``A(P(x)) = P(A'(x))`` (pull back).
Three families, each exact:

* value-preserving ops (identity, clone, dropout in eval, interpolation whose weights sum to 1 — nearest,
  (bi/tri)linear, bicubic —, adaptive average pooling, average pooling that never averages padding zeros):
  ``A' = A`` on the same axis, because every output is a weighted average (Σw = 1) of inputs of one channel:
  ``Σ w·(a x + b) = a Σ w x + b``;
* order-preserving ops (max pooling, ReLU): ``max(a x + b) = a max(x) + b`` only when ``a > 0``; ReLU also needs
  ``b = 0`` (``relu(a x) = a relu(x)`` for ``a > 0``, but ``relu(x + b) ≠ relu(x) + b``);
* data movement (reshape/view/flatten/(un)squeeze, permute/transpose): the affine is carried by an *index map*:
  we move a tensor of per-element coefficients through the op and read off the one axis it varies along.
  One mechanism covers every such op (``flatten`` turns a C-channel affine into a C·H·W-feature one).
* ``mean`` over axes other than the channel axis: ``mean(a x + b) = a mean(x) + b``; the axis index shifts
  when reduced dims before it are dropped.
* selection (``x[:, 0]``, ``x[..., 2:5]``, ``select``/``slice``/``narrow``): forward, the coefficients are
  selected with the data; backward, elements the selection drops never reach the output, so their coefficients
  are free and are chosen to keep the affine per-channel (``A(x[i]) = (A'(x))[i]`` with ``A'`` = ``A`` on the kept
  elements).
* constant padding with value ``v``: ``pad(a x + b, v) = a pad(x, v) + b`` exactly when ``a·v + b = v`` in every
  channel (for zero padding: no shift); reflect/replicate/circular padding copies values and always commutes.

An op's other arguments may be nodes as long as they are not tensors read for their values (sizes from
``x.shape``, the shape argument of ``reshape_as``/``view_as``): the transfer reads shapes from node metadata.

**One table for every back end.** The families above are :class:`Commutes`; :data:`CROSSINGS` says, once, how an
affine crosses an op of each family (the algebra). A back end only says which family an op is and reads the facts
the family needs (shapes, the index map of a data move, the reduced axes, a guard such as "no padding averaged")
into a :class:`Facts`: torch.fx ops in :data:`FX_FUNCTIONS` / :data:`FX_MODULES` here, ONNX ops in
:data:`bnfold.passes.onnx.moves.ONNX_OPS`. Every crossing returns the moved affine or a
:class:`~bnfold.ir.reasons.Fail`.
"""

from __future__ import annotations

import enum
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from bnfold.ir.graph import fetch_attr, node_dtype, node_shape, normalized_kwargs
from bnfold.ir.reasons import Fail
from bnfold.ir.uses import nodes_in, reads_values

__all__ = ["CAT", "CROSSINGS", "FX_FUNCTIONS", "FX_MODULES", "Affine", "AxisMap", "Check", "Commutes", "Crossing",
           "Facts", "NotInTable", "Transfer", "avg_pool_exact", "cat_forward", "concat_forward", "concat_split",
           "crossings", "index_transfer", "no_check", "permute_axes", "positive_scale", "positive_scale_no_shift",
           "reshape_axes", "same", "spatial_axis_guard", "transfer_for"]

aten = torch.ops.aten
f64 = torch.float64


@dataclass(frozen=True)
class Affine:
    """``a ⊙ x + b`` along ``axis`` of a tensor of shape ``shape`` (a, b float64 vectors)."""

    a: torch.Tensor
    b: torch.Tensor
    axis: int
    shape: tuple[int, ...]

    def full(self, v: torch.Tensor) -> torch.Tensor:
        view = [1] * len(self.shape)
        view[self.axis] = v.numel()
        return v.reshape(view).expand(self.shape)


Crossing = Callable[[Affine], "Affine | Fail"]
"""One direction of a transfer: the affine on the other side of an op, or why it does not cross it."""

@dataclass(frozen=True)
class NotInTable(Fail):
    """The op belongs to no family of :data:`CROSSINGS`: no per-channel affine crosses it (as opposed to one that
    would, but not this affine, or not with these shapes)."""


Check = Callable[[Affine], "Fail | None"]
"""A guard on the affine itself (``a > 0``, the channel axis not pooled): why it cannot cross, or None."""


@dataclass(frozen=True)
class Transfer:
    """How an affine crosses ``node`` (its single tensor input ``x``)."""

    node: torch.fx.Node
    x: torch.fx.Node
    forward: Crossing
    backward: Crossing


def same(in_shape: tuple[int, ...], out_shape: tuple[int, ...], check: Check) -> tuple[Crossing, Crossing]:
    """``A' = A`` on the same axis, when ``check`` lets the affine through."""
    def fwd(aff: Affine) -> Affine | Fail:
        why = check(aff)
        return why if why else Affine(aff.a, aff.b, aff.axis, out_shape)

    def bwd(aff: Affine) -> Affine | Fail:
        why = check(aff)
        return why if why else Affine(aff.a, aff.b, aff.axis, in_shape)

    return fwd, bwd


def no_check(_: Affine) -> Fail | None:
    return None


def positive_scale(aff: Affine) -> Fail | None:
    return None if bool((aff.a > 0).all()) else Fail("its scale is not positive in every channel")


def positive_scale_no_shift(aff: Affine) -> Fail | None:
    if not bool((aff.a > 0).all()):
        return Fail("ReLU commutes only with a positive scale, and this scale has non-positive channels")
    return None if bool((aff.b == 0).all()) else Fail("ReLU does not commute with a shift (relu(x + b) ≠ relu(x) + b)")


def spatial_axis_guard(check: Check) -> Check:
    """Pools/interpolation act on dims ≥ 2; the affine must be on the channel axis 1."""
    def guarded(aff: Affine) -> Fail | None:
        if aff.axis != 1:
            return Fail("it acts on a pooled/resampled axis")
        return check(aff)
    return guarded


AxisMap = Callable[[int], "int | None"]
"""Where an axis of one side of a data movement lands on the other side, as one whole axis (None: it does not)."""


def index_transfer(in_shape: tuple[int, ...], out_shape: tuple[int, ...], move: Callable[[torch.Tensor], torch.Tensor],
                   axes: tuple[AxisMap, AxisMap] | None = None
                   ) -> tuple[Crossing, Crossing]:
    """Data movement: carry coefficients through ``move`` (forward) or its inverse permutation (backward).

    ``axes`` (forward, backward), for a bijection that keeps axes whole (a permutation, a reshape that leaves the
    channel axis in place): the affine's axis is mapped directly (:func:`_on_axis`), with the result the index map
    gives, without moving a coefficient per element; an axis it does not map takes the index map."""
    n = 1
    for d in in_shape:
        n *= d

    def fwd(aff: Affine) -> Affine | Fail:
        axis = axes[0](aff.axis) if axes is not None and 0 not in in_shape and out_shape else None
        if axis is not None:
            return _on_axis(aff.a, aff.b, axis, out_shape)
        a_out, b_out = move(aff.full(aff.a)), move(aff.full(aff.b))
        return _read_per_channel(a_out, b_out, "after")

    def bwd(aff: Affine) -> Affine | Fail:
        axis = axes[1](aff.axis) if axes is not None and 0 not in in_shape and in_shape else None
        if axis is not None:
            return _on_axis(aff.a, aff.b, axis, in_shape)
        where = move(torch.arange(n).reshape(in_shape)).reshape(-1)
        if where.unique().numel() != where.numel():
            return Fail("the op reads some element twice")
        a_in = torch.full((n,), math.nan, dtype=f64)  # NaN: an element the op drops (its coefficient is free)
        b_in = torch.full((n,), math.nan, dtype=f64)
        a_in[where] = aff.full(aff.a).reshape(-1)
        b_in[where] = aff.full(aff.b).reshape(-1)
        return _read_per_channel(a_in.reshape(in_shape), b_in.reshape(in_shape), "before")

    return fwd, bwd


def _on_axis(a: torch.Tensor, b: torch.Tensor, axis: int, shape: tuple[int, ...]) -> Affine:
    """The affine :func:`_read_per_channel` reads from coefficients ``a``, ``b`` laid along ``axis`` of ``shape``:
    on that axis — or, when they are the same in every channel (so they vary along no axis), on the axis it
    prefers, as one value repeated."""
    if bool((a == a[0]).all()) and bool((b == b[0]).all()):
        candidates = [k for k in range(len(shape)) if shape[k] > 1] or list(range(len(shape)))
        axis = min(candidates, key=lambda k: (k == 0, k))
        return Affine(a.new_full((shape[axis],), float(a[0])), b.new_full((shape[axis],), float(b[0])), axis,
                      shape)
    return Affine(torch.nan_to_num(a, nan=1.0), torch.nan_to_num(b, nan=0.0), axis, shape)


def reshape_axes(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[AxisMap, AxisMap]:
    """The axis maps of a reshape between these shapes: axis ``c`` lands on axis ``c'`` when it is whole there —
    the same size, and the same number of elements before it."""
    def mapping(src: tuple[int, ...], dst: tuple[int, ...]) -> AxisMap:
        def to(c: int) -> int | None:
            before = math.prod(src[:c])
            for k, size in enumerate(dst):
                if size == src[c] and math.prod(dst[:k]) == before:
                    return k
            return None
        return to
    return mapping(in_shape, out_shape), mapping(out_shape, in_shape)


def permute_axes(in_shape: tuple[int, ...], move: Callable[[torch.Tensor], torch.Tensor]
                 ) -> tuple[AxisMap, AxisMap] | None:
    """The axis maps of ``move``, a permutation of axes (read from the strides it gives a meta tensor whose strides
    are all different), or None when it is not one."""
    strides = tuple(range(1, len(in_shape) + 1))
    try:
        out = move(torch.empty_strided(in_shape, strides, device="meta"))
        perm = [strides.index(st) for st in out.stride()]
    except Exception:
        return None
    if sorted(perm) != list(range(len(in_shape))) or tuple(out.shape) != tuple(in_shape[p] for p in perm):
        return None
    return perm.index, perm.__getitem__


def _read_per_channel(a_full: torch.Tensor, b_full: torch.Tensor, side: str) -> Affine | Fail:
    """The per-channel affine whose full coefficient tensors are ``a_full``/``b_full`` (NaN = free: an element
    the op dropped; a channel left entirely free gets the identity ``a = 1, b = 0``)."""
    shape = tuple(a_full.shape)
    if a_full.dim() == 0:
        return Fail(f"{side} this op the tensor has no channel axis")
    axis = _varying_axis(a_full, b_full)
    if axis is None:
        return Fail(f"{side} this reshape the coefficients no longer vary along a single axis")
    a = _read_per_channel_line(a_full, axis)
    b = _read_per_channel_line(b_full, axis)
    assert a is not None and b is not None
    return Affine(torch.nan_to_num(a, nan=1.0), torch.nan_to_num(b, nan=0.0), axis, shape)


def _read_per_channel_line(t: torch.Tensor, k: int) -> torch.Tensor | None:
    """The per-index value of ``t`` along axis ``k`` if ``t`` varies only along ``k`` (NaN entries are free and
    match anything; an index whose entries are all free gets the identity value of ``t``'s kind later), or None."""
    moved = t.movedim(k, 0).reshape(t.shape[k], -1)
    known = ~torch.isnan(moved)
    first = known.to(torch.int8).argmax(1)  # the first known entry of each line (0 when none is known)
    value = moved[torch.arange(moved.shape[0]), first]  # NaN exactly when the line has no known entry
    if not bool(torch.where(known, moved == value[:, None], torch.ones_like(known)).all()):
        return None
    return value


def _varying_axis(a_full: torch.Tensor, b_full: torch.Tensor) -> int | None:
    shape = tuple(a_full.shape)
    candidates = [k for k in range(len(shape)) if shape[k] > 1] or list(range(len(shape)))
    for k in sorted(candidates, key=lambda k: (k == 0, k)):  # prefer non-batch axes
        if all(_read_per_channel_line(t, k) is not None for t in (a_full, b_full)):
            return k
    return None


def _mean_transfer(in_shape: tuple[int, ...], out_shape: tuple[int, ...], dims: tuple[int, ...], keepdim: bool
                   ) -> tuple[Crossing, Crossing]:
    rank = len(in_shape)
    reduced = sorted(d % rank for d in dims)

    def fwd(aff: Affine) -> Affine | Fail:
        if aff.axis in reduced:
            return Fail("the mean reduces its channel axis")
        axis = aff.axis if keepdim else aff.axis - sum(d < aff.axis for d in reduced)
        return Affine(aff.a, aff.b, axis, out_shape)

    def bwd(aff: Affine) -> Affine | Fail:
        kept = [d for d in range(rank) if d not in reduced]
        axis = aff.axis if keepdim else kept[aff.axis]
        if axis in reduced:
            return Fail("the mean reduces its channel axis")
        return Affine(aff.a, aff.b, axis, in_shape)

    return fwd, bwd


# -- the table: how an affine crosses each family of ops -----------------------------------------------------------

class Commutes(enum.Enum):
    """The families of ops a per-channel affine crosses exactly (module docstring)."""

    VALUE = "value"      # identity, clone, dropout in eval, a cast between floats
    SPATIAL = "spatial"  # pools and interpolation averaging within a channel (Σw = 1), along dims ≥ 2
    MAX = "max"          # max pools: order-preserving
    RELU = "relu"        # relu
    INDEX = "index"      # data movement: reshape, flatten, permute, select, slice, gather
    MEAN = "mean"        # a mean over other axes
    PAD = "pad"          # padding


@dataclass(frozen=True)
class Facts:
    """What a back end read from one op for its family ``how``: the shapes of its data input and output and, by
    family, the index map of a data move (``move``), the reduced axes (``dims``, ``keepdim``) or a guard on the
    affine (``check``: a padding value it must map to itself)."""

    how: Commutes
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    move: Callable[[torch.Tensor], torch.Tensor] | None = None
    axes: tuple[AxisMap, AxisMap] | None = None  # a move that keeps axes whole: where each lands (index_transfer)
    dims: tuple[int, ...] = ()
    keepdim: bool = False
    check: Check = no_check


def _moved(f: Facts) -> tuple[Crossing, Crossing]:
    assert f.move is not None, "an INDEX op needs its index map"
    return index_transfer(f.in_shape, f.out_shape, f.move, f.axes)


CROSSINGS: dict[Commutes, Callable[[Facts], tuple[Crossing, Crossing]]] = {
    Commutes.VALUE: lambda f: same(f.in_shape, f.out_shape, no_check),                      # A' = A
    Commutes.SPATIAL: lambda f: same(f.in_shape, f.out_shape, spatial_axis_guard(no_check)),  # Σw(a x + b) = a Σw x + b
    Commutes.MAX: lambda f: same(f.in_shape, f.out_shape, spatial_axis_guard(positive_scale)),  # max(ax+b), a > 0
    Commutes.RELU: lambda f: same(f.in_shape, f.out_shape, positive_scale_no_shift),         # relu(a x) = a relu(x)
    Commutes.INDEX: _moved,                                              # coefficients move with the data
    Commutes.MEAN: lambda f: _mean_transfer(f.in_shape, f.out_shape, f.dims, f.keepdim),     # mean(ax+b) = a mean x + b
    Commutes.PAD: lambda f: same(f.in_shape, f.out_shape, f.check),                          # pad(ax+b, v), a v + b = v
}
"""How an affine crosses an op of each family, forward and backward — the one table every back end reads."""


def crossings(facts: Facts) -> tuple[Crossing, Crossing]:
    """Forward and backward crossings of an op described by ``facts`` (:data:`CROSSINGS`)."""
    return CROSSINGS[facts.how](facts)


# -- torch.fx ops: which family, and the facts -----------------------------------------------------------------------

_VALUE_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                  nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Upsample,
                  nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
_AVG_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_MAX_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                nn.AdaptiveMaxPool3d)
_VALUE_FUNCS: set[Any] = {
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.interpolate, torch.clone,
    aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default,
    aten._adaptive_avg_pool2d.default, aten._adaptive_avg_pool3d.default,
    aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec, aten.upsample_nearest3d.vec,
    aten.upsample_bilinear2d.vec, aten.upsample_linear1d.vec, aten.upsample_trilinear3d.vec,
    aten.upsample_bicubic2d.vec, aten.clone.default, aten.contiguous.default, aten.alias.default,
    "contiguous", "clone",
}
_AVG_FUNCS: set[Any] = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, aten.avg_pool1d.default, aten.avg_pool2d.default,
                        aten.avg_pool3d.default}
_MAX_FUNCS: set[Any] = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                        F.adaptive_max_pool3d, aten.max_pool1d.default, aten.max_pool2d.default,
                        aten.max_pool3d.default, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d}
_RELU_FUNCS: set[Any] = {F.relu, torch.relu, aten.relu.default, "relu"}
_CASTS: set[Any] = {"to", "type_as", "type", "float", "double", "half", "bfloat16", aten._to_copy.default,
                    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default}
"""Casts (``(x * w).type_as(x)``, Gemma's RMSNorm): the identity on values between floating dtypes of the same
width; between floating dtypes of other widths a fold moves the affine to the other side of the rounding, which
the parity rule of the wider dtype judges like any fold into a narrower layer."""
_DROPOUT_FUNCS: set[Any] = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, aten.dropout.default, torch.dropout}
_RESHAPE: set[Any] = {
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, aten.view.default, aten.reshape.default,
    aten._unsafe_view.default, aten.flatten.using_ints, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.unsqueeze.default, aten.unflatten.int, "view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten",
    aten.reshape_as.default, aten.view_as.default, "reshape_as", "view_as",
}
_SELECT: set[Any] = {operator.getitem, aten.select.int, aten.slice.Tensor, aten.narrow.default, torch.select,
                     torch.narrow, "select", "narrow"}
_PERMUTE: set[Any] = {torch.permute, torch.transpose, torch.t, aten.permute.default, aten.transpose.int,
                      aten.t.default, "permute", "transpose", "t"}
_MEAN: set[Any] = {torch.mean, aten.mean.dim, "mean"}
_CONSTANT_PAD: set[Any] = {F.pad, aten.pad.default, aten.constant_pad_nd.default}
_PAD: set[Any] = {F.pad, aten.pad.default, aten.constant_pad_nd.default, aten.reflection_pad1d.default,
                  aten.reflection_pad2d.default, aten.reflection_pad3d.default, aten.replication_pad1d.default,
                  aten.replication_pad2d.default, aten.replication_pad3d.default, aten._pad_circular.default}


def _copy_pad_check(gm: torch.fx.GraphModule, node: torch.fx.Node, rank: int) -> Check:
    """Reflect/replicate/circular padding copies values of the same channel: it commutes with the affine,
    as long as the channel axis itself is not padded. Constant padding does not (the pad value is fixed)."""
    mode = _arg(node, gm, "mode", "constant") if node.target in _CONSTANT_PAD else "copy"
    pad = _arg(node, gm, "pad", None) or _arg(node, gm, "padding", None) or (node.args[1] if len(node.args) > 1 else ())
    first_padded = rank - len(pad) // 2
    value = float(_arg(node, gm, "value", 0.0) or 0.0) if mode == "constant" else None

    def check(aff: Affine) -> Fail | None:
        if aff.axis >= first_padded:
            return Fail("its channel axis is padded")
        if value is not None and not bool((aff.a * value + aff.b == value).all()):
            return Fail(f"'{node.name}' pads with the constant {value:g}, which the affine would have to map to "
                        "itself (zero padding: only a pure scale crosses it; the shift stays)")
        return None

    return check


def avg_pool_exact(padding: Any, count_include_pad: bool, divisor_override: Any) -> Fail | None:
    """None when an average pool averages real values only (its divisor counts what it sums), else why not."""
    if divisor_override:
        return Fail("the average pool uses divisor_override, so a constant shift is rescaled")
    pads = padding if isinstance(padding, (tuple, list)) else [padding]
    if any(int(p) != 0 for p in pads) and count_include_pad:
        return Fail("the average pool averages zero padding (count_include_pad=True), so the shift changes at borders")
    return None


def _replay(node: torch.fx.Node) -> Callable[[torch.Tensor], torch.Tensor]:
    """``node``'s op applied to another tensor with the same other arguments."""
    target, args, kwargs = node.target, node.args[1:], dict(node.kwargs)
    if isinstance(target, str):
        return lambda t: getattr(t, str(target))(*args, **kwargs)
    return lambda t: target(t, *args, **kwargs)  # type: ignore[operator]


def _select_move(node: torch.fx.Node, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
                 ) -> Callable[[torch.Tensor], torch.Tensor] | Fail:
    """``x[index]`` / ``select`` / ``slice`` / ``narrow`` with constant arguments: an index map."""
    if nodes_in(node.args[1:]) or nodes_in(dict(node.kwargs)):
        return Fail(f"'{node.name}' selects by values computed at run time")
    fn = _replay(node)
    try:
        probe = fn(torch.zeros(in_shape, dtype=torch.int8))
    except Exception:
        return Fail(f"'{node.name}' is not a selection bnfold can replay")
    if tuple(probe.shape) != out_shape:
        return Fail(f"'{node.name}' selects a shape its metadata does not record")
    return fn


def _float_cast(node: torch.fx.Node) -> Fail | None:
    """None when ``node`` casts a floating tensor to a floating dtype (or only moves it), else why not."""
    x = node.args[0] if node.args else None
    src, dst = node_dtype(x), node_dtype(node)
    if src is None or dst is None:
        return Fail(f"'{node.name}' casts between dtypes that are not known (shapes not propagated)")
    if not (src.is_floating_point and dst.is_floating_point):
        return Fail(f"'{node.name}' casts {src} to {dst}: an affine does not commute with a cast to or from integers")
    return None


def _arg(node: torch.fx.Node, gm: torch.fx.GraphModule, name: str, default: Any) -> Any:
    kwargs = normalized_kwargs(gm, node)
    return (node.kwargs if kwargs is None else kwargs).get(name, default)


def _is_tensor(node: torch.fx.Node) -> bool:
    """Whether ``node`` computes a tensor (unknown counts as yes: the conservative answer)."""
    if "val" not in node.meta:
        return True
    val = node.meta["val"]
    if isinstance(val, (tuple, list)):
        return any(isinstance(v, torch.Tensor) for v in val)
    return isinstance(val, torch.Tensor)


def _first_tensor(node: torch.fx.Node) -> torch.fx.Node | None:
    """The one tensor whose values ``node`` reads (sizes and shape-only arguments aside), or None."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(x, torch.fx.Node):
        return None
    other = [a for a in node.all_input_nodes if a is not x and _is_tensor(a) and reads_values(node, a)]
    return None if other else x


CAT: set[Any] = {torch.cat, torch.concat, aten.cat.default, aten.concat.default}


def cat_forward(cat: torch.fx.Node, source: torch.fx.Node, aff: Affine) -> Affine | Fail:
    """Push ``aff`` (applied to ``source``) forward through the concat ``cat`` (:func:`concat_forward`)."""
    tensors = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    out_shape = node_shape(cat)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or out_shape is None:
        return Fail(f"'{cat.name}' concatenates along an axis or of shapes known only at run time")
    shapes = [node_shape(t) if isinstance(t, torch.fx.Node) else None for t in tensors]
    if any(s is None for s in shapes):
        return Fail(f"'{cat.name}' has an input of unknown shape")
    return concat_forward(cat.name, [s[dim % len(out_shape)] for s in shapes if s is not None],
                          [t is source for t in tensors], dim % len(out_shape), aff, out_shape)


def concat_forward(name: str, sizes: list[int], is_source: list[bool], dim: int, aff: Affine,
                   out_shape: tuple[int, ...]) -> Affine | Fail:
    """``aff`` (on the inputs marked ``is_source``, ``sizes[k]`` long along the concat axis ``dim``) moved past the
    concat ``name``: ``cat(A(x₁), x₂) = A'(cat(x₁, x₂))`` with ``a' = [a, 1]``, ``b' = [b, 0]`` (identity on the
    other parts)."""
    if dim != aff.axis:
        return Fail(f"'{name}' concatenates along another axis than the affine's (the other inputs would need it "
                    "too)")
    a_parts, b_parts = [], []
    for n, mine in zip(sizes, is_source, strict=True):
        a_parts.append(aff.a if mine else torch.ones(n, dtype=f64))
        b_parts.append(aff.b if mine else torch.zeros(n, dtype=f64))
    return Affine(torch.cat(a_parts), torch.cat(b_parts), aff.axis, out_shape)


def concat_split(aff: Affine, dim: int, shapes: list[tuple[int, ...]]) -> list[Affine]:
    """``aff`` on ``cat(u₁…uₙ, dim)`` as one affine per input (``shapes``): ``A(cat(u₁…uₙ)) = cat(A₁(u₁)…Aₙ(uₙ))``,
    ``(a, b)`` split along the concat axis, or the whole ``(a, b)`` for each input when it concatenates along
    another axis."""
    parts, offset = [], 0
    for shape in shapes:
        if dim == aff.axis:
            n = shape[dim]
            parts.append(Affine(aff.a[offset:offset + n], aff.b[offset:offset + n], aff.axis, shape))
            offset += n
        else:
            parts.append(Affine(aff.a, aff.b, aff.axis, shape))
    return parts


FxReader = Callable[[torch.fx.GraphModule, torch.fx.Node, tuple[int, ...], tuple[int, ...]], "Facts | Fail"]
"""Reads the :class:`Facts` of one torch.fx op (its input and output shapes given), or why it does not commute."""


def _unknown(node: torch.fx.Node) -> Fail:
    name = getattr(node.target, "__name__", str(node.target))
    return NotInTable(f"'{node.name}' ({name}) does not commute with a per-channel affine", node.name)


def _fx_as(how: Commutes, *, same_rank: bool = False) -> FxReader:
    """An op whose family is all there is to know (``same_rank``: only when it keeps the rank)."""
    def read(gm: torch.fx.GraphModule, node: torch.fx.Node, i: tuple[int, ...], o: tuple[int, ...]) -> Facts | Fail:
        return _unknown(node) if same_rank and len(i) != len(o) else Facts(how, i, o)
    return read


def _fx_dropout(gm: torch.fx.GraphModule, node: torch.fx.Node, i: tuple[int, ...], o: tuple[int, ...]
                ) -> Facts | Fail:
    if _arg(node, gm, "training", _arg(node, gm, "train", True)):
        return Fail(f"dropout '{node.name}' runs in training mode")
    return Facts(Commutes.VALUE, i, o)


def _fx_cast(gm: torch.fx.GraphModule, node: torch.fx.Node, i: tuple[int, ...], o: tuple[int, ...]) -> Facts | Fail:
    return _float_cast(node) or Facts(Commutes.VALUE, i, o)


def _fx_avg(gm: torch.fx.GraphModule, node: torch.fx.Node, i: tuple[int, ...], o: tuple[int, ...]) -> Facts | Fail:
    if len(i) != len(o):
        return _unknown(node)
    return avg_pool_exact(_arg(node, gm, "padding", 0), bool(_arg(node, gm, "count_include_pad", True)),
                          _arg(node, gm, "divisor_override", None)) or Facts(Commutes.SPATIAL, i, o)


def _fx_reshape(gm: torch.fx.GraphModule, node: torch.fx.Node, i: tuple[int, ...], o: tuple[int, ...]
                ) -> Facts | Fail:
    return Facts(Commutes.INDEX, i, o, move=lambda t: t.reshape(o), axes=reshape_axes(i, o))


def _fx_select(gm: torch.fx.GraphModule, node: torch.fx.Node, i: tuple[int, ...], o: tuple[int, ...]
               ) -> Facts | Fail:
    move = _select_move(node, i, o)
    return move if isinstance(move, Fail) else Facts(Commutes.INDEX, i, o, move=move)


def _fx_permute(gm: torch.fx.GraphModule, node: torch.fx.Node, i: tuple[int, ...], o: tuple[int, ...]
                ) -> Facts | Fail:
    if any(isinstance(a, torch.fx.Node) for a in node.args[1:]):
        return Fail(f"'{node.name}' permutes by values computed at run time")
    move = _replay(node)
    return Facts(Commutes.INDEX, i, o, move=move, axes=permute_axes(i, move))


def _fx_pad(gm: torch.fx.GraphModule, node: torch.fx.Node, i: tuple[int, ...], o: tuple[int, ...]) -> Facts | Fail:
    if len(i) != len(o):
        return _unknown(node)
    return Facts(Commutes.PAD, i, o, check=_copy_pad_check(gm, node, len(i)))


def _fx_mean(gm: torch.fx.GraphModule, node: torch.fx.Node, i: tuple[int, ...], o: tuple[int, ...]) -> Facts | Fail:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    if dims is None or any(isinstance(d, torch.fx.Node) for d in ([dims] if isinstance(dims, int) else dims)):
        return Fail(f"'{node.name}' reduces over all axes")
    return Facts(Commutes.MEAN, i, o, dims=(dims,) if isinstance(dims, int) else tuple(dims), keepdim=keepdim)


_CLONES: set[Any] = {"contiguous", "clone", torch.clone, aten.clone.default, aten.contiguous.default,
                     aten.alias.default}

FX_FUNCTIONS: dict[Any, FxReader] = {
    **{t: _fx_dropout for t in _DROPOUT_FUNCS},
    **{t: _fx_cast for t in _CASTS},
    **{t: _fx_as(Commutes.VALUE if t in _CLONES else Commutes.SPATIAL, same_rank=True) for t in _VALUE_FUNCS},
    **{t: _fx_avg for t in _AVG_FUNCS},
    **{t: _fx_as(Commutes.MAX, same_rank=True) for t in _MAX_FUNCS},
    **{t: _fx_as(Commutes.RELU) for t in _RELU_FUNCS},
    **{t: _fx_reshape for t in _RESHAPE},
    **{t: _fx_select for t in _SELECT},
    **{t: _fx_permute for t in _PERMUTE},
    **{t: _fx_pad for t in _PAD},
    **{t: _fx_mean for t in _MEAN},
}
"""torch functions, aten overloads and tensor methods → how to read their :class:`Facts`."""

ModuleReader = Callable[[nn.Module, torch.fx.Node, tuple[int, ...], tuple[int, ...]], "Facts | Fail"]


def _module_dropout(m: nn.Module, node: torch.fx.Node, i: tuple[int, ...], o: tuple[int, ...]) -> Facts | Fail:
    if m.training and not isinstance(m, nn.Identity):
        return Fail(f"dropout '{node.name}' is in training mode")
    return Facts(Commutes.VALUE, i, o)


def _module_as(how: Commutes, *, same_rank: bool = True) -> ModuleReader:
    def read(m: nn.Module, node: torch.fx.Node, i: tuple[int, ...], o: tuple[int, ...]) -> Facts | Fail:
        return _unknown_module(node, m) if same_rank and len(i) != len(o) else Facts(how, i, o)
    return read


def _module_avg(m: nn.Module, node: torch.fx.Node, i: tuple[int, ...], o: tuple[int, ...]) -> Facts | Fail:
    if len(i) != len(o):
        return _unknown_module(node, m)
    return avg_pool_exact(m.padding, m.count_include_pad, getattr(m, "divisor_override", None)) \
        or Facts(Commutes.SPATIAL, i, o)


def _module_flatten(m: nn.Module, node: torch.fx.Node, i: tuple[int, ...], o: tuple[int, ...]) -> Facts | Fail:
    return Facts(Commutes.INDEX, i, o, move=lambda t: t.reshape(o), axes=reshape_axes(i, o))


def _unknown_module(node: torch.fx.Node, m: nn.Module) -> Fail:
    return NotInTable(f"'{node.name}' ({type(m).__name__}) does not commute with a per-channel affine", node.name)


FX_MODULES: tuple[tuple[tuple[type[nn.Module], ...], ModuleReader], ...] = (
    ((nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout), _module_dropout),
    (_VALUE_MODULES, _module_as(Commutes.SPATIAL)),
    (_AVG_MODULES, _module_avg),
    (_MAX_MODULES, _module_as(Commutes.MAX)),
    ((nn.ReLU,), _module_as(Commutes.RELU, same_rank=False)),
    ((nn.Flatten, nn.Unflatten), _module_flatten),
)
"""torch.nn module types (subclasses included, first match wins) → how to read their :class:`Facts`."""


def transfer_for(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Transfer | Fail:
    """The :class:`Transfer` of ``node``, or a reason why an affine cannot cross it."""
    x = _first_tensor(node)
    in_shape, out_shape = node_shape(x), node_shape(node)
    if x is None or in_shape is None or out_shape is None:
        return Fail(f"'{node.name}' is not a single-input tensor op with known shapes")
    facts = _fx_facts(gm, node, in_shape, out_shape)
    if isinstance(facts, Fail):
        return facts
    fwd, bwd = crossings(facts)
    return Transfer(node, x, fwd, bwd)


def _fx_facts(gm: torch.fx.GraphModule, node: torch.fx.Node, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
              ) -> Facts | Fail:
    if node.op == "call_module":
        m = fetch_attr(gm, str(node.target))
        read = next((r for types, r in FX_MODULES if isinstance(m, types)), None)
        return _unknown_module(node, m) if read is None else read(m, node, in_shape, out_shape)
    if node.op not in ("call_function", "call_method"):
        return Fail(f"'{node.name}' is not an op")
    fn = FX_FUNCTIONS.get(node.target)
    return _unknown(node) if fn is None else fn(gm, node, in_shape, out_shape)
