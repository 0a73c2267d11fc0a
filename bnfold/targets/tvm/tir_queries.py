"""Questions the hand schedules ask of a TIR schedule, shared by the conv/elementwise schedules
(:mod:`bnfold.targets.tvm.schedules`) and the matmul schedule (:mod:`bnfold.targets.tvm.dense`)."""

from __future__ import annotations

from tvm import s_tir
from tvm import tirx as tir

__all__ = ["is_einsum", "is_reduction", "loop_extent"]


def loop_extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int:
    """A loop's extent; a symbolic one (a dynamic batch) cannot be tiled: ValueError."""
    ext = sch.get(loop).extent
    if not isinstance(ext, tir.IntImm):
        raise ValueError(f"loop extent {ext} is not a constant")
    return int(ext)


def is_reduction(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    """Whether ``block`` reduces: one of its iteration variables is a commutative reduction."""
    return any(iv.iter_type == tir.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def is_einsum(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    """Every access of ``block`` is a point indexed by plain iter vars or constants (``C[i, j] += A[i, k] ·
    B[k, j]``: a matmul, not a conv's ``x[y·s + i]``): what ``pad_einsum`` accepts."""
    blk = sch.get(block)
    iters = {iv.var.name for iv in blk.iter_vars}
    for r in [*blk.reads, *blk.writes]:
        for rg in r.region:
            if not (isinstance(rg.extent, tir.IntImm) and int(rg.extent) == 1):
                return False
            if not (isinstance(rg.min, tir.IntImm) or (isinstance(rg.min, tir.Var) and rg.min.name in iters)):
                return False
    return True
