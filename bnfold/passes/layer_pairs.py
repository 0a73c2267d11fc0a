"""Cross-layer pairs: two conv/linear layers joined by ops that a positive per-channel scale crosses.

Shared by the quantization-preparation rules (``equalize``, ``absorb_bias``): no rule calls another's ``check``;
they ask :func:`find_pair`, which walks back from the *second* layer (the consumer) to the first (the producer)::

    producer(x) ─► step ─► … ─► step ─► consumer          (every intermediate tensor read by the next op only)

A step is one of (each is *positively homogeneous*: ``f(x/s) = f(x)/s`` for every ``s > 0``):

* ``relu`` — ReLU (``nn.ReLU``, ``F.relu``, ``aten.relu``) and LeakyReLU (any slope);
* ``clamp`` — a clamp with scalar bounds: ReLU6 (= ``clamp(x, 0, 6)``), ``Hardtanh``, ``torch.clamp``. It is
  homogeneous only if its bounds are scaled too: ``clamp(x/s, lo, hi) ≠ clamp(x, lo, hi)/s``, but
  ``clamp(x/s, lo/s, hi/s) = clamp(x, lo, hi)/s``. A rule that rescales through it rewrites it with per-channel
  bounds (the clamp *moves* with the scale) — ``relu(x)`` (or ``maximum(x, lo)``) then ``minimum(·, hi)`` with
  constant per-channel ``hi`` — which is exact;
* ``bound`` — such a per-channel ``minimum``/``maximum`` with a constant (what a moved clamp became);
* ``move`` — an op that commutes with a positive per-channel scale and keeps channel ``i`` channel ``i``
  (:mod:`bnfold.passes.commute`: dropout/identity, max/avg pooling, a flatten of a ``(N, C, 1, 1)`` tensor).

Not a step: SiLU, GELU, hardswish, sigmoid … (``silu(x/s) ≠ silu(x)/s``); a residual add or any tensor read twice
along the way; a concat; a multiply by another tensor (a squeeze-excitation gate). The reason names the op.
Both layers must be conv (grouped and depthwise included) or linear layers with constant weights that no other
call site or parameter slot shares (rescaling one copy would need the weight twice).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from bnfold.ir.graph import fetch_attr, get_constant, node_shape, normalized_kwargs
from bnfold.ir.linear_ops import LinearOp, NotFoldable
from bnfold.ir.reasons import Fail
from bnfold.ir.uses import value_users
from bnfold.passes.commute import Affine, NotInTable, transfer_for
from bnfold.passes.context import PassContext
from bnfold.passes.fold_targets import describe, linear_op

__all__ = ["MAX_STEPS", "Pair", "Step", "find_pair", "kept_clamp", "pair_id", "set_bounds"]

aten = torch.ops.aten
f64 = torch.float64

MAX_STEPS = 8

StepKind = Literal["relu", "clamp", "bound", "move"]

_RELU_FUNCS: set[Any] = {F.relu, torch.relu, aten.relu.default, aten.relu_.default, "relu", "relu_"}
_LEAKY_FUNCS: set[Any] = {F.leaky_relu, aten.leaky_relu.default, aten.leaky_relu_.default}
_HARDTANH_FUNCS: set[Any] = {F.hardtanh, aten.hardtanh.default, aten.hardtanh_.default}
_RELU6_FUNCS: set[Any] = {F.relu6, aten.relu6.default, aten.relu6_.default}
_CLAMP_FUNCS: set[Any] = {torch.clamp, torch.clip, aten.clamp.default, "clamp", "clip"}
_MIN: set[Any] = {torch.minimum, aten.minimum.default}
_MAX: set[Any] = {torch.maximum, aten.maximum.default}
_ADD: set[Any] = {operator.add, torch.add, aten.add.Tensor, "add"}


@dataclass(frozen=True)
class Step:
    """One op between the two layers. ``lo``/``hi``: a ``clamp``'s bounds (float64, per channel of ``axis``, ±inf
    where unbounded); ``slope``: a LeakyReLU's negative slope (0 for ReLU); ``const``: a ``bound``'s constant node;
    ``axis``/``shape``: the channel axis and shape of the step's output."""

    node: torch.fx.Node
    input: torch.fx.Node
    kind: StepKind
    axis: int
    shape: tuple[int, ...]
    slope: float = 0.0
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    const: torch.fx.Node | None = None

    @property
    def describe(self) -> str:
        return f"'{self.node.name}' ({describe(self.node)})"


@dataclass(frozen=True)
class Pair:
    """``consumer(steps(producer(x)))``; ``steps`` in graph order (producer side first)."""

    producer: LinearOp
    consumer: LinearOp
    steps: tuple[Step, ...]
    sources: tuple[str, ...]

    def describe(self) -> str:
        through = "".join(f" → {s.describe}" for s in self.steps)
        return f"{self.producer.describe()}{through} → {self.consumer.describe()}"


def pair_id(consumer: torch.fx.Node) -> str:
    """The report candidate a pair is reported under (named after its second layer, which the rules match)."""
    return f"pair:{consumer.name}"


def find_pair(ctx: PassContext, consumer: LinearOp) -> Pair | Fail | None:
    """The pair ``consumer`` closes, or why there is none (``None``: its input is a graph input — no pair to speak
    of)."""
    sources = (pair_id(consumer.node),)
    if consumer.kind not in ("conv", "linear"):
        return Fail(f"{consumer.describe()} is a conv-transpose (not supported as the second layer)")
    chain: list[torch.fx.Node] = []
    node, user = consumer.input, consumer.node
    producer: LinearOp | None = None
    for _ in range(MAX_STEPS + 1):
        if node.op == "placeholder":
            return None
        others = [u for u in value_users(node) if u is not user]
        if others:
            what = ", ".join(f"'{u.name}' ({describe(u)})" for u in others)
            if any(u.op in ("call_function", "call_method") and u.target in _ADD for u in others):
                return Fail(f"'{node.name}' is also read by {what}: a residual connection (the skip path would see the "
                            "rescaled channels too)")
            return Fail(f"'{node.name}' is also read by {what}: a shared tensor (its other readers would see the "
                        "rescaled channels too)")
        op = linear_op(ctx, node)
        if isinstance(op, NotFoldable):
            return Fail(f"'{node.name}' cannot be rewritten: {op.reason}")
        if isinstance(op, LinearOp):
            producer = op
            break
        if node.op in ("call_function", "call_method") and node.target in _ADD \
                and sum(isinstance(a, torch.fx.Node) for a in node.args) > 1:
            return Fail(f"'{node.name}' adds two paths (a residual connection): a channel scale cannot cross the sum")
        chain.append(node)
        nxt = _single_input(node)
        if nxt is None:
            return Fail(f"'{node.name}' ({describe(node)}) does not have a single tensor input")
        user, node = node, nxt
    if producer is None:
        return Fail(f"no conv/linear within {MAX_STEPS} ops before {consumer.describe()}")
    if producer.kind not in ("conv", "linear"):
        return Fail(f"{producer.describe()} is a conv-transpose (not supported as the first layer)")
    for op in (producer, consumer):
        why = _shared_weight(ctx, op)
        if why is not None:
            return why
    steps = _steps(ctx, producer, list(reversed(chain)), consumer)
    if isinstance(steps, Fail):
        return steps
    return Pair(producer, consumer, steps, sources)


def _shared_weight(ctx: PassContext, op: LinearOp) -> Fail | None:
    if op.module is not None and ctx.call_sites(str(op.node.target)) > 1:
        return Fail(f"{op.describe()} is called at {ctx.call_sites(str(op.node.target))} sites: its weight is used "
                    "twice, and rescaling one use would need a second copy of it")
    if ctx.tied(op.weight):
        return Fail(f"{op.describe()} shares its weight with another parameter (tied): rescaling it would change the "
                    "other user, or need a second copy")
    return None


def _single_input(node: torch.fx.Node) -> torch.fx.Node | None:
    x = node.args[0] if node.args else node.kwargs.get("input")
    return x if isinstance(x, torch.fx.Node) else None


def _steps(ctx: PassContext, producer: LinearOp, chain: list[torch.fx.Node], consumer: LinearOp
           ) -> tuple[Step, ...] | Fail:
    """Classify each op between the layers; push a tagged scale (``1, 2, …, C``) through them to check channel ``i``
    of the producer is channel ``i`` of the consumer's input."""
    shape = node_shape(producer.node)
    if shape is None:
        return Fail(f"the shape of {producer.describe()}'s output is unknown")
    channels = producer.out_channels
    tag = torch.arange(1, channels + 1, dtype=f64)
    aff = Affine(tag, torch.zeros_like(tag), producer.channel_axis % len(shape), shape)
    steps: list[Step] = []
    prev = producer.node
    for node in chain:
        out_shape = node_shape(node)
        if out_shape is None:
            return Fail(f"the shape of '{node.name}' is unknown")
        step = _classify(ctx, node, prev, aff.axis, out_shape, channels)
        if isinstance(step, Fail):
            return step
        if step.kind == "move":
            t = transfer_for(ctx.gm, node)
            moved = t if isinstance(t, Fail) else t.forward(aff)
            if isinstance(moved, Fail):
                return Fail(f"a per-channel scale cannot cross '{node.name}': {moved.reason}")
            aff = moved
            step = Step(node, prev, "move", aff.axis, tuple(out_shape))
        steps.append(step)
        prev = node
    rank = len(aff.shape)
    if aff.axis != consumer.channel_axis % rank or aff.a.numel() != consumer.in_channels \
            or not torch.equal(aff.a, tag):
        return Fail(f"channel i of {producer.describe()} is not channel i of {consumer.describe()}'s input (the ops "
                    "between reshape or reorder channels)")
    return tuple(steps)


def _classify(ctx: PassContext, node: torch.fx.Node, x: torch.fx.Node, axis: int, shape: tuple[int, ...],
              channels: int) -> Step | Fail:
    """What ``node`` (reading ``x``) is as a step, or why a positive per-channel scale does not cross it."""
    if node.op == "call_module":
        m = fetch_attr(ctx.gm, str(node.target))
        if isinstance(m, nn.ReLU) and type(m).forward is nn.ReLU.forward:
            return Step(node, x, "relu", axis, shape)
        if isinstance(m, nn.LeakyReLU) and type(m).forward is nn.LeakyReLU.forward:
            return Step(node, x, "relu", axis, shape, slope=float(m.negative_slope))
        if isinstance(m, nn.Hardtanh) and type(m).forward is nn.Hardtanh.forward:
            return _clamp(node, x, axis, shape, channels, float(m.min_val), float(m.max_val))
        return _blocked_or_move(ctx, node, x, axis, shape)
    if node.op not in ("call_function", "call_method"):
        return Fail(f"'{node.name}' is not an op")
    target = node.target
    if target in _RELU_FUNCS:
        return Step(node, x, "relu", axis, shape)
    if target in _LEAKY_FUNCS:
        slope = _kwarg(ctx, node, "negative_slope", 1, 0.01)
        return Step(node, x, "relu", axis, shape, slope=float(slope))
    if target in _RELU6_FUNCS:
        return _clamp(node, x, axis, shape, channels, 0.0, 6.0)
    if target in _HARDTANH_FUNCS:
        lo = _kwarg(ctx, node, "min_val", 1, -1.0)
        hi = _kwarg(ctx, node, "max_val", 2, 1.0)
        return _clamp(node, x, axis, shape, channels, lo, hi)
    if target in _CLAMP_FUNCS:
        lo = _kwarg(ctx, node, "min", 1, None)
        hi = _kwarg(ctx, node, "max", 2, None)
        if isinstance(lo, torch.fx.Node) or isinstance(hi, torch.fx.Node):
            return Fail(f"'{node.name}' clamps to bounds computed at run time")
        return _clamp(node, x, axis, shape, channels, -math.inf if lo is None else lo, math.inf if hi is None else hi)
    if target in _MIN or target in _MAX:
        const = node.args[1] if len(node.args) > 1 and node.args[0] is x else None
        value = get_constant(ctx.gm, const)
        if value is None or not value.is_floating_point():
            return Fail(f"'{node.name}' ({describe(node)}) takes the {'minimum' if target in _MIN else 'maximum'} with "
                        "another tensor, not a constant bound")
        bound = _per_channel(value, shape, axis, channels)
        if bound is None:
            return Fail(f"'{node.name}' bounds by a constant that is not per channel")
        assert isinstance(const, torch.fx.Node)
        lo = bound if target in _MAX else torch.full((channels,), -math.inf, dtype=f64)
        hi = bound if target in _MIN else torch.full((channels,), math.inf, dtype=f64)
        return Step(node, x, "bound", axis, shape, lo=lo, hi=hi, const=const)
    return _blocked_or_move(ctx, node, x, axis, shape)


def _blocked_or_move(ctx: PassContext, node: torch.fx.Node, x: torch.fx.Node, axis: int, shape: tuple[int, ...]
                     ) -> Step | Fail:
    if node.op in ("call_function", "call_method") and node.target in _ADD:
        return Fail(f"'{node.name}' adds two paths (a residual connection): a channel scale on one would reach the sum")
    t = transfer_for(ctx.gm, node)
    if isinstance(t, Fail) or t.x is not x:
        if node_shape(x) == shape and (not isinstance(t, Fail) or isinstance(t, NotInTable)):
            return Fail(f"'{node.name}' ({describe(node)}) is not positively homogeneous (f(x/s) ≠ f(x)/s), so a "
                        "channel scale cannot move across it")
        why = t.reason if isinstance(t, Fail) else "it reads other tensors"
        return Fail(f"a channel scale cannot cross '{node.name}': {why}")
    return Step(node, x, "move", axis, shape)


def _clamp(node: torch.fx.Node, x: torch.fx.Node, axis: int, shape: tuple[int, ...], channels: int, lo: float,
           hi: float) -> Step | Fail:
    if not lo <= 0 <= hi:
        return Fail(f"'{node.name}' clamps to [{lo:g}, {hi:g}], which does not contain 0")
    return Step(node, x, "clamp", axis, shape, lo=torch.full((channels,), float(lo), dtype=f64),
                hi=torch.full((channels,), float(hi), dtype=f64))


def _kwarg(ctx: PassContext, node: torch.fx.Node, name: str, position: int, default: Any) -> Any:
    kwargs = normalized_kwargs(ctx.gm, node)
    if kwargs is not None and name in kwargs:
        return kwargs[name]
    if name in node.kwargs:
        return node.kwargs[name]
    if len(node.args) > position:
        return node.args[position]
    return default


def _per_channel(value: torch.Tensor, shape: tuple[int, ...], axis: int, channels: int) -> torch.Tensor | None:
    """``value`` as a per-channel vector along ``axis`` of ``shape`` (a scalar broadcasts to every channel)."""
    if value.numel() == 1:
        return value.detach().to(f64).reshape(1).expand(channels).clone()
    view = [1] * len(shape)
    view[axis] = channels
    if value.dim() > len(shape):
        return None
    padded = [1] * (len(shape) - value.dim()) + list(value.shape)
    if padded != view:
        return None
    return value.detach().to(f64).reshape(-1).clone()


def kept_clamp(pair: Pair) -> Fail | None:
    """Why ``pair`` is left when clamps must keep their fixed bounds (``move_clamps=False``): its first ``clamp``."""
    for step in pair.steps:
        if step.kind == "clamp":
            return Fail(f"{step.describe} clamps at fixed bounds, and moving clamps is off (move_clamps=False, "
                        "--keep-clamps): a per-channel clamp would run as a float op in ONNX Runtime's int8 model")
    return None


def set_bounds(ctx: PassContext, step: Step, lo: torch.Tensor, hi: torch.Tensor) -> str:
    """Rewrite the ``clamp``/``bound`` ``step`` to clamp channel ``i`` to ``[lo_i, hi_i]``: ``relu`` (when ``lo ≡ 0``)
    or ``maximum`` with a constant, then ``minimum`` with a constant (left out where ``hi ≡ inf``). Returns what it
    became, for the report."""
    assert step.kind in ("clamp", "bound")
    view = [1] * len(step.shape)
    view[step.axis] = lo.numel()
    dtype = _dtype(step.node)
    anchor = step.node
    out = step.input
    parts = []
    if step.kind == "bound" and step.const is not None:  # only the bound this node applies
        is_min = step.node.target in _MIN
        value = (hi if is_min else lo).to(dtype).reshape(view)
        c = ctx.constant(value, f"{step.node.name}_bound", before=anchor, copy=False)
        ctx.set_call(step.node, step.node.target, (step.input, c), {})
        return f"'{step.node.name}' bound rescaled"
    if bool((lo == 0).all()):
        out = ctx.call(aten.relu.default, (out,), before=anchor, like=step.node, origin=step.node)
        parts.append("relu")
    elif bool(torch.isfinite(lo).any()):
        c = ctx.constant(lo.to(dtype).reshape(view), f"{step.node.name}_lo", before=anchor, copy=False)
        out = ctx.call(aten.maximum.default, (out, c), before=anchor, like=step.node, origin=step.node)
        parts.append("maximum")
    if bool(torch.isfinite(hi).any()):
        c = ctx.constant(hi.to(dtype).reshape(view), f"{step.node.name}_hi", before=anchor, copy=False)
        out = ctx.call(aten.minimum.default, (out, c), before=anchor, like=step.node, origin=step.node)
        parts.append("minimum")
    ctx.bypass(step.node, out)
    return f"'{step.node.name}' became per-channel {' + '.join(parts)}"


def _dtype(node: torch.fx.Node) -> torch.dtype:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", torch.float32) or torch.float32
