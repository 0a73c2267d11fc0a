"""``bnfold.quantize``: a float model and calibration data → a folder with a verified int8 ONNX model.

::

    model ─► fold (exact, float64 parity) ─► model_fp32.onnx (onnxsim, ORT)
          └► int8 stage (bnfold.quantize.stage): equalize ✓ → absorb → correct → ORT quantize_static → model_int8.onnx
             int8 parity vs the float model (SQNR, top-1 agreement) on the validation batches
          ─► ORT latency, fp32 and int8 side by side; report.json / report.txt

Everything is built in a staging folder beside ``out_dir`` and renamed into place at the end (as ``optimize``);
the folder carries bnfold's manifest, so ``overwrite=True`` (``--force``) replaces only bnfold's own output.
The BatchNorm statistics are not recalibrated here: the int8 model is judged against *this* float model
(``bnfold optimize --data CALIB --int8`` recalibrates first, then quantizes).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnfold.api import fold
from bnfold.capture import CaptureMode
from bnfold.errors import BnfoldError, InputError, OutputError
from bnfold.io.outputs import check_output_dir, staged_output
from bnfold.optimize import OWNERSHIP, owned_entries
from bnfold.parity.inputs import Batch
from bnfold.quantize.stage import INT8_FILE, Int8Options, Int8Result, int8_stage
from bnfold.report import FoldReport, format_table, json_safe
from bnfold.speed import measure_latency

__all__ = ["FP32_FILE", "QuantizeResult", "quantize"]

FP32_FILE = "model_fp32.onnx"
ORT_FP32, ORT_INT8 = "onnx runtime fp32", "onnx runtime int8"


@dataclass
class QuantizeResult:
    """What :func:`quantize` produced; ``passed`` when the fold kept parity and the int8 model passes its rule."""

    out_dir: Path
    fold: FoldReport | None = None
    int8: Int8Result | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        fold_ok = self.fold is not None and (self.fold.parity or {}).get("passed", True)
        return not self.errors and bool(fold_ok) and self.int8 is not None and self.int8.passed

    @property
    def speedup(self) -> float | None:
        """ORT fp32 median latency over int8's."""
        if ORT_FP32 in self.latency_ms and ORT_INT8 in self.latency_ms:
            return self.latency_ms[ORT_FP32]["median_ms"] / self.latency_ms[ORT_INT8]["median_ms"]
        return None

    def to_dict(self) -> dict[str, Any]:
        return json_safe({
            "passed": self.passed,
            "out_dir": str(self.out_dir),
            "artifacts": self.artifacts,
            "errors": self.errors,
            "warnings": self.warnings,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "latency_ms": self.latency_ms,
            "int8_speedup": self.speedup,
            "fold": None if self.fold is None else self.fold.to_dict(),
            "int8": None if self.int8 is None else self.int8.to_dict(),
        })

    def render(self, *, explain: bool = False) -> str:
        lines = [f"bnfold quantize → {self.out_dir}: {'PASS' if self.passed else 'FAIL'}", ""]
        if self.fold is not None:
            lines += [self.fold.render(explain=False), ""]
        if self.int8 is not None:
            lines += [self.int8.render(explain=explain), ""]
        lines.append(format_table(["artifact", "path"], [[k, v] for k, v in self.artifacts.items()]))
        if self.latency_ms:
            rows = [[k, f"{t['median_ms']:.2f}", f"{t['min_ms']:.2f}"] for k, t in self.latency_ms.items()]
            lines += ["", format_table(["latency (example batch)", "median ms", "min ms"], rows)]
            if self.speedup is not None:
                lines.append(f"int8 / fp32 speed-up: {self.speedup:.2f}x")
        lines += [f"ERROR in {k}: {v}" for k, v in self.errors.items()]
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def _batches(items: Iterable[Any]) -> list[Batch]:
    return [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in items]


def _write_manifest(staging: Path) -> None:
    entries = sorted(str(p.relative_to(staging)) for p in staging.rglob("*"))
    (staging / OWNERSHIP).write_text(json.dumps({"writer": "bnfold", "command": "quantize", "entries": entries},
                                                indent=1) + "\n")


def quantize(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    out_dir: str | Path,
    *,
    calibration: Iterable[Any],
    validation: Iterable[Any] | None = None,
    options: Int8Options | None = None,
    capture: CaptureMode = "auto",
    dynamic_shapes: object = None,
    overwrite: bool = False,
    protect: Sequence[str | Path] = (),
    reparameterize: bool = True,
) -> QuantizeResult:
    """Fold ``model``, prepare and quantize it to int8 with ONNX Runtime on ``calibration`` batches, check it against
    the float model on ``validation`` batches (default: the first 8 calibration batches), write ``model_fp32.onnx``,
    ``model_int8.onnx``, ``report.json`` and ``report.txt`` into ``out_dir``.

    ``options``: :class:`~bnfold.quantize.stage.Int8Options` — per-channel (default) or per-tensor weights,
    cross-layer equalization, bias absorption, bias correction (``"auto"``: from the calibration data; ``"bn"``:
    data-free, from the BatchNorm statistics that preceded the fold; ``"none"``), the int8 parity rule. The caller's
    model is never modified."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    calib = _batches(calibration)
    if not calib:
        raise InputError("int8 quantization needs calibration data: ONNX Runtime calibrates activation ranges on it",
                         hint="pass --data CALIB (a few hundred representative inputs)")
    checks = _batches(validation) if validation is not None else calib[:8]
    options = options or Int8Options()
    out = check_output_dir(out_dir, protect, force=overwrite, owned=owned_entries)
    result = QuantizeResult(out)
    with staged_output(out) as staging:
        _run(result, model, inputs, calib, checks, staging, options, capture, dynamic_shapes, protect, reparameterize)
        (staging / "report.json").write_text(json.dumps(result.to_dict(), indent=2, default=str, allow_nan=False))
        result.artifacts["report"] = "report.json"
        (staging / "report.txt").write_text(result.render(explain=True) + "\n")
        _write_manifest(staging)
    return result


def _run(result: QuantizeResult, model: nn.Module, inputs: tuple[torch.Tensor, ...], calib: list[Batch],
         checks: list[Batch], staging: Path, options: Int8Options, capture: CaptureMode, dynamic_shapes: object,
         protect: Sequence[str | Path], reparameterize: bool) -> None:
    from bnfold.targets import get_target
    from bnfold.targets.onnx import OnnxRuntimeModel, StaticBatchWarning

    t0 = time.perf_counter()
    fr = fold(model, inputs, capture=capture, dynamic_shapes=dynamic_shapes, reparameterize=reparameterize)
    result.fold = fr.report
    result.seconds["fold"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StaticBatchWarning)  # the report's build_info says so
            fp32 = get_target("onnx").lower(fr.module, inputs, {"path": staging / FP32_FILE, "protect": protect,
                                                                "dynamic_shapes": fr.dynamic_shapes})
    except OutputError:
        raise  # a file that cannot be written: nothing is published (exit 2), not a stage failure
    except BnfoldError as err:
        result.errors["onnx"] = str(err)
        return
    result.artifacts["fp32"] = FP32_FILE
    result.seconds["onnx"] = time.perf_counter() - t0
    result.int8 = int8_stage(fr.module, fr.module, inputs, calib, checks, staging, options=options,
                             dynamic_shapes=fr.dynamic_shapes)
    result.seconds.update({f"int8 {k}": v for k, v in result.int8.seconds.items()})
    if result.int8.path is None:
        return
    result.artifacts["int8"] = INT8_FILE
    t0 = time.perf_counter()
    result.latency_ms = measure_latency({ORT_FP32: fp32, ORT_INT8: OnnxRuntimeModel(staging / INT8_FILE)}, inputs)
    result.seconds["speed"] = time.perf_counter() - t0
    speedup = result.speedup
    if speedup is not None and speedup < 1.0:
        moved = result.int8.prepare.clamps_moved if result.int8.prepare is not None else 0
        why = (f"; {moved} per-channel clamps (moved ReLU6) run as float ops there: --keep-clamps keeps them fused"
               if moved else "")
        result.warnings.append(f"the int8 model runs {1 / speedup:.2f}x slower than fp32 in ONNX Runtime on this "
                               f"host at the example batch{why}")
