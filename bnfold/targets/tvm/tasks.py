"""What there is to tune: a model's fused TIR kernels as :class:`TaskInfo` (name, FLOPs, occurrences per call).

Shared by the tuning database (:mod:`bnfold.targets.tvm.cache`: workload and model keys, latency costs) and the
tuner (:mod:`bnfold.targets.tvm.tuning`), which therefore do not import each other both ways.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.analysis import estimate_tir_flops

from bnfold.targets.tvm.target import TargetSpec

__all__ = ["TaskInfo", "extract_tasks"]


@dataclass
class TaskInfo:
    """One tuning task: a fused kernel, how often the model runs it, and its FLOPs per run."""

    name: str
    flops: float
    weight: int
    task: Any = field(repr=False)  # ms.ExtractedTask

    @property
    def cost(self) -> float:
        return self.flops * self.weight

    @property
    def workload(self) -> tvm.IRModule:
        return self.task.dispatched[0]


def _is_pure_reshape(task: Any) -> bool:
    funcs = [f for _, f in task.dispatched[0].functions_items()]
    return len(funcs) == 1 and bool(relax.analysis.has_reshape_pattern(funcs[0]))


def extract_tasks(mod: tvm.IRModule, spec: TargetSpec) -> list[TaskInfo]:
    """The tuning tasks of a legalized, fused Relax module, costliest first.

    Pure reshapes are left out: the Relax VM turns them into views, so they never run as kernels.
    """
    tasks = ms.relax_integration.extract_tasks(mod, spec.target)
    infos = []
    for t in tasks:
        if _is_pure_reshape(t):
            continue
        try:
            flops = float(estimate_tir_flops(t.dispatched[0]))
        except Exception:  # some kernels (pure data movement) have no FLOP estimate
            flops = 0.0
        infos.append(TaskInfo(str(t.task_name), flops, int(t.weight), t))
    return sorted(infos, key=lambda t: (-t.cost, t.name))
