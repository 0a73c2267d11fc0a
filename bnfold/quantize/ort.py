"""ONNX Runtime's static quantization, fed with the user's calibration batches: a float ONNX file → a QDQ int8 file.

``onnxruntime.quantization.quantize_static`` with ``QuantFormat.QDQ``, int8 weights (symmetric; per output channel
unless ``per_channel=False``) and uint8 activations (asymmetric, ranges by min/max over every calibration batch — ORT's
``CalibrationMethod.MinMax``), biases int32. ORT's preprocessing (``quant_pre_process``) is not run: bnfold's export
is already simplified by onnxsim, and the weights must reach the quantizer exactly as bnfold prepared them (bias
correction is computed for *these* weights). :func:`dequantized_weights` reads back the weights an int8 file computes
with, so the emulation bias correction relies on (:func:`bnfold.ir.quant_math.fake_quantize_weight`) is checked
against what ORT actually wrote.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnfold.errors import BnfoldError

__all__ = ["BatchReader", "dequantized_weights", "float_initializers", "quantize_onnx"]

log = logging.getLogger(__name__)


def _require() -> Any:
    try:
        import onnxruntime.quantization as q
    except ImportError as exc:
        raise BnfoldError("int8 quantization needs onnxruntime (with its quantization module), which is not installed",
                          hint="pip install 'bnfold[onnx]'") from exc
    return q


class BatchReader:
    """ORT's ``CalibrationDataReader`` protocol over bnfold batches (tuples of tensors, one per model input)."""

    def __init__(self, input_names: Sequence[str], batches: Sequence[Sequence[torch.Tensor]]) -> None:
        self.input_names = list(input_names)
        self.batches = list(batches)
        self._it: Iterator[dict[str, np.ndarray]] = iter(())
        self.rewind()

    def _feeds(self) -> Iterator[dict[str, np.ndarray]]:
        for batch in self.batches:
            yield {name: t.detach().cpu().contiguous().numpy() for name, t in zip(self.input_names, batch,
                                                                                   strict=True)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._feeds()


class _Quiet(logging.Filter):
    """ORT's quantizer logs a pre-processing advice on the root logger at every call; bnfold's docs say why not."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage() and "pre-process" not in record.getMessage()


@contextlib.contextmanager
def _quiet_root() -> Iterator[None]:
    root = logging.getLogger()
    f = _Quiet()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def quantize_onnx(float_path: str | Path, out_path: str | Path, batches: Sequence[Sequence[torch.Tensor]], *,
                  per_channel: bool = True) -> dict[str, Any]:
    """Quantize ``float_path`` into ``out_path`` (QDQ, int8 weights, uint8 activations) calibrated on ``batches``;
    returns how (for ``build_info``)."""
    q = _require()
    import onnx

    model = onnx.load(str(float_path))
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if batches and len(batches[0]) != len(names):
        raise BnfoldError(f"the calibration batches hold {len(batches[0])} tensors, the model takes {len(names)} "
                          f"inputs ({', '.join(names)})")
    options = {"WeightSymmetric": True, "ActivationSymmetric": False}
    try:
        with _quiet_root():
            q.quantize_static(str(float_path), str(out_path), BatchReader(names, batches),
                              quant_format=q.QuantFormat.QDQ, per_channel=per_channel,
                              activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                              calibrate_method=q.CalibrationMethod.MinMax, extra_options=options)
    except BnfoldError:
        raise
    except OSError as exc:  # a full disk or a folder it may not write: an output error (exit 2), not ORT's failure
        from bnfold.io.outputs import output_error

        raise output_error(Path(out_path), exc) from exc
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise BnfoldError(f"ONNX Runtime's static quantization failed: {type(exc).__name__}: {first[:300]}",
                          hint="run with -vv for the traceback") from exc
    import onnxruntime

    return {"quantizer": "onnxruntime.quantization.quantize_static", "onnxruntime": onnxruntime.__version__,
            "format": "QDQ", "weights": f"int8 symmetric, {'per channel' if per_channel else 'per tensor'}",
            "activations": "uint8 asymmetric, MinMax over the calibration batches", "bias": "int32",
            "calibration_batches": len(batches),
            "calibration_samples": int(sum(int(b[0].shape[0]) for b in batches if b and b[0].dim()))}


def float_initializers(path: str | Path) -> dict[str, np.ndarray]:
    """The float initializers of an ONNX file, by name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    out = {}
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype in (np.float32, np.float64, np.float16):
            out[init.name] = a
    return out


def dequantized_weights(path: str | Path) -> dict[str, tuple[np.ndarray, int]]:
    """``{float weight name: (q · scale, channel axis)}`` for every int8 weight of a QDQ file (ORT names the int8
    initializer ``<name>_quantized``), computed as ``DequantizeLinear`` does (float32); the axis is 0 for one scale."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        q = inits[node.input[0]]
        if q.dtype != np.int8:
            continue
        scale = inits.get(node.input[1])
        zero = inits.get(node.input[2]) if len(node.input) > 2 else None
        if scale is None:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        if scale.size > 1:
            shape[axis] = scale.size
        zp = np.zeros_like(scale, dtype=np.int32) if zero is None else zero.astype(np.int32)
        w = (q.astype(np.int32) - zp.reshape(shape if zp.size > 1 else ())).astype(np.float32) \
            * scale.reshape(shape if scale.size > 1 else ()).astype(np.float32)
        out[node.input[0].removesuffix("_quantized")] = (w, axis % q.ndim if scale.size > 1 else 0)
    return out
