"""The public Python API: :func:`fold` and :func:`inspect`."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.fx
from torch import nn

from bnfold.capture import CaptureMode
from bnfold.capture import capture as _capture  # the fold() parameter `capture` shadows the name
from bnfold.errors import InputError
from bnfold.graph import propagate_shapes
from bnfold.parity import compare
from bnfold.passes import Candidate, Pipeline, finalize_passes, fold_passes
from bnfold.passes.base import Change, PipelineResult, Rejection
from bnfold.report import FoldedEntry, FoldReport, SkippedEntry

__all__ = ["FoldResult", "fold", "inspect"]


@dataclass
class FoldResult:
    """``module``: the folded GraphModule (eval mode); ``report``: what was folded, what was not and why."""

    module: torch.fx.GraphModule
    report: FoldReport

    def __iter__(self):  # allows ``module, report = bnfold.fold(...)``
        return iter((self.module, self.report))


def _as_inputs(example_inputs: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def fold(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    capture: CaptureMode = "auto",
    until: str | None = None,
    check: bool = True,
) -> FoldResult:
    """Capture ``model``, fold every normalization that can be folded exactly, and report.

    The caller's model is never modified. ``until`` stops after the named pass (debugging);
    ``check`` runs parity (original vs folded, and both vs a float64 copy of the original) on
    ``example_inputs``.
    """
    inputs = _as_inputs(example_inputs)
    captured = _capture(model, inputs, capture)
    gm = captured.module
    passes = fold_passes()
    main = Pipeline(passes, after_modify=lambda g: propagate_shapes(g, inputs), until=until).run(gm)
    final = None
    if until is None:
        final = Pipeline(finalize_passes(), max_rounds=1).run(gm)
        gm.graph.lint()
        gm.recompile()
    report = _build_report(captured.mode, _candidates(passes), main, final)
    if check:
        try:
            parity = compare(_reference(model), gm, inputs)
        except InputError as err:  # the original ran on these inputs when it was captured: this is ours
            raise RuntimeError(f"the folded module failed where the original ran: {err.message}") from None
        report.parity = parity.summary()
    return FoldResult(gm, report)


def inspect(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    capture: CaptureMode = "auto",
) -> FoldReport:
    """Dry run: what :func:`fold` would fold and why it would leave the rest (the model is untouched)."""
    report = fold(model, example_inputs, capture=capture, check=False).report
    report.dry_run = True
    return report


def _reference(model: nn.Module) -> nn.Module:
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()
    return copy.deepcopy(model)


def _candidates(passes: list) -> list[Candidate]:
    """Every candidate any pass registered, in discovery order."""
    found: dict[str, Candidate] = {}
    for p in passes:
        for cid, cand in getattr(p, "candidates", {}).items():
            found.setdefault(cid, cand)
    return list(found.values())


def _build_report(mode: str, candidates: list[Candidate], main: PipelineResult,
                  final: PipelineResult | None) -> FoldReport:
    report = FoldReport(capture=mode, rounds=main.rounds)
    changes: list[Change] = list(main.changes) + (list(final.changes) if final else [])
    report.changes = [asdict(c) for c in changes]
    report.passes = [asdict(t) for t in main.timings + (final.timings if final else [])]
    folded_by: dict[str, Change] = {}
    lowered: dict[str, Change] = {}
    for c in changes:
        for s in c.sources:
            if c.rule in ("fold_into_producer", "fold_into_consumer"):
                folded_by[s] = c
            elif c.rule == "lower_affines":
                lowered[s] = c
    reasons: dict[str, list[Rejection]] = {}
    for r in main.rejections:
        for s in r.sources:
            reasons.setdefault(s, []).append(r)
    for cand in candidates:
        if cand.id in folded_by and cand.id not in lowered:
            c = folded_by[cand.id]
            report.folded.append(FoldedEntry(cand.id, cand.kind, cand.path, c.rule, c.into or "", c.detail))
            continue
        rejs = reasons.get(cand.id, [])
        if rejs:
            reason = "; ".join(f"{r.rule}: {r.reason}" if r.rule != "canonicalize" else r.reason for r in rejs)
            rule = rejs[0].rule
        else:
            reason, rule = "no fold rule applied", "-"
        if cand.id in lowered:
            reason += "; " + lowered[cand.id].detail.removeprefix("left unfolded; ")
        report.skipped.append(SkippedEntry(cand.id, cand.kind, cand.path, rule, reason))
    return report
