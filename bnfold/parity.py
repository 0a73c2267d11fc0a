"""Accuracy parity: does a candidate (folded / exported / compiled model) compute what the reference does?

Per output tensor we report max absolute and relative error, cosine similarity and, when a float64 copy
of the reference is available, the *float64-reference rule*::

    rmse(candidate, ref64) <= m · rmse(reference, ref64) + floor

with ``m = 2`` for fp32 and ``3`` for fp16/bf16, and ``floor = f · rms(ref64)`` (``f = 1e-6`` fp32,
``1e-3`` fp16/bf16). The tolerance thus scales with the model's own numerical noise: a fold that is exact
math only reorders rounding, and stays within that bound. Without a float64 reference the verdict falls back
to ``torch.testing.assert_close``'s default tolerances for the dtype.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["OutputParity", "ParityReport", "Tolerance", "compare", "flatten_outputs", "to_float64"]


@dataclass(frozen=True)
class Tolerance:
    """Parameters of the pass/fail rule (see module docstring)."""

    multiplier: float = 2.0
    floor: float = 1e-6
    rtol: float = 1.3e-6
    atol: float = 1e-5

    @staticmethod
    def for_dtype(dtype: torch.dtype) -> Tolerance:
        if dtype in (torch.float16, torch.bfloat16):
            rtol, atol = (1e-3, 1e-5) if dtype == torch.float16 else (1.6e-2, 1e-5)
            return Tolerance(multiplier=3.0, floor=1e-3, rtol=rtol, atol=atol)
        if dtype == torch.float64:
            return Tolerance(multiplier=2.0, floor=1e-12, rtol=1e-7, atol=1e-7)
        return Tolerance()


@dataclass
class OutputParity:
    index: int
    shape: list[int]
    dtype: str
    max_abs: float
    max_rel: float
    cosine: float
    nonfinite: int
    rmse_vs_fp64: float | None
    reference_rmse_vs_fp64: float | None
    bound: float | None
    passed: bool


@dataclass
class ParityReport:
    outputs: list[OutputParity] = field(default_factory=list)
    inputs: str = "user"
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    def summary(self) -> dict[str, Any]:
        """Worst case over outputs, in the flat form the fold report embeds."""
        if not self.outputs:
            return {"passed": False}
        out: dict[str, Any] = {
            "passed": self.passed,
            "max_abs": max(o.max_abs for o in self.outputs),
            "max_rel": max(o.max_rel for o in self.outputs),
            "cosine": min(o.cosine for o in self.outputs),
            "inputs": self.inputs,
        }
        with_ref = [o for o in self.outputs if o.rmse_vs_fp64 is not None]
        if with_ref:
            worst = max(with_ref, key=lambda o: (o.rmse_vs_fp64 or 0) / max(o.bound or 1e-30, 1e-30))
            out["rmse_vs_fp64"] = worst.rmse_vs_fp64
            out["reference_rmse_vs_fp64"] = worst.reference_rmse_vs_fp64
            out["bound"] = worst.bound
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "inputs": self.inputs, "notes": self.notes,
                "outputs": [asdict(o) for o in self.outputs]}


def flatten_outputs(value: Any) -> list[torch.Tensor]:
    """All tensors in a (nested) model output, in a stable order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in flatten_outputs(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flatten_outputs(v)]
    if hasattr(value, "__dataclass_fields__"):
        return [t for k in value.__dataclass_fields__ for t in flatten_outputs(getattr(value, k))]
    return []


def to_float64(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 deep copy of ``model`` (the reference every parity check measures against)."""
    return copy.deepcopy(model).to(torch.float64)


def _run(fn: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return flatten_outputs(fn(*inputs))


def _rmse(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean((x.double() - y.double()) ** 2)))


def _output_parity(i: int, ref: torch.Tensor, cand: torch.Tensor, ref64: torch.Tensor | None,
                   tol: Tolerance) -> OutputParity:
    r, c = ref.detach().double().cpu(), cand.detach().double().cpu()
    if r.shape != c.shape:
        raise ValueError(f"output {i}: reference shape {tuple(r.shape)} ≠ candidate shape {tuple(c.shape)}")
    diff = (r - c).abs()
    finite = torch.isfinite(diff)
    max_abs = float(diff[finite].max()) if bool(finite.any()) else math.inf
    denom = r.abs().clamp_min(torch.finfo(torch.float32).tiny)
    max_rel = float((diff / denom)[finite].max()) if bool(finite.any()) else math.inf
    cos = float(torch.nn.functional.cosine_similarity(r.flatten(), c.flatten(), dim=0, eps=1e-30))
    nonfinite = int((~torch.isfinite(c)).sum())
    rmse_c = rmse_r = bound = None
    if ref64 is not None:
        t = ref64.detach().double().cpu()
        rmse_c, rmse_r = _rmse(c, t), _rmse(r, t)
        bound = tol.multiplier * rmse_r + tol.floor * float(torch.sqrt(torch.mean(t**2)))
        passed = nonfinite == int((~torch.isfinite(r)).sum()) and rmse_c <= bound
    else:
        passed = bool(torch.isclose(c, r, rtol=tol.rtol, atol=tol.atol, equal_nan=True).all())
    return OutputParity(i, list(r.shape), str(ref.dtype).replace("torch.", ""), max_abs, max_rel, cos,
                        nonfinite, rmse_c, rmse_r, bound, passed)


def compare(
    reference: Callable[..., Any],
    candidate: Callable[..., Any],
    inputs: Sequence[torch.Tensor] | None,
    *,
    tolerance: Tolerance | None = None,
    reference64: Callable[..., Any] | None = None,
) -> ParityReport:
    """Run ``reference`` and ``candidate`` on ``inputs`` and judge parity (see module docstring).

    When ``reference`` is an ``nn.Module`` and ``reference64`` is not given, a float64 copy is made.
    """
    if inputs is None:
        raise ValueError("compare() needs inputs")
    inputs = list(inputs)
    ref_out = _run(reference, inputs)
    cand_out = _run(candidate, inputs)
    if len(ref_out) != len(cand_out):
        raise ValueError(f"reference returns {len(ref_out)} tensors, candidate {len(cand_out)}")
    if reference64 is None and isinstance(reference, torch.nn.Module):
        reference64 = to_float64(reference)
    ref64_out: list[torch.Tensor] | None = None
    if reference64 is not None:
        inputs64 = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
        ref64_out = _run(reference64, inputs64)
    report = ParityReport()
    for i, (r, c) in enumerate(zip(ref_out, cand_out)):
        tol = tolerance or Tolerance.for_dtype(r.dtype)
        report.outputs.append(_output_parity(i, r, c, None if ref64_out is None else ref64_out[i], tol))
    return report
