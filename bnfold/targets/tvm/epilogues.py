"""Elementwise ops moved across reshapes, so Relax's ``FuseOps`` makes them a matmul's epilogue.

PyTorch's ``Linear`` on a ``(1, tokens, features)`` input is imported as ``reshape → (tokens, features)``,
``matmul``, ``add`` (bias), ``reshape → (1, tokens, features)``; the activation and the residual add that follow
act on the 3-D tensor. ``FuseOps`` fuses elementwise ops into a matmul only up to the first reshape, so every
GELU and every residual add of a transformer was a kernel of its own: a pass over the activations from memory
and a parallel region more, per layer (in ViT-tiny 36 of them per call). Rewritten here, before legalization:

    f(reshape(x, S))                  →  reshape(f(x), S)                        f elementwise (GELU, SiLU, …)
    g(reshape(x, S), y)               →  reshape(g(x, reshape(y, shape(x))), S)  y of shape S (a residual)
    g(reshape(x, S), c)               →  reshape(g(x, c), S)                     c broadcast along the last axis,
                                                                                 which the reshape keeps
    reshape(reshape(x, S₁), S₂)       →  reshape(x, S₂)
    reshape(x, shape(x))              →  x

(``g`` commutative for the swapped operand order; ``x`` computed in the function, not a parameter: a conv's bias
is imported as ``add(conv, reshape(b, (1, C, 1, 1)))``, and on a 1×1 map — a squeeze-excite conv — moving that
add to the bias's side took it out of the conv's kernel.) Every rewrite computes the same values in the same order;
reshapes of a contiguous tensor are views, so the ``reshape(y, …)`` of a residual costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.dpl import is_op, wildcard

__all__ = ["sink_reshapes"]

UNARY = ("relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.silu", "relax.sigmoid", "relax.tanh", "relax.nn.relu",
         "relax.exp", "relax.erf")
BINARY = ("relax.add", "relax.multiply", "relax.subtract", "relax.divide")
COMMUTATIVE = ("relax.add", "relax.multiply")


def _shape(expr: relax.Expr) -> list[int] | None:
    """A static shape, None when unknown or symbolic."""
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        try:
            return [int(d) for d in shape] if shape is not None else None
        except (TypeError, ValueError):
            return None
    try:
        return [int(d) for d in shape.values]
    except (TypeError, ValueError):
        return None


def _reshape_source(expr: relax.Expr, bound: Mapping[relax.Var, relax.Expr], *,
                    widening: bool = False) -> relax.Expr | None:
    """``x`` when ``expr`` is (a variable bound to) ``reshape(x, S)`` with both shapes static, else None;
    ``widening``: only a reshape to more dimensions (``(tokens, features) → (1, tokens, features)``: ops move
    towards the matmul's side, never back, so the rewrites cannot cycle)."""
    expr = bound.get(expr, expr) if isinstance(expr, relax.Var) else expr
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.reshape":
        x = expr.args[0]
        xs, s = _shape(x), _shape(expr)
        if xs is not None and s is not None and (not widening or len(xs) < len(s)):
            return x
    return None


def _last_axis_broadcast(c: relax.Expr, x: Sequence[int], s: Sequence[int]) -> bool:
    """``c`` broadcasts against both ``x`` and ``s`` along their (shared) last axis alone."""
    cs = _shape(c)
    if cs is None or not x or not s or x[-1] != s[-1] or len(cs) > min(len(x), len(s)):
        return False
    return all(d == 1 for d in cs[:-1]) and (not cs or cs[-1] in (1, x[-1]))


def _rewriter(bound: Mapping[relax.Var, relax.Expr]) -> Callable[[relax.Call, object], relax.Expr]:
    """The rewrite of one call, ``bound``: the function's variable bindings (dataflow arguments are variables)."""

    def rewrite(call: relax.Call, _match: object) -> relax.Expr:
        return _rewrite(call, bound)

    return rewrite


def _rewrite(call: relax.Call, bound: Mapping[relax.Var, relax.Expr]) -> relax.Expr:
    op = call.op.name if isinstance(call.op, tvm.ir.Op) else ""
    if op == "relax.reshape":
        inner = _reshape_source(call.args[0], bound)
        if inner is not None:
            return relax.op.reshape(inner, call.args[1]) if _shape(inner) != _shape(call) else inner
        x = call.args[0]
        return x if _shape(x) is not None and _shape(x) == _shape(call) else call
    if op in UNARY:
        x = _reshape_source(call.args[0], bound, widening=True)
        if x is None:
            return call
        return relax.op.reshape(relax.Call(call.op, [x], call.attrs), _shape(call))
    if op in BINARY:
        for i in (0, 1):
            if i == 1 and op not in COMMUTATIVE:
                break
            r, other = call.args[i], call.args[1 - i]
            x = _reshape_source(r, bound, widening=True)
            if x is None or x not in bound:
                continue  # a reshaped parameter (a conv's bias): nothing to move towards
            xs, s, os_ = _shape(x), _shape(r), _shape(other)
            if os_ is None or _shape(call) != s:
                continue
            y = _reshape_source(other, bound)
            if y is not None and _shape(y) == xs:  # both operands reshaped alike (the residual stream)
                other = y
            elif y is not None:
                continue
            elif os_ == s:
                other = relax.op.reshape(other, xs)
            elif not _last_axis_broadcast(other, xs, s):
                continue
            args = [x, other] if i == 0 else [other, x]
            return relax.op.reshape(relax.Call(call.op, args, call.attrs), s)
    return call


@tvm.transform.module_pass(opt_level=0, name="SinkReshapes")
def sink_reshapes(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """The rewrites of the module docstring, to a fixed point, then the bindings canonicalized."""
    ops = [is_op(name)(wildcard()) for name in UNARY]
    ops += [is_op(name)(wildcard(), wildcard()) for name in BINARY]
    ops.append(is_op("relax.reshape")(wildcard(), wildcard()))
    pattern = ops[0]
    for p in ops[1:]:
        pattern = pattern | p
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, relax.Function):
            continue
        for _ in range(16):
            new = relax.dpl.rewrite_call(pattern, _rewriter(relax.analysis.get_var2val(func)), func)
            if tvm_ffi.structural_equal(new, func):
                break
            func = new
        mod[gv] = func
    return relax.transform.CanonicalizeBindings()(mod)
