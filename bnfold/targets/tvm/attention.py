"""Attention's softmax as one row kernel with vector partial reductions, whatever the row length.

PyTorch's ``scaled_dot_product_attention`` decomposes into a softmax and a guard for rows that are all ``−∞`` (a
fully masked query gets zeros, not NaN; ``torch._safe_softmax``)::

    s = softmax(x, −1)
    y = where(not max(x ≠ −∞, −1), 0, s)

which Relax ran as two kernels per attention layer (the guard's ``max`` over a boolean copy of the scores, then
the softmax with the ``where``), each reducing a row of 197 scores (ViT's tokens, a prime) one element at a time:
a dependency chain of 197 ``max`` and 197 ``add`` per row. :func:`fuse_safe_softmax` rewrites the pattern into one
kernel computing the same values::

    m   = max_j x[j]
    e_j = exp(x[j] − m)
    y_j = 0 if Σ_j e_j = 0 else e_j / Σ_j e_j       (Σ_j e_j ≥ 1 unless every x[j] = −∞: then every e_j = 0)

with each reduction over a row of ``n`` split into ``w`` vector partial results over the ``⌊n/w⌋`` whole vectors
(``p[l] = max_c x[c·w + l]``, ``w`` the SIMD width), then the ``w`` partials and the ``n mod w`` last elements
reduced in a short chain: the long chains become vector operations. ``exp`` is TOPI's polynomial ``fast_exp``
(as for every softmax here, :mod:`bnfold.targets.tvm.vecmath`), so ``exp(−∞) = 0`` and a row with some ``−∞``
(a masked key) behaves as PyTorch's. The sum's association differs from a sequential sum (within the float32
rounding of a sum of ``n`` positive terms, which the parity rule allows).
"""

from __future__ import annotations

import contextlib

import tvm
from tvm import relax, s_tir, te, tirx, topi
from tvm.relax.dpl import is_const, is_op, wildcard

__all__ = ["ROW_PARTIALS", "fuse_safe_softmax", "safe_softmax_te", "schedule_safe_softmax"]

ROW_PARTIALS = "bnfold_row_partials"
"""Block annotation of :func:`safe_softmax_te`'s stages: the kernel :func:`schedule_safe_softmax` schedules."""


def _row_reduce(src: te.Tensor, reducer: object, lanes: int, names: tuple[str, str]) -> te.Tensor:
    """``reducer`` (``te.max`` / ``te.sum``) of ``src`` along its last axis: ``lanes`` partial results over the
    whole vectors (``p[l] = reduce_c src[c·lanes + l]``), then the partials and the last ``n mod lanes``
    elements in one short chain. Both stages are annotated :data:`ROW_PARTIALS`."""
    *lead, n_expr = src.shape
    n = int(n_expr)
    full, tail = n // lanes, n % lanes
    i64 = str(n_expr.dtype) if hasattr(n_expr, "dtype") else "int32"
    zero, w, base = tirx.IntImm(i64, 0), tirx.IntImm(i64, lanes), tirx.IntImm(i64, full * lanes)
    attrs = {ROW_PARTIALS: 1}
    c = te.reduce_axis((zero, tirx.IntImm(i64, full)), name=f"{names[0]}_c")
    part = te.compute((*lead, w), lambda *i: reducer(src(*i[:-1], c * w + i[-1]), axis=c), name=names[0],
                      attrs=attrs)
    r = te.reduce_axis((zero, tirx.IntImm(i64, lanes + tail)), name=f"{names[1]}_r")

    def finish(*i: tirx.PrimExpr) -> tirx.PrimExpr:
        if not tail:
            return reducer(part(*i, r), axis=r)
        return reducer(tirx.if_then_else(r < w, part(*i, tirx.min(r, w - 1)), src(*i, base + tirx.max(r - w, zero))),
                       axis=r)

    return te.compute(tuple(lead), finish, name=names[1], attrs=attrs)


def safe_softmax_te(x: te.Tensor, lanes: int) -> te.Tensor:
    """The module docstring's kernel along the last axis of ``x``, partial reductions ``lanes`` wide."""
    w = lanes if int(x.shape[-1]) >= lanes else 1
    zero = tirx.const(0.0, x.dtype)
    mx = _row_reduce(x, te.max, w, ("pmax", "rowmax"))
    e = topi.math.fast_exp(te.compute(x.shape, lambda *i: x(*i) - mx(*i[:-1]), name="shifted"))
    total = _row_reduce(e, te.sum, w, ("psum", "rowsum"))
    return te.compute(x.shape, lambda *i: tirx.Select(total(*i[:-1]) == zero, zero, e(*i) / total(*i[:-1])),
                      name="safe_softmax", attrs={ROW_PARTIALS: 1})


def _pattern() -> tuple[object, dict[str, object]]:
    x = wildcard()
    soft = is_op("relax.nn.softmax")(x)
    equal = is_op("relax.equal")(x, is_const())
    reduce = is_op("relax.max")(is_op("relax.astype")(is_op("relax.logical_not")(equal)))
    guard = is_op("relax.logical_not")(is_op("relax.astype")(reduce))
    zeros = is_op("relax.full_like")(soft, is_const())
    return is_op("relax.where")(guard, zeros, soft), {"x": x, "soft": soft, "equal": equal, "max": reduce}


def _last_axis(call: relax.Call, rank: int) -> bool:
    axis = call.attrs.axis
    axes = [int(a) for a in axis] if isinstance(axis, (list, tuple, tvm.ir.Array)) else [int(axis)]
    return axes in ([-1], [rank - 1])


def fuse_safe_softmax(lanes: int) -> tvm.transform.Pass:
    """The rewrite of the module docstring (float32 scores with a static row length; the guard compares with
    ``−∞`` and both reductions run along the last axis), ``lanes``: the target's SIMD width in float32 lanes."""

    @tvm.transform.module_pass(opt_level=0, name="FuseSafeSoftmax")
    def apply(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        pattern, parts = _pattern()
        bb = relax.BlockBuilder(mod)
        kernels: dict[tuple[tuple[int, ...], str], tvm.ir.GlobalVar] = {}

        def rewrite(call: relax.Call, match: dict) -> relax.Expr:
            x, soft, equal, reduce = (match[parts[k]] for k in ("x", "soft", "equal", "max"))
            ty = x.ty
            shape = getattr(ty, "shape", None)
            if str(getattr(ty, "dtype", "")) != "float32" or shape is None:
                return call
            try:
                dims = tuple(int(d) for d in shape)
            except (TypeError, ValueError):
                return call
            if not (_last_axis(soft, len(dims)) and _last_axis(reduce, len(dims))):
                return call
            if float(equal.args[1].value.numpy()) != float("-inf"):
                return call
            key = (dims, "float32")
            if key not in kernels:
                xt = te.placeholder([tirx.IntImm("int64", d) for d in dims], "float32", name="x")
                func = te.create_prim_func([xt, safe_softmax_te(xt, lanes)]).without_attr("global_symbol")
                kernels[key] = bb.add_func(func, "safe_softmax")
            return relax.call_tir(kernels[key], [x], relax.TensorType(dims, "float32"))

        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                bb.update_func(gv, relax.dpl.rewrite_call(pattern, rewrite, func))
        return relax.transform.DeadCodeElimination()(bb.finalize()) if kernels else mod

    return apply


def schedule_safe_softmax(sch: s_tir.Schedule, lanes: int) -> None:
    """One parallel loop over the rows; under it every stage of a row: the partial reductions with their
    ``lanes`` results innermost, vectorized; the short final chains; ``exp`` and the output vectorized along the
    row (a masked last vector where ``lanes`` does not divide it)."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    out = next(b for b in blocks if not sch.get_consumers(b))
    for b in blocks:  # the shift into exp; the result into what FuseOps appended (a broadcast_to: a copy)
        if b.same_as(out) or (sch.get(b).annotations.get(ROW_PARTIALS) and sch.get(b).name_hint != "safe_softmax"):
            continue
        if sch.get_consumers(b) and len(sch.get_consumers(b)) == 1:
            with contextlib.suppress(ValueError, RuntimeError):
                sch.compute_inline(b)
    loops = sch.get_loops(out)
    rows = len(loops) - 1
    row = sch.fuse(*loops[:rows]) if rows > 1 else loops[0]
    sch.parallel(row)
    for b in reversed(sch.get_child_blocks(sch.get_sblock("root"))):
        if not sch.get(b).same_as(sch.get(out)):
            sch.compute_at(b, row, preserve_unit_loops=True)
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        name = sch.get(b).name_hint
        inner = sch.get_loops(b)[-1]
        if name in ("pmax", "psum"):
            lane, red = sch.get_loops(b)[-2:]
            sch.reorder(red, lane)
            if int(sch.get(lane).extent) > 1:
                sch.vectorize(lane)
            continue
        if name in ("rowmax", "rowsum"):
            continue
        ext = int(sch.get(inner).extent)
        if ext > 1:
            if ext > lanes or ext % lanes:
                _, inner = sch.split(inner, [None, lanes])
            sch.vectorize(inner)
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(b).name_hint in ("pmax", "psum", "rowmax", "rowsum"):
            lp = sch.get_loops(b)
            sch.decompose_reduction(b, lp[-2] if sch.get(b).name_hint in ("pmax", "psum") else lp[-1])
