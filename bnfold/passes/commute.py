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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from bnfold.ir.graph import fetch_attr, node_shape, normalized_kwargs

__all__ = ["Affine", "Transfer", "transfer_for"]

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


@dataclass(frozen=True)
class Transfer:
    """How an affine crosses ``node`` (its single tensor input ``x``)."""

    node: torch.fx.Node
    x: torch.fx.Node
    forward: Callable[[Affine], Affine | str]
    backward: Callable[[Affine], Affine | str]


def _same(in_shape: tuple[int, ...], out_shape: tuple[int, ...], check: Callable[[Affine], str | None]
          ) -> tuple[Callable[[Affine], Affine | str], Callable[[Affine], Affine | str]]:
    def fwd(aff: Affine) -> Affine | str:
        why = check(aff)
        return why if why else Affine(aff.a, aff.b, aff.axis, out_shape)

    def bwd(aff: Affine) -> Affine | str:
        why = check(aff)
        return why if why else Affine(aff.a, aff.b, aff.axis, in_shape)

    return fwd, bwd


def _no_check(_: Affine) -> str | None:
    return None


def _positive_scale(aff: Affine) -> str | None:
    return None if bool((aff.a > 0).all()) else "its scale is not positive in every channel"


def _positive_scale_no_shift(aff: Affine) -> str | None:
    if not bool((aff.a > 0).all()):
        return "ReLU commutes only with a positive scale, and this scale has non-positive channels"
    return None if bool((aff.b == 0).all()) else "ReLU does not commute with a shift (relu(x + b) ≠ relu(x) + b)"


def _spatial_axis_guard(check: Callable[[Affine], str | None]) -> Callable[[Affine], str | None]:
    """Pools/interpolation act on dims ≥ 2; the affine must be on the channel axis 1."""
    def guarded(aff: Affine) -> str | None:
        if aff.axis != 1:
            return "it acts on a pooled/resampled axis"
        return check(aff)
    return guarded


def _index_transfer(in_shape: tuple[int, ...], out_shape: tuple[int, ...], move: Callable[[torch.Tensor], torch.Tensor]
                    ) -> tuple[Callable[[Affine], Affine | str], Callable[[Affine], Affine | str]]:
    """Data movement: carry coefficients through ``move`` (forward) or its inverse permutation (backward)."""
    n = 1
    for d in in_shape:
        n *= d

    def fwd(aff: Affine) -> Affine | str:
        a_out, b_out = move(aff.full(aff.a)), move(aff.full(aff.b))
        return _read_per_channel(a_out, b_out, "after")

    def bwd(aff: Affine) -> Affine | str:
        where = move(torch.arange(n).reshape(in_shape)).reshape(-1)
        if where.numel() != n:
            return "the reshape does not move every element exactly once"
        a_in = torch.empty(n, dtype=f64)
        b_in = torch.empty(n, dtype=f64)
        a_in[where] = aff.full(aff.a).reshape(-1)
        b_in[where] = aff.full(aff.b).reshape(-1)
        return _read_per_channel(a_in.reshape(in_shape), b_in.reshape(in_shape), "before")

    return fwd, bwd


def _read_per_channel(a_full: torch.Tensor, b_full: torch.Tensor, side: str) -> Affine | str:
    shape = tuple(a_full.shape)
    axis = _varying_axis(a_full, b_full)
    if axis is None:
        return f"{side} this reshape the coefficients no longer vary along a single axis"
    index = [0] * len(shape)
    index[axis] = slice(None)  # type: ignore[call-overload]
    return Affine(a_full[tuple(index)].clone(), b_full[tuple(index)].clone(), axis, shape)


def _varying_axis(a_full: torch.Tensor, b_full: torch.Tensor) -> int | None:
    shape = tuple(a_full.shape)
    candidates = [k for k in range(len(shape)) if shape[k] > 1]
    for k in sorted(candidates, key=lambda k: (k == 0, k)):  # prefer non-batch axes
        idx = [0] * len(shape)
        idx[k] = slice(None)  # type: ignore[call-overload]
        ok = True
        for t in (a_full, b_full):
            line = t[tuple(idx)]
            view = [1] * len(shape)
            view[k] = shape[k]
            if not torch.equal(t, line.reshape(view).expand(shape)):
                ok = False
                break
        if ok:
            return k
    return None


def _mean_transfer(in_shape: tuple[int, ...], out_shape: tuple[int, ...], dims: list[int], keepdim: bool
                   ) -> tuple[Callable[[Affine], Affine | str], Callable[[Affine], Affine | str]]:
    rank = len(in_shape)
    dims = sorted(d % rank for d in dims)

    def fwd(aff: Affine) -> Affine | str:
        if aff.axis in dims:
            return "the mean reduces its channel axis"
        axis = aff.axis if keepdim else aff.axis - sum(d < aff.axis for d in dims)
        return Affine(aff.a, aff.b, axis, out_shape)

    def bwd(aff: Affine) -> Affine | str:
        kept = [d for d in range(rank) if d not in dims]
        axis = aff.axis if keepdim else kept[aff.axis]
        if axis in dims:
            return "the mean reduces its channel axis"
        return Affine(aff.a, aff.b, axis, in_shape)

    return fwd, bwd


# -- op tables -------------------------------------------------------------------------------------------------

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
_DROPOUT_FUNCS: set[Any] = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, aten.dropout.default, torch.dropout}
_RESHAPE: set[Any] = {
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, aten.view.default, aten.reshape.default,
    aten._unsafe_view.default, aten.flatten.using_ints, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.unsqueeze.default, aten.unflatten.int, "view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten",
}
_PERMUTE: set[Any] = {torch.permute, torch.transpose, torch.t, aten.permute.default, aten.transpose.int,
                      aten.t.default, "permute", "transpose", "t"}
_MEAN: set[Any] = {torch.mean, aten.mean.dim, "mean"}
_PAD: set[Any] = {F.pad, aten.pad.default, aten.reflection_pad1d.default, aten.reflection_pad2d.default,
                  aten.reflection_pad3d.default, aten.replication_pad1d.default, aten.replication_pad2d.default,
                  aten.replication_pad3d.default, aten._pad_circular.default}


def _copy_pad_check(gm: torch.fx.GraphModule, node: torch.fx.Node, rank: int) -> Callable[[Affine], str | None] | str:
    """Reflect/replicate/circular padding copies values of the same channel: it commutes with the affine,
    as long as the channel axis itself is not padded. Constant padding does not (the pad value is fixed)."""
    mode = _arg(node, gm, "mode", "constant") if node.target in (F.pad, aten.pad.default) else "copy"
    if mode == "constant":
        return f"'{node.name}' pads with a constant, which a shift would not reach"
    pad = _arg(node, gm, "pad", None) or _arg(node, gm, "padding", None) or (node.args[1] if len(node.args) > 1 else ())
    first_padded = rank - len(pad) // 2

    def check(aff: Affine) -> str | None:
        return "its channel axis is padded" if aff.axis >= first_padded else None

    return check


def _avg_pool_exact(padding: Any, count_include_pad: bool, divisor_override: Any) -> str | None:
    if divisor_override:
        return "the average pool uses divisor_override, so a constant shift is rescaled"
    pads = padding if isinstance(padding, (tuple, list)) else [padding]
    if any(int(p) != 0 for p in pads) and count_include_pad:
        return "the average pool averages zero padding (count_include_pad=True), so the shift changes at borders"
    return None


def _arg(node: torch.fx.Node, gm: torch.fx.GraphModule, name: str, default: Any) -> Any:
    kwargs = normalized_kwargs(gm, node)
    return (node.kwargs if kwargs is None else kwargs).get(name, default)


def _first_tensor(node: torch.fx.Node) -> torch.fx.Node | None:
    x = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(x, torch.fx.Node):
        return None
    other = [a for a in node.all_input_nodes if a is not x]
    return None if other else x


def transfer_for(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Transfer | str:
    """The :class:`Transfer` of ``node``, or a reason why an affine cannot cross it."""
    x = _first_tensor(node)
    in_shape, out_shape = node_shape(x), node_shape(node)
    if x is None or in_shape is None or out_shape is None:
        return f"'{node.name}' is not a single-input tensor op with known shapes"
    fns = _classify(gm, node, in_shape, out_shape)
    if isinstance(fns, str):
        return fns
    return Transfer(node, x, fns[0], fns[1])


def _classify(gm: torch.fx.GraphModule, node: torch.fx.Node, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
              ) -> tuple[Callable[[Affine], Affine | str], Callable[[Affine], Affine | str]] | str:
    same_rank = len(in_shape) == len(out_shape)
    target = node.target
    if node.op == "call_module":
        m = fetch_attr(gm, str(target))
        if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)):
            if m.training and not isinstance(m, nn.Identity):
                return f"dropout '{node.name}' is in training mode"
            return _same(in_shape, out_shape, _no_check)
        if isinstance(m, _VALUE_MODULES) and same_rank:
            return _same(in_shape, out_shape, _spatial_axis_guard(_no_check))
        if isinstance(m, _AVG_MODULES) and same_rank:
            why = _avg_pool_exact(m.padding, m.count_include_pad, getattr(m, "divisor_override", None))
            return why or _same(in_shape, out_shape, _spatial_axis_guard(_no_check))
        if isinstance(m, _MAX_MODULES) and same_rank:
            return _same(in_shape, out_shape, _spatial_axis_guard(_positive_scale))
        if isinstance(m, nn.ReLU):
            return _same(in_shape, out_shape, _positive_scale_no_shift)
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return _index_transfer(in_shape, out_shape, lambda t: t.reshape(out_shape))
        return f"'{node.name}' ({type(m).__name__}) does not commute with a per-channel affine"
    if node.op not in ("call_function", "call_method"):
        return f"'{node.name}' is not an op"
    if target in _DROPOUT_FUNCS:
        training = _arg(node, gm, "training", _arg(node, gm, "train", True))
        if training:
            return f"dropout '{node.name}' runs in training mode"
        return _same(in_shape, out_shape, _no_check)
    if target in _VALUE_FUNCS and same_rank:
        check = _no_check if target in ("contiguous", "clone", torch.clone, aten.clone.default,
                                        aten.contiguous.default, aten.alias.default) else _spatial_axis_guard(_no_check)
        return _same(in_shape, out_shape, check)
    if target in _AVG_FUNCS and same_rank:
        why = _avg_pool_exact(_arg(node, gm, "padding", 0), bool(_arg(node, gm, "count_include_pad", True)),
                              _arg(node, gm, "divisor_override", None))
        return why or _same(in_shape, out_shape, _spatial_axis_guard(_no_check))
    if target in _MAX_FUNCS and same_rank:
        return _same(in_shape, out_shape, _spatial_axis_guard(_positive_scale))
    if target in _RELU_FUNCS:
        return _same(in_shape, out_shape, _positive_scale_no_shift)
    if target in _RESHAPE:
        return _index_transfer(in_shape, out_shape, lambda t: t.reshape(out_shape))
    if target in _PERMUTE:
        if any(isinstance(a, torch.fx.Node) for a in node.args[1:]):
            return f"'{node.name}' permutes by values computed at run time"
        args, kwargs = node.args[1:], dict(node.kwargs)
        fn = (lambda t: getattr(t, str(target))(*args, **kwargs)) if isinstance(target, str) else \
            (lambda t: target(t, *args, **kwargs))  # type: ignore[operator]
        return _index_transfer(in_shape, out_shape, fn)
    if target in _PAD and same_rank:
        check = _copy_pad_check(gm, node, len(in_shape))
        return check if isinstance(check, str) else _same(in_shape, out_shape, check)
    if target in _MEAN:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        if dims is None or any(isinstance(d, torch.fx.Node) for d in ([dims] if isinstance(dims, int) else dims)):
            return f"'{node.name}' reduces over all axes"
        return _mean_transfer(in_shape, out_shape, [dims] if isinstance(dims, int) else list(dims), keepdim)
    name = getattr(target, "__name__", str(target))
    return f"'{node.name}' ({name}) does not commute with a per-channel affine"

