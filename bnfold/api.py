"""The public Python API: :func:`fold` and :func:`inspect`."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import IO

import torch
import torch.fx
from torch import nn

from bnfold.capture import Captured, CaptureMode
from bnfold.capture import capture as _capture  # the fold() parameter `capture` shadows the name
from bnfold.errors import InputError
from bnfold.ir.ops import materialize_affines
from bnfold.parity import compare
from bnfold.passes import (
    Category,
    Change,
    DumpIR,
    Instrument,
    PassContext,
    PipelineResult,
    Rejection,
    Until,
    default_pipeline,
)
from bnfold.report import FoldedEntry, FoldReport, SkippedEntry

__all__ = ["FoldResult", "fold", "fold_captured", "inspect"]


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
    dump_ir: IO[str] | None = None,
    instruments: Sequence[Instrument] = (),
    reparameterize: bool = False,
) -> FoldResult:
    """Capture ``model``, fold every normalization that can be folded exactly, and report.

    The caller's model is never modified. ``until`` stops after the named pass (debugging); ``dump_ir`` receives
    the graph before and after every pass that changed it; ``check`` runs parity (original vs folded, and both
    vs a float64 copy of the original) on ``example_inputs``.

    ``reparameterize`` merges parallel branches that are linear in the same input and summed (RepVGG, MobileOne,
    FastViT: a kxk conv+BN, a 1x1 conv+BN and an identity BN) into one conv, exactly. It is off by default here
    because it changes which modules the folded graph has — without it, every conv/linear of the model is still
    there under its own path, only the normalizations are gone, which per-module tooling (quantization configs,
    hooks, state-dict mappings) relies on. The report still lists what it would merge (the identity branches'
    BatchNorms, with a reason naming this option). :func:`bnfold.optimize`, which produces deployment artifacts,
    turns it on by default.
    """
    inputs = _as_inputs(example_inputs)
    _check_until(until)  # before the capture: a typo costs nothing
    result = fold_captured(_capture(model, inputs, capture), until=until, dump_ir=dump_ir, instruments=instruments,
                           reparameterize=reparameterize)
    if check:
        try:
            parity = compare(_reference(model), result.module, inputs)
        except InputError as err:  # the original ran on these inputs when it was captured: this is ours
            raise RuntimeError(f"the folded module failed where the original ran: {err.message}") from None
        result.report.parity = parity.summary()
    return result


def _check_until(until: str | None) -> None:
    names = default_pipeline([]).names
    if until is not None and until not in names:
        raise InputError(f"until={until!r} names no pass", hint=f"passes are: {', '.join(names)}")


def fold_captured(
    captured: Captured,
    *,
    until: str | None = None,
    dump_ir: IO[str] | None = None,
    instruments: Sequence[Instrument] = (),
    reparameterize: bool = False,
) -> FoldResult:
    """Run the fold pipeline on a graph from :func:`bnfold.capture.capture` (rewritten in place) and report.

    Shapes recorded at capture stay valid: every rewrite updates ``node.meta`` locally.
    """
    gm = captured.module
    extra = list(instruments)
    if dump_ir is not None:
        extra.append(DumpIR(dump_ir))
    pipeline = default_pipeline(extra, reparameterize=reparameterize)
    ctx = PassContext(gm, owns_state=captured.owns_state)
    if until is not None:
        _check_until(until)
        pipeline.instruments.append(Until(until))
    run = pipeline.run(gm, ctx)
    materialize_affines(gm)  # only when the pipeline stopped early do channel_affines remain
    gm.recompile()
    return FoldResult(gm, build_report(captured.mode, run))


def inspect(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    capture: CaptureMode = "auto",
    reparameterize: bool = False,
) -> FoldReport:
    """Dry run: what :func:`fold` would fold and why it would leave the rest (the model is untouched)."""
    report = fold(model, example_inputs, capture=capture, check=False, reparameterize=reparameterize).report
    report.dry_run = True
    return report


def _reference(model: nn.Module) -> nn.Module:
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()
    return copy.deepcopy(model)


def build_report(mode: str, run: PipelineResult) -> FoldReport:
    """One entry per candidate: folded when a FOLD change consumed it and no LOWER change kept it as an op;
    otherwise skipped with every current rejection naming it (dictionaries: linear in changes + rejections)."""
    report = FoldReport(capture=mode, rounds=run.rounds)
    report.changes = [_change_dict(c) for c in run.changes]
    report.passes = [asdict(t) for t in run.timings]
    folded_by: dict[str, Change] = {}
    lowered: dict[str, Change] = {}
    for c in run.changes:
        for s in c.sources:
            if c.category is Category.FOLD:
                folded_by[s] = c
            elif c.category is Category.LOWER:
                lowered[s] = c
    reasons: dict[str, list[Rejection]] = {}
    for r in run.rejections:
        for s in r.sources:
            reasons.setdefault(s, []).append(r)
    for cand in run.candidates:
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


def _change_dict(c: Change) -> dict[str, object]:
    return {"rule": c.rule, "node": c.node, "detail": c.detail, "category": str(c.category),
            "sources": list(c.sources), "into": c.into}
