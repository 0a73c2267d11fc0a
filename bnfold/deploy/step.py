"""The pre-deployment step: one call from a model to folded, recalibrated, compiled, verified artifacts.

::

    original ─► recalibrate (optional, BEFORE folding) ─► fold ─► folded.pt2 ─► model.onnx (onnxsim, ORT)
                                                                             ├► tvm/ (llvm | cuda)
                                                                             └► model_int8.onnx (int8=…)
    parity of every stage against the previous one and against the original (or the recalibrated model,
    whose change is intended), on the user's validation data; the report names where a divergence starts.
    int8 (optional): the folded model equalized, bias-corrected and quantized by ONNX Runtime on the calibration
    data (bnfold.quantization.stage), judged by its own rule (SQNR, top-1 agreement), its latency beside fp32's.
    report.json (machine-readable), report.txt (the terminal form) and report.html (a page: bnfold.htmlreport).

The driver (:func:`run_step`) takes one typed :class:`~bnfold.deploy.config.OptimizeConfig` (a frozen dataclass
per stage); :func:`optimize` keeps its keyword arguments and builds it. Each stage is one small function over the
run's state (:class:`_Run`).

Everything is built in a staging folder next to ``out_dir`` and renamed into place at the end, so a failure
never leaves a half-written output. A stage that fails (an exporter error, a compile error) is recorded in the
report and the later stages still run where they can; ``OptimizeResult.passed`` is False then. An artifact that
cannot be written (a full disk: :class:`~bnfold.errors.OutputError`) is not a stage failure: nothing is published
and the error is raised.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import logging
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import nn

from bnfold import dynamic
from bnfold.api import fold
from bnfold.capture import CaptureMode
from bnfold.deploy.config import FoldStage, OptimizeConfig, RecalibrateStage
from bnfold.deploy.ownership import owned_entries, write_ownership
from bnfold.deploy.result import OptimizeResult
from bnfold.errors import BnfoldError, DataError, InputError, OutputError
from bnfold.io.outputs import check_output_dir, staged_output
from bnfold.parity.inputs import read_batches
from bnfold.report import json_safe
from bnfold.speed import fastest, measure_latency, slower_than_eager
from bnfold.targets import get_target
from bnfold.targets.options import OnnxOptions, TorchOptions, TvmOptions

if TYPE_CHECKING:
    from bnfold.parity.stages import StageTracker
    from bnfold.quantization.stage import Int8Options

__all__ = ["optimize", "run", "run_step"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _timed(result: OptimizeResult, stage: str):
    start = time.perf_counter()
    try:
        yield
    except (OutputError, DataError):  # an output that cannot be written (disk full), unusable data (a corrupt
        raise  # image, a factory that fails): the whole command fails, nothing published
    except BnfoldError as err:
        log.warning("%s failed: %s", stage, err)
        result.errors[stage] = str(err)
    finally:
        result.seconds[stage] = time.perf_counter() - start


def optimize(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    out_dir: str | Path,
    *,
    calibration: Iterable[Any] | None = None,
    validation: Iterable[Any] | None = None,
    capture: CaptureMode = "auto",
    dynamic_shapes: object = None,
    recalibrate_mode: str = "batch",
    onnx: bool = True,
    tvm_target: str | None = "llvm",
    arch: str | None = None,
    tune_trials: int = 0,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    protect: Sequence[str | Path] = (),
    reparameterize: bool = True,
    int8: Int8Options | None = None,
    config: OptimizeConfig | None = None,
) -> OptimizeResult:
    """Recalibrate (when ``calibration`` batches are given), fold, export and compile ``model``; check parity of
    every stage on ``validation`` batches (default: the calibration batches, else ``example_inputs``); write
    ``folded.pt2``, ``model.onnx``, ``tvm/``, ``report.json``, ``report.txt`` and ``report.html`` into ``out_dir``.

    ``tvm_target``: ``"llvm"`` (this CPU), ``"cuda"`` (with ``arch``, e.g. ``"sm_90a"``; compiled here, run only
    where a GPU is) or ``None`` to skip TVM. The caller's model is never modified.

    ``dynamic_shapes`` (``torch.export``'s format; default: those of an exported ``model``, e.g. a loaded
    ``.pt2``) stay dynamic through every stage: ``folded.pt2`` keeps them, ``model.onnx`` gets its batch
    dimension from them, and a dynamic batch ``lo..hi`` becomes the TVM build's batch range (an unbounded
    ``hi`` is capped at :data:`bnfold.dynamic.DEFAULT_MAX_BATCH`; such a build is untuned).

    ``reparameterize`` (on by default here, unlike :func:`bnfold.fold`): merge parallel conv/identity branches
    summed at an add (RepVGG, MobileOne, FastViT) into one conv — exact, and the artifacts are for deployment,
    where one conv is faster than several.

    ``int8``: a :class:`bnfold.quantization.Int8Options` to also write ``model_int8.onnx`` (needs ``calibration``): the
    folded model equalized, bias-corrected and quantized by ONNX Runtime on the calibration batches, judged against
    the folded float model by the int8 rule, timed beside the fp32 ONNX model.

    ``config``: the whole configuration as one :class:`bnfold.deploy.OptimizeConfig` (then the other options must
    keep their defaults); the keyword arguments above are its shorthand.
    """
    if config is None:
        tvm = None if not tvm_target else TvmOptions(target=tvm_target, arch=arch, tune_trials=tune_trials,
                                                     cache_dir=cache_dir, progress=False)
        config = OptimizeConfig(recalibrate=RecalibrateStage(mode=recalibrate_mode),
                                fold=FoldStage(capture=capture, dynamic_shapes=dynamic_shapes,
                                               reparameterize=reparameterize),
                                onnx=OnnxOptions() if onnx else None, tvm=tvm, int8=int8, overwrite=overwrite,
                                protect=tuple(protect))
    else:
        given = {k for k, v in locals().items() if k in _DEFAULTS
                 and (tuple(v) if k == "protect" else v) is not _DEFAULTS[k]
                 and (tuple(v) if k == "protect" else v) != _DEFAULTS[k]}
        if given:
            raise InputError(f"optimize: pass either config= or the options {', '.join(sorted(given))}, not both",
                             hint="put them into the OptimizeConfig")
    return run(model, example_inputs, out_dir, config, calibration=calibration, validation=validation)


def run(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor, out_dir: str | Path,
        config: OptimizeConfig, *, calibration: Iterable[Any] | None = None,
        validation: Iterable[Any] | None = None) -> OptimizeResult:
    """:func:`optimize` with its configuration as one :class:`OptimizeConfig`: check the output folder, run every
    stage in a staging folder (:func:`run_step`), write the reports and publish the folder."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if config.int8 is not None and calibration is None:
        raise InputError("the int8 stage needs calibration data (activation ranges come from it)",
                         hint="pass calibration batches (--data CALIB)")
    out = check_output_dir(out_dir, config.protect, force=config.overwrite, owned=owned_entries)
    result = OptimizeResult(out, None, None, None)
    with staged_output(out) as staging:
        run_step(result, model, inputs, staging, config, calibration=calibration, validation=validation)
        result.artifacts["report"] = "report.json"
        if config.html:
            result.artifacts["report_html"] = "report.html"
        (staging / "report.json").write_text(json.dumps(json_safe(result.to_dict()), indent=2, default=str,
                                                            allow_nan=False))
        if config.html:
            from bnfold.htmlreport import optimize_page

            (staging / "report.html").write_text(optimize_page(result), encoding="utf-8")
        (staging / "report.txt").write_text(str(result) + "\n")
        write_ownership(staging)
    return result


_DEFAULTS: dict[str, Any] = {
    "capture": "auto", "dynamic_shapes": None, "recalibrate_mode": "batch", "onnx": True, "tvm_target": "llvm",
    "arch": None, "tune_trials": 0, "cache_dir": None, "overwrite": False, "protect": (), "reparameterize": True,
    "int8": None,
}
"""The defaults of :func:`optimize`'s shorthand options (an option given beside ``config=`` is an error)."""


def _fixed_batches(batches: Iterable[Any], inputs: tuple[torch.Tensor, ...]) -> Iterable[tuple[torch.Tensor, ...]]:
    """Re-chunk validation batches to the example batch size: exported and compiled stages have a static batch.
    A remainder smaller than one batch is dropped. A list is re-chunked now; any other source as every pass reads
    it (never listed)."""
    from bnfold.io.stream import Rechunked, rechunk

    size = int(inputs[0].shape[0]) if inputs and inputs[0].dim() > 0 else 1
    if isinstance(batches, list):
        norm = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in batches]
        return list(rechunk(norm, size, source="the validation data"))
    return Rechunked(read_batches(batches), size, source="the validation data")


def _reiterable(batches: Iterable[Any] | None, model: nn.Module) -> Iterable[Any] | None:
    """``batches`` as something every pass can iterate from the start: itself when iterating it twice starts over
    (a list, a DataLoader, a :mod:`bnfold.io.stream` source); a one-shot iterator (a generator) is listed, since a
    second pass would find it exhausted."""
    if batches is None:
        return None
    from bnfold.batches import Batches, positional_arity

    arity = positional_arity(model)
    if isinstance(batches, Iterator):
        return Batches(list(batches), arity)
    return Batches(batches, arity)


EAGER, TVM = "pytorch eager (original)", "tvm"


def _measure_speed(result: OptimizeResult, engines: dict[str, Any], inputs: tuple[torch.Tensor, ...]) -> None:
    """Every runnable artifact timed side by side at the example batch; a TVM artifact slower than the model it
    came from is said in the report (deploy the faster one, or tune)."""
    if len(engines) < 2:
        return
    result.latency_ms = measure_latency(engines, inputs)
    ratio = slower_than_eager(result.latency_ms, TVM, EAGER)
    if ratio is not None:
        result.warnings.append(
            f"tvm: the compiled artifact is {ratio:.2f}x slower than PyTorch eager on this host at the example "
            f"batch; deploy {fastest(result.latency_ms)!r} or tune it (--tune-trials N, ~32 per kernel)")
    ratio = slower_than_eager(result.latency_ms, "onnx runtime int8", "onnx runtime")
    if ratio is not None:
        moved = result.int8.prepare.clamps_moved if result.int8 is not None and result.int8.prepare else 0
        result.warnings.append(f"int8: the int8 model runs {ratio:.2f}x slower than the fp32 ONNX model on this host"
                               + (f" ({moved} per-channel clamps run as float ops; --keep-clamps keeps them "
                                  "fused)" if moved else ""))


@dataclass
class _Run:
    """The state one run of the step passes from stage to stage."""

    result: OptimizeResult
    inputs: tuple[torch.Tensor, ...]
    staging: Path
    config: OptimizeConfig
    check_data: Iterable[tuple[torch.Tensor, ...]]
    tracker: StageTracker
    engines: dict[str, Any] = field(default_factory=dict)
    calib: Iterable[Any] | None = None
    dims: Any = None


def run_step(result: OptimizeResult, model: nn.Module, inputs: tuple[torch.Tensor, ...], staging: Path,
             config: OptimizeConfig, *, calibration: Iterable[Any] | None = None,
             validation: Iterable[Any] | None = None) -> None:
    """Run every stage of ``config`` on ``model`` into ``staging``, filling ``result`` (a failed stage is recorded
    in ``result.errors``; later stages run where they can)."""
    from bnfold.parity.stages import StageTracker

    calib = _reiterable(calibration, model)  # streamed, never listed: a pass holds one batch
    first = list(itertools.islice(calib, 1 if validation is not None else 8)) if calib is not None else []
    calib = calib if first else None  # no batches: nothing to recalibrate on
    check_data = _fixed_batches(validation if validation is not None else (first or [inputs]), inputs)
    del first  # the parity inputs hold what they need
    step = _Run(result, inputs, staging, config, check_data, StageTracker(check_data), calib=calib)
    step.tracker.add("original", model)
    step.engines[EAGER] = model
    work = _recalibrate(step, model) if calib is not None else model
    folded = _fold(step, model, work)
    if folded is None:
        result.stages = step.tracker.report()
        return
    if config.onnx is not None:
        _onnx(step, folded, config.onnx)
    if config.int8 is not None and calib is not None:
        _int8(step, folded)
    if config.tvm is not None:
        _tvm(step, folded, config.tvm)
    result.stages = step.tracker.report()
    with _timed(result, "speed"):
        _measure_speed(result, step.engines, inputs)


def _recalibrate(step: _Run, original: nn.Module) -> nn.Module:
    """A recalibrated copy of ``original`` (the caller's model is never changed), and the drift per BatchNorm layer
    on the validation data before and after (``config.recalibrate.drift_batches`` batches)."""
    from bnfold.recalibration.core import recalibrate

    stage = step.config.recalibrate
    work = original
    with _timed(step.result, "recalibrate"):
        work = copy.deepcopy(original)
        step.result.recalibration = recalibrate(work, step.calib, mode=stage.mode)  # type: ignore[arg-type]
        step.tracker.add("recalibrated", work, expected_change=True)
    if step.result.recalibration is not None and stage.drift_batches:
        _drift(step, original, work, _FirstBatches(step.check_data, stage.drift_batches))
    return work


@dataclass(frozen=True)
class _FirstBatches:
    """The first ``n`` batches of a re-iterable source, read again on every pass (never listed: a streamed
    validation set keeps one batch in memory)."""

    source: Iterable[tuple[torch.Tensor, ...]]
    n: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return itertools.islice(self.source, self.n)


def _drift(step: _Run, original: nn.Module, recalibrated: nn.Module,
           batches: Iterable[tuple[torch.Tensor, ...]]) -> None:
    """Drift (:func:`bnfold.diagnose`) of the original and of the recalibrated model on ``batches``: what the
    report's drift chart shows. Informational: a failure is a warning, not a stage error."""
    from bnfold.recalibration.drift import diagnose

    with _timed(step.result, "drift"):
        try:
            step.result.drift = {"before": diagnose(original, batches, progress=False),
                                 "after": diagnose(recalibrated, batches, progress=False)}
        except BnfoldError as err:
            step.result.warnings.append(f"drift: not measured ({err.message})")


def _fold(step: _Run, original: nn.Module, work: nn.Module) -> torch.fx.GraphModule | None:
    """Fold ``work``, save ``folded.pt2``; None when folding failed (recorded in the result)."""
    fc = step.config.fold
    dynamic_shapes = fc.dynamic_shapes
    if dynamic_shapes is None and dynamic.is_exported(original):
        dynamic_shapes = dynamic.dynamic_dims(original)  # type: ignore[arg-type]
    folded = None
    with _timed(step.result, "fold"):
        fr = fold(work, step.inputs, capture=fc.capture, dynamic_shapes=dynamic_shapes, check=False,
                  reparameterize=fc.reparameterize)
        folded, step.result.fold, step.dims = fr.module, fr.report, fr.dynamic_shapes
        step.tracker.add("folded", folded)
        step.engines["pytorch eager (folded)"] = folded
        get_target("torch").lower(folded, step.inputs, TorchOptions(dynamic_shapes=step.dims)).save(
            step.staging / "folded.pt2", protect=step.config.protect)
        step.result.artifacts["folded"] = "folded.pt2"
    return folded


def _onnx(step: _Run, folded: torch.fx.GraphModule, options: OnnxOptions) -> None:
    with _timed(step.result, "onnx"):
        from bnfold.targets.onnx import StaticBatchWarning

        opts = dataclasses.replace(options, path=step.staging / "model.onnx", protect=tuple(step.config.protect),
                                   dynamic_shapes=step.dims)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StaticBatchWarning)  # said in the report instead
            runtime = get_target("onnx").lower(folded, step.inputs, opts)
        step.result.artifacts["onnx"] = "model.onnx"
        if runtime.build_info.get("static_reason"):
            step.result.warnings.append(f"onnx: fixed batch: {runtime.build_info['static_reason']}")
        step.tracker.add("onnx", runtime)
        step.engines["onnx runtime"] = runtime


def _int8(step: _Run, folded: torch.fx.GraphModule) -> None:
    result = step.result
    with _timed(result, "int8"):
        from bnfold.quantization.stage import int8_stage
        from bnfold.targets.onnx import OnnxRuntimeModel

        batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in step.calib or ()]  # int8 keeps them
        checks = step.check_data if isinstance(step.check_data, list) else list(step.check_data)
        result.int8 = int8_stage(folded, folded, step.inputs, batches, checks, step.staging,
                                 options=step.config.int8, dynamic_shapes=step.dims)
        result.errors.update({f"int8 {k}": v for k, v in result.int8.errors.items()})
        if result.int8.path is not None:
            result.artifacts["int8"] = result.int8.path
            step.engines["onnx runtime int8"] = OnnxRuntimeModel(step.staging / result.int8.path)


def _tvm(step: _Run, folded: torch.fx.GraphModule, options: TvmOptions) -> None:
    result = step.result
    with _timed(result, "tvm"):
        tvm = get_target("tvm")  # imports bnfold.targets.tvm (and with it UntunedKernelsWarning)
        from bnfold.targets.tvm import UntunedKernelsWarning

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UntunedKernelsWarning)
            batch = dynamic.batch_range(step.dims)
            if batch is not None and options.tune_trials:
                result.warnings.append(f"tvm: built for the example batch (tuning needs static shapes), not "
                                       f"the dynamic batch {batch[0]}..{batch[1]}")
                batch = None
            artifact = tvm.lower(folded, step.inputs, dataclasses.replace(options, progress=False,
                                                                          dynamic_batch=batch))
        for w in caught:  # untuned kernels: said in the report, not as a stray Python warning
            if issubclass(w.category, UntunedKernelsWarning):
                result.warnings.append(f"tvm: {w.message}")
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        artifact.save(step.staging / "tvm")
        result.artifacts["tvm"] = "tvm/"
        result.tvm_kernels = [dict(t) for t in (artifact.build_info.get("tuning") or {}).get("tasks", [])]
        if artifact.runnable:
            step.tracker.add("tvm", artifact)
            step.engines[TVM] = artifact
        else:
            step.tracker.report().notes.append(f"tvm ({options.target}) artifact not run: no matching device here")
