"""Hand-written CPU schedules for the fused kernels of a legalized Relax module: what an *untuned* build runs,
and a design space that MetaSchedule tunes (the same function with sampled tile sizes).

The kernels that matter are reductions with an elementwise epilogue: ``conv2d`` (+ bias, residual add,
activation) on blocked ``NCHW[c]c`` data (:mod:`bnfold.targets.tvm.layout`) or plain NCHW, depthwise/grouped
conv, ``matmul`` (+ bias). One mechanism schedules them all — a register-tiled reduction (the direct-convolution
scheme of oneDNN's, MLAS's and TVM's old x86 NCHWc kernels):

    out[s_1 … s_k, v] = Σ_r  A[…] · B[…]          (v: the *vector axis*, r: every reduction axis)

* the vector axis ``v`` (split to ``v_i`` = the SIMD width: 16 fp32 lanes with AVX-512, 8 with AVX2) is a
  *weight-only* axis — one the weights are indexed by and the input is not, the innermost in the output if there
  are several (NCHW[c]c: the ``c`` in ``C/c·c``; NCHW, matmul: the output channel) — else the output's innermost
  axis (depthwise: channels are independent planes, so the width);
* ``m`` register blocks come from the rest of the vector axis (plain NCHW: 64 channels = 4 vectors) or from a
  second weight-only axis (NCHW[c]c: ``C/c``), ``t`` from the output width; the ``m × t`` vector accumulators
  live in registers (a ``local`` buffer with ``v`` last, fully unrolled); a step's ``m·t`` accumulators, ``m``
  weight vectors and ``t`` broadcasts must fit the register file (``m·t + m + t ≤ registers``: past it LLVM
  spills and the kernel runs 2–2.5x slower), and among the tiles with enough accumulators the one with the
  fewest loads per FMA is taken (AVX-512: 3 × 7 or 2 × 7 rather than 4 × 7);
* loop order ``(outer spatial, parallel) · t_o · r… · m · t_i · v_i`` — or, when the weights outweigh the input
  (1×1 convs on a 7×7 map: 1.6 MB of weights, 63 KB of input), the output-channel blocks outermost, so each
  core streams its own share of the weights once instead of all of them once per row: every reduction step is
  ``m`` vector loads
  of the weights (re-laid out once at build time by MetaSchedule's ``RewriteLayout`` so that ``v_i`` is
  contiguous) and ``t`` broadcasts of the input; with blocked input the input-channel reduction is split
  ``ic = (ic_o, ic_i)``, ``ic_i`` innermost, so consecutive broadcasts read one cache line;
* the epilogue (bias, residual add, clip/ReLU) is computed per tile right after its accumulation, from registers;
  when the reduction's consumer is not pointwise (a Winograd output transform reads all (m+2)² products of a
  tile), the tile is stored from registers and the consumer scheduled on its own.

Winograd transforms (blocks annotated :data:`~bnfold.targets.tvm.winograd.UNROLL`) get :func:`unroll_tile`: the
coordinates inside a tile unrolled so the per-point coefficients fold to constants, the channel lanes vectorized,
the elementwise chain after the output transform folded into it.

Everything else (pads, pools, means, layout transforms, elementwise) gets a parallel outer loop and a vectorized
inner loop. ``ScheduleParams`` carries the target's SIMD width and register count; :func:`tiled_space` is the
same schedule with ``m`` and ``t`` sampled: a MetaSchedule design space.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import tvm
from tvm import s_tir
from tvm import tirx as tir
from tvm.s_tir import meta_schedule as ms

from bnfold.targets.tvm.attention import ROW_PARTIALS, schedule_safe_softmax
from bnfold.targets.tvm.channel_norm import schedule_channel_norm
from bnfold.targets.tvm.dense import matmul_axes, tile_matmul
from bnfold.targets.tvm.tir_queries import is_einsum as _is_einsum
from bnfold.targets.tvm.tir_queries import is_reduction as _is_reduction
from bnfold.targets.tvm.tir_queries import loop_extent as _ext
from bnfold.targets.tvm.winograd import UNROLL

__all__ = ["ScheduleParams", "apply_default_schedules", "has_tile_transforms", "params_for", "schedule_kernel",
           "tiled_space"]

log = logging.getLogger(__name__)

SCHEDULED = "tirx.is_scheduled"

LOWERING_VERSION = 9
"""Bumped whenever the CPU lowering (layouts, legalization) or the hand schedules change: part of the tuning
database's folder name, so records measured against older kernels are not applied over newer defaults."""

Sampler = Callable[[s_tir.Schedule, Sequence[int], int], int] | None
"""Picks a tile size among candidates (``None``: the largest that fits, the default schedule)."""


@dataclass(frozen=True)
class ScheduleParams:
    """``lanes``: fp32 lanes per vector register; ``registers``: vector registers; ``cores``: parallel width."""

    lanes: int
    registers: int
    cores: int


def params_for(target: tvm.target.Target) -> ScheduleParams:
    """SIMD width and register file of an LLVM target, from the features LLVM enables for its ``mcpu``."""
    import tvm.target.codegen as codegen

    feats = {str(f) for f in codegen.llvm_get_cpu_features(target)}
    cores = int(target.attrs.get("num-cores", 1) or 1)
    if "avx512f" in feats:
        return ScheduleParams(16, 32, cores)
    if "avx2" in feats or "avx" in feats:
        return ScheduleParams(8, 16, cores)
    return ScheduleParams(4, 16, cores)  # SSE / NEON



def _ext_or_big(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int:
    """A loop's extent, a symbolic extent counted as large (it is a batch dimension)."""
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tir.IntImm) else 1 << 20


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]



def _main_reduction(sch: s_tir.Schedule) -> s_tir.schedule.SBlockRV | None:
    """The reduction block with the most loops (the conv/matmul of a fused kernel), if any."""
    blocks = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if _is_reduction(sch, b)]
    return max(blocks, key=lambda b: len(sch.get_loops(b)), default=None)


def _loop_vars_used(expr_list: Sequence[tir.PrimExpr]) -> set[str]:
    return {v.name for e in expr_list for v in tir.analysis.undefined_vars(e, [])}


def _weights(sch: s_tir.Schedule) -> list[tir.Var]:
    """Buffers holding weights: every parameter's buffer after the first (the data) — after ``ConvertLayout`` a
    conv's weight is a re-laid-out copy, which Relax does not mark layout-free. Compared by object, not name: a
    kernel's data and weight parameters can share a name (mobilenet_v2's first depthwise conv: both ``lv3``)."""
    func = sch.mod[sch.func_working_on]
    return list(func.params)[1:]


def _is_weight(buf: tir.Var, weights: Sequence[tir.Var]) -> bool:
    return any(buf.same_as(w) for w in weights)


def _weight_only_axes(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> list[int]:
    """Spatial iter vars that only layout-free operands (the weights) are indexed by: along them every step
    loads a different weight and reuses the same input (an output channel, plain or blocked)."""
    blk = sch.get(block)
    free_bufs = _weights(sch)
    reads = [(r.source, _loop_vars_used([rg.min for rg in r.region])) for r in blk.reads]
    out = []
    for i, iv in enumerate(blk.iter_vars):
        users = [b for b, used in reads if iv.var.name in used]
        if iv.iter_type == tir.IterVar.DataPar and users and all(_is_weight(b, free_bufs) for b in users):
            out.append(i)
    return out


def _vector_axis(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, weight_only: Sequence[int]) -> int | None:
    """Index (among the block's iter vars) of the axis to vectorize, see the module docstring: a weight-only axis,
    the one innermost in the output if several (NCHW[c]c's ``c`` before ``C/c``); else the output's innermost."""
    blk = sch.get(block)
    if weight_only:
        return max(weight_only, key=lambda i: _out_position(sch, block, i) or 0)
    out_last = _loop_vars_used([blk.writes[0].region[-1].min])
    for i, iv in enumerate(blk.iter_vars):
        if iv.iter_type == tir.IterVar.DataPar and iv.var.name in out_last:
            return i
    return None


def _inline_epilogue(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> s_tir.schedule.SBlockRV | None:
    """Inline the elementwise blocks after ``block`` into the last one; return that block (None: no epilogue).

    A block is inlined into its consumers when every one of them reads it pointwise, so a diamond — SiLU's
    ``x · sigmoid(x)`` reads the conv's output twice, through the sigmoid's stages and directly — folds into one
    expression computed per tile from registers. A block read by a broadcast (a squeeze-excite gate times the
    feature map) is not: the epilogue stops there, the gate is computed once per channel, not once per pixel,
    and the broadcast runs as its own loop."""
    consumers = sch.get_consumers(block)
    if not consumers or not all(_reads_pointwise(sch, c, block) for c in consumers):
        return None  # e.g. a Winograd output transform: it reads a whole tile of the product
    changed = True
    while changed:
        changed = False
        for b in _downstream(sch, block):
            after = sch.get_consumers(b)
            if not after or _is_reduction(sch, b) or not all(_reads_pointwise(sch, a, b) for a in after):
                continue
            sch.compute_inline(b)
            changed = True
            break
    consumers = sch.get_consumers(block)
    return consumers[0] if len(consumers) == 1 and _reads_pointwise(sch, consumers[0], block) else None


def _downstream(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> list[s_tir.schedule.SBlockRV]:
    """The blocks that read ``block``'s output, directly or through others, in program order."""
    names, todo = set(), [block]
    while todo:
        for c in sch.get_consumers(todo.pop()):
            name = sch.get(c).name_hint
            if name not in names:
                names.add(name)
                todo.append(c)
    return [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint in names]


def _reads_pointwise(sch: s_tir.Schedule, consumer: s_tir.schedule.SBlockRV,
                     producer: s_tir.schedule.SBlockRV) -> bool:
    """``consumer`` reads ``producer``'s output only at the point it writes (``y[i…] = f(x[i…], …)``)."""
    buf = sch.get(producer).writes[0].source
    blk = sch.get(consumer)
    at = [str(rg.min) for rg in blk.writes[0].region]
    return all([str(rg.min) for rg in r.region] == at for r in blk.reads if r.source.same_as(buf))


def _pick(sch: s_tir.Schedule, options: Sequence[int], sampler: Sampler) -> int:
    if sampler is None or len(options) == 1:
        return max(options)
    return sampler(sch, options, max(options))


def tile_reduction(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, p: ScheduleParams,
                   sampler: Sampler = None) -> None:
    """The register-tiled reduction of the module docstring on ``block`` (and its epilogue)."""
    weight_only = _weight_only_axes(sch, block)
    vec = _vector_axis(sch, block, weight_only)
    if vec is None:
        raise ValueError("no axis to vectorize")
    if not weight_only:  # depthwise: the padding is read in place, not copied first
        _inline_producers(sch, block)
    padded_tile = _pad_einsum(sch, block, vec, weight_only, p)
    epilogue = _inline_epilogue(sch, block)
    blk = sch.get(block)
    kinds = [iv.iter_type for iv in blk.iter_vars]
    loops = sch.get_loops(block)
    if len(loops) != len(kinds):
        raise ValueError("block is not in its initial loop nest")
    spatial = [i for i, k in enumerate(kinds) if k == tir.IterVar.DataPar]
    red = [loops[i] for i, k in enumerate(kinds) if k == tir.IterVar.CommReduce]
    v_ext = _ext(sch, loops[vec])
    lanes = max(d for d in _divisors(v_ext) if d <= p.lanes)
    # register blocks along the vector axis itself (plain NCHW: 64 channels = 4 vectors), else along another
    # weight-only axis (blocked NCHWc: the channel-block axis C/c)
    m_axis = None
    if v_ext == lanes:
        extra = [i for i in weight_only if i != vec and _ext_or_big(sch, loops[i]) > 1]
        m_axis = extra[0] if extra else None
    m_total = v_ext // lanes if m_axis is None else _ext(sch, loops[m_axis])
    # the tile axis: the innermost spatial axis other than those, with extent > 1
    others = [i for i in spatial if i not in (vec, m_axis) and _ext_or_big(sch, loops[i]) > 1]
    t_axis = others[-1] if others else None
    # accumulators in registers: v last in a local buffer
    ndim = len(sch.get(block).writes[0].region)
    if epilogue is None:
        acc = sch.cache_write(block, 0, "local")
        epilogue = acc
    else:
        sch.set_scope(block, 0, "local")
    vpos = _out_position(sch, block, vec)
    if vpos is not None and vpos != ndim - 1:
        order = [i for i in range(ndim) if i != vpos] + [vpos]
        sch.transform_layout(block, ("write", 0), tir.IndexMap.from_func(
            lambda *ax: [ax[i] for i in order], ndim=ndim))
    t_ext = _ext(sch, loops[t_axis]) if t_axis is not None else 1
    m_opts = [d for d in _divisors(m_total) if _fits(d, 1, p)]
    if sampler is None and padded_tile is not None:
        m, ti = padded_tile
    else:
        m = _pick(sch, m_opts, sampler) if sampler else _best_m(m_opts, _divisors(t_ext), p)
        t_opts = [d for d in _divisors(t_ext) if _fits(m, d, p)] or [1]
        ti = _pick(sch, t_opts, sampler)
    if m_axis is None:
        v_o, v_m, v_i = sch.split(loops[vec], [None, m, lanes])
        heads = [v_o]
    else:
        m_o, v_m = sch.split(loops[m_axis], [None, m])
        v_o, v_i = sch.split(loops[vec], [None, lanes])
        heads = [m_o, v_o]
    rows = [i for i in spatial if i not in (vec, t_axis, m_axis)]
    outer = [loops[i] for i in rows]
    first = [*heads, *outer] if _weights_outermost(sch, block, rows) else [*outer, *heads]
    red = _blocked_reduction_order(sch, block, red, p)
    if t_axis is not None:
        t_o, t_i = sch.split(loops[t_axis], [None, ti])
        sch.reorder(*first, t_o, *red, v_m, t_i, v_i)
        tile_loop = t_o
        sch.unroll(t_i)
    else:
        sch.reorder(*first, *red, v_m, v_i)
        tile_loop = first[-1]
    sch.unroll(v_m)
    sch.vectorize(v_i)
    sch.reverse_compute_at(epilogue, tile_loop)
    _vectorize_innermost(sch, epilogue, p)
    n_par = len(outer) + len(heads)
    if t_axis is not None and _work(sch, sch.get_loops(block)[:n_par]) < 16 * p.cores:
        n_par += 1  # too few output blocks to keep every core busy: the tiles of t run in parallel too
    par = sch.get_loops(block)[:n_par]  # the reorder put these first
    fused = sch.fuse(*par) if len(par) > 1 else par[0]
    sch.parallel(fused)
    sch.decompose_reduction(block, red[0] if red else v_m)


def _size(var: tir.Var) -> int:
    """Bytes of a buffer parameter (a symbolic extent counted as large)."""
    ty = var.ty
    n = tvm.DataType(str(ty.dtype)).bits // 8
    for d in ty.shape:
        n *= int(d) if isinstance(d, tir.IntImm) else 1 << 20
    return n


def _weights_outermost(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, rows: Sequence[int]) -> bool:
    """Whether the output-channel blocks are the outermost (parallel) loops rather than the spatial rows.

    Rows outermost (``n, h, oc_o``) reads each input row once and *every* weight once per row: right while the
    weights are small next to the input (the first layers of a CNN). On a small map with many channels (a 1×1
    conv 320 → 1280 on 7×7: 1.6 MB of weights, 63 KB of input) that re-reads the weights from L3 for each of the
    7 rows. Channel blocks outermost (``oc_o, n, h``) gives each core its own contiguous share of the weights,
    each panel (``m`` blocks × the reduction) read once and reused from cache over every row, and re-reads the
    input instead, once per channel block. Chosen when the weights read are more bytes than the data read and no
    row axis (iter vars ``rows``) indexes them: a Winograd product's weights differ per transform point (its
    rows), so there is no panel to reuse."""
    blk = sch.get(block)
    free = _weights(sch)
    weights = [r for r in blk.reads if _is_weight(r.source, free)]
    row_names = {blk.iter_vars[i].var.name for i in rows}
    if not weights or any(row_names & _loop_vars_used([rg.min for rg in r.region]) for r in weights):
        return False
    read = [p for p in free if any(r.source.same_as(p) for r in weights)]  # each buffer once
    return sum(_size(p) for p in read) > _size(_data_param(sch))


def _work(sch: s_tir.Schedule, loops: Sequence[s_tir.schedule.LoopRV]) -> int:
    """Iterations of a loop nest (a symbolic extent counted as large)."""
    n = 1
    for lp in loops:
        n *= _ext_or_big(sch, lp)
    return n


def _data_param(sch: s_tir.Schedule) -> tir.Var:
    """The kernel's first parameter's buffer (its data input)."""
    return sch.mod[sch.func_working_on].params[0]


def _layout_free(sch: s_tir.Schedule) -> list[tir.Var]:
    """The function's parameters Relax marked layout-free (constant weights)."""
    func = sch.mod[sch.func_working_on]
    params = list(func.params)
    return [params[int(i)] for i in (func.attrs or {}).get("layout_free_buffers", [])]


def _intensity(m: int, t: int, t_ext: int) -> float:
    """FMAs per load of an ``m × t`` register tile (``m`` vector loads and ``t`` broadcasts per ``m·t`` FMAs), less
    the share spent on padding when ``t`` does not divide the tile axis's ``t_ext``."""
    padded = -(-t_ext // t) * t
    return m * t / (m + t) * t_ext / padded


def _pad_einsum(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, vec: int, weight_only: Sequence[int],
                p: ScheduleParams) -> tuple[int, int] | None:
    """Pad a matmul-like reduction (:func:`_is_einsum`) whose extents leave the register tile poor: the vector
    axis to a multiple of the SIMD width when it has none (attention's ``Q·Kᵀ`` over 197 tokens: scalar code
    otherwise), and the tile axis (a transformer's token rows: 197 is prime, so the tile was one row wide) to a
    multiple of the tile that fits the registers best. Only activations are padded — copies made per call, cheap
    next to the product — never a weight (a layout-free parameter): the tile is then left as it is. The padded
    rows and columns are computed and never stored (``pad_einsum``'s consumer block trims them). Returns the
    ``(m, t)`` tile the tile axis was padded for (None: not padded, the tile is chosen as usual)."""
    if not _is_einsum(sch, block):
        return None
    blk = sch.get(block)
    loops = sch.get_loops(block)
    if len(loops) != len(blk.iter_vars):
        return None
    kinds = [iv.iter_type for iv in blk.iter_vars]
    reads = [(r.source, _loop_vars_used([rg.min for rg in r.region])) for r in blk.reads]
    spatial_names = {iv.var.name for iv in blk.iter_vars if iv.iter_type == tir.IterVar.DataPar}
    data = _data_param(sch)
    data_axes = set().union(*(used for buf, used in reads if buf.same_as(data))) & spatial_names
    frozen = _layout_free(sch)
    # a weight: layout-free, or an operand other than the data that shares no spatial axis with it (a dense
    # layer's W[k, n]; attention's Kᵀ[b, k, j] shares the batch·head axis b with Q: an activation)
    weights = [buf for buf, used in reads if _is_weight(buf, frozen)
               or (not buf.same_as(data) and not (used & data_axes))]

    def paddable(axis: int) -> bool:  # no weight is indexed by the axis
        name = blk.iter_vars[axis].var.name
        return not any(name in used and _is_weight(buf, weights) for buf, used in reads)

    exts = [_ext_or_big(sch, lp) for lp in loops]
    factors = [1] * len(loops)
    v_ext = exts[vec]
    if v_ext > p.lanes and v_ext % p.lanes and paddable(vec):
        factors[vec] = p.lanes
        v_ext = -(-v_ext // p.lanes) * p.lanes
    spatial = [i for i, k in enumerate(kinds) if k == tir.IterVar.DataPar]
    m_axis = None
    if v_ext == p.lanes or (v_ext < p.lanes and factors[vec] == 1):
        extra = [i for i in weight_only if i != vec and exts[i] > 1]
        m_axis = extra[0] if extra else None
    lanes = p.lanes if factors[vec] > 1 else max(d for d in _divisors(v_ext) if d <= p.lanes)
    m_total = v_ext // lanes if m_axis is None else exts[m_axis]
    others = [i for i in spatial if i not in (vec, m_axis) and exts[i] > 1]
    tile = None
    if others and exts[others[-1]] < 1 << 20 and paddable(others[-1]):
        t_axis, t_ext = others[-1], exts[others[-1]]
        m_opts = [d for d in _divisors(m_total) if _fits(d, 1, p)]
        m = _best_m(m_opts, _divisors(t_ext), p)
        t = max(d for d in _divisors(t_ext) if _fits(m, d, p))
        # the tiles with enough accumulators to hide the FMA latency, by FMAs per load
        score, pm, pt = max((_intensity(pm, pt, t_ext), pm, pt) for pm in m_opts
                            for pt in range(1, p.registers) if _fits(pm, pt, p) and _hides_latency(pm, pt, p))
        if score >= 1.15 * _intensity(m, t, t_ext):
            factors[t_axis] = pt
            tile = (pm, pt)
    if any(f > 1 for f in factors):
        sch.pad_einsum(block, factors)
    return tile


def _blocked_reduction_order(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV,
                             red: list[s_tir.schedule.LoopRV], p: ScheduleParams) -> list[s_tir.schedule.LoopRV]:
    """With blocked input (NCHW[c]c: ``x[…, ic // c, …, ic % c]``), the reduction over input channels is split
    ``ic = (ic_o, ic_i)`` and ``ic_i`` moved innermost, so consecutive steps broadcast from one cache line."""
    if len(red) < 2:
        return red
    blk = sch.get(block)
    free = _weights(sch)
    first = next(iv for iv in blk.iter_vars if iv.iter_type == tir.IterVar.CommReduce).var.name
    blocked = any(not _is_weight(r.source, free) and first in _loop_vars_used([r.region[-1].min])
                  for r in blk.reads)
    ext = _ext_or_big(sch, red[0])
    if not blocked or ext % p.lanes or ext == p.lanes:
        return red
    r_o, r_i = sch.split(red[0], [None, p.lanes])
    return [r_o, *red[1:], r_i]


def _fits(m: int, t: int, p: ScheduleParams) -> bool:
    """Whether an ``m × t`` tile's reduction step fits the vector registers: ``m·t`` accumulators plus the ``m``
    weight vectors and ``t`` broadcast inputs that LLVM loads before the step's FMAs. Past that it spills.
    Measured on Zen 5 (AVX-512, 2 threads, each 1×1 conv of mobilenet_v2 alone): 24 → 144 on 56×56 ran 51 µs as
    3 × 7 (31 registers) and 121 µs as 3 × 8 (35); 320 → 1280 on 7×7 80 µs as 2 × 7 and 141 µs as 4 × 7 (39).
    The dense kernels (:mod:`bnfold.targets.tvm.dense`) order their loads differently and have their own bound."""
    return m * t + m + t <= p.registers


def _hides_latency(m: int, t: int, p: ScheduleParams) -> bool:
    """Enough independent accumulators to keep the FMA pipes busy: half the registers, less the operands."""
    return 2 * m * t >= p.registers - 4


def _best_m(m_opts: Sequence[int], t_opts: Sequence[int], p: ScheduleParams) -> int:
    """Register blocks: among the tiles that fit (:func:`_fits`) with enough accumulators
    (:func:`_hides_latency`), the fewest loads per FMA (``m`` vector loads + ``t`` broadcasts for ``m·t``
    FMAs), then the most accumulators. A 20 × 1 tile fills the registers but loads once per FMA; 3 × 7 loads
    10 times per 21 FMAs."""
    tiles = [(m, t) for m in m_opts for t in t_opts if _fits(m, t, p)]
    if not tiles:
        return 1
    enough = [mt for mt in tiles if _hides_latency(*mt, p)] or tiles
    return max(enough, key=lambda mt: (mt[0] * mt[1] / (mt[0] + mt[1]), mt[0] * mt[1]))[0]


def _out_position(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, axis: int) -> int | None:
    """Which dimension of the block's output the iter var ``axis`` indexes."""
    blk = sch.get(block)
    name = blk.iter_vars[axis].var.name
    for d, rg in enumerate(blk.writes[0].region):
        if name in _loop_vars_used([rg.min]):
            return d
    return None


def _vectorize_innermost(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, p: ScheduleParams) -> None:
    loops = sch.get_loops(block)
    if loops and _ext_or_big(sch, loops[-1]) in (p.lanes, 2 * p.lanes, p.lanes // 2):
        sch.vectorize(loops[-1])


def schedule_elementwise(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, p: ScheduleParams) -> None:
    """Parallel outer loops (enough iterations for every core), vectorized innermost loop when it is spatial."""
    blk = sch.get(block)
    loops = sch.get_loops(block)
    if not loops:
        return
    kinds = [iv.iter_type for iv in blk.iter_vars] if len(blk.iter_vars) == len(loops) else None
    n_spatial = len(loops) if kinds is None else next(
        (i for i, k in enumerate(kinds) if k != tir.IterVar.DataPar), len(loops))
    if n_spatial == 0:
        return
    par, work = [], 1
    for lp in loops[:n_spatial]:
        par.append(lp)
        work *= _ext_or_big(sch, lp)
        if work >= 8 * p.cores:
            break
    if len(par) == n_spatial == len(loops) and len(par) > 1:
        par = par[:-1]  # keep the innermost to vectorize
    if par:
        sch.parallel(sch.fuse(*par) if len(par) > 1 else par[0])
    inner = sch.get_loops(block)[-1]
    if n_spatial == len(loops) and not any(inner.same_as(lp) for lp in par):
        ext = _ext_or_big(sch, inner)
        if p.lanes <= ext < 1 << 20:
            if ext > 4 * p.lanes:
                _, inner = sch.split(inner, [None, p.lanes])
            sch.vectorize(inner)


def _reads_weights(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    weights = _weights(sch)
    return any(_is_weight(r.source, weights) for r in sch.get(block).reads)


def _inline_producers(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> None:
    """Compute ``block``'s elementwise producers (a padding) inline where they are read."""
    for producer in sch.get_producers(block):
        if not _is_reduction(sch, producer) and len(sch.get_consumers(producer)) == 1:
            sch.compute_inline(producer)


def window_reduction(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, p: ScheduleParams) -> None:
    """A reduction over a window of its input with no weights (max/avg pool, mean): the padding is computed
    inline, the innermost output axis split by the SIMD width with the window loops outside it (unrolled), the
    other output axes parallel; vectorized when the input is read contiguously along that axis (blocked
    NCHW[c]c pools), else left to scalar code (a strided NCHW pool would be a gather)."""
    _inline_producers(sch, block)
    blk = sch.get(block)
    loops = sch.get_loops(block)
    kinds = [iv.iter_type for iv in blk.iter_vars]
    if len(loops) != len(kinds):
        raise ValueError("block is not in its initial loop nest")
    red = [loops[i] for i, k in enumerate(kinds) if k == tir.IterVar.CommReduce]
    inner = max(i for i, k in enumerate(kinds) if k == tir.IterVar.DataPar)
    outer = [loops[i] for i, k in enumerate(kinds) if k == tir.IterVar.DataPar and i != inner]
    if not outer:
        raise ValueError("nothing to run in parallel")
    width = max(d for d in _divisors(_ext(sch, loops[inner])) if d <= p.lanes)
    var = blk.iter_vars[inner].var
    contiguous = any(r.region[-1].min.same_as(var) for r in blk.reads)  # x[…, c] read as x[…, c]
    i_o, i_i = sch.split(loops[inner], [None, width])
    sch.reorder(*outer, i_o, *red, i_i)
    for r in red:
        if _ext(sch, r) <= 16:
            sch.unroll(r)
    if contiguous and width == p.lanes:
        sch.vectorize(i_i)
    else:
        sch.unroll(i_i)
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    if red:
        sch.decompose_reduction(block, red[0])
    consumer = sch.get_consumers(block)
    if len(consumer) == 1 and not sch.get_consumers(consumer[0]):
        sch.reverse_compute_at(consumer[0], i_o)


def _inline_single_use(sch: s_tir.Schedule) -> None:
    """Inline every elementwise block that feeds exactly one other block (a cast, a mask, a reshape, a
    polynomial's stages) into it, until nothing changes: one loop nest instead of one per op."""
    changed = True
    while changed:
        changed = False
        for b in sch.get_child_blocks(sch.get_sblock("root")):
            if _is_reduction(sch, b) or len(sch.get_consumers(b)) != 1:
                continue
            try:
                sch.compute_inline(b)
            except (ValueError, RuntimeError):  # e.g. a block that writes an output buffer
                continue
            changed = True
            break


def _row_shape(sch: s_tir.Schedule) -> int | None:
    """The number of leading *row* axes of a kernel that reduces along its last axis and broadcasts the result
    back (softmax, LayerNorm, RMSNorm): every reduction block's loops are those rows then one reduction, the
    output has the rows then the reduced axis. None when the kernel is not such a row kernel."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    out = [b for b in blocks if not sch.get_consumers(b)]
    reds = [b for b in blocks if _is_reduction(sch, b)]
    if len(out) != 1 or not reds or _is_reduction(sch, out[0]):
        return None
    out_ext = [_ext_or_big(sch, lp) for lp in sch.get_loops(out[0])]
    rows = len(out_ext) - 1
    for b in reds:
        kinds = [iv.iter_type for iv in sch.get(b).iter_vars]
        exts = [_ext_or_big(sch, lp) for lp in sch.get_loops(b)]
        if kinds != [tir.IterVar.DataPar] * rows + [tir.IterVar.CommReduce] or exts[:rows] != out_ext[:rows]:
            return None
        if exts[-1] != out_ext[-1]:
            return None
    return rows if rows > 0 else None


def row_reduction(sch: s_tir.Schedule, rows: int, p: ScheduleParams) -> None:
    """A row kernel (:func:`_row_shape`: softmax, LayerNorm): each row computed by one core, start to end, in
    cache. Single-use elementwise stages are inlined; each reduction over the row is split into ``w`` partial
    results (``rfactor``, ``w`` the largest divisor of the row length up to the SIMD width, at least 4)
    accumulated as one vector — independent accumulators instead of one scalar dependency chain — then reduced;
    the elementwise stages (``exp``, the normalization) are vectorized along the row (a row length the SIMD
    width does not divide, 197 tokens, gets a masked last vector)."""
    _inline_single_use(sch)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    out = next(b for b in blocks if not sch.get_consumers(b))
    partial = []
    for b in blocks:
        if not _is_reduction(sch, b):
            continue
        k = sch.get_loops(b)[-1]
        # partial results only where a vector width divides the row: a split with a remainder would need a
        # predicate, which compute_at drops from an rfactor block (TVM 0.27); such rows (197 tokens: prime)
        # keep one scalar accumulator
        width = max(d for d in _divisors(_ext(sch, k)) if d <= p.lanes)
        if width < 4 or width == _ext(sch, k):
            continue
        _, ki = sch.split(k, [None, width])
        partial.append(sch.rfactor(ki, rows))
    loops = sch.get_loops(out)
    row = sch.fuse(*loops[:rows]) if rows > 1 else loops[0]
    sch.parallel(row)
    for b in reversed(sch.get_child_blocks(sch.get_sblock("root"))):
        if sch.get(b).name_hint != sch.get(out).name_hint:
            sch.compute_at(b, row, preserve_unit_loops=True)
    rf_names = {sch.get(r).name_hint for r in partial}
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(b).name_hint in rf_names:  # the partial results' lanes innermost, then vectorized
            lanes = _loop_of_iter(sch, b, 0)
            rest = [lp for lp in sch.get_loops(b)[1:] if not sch.get(lp).same_as(sch.get(lanes))]
            sch.reorder(*rest, lanes)
            sch.vectorize(lanes)
            continue
        inner = sch.get_loops(b)[-1]
        if not _is_reduction(sch, b) and _ext(sch, inner) > 1:
            if _ext(sch, inner) % p.lanes or _ext(sch, inner) > p.lanes:
                _, inner = sch.split(inner, [None, p.lanes])
            sch.vectorize(inner)


def _loop_of_iter(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, index: int) -> s_tir.schedule.LoopRV:
    """The loop that iter var ``index`` of ``block`` is bound to (the only loop its binding uses)."""
    from tvm.s_tir import SBlockRealize

    loops = sch.get_loops(block)
    name = sch.get(block).name_hint
    found: list[SBlockRealize] = []

    def visit(stmt: object) -> None:
        if isinstance(stmt, SBlockRealize):
            if stmt.block.name_hint == name:
                found.append(stmt)
            return
        if isinstance(stmt, tir.SeqStmt):
            for c in stmt.seq:
                visit(c)
        elif getattr(stmt, "body", None) is not None:
            visit(stmt.body)

    visit(sch.get(loops[0]))
    used = _loop_vars_used([found[0].iter_values[index]])
    match = [lp for lp in loops if sch.get(lp).loop_var.name in used]
    if len(match) != 1:
        raise ValueError(f"iter var {index} of {name} is not bound to one loop")
    return match[0]


def unroll_tile(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, p: ScheduleParams) -> None:
    """A block annotated with :data:`~bnfold.targets.tvm.winograd.UNROLL` (a Winograd transform: each point of a
    tile is its own expression, selected by the point's coordinates): the elementwise chain after it folded in,
    each annotated axis split by its factor with the inner part unrolled — the selections then resolve at compile
    time — the outer axes parallel, the last axis (channel lanes) vectorized innermost."""
    factors = [int(f) for f in sch.get(block).annotations[UNROLL]]
    consumers = sch.get_consumers(block)
    while len(consumers) == 1 and _reads_pointwise(sch, consumers[0], block):
        sch.reverse_compute_inline(consumers[0])
        consumers = sch.get_consumers(block)
    loops = sch.get_loops(block)
    if len(loops) != len(factors):
        raise ValueError("block is not in its initial loop nest")
    outer, inner = [], []
    for lp, f in zip(loops[:-1], factors[:-1], strict=True):
        if f <= 1:
            outer.append(lp)
        elif f == _ext(sch, lp):
            inner.append(lp)
        else:
            o, i = sch.split(lp, [None, f])
            outer.append(o)
            inner.append(i)
    lanes = loops[-1]
    sch.reorder(*outer, *inner, lanes)
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    for lp in inner:
        sch.unroll(lp)
    if _ext(sch, lanes) in (p.lanes, p.lanes // 2, p.lanes // 4):
        sch.vectorize(lanes)


def schedule_kernel(sch: s_tir.Schedule, p: ScheduleParams, sampler: Sampler = None) -> None:
    """Schedule every block of ``sch``'s kernel: the main reduction tiled, tile transforms unrolled
    (:func:`unroll_tile`), the rest parallel + vectorized; attention's guarded softmax and a channel LayerNorm
    their own schedules (:func:`~bnfold.targets.tvm.attention.schedule_safe_softmax`,
    :func:`~bnfold.targets.tvm.channel_norm.schedule_channel_norm`)."""
    if any(ROW_PARTIALS in sch.get(b).annotations for b in sch.get_child_blocks(sch.get_sblock("root"))):
        schedule_safe_softmax(sch, p.lanes)  # attention's softmax: bnfold.targets.tvm.attention
        return
    if schedule_channel_norm(sch, p.lanes):
        return
    for b in [b for b in sch.get_child_blocks(sch.get_sblock("root")) if UNROLL in sch.get(b).annotations]:
        unroll_tile(sch, b, p)  # folds the blocks after it in: the block list is read again below
    main = _main_reduction(sch)
    rows = _row_shape(sch) if main is not None and not _reads_weights(sch, main) else None
    if rows is not None:
        row_reduction(sch, rows, p)
        return
    if main is None:
        _inline_single_use(sch)
    elif not _reads_weights(sch, main):
        window_reduction(sch, main, p)
    elif matmul_axes(sch, main) is not None:  # a dense layer or attention's products: bnfold.targets.tvm.dense
        tile_matmul(sch, main, p, _layout_free(sch), sampler)
    elif main is not None:
        try:
            tile_reduction(sch, main, p, sampler)
        except (ValueError, RuntimeError) as e:  # e.g. a reduction with no vectorizable axis
            log.debug("%s: register tiling not applicable (%s)", sch.mod, e)
            raise
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        if main is not None and sch.get(b).name_hint.startswith(sch.get(main).name_hint):
            continue
        if sch.get(b).annotations.get("meta_schedule.layout_rewrite_preproc") or UNROLL in sch.get(b).annotations:
            continue
        if len(sch.get_loops(b)) and not _already_parallel(sch, b):
            schedule_elementwise(sch, b, p)


def schedule_non_reductions(sch: s_tir.Schedule, p: ScheduleParams) -> None:
    """The fallback when the main reduction cannot be tiled: every other block parallel + vectorized."""
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        if not _is_reduction(sch, b) and sch.get_loops(b):
            schedule_elementwise(sch, b, p)


def _already_parallel(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    return any(sch.get(lp).kind == tir.ForKind.PARALLEL for lp in sch.get_loops(block))


def _postprocess(sch: s_tir.Schedule) -> bool:
    """MetaSchedule's layout rewrite of the layout-free operands (weights), as tuning would apply it.

    No ``TuneContext``: ``RewriteLayout``'s initialization is empty, and creating one imports
    ``tvm.s_tir.tensor_intrin`` (~25 s per process). Checked: the rewritten kernels are identical with and without.
    """
    rewrite = ms.postproc.RewriteLayout()
    sch.enter_postproc()  # a tuning run replays the trace without what follows, then applies its postprocs
    return bool(rewrite.apply(sch))


def default_schedule(func: tir.PrimFunc, p: ScheduleParams) -> s_tir.Schedule | None:
    """``func`` with the hand schedule applied (None when it does not apply: left to the caller)."""
    mod = tvm.IRModule({"main": func})
    for attempt in (True, False):  # first with the tiled reduction, then elementwise-only
        sch = s_tir.Schedule(mod)
        try:
            if attempt:
                schedule_kernel(sch, p)
            else:
                schedule_non_reductions(sch, p)
            if not _postprocess(sch):
                continue
            return sch
        except (ValueError, RuntimeError) as e:  # ScheduleError and TVM's errors are RuntimeErrors
            log.debug("default schedule failed (%s)", str(e).splitlines()[0] if str(e) else type(e).__name__)
    return None


def apply_default_schedules(mod: tvm.IRModule, target: tvm.target.Target,
                            names: Sequence[str] | None = None) -> tuple[tvm.IRModule, list[str]]:
    """Replace every unscheduled PrimFunc of ``mod`` (or those in ``names``) by its hand schedule.

    Returns the module and the kernels no hand schedule applied to (they compile as written).
    """
    p = params_for(target)
    updates, missed = {}, []
    for gv, func in mod.functions_items():
        if not isinstance(func, tir.PrimFunc) or (names is not None and gv.name_hint not in names):
            continue
        if (func.attrs or {}).get(SCHEDULED):
            continue
        sch = default_schedule(func, p)
        if sch is None:
            missed.append(gv.name_hint)
            continue
        scheduled = sch.mod["main"].with_attr(SCHEDULED, True)
        if (func.attrs or {}).get("global_symbol"):
            scheduled = scheduled.with_attr("global_symbol", gv.name_hint)
        updates[gv] = scheduled
    for gv, f in updates.items():
        mod[gv] = f
    return mod, sorted(missed)


def has_tile_transforms(mod: tvm.IRModule) -> bool:
    """``mod``'s kernel has blocks only these schedules know (:data:`~bnfold.targets.tvm.winograd.UNROLL`:
    Winograd transforms), so MetaSchedule's stock space has nothing to offer for it."""
    sch = s_tir.Schedule(mod)
    return any(UNROLL in sch.get(b).annotations for b in sch.get_child_blocks(sch.get_sblock("root")))


def tiled_space(p: ScheduleParams) -> Callable[[s_tir.Schedule], None]:
    """The default schedule with its tile sizes sampled: a MetaSchedule design space (``ScheduleFn``)."""

    def sampler(sch: s_tir.Schedule, options: Sequence[int], default: int) -> int:
        opts = list(options)
        probs = [1.0 / len(opts)] * len(opts)
        return int(sch.get(sch.sample_categorical(opts, probs)))

    def space(sch: s_tir.Schedule) -> None:
        try:
            schedule_kernel(sch.copy(), p, sampler)  # a dry run: a failed primitive would leave sch half done
        except (ValueError, RuntimeError):
            schedule_non_reductions(sch, p)
            return
        schedule_kernel(sch, p, sampler)

    return space
