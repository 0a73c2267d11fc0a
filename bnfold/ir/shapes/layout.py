"""Fake values and memory layouts: the metadata :mod:`bnfold.ir.shapes` records, computed from shapes and strides.

A fake tensor is built directly from its metadata (no dispatch through ``FakeTensorMode``); strides follow the
rules aten's kernels use — contiguous, channels-last (``NHWC``/``NDHWC``), a view's strides (``computeStride``),
a dense permutation — and ``TensorMetadata``'s memory format is read from them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.shape_prop import TensorMetadata

__all__ = ["channels_last_like", "channels_last_strides", "contiguous_strides", "dense", "fake", "from_real",
           "is_fake", "memory_format", "tensor_meta", "view_strides"]


def fake(mode: FakeTensorMode, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
          stride: Sequence[int] | None = None) -> FakeTensor:
    """A fake tensor of this metadata (contiguous unless ``stride``), built directly (~8 µs) rather than through
    the mode's dispatch (~50 µs)."""
    if stride is None:
        stride = contiguous_strides(shape)
    return FakeTensor(mode, torch.empty_strided(tuple(shape), tuple(stride), dtype=dtype, device="meta"), device)


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of a contiguous (row-major) tensor of ``shape``."""
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * max(shape[i + 1], 1)
    return tuple(strides)


def from_real(mode: FakeTensorMode, t: torch.Tensor) -> FakeTensor | None:
    """A fake copy of a parameter/buffer/constant's metadata (a plain dense CPU/CUDA tensor), else None."""
    if type(t) not in (torch.Tensor, nn.Parameter, nn.Buffer) or t.layout is not torch.strided or t.is_quantized:
        return None
    return fake(mode, t.shape, t.dtype, t.device, t.stride())


def is_fake(v: Any) -> bool:
    """``v`` is a fake tensor (a graph value during propagation)."""
    return isinstance(v, FakeTensor)


def dense(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Non-overlapping and dense: some order of the axes is contiguous (axes of size 1 aside)."""
    if 0 in shape:
        return False
    expected = 1
    for st, size in sorted((st, size) for size, st in zip(shape, stride, strict=True) if size != 1):
        if st != expected:
            return False
        expected *= size
    return True


def channels_last_like(x: torch.Tensor) -> bool:
    """``x.suggest_memory_format()`` is channels-last (c10's ``is_channels_last_strides_2d/3d``)."""
    order = {4: (1, 3, 2, 0), 5: (1, 4, 3, 2, 0)}.get(x.dim())
    if order is None:
        return False
    sizes, strides = x.shape, x.stride()
    if strides[1] == 0:
        return False
    low = 0
    for d in order:
        if sizes[d] == 0 or strides[d] < low or (d == 0 and low == strides[1]):
            return False
        low = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return True


def view_strides(shape: Sequence[int], stride: Sequence[int], new: Sequence[int]) -> tuple[int, ...] | None:
    """The strides of ``x.view(new)`` for ``x`` of this shape and strides, or None when no view exists (aten's
    ``computeStride``; ``reshape`` then copies)."""
    if not shape:
        return (1,) * len(new)
    if math.prod(shape) == 0:
        return None
    out = [0] * len(new)
    view_d = len(new) - 1
    base = stride[-1]
    tensor_numel = view_numel = 1
    for d in range(len(shape) - 1, -1, -1):
        tensor_numel *= shape[d]
        if d == 0 or (shape[d - 1] != 1 and stride[d - 1] != tensor_numel * base):
            while view_d >= 0 and (view_numel < tensor_numel or new[view_d] == 1):
                out[view_d] = view_numel * base
                view_numel *= new[view_d]
                view_d -= 1
            if view_numel != tensor_numel:
                return None
            if d > 0:
                base = stride[d - 1]
                tensor_numel = view_numel = 1
    return tuple(out) if view_d == -1 else None


def channels_last_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Strides of a channels-last (``NHWC`` / ``NDHWC``) tensor of this ``NC…`` shape."""
    c = shape[1]
    strides = [0] * len(shape)
    strides[1] = 1
    step = max(c, 1)
    for d in range(len(shape) - 1, 1, -1):
        strides[d] = step
        step *= max(shape[d], 1)
    strides[0] = step
    return tuple(strides)


def tensor_meta(t: torch.Tensor) -> TensorMetadata:
    """``TensorMetadata`` of a (fake) tensor, as ``torch.fx``'s ``_extract_tensor_metadata`` makes it; the memory
    format of a dense tensor from its strides (:func:`_memory_format`) rather than ``torch._prims_common``'s
    general checks."""
    if t.is_quantized or t.layout is not torch.strided:
        from torch.fx.passes.shape_prop import _extract_tensor_metadata

        return _extract_tensor_metadata(t)
    shape, stride = t.shape, t.stride()
    return TensorMetadata(shape, t.dtype, t.requires_grad, stride, memory_format(shape, stride), False, {})


def memory_format(shape: Sequence[int], stride: Sequence[int]) -> torch.memory_format | None:
    """The first of contiguous, channels-last (4-D), channels-last-3d (5-D) whose stride pattern ``stride``
    follows (axes of size 1 aside; any pattern for no elements), else None: ``is_contiguous(memory_format=…)``."""
    if 0 in shape:
        return torch.contiguous_format
    orders = [(range(len(shape) - 1, -1, -1), torch.contiguous_format)]
    if len(shape) == 4:
        orders.append(((1, 3, 2, 0), torch.channels_last))
    elif len(shape) == 5:
        orders.append(((1, 4, 3, 2, 0), torch.channels_last_3d))
    for order, fmt in orders:
        expected = 1
        for d in order:
            if shape[d] == 1:
                continue
            if stride[d] != expected:
                break
            expected *= shape[d]
        else:
            return fmt
    return None
