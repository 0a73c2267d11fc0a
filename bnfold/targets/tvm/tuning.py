"""MetaSchedule tuning of a model's kernels into the shared database (:mod:`bnfold.targets.tvm.cache`).

* **Tasks** are the fused TIR kernels that run per call (:func:`bnfold.targets.tvm.tasks.extract_tasks`); the
  budget is split by each task's share of the latency (:func:`bnfold.targets.tvm.cache.latency_costs`, FLOPs ×
  occurrences before anything is measured) with :mod:`bnfold.targets.tvm.budget`, one MetaSchedule pass per
  per-task budget.
* **Reuse**: the cache's ledger says how much of the budget a model already had; only the difference is tuned,
  starting from the database's best schedules.
* **Isolation**: tuning runs in a private work directory and is merged (best record per workload) into the
  shared database under a file lock, so concurrent compiles never corrupt it.
* **Design space**: MetaSchedule's stock space (multi-level tiling) *and* bnfold's register-tiled schedule with
  its tile sizes sampled (:func:`bnfold.targets.tvm.schedules.tiled_space`) — bnfold's alone for Winograd
  kernels, whose transforms the stock rules do not know (:func:`_by_space`); before searching, each task's
  default hand schedule is measured and committed, so the database's best is never worse than the untuned
  build and the search starts from it.
* **Valid inputs**: candidates are measured on random floats and zero integer arguments
  (:mod:`bnfold.targets.tvm.measure_inputs`): MetaSchedule's random integers made every gather (``take``)
  candidate read outside its table and crash the measuring subprocess. ``TuningSummary.failed_runs`` counts the
  candidates the runner lost anyway; ``failed_builds`` those that did not compile.
* **Fail fast**: when every candidate of a task's first batch fails to build or run, tuning stops with the first
  error instead of spending the rest of the budget on the same failure.
* **Speed**: MetaSchedule's stock builder starts two fresh Python+TVM worker processes for *every* batch of
  candidates (seconds each on a busy 2-core machine); :class:`PooledBuilder` keeps its workers and recycles
  them every 64 builds instead. The evolutionary search is sized to the per-task budget.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.builder import local_builder as _local_builder
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

from bnfold.errors import BnfoldError
from bnfold.targets.tvm.budget import allocate_trials, group_by_budget
from bnfold.targets.tvm.cache import TuningCache, latency_costs, model_key, warm_start, workload_key
from bnfold.targets.tvm.measure_inputs import valid_alloc_argument
from bnfold.targets.tvm.schedules import default_schedule, has_tile_transforms, params_for, tiled_space
from bnfold.targets.tvm.target import TargetSpec
from bnfold.targets.tvm.tasks import TaskInfo
from bnfold.targets.tvm.threads import THREAD_ENV_DEFAULTS

__all__ = ["PooledBuilder", "TuningFailed", "TuningProgress", "TuningSummary", "seed_defaults", "split_budget",
           "tune"]

log = logging.getLogger(__name__)

ProgressFn = Callable[["TuningProgress"], None]


@dataclass
class TuningProgress:
    """Counts trials across all passes; ``eta_s`` extrapolates from the rate so far."""

    total: int
    done: int = 0
    errors: int = 0
    run_errors: int = 0  # candidates built but not measured: the runner's subprocess raised, crashed or timed out
    succeeded: int = 0
    aborted: bool = False
    first_error: str | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def eta_s(self) -> float | None:
        if self.done == 0:
            return None
        return self.elapsed_s / self.done * max(0, self.total - self.done)


class TuningFailed(RuntimeError):
    """Every candidate of a batch failed and none has succeeded yet: the failure is systematic."""


@derived_object
class _ProgressCallback(PyMeasureCallback):
    """Advances a :class:`TuningProgress` after every measured batch and reports it."""

    def __init__(self, progress: TuningProgress, report: ProgressFn) -> None:
        super().__init__()
        self.progress = progress
        self.report = report

    def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Sequence[Any],
              builder_results: Sequence[Any], runner_results: Sequence[Any]) -> None:
        p = self.progress
        p.done += len(measure_candidates)
        failed = 0
        for b, r in zip(builder_results, runner_results, strict=False):
            msg = b.error_msg or r.error_msg
            if msg is not None:
                failed += 1
                p.errors += 1
                p.run_errors += b.error_msg is None
                if p.first_error is None:
                    p.first_error = str(msg)
                    log.warning("a tuning trial failed (later failures are only counted): %s", msg[-2000:])
        p.succeeded += len(measure_candidates) - failed
        self.report(p)
        if measure_candidates and failed == len(measure_candidates) and p.succeeded == 0:
            p.aborted = True
            raise TuningFailed(p.first_error or "unknown error")


def _warm_worker() -> None:
    """Run once in each builder process before its first (timed) build: the imports a build needs."""
    import tvm.driver
    import tvm.s_tir.transform
    import tvm.support.tar  # noqa: F401


def _build_candidate(mod: Any, target: Any, params: Any) -> Any:
    """MetaSchedule's ``default_build`` without its ``import tvm.s_tir.tensor_intrin``: that import parses every
    CUDA/ARM tensor intrinsic through TVMScript's inspect-heavy parser, 25 s on an idle 2-core Zen 5 here, over a
    minute on a loaded Zen 3 — so each fresh worker's first build hit the 60 s timeout, the worker was killed and
    replaced, and *every* build of a tuning run timed out. An already scheduled fp32 module needs no intrinsic
    registry to compile."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _build_and_export(mod: Any, target: Any, params: bytearray | None) -> str:
    rt_mod = _build_candidate(mod, target, _local_builder._deserialize_params(params))
    return _local_builder.default_export(rt_mod)


@derived_object
class PooledBuilder(PyBuilder):
    """MetaSchedule's local builder, but with worker processes kept across batches and warmed up outside the
    build timeout (see module docstring and :func:`_build_candidate`)."""

    def __init__(self, max_workers: int, timeout_sec: float = 60.0, max_uses: int = 64) -> None:
        super().__init__()
        self.timeout_sec = timeout_sec
        self.pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec, maximum_process_uses=max_uses,
                                      initializer=_warm_worker)

    def build(self, build_inputs: list[Any]) -> list[Any]:
        args = [(b.mod, b.target, _local_builder._serialize_params(b.params)) for b in build_inputs]
        results = []
        for r in self.pool.map_with_error_catching(lambda a: _build_and_export(*a), args):
            if r.status == StatusKind.COMPLETE:
                results.append(BuilderResult(r.value, None))
            elif r.status == StatusKind.TIMEOUT:
                results.append(BuilderResult(None, f"build timed out after {self.timeout_sec} s"))
            else:
                results.append(BuilderResult(None, f"build failed: {r.value}"))
        return results

    def close(self) -> None:
        self.pool.shutdown()


def split_budget(costs: Sequence[float], trials: int) -> list[int]:
    """:func:`allocate_trials`, or with fewer trials than tasks one trial each for the costliest tasks."""
    if trials >= len(costs):
        return allocate_trials(costs, trials)
    top = set(sorted(range(len(costs)), key=lambda i: -costs[i])[:trials])
    return [1 if i in top else 0 for i in range(len(costs))]


@dataclass
class TuningSummary:
    """What tuning did; embedded in the artifact manifest."""

    database: str | None
    trials_requested: int
    trials_run: int = 0
    failed_builds: int = 0  # candidates that did not compile (a schedule the target cannot build, a timeout)
    failed_runs: int = 0  # compiled candidates the runner lost (its subprocess raised, crashed or timed out)
    seconds: float = 0.0
    tasks: list[dict[str, Any]] = field(default_factory=list)
    untuned: list[str] = field(default_factory=list)  # kernels compiled as legalized (no schedule at all)
    default_scheduled: list[str] = field(default_factory=list)  # kernels running bnfold's hand schedule
    estimated_kernel_ms: float | None = None  # Σ occurrences × best measured time, from the database
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _strategy(budget: int) -> Any:
    """Evolutionary search sized to the budget: its default 512-candidate population evolved 4 times costs
    seconds per round, which dominates when a task only gets a few dozen trials."""
    if budget >= 128:
        return "evolutionary"
    return ms.search_strategy.EvolutionarySearch(population_size=256, genetic_num_iters=3)


def _per_iter(budget: int) -> int:
    """Candidates per search round: two rounds or more, so the cost model learns before the last round."""
    return max(1, min(64, (budget + 1) // 2))


def tune(tasks: Sequence[TaskInfo], spec: TargetSpec, total_trials: int, cache: TuningCache, *,
         progress: ProgressFn | None = None, retune: bool = False, seed: int | None = None) -> TuningSummary:
    """Tune ``tasks`` so that this model has had ``total_trials`` in all, then merge into ``cache``.

    The cache's ledger remembers the largest budget each model (task set) was tuned with: a compile with the
    same or a smaller budget tunes nothing (the database is applied as is); a larger one spends only the
    difference, split by :func:`latency_costs` (so it goes to the kernels that are still slow), each search
    starting from the database's best schedules. ``retune`` ignores the ledger. Returns the summary
    (``trials`` per task: what this compile allotted; ``trials_run`` counts measured candidates).
    """
    key = model_key(tasks)
    ledger = cache.ledger()
    done_before = 0 if retune else ledger["models"].get(key, 0)
    summary = TuningSummary(str(cache.dir), total_trials)
    extra = total_trials - done_before
    alloc = split_budget(latency_costs(tasks, cache, spec), extra) if extra > 0 else [0] * len(tasks)
    spent = ledger["workloads"]
    summary.tasks = [{"name": t.name, "flops": t.flops, "weight": t.weight, "trials": alloc[i],
                      "trials_before": spent.get(workload_key(t), 0)} for i, t in enumerate(tasks)]
    todo = [i for i, a in enumerate(alloc) if a > 0]
    if not todo:
        summary.note = f"already tuned with {done_before} trials: database reused"
        return summary
    if done_before:
        summary.note = (f"topped up from {done_before} trials: the {extra} extra went to the slowest kernels, "
                        "starting from the database's best schedules")
    budget = {i: alloc[i] for i in todo}
    tracker = TuningProgress(total=sum(budget.values()))
    report = progress or (lambda p: None)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=_runs_dir(cache)))
    ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
    user_level = ms_log.level
    builder = PooledBuilder(spec.num_cores, timeout_sec=build_timeout_s())
    try:
        with _tvm_env(spec.num_cores):
            runner = ms.runner.LocalRunner(timeout_sec=60.0, f_alloc_argument=valid_alloc_argument)
            run_db = ms.database.JSONDatabase(work_dir=str(run_dir), module_equality="structural")
            warm_start(run_db, cache, [tasks[i] for i in todo])
            cost_model = ms.CostModel.create("xgb", num_tuning_cores=spec.num_cores)
            seeded = seed_defaults([tasks[i] for i in todo], spec, builder, runner, run_db, tracker)
            log.info("default schedules measured and committed for %d of %d task(s)", seeded, len(todo))
            callbacks = [*ms.MeasureCallback.create("default"), _ProgressCallback(tracker, report)]
            for level, idx in group_by_budget([budget.get(i, 0) for i in range(len(tasks))]):
                group = [tasks[i] for i in idx]
                log.info("tuning %d task(s) with %d trials each", len(group), level)
                # MetaSchedule's console handler takes the logger's level (DEBUG if unset) at each setup
                ms_log.setLevel(user_level or logging.WARNING)
                contexts, weights = [], []
                for subset, hand_only in _by_space(group):
                    with _foreign_handlers_set_aside(ms_log):
                        c, w = ms.relax_integration.extracted_tasks_to_tune_contexts(
                            [t.task for t in subset], str(run_dir), space=_space(spec, hand_only),
                            strategy=_strategy(level), num_threads=spec.num_cores, seed=seed)
                    contexts += c
                    weights += w
                ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(run_dir),
                              max_trials_global=level * len(group), max_trials_per_task=level,
                              num_trials_per_iter=_per_iter(level), builder=builder, runner=runner,
                              database=run_db, cost_model=cost_model, measure_callbacks=callbacks)
        with cache.locked():
            cache.merge(run_db, {workload_key(tasks[i]): budget[i] for i in todo}, key, total_trials)
    except BaseException as e:
        log.warning("tuning failed; its logs are kept in %s", run_dir)
        if tracker.aborted:
            raise BnfoldError(
                f"tuning stopped after its first batch: all {tracker.done} candidate(s) failed, first error: "
                f"{(tracker.first_error or '')[-1500:]}",
                hint=f"nothing was written to the database; logs in {run_dir}. If builds time out, the machine "
                     "is overloaded or the timeout is too short for this CPU: retry when it is idle") from e
        raise
    finally:
        builder.close()
        ms_log.setLevel(user_level)
    shutil.rmtree(run_dir, ignore_errors=True)
    summary.trials_run = tracker.done
    summary.failed_runs = tracker.run_errors
    summary.failed_builds = tracker.errors - tracker.run_errors
    summary.seconds = round(tracker.elapsed_s, 1)
    return summary


BUILD_TIMEOUT_ENV = "BNFOLD_TVM_BUILD_TIMEOUT"


def build_timeout_s() -> float:
    """Seconds one candidate may take to compile (default 60; ``$BNFOLD_TVM_BUILD_TIMEOUT`` overrides it for
    slow or loaded hosts)."""
    raw = os.environ.get(BUILD_TIMEOUT_ENV, "60")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise BnfoldError(f"${BUILD_TIMEOUT_ENV}={raw!r} is not a positive number of seconds",
                          hint=f"e.g. {BUILD_TIMEOUT_ENV}=120, or unset it for the default 60")
    return value


def _space(spec: TargetSpec, hand_only: bool = False) -> Any:
    """MetaSchedule's stock design space and bnfold's tiled schedule, sampled side by side; the tiled schedule
    alone for kernels with tile transforms (:func:`~bnfold.targets.tvm.schedules.has_tile_transforms`)."""
    hand = ms.space_generator.ScheduleFn(tiled_space(params_for(spec.target)))
    return hand if hand_only else ms.space_generator.SpaceGeneratorUnion([ms.space_generator.PostOrderApply(), hand])


def _by_space(group: Sequence[TaskInfo]) -> list[tuple[list[TaskInfo], bool]]:
    """``group`` split into the tasks searched in both spaces and those searched in bnfold's alone (Winograd
    kernels: the stock rules do not know their transforms; in a 600-trial resnet18 run none of their best records
    came from the stock space, and three of its candidates for them hit the 60 s build timeout)."""
    hand_only = [has_tile_transforms(t.workload) for t in group]
    hand = [t for t, h in zip(group, hand_only, strict=True) if h]
    rest = [t for t, h in zip(group, hand_only, strict=True) if not h]
    return [(subset, only) for subset, only in ((rest, False), (hand, True)) if subset]


def seed_defaults(tasks: Sequence[TaskInfo], spec: TargetSpec, builder: Any, runner: Any, db: Any,
                  progress: TuningProgress | None = None) -> int:
    """Measure each task's default hand schedule and commit it to ``db`` as a tuning record (the search's
    starting point, and the floor of what tuning can return). Returns how many were committed; a measurement
    the runner lost is counted in ``progress.run_errors``."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    p = params_for(spec.target)
    scheds = [(t, default_schedule(t.workload["main"], p)) for t in tasks]
    scheds = [(t, s) for t, s in scheds if s is not None]
    built = builder.build([BuilderInput(s.mod, spec.target) for _, s in scheds])
    ok = [(t, s, b) for (t, s), b in zip(scheds, built, strict=True) if b.error_msg is None]
    futures = runner.run([RunnerInput(b.artifact_path, "cpu", ArgInfo.from_entry_func(s.mod, remove_preproc=True))
                          for _, s, b in ok])
    committed = 0
    for (t, s, _), fut in zip(ok, futures, strict=True):
        res = fut.result()
        if res.error_msg is not None or not res.run_secs:
            log.warning("default schedule of %s could not be measured: %s", t.name, str(res.error_msg)[-500:])
            if progress is not None and res.error_msg is not None:
                progress.errors += 1
                progress.run_errors += 1
            continue
        db.commit_tuning_record(ms.database.TuningRecord(
            s.trace, db.commit_workload(t.workload), [float(v) for v in res.run_secs], spec.target,
            ArgInfo.from_prim_func(t.workload["main"])))
        committed += 1
    return committed


def _runs_dir(cache: TuningCache) -> Path:
    d = cache.dir / "runs"
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def _foreign_handlers_set_aside(logger: logging.Logger) -> Iterator[None]:
    """MetaSchedule's logging setup (``dictConfig``) lists the handlers already on its logger by name: one it did
    not create (a user's, pytest's capture handler) has none or an unknown one, and the setup fails
    (``'NoneType' object has no attribute 'format'``). Such handlers are taken off for the setup and put back."""
    foreign = [h for h in logger.handlers if not (h.get_name() or "").startswith(logger.name)]
    for h in foreign:
        logger.removeHandler(h)
    try:
        yield
    finally:
        for h in foreign:
            logger.addHandler(h)


@contextlib.contextmanager
def _tvm_env(num_cores: int) -> Iterator[None]:
    """Worker processes inherit these: kernels measured with the thread count they will run with."""
    saved = {k: os.environ.get(k) for k in ("TVM_NUM_THREADS", *THREAD_ENV_DEFAULTS)}
    os.environ["TVM_NUM_THREADS"] = str(num_cores)
    for k, v in THREAD_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
