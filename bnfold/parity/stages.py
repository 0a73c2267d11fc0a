"""Stage tracking: parity of every stage of a deployment (original → recalibrated → folded → onnx → tvm) against
the previous stage and against the original, and the stage where a divergence starts.

A *stage* is a name and anything callable on torch tensors (a module, a GraphModule, an
:class:`~bnfold.targets.onnx.OnnxRuntimeModel`, a TVM artifact). All stages run on the same input batches;
each stage's outputs are kept, so every comparison costs one run per stage.

Each stage after the first is judged with :func:`bnfold.parity.judge` (the float64-reference rule; the float64
outputs come from the *baseline*):

* against the **previous** stage — did this step change anything?
* against the **baseline** — the original, or the last stage added with ``expected_change=True``. Recalibration
  changes the model on purpose: that stage's comparison with its predecessor is reported but not judged, and
  it becomes the baseline (its float64 copy the reference) for the stages after it. When the baseline is not
  the original, the comparison with the original is reported too (informational).
* its **batch independence** (a sample's output must not depend on the rest of its batch).

The divergence starts at the first stage that fails to run, fails against its predecessor, depends on the
batch, or — every step passing on its own — drifts out of bounds against the baseline. When a GraphModule
stage fails against a module, :func:`bnfold.parity.localize.localize` names the first diverging node.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx

from bnfold.errors import DataError
from bnfold.parity.core import ParityReport, judge, run_reference64
from bnfold.parity.independence import BatchIndependence, check_batch_independence
from bnfold.parity.inputs import Batch, StreamedBatches, random_inputs, read_batches, run_batches
from bnfold.parity.noise import storage_noise64
from bnfold.parity.tolerance import Tolerance, rounding_depth
from bnfold.report import json_safe

__all__ = ["Divergence", "StageParity", "StageReport", "StageTracker", "track_stages"]

log = logging.getLogger(__name__)


@dataclass
class StageParity:
    """One stage. ``vs_previous``/``vs_baseline``/``vs_original`` are ``None`` where not applicable (the first
    stage; a baseline equal to the previous stage; an original equal to the baseline)."""

    name: str
    previous: str | None = None
    baseline: str | None = None
    expected_change: bool = False
    vs_previous: ParityReport | None = None
    vs_baseline: ParityReport | None = None
    vs_original: ParityReport | None = None
    batch_independence: BatchIndependence | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def passed(self) -> bool:
        if self.error is not None:
            return False
        if self.vs_previous is not None and not self.expected_change and not self.vs_previous.passed:
            return False
        if self.vs_baseline is not None and not self.vs_baseline.passed:
            return False
        return self.batch_independence is None or self.batch_independence.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "passed": self.passed, "previous": self.previous, "baseline": self.baseline,
            "expected_change": self.expected_change, "seconds": self.seconds, "error": self.error,
            "vs_previous": None if self.vs_previous is None else self.vs_previous.to_dict(),
            "vs_baseline": None if self.vs_baseline is None else self.vs_baseline.to_dict(),
            "vs_original": None if self.vs_original is None else self.vs_original.to_dict(),
            "batch_independence": None if self.batch_independence is None else asdict(self.batch_independence),
        }


@dataclass
class Divergence:
    """Where things first go wrong: ``stage``, the stage it was compared ``against``, and ``kind``:
    ``"error"`` (it did not run), ``"previous"`` (this step changed the outputs), ``"batch"`` (its outputs
    depend on the batch) or ``"baseline"`` (each step passed, but the stage drifted out of bounds)."""

    stage: str
    against: str | None
    kind: str
    reason: str
    node: str | None = None


@dataclass
class StageReport:
    stages: list[StageParity] = field(default_factory=list)
    inputs: str = "user"
    batches: int = 0
    samples: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.stages) and all(s.passed for s in self.stages)

    @property
    def first_divergence(self) -> Divergence | None:
        for s in self.stages:
            if s.error is not None:
                return Divergence(s.name, s.previous, "error", s.error)
            if s.vs_previous is not None and not s.expected_change and not s.vs_previous.passed:
                return Divergence(s.name, s.previous, "previous", _reason(s.vs_previous), _node(s.vs_previous))
            if s.batch_independence is not None and not s.batch_independence.passed:
                return Divergence(s.name, None, "batch", s.batch_independence.note)
            if s.vs_baseline is not None and not s.vs_baseline.passed:
                return Divergence(s.name, s.baseline, "baseline", _reason(s.vs_baseline), _node(s.vs_baseline))
        return None

    def to_dict(self) -> dict[str, Any]:
        div = self.first_divergence
        return json_safe({
            "passed": self.passed, "inputs": self.inputs, "batches": self.batches, "samples": self.samples,
            "notes": list(self.notes), "first_divergence": None if div is None else asdict(div),
            "stages": [s.to_dict() for s in self.stages],
        })

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        from bnfold.report import format_table

        rows: list[list[Any]] = []
        for s in self.stages:
            if s.error is not None:
                rows.append([s.name, s.previous or "-", "ERROR", s.error, "", "", "", f"{s.seconds:.2f}s"])
                continue
            if s.vs_previous is None:
                rows.append([s.name, "-", "reference", "", "", "", "", f"{s.seconds:.2f}s"])
            comparisons = [(s.previous, s.vs_previous, "changed (expected)" if s.expected_change else None),
                           (s.baseline, s.vs_baseline, None), ("original (info)", s.vs_original, "info")]
            first = True
            for against, rep, label in comparisons:
                if rep is None:
                    continue
                verdict = label if label and label != "info" else ("PASS" if rep.passed else "FAIL")
                if label == "info":
                    verdict = "PASS" if rep.passed else "differs"
                w = rep.worst
                rows.append([s.name if first else "", against,
                             verdict, "-" if w is None else f"{w.max_abs:.3g}",
                             "-" if w is None else f"{w.cosine:.9f}",
                             "-" if w is None else ("inf" if w.sqnr_db == math.inf else f"{w.sqnr_db:.1f}"),
                             "-" if w is None or w.top1_agreement is None else f"{100 * w.top1_agreement:.1f}%",
                             f"{s.seconds:.2f}s" if first else ""])
                first = False
        source = "your data" if self.inputs == "user" else "RANDOM inputs"
        lines = [f"stages {'PASS' if self.passed else 'FAIL'}: {self.samples} samples of {source} "
                 f"({self.batches} batch{'es' if self.batches != 1 else ''})", "",
                 format_table(["stage", "vs", "verdict", "max abs", "cosine", "SQNR dB", "top-1", "time"], rows)]
        for s in self.stages:
            bi = s.batch_independence
            if bi is not None and bi.checked and not bi.passed:
                lines.append(f"{s.name}: batch independence FAIL — {bi.note}")
        div = self.first_divergence
        if div is not None:
            against = f" (vs '{div.against}')" if div.against else ""
            lines += ["", f"divergence starts at stage '{div.stage}'{against}: {div.reason}"]
            stage = next(s for s in self.stages if s.name == div.stage)
            loc = next((r.localization for r in (stage.vs_previous, stage.vs_baseline)
                        if r is not None and r.localization is not None), None)
            if loc is not None:
                lines.append(loc.render())
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _reason(rep: ParityReport) -> str:
    bad = [f"output {o.index}: {o.reason}" for o in rep.outputs if not o.passed]
    return "; ".join(rep.errors + bad) or "failed"


def _node(rep: ParityReport) -> str | None:
    return None if rep.localization is None else rep.localization.node


@dataclass
class _Kept:
    name: str
    model: Callable[..., Any]
    outputs: list[list[torch.Tensor]]
    outputs64: list[list[torch.Tensor]] | None = None
    noise64: list[list[list[torch.Tensor]]] = field(default_factory=list)

    def run64(self, batches: Iterable[Batch]) -> str:
        """Run the float64 reference of this stage; return the note when there is none."""
        self.outputs64, note = run_reference64(self.model, None, batches)
        return note

    def storage_noise(self, batches: Iterable[Batch]) -> list[list[list[torch.Tensor]]]:
        """The storage noise of this stage's model (measured once, when a verdict first needs it)."""
        if not self.noise64:
            self.noise64 = storage_noise64(self.model, batches)
        return self.noise64


class StageTracker:
    """Add stages one at a time (``tracker.add("folded", gm)``), read :meth:`report` at any point.

    ``inputs``: the user's batches (see :func:`bnfold.parity.as_batches`); a source that can be iterated again (a
    ``DataLoader``, a :mod:`bnfold.io.stream` source) is re-read for every run instead of being kept in memory
    (each stage's outputs are kept). Only when ``None``, random batches shaped like
    ``example_inputs``/``input_shapes``, and the report says so.
    """

    def __init__(self, inputs: Any = None, *, example_inputs: Sequence[torch.Tensor] | None = None,
                 input_shapes: Sequence[Sequence[int]] | None = None, tolerance: Tolerance | None = None,
                 localize: bool = True, batch_independence: bool = True, seed: int = 0) -> None:
        self.batches: list[Batch] | StreamedBatches
        if inputs is None:
            self.batches = random_inputs(example_inputs, input_shapes, seed=seed)
            source = "random"
        else:
            self.batches, source = read_batches(inputs), "user"  # a re-iterable source is re-read, never listed
        self.tolerance = tolerance
        self.localize = localize
        self.batch_independence = batch_independence
        streamed = isinstance(self.batches, StreamedBatches)
        samples = 0 if streamed else sum(int(b[0].shape[0]) for b in self.batches if b and b[0].dim() > 0)
        self._report = StageReport(inputs=source, batches=0 if streamed else len(self.batches), samples=samples)
        if source == "random":
            self._report.notes.append("no inputs were given: stages compared on random inputs")
        self._original: _Kept | None = None
        self._baseline: _Kept | None = None
        self._previous: _Kept | None = None

    def report(self) -> StageReport:
        return self._report

    def add(self, name: str, model: Callable[..., Any], *, expected_change: bool = False) -> StageParity:
        """Run stage ``name`` and judge it (module docstring). ``expected_change``: this stage changes the model
        on purpose (recalibration); it becomes the baseline for later stages."""
        if any(s.name == name for s in self._report.stages):
            raise ValueError(f"stage {name!r} was already added")
        stage = StageParity(name, expected_change=expected_change)
        self._report.stages.append(stage)
        start = time.perf_counter()
        try:
            outputs = run_batches(model, self.batches)
        except DataError:  # the data, not this stage: the same for every stage
            raise
        except Exception as exc:
            log.debug("stage %s failed to run", name, exc_info=True)
            stage.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            stage.seconds = time.perf_counter() - start
            stage.previous = None if self._previous is None else self._previous.name
            return stage
        stage.seconds = time.perf_counter() - start
        if isinstance(self.batches, StreamedBatches):  # counted by the pass that just ran
            self._report.batches, self._report.samples = len(self.batches), self.batches.samples
        kept = _Kept(name, model, outputs)
        if self._original is None:
            note = kept.run64(self.batches)
            if note:
                self._report.notes.append(f"{name}: {note}")
            stage.baseline = name
            self._original = self._baseline = self._previous = kept
            return stage
        prev, base, orig = self._previous, self._baseline, self._original
        assert prev is not None and base is not None
        stage.previous, stage.baseline = prev.name, base.name
        stage.vs_previous = self._judge(prev, kept, base, localize=not expected_change)
        if base is not prev and not expected_change:
            stage.vs_baseline = self._judge(base, kept, base)
        if orig is not base:
            stage.vs_original = self._judge(orig, kept, orig, localize=False)
        if self.batch_independence:
            stage.batch_independence = check_batch_independence(model, self.batches, reference=base.model,
                                                                tolerance=self.tolerance)
        if expected_change:
            stage.baseline = name
            note = kept.run64(self.batches)
            if note:
                self._report.notes.append(f"{name}: {note}")
            self._baseline = kept
        self._previous = kept
        return stage

    def _judge(self, ref: _Kept, cand: _Kept, truth: _Kept, *, localize: bool = True) -> ParityReport:
        """``cand`` vs ``ref``, measured against ``truth``'s float64 outputs (the baseline's or the original's)."""
        report, ratios = judge(ref.outputs, cand.outputs, truth.outputs64, tolerance=self.tolerance,
                               depth=rounding_depth(ref.model),
                               storage_noise=lambda: truth.storage_noise(self.batches))
        report.inputs = self._report.inputs
        failed = not report.errors and not all(o.passed for o in report.outputs)
        if localize and self.localize and failed and isinstance(cand.model, torch.fx.GraphModule) \
                and isinstance(ref.model, torch.nn.Module):
            from bnfold.parity.localize import localize as localize_node

            k = max(range(len(ratios)), key=lambda i: ratios[i])
            try:
                report.localization = localize_node(ref.model, cand.model, self.batches[k], tolerance=self.tolerance)
            except Exception as exc:
                log.debug("localization failed", exc_info=True)
                report.notes.append(f"localization failed: {type(exc).__name__}: {exc}")
        return report


def track_stages(stages: Mapping[str, Callable[..., Any]] | Iterable[tuple[str, Callable[..., Any]]],
                 inputs: Any = None, *, expected_change: Iterable[str] = (), **options: Any) -> StageReport:
    """Track ``stages`` (in order; the first is the original) on ``inputs``; ``expected_change`` names the stages
    that change the model on purpose (e.g. ``{"recalibrated"}``). ``options`` go to :class:`StageTracker`."""
    tracker = StageTracker(inputs, **options)
    changed = set(expected_change)
    items = stages.items() if isinstance(stages, Mapping) else stages
    for name, model in items:
        tracker.add(name, model, expected_change=name in changed)
    return tracker.report()
