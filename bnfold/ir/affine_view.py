"""Read any per-channel affine node as ``y = a ⊙ x + b`` along one axis, without rewriting it.

Recognised (``c``, ``s``, ``t`` constant tensors broadcast along exactly one axis of ``x`` without
expanding it)::

    channel_affine(x, a, b, axis)       → (a, b)
    x * c, c * x                        → (c, 0)
    x + c, c + x                        → (1, c)
    x − c                               → (1, −c)
    c − x                               → (−1, c)
    x / c                               → (1/c, 0)
    addcmul(t, x, s)                    → (s, t)     (the form leftover affines are lowered to)

Because fold rules work on this *view*, a plain ``x + bias`` that cannot be folded is simply left as it
was, and a traced frozen BatchNorm (``x * scale + shift``) folds like any other affine.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from bnfold.ir.graph import get_constant, node_shape
from bnfold.ir.ops import is_channel_affine

__all__ = ["ADD_TARGETS", "AffineView", "affine_view", "per_channel_axis", "sources_of"]

aten = torch.ops.aten
f64 = torch.float64

_MUL = {operator.mul, torch.mul, aten.mul.Tensor, "mul"}
ADD_TARGETS = {operator.add, torch.add, aten.add.Tensor, "add"}
_SUB = {operator.sub, torch.sub, aten.sub.Tensor, "sub"}
_DIV = {operator.truediv, torch.div, aten.div.Tensor, "div"}
_ADDCMUL = {torch.addcmul, aten.addcmul.default, "addcmul"}


def sources_of(node: object) -> tuple[str, ...]:
    """Report candidate ids carried by ``node`` (set where a normalization became an affine, merged by folds)."""
    if isinstance(node, torch.fx.Node):
        return tuple(node.meta.get("bnfold_sources", ()))
    return ()


@dataclass(frozen=True)
class AffineView:
    """``node`` computes ``a ⊙ x + b`` along ``axis`` (non-negative) of ``x``; ``a``/``b`` are float64."""

    node: torch.fx.Node
    x: torch.fx.Node
    a: torch.Tensor
    b: torch.Tensor
    axis: int
    rank: int

    @property
    def sources(self) -> tuple[str, ...]:
        return sources_of(self.node)

    @property
    def channels(self) -> int:
        return self.a.numel()


def per_channel_axis(x_shape: tuple[int, ...], c_shape: tuple[int, ...]) -> int | None:
    """Axis of ``x`` along which ``c`` varies, when ``c`` broadcasts per-channel without expanding ``x``."""
    if len(c_shape) > len(x_shape):
        return None
    padded = (1,) * (len(x_shape) - len(c_shape)) + tuple(c_shape)
    axes = [i for i, d in enumerate(padded) if d != 1]
    if len(axes) != 1 or padded[axes[0]] != x_shape[axes[0]] or x_shape[axes[0]] < 2:
        return None
    return axes[0]


def _flat(c: torch.Tensor) -> torch.Tensor:
    return c.detach().to(f64).reshape(-1)


def _elementwise(target: object, tensor_first: bool, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    c = _flat(c)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    if target in _MUL:
        return c, zero
    if target in ADD_TARGETS:
        return one, c
    if target in _SUB:
        return (one, -c) if tensor_first else (-one, c)
    if target in _DIV and tensor_first:
        return 1.0 / c, zero
    return None


def affine_view(gm: torch.fx.GraphModule, node: torch.fx.Node) -> AffineView | None:
    """The :class:`AffineView` of ``node``, or ``None`` when it is not a per-channel affine."""
    if is_channel_affine(node):
        x, scale, shift, axis = node.args
        a = scale if isinstance(scale, torch.Tensor) else get_constant(gm, scale)
        b = shift if isinstance(shift, torch.Tensor) else get_constant(gm, shift)
        shape = node_shape(x)
        if not isinstance(x, torch.fx.Node) or a is None or b is None or shape is None:
            return None
        return AffineView(node, x, _flat(a), _flat(b), int(axis) % len(shape), len(shape))
    if node.op not in ("call_function", "call_method"):
        return None
    if node.target in _ADDCMUL and len(node.args) == 3 and not node.kwargs:
        t_node, x, s_node = node.args
        s, t = get_constant(gm, s_node), get_constant(gm, t_node)
        return _checked(gm, node, x, s, t)
    if len(node.args) != 2 or node.kwargs:
        return None
    lhs, rhs = node.args
    for tensor_first, x, c_node in ((True, lhs, rhs), (False, rhs, lhs)):
        if node.op == "call_method" and not tensor_first:
            return None
        c = get_constant(gm, c_node)
        if c is None:
            continue
        ab = _elementwise(node.target, tensor_first, c)
        if ab is None:
            return None
        view = _checked(gm, node, x, c, None)
        if view is None:
            return None
        return AffineView(node, view.x, ab[0], ab[1], view.axis, view.rank)
    return None


def _checked(gm: torch.fx.GraphModule, node: torch.fx.Node, x: object, s: torch.Tensor | None,
             t: torch.Tensor | None) -> AffineView | None:
    """Validate shapes: ``x`` is a non-constant graph tensor, ``s``/``t`` per-channel along one shared axis."""
    if not isinstance(x, torch.fx.Node) or get_constant(gm, x) is not None or s is None:
        return None
    x_shape, out_shape = node_shape(x), node_shape(node)
    if x_shape is None or out_shape != x_shape or not s.is_floating_point():
        return None
    axis = per_channel_axis(x_shape, tuple(s.shape))
    if axis is None:
        return None
    if t is not None:
        if not t.is_floating_point() or per_channel_axis(x_shape, tuple(t.shape)) != axis:
            return None
        return AffineView(node, x, _flat(s), _flat(t), axis, len(x_shape))
    return AffineView(node, x, _flat(s), torch.zeros_like(_flat(s)), axis, len(x_shape))
