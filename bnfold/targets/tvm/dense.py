"""CPU schedule for matrix products: a transformer's dense layers (``(tokens, features) @ W`` + bias, GELU,
residual) and attention's batched products (``Q·Kᵀ``, ``P·V``), register-tiled like MLAS's sgemm kernels.

A kernel whose main reduction is a matrix product ::

    C[b…, i, j] = Σ_k A[b…, i, k] · B[b…, k, j]        (B: a weight W[k, j], or an activation with batch axes b)
    Y[b…, i, j] = f(C[b…, i, j], …)                     f: the elementwise epilogue (bias, GELU, residual add)

is computed as ``m × t`` tiles of vector accumulators — ``m`` vectors of ``j`` (the SIMD width each) by ``t`` rows
``i`` — held in registers across the whole reduction: every step of ``k`` loads ``m`` vectors of ``B`` and
broadcasts ``t`` values of ``A`` for ``m·t`` FMAs. Then, still per tile and from registers, ``f`` is applied and
the tile stored: the epilogue is one pass over the tile, not a kernel or a loop nest of its own (the GELU's stages
— scale, polynomial ``erf``, product — are inlined into one expression first).

* **Panels of B.** A weight ``B`` (a layout-free parameter, see :func:`mark_weight_operands`) is re-laid out once
  at load by MetaSchedule's ``RewriteLayout`` to the order this loop nest reads it: ``W'[j_o, k, j_m, j_v]`` —
  each tile's ``k × m·lanes`` panel one contiguous stream.
* **Row padding.** ``i`` is padded to a multiple of ``t`` (``pad_einsum``: 197 tokens, a prime, would otherwise
  leave a one-row tile, one vector load per FMA): the padded rows are computed and never stored — the epilogue
  runs on the real rows only. Each tile copies its ``t`` rows of ``A`` (zeros past the last row) into a small
  buffer before its reduction (:func:`_pack_rows`), so the reduction reads no row test.
  ``j`` of an activation ``B`` whose extent the SIMD width does not divide (``Kᵀ`` over 197 keys) is padded
  to whole vectors, one or more beyond when that allows a better tile; a weight never is.
* **Tile choice** (:func:`choose_tile`): ``m·t`` at most :func:`accumulators` (three quarters of the vector
  registers), the ``(m, t)`` with the most FMAs per load (``m·t / (m + t)``), less the share wasted on padding
  and on a last round of parallel units that leaves cores idle, among the tiles with enough accumulators to
  hide the FMA latency (at least half the budget).
* Loop order ``(b…, j_o, i_o) parallel · k · (j_m, i_t, the longer outside) · j_v``; ``j_m`` and ``i_t``
  unrolled, ``j_v`` vectorized.

Measured (Zen 5, 2 cores, AVX-512): ViT-S/DeiT-S linear layers at 400–430 GFLOP/s in isolation, against
120–150 with the generic reduction schedule (7-row tiles of 28 accumulators, the GELU applied in three more
parallel loops over memory).

The vector width and register count come from the target (:class:`~bnfold.targets.tvm.schedules.ScheduleParams`):
the same code runs 16-lane AVX-512 with up to 24 accumulators and 8-lane AVX2 with up to 12.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import tvm
from tvm import relax, s_tir
from tvm import tirx as tir

from bnfold.targets.tvm.tir_queries import is_einsum as _is_einsum
from bnfold.targets.tvm.tir_queries import is_reduction as _is_reduction
from bnfold.targets.tvm.tir_queries import loop_extent as _ext

__all__ = ["MatmulAxes", "choose_tile", "mark_weight_operands", "matmul_axes", "tile_matmul"]

Sampler = Callable[[s_tir.Schedule, Sequence[int], int], int] | None


@dataclass(frozen=True)
class MatmulAxes:
    """Positions among a block's iter vars: ``batch`` axes, rows ``i``, columns ``j`` (vectorized), reduction
    ``k``; ``a``, ``b``: the buffers read as ``A[…, i, k]`` and ``B[…, k, j]``."""

    batch: tuple[int, ...]
    i: int
    j: int
    k: int
    a: tir.Buffer
    b: tir.Buffer


def _used(exprs: Sequence[tir.PrimExpr]) -> set[str]:
    return {v.name for e in exprs for v in tir.analysis.undefined_vars(e, [])}


def matmul_axes(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> MatmulAxes | None:
    """The axes of ``block`` when it is a matrix product (one reduction axis ``k``; the output's last axis ``j``
    indexes ``B`` and not ``A``; a row axis ``i`` indexes ``A`` and the output and not ``B``; every access a
    point indexed by plain iter vars; every loop extent a constant), else None."""
    blk = sch.get(block)
    if not all(isinstance(sch.get(lp).extent, tir.IntImm) for lp in sch.get_loops(block)):
        return None  # a symbolic extent (a dynamic batch): left to the generic reduction schedule
    iters = [iv.var.name for iv in blk.iter_vars]
    kinds = [iv.iter_type for iv in blk.iter_vars]
    red = [n for n, kd in zip(iters, kinds, strict=True) if kd == tir.IterVar.CommReduce]
    if len(red) != 1 or any(kd not in (tir.IterVar.DataPar, tir.IterVar.CommReduce) for kd in kinds):
        return None
    if not _is_einsum(sch, block):
        return None
    out = blk.writes[0]
    out_axes = [str(rg.min.name) if isinstance(rg.min, tir.Var) else None for rg in out.region]
    j_name = out_axes[-1]
    k_name = red[0]
    operands = [r for r in blk.reads if not r.source.same_as(out.source)]
    if j_name is None or len(operands) != 2:
        return None
    by_axes = [(r.source, _used([rg.min for rg in r.region])) for r in operands]
    bs = [(buf, used) for buf, used in by_axes if j_name in used and k_name in used]
    as_ = [(buf, used) for buf, used in by_axes if j_name not in used and k_name in used]
    if len(bs) != 1 or len(as_) != 1:
        return None
    (b_buf, b_used), (a_buf, a_used) = bs[0], as_[0]
    rows = [n for n in out_axes[:-1] if n is not None and n in a_used and n not in b_used]
    if not rows:
        return None
    i_name = rows[-1]
    batch = tuple(n for n in iters if n not in (i_name, j_name, k_name))
    if any(kinds[iters.index(n)] != tir.IterVar.DataPar for n in batch):
        return None
    return MatmulAxes(tuple(iters.index(n) for n in batch), iters.index(i_name), iters.index(j_name),
                      iters.index(k_name), a_buf, b_buf)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_tile(rows: int, vectors: int, units_outer: int, registers: int, cores: int) -> tuple[int, int]:
    """``(m, t)``: ``m`` (a divisor of ``vectors``, the vectors along ``j``) by ``t`` rows, see the module
    docstring. ``units_outer``: parallel units besides the tiles (batch axes)."""
    return _best_tile(rows, vectors, units_outer, registers, cores)[1:]


def accumulators(registers: int) -> int:
    """Accumulators of a tile: three quarters of the vector registers (24 of AVX-512's 32, 12 of AVX2's 16); the
    rest hold ``B``'s vectors and ``A``'s broadcasts. Measured on Zen 5: a 4 × 7 tile (28) ran at half the speed
    of 4 × 6 (24), all tiles of 24 at 400–450 GFLOP/s on 2 cores."""
    return max(1, registers * 3 // 4)


def _best_tile(rows: int, vectors: int, units_outer: int, registers: int, cores: int) -> tuple[float, int, int]:
    """``(score, m, t)`` of :func:`choose_tile`; when no tile has enough accumulators to hide the FMA latency (a
    classifier's single row over 125 vectors of 8), the best of the others."""
    budget = accumulators(registers)
    best: tuple[bool, float, int, int] = (False, 0.0, 1, 1)
    for m in _divisors(vectors):
        if m > budget:
            break
        for t in range(1, min(budget // m, rows) + 1):
            padded = -(-rows // t) * t
            score = m * t / (m + t) * rows / padded
            units = units_outer * (vectors // m) * (padded // t)
            score *= units / (-(-units // cores) * cores)  # the last round of parallel units partly idle
            key = (2 * m * t >= min(budget, vectors * rows), score, m, t)
            if key[:2] > best[:2] and (key[0] > best[0] or score > best[1] + 1e-9):
                best = key
    return best[1:]




def _inline_epilogue_chain(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> None:
    """Inline every elementwise stage after ``block`` except the kernel's output into its consumers (a GELU's
    ``x/√2`` and polynomial ``erf`` into the product ``x·(½ + ½·erf)``), so one block is left after ``block``."""
    name = sch.get(block).name_hint
    changed = True
    while changed:
        changed = False
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        names = [sch.get(b).name_hint for b in blocks]
        after = blocks[names.index(name) + 1:]
        for b in after:
            if _is_reduction(sch, b) or not sch.get_consumers(b):
                continue
            try:
                sch.compute_inline(b)
            except (ValueError, RuntimeError):
                continue
            changed = True
            break


def _pack_rows(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, ax: MatmulAxes, tile: s_tir.schedule.LoopRV,
               lanes: int) -> None:
    """The padded copy of ``A`` (``pad_einsum``'s ``A_pad``), if any, computed per row tile inside the tile loop:
    ``t`` rows copied (vectorized along ``k``) into a small buffer, zeros past the last row, before the
    reduction. Measured against reading ``A`` in place with the row test in the reduction (``if_then_else`` on
    every broadcast): 1.1–1.5x faster on ViT's 197 tokens."""
    pads = [b for b in sch.get_producers(block) if sch.get(b).writes[0].source.name == f"{ax.a.name}_pad"]
    if not pads:
        return
    sch.compute_at(pads[0], tile)
    inner = sch.get_loops(pads[0])[-1]
    ext = _ext(sch, inner)
    if ext % lanes == 0:
        _, inner = sch.split(inner, [None, lanes])
        sch.vectorize(inner)
    elif ext >= lanes // 2:
        sch.vectorize(inner)


def tile_matmul(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, p: object, weights: Sequence[tir.Buffer],
                sampler: Sampler = None) -> None:
    """The schedule of the module docstring on ``block`` (a :func:`matmul_axes` product) and its epilogue.
    ``p``: the target's :class:`~bnfold.targets.tvm.schedules.ScheduleParams`; ``weights``: the buffers of the
    kernel's layout-free parameters (never padded); ``sampler``: picks ``m`` and ``t`` in a tuning space (None: the
    :func:`choose_tile` default). Raises ValueError when ``block`` is not such a product."""
    ax = matmul_axes(sch, block)
    if ax is None:
        raise ValueError("not a matrix product")
    lanes_max, registers, cores = p.lanes, p.registers, p.cores  # type: ignore[attr-defined]
    _inline_epilogue_chain(sch, block)
    loops = sch.get_loops(block)
    if len(loops) != len(sch.get(block).iter_vars):
        raise ValueError("block is not in its initial loop nest")
    exts = [_ext(sch, lp) for lp in loops]
    # a weight: layout-free, or a B with no batch axis of A's (a dense layer's W[k, j]; attention's Kᵀ[b, k, j]
    # shares the batch·head axis with Q: an activation)
    b_is_weight = any(ax.b.same_as(w) for w in weights) or not ax.batch or all(
        exts[i] == 1 for i in ax.batch)
    j_ext, i_ext = exts[ax.j], exts[ax.i]
    factors = [1] * len(loops)
    outer_units = 1
    for i in ax.batch:
        outer_units *= exts[i]
    if j_ext > lanes_max and j_ext % lanes_max and not b_is_weight:
        # pad j to whole vectors, or a vector or more beyond when that allows a wider tile (197 keys: 13 vectors,
        # prime, would leave 13 × 1 or 1 × t tiles; 14 vectors allow 7 × 3)
        whole = -(-j_ext // lanes_max)
        cands = [(_best_tile(i_ext, v, outer_units, registers, cores)[0] * j_ext / (v * lanes_max), v)
                 for v in range(whole, whole + 4)]
        j_ext = max(cands)[1] * lanes_max
        factors[ax.j] = j_ext
    lanes = max(d for d in _divisors(j_ext) if d <= lanes_max)
    vectors = j_ext // lanes
    if sampler is None:
        m, t = choose_tile(i_ext, vectors, outer_units, registers, cores)
    else:
        budget = accumulators(registers)
        m = sampler(sch, [d for d in _divisors(vectors) if d <= budget], 1)
        t = sampler(sch, list(range(1, max(1, min(budget // m, i_ext)) + 1)), 1)
    if i_ext % t:
        factors[ax.i] = t
    if any(f > 1 for f in factors):
        sch.pad_einsum(block, factors)
        for trim in sch.get_consumers(block):  # the padded output's trimming copy, inlined into the epilogue
            if sch.get_consumers(trim):
                sch.compute_inline(trim)
    consumers = sch.get_consumers(block)
    if len(consumers) > 1:
        raise ValueError("the product has several consumers")
    if consumers:
        sch.set_scope(block, 0, "local")
        epilogue = consumers[0]
    else:
        epilogue = sch.cache_write(block, 0, "local")
    loops = sch.get_loops(block)
    j_o, j_m, j_v = sch.split(loops[ax.j], [None, m, lanes])
    i_o, i_t = sch.split(loops[ax.i], [None, t])
    k = loops[ax.k]
    batch = [loops[i] for i in ax.batch]
    # the longer of the two unrolled tile loops outside (measured: the other order of a 3 × 8 tile ran at half
    # the speed)
    sch.reorder(*batch, j_o, i_o, k, *((j_m, i_t) if m >= t else (i_t, j_m)), j_v)
    _pack_rows(sch, block, ax, i_o, lanes_max)
    sch.unroll(j_m)
    sch.unroll(i_t)
    sch.vectorize(j_v)
    sch.reverse_compute_at(epilogue, i_o)
    e_loops = sch.get_loops(epilogue)
    inner = e_loops[-1]
    ext = _ext(sch, inner)
    if ext % lanes == 0 and ext >= lanes:
        if ext > lanes:
            _, inner = sch.split(inner, [None, lanes])
        sch.vectorize(inner)
    par = [*batch, j_o, i_o]
    sch.parallel(sch.fuse(*par))
    sch.decompose_reduction(block, k)


def _weight_vars(func: relax.Function) -> set[relax.Var]:
    """``func``'s weight parameters (those after its ``num_input`` runtime inputs) and every variable bound to an
    expression of weights and constants alone (a transposed weight: ``LiftTransformParams`` computes it at load)."""
    num_input = int((func.attrs or {}).get("num_input", len(func.params)))
    weights = set(func.params[num_input:])

    def only_weights(expr: relax.Expr) -> bool:
        free = relax.analysis.free_vars(expr)
        return all(v in weights for v in free)

    for block in getattr(func.body, "blocks", []):
        for binding in block.bindings:
            if isinstance(binding, relax.VarBinding) and only_weights(binding.value):
                weights.add(binding.var)
    return weights


def _is_matmul_kernel(func: tir.PrimFunc) -> bool:
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    blocks = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if _is_reduction(sch, b)]
    main = max(blocks, key=lambda b: len(sch.get_loops(b)), default=None)
    return main is not None and matmul_axes(sch, main) is not None


@tvm.transform.module_pass(opt_level=0, name="MarkWeightOperands")
def mark_weight_operands(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Mark as layout-free (``layout_free_buffers``) the operands of matrix-product kernels that every call passes
    a weight — a parameter, a constant, or a value computed from them alone, like the transposed weight of a
    ``Linear`` (``AttachAttrLayoutFreeBuffers`` marks parameters and constants only) — so ``RewriteLayout`` packs
    them into panels once at load. Other kernels (convolutions) are left as they are."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    verdict: dict[str, dict[int, bool]] = {}
    for _gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        weights = _weight_vars(func)

        def visit(expr: relax.Expr, weights: set[relax.Var] = weights) -> None:
            if not (isinstance(expr, relax.Call) and expr.op.same_as(call_tir)):
                return
            args = expr.args[1].fields if isinstance(expr.args[1], relax.Tuple) else [expr.args[1]]
            per = verdict.setdefault(expr.args[0].name_hint, {})
            for i, a in enumerate(args):
                is_weight = isinstance(a, tvm.ir.expr.Constant) or (isinstance(a, relax.Var) and a in weights)
                per[i] = per.get(i, True) and is_weight

        relax.analysis.post_order_visit(func.body, visit)
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tir.PrimFunc) or gv.name_hint not in verdict:
            continue
        marked = {int(i) for i in (func.attrs or {}).get("layout_free_buffers", [])}
        add = {i for i, w in verdict[gv.name_hint].items() if w} - marked
        if not add or not _is_matmul_kernel(func):
            continue
        updates[gv] = func.with_attr("layout_free_buffers", sorted(marked | add))
    for gv, func in updates.items():
        mod[gv] = func
    return mod
