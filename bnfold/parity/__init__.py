"""Accuracy parity: does a candidate (folded / exported / compiled model) compute what the reference does?

``compare(reference, candidate, inputs)`` runs both on every input batch and reports, per output tensor
(all batches pooled, sums kept in float64):

* ``max_abs = max|c − r|``, ``max_rel = max(|c − r| / |r|)``, ``cosine = Σ r·c / (‖r‖·‖c‖)``,
  ``sqnr_db = 10·log10(Σ r² / Σ (c − r)²)`` (``inf`` when the outputs are identical);
* NaN and ±Inf counts of both outputs, and the positions where they disagree on being non-finite;
* for classifier-shaped outputs (2-D ``(N, classes)``, ``classes ≥ 2``): top-1 agreement (the fraction of
  samples whose arg-max class is the same) and, with more than 5 classes, top-5 agreement (the fraction whose
  reference top-1 class is among the candidate's top 5 — top-5 accuracy with the reference as the labels);
* the elementwise view of ``torch.testing.assert_close``: how many elements violate
  ``|c − r| ≤ atol + rtol·|r|`` with its default ``rtol``/``atol`` for the dtype (:meth:`Tolerance.for_dtype`).

The verdict is the *float64-reference rule* whenever a float64 copy of the reference can be run
(``t`` = its output)::

    rmse(c, t) ≤ m · rmse(r, t) + floor,    floor = (k · u + u_s) · √D · rms(t)

``m = 2`` for fp32/fp64 and ``3`` for fp16/bf16. The floor absorbs what the multiplier cannot: two *kernels*
computing the same math round differently, and which one a host runs depends on its CPU (AVX2 vs AVX-512,
oneDNN on or off, blocked or channels-last layouts, thread count). ``u`` is the unit roundoff of the precision the
kernels *accumulate* in (2⁻²⁴ for fp32, fp16 and bf16 — every CPU kernel accumulates half precision in fp32 —
and 2⁻⁵³ for fp64); ``D`` (:func:`rounding_depth`) counts the model's weight tensors of rank ≥ 2, i.e. its
conv/linear/embedding layers; ``k = 16``; ``u_s`` is the unit roundoff of the dtype itself (the storage: a fold
rounds each folded weight once into it, one rounding the reference does not have — ≤ ``u_s`` relative per layer;
it matters for fp16/bf16, where ``u_s`` is 2⁻¹¹/2⁻⁸, and is one more ``u`` for fp32).
When that analytic bound fails, the storage term is *measured*: ``S`` (:func:`storage_noise64`; for an ONNX graph
:func:`bnfold.parity.ort.storage_noise_onnx`) is the largest rmse against ``t`` among :data:`STORAGE_DRAWS` seeded
float64 copies whose layer weights and computed outputs are each rounded once (a uniform ``[−u_s, u_s]`` relative
error), and the term becomes ``max(u_s · √D · rms(t), m · S)``. The analytic floor and ``m · rmse(r, t)`` assume a
well-conditioned model, in which the reference's error is a fair sample of its rounding noise; near a singularity
(a norm over two features whose inputs nearly cancel: the fuzzer's seeds 108853, 201414, 212001) one sample decides
the rmse and the reference's error there is a single, possibly lucky, draw. ``S`` is the size of that noise on
*this* model and *these* inputs; ``m · S`` because the fold's error is a single draw of it too — and the largest
draw, not their pooled rms, because when one sample decides, a single draw's rmse is one Gaussian component in
absolute value: it exceeds 2 × the pooled rms of four draws 11.6 % of the time, 2 × their largest 3.9 % (3 ×: 4.0 %
and 1.1 %), and real defects stay caught (docs/parity.md; the ONNX fuzzer's seed 344). Passing verdicts never pay
for ``S``.
Derivation of ``k``: each accumulating layer's kernel choice changes its output
by at most a few ``u`` relative (measured worst case: a 3x3 conv with a large folded bias on an AVX2 host, oneDNN's
direct kernel accumulating onto the bias, 4.5 ``u`` vs 2 ``u`` without the bias); such per-layer differences are
independent, so they add in quadrature (``√D``), and propagation gain is the model's own — which ``m · rmse(r, t)``
already measures. ``k = 16`` leaves a 3.5x margin over the worst kernel measured. A real defect is orders of
magnitude above it: a 0.1 % weight change, a swapped channel or a BatchNorm in training mode moves the output by
≥ 1e-4 relative, while ``k · u · √D`` is 1e-6 for one layer and 1e-5 for a hundred. ±Inf must appear at the
same positions in ``c`` and ``r``; any NaN, and an output with no elements, fails (docs/parity.md).
Without a float64 reference (an ONNX file as the reference, say) the
verdict is the elementwise ``assert_close`` view.

Beyond the outputs: a *batch-independence* check (the candidate's output for a sample must not change when the
rest of the batch changes — it does when a BatchNorm is left in training mode), and, when a GraphModule
candidate fails, *localization* (:mod:`bnfold.parity.localize`): the first graph node whose output diverges.
Inputs are the user's batches; only when none are given are random ones drawn, and the report says so.
"""

from __future__ import annotations

from bnfold.parity.core import ParityReport, compare, judge, run_reference64
from bnfold.parity.independence import BatchIndependence, check_batch_independence
from bnfold.parity.inputs import Batch, as_batches, flatten_outputs, random_inputs, run_batches, to_float64
from bnfold.parity.metrics import OutputParity, OutputStats
from bnfold.parity.noise import STORAGE_DRAWS, storage_noise64
from bnfold.parity.tolerance import Tolerance, accumulation_roundoff, rounding_depth, storage_roundoff

__all__ = [
    "STORAGE_DRAWS",
    "Batch",
    "BatchIndependence",
    "OutputParity",
    "OutputStats",
    "ParityReport",
    "Tolerance",
    "accumulation_roundoff",
    "as_batches",
    "check_batch_independence",
    "compare",
    "flatten_outputs",
    "judge",
    "random_inputs",
    "rounding_depth",
    "run_batches",
    "run_reference64",
    "storage_noise64",
    "storage_roundoff",
    "to_float64",
]
