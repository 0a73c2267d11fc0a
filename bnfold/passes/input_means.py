"""The expected value of every tensor, per channel, as far as BatchNorm statistics tell it (data-free).

:func:`expected_values` walks the graph once, in order, and gives each node either an :class:`Expectation` (the
per-channel mean along one axis, and the standard deviation where the tensor is still a normal pre-activation) or
the reason it is unknown. The rules, each exact in expectation (linearity) or under the normal model:

* a node with :class:`~bnfold.ir.moments.Moments` (a conv/linear a BatchNorm was folded into, or an unfolded BN's
  affine): ``N(mean, std²)`` per channel; a clamp (ReLU, ReLU6, per-channel ``minimum``/``maximum`` bounds) of such a
  normal stays a *clipped normal* ``clip(y, lo, hi)``, and clamps compose exactly;
* an affine ``a ⊙ x + b``: ``(a·m + b, |a|·s)``; a conv/linear without moments: ``E[W x + b] = W E[x] + b`` (a conv's
  zero-padded border aside);
* an elementwise activation of a (clipped) normal: the clipped normal's mean for clamps, Gauss–Hermite quadrature of
  ``f(clip(y, lo, hi))`` for LeakyReLU, SiLU, GELU, hardswish, sigmoid, tanh, hardsigmoid, ELU, Mish, softplus
  (:mod:`bnfold.ir.moments`);
* ops that average or move values within a channel (dropout, identity, average pooling, mean over other axes,
  reshape/permute/flatten): the mean moves with the channel (:mod:`bnfold.passes.commute`);
* ``u + v``: ``E[u] + E[v]``; a channel concat: the means side by side.

Unknown: a graph input (no statistics without data), a max-pool (the mean of a maximum is not a function of the
mean), a product of two tensors (a squeeze-excitation gate), an activation of a tensor that is no longer normal, and
any other op. ``bnfold.quantize`` measures such layers on calibration data instead, when it has some.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from bnfold.ir.affine_math import fold_into_consumer
from bnfold.ir.graph import fetch_attr, get_constant, node_shape
from bnfold.ir.linear_ops import LinearOp
from bnfold.ir.moments import clipped_mean, gaussian_mean, moments_of
from bnfold.ir.reasons import Fail
from bnfold.passes.commute import CAT, Affine, transfer_for
from bnfold.passes.context import PassContext
from bnfold.passes.fold_targets import describe, linear_op

__all__ = ["Expectation", "expected_values"]

aten = torch.ops.aten
f64 = torch.float64


@dataclass(frozen=True)
class Expectation:
    """Per-channel ``mean`` along ``axis``; ``normal``: while the tensor is ``clip(y, lo, hi)`` of a normal
    pre-activation ``y ~ N(m, s²)`` (``lo = −inf``, ``hi = inf`` for ``y`` itself), the vectors ``(m, s, lo, hi)``."""

    axis: int
    mean: torch.Tensor
    normal: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def gaussian(axis: int, m: torch.Tensor, s: torch.Tensor) -> Expectation:
        inf = torch.full_like(m, float("inf"))
        return Expectation(axis, m.to(f64), (m.to(f64), s.to(f64), -inf, inf))

    def clamped(self, lo: torch.Tensor, hi: torch.Tensor) -> Expectation:
        """``clip(self, lo, hi)``, since ``clip(clip(y, a, b), lo, hi) = clip(y, a', b')`` with
        ``a' = min(max(a, lo), hi)``, ``b' = max(min(b, hi), lo)``."""
        assert self.normal is not None
        m, s, a, b = self.normal
        new_lo = torch.minimum(torch.maximum(a, lo), hi)
        new_hi = torch.maximum(torch.minimum(b, hi), lo)
        return Expectation(self.axis, clipped_mean(m, s, new_lo, new_hi), (m, s, new_lo, new_hi))


Known = Expectation | Fail

_SMOOTH_MODULES: tuple[type[nn.Module], ...] = (nn.SiLU, nn.GELU, nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid,
                                                nn.ELU, nn.Mish, nn.Softplus)
_SMOOTH_FUNCS: set[Any] = {F.silu, F.gelu, F.hardswish, torch.sigmoid, torch.tanh, F.hardsigmoid, F.elu, F.mish,
                           F.softplus, aten.silu.default, aten.gelu.default, aten.hardswish.default,
                           aten.sigmoid.default, aten.tanh.default, aten.hardsigmoid.default, aten.elu.default,
                           aten.mish.default, aten.softplus.default, "sigmoid", "tanh"}
_RELU: set[Any] = {F.relu, torch.relu, aten.relu.default, "relu"}
_RELU6: set[Any] = {F.relu6, aten.relu6.default}
_LEAKY: set[Any] = {F.leaky_relu, aten.leaky_relu.default}
_HARDTANH: set[Any] = {F.hardtanh, aten.hardtanh.default}
_CLAMP: set[Any] = {torch.clamp, torch.clip, aten.clamp.default, "clamp", "clip"}
_MIN: set[Any] = {torch.minimum, aten.minimum.default}
_MAX: set[Any] = {torch.maximum, aten.maximum.default}
_ADD: set[Any] = {operator.add, torch.add, aten.add.Tensor, "add"}
_MUL: set[Any] = {operator.mul, torch.mul, aten.mul.Tensor, "mul"}
_MAX_POOL: tuple[type[nn.Module], ...] = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
                                          nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def expected_values(ctx: PassContext) -> dict[torch.fx.Node, Known]:
    """Every node's :class:`Expectation` or the reason it is unknown (one pass in graph order)."""
    known: dict[torch.fx.Node, Known] = {}
    for node in ctx.gm.graph.nodes:
        try:
            known[node] = _expect(ctx, node, known)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # an op this walk misreads: unknown
            known[node] = Fail(f"'{node.name}' ({describe(node)}): {type(exc).__name__}")
    return known


def _channel_axis(node: torch.fx.Node, axis: int) -> int | None:
    shape = node_shape(node)
    return None if shape is None else axis % len(shape)


def _expect(ctx: PassContext, node: torch.fx.Node, known: dict[torch.fx.Node, Known]) -> Known:
    if node.op == "placeholder":
        return Fail("it reads the model's input, whose mean is not known without data")
    if node.op in ("get_attr", "output"):
        return Fail(f"'{node.name}' is not a computed tensor")
    moments = moments_of(node)
    op = linear_op(ctx, node)
    if moments is not None:
        axis = _channel_axis(node, op.channel_axis if isinstance(op, LinearOp) else 1)
        view = ctx.affine(node)
        if view is not None:
            axis = view.axis
        if axis is not None:
            return Expectation.gaussian(axis, moments.mean, moments.std)
    if isinstance(op, LinearOp):
        return _through_linear(op, known)
    view = ctx.affine(node)
    if view is not None:
        inner = _of(known, view.x)
        if isinstance(inner, Fail):
            return inner
        if inner.axis != view.axis or inner.mean.numel() != view.channels:
            return Fail(f"'{node.name}' scales another axis than the known channel means")
        return Expectation(inner.axis, view.a * inner.mean + view.b, _affine_normal(inner, view.a, view.b))
    if node.op not in ("call_module", "call_function", "call_method"):
        return Fail(f"'{node.name}' is not an op")
    act = _activation(ctx, node)
    if act is not None:
        x, how = act
        inner = _of(known, x)
        if isinstance(inner, Fail):
            return inner
        if inner.normal is None:
            return Fail(f"'{node.name}' ({describe(node)}) acts on a tensor that is no longer a (clipped) normal "
                        "pre-activation, so BatchNorm statistics do not give the mean of its output")
        if isinstance(how, tuple):  # a clamp: exact by composing the bounds
            lo, hi = (_per_channel(v, inner.mean.numel()) for v in how)
            return inner.clamped(lo, hi)
        m, s, lo, hi = inner.normal
        return Expectation(inner.axis, gaussian_mean(
            lambda t: how(torch.minimum(torch.maximum(t, lo[:, None]), hi[:, None])), m, s))
    return _structural(ctx, node, known)


def _affine_normal(inner: Expectation, a: torch.Tensor, b: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``a·clip(y, lo, hi) + b = clip(a·y + b, a·lo + b, a·hi + b)`` for ``a > 0`` (any ``a`` while unclipped)."""
    if inner.normal is None:
        return None
    m, s, lo, hi = inner.normal
    a, b = a.to(f64), b.to(f64)
    unclipped = bool(torch.isinf(lo).all() and torch.isinf(hi).all())
    if unclipped:
        return a * m + b, a.abs() * s, lo, hi
    if not bool((a > 0).all()):
        return None
    return a * m + b, a * s, a * lo + b, a * hi + b


def _of(known: dict[torch.fx.Node, Known], node: Any) -> Known:
    if not isinstance(node, torch.fx.Node):
        return Fail("an operand is not a graph tensor")
    return known.get(node, Fail(f"'{node.name}' comes later in the graph"))


def _through_linear(op: LinearOp, known: dict[torch.fx.Node, Known]) -> Known:
    inner = _of(known, op.input)
    if isinstance(inner, Fail):
        return inner
    shape = node_shape(op.input)
    if op.kind == "conv_transpose" or shape is None:
        return Fail(f"{op.describe()}: the mean of its output is not derived (conv-transpose or unknown shape)")
    if inner.axis != op.channel_axis % len(shape) or inner.mean.numel() != op.in_channels:
        return Fail(f"{op.describe()} reads channels on another axis than the known means")
    _, mean = fold_into_consumer(op.weight, op.bias, torch.ones_like(inner.mean), inner.mean, kind=op.kind,
                                 groups=op.groups)
    assert mean is not None
    out_axis = _channel_axis(op.node, op.channel_axis)
    if out_axis is None:
        return Fail(f"the shape of {op.describe()}'s output is unknown")
    return Expectation(out_axis, mean)


Bounds = tuple[torch.Tensor | float, torch.Tensor | float]
How = Bounds | Callable[[torch.Tensor], torch.Tensor]

_INF = float("inf")


def _activation(ctx: PassContext, node: torch.fx.Node) -> tuple[torch.fx.Node, How] | None:
    """``(input, how)`` when ``node`` is an elementwise activation of one tensor: ``how`` is a clamp's ``(lo, hi)``
    (exact, by the clipped normal) or the elementwise function itself (by quadrature)."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(x, torch.fx.Node):
        return None
    target = node.target
    if node.op == "call_module":
        m = fetch_attr(ctx.gm, str(target))
        if isinstance(m, nn.ReLU):
            return x, (0.0, _INF)
        if isinstance(m, nn.Hardtanh):
            return x, (float(m.min_val), float(m.max_val))
        if isinstance(m, (nn.LeakyReLU, *_SMOOTH_MODULES)):
            module = m
            return x, lambda t: module(t)
        return None
    args, kwargs = node.args[1:], dict(node.kwargs)
    if target in _MIN or target in _MAX:
        bound = get_constant(ctx.gm, node.args[1] if len(node.args) > 1 else None)
        if bound is None:
            return None
        return x, ((-_INF, bound) if target in _MIN else (bound, _INF))
    if any(isinstance(a, torch.fx.Node) for a in (*args, *kwargs.values())):
        return None
    if target in _RELU:
        return x, (0.0, _INF)
    if target in _RELU6:
        return x, (0.0, 6.0)
    if target in _HARDTANH:
        return x, (float(kwargs.get("min_val", args[0] if args else -1.0)),
                   float(kwargs.get("max_val", args[1] if len(args) > 1 else 1.0)))
    if target in _CLAMP:
        lo_v = kwargs.get("min", args[0] if args else None)
        hi_v = kwargs.get("max", args[1] if len(args) > 1 else None)
        if not all(v is None or isinstance(v, (int, float)) for v in (lo_v, hi_v)):
            return None
        return x, (-_INF if lo_v is None else float(lo_v), _INF if hi_v is None else float(hi_v))
    if target in _LEAKY or target in _SMOOTH_FUNCS:
        kw = {k: v for k, v in kwargs.items() if k != "inplace"}
        if isinstance(target, str):
            return x, lambda t: getattr(t, str(target))(*args, **kw)
        return x, lambda t: target(t, *args, **kw)  # type: ignore[operator]
    return None


def _per_channel(bound: torch.Tensor | float, channels: int) -> torch.Tensor:
    if not isinstance(bound, torch.Tensor):
        return torch.full((channels,), float(bound), dtype=f64)
    b = bound.detach().to(f64)
    if b.numel() == 1:
        return b.reshape(1).expand(channels).clone()
    if b.numel() != channels:
        raise ValueError("a bound that is not per channel")
    return b.reshape(-1)


def _structural(ctx: PassContext, node: torch.fx.Node, known: dict[torch.fx.Node, Known]) -> Known:
    target = node.target
    is_module = node.op == "call_module"
    if (is_module and isinstance(fetch_attr(ctx.gm, str(target)), _MAX_POOL)) \
            or (not is_module and "max_pool" in getattr(target, "__name__", str(target))):
        return Fail(f"'{node.name}' is a max-pool: the mean of a maximum is not known from BatchNorm statistics")
    if node.op in ("call_function", "call_method") and target in _ADD and len(node.args) == 2 \
            and all(isinstance(a, torch.fx.Node) for a in node.args):
        u, v = (_of(known, a) for a in node.args)
        if isinstance(u, Fail):
            return u
        if isinstance(v, Fail):
            return v
        if u.axis != v.axis or u.mean.shape != v.mean.shape or node_shape(node.args[0]) != node_shape(node.args[1]):
            return Fail(f"'{node.name}' adds tensors whose channels do not line up")
        return Expectation(u.axis, u.mean + v.mean)
    if node.op in ("call_function", "call_method") and target in _MUL:
        return Fail(f"'{node.name}' multiplies two tensors (a gate): the mean of a product is not known from BatchNorm "
                    "statistics")
    if node.op == "call_function" and target in CAT:
        return _concat(node, known)
    t = transfer_for(ctx.gm, node)
    if isinstance(t, Fail):
        return Fail(f"{t.reason}: the mean of its output is not known from BatchNorm statistics")
    inner = _of(known, t.x)
    if isinstance(inner, Fail):
        return inner
    in_shape = node_shape(t.x)
    out_shape = node_shape(node)
    if in_shape is None or out_shape is None:
        return Fail(f"'{node.name}' has an unknown shape")
    moved = t.forward(Affine(torch.ones_like(inner.mean), inner.mean, inner.axis, in_shape))
    if isinstance(moved, Fail):
        return Fail(f"the mean does not cross '{node.name}': {moved.reason}")
    same_values = torch.Size(in_shape).numel() == torch.Size(out_shape).numel()  # moved, not averaged
    return Expectation(moved.axis, moved.b, inner.normal if same_values else None)


def _concat(node: torch.fx.Node, known: dict[torch.fx.Node, Known]) -> Known:
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    shape = node_shape(node)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or shape is None:
        return Fail(f"'{node.name}' concatenates along an axis known only at run time")
    parts = [_of(known, t) for t in tensors]
    for p in parts:
        if isinstance(p, Fail):
            return p
    exp = [p for p in parts if isinstance(p, Expectation)]
    axis = dim % len(shape)
    if any(p.axis != axis for p in exp):
        return Fail(f"'{node.name}' concatenates along another axis than the channel means")
    normals = [p.normal for p in exp]
    normal = None if any(n is None for n in normals) else tuple(
        torch.cat([n[k] for n in normals if n is not None]) for k in range(4))
    return Expectation(axis, torch.cat([p.mean for p in exp]), normal)  # type: ignore[arg-type]
