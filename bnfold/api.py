"""The public Python API: :func:`fold` and :func:`inspect`."""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import torch
import torch.fx
from torch import nn

from bnfold import dynamic
from bnfold.capture import Captured, CaptureMode
from bnfold.capture import capture as _capture  # the fold() parameter `capture` shadows the name
from bnfold.errors import CaptureError, InputError
from bnfold.ir.graph import compiled, module_path
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
    check_until,
    default_pipeline,
)
from bnfold.report import FoldedEntry, FoldReport, SkippedEntry

__all__ = ["FoldResult", "fold", "fold_captured", "inspect"]


@dataclass
class FoldResult:
    """``module``: the folded GraphModule (eval mode); ``report``: what was folded, what was not and why;
    ``dynamic_shapes``: the dynamic dimensions to export ``module`` with (``torch.export``'s format; ``None``:
    static), as given to :func:`fold` or read from the exported program that was folded."""

    module: torch.fx.GraphModule
    report: FoldReport
    dynamic_shapes: dynamic.DynamicShapes | None = None

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
    dynamic_shapes: object = None,
    until: str | None = None,
    check: bool = True,
    dump_ir: IO[str] | str | os.PathLike[str] | None = None,
    instruments: Sequence[Instrument] = (),
    reparameterize: bool = False,
) -> FoldResult:
    """Capture ``model``, fold every normalization that can be folded exactly, and report.

    The caller's model is never modified. ``until`` stops after the named pass (debugging); ``dump_ir`` receives
    the graph before and after every pass that changed it (a stream, or a folder that gets one file per such pass;
    with ``capture="auto"``, one sub-folder per capture); ``check`` runs parity (original vs folded, and both
    vs a float64 copy of the original) on ``example_inputs``.

    ``capture="auto"`` folds with symbolic capture, and then with export too unless symbolic capture left nothing
    to gain (every candidate folded, or none found, and no normalization hidden inside a module symbolic tracing
    keeps whole); of two folds it keeps the one that folds more candidates (then: leaves fewer; a tie goes to
    symbolic tracing, which keeps the user's module structure), so it never folds fewer than the better of the
    two. The report says which captures ran and why this one was kept (``report.capture_choice``,
    ``report.capture_alternatives``). When both run, the cost is a symbolic fold plus an export fold (export
    dominates). An ExportedProgram (or its ``.module()``, e.g. a loaded ``.pt2``) is already an export graph: it
    is re-exported only.

    ``dynamic_shapes``: the dynamic dimensions, in ``torch.export``'s format (e.g. ``({0: Dim("batch")},)``);
    the export capture uses them, and :attr:`FoldResult.dynamic_shapes` carries them to whoever exports the
    folded module (``bnfold fold``'s ``.pt2``, ``bnfold optimize``'s ONNX and TVM builds). Default: static, or
    the exported program's own dims when ``model`` is one.

    ``reparameterize`` merges parallel branches that are linear in the same input and summed (RepVGG, MobileOne,
    FastViT: a kxk conv+BN, a 1x1 conv+BN and an identity BN) into one conv, exactly. It is off by default here
    because it changes which modules the folded graph has — without it, every conv/linear of the model is still
    there under its own path, only the normalizations are gone, which per-module tooling (quantization configs,
    hooks, state-dict mappings) relies on. The report still lists what it would merge (the identity branches'
    BatchNorms, with a reason naming this option). :func:`bnfold.optimize`, which produces deployment artifacts,
    turns it on by default.
    """
    start = time.perf_counter()
    inputs = _as_inputs(example_inputs)
    check_until(until)  # before the capture: a typo costs nothing
    if capture == "auto" and not dynamic.is_exported(model):
        result = _fold_auto(model, inputs, dynamic_shapes, until, dump_ir, instruments, reparameterize)
    else:
        with _collector_paused(capture == "symbolic"):
            captured = _capture(model, inputs, capture, dynamic_shapes=dynamic_shapes)
            captured_at = time.perf_counter()
            result = fold_captured(captured, until=until, dump_ir=dump_ir, instruments=instruments,
                                   reparameterize=reparameterize)
        result.report.timings["capture"] = captured_at - start
        if capture == "auto":
            result.report.capture_choice = "the model is an exported program: re-exported (module paths and " \
                                           "dynamic dims kept)"
    if check:
        checked_from = time.perf_counter()
        result.report.parity = _check(model, result.module, inputs)
        result.report.timings["check"] = time.perf_counter() - checked_from
    result.report.timings["total"] = time.perf_counter() - start
    return result


@contextlib.contextmanager
def _collector_paused(pause: bool) -> Iterator[None]:
    """Python's cyclic garbage collector paused for the block (when ``pause`` and it is enabled; re-enabled after).

    A symbolic capture and the passes create many long-lived objects (modules, graph nodes, metadata) and next
    to no cyclic garbage (what they drop is freed by reference counting); CPython's full collections, each a
    walk over every live object, then cost a time that grows with the square of the graph: a third of the call
    at 10,000 nodes (issue 25). ``torch.export``, which leaves cyclic garbage behind, runs with the collector on.
    Another thread's call meanwhile runs with it paused too."""
    if not pause or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _check(model: nn.Module, folded: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> dict[str, object]:
    """The parity summary of ``folded`` against ``model`` on the example inputs (:func:`bnfold.compare` with
    ``run_reference="when_needed"``): one forward of the folded module and one of a float64 copy of the model;
    a float32 copy of the model runs too only when the folded module's error is not within the float64 rule's
    floor (then its own error decides the bound). The caller's model is never run. No batch independence check:
    the folded module depends on the rest of its batch only where the model itself does (a BatchNorm in training
    mode is left as it is), which the comparison with the float64 outputs shows; it would cost two more
    forwards."""
    reference = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    try:
        parity = compare(reference, folded, inputs, batch_independence=False, run_reference="when_needed")
    except InputError as err:  # the original ran on these inputs when it was captured: this is ours
        raise RuntimeError(f"the folded module failed where the original ran: {err.message}") from err
    return parity.summary()


def _score(report: FoldReport) -> tuple[int, int]:
    return len(report.folded), -len(report.skipped)


def _fold_auto(model: nn.Module, inputs: tuple[torch.Tensor, ...], dynamic_shapes: object, until: str | None,
               dump_ir: IO[str] | str | os.PathLike[str] | None, instruments: Sequence[Instrument],
               reparameterize: bool) -> FoldResult:
    """Fold with symbolic capture; then with export too, unless symbolic capture left nothing to gain
    (:func:`_nothing_to_gain`); keep the better fold (see :func:`fold`)."""
    results: dict[str, tuple[FoldResult, float]] = {}
    errors: dict[str, str] = {}
    failure: CaptureError | None = None
    complete: str | None = None
    for mode in ("symbolic", "export"):
        start = time.perf_counter()
        with _collector_paused(mode == "symbolic"):
            try:
                captured = _capture(model, inputs, mode, dynamic_shapes=dynamic_shapes)  # type: ignore[arg-type]
            except CaptureError as err:
                errors[mode] = err.message
                failure = err
                continue
            captured_at = time.perf_counter()
            dump: IO[str] | str | os.PathLike[str] | None = dump_ir
            if dump_ir is not None and hasattr(dump_ir, "write"):
                dump_ir.write(f"### capture: {mode}\n")
            elif dump_ir is not None:
                dump = Path(os.fspath(dump_ir)) / mode
                dump.mkdir(exist_ok=True)
            folded = fold_captured(captured, until=until, dump_ir=dump, instruments=instruments,
                                   reparameterize=reparameterize)
        folded.report.timings["capture"] = captured_at - start
        results[mode] = (folded, time.perf_counter() - start)
        if mode == "symbolic" and until is None:
            complete = _nothing_to_gain(folded)
            if complete is not None:
                break
    if not results:
        raise CaptureError(f"could not capture {type(model).__name__} as a graph "
                           f"({'; '.join(f'{m}: {e}' for m, e in errors.items())})",
                           hint="check the example inputs' shapes and dtypes") from failure
    best = max(results, key=lambda m: (_score(results[m][0].report), m == "symbolic"))
    chosen = results[best][0]
    other = "export" if best == "symbolic" else "symbolic"
    rep = chosen.report
    alternatives: dict[str, dict[str, object]] = {}
    for mode, (r, seconds) in results.items():
        alternatives[mode] = {"folded": len(r.report.folded), "left": len(r.report.skipped),
                              "seconds": round(seconds, 3)}
    for mode, message in errors.items():
        alternatives[mode] = {"error": message}
    rep.capture_alternatives = alternatives
    if complete is not None:
        rep.capture_choice = f"{complete}: nothing left for export to gain, so it was not run"
    elif other in errors:
        rep.capture_choice = f"{other} capture failed"
    else:
        mine, theirs = results[best][0].report, results[other][0].report
        if _score(mine) == _score(theirs):
            rep.capture_choice = (f"both captures fold {len(mine.folded)} and leave {len(mine.skipped)}; symbolic "
                                  "keeps the model's modules")
        elif len(mine.folded) != len(theirs.folded):
            rep.capture_choice = f"it folds {len(mine.folded)}, {other} folds {len(theirs.folded)}"
        else:
            rep.capture_choice = f"it leaves {len(mine.skipped)}, {other} leaves {len(theirs.skipped)}"
    return chosen


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
          nn.RMSNorm)


def _nothing_to_gain(result: FoldResult) -> str | None:
    """Why export capture cannot fold more than this symbolic fold, or None when it might.

    Export sees the same model through the same example inputs, so it can fold more only where symbolic capture
    left a candidate or did not see one: every candidate folded, or none found — and no normalization hidden in
    a module symbolic tracing keeps whole (``nn.TransformerEncoderLayer``'s LayerNorms, which export traces
    into) — leaves it nothing. ``tests/zoo_timm.py``'s models fold the same set in both captures."""
    report = result.report
    if report.skipped:
        return None
    gm = result.module
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(str(node.target))
            if any(isinstance(sub, _NORMS) or "Norm" in type(sub).__name__ for sub in m.modules() if sub is not m):
                return None
    if report.folded:
        return f"symbolic capture folds every candidate ({len(report.folded)})"
    return "symbolic capture finds no normalization to fold"


def fold_captured(
    captured: Captured,
    *,
    until: str | None = None,
    dump_ir: IO[str] | str | os.PathLike[str] | None = None,
    instruments: Sequence[Instrument] = (),
    reparameterize: bool = False,
) -> FoldResult:
    """Run the fold pipeline on a graph from :func:`bnfold.capture.capture` (rewritten in place) and report.

    Shapes recorded at capture stay valid: every rewrite updates ``node.meta`` locally.
    """
    start = time.perf_counter()
    gm = captured.module
    extra = list(instruments)
    if dump_ir is not None:
        extra.append(DumpIR(dump_ir) if hasattr(dump_ir, "write") else DumpIR(folder=os.fspath(dump_ir)))
    pipeline = default_pipeline(extra, reparameterize=reparameterize)
    ctx = PassContext(gm, owns_state=captured.owns_state)
    if until is not None:
        check_until(until)
        pipeline.instruments.append(Until(until))
    run = pipeline.run(gm, ctx)
    materialize_affines(gm)  # only when the pipeline stopped early do channel_affines remain
    gm = compiled(gm)
    report = build_report(captured.mode, run, gm)
    report.dynamic_shapes = dynamic.describe(captured.dynamic_shapes)
    report.timings["fold"] = time.perf_counter() - start
    return FoldResult(gm, report, captured.dynamic_shapes)


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


def build_report(mode: str, run: PipelineResult, gm: torch.fx.GraphModule | None = None) -> FoldReport:
    """One entry per candidate: folded when a FOLD change consumed it and no LOWER change kept it as an op;
    otherwise skipped with every current rejection naming it (dictionaries: linear in changes + rejections).

    A candidate folded into several ops (a norm feeding q, k and v) names every one of them in ``into``; one moved
    on by a later rule (a branch BN merged by ``reparameterize``) names where it ended up. With
    ``gm`` (the folded graph), an op named by its node (an export capture's functional linear) is named by the
    module path it came from (``blocks.0.attn.qkv``) instead."""
    report = FoldReport(capture=mode, rounds=run.rounds, converged=run.converged, stopped_after=run.stopped_after)
    report.changes = [_change_dict(c) for c in run.changes]
    report.passes = [asdict(t) for t in run.timings]
    paths = _node_paths(gm)
    folded_by: dict[str, list[Change]] = {}
    lowered: dict[str, Change] = {}
    for c in run.changes:
        for s in c.sources:
            if c.category is Category.FOLD:
                folded_by.setdefault(s, []).append(c)
            elif c.category is Category.LOWER:
                lowered[s] = c
    reasons: dict[str, list[Rejection]] = {}
    for r in run.rejections:
        for s in r.sources:
            reasons.setdefault(s, []).append(r)
    for cand in run.candidates:
        if cand.id in folded_by and cand.id not in lowered:
            # where it ended up: the changes of the last rule that moved it (a BN folded into a conv that a later
            # rule merged into another conv is in the merged one; a norm folded into q, k and v by one rule: all)
            cs = [c for c in folded_by[cand.id] if c.rule == folded_by[cand.id][-1].rule]
            into = _unique(paths.get(c.into, c.into) for c in cs if c.into)
            detail = _unique(c.detail for c in cs)
            report.folded.append(FoldedEntry(cand.id, cand.kind, cand.path, cs[0].rule, ", ".join(into),
                                             "; ".join(detail)))
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


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _node_paths(gm: torch.fx.GraphModule | None) -> dict[str, str]:
    """Node name → module path, for the functional nodes whose metadata records one (export captures)."""
    if gm is None:
        return {}
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.meta.get("nn_module_stack"):
            path = module_path(n)
            if path != n.name:
                out[n.name] = path
    return out


def _change_dict(c: Change) -> dict[str, object]:
    return {"rule": c.rule, "node": c.node, "detail": c.detail, "category": str(c.category),
            "sources": list(c.sources), "into": c.into}
