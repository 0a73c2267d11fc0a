""":func:`compare` (the public ``bnfold.compare``), :func:`judge` and the :class:`ParityReport` they return.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.fx

from bnfold.batches import positional_arity
from bnfold.copying import copy_module
from bnfold.parity.independence import BatchIndependence, check_batch_independence
from bnfold.parity.inputs import (
    Batch,
    Mapped,
    batch_to_float64,
    random_inputs,
    read_batches,
    run_batches,
    to_float64,
)
from bnfold.parity.metrics import OutputParity, OutputStats
from bnfold.parity.noise import storage_noise64
from bnfold.parity.tolerance import Tolerance, rounding_depth
from bnfold.report import format_table, json_safe

if TYPE_CHECKING:
    from bnfold.parity.localize import Localization

__all__ = ['Noise64', 'ParityReport', 'compare', 'judge', 'run_reference64']

log = logging.getLogger(__name__)


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
    against: str = "reference"
    """What the metrics (max abs, cosine, SQNR, top-k) compare the candidate with: ``"reference"``, or
    ``"float64"`` when the reference itself was not run (``compare(..., run_reference="when_needed")``)."""

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
        if self.against != "reference":
            out["against"] = self.against
        with_ref = [o for o in self.outputs if o.rmse_vs_fp64 is not None]
        if with_ref:
            worst = max(with_ref, key=lambda o: o.ratio)
            out["rmse_vs_fp64"] = worst.rmse_vs_fp64
            if worst.reference_rmse_vs_fp64 is not None:
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
            "against": self.against,
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
    if o.reference_rmse_vs_fp64 is None:
        return f"{o.rmse_vs_fp64:.3g} / not run ≤ {o.bound:.3g}"
    return f"{o.rmse_vs_fp64:.3g} / {o.reference_rmse_vs_fp64:.3g} ≤ {o.bound:.3g}"


Noise64 = Sequence[Sequence[Sequence[torch.Tensor]]]
"""Per storage-noise draw, its outputs per batch (:func:`~bnfold.parity.noise.storage_noise64`)."""


def judge(reference_outputs: Sequence[Sequence[torch.Tensor]], candidate_outputs: Sequence[Sequence[torch.Tensor]],
          reference64_outputs: Sequence[Sequence[torch.Tensor]] | None = None, *,
          tolerance: Tolerance | None = None, depth: int = 1,
          storage_noise: Callable[[], Noise64] | None = None) -> tuple[ParityReport, list[float]]:
    """The report for precomputed outputs (one list of tensors per batch), and per batch the worst
    ``rmse/bound`` ratio (``inf`` for a batch that fails outright) — used to pick the batch to localize on.
    ``depth``: the reference's :func:`rounding_depth`, for the per-dtype defaults when ``tolerance`` is None;
    ``storage_noise``: measures the storage noise ``S`` — called only when the verdict fails on the analytic
    bound alone, the one case ``S`` (which only raises the bound) can change."""
    report, ratios = _judge_once(reference_outputs, candidate_outputs, reference64_outputs, tolerance, depth, ())
    if storage_noise is not None and reference64_outputs is not None and _needs_storage_noise(report):
        noise = storage_noise()
        if noise:
            report, ratios = _judge_once(reference_outputs, candidate_outputs, reference64_outputs, tolerance,
                                         depth, noise)
    return report, ratios


def _judge_once(reference_outputs: Sequence[Sequence[torch.Tensor]],
                candidate_outputs: Sequence[Sequence[torch.Tensor]],
                reference64_outputs: Sequence[Sequence[torch.Tensor]] | None, tolerance: Tolerance | None,
                depth: int, noise64_outputs: Noise64,
                dtype_of: Literal["reference", "candidate"] = "reference") -> tuple[ParityReport, list[float]]:
    """One verdict; the per-dtype tolerance of each output from the reference's dtype, or the candidate's
    (``dtype_of="candidate"``: the float64 outputs stand in for a reference that was not run)."""
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
                tols.append(tolerance or Tolerance.for_dtype((c if dtype_of == "candidate" else r).dtype, depth))
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


def _needs_storage_noise(report: ParityReport) -> bool:
    """Whether measuring the storage noise ``S`` could turn ``report``'s verdict: some output fails the float64
    rule on its bound alone (no errors, no NaN, no non-finite mismatch, no empty output)."""
    if report.errors:
        return False
    failing = [o for o in report.outputs if not o.passed]
    return bool(failing) and all(
        o.rule == "fp64" and o.elements and not (o.nan or o.reference_nan or o.nonfinite_mismatch)
        for o in failing)


def run_reference64(reference: Callable[..., Any], reference64: Callable[..., Any] | None,
                    batches: Iterable[Batch]) -> tuple[list[list[torch.Tensor]] | None, str]:
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
        return run_batches(reference64, Mapped(batches, batch_to_float64)), ""  # one float64 batch at a time
    except Exception as exc:
        log.debug("float64 reference run failed", exc_info=True)
        first = str(exc).splitlines()[0] if str(exc) else ""
        return None, (f"no float64 reference (it failed to run in float64: {type(exc).__name__}: {first}); "
                      "verdict by the elementwise assert_close tolerances")


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
    run_reference: Literal["always", "when_needed"] = "always",
) -> ParityReport:
    """Run ``reference`` and ``candidate`` (anything callable on torch tensors) on ``inputs`` and judge parity.

    ``inputs``: one batch (a tensor or a tuple of tensors) or a list/iterable of batches — the user's data, read
    as by every bnfold function (:mod:`bnfold.batches`); a source that can be iterated again (a ``DataLoader``) is
    re-read for every run rather than kept in memory (the outputs are kept). Only when
    it is ``None`` are random batches drawn, shaped like ``example_inputs`` or ``input_shapes`` (seeded by
    ``seed``); ``report.inputs`` is then ``"random"`` and a note says so. ``reference64``: a float64 copy of
    the reference (made automatically when the reference is an ``nn.Module``). ``tolerance``: overrides the
    per-dtype defaults (:meth:`Tolerance.for_dtype`). ``batch_independence``: also check that the candidate's
    output for a sample does not depend on the rest of the batch. ``localize``: when a ``GraphModule``
    candidate fails, find the first node whose output diverges (:func:`bnfold.parity.localize.localize`).

    ``run_reference="when_needed"`` (``reference`` an ``nn.Module``, which is then never run itself: a forward
    may change a module's state): the candidate is first judged against the float64 reference alone, with the
    rule's floor as the bound — ``rmse(c, t) ≤ floor`` implies ``rmse(c, t) ≤ m · rmse(r, t) + floor`` whatever
    the reference's own error, so this verdict is the rule's. When every output passes so, the reference is not
    run at all: the report's metrics compare the candidate with the float64 outputs (``report.against ==
    "float64"``) and no output has a ``reference_rmse_vs_fp64``. Otherwise a copy of the reference is run and
    judged as with ``"always"`` (the float64 outputs are reused). The check :func:`bnfold.fold` runs by default:
    one forward of the candidate and one float64 forward, unless the candidate is near its bound.
    """
    if inputs is None:
        batches = random_inputs(example_inputs, input_shapes, seed=seed)
        source = "random"
    else:
        batches, source = read_batches(inputs, positional_arity(reference)), "user"  # a re-iterable: re-read
    depth = rounding_depth(reference)
    ratios: list[float] = []
    if run_reference == "when_needed":
        if not isinstance(reference, torch.nn.Module):
            raise TypeError("compare(run_reference='when_needed') needs the reference as an nn.Module")
        cand_out = run_batches(candidate, batches)
        ref64_out, note64 = run_reference64(reference, reference64, batches)
        report = _floor_verdict(cand_out, ref64_out, tolerance, depth)
        if report is None:
            reference = copy_module(reference)
            ref_out = run_batches(reference, batches)
    else:
        ref_out = run_batches(reference, batches)
        cand_out = run_batches(candidate, batches)
        ref64_out, note64 = run_reference64(reference, reference64, batches)
        report = None
    if report is None:
        report, ratios = judge(ref_out, cand_out, ref64_out, tolerance=tolerance, depth=depth,
                               storage_noise=lambda: storage_noise64(reference, batches))
    report.inputs = source
    if source == "random":
        shapes = ", ".join("x".join(map(str, t.shape)) for t in batches[0])
        report.notes.append(f"no inputs were given: compared on random inputs ({shapes}, seed {seed}); parity on "
                            "random data says little about your data — pass real batches")
    if note64:
        report.notes.append(note64)
    if batch_independence:
        unrun = report.against != "reference"  # the caller's module, which is not run: a copy is, when asked
        ref_bi = (lambda *args, m=reference: copy_module(m)(*args)) if unrun else reference
        report.batch_independence = check_batch_independence(candidate, batches, reference=ref_bi,
                                                             tolerance=tolerance)
    if localize and not report.passed and report.against == "reference" and not report.errors \
            and isinstance(candidate, torch.fx.GraphModule) and isinstance(reference, torch.nn.Module):
        from bnfold.parity.localize import localize as localize_node

        k = max(range(len(ratios)), key=lambda i: ratios[i])
        try:
            report.localization = localize_node(reference, candidate, batches[k], tolerance=tolerance)
        except Exception as exc:  # localization is a diagnosis aid; it must never hide the verdict
            log.debug("localization failed", exc_info=True)
            report.notes.append(f"localization failed: {type(exc).__name__}: {exc}")
    return report


def _floor_verdict(candidate_outputs: Sequence[Sequence[torch.Tensor]],
                   reference64_outputs: Sequence[Sequence[torch.Tensor]] | None, tolerance: Tolerance | None,
                   depth: int) -> ParityReport | None:
    """The float64 rule's verdict without the reference's outputs, when it can be given: every output's
    ``rmse(c, t)`` within the floor (the rule's bound with ``rmse(r, t) = 0``, the tolerance of the candidate's
    dtype) — the metrics then against the float64 outputs, ``reference_rmse_vs_fp64`` unknown (``None``).
    ``None`` when some output is not within it (or holds a NaN, a non-finite mismatch…): the reference must run."""
    if reference64_outputs is None:
        return None
    report, _ = _judge_once(reference64_outputs, candidate_outputs, reference64_outputs, tolerance, depth, (),
                            dtype_of="candidate")
    if not report.passed or not report.reference_fp64:
        return None
    report.outputs = [replace(o, reference_rmse_vs_fp64=None) for o in report.outputs]
    report.against = "float64"
    return report
