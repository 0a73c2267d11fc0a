"""The one internal normalization op every later pass speaks: a per-channel affine map.

``channel_affine(x, scale, shift, axis)`` computes ``y = x * scale[c] + shift[c]`` where ``c`` indexes
dimension ``axis`` of ``x``. ``scale`` and ``shift`` are 1-D float64 constants (exact values); they are cast
to ``x.dtype`` only when the node is executed, so every fold reads the exact float64 numbers.
"""

from __future__ import annotations

import torch
import torch.fx

__all__ = ["channel_affine", "is_channel_affine"]


def _broadcast_shape(ndim: int, axis: int, channels: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = channels
    return shape


@torch.fx.wrap
def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, axis: int) -> torch.Tensor:
    """Return ``x * scale + shift`` with ``scale``/``shift`` broadcast along ``axis`` (float64 cast to x.dtype)."""
    shape = _broadcast_shape(x.dim(), axis, scale.numel())
    s = scale.to(dtype=x.dtype, device=x.device).reshape(shape)
    t = shift.to(dtype=x.dtype, device=x.device).reshape(shape)
    return torch.addcmul(t, x, s)


def is_channel_affine(node: torch.fx.Node) -> bool:
    """True when ``node`` is a :func:`channel_affine` call."""
    return node.op == "call_function" and node.target is channel_affine
