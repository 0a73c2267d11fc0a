"""The pre-deployment step: one call from a model to folded, recalibrated, compiled, verified artifacts.

::

    original ─► recalibrate (optional, BEFORE folding) ─► fold ─► folded.pt2 ─► model.onnx (onnxsim, ORT)
                                                                             ├► tvm/ (llvm | cuda)
                                                                             └► model_int8.onnx (int8=…)
    parity of every stage against the previous one and against the original (or the recalibrated model,
    whose change is intended), on the user's validation data; the report names where a divergence starts.
    int8 (optional): the folded model equalized, bias-corrected and quantized by ONNX Runtime on the calibration
    data (bnfold.quantize.stage), judged by its own rule (SQNR, top-1 agreement), its latency beside fp32's.

Everything is built in a staging folder next to ``out_dir`` and renamed into place at the end, so a failure
never leaves a half-written output. A stage that fails (an exporter error, a compile error) is recorded in the
report and the later stages still run where they can; ``OptimizeResult.passed`` is False then. An artifact that
cannot be written (a full disk: :class:`~bnfold.errors.OutputError`) is not a stage failure: nothing is published
and the error is raised.
"""

from __future__ import annotations

import contextlib
import copy
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
from torch import nn

from bnfold import dynamic
from bnfold.api import fold
from bnfold.capture import CaptureMode
from bnfold.errors import BnfoldError, DataError, InputError, OutputError
from bnfold.io.outputs import check_output_dir, staged_output
from bnfold.parity.inputs import read_batches
from bnfold.report import FoldReport, format_table, json_safe
from bnfold.speed import fastest, measure_latency, slower_than_eager
from bnfold.targets import get_target

if TYPE_CHECKING:
    from bnfold.quantize.stage import Int8Options, Int8Result

__all__ = ["OptimizeResult", "optimize"]

log = logging.getLogger(__name__)


@dataclass
class OptimizeResult:
    """What :func:`optimize` produced. ``artifacts`` maps a name to its path inside ``out_dir``."""

    out_dir: Path
    fold: FoldReport | None
    recalibration: Any | None
    stages: Any | None
    artifacts: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # per artifact, example batch
    int8: Int8Result | None = None  # with optimize(..., int8=Int8Options())

    @property
    def passed(self) -> bool:
        int8_ok = self.int8 is None or bool(self.int8.passed)
        return not self.errors and self.stages is not None and bool(self.stages.passed) and int8_ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "out_dir": str(self.out_dir),
            "artifacts": self.artifacts,
            "errors": self.errors,
            "warnings": self.warnings,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "latency_ms": self.latency_ms,
            "fastest": fastest(self.latency_ms),
            "recalibration": None if self.recalibration is None else self.recalibration.to_dict(),
            "fold": None if self.fold is None else self.fold.to_dict(),
            "stages": None if self.stages is None else self.stages.to_dict(),
            "int8": None if self.int8 is None else self.int8.to_dict(),
        }

    def __str__(self) -> str:
        slow = next((f" ({w.split(';')[0]})" for w in self.warnings if w.startswith("tvm: the compiled artifact")), "")
        lines = [f"bnfold optimize → {self.out_dir}: {'PASS' if self.passed else 'FAIL'}{slow}", ""]
        if self.recalibration is not None:
            lines += [str(self.recalibration), ""]
        if self.fold is not None:
            lines += [self.fold.render(explain=False), ""]
        if self.stages is not None:
            lines += [str(self.stages), ""]
        if self.int8 is not None:
            lines += [self.int8.render(), ""]
        rows = [[name, path] for name, path in self.artifacts.items()]
        lines.append(format_table(["artifact", "path"], rows))
        if self.latency_ms:
            rows = [[name, f"{t['median_ms']:.2f}", f"{t['min_ms']:.2f}"] for name, t in self.latency_ms.items()]
            lines += ["", format_table(["latency (example batch)", "median ms", "min ms"], rows),
                      f"fastest: {fastest(self.latency_ms)}"]
        for stage, err in self.errors.items():
            lines.append(f"ERROR in {stage}: {err}")
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)


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


OWNERSHIP = ".bnfold-output.json"
"""Written last into every ``optimize`` output folder: lists what bnfold put there, so ``--force`` can tell its
own earlier output (replaced) from a folder holding anything else (refused)."""


def owned_entries(out: Path) -> set[str] | None:
    """The entries (relative paths) bnfold's manifest in ``out`` lists, or None when ``out`` is not ours."""
    try:
        doc = json.loads((out / OWNERSHIP).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("writer") != "bnfold" or not isinstance(doc.get("entries"), list):
        return None
    return {str(e) for e in doc["entries"]} | {OWNERSHIP}


def write_ownership(staging: Path) -> None:
    entries = sorted(str(p.relative_to(staging)) for p in staging.rglob("*"))
    (staging / OWNERSHIP).write_text(json.dumps({"writer": "bnfold", "command": "optimize", "entries": entries},
                                                indent=1) + "\n")


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
) -> OptimizeResult:
    """Recalibrate (when ``calibration`` batches are given), fold, export and compile ``model``; check parity of
    every stage on ``validation`` batches (default: the calibration batches, else ``example_inputs``); write
    ``folded.pt2``, ``model.onnx``, ``tvm/``, ``report.json`` and ``report.txt`` into ``out_dir``.

    ``tvm_target``: ``"llvm"`` (this CPU), ``"cuda"`` (with ``arch``, e.g. ``"sm_90a"``; compiled here, run only
    where a GPU is) or ``None`` to skip TVM. The caller's model is never modified.

    ``dynamic_shapes`` (``torch.export``'s format; default: those of an exported ``model``, e.g. a loaded
    ``.pt2``) stay dynamic through every stage: ``folded.pt2`` keeps them, ``model.onnx`` gets its batch
    dimension from them, and a dynamic batch ``lo..hi`` becomes the TVM build's batch range (an unbounded
    ``hi`` is capped at :data:`bnfold.dynamic.DEFAULT_MAX_BATCH`; such a build is untuned).

    ``reparameterize`` (on by default here, unlike :func:`bnfold.fold`): merge parallel conv/identity branches
    summed at an add (RepVGG, MobileOne, FastViT) into one conv — exact, and the artifacts are for deployment,
    where one conv is faster than several.

    ``int8``: a :class:`bnfold.quantize.Int8Options` to also write ``model_int8.onnx`` (needs ``calibration``): the
    folded model equalized, bias-corrected and quantized by ONNX Runtime on the calibration batches, judged against
    the folded float model by the int8 rule, timed beside the fp32 ONNX model.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if int8 is not None and calibration is None:
        raise InputError("the int8 stage needs calibration data (activation ranges come from it)",
                         hint="pass calibration batches (--data CALIB)")
    out = check_output_dir(out_dir, protect, force=overwrite, owned=owned_entries)
    result = OptimizeResult(out, None, None, None)
    with staged_output(out) as staging:
        _run(result, model, inputs, staging, calibration, validation, capture, recalibrate_mode, onnx,
             tvm_target, arch, tune_trials, cache_dir, protect, dynamic_shapes, reparameterize, int8)
        (staging / "report.json").write_text(json.dumps(json_safe(result.to_dict()), indent=2, default=str,
                                                            allow_nan=False))
        result.artifacts["report"] = "report.json"
        (staging / "report.txt").write_text(str(result) + "\n")
        write_ownership(staging)
    return result


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


def _run(result: OptimizeResult, model: nn.Module, inputs: tuple[torch.Tensor, ...], staging: Path,
         calibration: Iterable[Any] | None, validation: Iterable[Any] | None, capture: CaptureMode,
         recalibrate_mode: str, onnx: bool, tvm_target: str | None, arch: str | None, tune_trials: int,
         cache_dir: str | Path | None, protect: Sequence[str | Path], dynamic_shapes: object = None,
         reparameterize: bool = True, int8: Int8Options | None = None) -> None:
    from bnfold.parity.stages import StageTracker

    original = model
    calib = _reiterable(calibration, model)  # streamed, never listed: a pass holds one batch
    first = list(itertools.islice(calib, 1 if validation is not None else 8)) if calib is not None else []
    calib = calib if first else None  # no batches: nothing to recalibrate on
    check_data = _fixed_batches(validation if validation is not None else (first or [inputs]), inputs)
    del first  # the parity inputs hold what they need
    tracker = StageTracker(check_data)
    tracker.add("original", original)
    engines: dict[str, Any] = {EAGER: original}

    work = original
    if calib is not None:
        from bnfold.recalibrate.core import recalibrate

        with _timed(result, "recalibrate"):
            work = copy.deepcopy(original)
            result.recalibration = recalibrate(work, calib, mode=recalibrate_mode)  # type: ignore[arg-type]
            tracker.add("recalibrated", work, expected_change=True)

    folded = None
    dims = None
    if dynamic_shapes is None and dynamic.is_exported(original):
        dynamic_shapes = dynamic.dynamic_dims(original)  # type: ignore[arg-type]
    with _timed(result, "fold"):
        fr = fold(work, inputs, capture=capture, dynamic_shapes=dynamic_shapes, check=False,
                  reparameterize=reparameterize)
        folded, result.fold, dims = fr.module, fr.report, fr.dynamic_shapes
        tracker.add("folded", folded)
        engines["pytorch eager (folded)"] = folded
        get_target("torch").lower(folded, inputs, {"dynamic_shapes": dims}).save(staging / "folded.pt2",
                                                                                 protect=protect)
        result.artifacts["folded"] = "folded.pt2"
    if folded is None:
        result.stages = tracker.report()
        return

    if onnx:
        with _timed(result, "onnx"):
            from bnfold.targets.onnx import StaticBatchWarning

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", StaticBatchWarning)  # said in the report instead
                runtime = get_target("onnx").lower(folded, inputs, {"path": staging / "model.onnx",
                                                                    "protect": protect, "dynamic_shapes": dims})
            result.artifacts["onnx"] = "model.onnx"
            if runtime.build_info.get("static_reason"):
                result.warnings.append(f"onnx: fixed batch: {runtime.build_info['static_reason']}")
            tracker.add("onnx", runtime)
            engines["onnx runtime"] = runtime

    if int8 is not None and calib is not None:
        with _timed(result, "int8"):
            from bnfold.quantize.stage import int8_stage
            from bnfold.targets.onnx import OnnxRuntimeModel

            batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in calib]  # int8 keeps its batches
            checks = check_data if isinstance(check_data, list) else list(check_data)
            result.int8 = int8_stage(folded, folded, inputs, batches, checks, staging, options=int8,
                                     dynamic_shapes=dims)
            result.errors.update({f"int8 {k}": v for k, v in result.int8.errors.items()})
            if result.int8.path is not None:
                result.artifacts["int8"] = result.int8.path
                engines["onnx runtime int8"] = OnnxRuntimeModel(staging / result.int8.path)

    if tvm_target:
        with _timed(result, "tvm"):
            tvm = get_target("tvm")  # imports bnfold.targets.tvm (and with it UntunedKernelsWarning)
            from bnfold.targets.tvm import UntunedKernelsWarning

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UntunedKernelsWarning)
                batch = dynamic.batch_range(dims)
                if batch is not None and tune_trials:
                    result.warnings.append(f"tvm: built for the example batch (tuning needs static shapes), not "
                                           f"the dynamic batch {batch[0]}..{batch[1]}")
                    batch = None
                artifact = tvm.lower(folded, inputs, {"target": tvm_target, "arch": arch, "tune_trials": tune_trials,
                                                      "cache_dir": cache_dir, "progress": False,
                                                      "dynamic_batch": batch})
            for w in caught:  # untuned kernels: said in the report, not as a stray Python warning
                if issubclass(w.category, UntunedKernelsWarning):
                    result.warnings.append(f"tvm: {w.message}")
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            artifact.save(staging / "tvm")
            result.artifacts["tvm"] = "tvm/"
            if artifact.runnable:
                tracker.add("tvm", artifact)
                engines[TVM] = artifact
            else:
                tracker.report().notes.append(f"tvm ({tvm_target}) artifact not run: no matching device here")
    result.stages = tracker.report()
    with _timed(result, "speed"):
        _measure_speed(result, engines, inputs)
