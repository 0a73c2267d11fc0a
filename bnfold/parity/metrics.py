"""Per-output measurements of a candidate against a reference (and a float64 reference): errors, cosine, SQNR,
non-finite agreement, top-k agreement, and the verdict of the float64-reference rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx

from bnfold.parity.tolerance import Tolerance

__all__ = ['OutputParity', 'OutputStats']


@dataclass
class OutputStats:
    """Running float64 sums for one output tensor; :meth:`add` one batch at a time, :meth:`merge` to pool."""

    shape: list[int] | None = None
    dtype: str = ""
    candidate_dtype: str = ""
    elements: int = 0
    compared: int = 0
    sum_sq_err: float = 0.0
    sum_sq_ref: float = 0.0
    sum_sq_cand: float = 0.0
    dot: float = 0.0
    max_abs: float = 0.0
    max_rel: float = 0.0
    nan: int = 0
    inf: int = 0
    reference_nan: int = 0
    reference_inf: int = 0
    nonfinite_mismatch: int = 0
    not_close: int = 0
    n64: int = 0
    sum_sq_c64: float = 0.0
    sum_sq_r64: float = 0.0
    sum_sq_t64: float = 0.0
    n_noise64: int = 0
    sum_sq_noise64: list[float] = field(default_factory=list)  # per storage-noise draw
    samples: int = 0
    top1: int = 0
    top5: int = 0
    classes: int | None = None

    def add(self, ref: torch.Tensor, cand: torch.Tensor, ref64: torch.Tensor | None, tol: Tolerance,
            noise64: Sequence[torch.Tensor] = ()) -> None:
        """Add one batch's output; ``noise64``: this output of each storage-noise draw
        (:func:`bnfold.parity.noise.storage_noise64`)."""
        if tuple(ref.shape) != tuple(cand.shape):
            raise ValueError(f"reference shape {tuple(ref.shape)} ≠ candidate shape {tuple(cand.shape)}")
        if self.shape is None:
            self.shape, self.dtype = list(ref.shape), _dtype_name(ref.dtype)
            self.candidate_dtype = _dtype_name(cand.dtype)
        r, c = ref.detach().double().cpu(), cand.detach().double().cpu()
        self.elements += r.numel()
        rf, cf = torch.isfinite(r), torch.isfinite(c)
        self.nan += int(torch.isnan(c).sum())
        self.inf += int(torch.isinf(c).sum())
        self.reference_nan += int(torch.isnan(r).sum())
        self.reference_inf += int(torch.isinf(r).sum())
        same_nonfinite = (torch.isnan(r) & torch.isnan(c)) | (torch.isinf(r) & (r == c))
        self.nonfinite_mismatch += int((~(rf & cf) & ~same_nonfinite).sum())
        both = rf & cf
        rb, cb = r[both], c[both]
        self.compared += rb.numel()
        if rb.numel():
            d = cb - rb
            self.sum_sq_err += float((d * d).sum())
            self.sum_sq_ref += float((rb * rb).sum())
            self.sum_sq_cand += float((cb * cb).sum())
            self.dot += float((rb * cb).sum())
            self.max_abs = max(self.max_abs, float(d.abs().max()))
            rel = d.abs() / rb.abs().clamp_min(torch.finfo(torch.float32).tiny)
            self.max_rel = max(self.max_rel, float(rel.max()))
        close = torch.isclose(c, r, rtol=tol.rtol, atol=tol.atol, equal_nan=True)
        self.not_close += int((~close).sum())
        if ref64 is not None:
            t = ref64.detach().double().cpu()
            if tuple(t.shape) == tuple(r.shape):
                m = both & torch.isfinite(t)
                tm = t[m]
                self.n64 += tm.numel()
                self.sum_sq_c64 += float(((c[m] - tm) ** 2).sum())
                self.sum_sq_r64 += float(((r[m] - tm) ** 2).sum())
                self.sum_sq_t64 += float((tm * tm).sum())
                draws = [p.detach().double().cpu() for p in noise64 if tuple(p.shape) == tuple(t.shape)]
                if draws:
                    self.n_noise64 += tm.numel()
                    sums = [float(((p[m] - tm) ** 2).sum()) for p in draws]
                    self.sum_sq_noise64 = _add_lists(self.sum_sq_noise64, sums)
        if r.dim() == 2 and r.shape[1] >= 2 and r.shape[0] > 0:
            self.classes = int(r.shape[1])
            self.samples += int(r.shape[0])
            ref_top1 = r.nan_to_num(nan=-math.inf).argmax(1)
            cand_nn = c.nan_to_num(nan=-math.inf)
            self.top1 += int((cand_nn.argmax(1) == ref_top1).sum())
            if self.classes > 5:
                top5 = cand_nn.topk(5, dim=1).indices
                self.top5 += int((top5 == ref_top1[:, None]).any(1).sum())

    def merge(self, other: OutputStats) -> None:
        if self.shape is None:
            self.shape, self.dtype, self.candidate_dtype = other.shape, other.dtype, other.candidate_dtype
        for name in ("elements", "compared", "sum_sq_err", "sum_sq_ref", "sum_sq_cand", "dot", "nan", "inf",
                     "reference_nan", "reference_inf", "nonfinite_mismatch", "not_close", "n64", "sum_sq_c64",
                     "sum_sq_r64", "sum_sq_t64", "n_noise64", "samples", "top1", "top5"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.sum_sq_noise64 = _add_lists(self.sum_sq_noise64, other.sum_sq_noise64)
        self.max_abs, self.max_rel = max(self.max_abs, other.max_abs), max(self.max_rel, other.max_rel)
        self.classes = self.classes or other.classes

    def verdict(self, index: int, tol: Tolerance) -> OutputParity:
        """Metrics and the pass/fail rule over everything added so far."""
        n = max(self.compared, 1)
        rmse = math.sqrt(self.sum_sq_err / n)
        denom = math.sqrt(self.sum_sq_ref * self.sum_sq_cand)
        cosine = self.dot / denom if denom > 0 else (1.0 if self.sum_sq_err == 0 else 0.0)
        if self.sum_sq_err == 0:
            sqnr = math.inf
        elif self.sum_sq_ref == 0:
            sqnr = -math.inf
        else:
            sqnr = 10.0 * math.log10(self.sum_sq_ref / self.sum_sq_err)
        rmse_c = rmse_r = bound = None
        reasons = []
        if self.elements == 0:
            reasons.append("no elements to compare (zero samples): parity cannot be judged")
        if self.nan or self.reference_nan:  # NaN never passes, even where both sides agree on it
            reasons.append(f"outputs hold NaN (reference {self.reference_nan}, candidate {self.nan} elements): "
                           "parity cannot be judged")
        if self.nonfinite_mismatch:
            reasons.append(f"{self.nonfinite_mismatch} elements are NaN/Inf in one output but not the other")
        if self.n64:
            rmse_c = math.sqrt(self.sum_sq_c64 / self.n64)
            rmse_r = math.sqrt(self.sum_sq_r64 / self.n64)
            # S: the largest rmse of the draws (each draw is one storage rounding, as the fold's error is one)
            noise = math.sqrt(max(self.sum_sq_noise64) / self.n_noise64) if self.n_noise64 else None
            bound = tol.bound(rmse_r, math.sqrt(self.sum_sq_t64 / self.n64), noise)
            rule = "fp64"
            if not rmse_c <= bound:
                with_noise = "" if noise is None else f" with storage noise {noise:.3g}"
                reasons.append(f"rmse vs float64 {rmse_c:.3g} > bound {bound:.3g} "
                               f"(= {tol.multiplier:g} × reference's {rmse_r:.3g} + floor{with_noise})")
        else:
            rule = "elementwise"
            if self.not_close:
                reasons.append(f"{self.not_close} of {self.elements} elements outside rtol={tol.rtol:g}, "
                               f"atol={tol.atol:g}")
        samples = self.samples if self.classes else 0
        return OutputParity(
            index=index, shape=self.shape or [], dtype=self.dtype, candidate_dtype=self.candidate_dtype,
            elements=self.elements, max_abs=self.max_abs, max_rel=self.max_rel, cosine=cosine, sqnr_db=sqnr,
            rmse=rmse, nan=self.nan, inf=self.inf, reference_nan=self.reference_nan,
            reference_inf=self.reference_inf, nonfinite=self.nan + self.inf,
            nonfinite_mismatch=self.nonfinite_mismatch, rmse_vs_fp64=rmse_c, reference_rmse_vs_fp64=rmse_r,
            bound=bound, rule=rule, rtol=tol.rtol, atol=tol.atol, not_close=self.not_close,
            allclose=self.not_close == 0,
            top1_agreement=self.top1 / samples if samples else None,
            top5_agreement=self.top5 / samples if samples and (self.classes or 0) > 5 else None,
            passed=not reasons, reason="; ".join(reasons),
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class OutputParity:
    """Parity of one output tensor over all batches; field meanings in ``docs/parity.md``."""

    index: int
    shape: list[int]
    dtype: str
    candidate_dtype: str
    elements: int
    max_abs: float
    max_rel: float
    cosine: float
    sqnr_db: float
    rmse: float
    nan: int
    inf: int
    reference_nan: int
    reference_inf: int
    nonfinite: int
    nonfinite_mismatch: int
    rmse_vs_fp64: float | None
    reference_rmse_vs_fp64: float | None
    bound: float | None
    rule: str
    rtol: float
    atol: float
    not_close: int
    allclose: bool
    top1_agreement: float | None
    top5_agreement: float | None
    passed: bool
    reason: str = ""

    @property
    def ratio(self) -> float:
        """How close to the bound: ``rmse_vs_fp64 / bound`` (≤ 1 passes), or ``inf`` without a bound."""
        if self.rmse_vs_fp64 is None or self.bound is None:
            return 0.0 if self.passed else math.inf
        return self.rmse_vs_fp64 / self.bound if self.bound > 0 else (0.0 if self.rmse_vs_fp64 == 0 else math.inf)


def _add_lists(a: list[float], b: list[float]) -> list[float]:
    """Elementwise sum of two per-draw accumulators (the shorter one padded with zeros)."""
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0.0) + (b[i] if i < len(b) else 0.0) for i in range(n)]
