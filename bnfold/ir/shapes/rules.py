"""The rules of :mod:`bnfold.ir.shapes`: an op's output metadata from its inputs', for the ops where that is a short
formula. Each rule takes ``(mode, *args, **kwargs)`` — the op's arguments, tensors as fake values — and returns the
output's value (fake tensors, numbers) or None to decline (the op's fake kernel decides then). A rule answers only
in the case it is sure of: floating-point inputs of one dtype and device, layouts whose output strides it knows,
sizes that pass the op's own checks. ``tests/ir/test_shapes.py`` holds every rule to ``FakeTensorProp``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from bnfold.ir.shapes.layout import channels_last_like, channels_last_strides, dense, fake, is_fake, view_strides

__all__ = ["FUNCTION_RULES", "METADATA_METHODS", "METHOD_RULES", "PURE_PYTHON", "Rule", "module_rule"]

Rule = Callable[..., Any]
"""``rule(mode, *args, **kwargs) -> value`` on the inputs' values (fake tensors, Python values); ``None``: declined
(the fake kernel decides)."""


def _dense_like(mode: FakeTensorMode, x: FakeTensor, shape: Sequence[int] | None = None,
                dtype: torch.dtype | None = None) -> FakeTensor | None:
    """The output of an op that keeps its input's layout (an elementwise op, a normalization): the input's own
    fake value when it is dense (a permutation of a contiguous layout) — the same metadata —, a contiguous one
    for a new ``shape`` or ``dtype`` of a contiguous input; None otherwise."""
    if (shape is None or tuple(shape) == tuple(x.shape)) and (dtype is None or dtype == x.dtype):
        return x if x.is_contiguous() or dense(x.shape, x.stride()) else None
    return fake(mode, x.shape if shape is None else shape, dtype or x.dtype, x.device) if x.is_contiguous() \
        else None


def _float(*xs: Any) -> bool:
    """A floating-point fake tensor (a graph value) and tensors (fake, or a module's own parameters) of its dtype
    and device."""
    first = xs[0]
    if not is_fake(first) or not first.is_floating_point():
        return False
    return all(isinstance(x, torch.Tensor) and x.dtype == first.dtype and x.device == first.device for x in xs[1:])


def _dim(d: int, rank: int) -> int | None:
    """``d`` as a non-negative axis of a rank-``rank`` tensor, or None when out of range."""
    if not isinstance(d, int) or isinstance(d, bool):
        return None
    if -max(rank, 1) <= d < max(rank, 1):
        return d % max(rank, 1)
    return None


def _ints(values: Any) -> tuple[int, ...] | None:
    """A shape argument (``view(2, -1)``, ``view((2, -1))``, ``view(torch.Size(...))``) as ints, or None."""
    if len(values) == 1 and isinstance(values[0], (tuple, list)):
        values = values[0]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return tuple(values)
    return None


def _broadcast(x: Sequence[int], y: Sequence[int]) -> tuple[int, ...] | None:
    """The broadcast of two shapes (``torch.broadcast_shapes``), or None when they do not broadcast."""
    if len(x) < len(y):
        x, y = y, x
    out = list(x)
    for i in range(1, len(y) + 1):
        a, b = x[-i], y[-i]
        if a != b:
            if a != 1 and b != 1:
                return None
            out[-i] = b if a == 1 else a
    return tuple(out)


def _infer_shape(shape: tuple[int, ...], numel: int) -> tuple[int, ...] | None:
    """``shape`` with its one ``-1`` resolved for ``numel`` elements; None when invalid."""
    if shape.count(-1) > 1 or any(s < -1 for s in shape):
        return None
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if known == 0 or numel % known:
            return None
        shape = tuple(numel // known if s == -1 else s for s in shape)
    return shape if math.prod(shape) == numel else None


# -- rules: elementwise, normalizations ------------------------------------------------------------------------------

def _same(mode: FakeTensorMode, x: Any, *args: Any, **kwargs: Any) -> Any:
    """Elementwise on one tensor (activations, dropout, identity, softmax without a dtype): the input's metadata."""
    if any(isinstance(a, torch.dtype) for a in (*args, *kwargs.values())) or not _float(x):
        return None
    return _dense_like(mode, x)


def _binary(mode: FakeTensorMode, a: Any, b: Any, *rest: Any, **kwargs: Any) -> Any:
    """``a ∘ b`` for +, -, *, /: two tensors of one floating dtype (broadcast; contiguous) or a floating tensor and a
    Python number (the tensor's metadata); Python numbers alone: the value itself."""
    if rest or kwargs:
        return None
    if not is_fake(a) and not is_fake(b):
        return None  # numbers: computed for real by the caller (pure Python)
    if is_fake(a) and is_fake(b):
        if not _float(a, b):
            return None
        shape = _broadcast(a.shape, b.shape)
        if shape is None:
            return None
        if a.is_contiguous() and b.is_contiguous():
            return fake(mode, shape, a.dtype, a.device)
        # TensorIterator lays the output out in the axis order of its first operand, where that decides (a
        # broadcast axis does not): a dense full-size first operand, or a dense full-size second one after a
        # contiguous broadcast first one
        for full, other in ((a, b), (b, a)):
            if tuple(full.shape) == shape and dense(full.shape, full.stride()) and \
                    (full is a or (other.is_contiguous() and tuple(other.shape) != shape)):
                return fake(mode, shape, a.dtype, a.device, full.stride())
        return None
    x, s = (a, b) if is_fake(a) else (b, a)
    if type(s) not in (int, float) or not _float(x):
        return None
    return _dense_like(mode, x)


def _norm_input(x: Any, *params: Any) -> bool:
    """A normalization's input and parameters: floating, one dtype and device (parameters may be absent)."""
    return _float(x, *(p for p in params if p is not None))


def _batch_norm_fn(mode: FakeTensorMode, x: Any, running_mean: Any = None, running_var: Any = None,
                   weight: Any = None, bias: Any = None, *rest: Any, **kwargs: Any) -> Any:
    """``F.batch_norm`` / ``torch.batch_norm``: the input's metadata (channels = the statistics' length)."""
    running_mean = kwargs.get("running_mean", running_mean)
    running_var = kwargs.get("running_var", running_var)
    weight, bias = kwargs.get("weight", weight), kwargs.get("bias", bias)
    if not _norm_input(x, running_mean, running_var, weight, bias) or x.dim() < 2:
        return None
    channels = x.shape[1]
    if any(p is not None and tuple(p.shape) != (channels,) for p in (running_mean, running_var, weight, bias)):
        return None
    return _dense_like(mode, x)


def _layer_norm_fn(mode: FakeTensorMode, x: Any, normalized_shape: Any, weight: Any = None, bias: Any = None,
                   *rest: Any, **kwargs: Any) -> Any:
    weight, bias = kwargs.get("weight", weight), kwargs.get("bias", bias)
    return _layer_norm(mode, x, normalized_shape, weight, bias)


def _rms_norm_fn(mode: FakeTensorMode, x: Any, normalized_shape: Any, weight: Any = None, *rest: Any,
                 **kwargs: Any) -> Any:
    return _layer_norm(mode, x, normalized_shape, kwargs.get("weight", weight), None)


def _layer_norm(mode: FakeTensorMode, x: Any, normalized_shape: Any, weight: Any, bias: Any) -> Any:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else _ints(tuple(normalized_shape))
    if shape is None or not _norm_input(x, weight, bias) or x.dim() < len(shape) or \
            tuple(x.shape[x.dim() - len(shape):]) != shape:
        return None
    if any(p is not None and tuple(p.shape) != shape for p in (weight, bias)):
        return None
    return fake(mode, x.shape, x.dtype, x.device)  # contiguous whatever the input's layout (its meta kernel)


def _group_norm_fn(mode: FakeTensorMode, x: Any, num_groups: int, weight: Any = None, bias: Any = None,
                   *rest: Any, **kwargs: Any) -> Any:
    weight, bias = kwargs.get("weight", weight), kwargs.get("bias", bias)
    if not _norm_input(x, weight, bias) or x.dim() < 2 or not isinstance(num_groups, int) or num_groups <= 0 or \
            x.shape[1] % num_groups:
        return None
    if any(p is not None and tuple(p.shape) != (x.shape[1],) for p in (weight, bias)) or not x.is_contiguous():
        return None
    return fake(mode, x.shape, x.dtype, x.device)


# -- rules: convolutions, linear, pools ------------------------------------------------------------------------------

def _tuple(v: Any, n: int) -> tuple[int, ...] | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,) * n
    if isinstance(v, (tuple, list)) and len(v) == n and all(isinstance(i, int) for i in v):
        return tuple(v)
    if isinstance(v, (tuple, list)) and len(v) == 1 and isinstance(v[0], int):
        return (v[0],) * n
    return None


def _conv(mode: FakeTensorMode, x: Any, weight: Any, bias: Any, stride: Any, padding: Any, dilation: Any,
          groups: Any) -> Any:
    """``conv{1,2,3}d``: ``(N, C_out, ⌊(L + 2p − d(k−1) − 1)/s⌋ + 1 …)`` for a contiguous weight: channels-last when
    the input's strides suggest it (on the CPU), else contiguous."""
    if not _float(x, weight) or (bias is not None and not _float(x, bias)) or not isinstance(groups, int):
        return None
    n = weight.dim() - 2
    if n < 1 or x.dim() not in (n + 1, n + 2) or not weight.is_contiguous() or \
            (not x.is_contiguous() and x.device.type != "cpu"):
        return None
    batched = x.dim() == n + 2
    channels, spatial = x.shape[-n - 1], tuple(x.shape[-n:])
    if groups <= 0 or weight.shape[1] * groups != channels or weight.shape[0] % groups:
        return None
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        return None
    s, d = _tuple(stride, n), _tuple(dilation, n)
    if s is None or d is None or min(s) < 1 or min(d) < 1:
        return None
    kernel = tuple(weight.shape[2:])
    if padding == "valid":
        p: tuple[int, ...] | None = (0,) * n
    elif padding == "same":
        if s != (1,) * n:
            return None
        out: tuple[int, ...] | None = spatial
        p = None
    else:
        p = _tuple(padding, n)
        if p is None or min(p) < 0:
            return None
    if p is not None:
        out = tuple((spatial[i] + 2 * p[i] - d[i] * (kernel[i] - 1) - 1) // s[i] + 1 for i in range(n))
    assert out is not None
    if min(out) < 1 or min(spatial) < 1:
        return None
    shape = ((x.shape[0],) if batched else ()) + (weight.shape[0],) + out
    if not x.is_contiguous() and channels_last_like(x):  # on the CPU the input's layout decides
        return fake(mode, shape, x.dtype, x.device, channels_last_strides(shape))
    return fake(mode, shape, x.dtype, x.device)


def _conv_fn(mode: FakeTensorMode, x: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
             dilation: Any = 1, groups: Any = 1) -> Any:
    """``torch.conv{1,2,3}d`` / ``F.conv{1,2,3}d`` (positional or keyword arguments)."""
    return _conv(mode, x, weight, bias, stride, padding, dilation, groups)


def _linear_fn(mode: FakeTensorMode, x: Any, weight: Any, bias: Any = None) -> Any:
    """``F.linear``: ``(…, out)``, contiguous, for a dense ``(…, in)`` input."""
    if not _float(x, weight) or weight.dim() != 2 or x.dim() < 1 or \
            not (x.is_contiguous() or dense(x.shape, x.stride())):
        return None
    if x.shape[-1] != weight.shape[1] or (bias is not None and (not _float(x, bias) or
                                                                 tuple(bias.shape) != (weight.shape[0],))):
        return None
    return fake(mode, (*x.shape[:-1], weight.shape[0]), x.dtype, x.device)


def _pool_size(size: int, kernel: int, pad: int, stride: int, dilation: int, ceil_mode: bool) -> int | None:
    """torch's ``pooling_output_shape``: the number of windows, with the ceil-mode rule that the last window must
    start inside the input or its left padding."""
    if stride < 1 or kernel < 1 or dilation < 1 or pad < 0 or pad > (dilation * (kernel - 1) + 1) // 2:
        return None
    out = (size + 2 * pad - dilation * (kernel - 1) - 1 + ((stride - 1) if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out if out >= 1 else None


def _pool(mode: FakeTensorMode, x: Any, n: int, kernel: Any, stride: Any, padding: Any, dilation: Any,
          ceil_mode: Any) -> Any:
    if not _float(x) or x.dim() not in (n + 1, n + 2) or not x.is_contiguous() or not isinstance(ceil_mode, bool):
        return None
    k = _tuple(kernel, n)
    s = k if stride is None or stride == [] or stride == () else _tuple(stride, n)
    p, d = _tuple(padding, n), _tuple(dilation, n)
    if k is None or s is None or p is None or d is None:
        return None
    spatial = tuple(x.shape[-n:])
    out = [_pool_size(spatial[i], k[i], p[i], s[i], d[i], ceil_mode) for i in range(n)]
    if any(o is None for o in out):
        return None
    return fake(mode, (*x.shape[:-n], *out), x.dtype, x.device)  # type: ignore[arg-type]


def _adaptive_pool(mode: FakeTensorMode, x: Any, n: int, output_size: Any) -> Any:
    if not _float(x) or x.dim() not in (n + 1, n + 2) or not x.is_contiguous():
        return None
    sizes = (output_size,) * n if isinstance(output_size, int) or output_size is None else tuple(output_size)
    if len(sizes) != n:
        return None
    spatial = tuple(x.shape[-n:])
    out = tuple(spatial[i] if sizes[i] is None else sizes[i] for i in range(n))
    if not all(isinstance(o, int) and o >= 0 for o in out) or min(spatial) < 1:
        return None
    return fake(mode, (*x.shape[:-n], *out), x.dtype, x.device)


def _adaptive_avg_pool_fn(n: int) -> Rule:
    def rule(mode: FakeTensorMode, x: Any, output_size: Any) -> Any:
        return _adaptive_pool(mode, x, n, output_size)
    return rule


def _avg_pool_fn(n: int) -> Rule:
    def rule(mode: FakeTensorMode, x: Any, kernel_size: Any, stride: Any = None, padding: Any = 0,
             ceil_mode: Any = False, count_include_pad: Any = True, divisor_override: Any = None) -> Any:
        return _pool(mode, x, n, kernel_size, stride, padding, 1, ceil_mode)
    return rule


# -- rules: shapes and views -----------------------------------------------------------------------------------------

def _target_shape(x: Any, shape: tuple[Any, ...]) -> tuple[int, ...] | None:
    """The shape a ``view``/``reshape`` of the fake ``x`` to ``shape`` gives (``-1`` resolved), or None."""
    ints = _ints(shape)
    if not is_fake(x) or ints is None:
        return None
    return _infer_shape(ints, x.numel())


def _view(mode: FakeTensorMode, x: Any, *shape: Any) -> Any:
    """``view`` / ``reshape``: ``-1`` resolved; the strides of the view, or (``reshape`` of a tensor no view can
    express, :func:`_reshape`) of a contiguous copy."""
    out = _target_shape(x, shape)
    if out is None:
        return None
    if x.is_contiguous():
        return fake(mode, out, x.dtype, x.device)
    strides = view_strides(x.shape, x.stride(), out)
    return None if strides is None else fake(mode, out, x.dtype, x.device, strides)


def _reshape(mode: FakeTensorMode, x: Any, *shape: Any) -> Any:
    out = _target_shape(x, shape)
    if out is None:
        return None
    strides = None if x.is_contiguous() else view_strides(x.shape, x.stride(), out)
    if strides is None and not x.is_contiguous() and x.numel() == 0:
        return None
    return fake(mode, out, x.dtype, x.device, strides)


def _view_as(mode: FakeTensorMode, x: Any, other: Any) -> Any:
    return _view(mode, x, tuple(other.shape)) if is_fake(other) else None


def _reshape_as(mode: FakeTensorMode, x: Any, other: Any) -> Any:
    return _reshape(mode, x, tuple(other.shape)) if is_fake(other) else None


def _flatten(mode: FakeTensorMode, x: Any, start_dim: int = 0, end_dim: int = -1) -> Any:
    """``flatten``: the input itself when nothing merges, else a ``reshape``."""
    if not is_fake(x):
        return None
    if x.dim() == 0:
        return fake(mode, (1,), x.dtype, x.device)
    s, e = _dim(start_dim, x.dim()), _dim(end_dim, x.dim())
    if s is None or e is None or s > e:
        return None
    if s == e:
        return fake(mode, x.shape, x.dtype, x.device, x.stride())
    return _reshape(mode, x, (*x.shape[:s], math.prod(x.shape[s:e + 1]), *x.shape[e + 1:]))


def _permute(mode: FakeTensorMode, x: Any, *dims: Any) -> Any:
    """A view with the axes reordered: shape and strides permuted (any input layout)."""
    order = _ints(dims)
    if not is_fake(x) or order is None or len(order) != x.dim():
        return None
    axes = [_dim(d, x.dim()) for d in order]
    if any(a is None for a in axes) or len(set(axes)) != len(axes):
        return None
    shape, stride = x.shape, x.stride()
    return fake(mode, [shape[a] for a in axes], x.dtype, x.device, [stride[a] for a in axes])  # type: ignore[index]


def _transpose(mode: FakeTensorMode, x: Any, dim0: int, dim1: int) -> Any:
    if not is_fake(x) or x.dim() == 0:
        return None
    a, b = _dim(dim0, x.dim()), _dim(dim1, x.dim())
    if a is None or b is None:
        return None
    order = list(range(x.dim()))
    order[a], order[b] = order[b], order[a]
    return _permute(mode, x, *order)


def _contiguous(mode: FakeTensorMode, x: Any, memory_format: Any = torch.contiguous_format) -> Any:
    if not is_fake(x) or memory_format is not torch.contiguous_format:
        return None
    return fake(mode, x.shape, x.dtype, x.device)


def _unsqueeze(mode: FakeTensorMode, x: Any, dim: int) -> Any:
    if not is_fake(x) or not x.is_contiguous():
        return None
    d = _dim(dim, x.dim() + 1)
    return None if d is None else fake(mode, (*x.shape[:d], 1, *x.shape[d:]), x.dtype, x.device)


def _reduce(mode: FakeTensorMode, x: Any, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Any:
    """``mean`` / ``sum`` over axes of a contiguous floating tensor (no dtype change)."""
    if not _float(x) or not x.is_contiguous() or dtype is not None or not isinstance(keepdim, bool):
        return None
    if dim is None or dim == [] or dim == ():
        axes = set(range(x.dim()))
    else:
        raw = (dim,) if isinstance(dim, int) else tuple(dim)
        found = [_dim(d, x.dim()) for d in raw]
        if any(a is None for a in found) or len(set(found)) != len(found):
            return None
        axes = set(found)  # type: ignore[arg-type]
    shape = [1 if i in axes else s for i, s in enumerate(x.shape) if keepdim or i not in axes]
    return fake(mode, shape, x.dtype, x.device)


def _cat(mode: FakeTensorMode, tensors: Any, dim: int = 0) -> Any:
    """Concatenation of tensors of one dtype, rank and size off ``dim``, none of them channels-last: contiguous."""
    if not isinstance(tensors, (list, tuple)) or not tensors or not _float(*tensors) or \
            not all(is_fake(t) for t in tensors):
        return None
    first = tensors[0]
    d = _dim(dim, first.dim())
    if d is None or not all(t.dim() == first.dim() and (t.is_contiguous() or not channels_last_like(t))
                            for t in tensors):
        return None
    if any(t.shape[:d] != first.shape[:d] or t.shape[d + 1:] != first.shape[d + 1:] for t in tensors):
        return None
    size = sum(t.shape[d] for t in tensors)
    return fake(mode, (*first.shape[:d], size, *first.shape[d + 1:]), first.dtype, first.device)


def _pieces(mode: FakeTensorMode, x: Any, sizes: list[int], d: int) -> tuple[FakeTensor, ...]:
    """Views of ``x`` along axis ``d`` of these lengths (strides of ``x``)."""
    stride = x.stride()
    return tuple(fake(mode, (*x.shape[:d], n, *x.shape[d + 1:]), x.dtype, x.device, stride) for n in sizes)


def _split(mode: FakeTensorMode, x: Any, split_size: Any, dim: int = 0) -> Any:
    if not is_fake(x) or x.dim() == 0:
        return None
    d = _dim(dim, x.dim())
    if d is None or x.shape[d] == 0:
        return None
    length = x.shape[d]
    if isinstance(split_size, int) and not isinstance(split_size, bool):
        if split_size <= 0:
            return None
        sizes = [min(split_size, length - i) for i in range(0, length, split_size)]
    elif isinstance(split_size, (list, tuple)) and all(isinstance(s, int) and s >= 0 for s in split_size):
        if sum(split_size) != length:
            return None
        sizes = list(split_size)
    else:
        return None
    return _pieces(mode, x, sizes, d)


def _chunk(mode: FakeTensorMode, x: Any, chunks: int, dim: int = 0) -> Any:
    if not is_fake(x) or x.dim() == 0 or not isinstance(chunks, int) or chunks <= 0:
        return None
    d = _dim(dim, x.dim())
    if d is None or x.shape[d] == 0:
        return None
    return _split(mode, x, -(-x.shape[d] // chunks), d)


def _unbind(mode: FakeTensorMode, x: Any, dim: int = 0) -> Any:
    if not is_fake(x) or x.dim() == 0:
        return None
    d = _dim(dim, x.dim())
    if d is None:
        return None
    shape = (*x.shape[:d], *x.shape[d + 1:])
    stride = (*x.stride()[:d], *x.stride()[d + 1:])
    return tuple(fake(mode, shape, x.dtype, x.device, stride) for _ in range(x.shape[d]))


# -- rules: metadata reads -------------------------------------------------------------------------------------------

_METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "is_sparse", "is_quantized", "layout"})
METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous",
                               "is_floating_point", "element_size", "get_device"})


def _getattr(mode: FakeTensorMode, obj: Any, name: Any, *default: Any) -> Any:
    if is_fake(obj) and name in _METADATA_ATTRS:
        return getattr(obj, name)
    return None


def _getitem(mode: FakeTensorMode, obj: Any, index: Any) -> Any:
    """An element of a tuple/list/size, or a tensor's basic indexing (:func:`_index`)."""
    if isinstance(obj, (tuple, list)) and isinstance(index, (int, slice)):
        return obj[index]
    if is_fake(obj):
        return _index(mode, obj, index)
    return None


def _index(mode: FakeTensorMode, x: FakeTensor, index: Any) -> FakeTensor | None:
    """``x[index]`` for basic indexing — ints, slices with a positive step, ``None``, ``...`` — a view: each int
    drops its axis, a slice keeps ``len(range(start, stop, step))`` elements with ``step`` times the stride,
    ``None`` inserts an axis of size 1. Tensor (advanced) indices: None."""
    items = index if isinstance(index, tuple) else (index,)
    for i in items:
        if not (i is None or i is Ellipsis or isinstance(i, slice) or (isinstance(i, int) and
                                                                       not isinstance(i, bool))):
            return None
        if isinstance(i, slice) and not all(v is None or (isinstance(v, int) and not isinstance(v, bool))
                                            for v in (i.start, i.stop, i.step)):
            return None
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    if used > x.dim() or sum(1 for i in items if i is Ellipsis) > 1:
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = (*items[:at], *(slice(None),) * (x.dim() - used), *items[at + 1:])
    else:
        items = (*items, *(slice(None),) * (x.dim() - used))
    shape: list[int] = []
    stride: list[int] = []
    d = 0
    for i in items:
        if i is None:
            shape.append(1)
            stride.append(x.stride(d) * x.shape[d] if d < x.dim() else 1)
            continue
        size = x.shape[d]
        if isinstance(i, int):
            if not -size <= i < size:
                return None
        else:
            step = 1 if i.step is None else i.step
            if step <= 0:
                return None
            start, stop, _ = i.indices(size)
            shape.append(max(0, -(-(stop - start) // step)))
            stride.append(x.stride(d) * step)
        d += 1
    return fake(mode, shape, x.dtype, x.device, stride)


def _matmul(mode: FakeTensorMode, a: Any, b: Any) -> Any:
    """``a @ b`` for a matrix (or a batch of them) times a matrix, or batches of one rank: batch axes broadcast,
    contiguous ``(…, M, N)``. A vector, or a matrix times a batch (computed transposed): the fake kernel's."""
    if not _float(a, b) or not is_fake(b) or a.dim() < 2 or not (b.dim() == 2 or a.dim() == b.dim()):
        return None
    if a.shape[-1] != b.shape[-2]:
        return None
    batch = _broadcast(a.shape[:-2], b.shape[:-2])
    if batch is None:
        return None
    return fake(mode, (*batch, a.shape[-2], b.shape[-1]), a.dtype, a.device)


# -- the tables ------------------------------------------------------------------------------------------------------

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.ReLU, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.Softmax,
)
_SAME_FORWARDS = {cls.forward for cls in _ELEMENTWISE_MODULES}


def module_rule(mode: FakeTensorMode, m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The rule for a call of a leaf module with torch's own ``forward``, or None."""
    if kwargs or not args:
        return None
    x, forward = args[0], type(m).forward
    if forward is nn.Identity.forward:  # returns its input: its metadata, whatever the layout
        return fake(mode, x.shape, x.dtype, x.device, x.stride()) if is_fake(x) else None
    if len(args) == 1 and forward in _SAME_FORWARDS:
        return _same(mode, x)
    if len(args) != 1:
        return None
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and forward in _BN_FORWARDS:
        return _batch_norm_fn(mode, x, m.running_mean, m.running_var, m.weight, m.bias) \
            if _channels(m, x) else None
    if isinstance(m, nn.modules.conv._ConvNd) and forward in _CONV_FORWARDS:
        return _conv(mode, x, m.weight, m.bias, m.stride, m.padding, m.dilation,
                     m.groups)
    if forward is nn.Linear.forward:
        return _linear_fn(mode, x, m.weight, m.bias)
    if forward is nn.LayerNorm.forward:
        return _layer_norm(mode, x, m.normalized_shape, m.weight, m.bias)  # type: ignore[arg-type]
    if forward is nn.RMSNorm.forward:
        return _layer_norm(mode, x, m.normalized_shape, m.weight, None)  # type: ignore[arg-type]
    if forward is nn.GroupNorm.forward:
        return _group_norm_fn(mode, x, m.num_groups, m.weight, m.bias)  # type: ignore[arg-type]
    if forward is nn.Flatten.forward:
        return _flatten(mode, x, m.start_dim, m.end_dim)  # type: ignore[arg-type]
    if isinstance(m, nn.modules.pooling._MaxPoolNd) and forward in _MAX_POOL_FORWARDS and not m.return_indices:
        n = _MAX_POOL_FORWARDS[forward]
        return _pool(mode, x, n, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    if forward in _AVG_POOL_FORWARDS:
        n = _AVG_POOL_FORWARDS[forward]
        return _pool(mode, x, n, m.kernel_size, m.stride, m.padding, 1, m.ceil_mode)  # type: ignore[attr-defined]
    if forward in _ADAPTIVE_AVG_FORWARDS:
        return _adaptive_pool(mode, x, _ADAPTIVE_AVG_FORWARDS[forward], m.output_size)  # type: ignore[attr-defined]
    return None


_BN_FORWARDS = {nn.modules.batchnorm._BatchNorm.forward}
_CONV_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}
_MAX_POOL_FORWARDS = {nn.MaxPool1d.forward: 1, nn.MaxPool2d.forward: 2, nn.MaxPool3d.forward: 3}
_AVG_POOL_FORWARDS = {nn.AvgPool1d.forward: 1, nn.AvgPool2d.forward: 2, nn.AvgPool3d.forward: 3}
_ADAPTIVE_AVG_FORWARDS = {nn.AdaptiveAvgPool1d.forward: 1, nn.AdaptiveAvgPool2d.forward: 2,
                          nn.AdaptiveAvgPool3d.forward: 3}


def _channels(m: nn.modules.batchnorm._BatchNorm, x: Any) -> bool:
    """The input a stock BatchNorm module accepts: its rank (``_check_input_dim``) and ``num_features`` channels."""
    ranks = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}
    allowed = next((r for cls, r in ranks.items() if isinstance(m, cls)), None)
    return is_fake(x) and allowed is not None and x.dim() in allowed and x.shape[1] == m.num_features


FUNCTION_RULES: dict[Any, Rule] = {
    **dict.fromkeys((operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                     torch.div), _binary),
    **dict.fromkeys((F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid,
                     torch.sigmoid, F.tanh, torch.tanh, F.mish, F.leaky_relu, F.elu, F.softmax, torch.softmax,
                     F.dropout, F.dropout1d, F.dropout2d, F.dropout3d), _same),
    **dict.fromkeys((F.batch_norm, torch.batch_norm), _batch_norm_fn),
    F.layer_norm: _layer_norm_fn, F.rms_norm: _rms_norm_fn, F.group_norm: _group_norm_fn,
    **dict.fromkeys((torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d), _conv_fn),
    F.linear: _linear_fn,
    F.adaptive_avg_pool1d: _adaptive_avg_pool_fn(1), F.adaptive_avg_pool2d: _adaptive_avg_pool_fn(2),
    F.adaptive_avg_pool3d: _adaptive_avg_pool_fn(3),
    F.avg_pool1d: _avg_pool_fn(1), F.avg_pool2d: _avg_pool_fn(2), F.avg_pool3d: _avg_pool_fn(3),
    torch.flatten: _flatten, torch.transpose: _transpose, torch.permute: _permute, torch.reshape: _reshape,
    torch.cat: _cat, torch.concat: _cat, torch.split: _split, torch.chunk: _chunk, torch.unbind: _unbind,
    getattr: _getattr, operator.getitem: _getitem, operator.matmul: _matmul, torch.matmul: _matmul,
}
"""``call_function`` targets with a rule (the rule gets the arguments as the function does)."""

METHOD_RULES: dict[str, Rule] = {
    "view": _view, "reshape": _reshape, "view_as": _view_as, "reshape_as": _reshape_as, "flatten": _flatten,
    "permute": _permute, "transpose": _transpose, "contiguous": _contiguous, "unsqueeze": _unsqueeze,
    "mean": _reduce, "sum": _reduce, "split": _split, "chunk": _chunk, "unbind": _unbind,
    "add": _binary, "sub": _binary, "mul": _binary, "div": _binary, "matmul": _matmul,
    **dict.fromkeys(("relu", "sigmoid", "tanh", "softmax"), _same),
}
"""``call_method`` names with a rule (the rule gets ``self`` first)."""

PURE_PYTHON = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod, operator.pow,
    operator.neg, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.and_,
    operator.or_, operator.not_, operator.getitem, getattr, math.ceil, math.floor, math.sqrt, int, float, len,
    torch._assert,
})
"""Functions computed on their Python values when no argument is a tensor (sizes, flags, assertions on them)."""
