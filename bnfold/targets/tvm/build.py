"""Relax → executable: the CPU pipeline (tune or reuse the database, apply it, lift weight transforms) and the
CUDA pipeline (TVM's default GPU pipeline with dlight schedules), then ``tvm.compile``.

CPU pipeline, in order::

    DecomposeOpsForInference → CanonicalizeBindings → zero pipeline (LegalizeOps, FoldConstant, FuseOps,
    FuseTIR) → [AttachAttrLayoutFreeBuffers if prepack] → tune (static shapes only) → MetaScheduleApplyDatabase
    → [SplitLayoutRewritePreproc if prepack] → LiftTransformParams → FoldConstant → tvm.compile

``LiftTransformParams`` moves everything that depends only on weights (bias reshapes, the transposed FC
weight, and with ``prepack`` the tuned weight layouts) into ``main_transform_params``, which the artifact runs
once at load time. Tuning tasks are taken from what stays in ``main``: the lifted kernels run once, so
tuning them would waste trials.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm import relax

from bnfold.errors import BnfoldError, InputError
from bnfold.targets.tvm.attention import fuse_safe_softmax
from bnfold.targets.tvm.cache import TuningCache, default_cache_dir
from bnfold.targets.tvm.dense import mark_weight_operands
from bnfold.targets.tvm.epilogues import sink_reshapes
from bnfold.targets.tvm.importer import Imported
from bnfold.targets.tvm.layout import blocked_conv_passes
from bnfold.targets.tvm.schedules import apply_default_schedules, params_for
from bnfold.targets.tvm.target import TargetSpec
from bnfold.targets.tvm.tasks import TaskInfo, extract_tasks
from bnfold.targets.tvm.tuning import TuningSummary, tune
from bnfold.targets.tvm.vecmath import vector_math_legalize_map

__all__ = ["BuildOptions", "Built", "build", "kernel_tasks", "untuned_kernels"]

log = logging.getLogger(__name__)

TRANSFORM_PARAMS = "main_transform_params"


@dataclass
class BuildOptions:
    """``tune_trials``: total MetaSchedule trials (0: only apply what the database already has);
    ``cache_dir``: tuning database root (None: :func:`default_cache_dir`); ``prepack``: let tuned convolutions
    choose their weight layout (weights are re-laid out once at load); ``use_database=False``: apply no tuning
    record (every kernel on its default schedule)."""

    tune_trials: int = 0
    cache_dir: str | Path | None = None
    prepack: bool = False
    layout: str | None = None  # one of LAYOUTS; None: "NCHWc"
    retune: bool = False
    progress: Callable | None = None
    use_database: bool = True


@dataclass
class Built:
    executable: object  # tvm.relax.VMExecutable
    summary: TuningSummary
    has_transform_params: bool
    cuda_source: str | None = None


LAYOUTS = ("NCHWc", "NCHW", "NHWC")
"""CPU convolution layouts: blocked ``NCHW[c]c`` (the default, :mod:`bnfold.targets.tvm.layout`), plain NCHW,
channels-last."""


def _prepare_cpu(mod: tvm.IRModule, spec: TargetSpec, prepack: bool, layout: str | None = None) -> tvm.IRModule:
    passes = [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(), sink_reshapes,
              fuse_safe_softmax(params_for(spec.target).lanes)]
    layout = layout or "NCHWc"
    if layout == "NCHWc":
        passes += blocked_conv_passes(params_for(spec.target).lanes, vector_math_legalize_map())
    elif layout == "NHWC":
        passes.append(relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]}))
    elif layout != "NCHW":
        raise InputError(f"unknown layout {layout!r}", hint="use 'NCHWc' (default, blocked), 'NCHW' or 'NHWC'")
    if layout != "NCHWc":
        passes.append(relax.transform.LegalizeOps(vector_math_legalize_map()))
    passes.append(relax.get_pipeline("zero"))
    if prepack:
        passes += [relax.transform.AttachAttrLayoutFreeBuffers(), mark_weight_operands]
    with spec.target:
        return tvm.transform.Sequential(passes)(mod)


def _main_only(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` after lifting weight transforms, without the lifted function: the kernels run per call."""
    lifted = relax.transform.LiftTransformParams()(mod)
    return tvm.IRModule({gv: f for gv, f in lifted.functions_items() if gv.name_hint != TRANSFORM_PARAMS})


def _called_prim_funcs(mod: tvm.IRModule, fn: str = "main") -> list[tvm.ir.GlobalVar]:
    found: dict[str, tvm.ir.GlobalVar] = {}
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Call) and expr.op.same_as(call_tir):
            gv = expr.args[0]
            found.setdefault(gv.name_hint, gv)

    relax.analysis.post_order_visit(mod[fn].body, visit)
    return list(found.values())


def untuned_kernels(mod: tvm.IRModule) -> list[str]:
    """Kernels called from ``main`` that no schedule was applied to (pure reshapes excluded: they become views)."""
    out = []
    for gv in _called_prim_funcs(mod):
        func = mod[gv]
        attrs = func.attrs or {}
        if attrs.get("tirx.is_scheduled") or attrs.get("tir.is_scheduled"):
            continue
        if relax.analysis.has_reshape_pattern(func):
            continue
        out.append(gv.name_hint)
    return sorted(out)


def kernel_tasks(imported: Imported, spec: TargetSpec, *, prepack: bool = False,
                 layout: str | None = None) -> list[TaskInfo]:
    """The tuning tasks of ``imported`` for CPU target ``spec`` (what :func:`build` would tune)."""
    return extract_tasks(_main_only(_prepare_cpu(imported.mod, spec, prepack, layout)), spec)


def _record_best_latency(summary: TuningSummary, tasks: list[TaskInfo], db: object, spec: TargetSpec) -> None:
    """Per task, the database's best measured time (µs), and their weighted sum: the kernels' latency."""
    total = 0.0
    for entry, task in zip(summary.tasks, tasks, strict=True):
        rec = db.query_tuning_record(task.workload, spec.target, "main")  # type: ignore[attr-defined]
        if rec is None or not rec.run_secs:
            entry["best_us"] = None
            continue
        us = 1e6 * sum(float(v) for v in rec.run_secs) / len(rec.run_secs)
        entry["best_us"] = round(us, 2)
        total += us * task.weight
    summary.estimated_kernel_ms = round(total / 1e3, 3) if total else None


def _tune_and_apply(mod: tvm.IRModule, spec: TargetSpec, opts: BuildOptions) -> tuple[tvm.IRModule, TuningSummary]:
    """Tune (if asked) the kernels that run per call, then apply the shared database to ``mod``."""
    cache = TuningCache(opts.cache_dir or default_cache_dir(), spec)
    tasks: list[TaskInfo] = extract_tasks(_main_only(mod), spec)
    log.info("%d tuning task(s); database %s", len(tasks), cache.dir)
    if opts.tune_trials:
        if opts.tune_trials < len(tasks):
            raise InputError(f"tune_trials={opts.tune_trials} cannot tune the {len(tasks)} kernels of this model",
                             hint=f"use at least {len(tasks)} (about {32 * len(tasks)} for a fast result), "
                                  "or 0 to only apply the tuning database")
        summary = tune(tasks, spec, opts.tune_trials, cache, progress=opts.progress, retune=opts.retune)
    else:
        summary = TuningSummary(str(cache.dir), 0, note="no tuning requested: database applied as is")
        summary.tasks = [{"name": t.name, "flops": t.flops, "weight": t.weight, "trials": 0}
                         for t in tasks]
    if opts.use_database and cache.dir.exists():  # an untuned build never creates a cache folder
        with cache.locked():
            db = cache.open()
        with spec.target, db, tvm.transform.PassContext(opt_level=3):
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        _record_best_latency(summary, tasks, db, spec)
    return mod, summary


def _cpu_pipeline(imported: Imported, spec: TargetSpec, opts: BuildOptions) -> tuple[tvm.IRModule, TuningSummary]:
    mod = _prepare_cpu(imported.mod, spec, opts.prepack, opts.layout)
    if imported.batch_range is None:
        mod, summary = _tune_and_apply(mod, spec, opts)
    elif opts.tune_trials:
        raise InputError("MetaSchedule tunes static shapes only; this build has a dynamic batch",
                         hint="compile a fixed batch size to tune it, or pass tune_trials=0")
    else:
        summary = TuningSummary(None, 0, note="dynamic batch: untuned (MetaSchedule needs static shapes)")
    mod = _schedule_untuned(mod, spec, summary)
    if opts.prepack:
        mod = relax.transform.SplitLayoutRewritePreproc()(mod)
    mod = relax.transform.LiftTransformParams()(mod)
    with spec.target:
        mod = relax.transform.FoldConstant()(mod)
    summary.untuned = untuned_kernels(mod)
    return mod, summary


def _schedule_untuned(mod: tvm.IRModule, spec: TargetSpec, summary: TuningSummary) -> tvm.IRModule:
    """Give every kernel the database has no schedule for bnfold's hand schedule
    (:mod:`bnfold.targets.tvm.schedules`); record which kernels got it."""
    todo = [gv.name_hint for gv in _called_prim_funcs(mod)
            if not ((mod[gv].attrs or {}).get("tirx.is_scheduled") or relax.analysis.has_reshape_pattern(mod[gv]))]
    if not todo:
        return mod
    mod, missed = apply_default_schedules(mod, spec.target, todo)
    summary.default_scheduled = sorted(set(todo) - set(missed))
    return mod


def _cuda_pipeline(imported: Imported, spec: TargetSpec, opts: BuildOptions) -> tuple[tvm.IRModule, TuningSummary]:
    if opts.tune_trials:
        raise InputError("bnfold does not tune CUDA kernels (it uses TVM's dlight default schedules)",
                         hint="drop tune_trials / --tune-trials for target cuda")
    passes = [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
              relax.transform.LiftTransformParams()]
    with spec.target:
        mod = tvm.transform.Sequential(passes)(imported.mod)
    return mod, TuningSummary(None, 0, note="CUDA: dlight default GPU schedules (no tuning)")


def _lowering_passes(spec: TargetSpec) -> tvm.transform.Pass:
    """Lower an already legalized, fused and scheduled module (no second FuseOps over tuned kernels).

    (``relax.pipeline.dataflow_lower_passes`` fails for llvm in TVM 0.27: ``cpu_generic`` does not export it,
    so the CPU pass lists are taken from their module directly.)
    """
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    return tvm.transform.Sequential([*cpu.dataflow_lower_passes(spec.target), *cpu.finalize_passes(spec.target)])


def build(imported: Imported, spec: TargetSpec, opts: BuildOptions) -> Built:
    """Run the pipeline for ``spec`` and compile."""
    if spec.kind == "cuda":
        mod, summary = _cuda_pipeline(imported, spec, opts)
        with spec.target:
            ex = tvm.compile(mod, target=spec.target)
        source = _cuda_source(ex)
    else:
        mod, summary = _cpu_pipeline(imported, spec, opts)
        with spec.target:
            ex = tvm.compile(mod, target=spec.target, relax_pipeline=_lowering_passes(spec))
        source = None
    has_tp = any(gv.name_hint == TRANSFORM_PARAMS for gv in mod.get_global_vars())
    return Built(ex, summary, has_tp, source)


def _cuda_source(ex: object) -> str:
    pending = [ex.mod]  # type: ignore[attr-defined]
    while pending:
        m = pending.pop()
        if m.kind == "cuda":
            return str(m.inspect_source())
        pending.extend(m.imports)
    raise BnfoldError("the CUDA build produced no CUDA kernels module")


def nvcc_fatbin(source: str, arch: str, dest: Path, *, timeout_s: float = 900.0) -> Path:
    """Compile TVM's generated CUDA source with ``nvcc`` for ``arch`` into a fatbin (proves it compiles)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise BnfoldError("nvcc not found: cannot compile the CUDA kernels ahead of time",
                          hint="install the CUDA toolkit or put nvcc on PATH")
    with tempfile.TemporaryDirectory(prefix="bnfold-nvcc-") as tmp:
        cu = Path(tmp) / "kernels.cu"
        cu.write_text(source)
        cmd = [nvcc, "--fatbin", "-O3", f"-arch={arch}", "-o", str(dest), str(cu)]
        log.info("compiling CUDA kernels: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise BnfoldError(f"nvcc failed to compile the generated CUDA kernels for {arch}:\n"
                          f"{proc.stderr.strip()[-3000:]}", hint="this is a TVM codegen problem; report it")
    return dest
