"""Vectorizable transcendental functions for CPU kernels: ``exp``, ``sigmoid``, SiLU, ``tanh``, GELU and softmax
legalized with TOPI's polynomial ``fast_exp`` / ``fast_erf`` / ``fast_tanh`` instead of libm calls.

TVM lowers ``exp``, ``erf`` and ``tanh`` for LLVM to ``expf`` / ``erff`` calls: a vectorized loop over them
becomes 16 scalar calls per vector (checked in the generated assembly of TVM 0.27: a 16-lane ``erf`` loop has no
``zmm`` instruction at all). That made every GELU (ViT, BERT, ConvNeXt), softmax (attention), SiLU and sigmoid
(EfficientNet, RegNetY, Llama) a scalar kernel. TOPI's ``fast_*`` functions are the same functions written as
float32 arithmetic that LLVM vectorizes:

* ``fast_exp``: Cephes' ``expf`` — ``exp(x) = 2ⁿ · p(r)``, ``n = ⌊x·log₂e + ½⌋``, ``r = x − n·ln 2`` (ln 2 split in
  two), ``p`` a degree-7 polynomial; ``x`` clamped to ±88.38, so ``exp(−∞) = 0`` (a masked attention score)
  and ``exp(+∞)`` is the largest finite float's neighbourhood instead of ``inf``; within a few ulp elsewhere;
* ``fast_erf``: Eigen's rational approximation on ``[−4, 4]`` (``erf`` is ±1 to float precision outside);
* ``fast_tanh``: Eigen's rational approximation on ``[−9, 9]``, ``tanh(x) = x`` below 4·10⁻⁴.

Only float32 is rewritten; other dtypes keep TVM's stock legalization. The map is passed to Relax's
``LegalizeOps`` (:func:`vector_math_legalize_map`), so the kernels are written with these functions from the
start: the hand schedules, the tuning tasks and the tuning database all see the same TIR.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tvm
from tvm import relax, te, tirx, topi

__all__ = ["vector_math_legalize_map"]

Legalizer = Callable[[relax.BlockBuilder, relax.Call], relax.Expr]


def _f32(call: relax.Call) -> bool:
    return str(getattr(call.args[0].ty, "dtype", "")) == "float32"


def _stock(op: str) -> Legalizer:
    return tvm.ir.Op.get(op).get_attr("FLegalize")


def _sigmoid(x: te.Tensor) -> te.Tensor:
    """``1 / (1 + exp(−x))``."""
    e = topi.math.fast_exp(topi.negative(x))
    one = tirx.const(1.0, x.dtype)
    return te.compute(x.shape, lambda *i: one / (one + e(*i)), name="T_sigmoid")


def _silu(x: te.Tensor) -> te.Tensor:
    s = _sigmoid(x)
    return te.compute(x.shape, lambda *i: x(*i) * s(*i), name="T_silu")


def _gelu(x: te.Tensor) -> te.Tensor:
    """``x · (½ + ½·erf(x/√2))``, as TVM's stock legalization writes it."""
    erf = topi.math.fast_erf(topi.multiply(x, tirx.const(0.5**0.5, x.dtype)))
    half = tirx.const(0.5, x.dtype)
    return te.compute(x.shape, lambda *i: x(*i) * (half + erf(*i) * half), name="T_gelu")


def _gelu_tanh(x: te.Tensor) -> te.Tensor:
    """``½x · (1 + tanh(√(2/π) · x · (1 + 0.044715·x²)))``."""
    c, k = tirx.const(math.sqrt(2.0 / math.pi), x.dtype), tirx.const(0.044715, x.dtype)
    one, half = tirx.const(1.0, x.dtype), tirx.const(0.5, x.dtype)
    inner = te.compute(x.shape, lambda *i: c * x(*i) * (one + k * x(*i) * x(*i)), name="T_gelu_inner")
    t = topi.math.fast_tanh(inner)
    return te.compute(x.shape, lambda *i: half * x(*i) * (one + t(*i)), name="T_gelu_tanh")


def _unary(op: str, fn: Callable[[te.Tensor], te.Tensor], name: str) -> Legalizer:
    stock = _stock(op)

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if not _f32(call):
            return stock(bb, call)
        return bb.call_te(fn, call.args[0], primfunc_name_hint=name)

    return legalize


def _softmax(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    if not _f32(call):
        return _stock("relax.nn.softmax")(bb, call)
    return bb.call_te(topi.nn.fast_softmax, call.args[0], int(call.attrs.axis), primfunc_name_hint="softmax")


def _cumsum_te(x: te.Tensor, axis: int, dtype: str, exclusive: bool) -> te.Tensor:
    """``y[…, j, …] = Σ_{k ≤ j} x[…, k, …]`` (``k < j`` if ``exclusive``) as a plain reduction: quadratic in the
    axis length, but a TIR block (TOPI's scan is an extern that ``create_prim_func`` refuses)."""
    n = x.shape[axis]
    k = te.reduce_axis((0, n), name="k")

    def body(*i: tirx.PrimExpr) -> tirx.PrimExpr:
        at = [*i[:axis], k, *i[axis + 1:]]
        keep = k < i[axis] if exclusive else k <= i[axis]
        return te.sum(tirx.if_then_else(keep, x(*at).astype(acc), tirx.const(0, acc)), axis=k)

    acc = "int64" if dtype == "bool" else dtype  # a running count of a boolean mask
    total = te.compute(x.shape, body, name="T_cumsum")
    return total if acc == dtype else te.compute(x.shape, lambda *i: total(*i).astype(dtype), name="T_cast")


def _cumsum(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """``cumsum`` along an axis (TVM 0.27 registers no CPU legalization for it, and the VM cannot run it
    unlegalized). transformers' Llama builds its causal mask with it from constants: ``FoldConstant`` then
    computes it at build time."""
    a, x = call.attrs, call.args[0]
    rank = len(x.ty.shape)
    if a.axis is None or rank == 0:
        return call
    axis = int(a.axis) % rank
    dtype = str(call.ty.dtype)
    return bb.call_te(_cumsum_te, x, axis, dtype, bool(a.exclusive), primfunc_name_hint="cumsum")


def _bool_compare(op: str) -> Legalizer:
    """``equal`` / ``not_equal`` of boolean tensors compared as int8: TVM 0.27's LLVM codegen emits a float
    compare (``fcmp oeq i1``) for booleans, which LLVM's verifier rejects (transformers' causal masks)."""
    stock = _stock(op)
    fn = topi.equal if op == "relax.equal" else topi.not_equal

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if any(str(getattr(a.ty, "dtype", "")) != "bool" for a in call.args):
            return stock(bb, call)
        return bb.call_te(lambda a, b: fn(topi.cast(a, "int8"), topi.cast(b, "int8")), *call.args,
                          primfunc_name_hint=op.split(".")[-1])

    return legalize


def vector_math_legalize_map() -> dict[str, Legalizer]:
    """``LegalizeOps`` overrides: the float32 transcendental ops written with vectorizable polynomials; and two
    ops TVM 0.27 cannot compile for the CPU as stock (``cumsum``, boolean ``equal``)."""
    return {
        "relax.cumsum": _cumsum,
        "relax.equal": _bool_compare("relax.equal"),
        "relax.not_equal": _bool_compare("relax.not_equal"),
        "relax.exp": _unary("relax.exp", topi.math.fast_exp, "tir_exp"),
        "relax.tanh": _unary("relax.tanh", topi.math.fast_tanh, "tir_tanh"),
        "relax.sigmoid": _unary("relax.sigmoid", _sigmoid, "tir_sigmoid"),
        "relax.nn.silu": _unary("relax.nn.silu", _silu, "silu"),
        "relax.nn.gelu": _unary("relax.nn.gelu", _gelu, "gelu"),
        "relax.nn.gelu_tanh": _unary("relax.nn.gelu_tanh", _gelu_tanh, "gelu_tanh"),
        "relax.nn.softmax": _softmax,
    }
