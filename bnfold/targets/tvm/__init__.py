"""The TVM target: ``bnfold.compile(model, example_inputs, target="llvm"|"cuda", ...) -> TvmArtifact``.

Lowering only, never folding: pass the folded module (``bnfold.fold(model, x).module``). The route is
``torch.export`` → ``tvm.relax.frontend.torch.from_exported_program`` → Relax → ``tvm.compile``; see
:mod:`bnfold.targets.tvm.build` for the pipelines, :mod:`bnfold.targets.tvm.tuning` for MetaSchedule
tuning and :mod:`bnfold.targets.tvm.cache` for the shared tuning database. A CPU kernel the database has no tuned
schedule for runs bnfold's hand schedule (:mod:`bnfold.targets.tvm.schedules`: register-tiled, vectorized,
parallel, on blocked NCHWc layouts); a kernel no schedule at all applies to would run as plain loops (roughly 40x
slower than PyTorch), and :class:`UntunedKernelsWarning` lists it.

This module imports TVM lazily: ``import bnfold`` works without it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bnfold.errors import BnfoldError, InputError
from bnfold.targets.options import TvmOptions, target_options
from bnfold.targets.tvm.threads import THREAD_ENV_DEFAULTS, configure_threads

if TYPE_CHECKING:
    from bnfold.targets.tvm.artifact import TvmArtifact
    from bnfold.targets.tvm.tuning import TuningProgress

__all__ = ["THREAD_ENV_DEFAULTS", "TvmTarget", "UntunedKernelsWarning", "compile", "configure_threads",
           "load_artifact", "tuning_tasks"]

log = logging.getLogger(__name__)


class UntunedKernelsWarning(UserWarning):
    """Some kernels of a CPU build have no schedule, tuned or default (plain loops: no threads, little
    vectorization)."""


def _require_tvm() -> None:
    try:
        import tvm  # noqa: F401
    except ImportError as exc:
        raise BnfoldError("the TVM target needs Apache TVM", hint="pip install 'bnfold[tvm]'") from exc


class _Reporter:
    """Tuning progress: a tqdm bar on a terminal (if ``bar``) and a log line every ~10% or minute."""

    def __init__(self, bar: bool) -> None:
        self.bar_wanted = bar
        self._bar: Any = None
        self._last_log = 0.0
        self._last_pct = -1

    def __call__(self, p: TuningProgress) -> None:
        if self.bar_wanted and self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=p.total, unit="trial", desc="tuning", disable=None, dynamic_ncols=True)
        if self._bar is not None:
            self._bar.update(p.done - self._bar.n)
        pct = int(100 * p.done / max(1, p.total))
        now = time.monotonic()
        if pct // 10 > self._last_pct // 10 or now - self._last_log > 60:
            eta = "?" if p.eta_s is None else f"{p.eta_s / 60:.1f} min"
            log.info("tuning: %d/%d trials (%d%%), %.1f min elapsed, ETA %s%s", p.done, p.total, pct,
                     p.elapsed_s / 60, eta, f", {p.errors} failed" if p.errors else "")
            self._last_log, self._last_pct = now, pct

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _warn_untuned(manifest: Mapping[str, Any]) -> None:
    tuning = manifest["tuning"]
    untuned = tuning.get("untuned") or []
    if not untuned:
        return
    flops = {t["name"]: t["flops"] * t["weight"] for t in tuning.get("tasks", [])}
    total = sum(flops.values()) or 1.0
    share = sum(flops.get(n, 0.0) for n in untuned) / total
    names = ", ".join(untuned[:12]) + (f", … ({len(untuned) - 12} more)" if len(untuned) > 12 else "")
    hint = ("compile with a static batch and tune_trials=N (CLI: --tune-trials N), e.g. 32 per kernel"
            if manifest["signature"].get("batch_range") is None else "dynamic-batch builds cannot be tuned")
    warnings.warn(UntunedKernelsWarning(
        f"{len(untuned)} kernel(s) have NO schedule, tuned or default ({100 * share:.0f}% of the model's FLOPs); "
        f"unscheduled CPU code is typically 10-40x slower than tuned: {names}. Fix: {hint}."), stacklevel=3)


def compile(  # the public name: bnfold.compile (shadows the builtin only here)
    module: nn.Module | torch.export.ExportedProgram,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    target: str = "llvm",
    tune_trials: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    arch: str | None = None,
    mcpu: str | None = None,
    num_cores: int | None = None,
    dynamic_batch: tuple[int, int] | None = None,
    prepack: bool | None = None,
    layout: str | None = None,
    retune: bool = False,
    progress: bool | Callable[[TuningProgress], None] = True,
) -> TvmArtifact:
    """Compile ``module`` with TVM for this CPU (``"llvm"``) or a CUDA GPU (``"cuda"``, ``arch="sm_90a"``).

    ``tune_trials``: total MetaSchedule trials, split across kernels by cost (0: apply the tuning database
    only). ``cache_dir``: root of the tuning database, shared across models (default ``~/.cache/bnfold/tvm``).
    ``dynamic_batch=(lo, hi)``: accept any batch size in that range (untuned/CUDA builds only).
    ``prepack``: tuned convolutions pick their weight layout, weights re-laid out once at load (default: on
    for CPU; measured ~1.7x faster on a 3x3 convolution here).
    ``layout``: CPU layout of 2-D convolutions — ``"NCHWc"`` (default: channels blocked by the SIMD width, end to
    end), ``"NCHW"`` or ``"NHWC"``.
    ``mcpu``/``num_cores``: override the host CPU / core count. ``progress``: tqdm bar on a terminal (True),
    log lines only (False), or a callable receiving :class:`~bnfold.targets.tvm.tuning.TuningProgress`.
    """
    _require_tvm()
    if tune_trials < 0:
        raise InputError(f"tune_trials must be >= 0, got {tune_trials}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    configure_threads(num_cores)
    from bnfold.targets.tvm.artifact import TvmArtifact
    from bnfold.targets.tvm.build import BuildOptions, Built, build
    from bnfold.targets.tvm.importer import import_torch
    from bnfold.targets.tvm.package import package, write_manifest
    from bnfold.targets.tvm.target import make_target

    if prepack is None:
        prepack = target in ("llvm", "cpu")
    t0 = time.monotonic()
    spec = make_target(target, arch=arch, mcpu=mcpu, num_cores=num_cores)
    if type(module).__name__ == "ModelProto":  # an ONNX model (folded by bnfold.passes.onnx): its own frontend
        from bnfold.targets.tvm.onnx_import import import_onnx

        imported = import_onnx(module, inputs,  # type: ignore[arg-type]
                               batch_range=tuple(dynamic_batch) if dynamic_batch else None)
    else:
        imported = import_torch(module, inputs, batch_range=tuple(dynamic_batch) if dynamic_batch else None)
    t_import = time.monotonic()
    reporter = progress if callable(progress) else _Reporter(bar=bool(progress))
    opts = BuildOptions(tune_trials=tune_trials, cache_dir=cache_dir, prepack=prepack, layout=layout,
                        retune=retune, progress=reporter)
    try:
        built = build(imported, spec, opts)
    finally:
        if isinstance(reporter, _Reporter):
            reporter.close()
    t_build = time.monotonic()
    options = {"tune_trials": tune_trials, "prepack": prepack, "layout": layout, "dynamic_batch": dynamic_batch,
               "timings_s": {"import": round(t_import - t0, 2), "tune_and_build": round(t_build - t_import, 2)}}

    def packaged(b: Built) -> TvmArtifact:
        out = Path(tempfile.mkdtemp(prefix="bnfold-tvm-"))
        try:
            manifest = package(b, imported, spec, out,
                               options={**options, "timings_s": dict(options["timings_s"])})
            manifest["options"]["timings_s"]["total"] = round(time.monotonic() - t0, 2)
            write_manifest(out, manifest)
            return TvmArtifact(out, manifest, temporary=True, strict_isa=False)
        except BaseException:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            raise

    artifact = packaged(built)
    if tune_trials and spec.kind != "cuda" and any(t.get("best_us") for t in built.summary.tasks):
        from bnfold.targets.tvm.keep_faster import keep_faster

        default = dataclasses.replace(opts, tune_trials=0, use_database=False)
        artifact = keep_faster(artifact, lambda: packaged(build(imported, spec, default)), inputs,
                               write=lambda a: write_manifest(a.directory, a.build_info))
    log.info("compiled for %s in %.1f s", spec.description, time.monotonic() - t0)
    _warn_untuned(artifact.build_info)
    return artifact


def tuning_tasks(module: nn.Module | torch.export.ExportedProgram,
                 example_inputs: Sequence[torch.Tensor] | torch.Tensor, *, mcpu: str | None = None,
                 num_cores: int | None = None, prepack: bool = True,
                 layout: str | None = None) -> list[dict[str, Any]]:
    """The CPU kernels :func:`compile` would tune, costliest first: ``[{"name", "flops", "weight"}]``.

    Use it to size ``tune_trials`` (every kernel needs at least one trial; ~32 each gives a useful result).
    """
    _require_tvm()
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    configure_threads(num_cores)
    from bnfold.targets.tvm.build import kernel_tasks
    from bnfold.targets.tvm.importer import import_torch
    from bnfold.targets.tvm.target import cpu_target

    spec = cpu_target(mcpu, num_cores)
    tasks = kernel_tasks(import_torch(module, inputs), spec, prepack=prepack, layout=layout)
    return [{"name": t.name, "flops": t.flops, "weight": t.weight} for t in tasks]


def load_artifact(path: str | os.PathLike[str]) -> TvmArtifact:
    """Load a folder written by :meth:`TvmArtifact.save` / ``bnfold compile`` (checks the CPU ISA first)."""
    _require_tvm()
    configure_threads()
    from bnfold.targets.tvm.artifact import TvmArtifact

    return TvmArtifact.load(path)


class TvmTarget:
    """:class:`bnfold.targets.Target` for TVM; ``options``: a :class:`~bnfold.targets.options.TvmOptions` (or a
    mapping of its fields), :func:`compile`'s keyword arguments."""

    name = "tvm"
    options_type = TvmOptions

    def lower(self, gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor],
              options: TvmOptions | Mapping[str, Any] | None = None) -> TvmArtifact:
        opts = target_options(TvmOptions, options, what="tvm target")
        return compile(gm, example_inputs, **{f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)})
