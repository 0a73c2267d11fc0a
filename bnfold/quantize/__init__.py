"""Quantization-ready folding: cross-layer equalization, bias absorption and correction, a verified int8 artifact.

* :func:`bnfold.quantize.prepare.prepare` — a folded graph prepared for int8 by the rules of
  :data:`bnfold.passes.QUANTIZE_PREP` (``equalize``, ``absorb_bias``, ``correct_bias``), equalization checked exact
  by the float64 parity rule;
* :func:`bnfold.quantize.stage.int8_stage` — prepared graph → ONNX → ONNX Runtime static quantization (QDQ) on the
  user's calibration data, judged by the int8 parity rule (:mod:`bnfold.parity.int8`); used by ``bnfold optimize
  --int8`` too;
* :func:`bnfold.quantize.core.quantize` (``bnfold.quantize``, ``bnfold quantize``) — fold, fp32 and int8 ONNX files,
  latency side by side, in one output folder.

docs/quantization.md describes the method and the measurements.
"""

from __future__ import annotations

from bnfold.quantize.core import FP32_FILE, QuantizeResult, quantize
from bnfold.quantize.prepare import PrepareReport, PrepareResult, prepare
from bnfold.quantize.stage import INT8_FILE, Int8Options, Int8Result, int8_stage

__all__ = ["FP32_FILE", "INT8_FILE", "Int8Options", "Int8Result", "PrepareReport", "PrepareResult", "QuantizeResult",
           "int8_stage", "prepare", "quantize"]
