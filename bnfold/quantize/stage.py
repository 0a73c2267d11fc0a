"""The int8 stage, shared by ``bnfold quantize`` and ``bnfold optimize --int8``: a folded graph → a verified QDQ file.

::

    folded ─► prepare (equalize ✓ float64 parity, absorb, correct) ─► prepared float ONNX (temporary)
           ─► ONNX Runtime quantize_static on the calibration batches ─► model_int8.onnx
           ─► check: the int8 weights ORT wrote are those bias correction assumed
           ─► int8 parity vs the float model (SQNR, top-1 agreement: bnfold.parity.int8) on the validation batches

Files go into ``folder`` (a staging folder the caller publishes atomically); the prepared float ONNX is a temporary.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx

from bnfold.errors import BnfoldError, InternalError, OutputError
from bnfold.ir.quant_math import fake_quantize_weight
from bnfold.parity.inputs import Batch
from bnfold.parity.int8 import Int8Rule, Int8Verdict, compare_int8
from bnfold.quantize.ort import dequantized_weights, float_initializers, quantize_onnx
from bnfold.quantize.prepare import BiasMode, PrepareReport, prepare
from bnfold.report import format_table, json_safe

__all__ = ["INT8_FILE", "Int8Options", "Int8Result", "check_weights", "fit_batches", "int8_stage"]

log = logging.getLogger(__name__)

INT8_FILE = "model_int8.onnx"


@dataclass(frozen=True)
class Int8Options:
    """How to quantize: weights per channel (default) or per tensor; which preparation steps; the parity rule;
    whether equalization and absorption may turn a ReLU6 into a per-channel clamp (``move_clamps``)."""

    per_channel: bool = True
    equalize: bool = True
    absorb: bool = True
    bias_correction: BiasMode = "auto"
    rule: Int8Rule = field(default_factory=Int8Rule)
    move_clamps: bool = True  # False: no per-channel clamps (ReLU6 pairs left alone; faster in ONNX Runtime)


@dataclass
class Int8Result:
    """What the int8 stage produced: the preparation report, how ORT quantized, whether the int8 weights are those
    bias correction assumed, and the int8 verdict against the float model."""

    options: Int8Options
    prepare: PrepareReport | None = None
    build_info: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)
    verdict: Int8Verdict | None = None
    path: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.errors and self.verdict is not None and self.verdict.passed

    def to_dict(self) -> dict[str, Any]:
        return json_safe({
            "passed": self.passed,
            "path": self.path,
            "per_channel": self.options.per_channel,
            "equalize": self.options.equalize,
            "absorb": self.options.absorb,
            "bias_correction": self.options.bias_correction,
            "move_clamps": self.options.move_clamps,
            "verdict": None if self.verdict is None else self.verdict.to_dict(),
            "prepare": None if self.prepare is None else self.prepare.to_dict(),
            "build_info": self.build_info,
            "weights": self.weights,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "errors": self.errors,
        })

    def render(self, *, explain: bool = False) -> str:
        lines = []
        if self.prepare is not None:
            lines.append(self.prepare.render(explain=explain))
        if self.weights:
            w = self.weights
            lines.append(f"int8 weights as bias correction assumed: {w['matching']}/{w['weights']} tensors "
                         f"(max |difference| {w['max_abs_diff']:.3g})")
        if self.verdict is not None:
            lines.append(str(self.verdict))
        lines += [f"ERROR in {k}: {v}" for k, v in self.errors.items()]
        return "\n".join(lines)


def fit_batches(batches: Sequence[Batch], runtime: Any, inputs: tuple[torch.Tensor, ...]) -> list[Batch]:
    """Batches an ONNX model with a fixed batch can run: re-chunked to the example batch, a smaller remainder dropped
    (a model with a dynamic batch takes them as they are)."""
    from bnfold.io.data import split_batches

    if runtime.build_info.get("dynamic_batch", True) or not inputs or inputs[0].dim() == 0:
        return list(batches)
    size = int(inputs[0].shape[0])
    full = [c for c in split_batches(list(batches), size) if int(c[0].shape[0]) == size]
    if not full:
        raise BnfoldError(f"the data holds fewer samples than the model's fixed batch ({size})",
                          hint="give more samples, or export the model with a dynamic batch")
    return full


def check_weights(float_onnx: str | Path, int8_onnx: str | Path, *, per_channel: bool) -> dict[str, Any]:
    """Compare the int8 weights ORT wrote (``q · scale``) with :func:`~bnfold.ir.quant_math.fake_quantize_weight` of the
    float weights it quantized: how many tensors match bit for bit, and the largest difference."""
    floats = float_initializers(float_onnx)
    written = dequantized_weights(int8_onnx)
    matching, worst, names = 0, 0.0, []
    for name, (dq, axis) in written.items():
        w = floats.get(name)
        if w is None or w.shape != dq.shape:
            continue
        moved = torch.from_numpy(np.array(np.moveaxis(w, axis, 0)))
        mine = fake_quantize_weight(moved, per_channel=per_channel).numpy()
        mine = np.moveaxis(mine, 0, axis)
        diff = float(np.abs(mine - dq).max()) if dq.size else 0.0
        worst = max(worst, diff)
        matching += diff == 0.0
        names.append(name)
    return {"weights": len(names), "matching": matching, "max_abs_diff": worst}


def _stamp(path: Path, info: dict[str, Any]) -> None:
    """Record how the int8 file was built in its metadata (``bnfold.build_info``), as bnfold's other ONNX files."""
    import onnx

    from bnfold.targets.onnx import METADATA_KEY

    model = onnx.load(str(path))
    for p in list(model.metadata_props):
        if p.key == METADATA_KEY:
            model.metadata_props.remove(p)
    meta = model.metadata_props.add()
    meta.key, meta.value = METADATA_KEY, json.dumps(info)
    onnx.save(model, str(path))


def int8_stage(folded: torch.fx.GraphModule, reference: Callable[..., Any], example_inputs: tuple[torch.Tensor, ...],
               calibration: Sequence[Batch], validation: Sequence[Batch], folder: Path, *,
               options: Int8Options | None = None, dynamic_shapes: object = None) -> Int8Result:
    """Prepare ``folded``, quantize it with ONNX Runtime on ``calibration`` into ``folder/model_int8.onnx`` and judge
    it against ``reference`` (the float model) on ``validation`` (module docstring). Errors of a step are recorded
    in :attr:`Int8Result.errors` (a :class:`~bnfold.errors.BnfoldError`), not raised."""
    from bnfold.targets import get_target
    from bnfold.targets.onnx import OnnxRuntimeModel, StaticBatchWarning

    options = options or Int8Options()
    result = Int8Result(options)
    if not calibration:
        result.errors["int8"] = "int8 quantization needs calibration data (activation ranges come from it)"
        return result
    t0 = time.perf_counter()
    try:
        prepared = prepare(folded, calibration, per_channel=options.per_channel, equalize=options.equalize,
                           absorb=options.absorb, bias_correction=options.bias_correction,
                           check_batches=validation[:4], move_clamps=options.move_clamps)
    except (InternalError, OutputError):
        raise  # a bug (equalization broke parity), a disk that is full: not a stage failure to carry on from
    except BnfoldError as err:
        result.errors["prepare"] = str(err)
        return result
    result.prepare = prepared.report
    result.seconds["prepare"] = time.perf_counter() - t0
    out = folder / INT8_FILE
    with tempfile.TemporaryDirectory(prefix="bnfold-int8-") as tmp:
        float_path = Path(tmp) / "prepared_fp32.onnx"
        try:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", StaticBatchWarning)  # said in the report (build_info)
                exported = get_target("onnx").lower(prepared.module, example_inputs, {"path": float_path,
                                                                                      "dynamic_shapes": dynamic_shapes})
            result.seconds["export"] = time.perf_counter() - t0
            calibration, validation = fit_batches(calibration, exported, example_inputs), \
                fit_batches(validation, exported, example_inputs)
            t0 = time.perf_counter()
            info = quantize_onnx(float_path, out, calibration, per_channel=options.per_channel)
            result.seconds["quantize"] = time.perf_counter() - t0
            result.weights = check_weights(float_path, out, per_channel=options.per_channel)
        except OutputError:
            raise
        except BnfoldError as err:
            result.errors["quantize"] = str(err)
            return result
    info.update({"target": "onnx-int8", "preparation": {"equalize": options.equalize, "absorb": options.absorb,
                                                        "bias_correction": prepared.report.bias_correction},
                 "dynamic_batch": bool(exported.build_info.get("dynamic_batch", False))})
    if exported.build_info.get("static_reason"):
        info["static_reason"] = exported.build_info["static_reason"]
    _stamp(out, info)
    result.build_info, result.path = info, INT8_FILE
    if result.weights["matching"] != result.weights["weights"]:
        log.warning("ORT wrote int8 weights other than bnfold's emulation for %d tensors (max diff %.3g): bias "
                    "correction assumed other weights", result.weights["weights"] - result.weights["matching"],
                    result.weights["max_abs_diff"])
    try:
        t0 = time.perf_counter()
        result.verdict = compare_int8(reference, OnnxRuntimeModel(out), validation, options.rule)
        result.seconds["parity"] = time.perf_counter() - t0
    except BnfoldError as err:
        result.errors["parity"] = str(err)
    return result


def summary_table(results: dict[str, Int8Result]) -> str:
    """One row per int8 variant: SQNR, top-1 agreement, verdict (for reports comparing variants)."""
    rows = []
    for name, r in results.items():
        v = r.verdict
        rows.append([name, "-" if v is None else f"{v.sqnr_db:.1f}",
                     "-" if v is None or v.top1_agreement is None else f"{100 * v.top1_agreement:.1f}%",
                     "PASS" if r.passed else "FAIL"])
    return format_table(["int8", "SQNR dB", "top-1 agreement", "verdict"], rows)
