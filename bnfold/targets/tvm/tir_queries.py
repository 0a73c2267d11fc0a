"""Questions the hand schedules ask of a TIR schedule, shared by the conv/elementwise schedules
(:mod:`bnfold.targets.tvm.schedules`) and the matmul schedule (:mod:`bnfold.targets.tvm.dense`)."""

from __future__ import annotations

from tvm import s_tir
from tvm import tirx as tir

__all__ = ["is_reduction", "loop_extent"]


def loop_extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int:
    """A loop's extent; a symbolic one (a dynamic batch) cannot be tiled: ValueError."""
    ext = sch.get(loop).extent
    if not isinstance(ext, tir.IntImm):
        raise ValueError(f"loop extent {ext} is not a constant")
    return int(ext)


def is_reduction(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    """Whether ``block`` reduces: one of its iteration variables is a commutative reduction."""
    return any(iv.iter_type == tir.IterVar.CommReduce for iv in sch.get(block).iter_vars)
