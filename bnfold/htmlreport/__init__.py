"""``report.html``: the report as a page a person can look at, beside ``report.json`` (its machine-readable twin).

One self-contained file — inline CSS and inline SVG charts drawn in Python, no script, no network (a
Content-Security-Policy forbids any load) — with every string from the model escaped:

* :func:`optimize_page` — ``bnfold optimize``: verdict, artifacts, fold (folded and left, with reasons), drift per
  BatchNorm layer before and after recalibration, parity per stage (SQNR, max error, top-1), latency of every
  artifact, the TVM kernels;
* :func:`drift_page` — ``bnfold diagnose --html FILE``;
* :func:`parity_page` — ``bnfold check --html FILE``;
* :func:`onnx_optimize_page` — ``bnfold optimize MODEL.onnx`` (the ONNX fold and its TVM build);
* :func:`write_page` — written atomically (:func:`bnfold.io.outputs.write_bytes_atomic`), never over an input.

Modules: :mod:`~bnfold.htmlreport.svg` (the chart), :mod:`~bnfold.htmlreport.page` (document, escaping),
:mod:`~bnfold.htmlreport.sections` (one function per report object).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from bnfold.htmlreport.page import document, esc, is_bnfold_html, section, table, verdict
from bnfold.htmlreport.sections import (
    drift_section,
    fold_section,
    kernels_section,
    latency_section,
    list_block,
    pair_section,
    stages_section,
)

if TYPE_CHECKING:
    from pathlib import Path

    from bnfold.deploy.result import OptimizeResult
    from bnfold.io.outputs import Protected
    from bnfold.parity.core import ParityReport
    from bnfold.recalibration.drift import DriftReport
    from bnfold.report import FoldReport

__all__ = ["drift_page", "is_bnfold_html", "onnx_optimize_page", "optimize_page", "parity_page", "write_page"]


def optimize_page(result: OptimizeResult) -> str:
    """The page of one ``bnfold optimize`` run."""
    from bnfold.speed import fastest

    summary = [f"<p>{verdict(result.passed)} output folder <code>{esc(result.out_dir)}</code></p>",
               _glance(result),
               table(["artifact", "file"], list(result.artifacts.items())),
               list_block([f"{k}: {v}" for k, v in result.errors.items()], cls="err", prefix="error in "),
               list_block(result.warnings, cls="warn", prefix="warning: "),
               '<p class="note">time: ' + esc(", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()))
               + "</p>"]
    parts = [section("Summary", "".join(summary), anchor="summary")]
    if result.fold is not None:
        parts.append(fold_section(result.fold))
    if "before" in result.drift:
        parts.append(drift_section(result.drift["before"], result.drift.get("after"),
                                   where=" of the validation data"))
    elif result.recalibration is not None:
        parts.append(section("Recalibration", f"<pre>{esc(result.recalibration)}</pre>", anchor="drift"))
    if result.stages is not None:
        parts.append(stages_section(result.stages, result.int8))
    if result.latency_ms:
        parts.append(latency_section(result.latency_ms, fastest(result.latency_ms)))
    if result.tvm_kernels:
        parts.append(kernels_section(result.tvm_kernels))
    return document("bnfold optimize", f"{'PASS' if result.passed else 'FAIL'} · {esc(result.out_dir)}", parts)


def _glance(result: OptimizeResult) -> str:
    """The key figures in one line: folded/left, drift before → after, first divergence, fastest artifact."""
    from bnfold.speed import fastest

    facts = []
    if result.fold is not None:
        facts.append(f"{len(result.fold.folded)} folded, {len(result.fold.skipped)} left")
    before, after = result.drift.get("before"), result.drift.get("after")
    if before is not None and after is not None and before.worst is not None and after.worst is not None:
        facts.append(f"worst drift {before.worst.score:.3g} → {after.worst.score:.3g} after recalibration")
    if result.stages is not None:
        div = result.stages.first_divergence
        facts.append("every stage keeps parity" if div is None else f"divergence starts at {div.stage}")
    if result.latency_ms:
        facts.append(f"fastest: {fastest(result.latency_ms)}")
    return "<p><b>" + esc(" · ".join(facts)) + "</b></p>" if facts else ""


def onnx_optimize_page(model: str, fold: FoldReport, tvm: Mapping[str, Any] | None, passed: bool) -> str:
    """The page of ``bnfold optimize MODEL.onnx``: the ONNX fold (parity with ONNX Runtime) and the TVM build."""
    checks = [("folded vs original (ONNX Runtime)", fold.parity)]
    if tvm is not None:
        checks.append(("tvm vs folded", tvm.get("parity_vs_folded")))
    rows = [[name, "PASS" if p.get("passed") else "FAIL", f"{p.get('max_abs', float('nan')):.3g}",
             str(p.get("sqnr_db", "-")),
             "-" if p.get("top1_agreement") is None else f"{100 * p['top1_agreement']:.1f}%"]
            for name, p in checks if p]
    body = (f"<p>{verdict(passed)} <code>{esc(model)}</code></p>"
            + table(["check", "verdict", "max abs", "SQNR dB", "top-1"], rows, numeric=(2, 3, 4)))
    if tvm is not None:
        body += list_block(list(tvm.get("notes") or []), cls="note", prefix="tvm: ")
    parts = [section("Summary", body, anchor="summary"), fold_section(fold)]
    if tvm is not None and (tvm.get("tuning") or {}).get("tasks"):
        parts.append(kernels_section(tvm["tuning"]["tasks"]))
    return document("bnfold optimize", f"{'PASS' if passed else 'FAIL'} · {esc(model)}", parts)


def drift_page(report: DriftReport, model: str) -> str:
    """The page of ``bnfold diagnose``."""
    return document("bnfold diagnose", f"{esc(model)} · verdict {esc(report.verdict)}",
                    [drift_section(report, where=" of your data")])


def parity_page(report: ParityReport, reference: str, candidate: str) -> str:
    """The page of ``bnfold check``."""
    return document("bnfold check", f"{esc(reference)} vs {esc(candidate)} · {'PASS' if report.passed else 'FAIL'}",
                    [pair_section(report, reference, candidate)])


def write_page(path: str | os.PathLike[str], page: str, *, protect: Sequence[Protected | str] = ()) -> Path:
    """Write ``page`` to ``path`` atomically (never over a file in ``protect``: the user's inputs)."""
    from bnfold.io.outputs import write_bytes_atomic

    return write_bytes_atomic(path, page.encode("utf-8"), protect=protect)
