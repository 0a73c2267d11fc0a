"""The one internal normalization op every later pass speaks: a per-channel affine map.

``channel_affine(x, scale, shift, axis)`` computes ``y = x * scale[c] + shift[c]`` where ``c`` indexes
dimension ``axis`` of ``x``. ``scale`` and ``shift`` are 1-D float64 constants (exact values); they are cast
to ``x.dtype`` only when the node is executed, so every fold reads the exact float64 numbers.

While the passes run, ``scale`` and ``shift`` are held as tensors in the node's own arguments: no ``get_attr``
nodes and no buffers are made for an affine that will be folded away a moment later (most are). A graph whose
code is generated while channel_affines remain (the pipeline stopped early, a debugging instrument) first gets
them as ``get_attr`` constants from :func:`materialize_affines`.
"""

from __future__ import annotations

import torch
import torch.fx

from bnfold.ir.graph import add_constant

__all__ = ["channel_affine", "is_channel_affine", "materialize_affines"]


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


def materialize_affines(gm: torch.fx.GraphModule) -> int:
    """Give every channel_affine whose scale/shift are held in its arguments ``get_attr`` constants instead, so the
    graph's code can be generated. Returns how many nodes changed."""
    changed = 0
    for node in gm.graph.nodes:
        if not is_channel_affine(node):
            continue
        x, scale, shift, axis = node.args
        if not isinstance(scale, torch.Tensor) and not isinstance(shift, torch.Tensor):
            continue
        consts = [add_constant(gm, t, f"{node.name}_{what}", before=node, copy=False)
                  if isinstance(t, torch.Tensor) else t for t, what in ((scale, "scale"), (shift, "shift"))]
        node.args = (x, consts[0], consts[1], axis)
        changed += 1
    return changed
