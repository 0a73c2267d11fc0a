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
For an fp16/bf16 reference the storage term is also *measured*: ``S`` (:func:`storage_noise64`) is the rmse
against ``t`` of float64 copies whose layer tensors are perturbed by a uniform ``[−u_s, u_s]`` relative error
(a storage rounding; :data:`STORAGE_DRAWS` seeded draws, pooled), and the term is ``max(u_s · √D · rms(t), m · S)``.
``u_s · √D · rms(t)`` assumes a well-conditioned model; ``S`` is what one storage rounding of each weight does to
*this* model on *these* inputs, so a sample near a singularity (a 2-feature LayerNorm whose inputs nearly
cancel: the fuzzer's seed 108853) gets the noise it really has; ``m · S`` because one such sample makes the
fold's error a single draw of that noise, not an average.
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
candidate fails, *localization* (:mod:`bnfold.localize`): the first graph node whose output diverges.
Inputs are the user's batches; only when none are given are random ones drawn, and the report says so.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from bnfold.batches import positional_arity
from bnfold.errors import InputError

if TYPE_CHECKING:
    from bnfold.localize import Localization

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
    "json_safe",
    "judge",
    "random_inputs",
    "rounding_depth",
    "run_batches",
    "run_reference64",
    "storage_noise64",
    "storage_roundoff",
    "to_float64",
]

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, ...]
"""The positional inputs of one model call."""


FLOOR_ROUNDOFFS = 16.0
"""``k`` of the floor ``(k · u + u_s) · √D · rms(t)`` (module docstring): roundoffs per layer a kernel choice may
cost."""

STORAGE_DRAWS = 4
"""Seeded draws of the storage-rounding perturbation pooled into the storage noise ``S`` (module docstring)."""


def storage_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff ``u_s`` of ``dtype`` itself (``finfo.eps / 2``; 0 for non-floating types)."""
    return torch.finfo(dtype).eps / 2 if dtype.is_floating_point else 0.0


def accumulation_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff ``u`` of the precision kernels accumulate in for outputs of ``dtype``: 2⁻⁵³ for float64,
    2⁻²⁴ for everything else (fp32, and fp16/bf16, which CPU kernels accumulate in fp32)."""
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def rounding_depth(model: Any) -> int:
    """``D`` of the float64-rule floor: the number of weight tensors of rank ≥ 2 in ``model`` (parameters and
    buffers: conv, linear, embedding and attention weights — the layers whose accumulation order a kernel
    chooses), at least 1; 1 for anything that is not a torch module."""
    if not isinstance(model, torch.nn.Module):
        return 1
    seen: set[int] = set()
    depth = 0
    for t in (*model.parameters(), *model.buffers()):
        if t.dim() >= 2 and t.is_floating_point() and id(t) not in seen:
            seen.add(id(t))
            depth += 1
    return max(depth, 1)


@dataclass(frozen=True)
class Tolerance:
    """Parameters of the pass/fail rules (module docstring).

    ``multiplier``/``floor``/``depth``: the float64-reference rule, ``rmse(c, t) ≤ multiplier · rmse(r, t) +
    floor · √depth · rms(t)`` (``floor`` = ``k · u + u_s`` per layer, ``depth`` = ``D``; ``storage`` = the
    ``u_s`` part of ``floor``, replaced by the measured noise when it is larger: :meth:`bound`); ``rtol``/``atol``: the
    elementwise view (defaults of ``torch.testing.assert_close``); ``batch_rtol``: the batch-independence check
    (``rms(y_alone − y_in_batch) ≤ batch_rtol · rms(y_in_batch)``).
    """

    multiplier: float = 2.0
    floor: float = (FLOOR_ROUNDOFFS + 1.0) * 2.0**-24
    rtol: float = 1.3e-6
    atol: float = 1e-5
    batch_rtol: float = 1e-4
    depth: int = 1
    storage: float = 2.0**-24

    @property
    def relative_floor(self) -> float:
        """``floor · √depth``: the floor as a fraction of ``rms(t)``."""
        return self.floor * math.sqrt(max(self.depth, 1))

    def bound(self, reference_rmse: float, target_rms: float, storage_noise: float | None = None) -> float:
        """The float64 rule's bound on ``rmse(c, t)``: ``multiplier · rmse(r, t) + relative_floor · rms(t)``;
        with a measured storage noise ``S`` (:func:`storage_noise64`), the floor's storage part
        ``storage · √depth · rms(t)`` becomes ``max(storage · √depth · rms(t), multiplier · S)``."""
        if storage_noise is None:
            return self.multiplier * reference_rmse + self.relative_floor * target_rms
        root = math.sqrt(max(self.depth, 1))
        storage = max(self.storage * root * target_rms, self.multiplier * storage_noise)
        return self.multiplier * reference_rmse + (self.floor - self.storage) * root * target_rms + storage

    @staticmethod
    def for_dtype(dtype: torch.dtype, depth: int = 1) -> Tolerance:
        """Defaults per dtype for a model of ``depth`` accumulating layers; ``rtol``/``atol`` equal
        ``torch.testing.assert_close``'s."""
        floor = FLOOR_ROUNDOFFS * accumulation_roundoff(dtype) + storage_roundoff(dtype)
        if dtype in (torch.float16, torch.bfloat16):
            rtol = 1e-3 if dtype == torch.float16 else 1.6e-2
            return Tolerance(multiplier=3.0, floor=floor, rtol=rtol, atol=1e-5, batch_rtol=1e-2, depth=depth,
                             storage=storage_roundoff(dtype))
        if dtype == torch.float64:
            return Tolerance(multiplier=2.0, floor=floor, rtol=1e-7, atol=1e-7, batch_rtol=1e-8, depth=depth,
                             storage=storage_roundoff(dtype))
        if not dtype.is_floating_point and not dtype.is_complex:
            return Tolerance(multiplier=2.0, floor=0.0, rtol=0.0, atol=0.0, batch_rtol=0.0, depth=depth, storage=0.0)
        return Tolerance(floor=floor, depth=depth, storage=storage_roundoff(dtype))


# ---------------------------------------------------------------------------------------------------------------
# inputs


def as_batches(inputs: Any, arity: int | None = None) -> list[Batch]:
    """``inputs`` as a list of batches of positional inputs, read as everywhere in bnfold
    (:mod:`bnfold.batches`: a tensor or a tuple of tensors is one batch, a list or other iterable holds batches);
    ``arity``: the reference's number of positional inputs, when known, to refuse a reading that cannot fit."""
    from bnfold.batches import is_tensor_batch, iter_batches

    batches: list[Batch] = []
    for k, batch in enumerate(iter_batches(inputs, arity=arity)):
        if isinstance(batch, torch.Tensor):
            batches.append((batch,))
        elif is_tensor_batch(batch):
            batches.append(tuple(batch))
        elif isinstance(batch, dict):
            raise InputError(f"batch {k} is a dict (keyword inputs); parity checks call the models with positional "
                             "inputs", hint="pass each batch as a tuple of tensors in the order forward() takes them")
        else:
            raise InputError(f"batch {k} is a {type(batch).__name__}, not a tensor or a tuple of tensors",
                             hint="labels do not belong in the inputs: pass only model inputs")
    if not batches:
        raise InputError("no input tensors were given", hint="pass a tensor, a tuple of tensors or a list of batches")
    return batches


def random_inputs(example_inputs: Sequence[torch.Tensor] | None = None,
                  input_shapes: Sequence[Sequence[int]] | None = None, *,
                  dtype: torch.dtype = torch.float32, batches: int = 1, seed: int = 0) -> list[Batch]:
    """Seeded random batches shaped like ``example_inputs`` (same dtypes; integer inputs drawn from their
    observed range) or like ``input_shapes`` (``dtype``, standard normal)."""
    gen = torch.Generator().manual_seed(seed)
    if example_inputs is not None:
        specs = [(tuple(t.shape), t.dtype, t) for t in example_inputs]
    elif input_shapes is not None:
        specs = [(tuple(int(d) for d in s), dtype, None) for s in input_shapes]
    else:
        raise InputError("no inputs and no input shapes: cannot run the models",
                         hint="pass inputs (your data), example_inputs or input_shapes")
    out: list[Batch] = []
    for _ in range(batches):
        batch = []
        for shape, dt, like in specs:
            if dt.is_floating_point:
                batch.append(torch.randn(shape, generator=gen).to(dt))
            elif dt == torch.bool:
                batch.append(torch.randint(0, 2, shape, generator=gen).bool())
            else:
                lo, hi = (0, 10) if like is None or like.numel() == 0 else (int(like.min()), int(like.max()) + 1)
                batch.append(torch.randint(lo, hi, shape, generator=gen).to(dt))
        out.append(tuple(batch))
    return out


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


def _as64(batch: Batch) -> Batch:
    return tuple(t.double() if t.is_floating_point() else t for t in batch)


def run_batches(fn: Callable[..., Any], batches: Sequence[Batch]) -> list[list[torch.Tensor]]:
    """``fn`` on every batch (no autograd); each output flattened, detached and moved to the CPU."""
    from bnfold.errors import BnfoldError, InputError
    from bnfold.graph import quiet_fx

    out = []
    with torch.no_grad():
        for k, b in enumerate(batches):
            try:
                with quiet_fx():
                    result = fn(*b)
            except BnfoldError:
                raise
            except (RuntimeError, ValueError, TypeError, AssertionError, IndexError) as exc:
                # the model (the user's, in every call of this) cannot run on the user's inputs
                shapes = ", ".join("x".join(map(str, t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
                                   for t in b)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise InputError(f"{type(fn).__name__} failed on batch {k} (inputs {shapes}): "
                                 f"{type(exc).__name__}: {first}",
                                 hint="check the inputs' shapes and dtypes against the model's") from None
            out.append([t.detach().cpu() for t in flatten_outputs(result)])
    return out


# ---------------------------------------------------------------------------------------------------------------
# metrics


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
    sum_sq_noise64: float = 0.0
    samples: int = 0
    top1: int = 0
    top5: int = 0
    classes: int | None = None

    def add(self, ref: torch.Tensor, cand: torch.Tensor, ref64: torch.Tensor | None, tol: Tolerance,
            noise64: Sequence[torch.Tensor] = ()) -> None:
        """Add one batch's output; ``noise64``: this output of each storage-noise draw (:func:`storage_noise64`)."""
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
                    self.sum_sq_noise64 += sum(float(((p[m] - tm) ** 2).sum()) for p in draws) / len(draws)
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
                     "sum_sq_r64", "sum_sq_t64", "n_noise64", "sum_sq_noise64", "samples", "top1", "top5"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
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
            noise = math.sqrt(self.sum_sq_noise64 / self.n_noise64) if self.n_noise64 else None
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


# ---------------------------------------------------------------------------------------------------------------
# batch independence


@dataclass
class BatchIndependence:
    """Does the candidate's output for sample 0 change when every other sample of the batch is replaced by a
    copy of it? (Same batch size, so fixed-shape artifacts can run it.) ``checked`` is False when no batch had
    two samples or no output is batched; then ``passed`` is True and ``note`` says why."""

    checked: bool
    passed: bool
    batch_size: int = 0
    max_abs: float = 0.0
    rel_rms: float = 0.0
    threshold: float = 0.0
    reference_passed: bool | None = None
    note: str = ""


def _batch_dim(batch: Batch) -> int | None:
    sizes = [t.shape[0] for t in batch if t.dim() > 0]
    return int(sizes[0]) if sizes else None


def _batch_deviation(fn: Callable[..., Any], batch: Batch, n: int) -> tuple[float, float, torch.dtype] | None:
    """(max |Δ|, rms(Δ)/rms(y)) between sample 0 in ``batch`` and sample 0 in a batch of copies of it."""
    copies = tuple(t[:1].expand(t.shape).contiguous() if t.dim() > 0 and t.shape[0] == n else t for t in batch)
    with torch.no_grad():
        full = flatten_outputs(fn(*batch))
        alone = flatten_outputs(fn(*copies))
    worst: tuple[float, float, torch.dtype] | None = None
    for y, z in zip(full, alone, strict=False):
        if y.dim() == 0 or y.shape[0] != n or tuple(y.shape) != tuple(z.shape):
            continue
        a, b = y[:1].detach().double().cpu(), z[:1].detach().double().cpu()
        d = (a - b).nan_to_num(nan=math.inf)
        scale = float(torch.sqrt(torch.mean(a.nan_to_num() ** 2)))
        rel = float(torch.sqrt(torch.mean(d**2))) / scale if scale > 0 else float(torch.sqrt(torch.mean(d**2)))
        cur = (float(d.abs().max()), rel, y.dtype)
        if worst is None or cur[1] > worst[1]:
            worst = cur
    return worst


def check_batch_independence(candidate: Callable[..., Any], batches: Sequence[Batch], *,
                             reference: Callable[..., Any] | None = None,
                             tolerance: Tolerance | None = None) -> BatchIndependence:
    """Check that ``candidate``'s output for a sample does not depend on the rest of its batch.

    Uses the first batch with at least two samples (dimension 0 of the first input). Fails when
    ``rms(y₀(copies) − y₀(batch)) > batch_rtol · rms(y₀(batch))``. When the candidate fails and ``reference``
    is given, the reference is checked too: if it depends on the batch as well, the candidate only reproduces
    it (``passed`` stays True, ``note`` says so).
    """
    batch = next((b for b in batches if (_batch_dim(b) or 0) >= 2), None)
    if batch is None:
        return BatchIndependence(False, True, note="skipped: no input batch has two or more samples")
    n = _batch_dim(batch) or 0
    try:
        dev = _batch_deviation(candidate, batch, n)
    except Exception as exc:  # a diagnosis aid: never hide the verdict on the outputs
        log.debug("batch-independence run failed", exc_info=True)
        return BatchIndependence(False, True, n, note=f"skipped: the candidate failed on a batch of copies "
                                                      f"({type(exc).__name__}: {exc})")
    if dev is None:
        return BatchIndependence(False, True, n, note="skipped: no output has the batch dimension first")
    max_abs, rel, dtype = dev
    thr = (tolerance or Tolerance.for_dtype(dtype)).batch_rtol
    result = BatchIndependence(True, rel <= thr, n, max_abs, rel, thr)
    if not result.passed:
        result.note = ("the output for a sample changes with the rest of its batch: is a BatchNorm (or dropout) "
                       "still in training mode?")
        if reference is not None:
            ref_dev = _batch_deviation(reference, batch, n)
            result.reference_passed = ref_dev is None or ref_dev[1] <= thr
            if not result.reference_passed:
                result.passed = True
                result.note = ("the reference depends on the batch too (training-mode BatchNorm?); the candidate "
                               "reproduces it")
    return result


# ---------------------------------------------------------------------------------------------------------------
# the report


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats written as the strings ``"inf"``, ``"-inf"``, ``"nan"`` (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@dataclass
class ParityReport:
    """The result of :func:`compare`. ``passed`` is the overall verdict; ``to_dict()`` the full JSON record;
    ``str(report)`` a terminal table. Field meanings in ``docs/parity.md``."""

    outputs: list[OutputParity] = field(default_factory=list)
    inputs: str = "user"
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    batches: int = 0
    samples: int = 0
    batch_independence: BatchIndependence | None = None
    localization: Localization | None = None
    reference_fp64: bool = False

    @property
    def passed(self) -> bool:
        if self.errors or not self.outputs or not all(o.passed for o in self.outputs):
            return False
        return self.batch_independence is None or self.batch_independence.passed

    @property
    def worst(self) -> OutputParity | None:
        """The output closest to (or furthest past) its bound."""
        return max(self.outputs, key=lambda o: (not o.passed, o.ratio), default=None)

    def summary(self) -> dict[str, Any]:
        """Worst case over outputs, in the flat form the fold report embeds (raw floats; see docs/parity.md)."""
        if not self.outputs:
            return {"passed": False, "inputs": self.inputs, "errors": list(self.errors)}
        out: dict[str, Any] = {
            "passed": self.passed,
            "max_abs": max(o.max_abs for o in self.outputs),
            "max_rel": max(o.max_rel for o in self.outputs),
            "cosine": min(o.cosine for o in self.outputs),
            "inputs": self.inputs,
        }
        with_ref = [o for o in self.outputs if o.rmse_vs_fp64 is not None]
        if with_ref:
            worst = max(with_ref, key=lambda o: o.ratio)
            out["rmse_vs_fp64"] = worst.rmse_vs_fp64
            out["reference_rmse_vs_fp64"] = worst.reference_rmse_vs_fp64
            out["bound"] = worst.bound
        out["sqnr_db"] = json_safe(min(o.sqnr_db for o in self.outputs))
        top1 = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        if top1:
            out["top1_agreement"] = min(top1)
        out["nonfinite"] = sum(o.nonfinite for o in self.outputs)
        if self.batch_independence is not None and self.batch_independence.checked:
            out["batch_independent"] = self.batch_independence.passed
        if self.localization is not None and self.localization.node is not None:
            out["diverging_node"] = self.localization.node
        if self.errors:
            out["errors"] = list(self.errors)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything, as strict JSON (non-finite floats as strings)."""
        return json_safe({
            "passed": self.passed,
            "inputs": self.inputs,
            "batches": self.batches,
            "samples": self.samples,
            "reference_fp64": self.reference_fp64,
            "notes": list(self.notes),
            "errors": list(self.errors),
            "outputs": [asdict(o) for o in self.outputs],
            "batch_independence": None if self.batch_independence is None else asdict(self.batch_independence),
            "localization": None if self.localization is None else self.localization.to_dict(),
        })

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        """A terminal table: verdict line, one row per output, batch independence, localization, notes."""
        from bnfold.report import format_table

        source = "your data" if self.inputs == "user" else "RANDOM inputs"
        lines = [f"parity {'PASS' if self.passed else 'FAIL'}: {self.samples} samples of {source} "
                 f"({self.batches} batch{'es' if self.batches != 1 else ''}); rule: {self._rule()}"]
        if self.outputs:
            rows = [[o.index, "x".join(map(str, o.shape)), o.dtype, f"{o.max_abs:.3g}", f"{o.cosine:.9f}",
                     _db(o.sqnr_db), _pct(o.top1_agreement), _pct(o.top5_agreement), f"{o.nan}/{o.inf}",
                     _vs64(o), "ok" if o.passed else "FAIL"] for o in self.outputs]
            lines += ["", format_table(["out", "shape", "dtype", "max abs", "cosine", "SQNR dB", "top-1", "top-5",
                                        "NaN/Inf", "rmse vs fp64 (cand / ref ≤ bound)", "verdict"], rows)]
            lines += [f"  output {o.index}: {o.reason}" for o in self.outputs if o.reason]
        bi = self.batch_independence
        if bi is not None:
            if bi.checked:
                lines.append(f"batch independence {'PASS' if bi.passed else 'FAIL'}: sample 0 alone vs in a batch "
                             f"of {bi.batch_size}: rel rms {bi.rel_rms:.3g} (≤ {bi.threshold:g})"
                             + (f" — {bi.note}" if bi.note else ""))
            else:
                lines.append(f"batch independence: {bi.note}")
        if self.localization is not None:
            lines += ["", self.localization.render()]
        lines += [f"error: {e}" for e in self.errors]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _rule(self) -> str:
        if not self.outputs:
            return "-"
        if all(o.rule == "fp64" for o in self.outputs):
            return "rmse vs a float64 reference within a multiple of the reference's own"
        return f"elementwise, as assert_close (rtol={self.outputs[0].rtol:g}, atol={self.outputs[0].atol:g})"


def _db(x: float) -> str:
    return "inf" if x == math.inf else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _vs64(o: OutputParity) -> str:
    if o.rmse_vs_fp64 is None:
        return f"- ({o.not_close} not close)"
    return f"{o.rmse_vs_fp64:.3g} / {o.reference_rmse_vs_fp64:.3g} ≤ {o.bound:.3g}"


# ---------------------------------------------------------------------------------------------------------------
# compare


def judge(reference_outputs: Sequence[Sequence[torch.Tensor]], candidate_outputs: Sequence[Sequence[torch.Tensor]],
          reference64_outputs: Sequence[Sequence[torch.Tensor]] | None = None, *,
          tolerance: Tolerance | None = None, depth: int = 1,
          noise64_outputs: Sequence[Sequence[Sequence[torch.Tensor]]] = ()) -> tuple[ParityReport, list[float]]:
    """The report for precomputed outputs (one list of tensors per batch), and per batch the worst
    ``rmse/bound`` ratio (``inf`` for a batch that fails outright) — used to pick the batch to localize on.
    ``depth``: the reference's :func:`rounding_depth`, for the per-dtype defaults when ``tolerance`` is None;
    ``noise64_outputs``: per storage-noise draw, its outputs per batch (:func:`storage_noise64`)."""
    report = ParityReport(batches=len(reference_outputs))
    totals: list[OutputStats] = []
    tols: list[Tolerance] = []
    ratios: list[float] = []
    for k, (ref, cand) in enumerate(zip(reference_outputs, candidate_outputs, strict=True)):
        if len(ref) != len(cand):
            report.errors.append(f"batch {k}: the reference returns {len(ref)} tensors, the candidate {len(cand)}")
            ratios.append(math.inf)
            continue
        ref64 = reference64_outputs[k] if reference64_outputs is not None else None
        if ref64 is not None and len(ref64) != len(ref):
            ref64 = None
        if ref and ref[0].dim() > 0:
            report.samples += int(ref[0].shape[0])
        worst = 0.0
        for i, (r, c) in enumerate(zip(ref, cand, strict=True)):
            if i == len(totals):
                totals.append(OutputStats())
                tols.append(tolerance or Tolerance.for_dtype(r.dtype, depth))
            stats = OutputStats()
            try:
                noise = [d[k][i] for d in noise64_outputs if len(d[k]) == len(ref)]
                stats.add(r, c, None if ref64 is None else ref64[i], tols[i], noise)
            except ValueError as exc:
                report.errors.append(f"batch {k}, output {i}: {exc}")
                worst = math.inf
                continue
            v = stats.verdict(i, tols[i])
            worst = max(worst, v.ratio if v.passed or v.ratio > 1 else math.inf)
            totals[i].merge(stats)
        ratios.append(worst)
    report.outputs = [s.verdict(i, tols[i]) for i, s in enumerate(totals) if s.shape is not None]
    report.reference_fp64 = bool(report.outputs) and all(o.rule == "fp64" for o in report.outputs)
    return report, ratios


def run_reference64(reference: Callable[..., Any], reference64: Callable[..., Any] | None,
                    batches: Sequence[Batch]) -> tuple[list[list[torch.Tensor]] | None, str]:
    """Outputs of a float64 copy of ``reference`` (``reference64`` when given) on ``batches``, or ``None`` and
    a note saying why there are none."""
    if reference64 is None:
        if not isinstance(reference, torch.nn.Module):
            return None, ("no float64 reference (the reference is not a torch module; make the torch model the "
                          "reference to use the float64 rule): verdict by the elementwise assert_close tolerances, "
                          "which a fold of a deep fp32 network can exceed while being as accurate")
        try:
            reference64 = to_float64(reference)
        except Exception as exc:
            return None, f"no float64 reference (copying the reference failed: {type(exc).__name__}: {exc})"
    try:
        return run_batches(reference64, [_as64(b) for b in batches]), ""
    except Exception as exc:
        log.debug("float64 reference run failed", exc_info=True)
        first = str(exc).splitlines()[0] if str(exc) else ""
        return None, (f"no float64 reference (it failed to run in float64: {type(exc).__name__}: {first}); "
                      "verdict by the elementwise assert_close tolerances")


def storage_noise64(reference: Any, batches: Sequence[Batch], draws: int = STORAGE_DRAWS, seed: int = 0
                    ) -> list[list[list[torch.Tensor]]]:
    """Outputs (per draw, per batch) of float64 copies of ``reference`` whose layer tensors are each multiplied
    by ``1 + δ``, ``δ`` uniform in ``[−u_s, u_s]`` per element (``u_s`` of the reference's own dtype): the
    noise that one storage rounding of every weight a fold may rewrite causes on this model and these inputs
    (module docstring). Layer tensors: every floating parameter and buffer of each module that holds a tensor of
    rank ≥ 2 (conv/linear/embedding weights and their biases — the layers :func:`rounding_depth` counts).
    Empty unless ``reference`` is a module holding fp16/bf16 tensors (for fp32, ``u_s = u`` is in the floor), or
    when a copy cannot run."""
    if not isinstance(reference, torch.nn.Module):
        return []
    reduced = [t.dtype for t in (*reference.parameters(), *reference.buffers())
               if t.dtype in (torch.float16, torch.bfloat16)]
    if not reduced:
        return []
    u_s = max(storage_roundoff(d) for d in reduced)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(draws):
        try:
            noisy = to_float64(reference)
            with torch.no_grad():
                for t in _layer_tensors(noisy):
                    t.mul_(1 + u_s * (2 * torch.rand(t.shape, generator=gen, dtype=t.dtype) - 1).to(t.device))
            out.append(run_batches(noisy, [_as64(b) for b in batches]))
        except Exception:  # the float64 reference itself could not run: the note comes from run_reference64
            log.debug("storage-noise run failed", exc_info=True)
            return []
    return out


def _layer_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The floating tensors of every module that directly holds one of rank ≥ 2 (each tensor once)."""
    seen: set[int] = set()
    out = []
    for mod in model.modules():
        own = [t for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False)) if t.is_floating_point()]
        if any(t.dim() >= 2 for t in own):
            for t in own:
                if id(t) not in seen and t.numel():
                    seen.add(id(t))
                    out.append(t)
    return out


def compare(
    reference: Callable[..., Any],
    candidate: Callable[..., Any],
    inputs: torch.Tensor | Sequence[torch.Tensor] | Iterable[Sequence[torch.Tensor]] | None = None,
    *,
    tolerance: Tolerance | None = None,
    reference64: Callable[..., Any] | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    input_shapes: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
    batch_independence: bool = True,
    localize: bool = True,
) -> ParityReport:
    """Run ``reference`` and ``candidate`` (anything callable on torch tensors) on ``inputs`` and judge parity.

    ``inputs``: one batch (a tensor or a tuple of tensors) or a list/iterable of batches — the user's data, read
    as by every bnfold function (:mod:`bnfold.batches`). Only when
    it is ``None`` are random batches drawn, shaped like ``example_inputs`` or ``input_shapes`` (seeded by
    ``seed``); ``report.inputs`` is then ``"random"`` and a note says so. ``reference64``: a float64 copy of
    the reference (made automatically when the reference is an ``nn.Module``). ``tolerance``: overrides the
    per-dtype defaults (:meth:`Tolerance.for_dtype`). ``batch_independence``: also check that the candidate's
    output for a sample does not depend on the rest of the batch. ``localize``: when a ``GraphModule``
    candidate fails, find the first node whose output diverges (:func:`bnfold.localize.localize`).
    """
    if inputs is None:
        batches = random_inputs(example_inputs, input_shapes, seed=seed)
        source = "random"
    else:
        batches, source = as_batches(inputs, positional_arity(reference)), "user"
    ref_out = run_batches(reference, batches)
    cand_out = run_batches(candidate, batches)
    ref64_out, note64 = run_reference64(reference, reference64, batches)
    noise = storage_noise64(reference, batches) if ref64_out is not None else []
    report, ratios = judge(ref_out, cand_out, ref64_out, tolerance=tolerance, depth=rounding_depth(reference),
                           noise64_outputs=noise)
    report.inputs = source
    if source == "random":
        shapes = ", ".join("x".join(map(str, t.shape)) for t in batches[0])
        report.notes.append(f"no inputs were given: compared on random inputs ({shapes}, seed {seed}); parity on "
                            "random data says little about your data — pass real batches")
    if note64:
        report.notes.append(note64)
    if batch_independence:
        report.batch_independence = check_batch_independence(candidate, batches, reference=reference,
                                                             tolerance=tolerance)
    if localize and not all(o.passed for o in report.outputs) and not report.errors \
            and isinstance(candidate, torch.fx.GraphModule) and isinstance(reference, torch.nn.Module):
        from bnfold.localize import localize as _localize

        k = max(range(len(ratios)), key=lambda i: ratios[i])
        try:
            report.localization = _localize(reference, candidate, batches[k], tolerance=tolerance)
        except Exception as exc:  # localization is a diagnosis aid; it must never hide the verdict
            log.debug("localization failed", exc_info=True)
            report.notes.append(f"localization failed: {type(exc).__name__}: {exc}")
    return report

