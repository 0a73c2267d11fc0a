"""The shared MetaSchedule database of one target, and its ledger.

``cache_dir/<kind>-<cpu>-<cores>c-tvm<version>/`` holds a JSON database (best record per workload, matched
structurally, so every model with the same kernel shapes shares it) and ``trials.json``, the ledger: trials per
workload and the largest budget each model (task set) was tuned with. Writers merge under a file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import tvm_ffi
from tvm.s_tir import meta_schedule as ms

from bnfold.targets.tvm.target import TargetSpec

if TYPE_CHECKING:
    from bnfold.targets.tvm.tasks import TaskInfo

__all__ = ["TuningCache", "default_cache_dir", "latency_costs", "model_key", "warm_start", "workload_key"]

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$BNFOLD_CACHE_DIR/tvm``, else ``$XDG_CACHE_HOME/bnfold/tvm``, else ``~/.cache/bnfold/tvm``."""
    if os.environ.get("BNFOLD_CACHE_DIR"):
        return Path(os.environ["BNFOLD_CACHE_DIR"]) / "tvm"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bnfold" / "tvm"


class TuningCache:
    """The shared tuning database of one target (see module docstring)."""

    def __init__(self, root: str | os.PathLike[str], spec: TargetSpec) -> None:
        self.dir = Path(root) / spec.cache_key()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def open(self) -> ms.Database:
        """The database (read it while holding :meth:`locked` if another process may be merging)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        return ms.database.JSONDatabase(work_dir=str(self.dir), module_equality="structural")

    def _ledger_path(self) -> Path:
        return self.dir / "trials.json"

    def ledger(self) -> dict[str, dict[str, int]]:
        """``{"workloads": {key: trials}, "models": {task-set key: largest total budget tuned}}``."""
        p = self._ledger_path()
        empty: dict[str, dict[str, int]] = {"workloads": {}, "models": {}}
        if not p.exists():
            return empty
        try:
            raw = json.loads(p.read_text())
            return {k: {str(kk): int(vv) for kk, vv in raw.get(k, {}).items()} for k in empty}
        except (ValueError, AttributeError):
            log.warning("ignoring unreadable %s", p)
            return empty

    def merge(self, run_db: ms.Database, spent: dict[str, int], model_key: str, total: int) -> None:
        """Copy the best record per workload of ``run_db`` in and update the ledger (hold the lock)."""
        shared = self.open()
        run_db.dump_pruned(shared)
        ledger = self.ledger()
        for k, v in spent.items():
            ledger["workloads"][k] = ledger["workloads"].get(k, 0) + v
        ledger["models"][model_key] = max(total, ledger["models"].get(model_key, 0))
        tmp = self._ledger_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(ledger, indent=1, sort_keys=True))
        os.replace(tmp, self._ledger_path())


def workload_key(task: TaskInfo) -> str:
    return str(tvm_ffi.structural_hash(task.workload))


def model_key(tasks: Sequence[TaskInfo]) -> str:
    """Identifies a set of tasks (a model's kernels for one target), independent of their order."""
    return hashlib.sha256(" ".join(sorted(workload_key(t) for t in tasks)).encode()).hexdigest()[:16]


def latency_costs(tasks: Sequence[TaskInfo], cache: TuningCache, spec: TargetSpec) -> list[float]:
    """Each task's share of the model's latency, in seconds per inference (occurrences × time per call).

    Tasks the database has measured use their best time; the others are estimated from their FLOPs at the
    median throughput of the measured ones (or, with nothing measured yet, cost = FLOPs × occurrences, which
    only needs to be proportional). This is what steers a top-up budget to the kernels that are still slow.
    """
    best: dict[int, float] = {}
    if (cache.dir / "database_workload.json").exists():
        with cache.locked():
            db = cache.open()
        for i, t in enumerate(tasks):
            rec = db.query_tuning_record(t.workload, spec.target, "main") if db.has_workload(t.workload) else None
            if rec is not None and rec.run_secs:
                best[i] = sum(float(v) for v in rec.run_secs) / len(rec.run_secs)
    rates = sorted(tasks[i].flops / s for i, s in best.items() if s > 0 and tasks[i].flops > 0)
    if not rates:
        return [t.cost for t in tasks]
    rate = rates[len(rates) // 2]
    return [t.weight * (best[i] if i in best else t.flops / rate) for i, t in enumerate(tasks)]


def warm_start(run_db: ms.Database, cache: TuningCache, tasks: Sequence[TaskInfo], top_k: int = 8) -> None:
    """Copy the shared database's best records of ``tasks`` into the run's database: the evolutionary search
    starts from them instead of from scratch."""
    if not (cache.dir / "database_workload.json").exists():
        return
    with cache.locked():
        shared = cache.open()
    for t in tasks:
        if not shared.has_workload(t.workload):
            continue
        target = run_db.commit_workload(t.workload)
        for rec in shared.get_top_k(shared.commit_workload(t.workload), top_k):
            run_db.commit_tuning_record(ms.database.TuningRecord(rec.trace, target, rec.run_secs, rec.target,
                                                                 rec.args_info))
