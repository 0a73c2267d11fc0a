"""Parity for an int8 model: its own rule, not the float64-reference rule (docs/parity.md, "int8").

An int8 model is *meant* to differ from the float one: every weight and activation is rounded to one of 256 levels.
The float rule (``rmse ≤ 2 × the reference's own rounding error``) would fail every int8 model; an elementwise
tolerance would have to be set per model. What a deployment needs to know is whether the int8 model still computes
the same *function*, measured on the user's data against the float model:

* **SQNR** (dB) of every output, ``10·log10(Σ r² / Σ (c − r)²)`` pooled over all samples: ``sqnr ≥ min_sqnr_db``;
* **top-1 agreement** of every classifier-shaped output (2-D ``(N, classes)``): the fraction of samples whose arg-max
  is unchanged, ``≥ min_top1``.

Defaults (argued in docs/parity.md, "int8"): ``min_sqnr_db = 20`` — the output noise budget of a network of about
fifty conv/linear layers whose weights and activations are each rounded to 8 bits at a realistic crest factor
(≈ 40 dB per tensor, the noise of a hundred such tensors adding in power: 40 − 10·log10(100)); a defect (a range
spent on one outlier channel, what equalization fixes; a clipped range; a wrong scale) puts one tensor far below 40 dB
and the output below 20. ``min_top1 = 0.95`` — noise-like error at 20 dB changes under 1 % of a trained classifier's
decisions (DigitsNet: 0.3 %, worst of 20 draws 1.1 %); one decision in twenty changed is a visible accuracy loss.
NaN or Inf in the int8 output, or no samples, always fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from bnfold.parity.core import judge
from bnfold.parity.inputs import Batch, run_batches
from bnfold.report import json_safe

__all__ = ["DEFAULT_MIN_SQNR_DB", "DEFAULT_MIN_TOP1", "Int8Rule", "Int8Verdict", "compare_int8", "judge_int8"]

DEFAULT_MIN_SQNR_DB = 20.0
DEFAULT_MIN_TOP1 = 0.95


@dataclass(frozen=True)
class Int8Rule:
    """The thresholds an int8 model must meet against its float model on the user's data."""

    min_sqnr_db: float = DEFAULT_MIN_SQNR_DB
    min_top1: float = DEFAULT_MIN_TOP1


@dataclass
class Int8Verdict:
    """Worst output's SQNR and top-1 agreement, the rule, and why it failed (empty when it passed)."""

    passed: bool
    sqnr_db: float
    top1_agreement: float | None
    samples: int
    rule: Int8Rule
    reasons: list[str] = field(default_factory=list)
    cosine: float = math.nan
    max_abs: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return json_safe({"passed": self.passed, "sqnr_db": self.sqnr_db, "top1_agreement": self.top1_agreement,
                          "cosine": self.cosine, "max_abs": self.max_abs, "samples": self.samples,
                          "rule": asdict(self.rule), "reasons": list(self.reasons)})

    def __str__(self) -> str:
        top1 = "-" if self.top1_agreement is None else f"{100 * self.top1_agreement:.1f}%"
        line = (f"int8 parity {'PASS' if self.passed else 'FAIL'}: SQNR {self.sqnr_db:.1f} dB "
                f"(≥ {self.rule.min_sqnr_db:g}), top-1 agreement {top1} (≥ {100 * self.rule.min_top1:g}%), "
                f"{self.samples} samples")
        return line + "".join(f"\n  {r}" for r in self.reasons)


def judge_int8(reference_outputs: Sequence[Sequence[torch.Tensor]], candidate_outputs: Sequence[Sequence[torch.Tensor]],
               rule: Int8Rule | None = None) -> Int8Verdict:
    """The int8 verdict for precomputed outputs (one list of tensors per batch)."""
    rule = rule or Int8Rule()
    report, _ = judge(reference_outputs, candidate_outputs, None)
    reasons = list(report.errors)
    if not report.outputs:
        reasons.append("no outputs to compare")
    sqnr, top1, cosine, max_abs = math.inf, None, 1.0, 0.0
    for o in report.outputs:
        sqnr, cosine, max_abs = min(sqnr, o.sqnr_db), min(cosine, o.cosine), max(max_abs, o.max_abs)
        if o.elements == 0:
            reasons.append(f"output {o.index}: no elements (zero samples): parity cannot be judged")
        if o.nan or o.inf or o.reference_nan or o.nonfinite_mismatch:
            reasons.append(f"output {o.index}: NaN/Inf (int8 {o.nan + o.inf}, float {o.reference_nan})")
        if not o.sqnr_db >= rule.min_sqnr_db:
            reasons.append(f"output {o.index}: SQNR {o.sqnr_db:.1f} dB < {rule.min_sqnr_db:g} dB")
        if o.top1_agreement is not None:
            top1 = o.top1_agreement if top1 is None else min(top1, o.top1_agreement)
            if not o.top1_agreement >= rule.min_top1:
                reasons.append(f"output {o.index}: top-1 agreement {100 * o.top1_agreement:.1f}% < "
                               f"{100 * rule.min_top1:g}%")
    if not report.outputs:
        sqnr = -math.inf
    return Int8Verdict(not reasons, sqnr, top1, report.samples, rule, reasons, cosine, max_abs)


def compare_int8(reference: Callable[..., Any], candidate: Callable[..., Any], batches: Sequence[Batch],
                 rule: Int8Rule | None = None) -> Int8Verdict:
    """Run the float ``reference`` and the int8 ``candidate`` on ``batches`` and judge with :class:`Int8Rule`."""
    return judge_int8(run_batches(reference, batches), run_batches(candidate, batches), rule)
