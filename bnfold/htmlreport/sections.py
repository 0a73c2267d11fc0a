"""The report's sections, each from one of bnfold's report objects: fold, drift, stage parity, pair parity, latency,
TVM kernels. Every function returns HTML built from escaped parts (:func:`~bnfold.htmlreport.page.esc`, the
charts of :mod:`~bnfold.htmlreport.svg`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from bnfold.htmlreport.page import esc, section, table, verdict
from bnfold.htmlreport.svg import PALETTE, Series, bar_chart

if TYPE_CHECKING:
    from bnfold.parity.core import ParityReport
    from bnfold.parity.stages import StageReport
    from bnfold.recalibration.drift import DriftReport
    from bnfold.report import FoldReport

__all__ = ["drift_section", "fold_section", "kernels_section", "latency_section", "list_block", "pair_section",
           "stages_section"]


def list_block(items: Sequence[str], *, cls: str, prefix: str = "") -> str:
    if not items:
        return ""
    return f'<ul class="{esc(cls)}">' + "".join(f"<li>{esc(prefix)}{esc(i)}</li>" for i in items) + "</ul>"


def fold_section(fold: FoldReport) -> str:
    """What was folded (into what, by which rule) and what was left, with the reason."""
    n = len(fold.folded) + len(fold.skipped)
    body = [f"<p>{esc(n)} normalization candidates ({esc(fold.capture)} capture): <b>{len(fold.folded)} folded</b>, "
            f"<b>{len(fold.skipped)} left</b>.</p>"]
    if fold.capture_choice:
        body.append(f'<p class="note">capture: {esc(fold.capture_choice)}</p>')
    if fold.folded:
        rows = table(["candidate", "kind", "rule", "into", "detail"],
                     [[e.path, e.kind, e.rule, e.into, e.detail] for e in fold.folded])
        by_rule: dict[str, int] = {}
        for e in fold.folded:
            by_rule[e.rule] = by_rule.get(e.rule, 0) + 1
        rules = ", ".join(f"{n} by {r}" for r, n in by_rule.items())
        body.append(f"<details{' open' if len(fold.folded) <= 8 else ''}><summary><b>Folded</b> ({esc(rules)})"
                    f"</summary>{rows}</details>")
    if fold.skipped:
        body.append("<h3>Left, and why</h3>" + table(["candidate", "kind", "rule", "reason"],
                                                    [[e.path, e.kind, e.rule, e.reason] for e in fold.skipped]))
    if fold.passes:
        body.append('<p class="note">passes (' + esc(fold.rounds) + " rounds): " + esc(", ".join(
            f"{p['name']} {p['seconds'] * 1000:.0f} ms" for p in fold.passes if p.get("runs"))) + "</p>")
    return section("Fold: what was folded and what was left", "".join(body), anchor="fold")


def drift_section(before: DriftReport, after: DriftReport | None = None, *, where: str = "") -> str:
    """Drift score per BatchNorm layer (graph order), before and, when given, after recalibration; the threshold
    as a line."""
    names = [layer.name for layer in before.layers]
    after_by = {layer.name: layer.score for layer in after.layers} if after is not None else {}
    series = [Series("stored statistics" if after is None else "before recalibration",
                     [layer.score for layer in before.layers], PALETTE[1])]
    if after is not None:
        series.append(Series("after recalibration", [after_by.get(n) for n in names], PALETTE[0]))
    head = "<p>"
    for label, rep in (("stored statistics" if after is None else "before recalibration", before),
                       ("after recalibration", after)):
        if rep is None or rep.worst is None:
            continue
        head += (f"{esc(label)}: {verdict(not rep.should_recalibrate, yes='OK', no=rep.verdict.upper())} worst "
                 f"<code>{esc(rep.worst.name)}</code> {esc(f'{rep.worst.score:.3f}')} &nbsp; ")
    head += (f"</p><p class=note>{len(names)} BatchNorm layers measured on {esc(before.samples)} samples{esc(where)}"
             "; the drift score says how many stored standard deviations a layer's input moved (√(2·mean KL) over "
             f"channels); above the threshold {esc(f'{before.threshold:g}')} recalibration is advised.</p>")
    chart = bar_chart(names, series, title="drift score per BatchNorm layer", unit="drift score",
                      threshold=before.threshold, threshold_label=f"threshold {before.threshold:g}",
                      chart_id="drift-chart") if names else ""
    headers = ["layer", "kind", "channels", "score", "rms mean shift", "mean log var ratio"]
    rows = [[layer.name, layer.kind, layer.channels, f"{layer.score:.3f}", f"{layer.mean_shift:.3f}",
             f"{layer.log_var_ratio:+.3f}"] for layer in before.ranking]
    if after is not None:
        headers.insert(4, "after")
        for r in rows:
            r.insert(4, "" if r[0] not in after_by else f"{after_by[r[0]]:.3f}")
    tbl = table(headers, rows, numeric=tuple(range(2, len(headers))))
    extra = list_block(before.no_data, cls="note", prefix="saw no data (not scored): ")
    return section("Drift per BatchNorm layer", head + chart + "<details><summary>table</summary>" + tbl
                   + "</details>" + extra, anchor="drift")


def _finite(v: float | None) -> float | None:
    return v if v is not None and not (isinstance(v, float) and math.isnan(v)) else None


def stages_section(stages: StageReport, int8: Any | None = None) -> str:
    """Parity of every stage: SQNR, max error and top-1 agreement against the stage before and against the
    baseline, as charts, and the verdicts as a table."""
    labels: list[str] = []
    sqnr: list[float | None] = []
    max_abs: list[float | None] = []
    top1: list[float | None] = []
    rows = []
    for s in stages.stages:
        if s.error is not None:
            rows.append([s.name, s.previous or "-", "ERROR", s.error, "", "", ""])
            continue
        for against, rep, label in ((s.previous, s.vs_previous, "changed (expected)" if s.expected_change else None),
                                    (s.baseline, s.vs_baseline, None), ("original", s.vs_original, "info")):
            if rep is None or rep.worst is None:
                continue
            w = rep.worst
            name = f"{s.name} vs {against}"
            labels.append(name)
            sqnr.append(w.sqnr_db)
            max_abs.append(w.max_abs)
            top1.append(None if w.top1_agreement is None else 100 * w.top1_agreement)
            v = label if label and label != "info" else ("PASS" if rep.passed else ("differs" if label else "FAIL"))
            rows.append([s.name, against, v, f"{w.max_abs:.3g}", _db(w.sqnr_db), _pct(w.top1_agreement),
                         f"{s.seconds:.2f}s"])
    if int8 is not None and int8.verdict is not None:
        v = int8.verdict
        labels.append("int8 vs folded")
        sqnr.append(v.sqnr_db)
        max_abs.append(_finite(v.max_abs))
        top1.append(None if v.top1_agreement is None else 100 * v.top1_agreement)
        rows.append(["int8", "folded", "PASS" if v.passed else "FAIL", f"{v.max_abs:.3g}", _db(v.sqnr_db),
                     _pct(v.top1_agreement), ""])
    source = "your data" if stages.inputs == "user" else "RANDOM inputs"
    body = [f"<p>{verdict(stages.passed)} {esc(stages.samples)} samples of {esc(source)} ({esc(stages.batches)} "
            "batches). Each stage is compared with the stage before it and with its baseline (the original, or the "
            "recalibrated model, whose change is intended), judged by the float64-reference rule.</p>"]
    div = stages.first_divergence
    if div is not None:
        body.append(f'<p class="err">divergence starts at stage <b>{esc(div.stage)}</b>'
                    + (f" (vs {esc(div.against)})" if div.against else "") + f": {esc(div.reason)}"
                    + (f" — first diverging node <code>{esc(div.node)}</code>" if div.node else "") + "</p>")
    if labels:
        body.append(bar_chart(labels, [Series("SQNR", sqnr, PALETTE[2])], title="SQNR per stage comparison",
                              unit="SQNR dB (higher is closer; ∞ = identical)", chart_id="sqnr-chart"))
        body.append(bar_chart(labels, [Series("max abs error", max_abs, PALETTE[3])], log=True,
                              title="max abs error per stage comparison", unit="max |difference|",
                              chart_id="maxerr-chart"))
        if any(t is not None for t in top1):
            body.append(bar_chart(labels, [Series("top-1 agreement", top1, PALETTE[4])],
                                  title="top-1 agreement per stage comparison", unit="% of samples",
                                  chart_id="top1-chart"))
    body.append(table(["stage", "vs", "verdict", "max abs", "SQNR dB", "top-1", "time"], rows, numeric=(3, 4, 5, 6)))
    body.append(list_block(stages.notes, cls="note", prefix="note: "))
    return section("Parity per stage", "".join(body), anchor="parity")


def pair_section(report: ParityReport, reference: str, candidate: str) -> str:
    """``bnfold check``: one reference, one candidate, per output."""
    labels = [f"output {o.index} ({'x'.join(map(str, o.shape))})" for o in report.outputs]
    source = "your data" if report.inputs == "user" else "RANDOM inputs"
    body = [f"<p>{verdict(report.passed)} reference <code>{esc(reference)}</code>, candidate "
            f"<code>{esc(candidate)}</code>: {esc(report.samples)} samples of {esc(source)} ({esc(report.batches)} "
            "batches).</p>"]
    if labels:
        body.append(bar_chart(labels, [Series("SQNR", [o.sqnr_db for o in report.outputs], PALETTE[2])],
                              title="SQNR per output", unit="SQNR dB (∞ = identical)", chart_id="sqnr-chart"))
        body.append(bar_chart(labels, [Series("max abs error", [o.max_abs for o in report.outputs], PALETTE[3])],
                              log=True, title="max abs error per output", unit="max |difference|",
                              chart_id="maxerr-chart"))
        with64 = [o for o in report.outputs if o.rmse_vs_fp64 is not None]
        if with64:
            body.append(bar_chart([labels[report.outputs.index(o)] for o in with64],
                                  [Series("candidate rmse vs fp64", [o.rmse_vs_fp64 for o in with64], PALETTE[0]),
                                   Series("reference rmse vs fp64", [o.reference_rmse_vs_fp64 for o in with64],
                                          PALETTE[1]),
                                   Series("bound", [o.bound for o in with64], PALETTE[3])], log=True,
                                  title="error against a float64 reference", unit="rmse",
                                  chart_id="fp64-chart"))
        rows = [[o.index, "x".join(map(str, o.shape)), o.dtype, f"{o.max_abs:.3g}", f"{o.cosine:.9f}",
                 _db(o.sqnr_db), _pct(o.top1_agreement), "ok" if o.passed else "FAIL", o.reason or ""]
                for o in report.outputs]
        body.append(table(["out", "shape", "dtype", "max abs", "cosine", "SQNR dB", "top-1", "verdict", "why"],
                          rows, numeric=(3, 4, 5, 6)))
    bi = report.batch_independence
    if bi is not None:
        body.append(f"<p>batch independence: {verdict(bi.passed) if bi.checked else 'not checked'} "
                    f"{esc(bi.note)}</p>")
    if report.localization is not None:
        body.append(f"<pre>{esc(report.localization.render())}</pre>")
    body.append(list_block(report.errors, cls="err", prefix="error: "))
    body.append(list_block(report.notes, cls="note", prefix="note: "))
    return section("Parity", "".join(body), anchor="parity")


def latency_section(latency: Mapping[str, Mapping[str, float]], fastest: str | None) -> str:
    """Every artifact's latency at the example batch, side by side."""
    names = list(latency)
    values = [v for t in latency.values() for v in (t["median_ms"], t["min_ms"]) if v > 0]
    spread = bool(values) and max(values) / min(values) > 30  # decades apart: a log axis keeps the small ones seen
    chart = bar_chart(names, [Series("median", [latency[n]["median_ms"] for n in names], PALETTE[0]),
                              Series("min", [latency[n]["min_ms"] for n in names], PALETTE[5])],
                      title="latency per artifact", unit="ms per call (example batch)", log=spread,
                      chart_id="latency-chart")
    rows = [[n, f"{t['median_ms']:.3f}", f"{t['min_ms']:.3f}", int(t.get("calls", 0))] for n, t in latency.items()]
    body = (f"<p>Timed side by side in interleaved rounds on this host; fastest: <b>{esc(fastest or '-')}</b>.</p>"
            + chart + table(["artifact", "median ms", "min ms", "calls"], rows, numeric=(1, 2, 3)))
    return section("Latency of every artifact", body, anchor="latency")


def kernels_section(kernels: Sequence[Mapping[str, Any]]) -> str:
    """The TVM build's kernels: measured time × occurrences where the tuning database has a measurement, else
    each kernel's share of the FLOPs (what the untuned build is made of)."""
    measured = [k for k in kernels if k.get("best_us") is not None]
    if measured:
        ordered = sorted(measured, key=lambda k: -float(k["best_us"]) * float(k.get("weight", 1)))
        chart = bar_chart([str(k["name"]) for k in ordered],
                          [Series("time per call", [float(k["best_us"]) * float(k.get("weight", 1)) for k in ordered],
                                  PALETTE[0])], title="TVM kernel times", unit="µs per model call (best × occurrences)",
                          chart_id="kernels-chart")
        note = f"<p>{len(measured)} of {len(kernels)} kernels measured by the tuning database.</p>"
    else:
        total = sum(float(k.get("flops", 0)) * float(k.get("weight", 1)) for k in kernels) or 1.0
        ordered = sorted(kernels, key=lambda k: -float(k.get("flops", 0)) * float(k.get("weight", 1)))
        chart = bar_chart([str(k["name"]) for k in ordered],
                          [Series("FLOPs share", [100 * float(k.get("flops", 0)) * float(k.get("weight", 1)) / total
                                                  for k in ordered], PALETTE[1])],
                          title="TVM kernels by FLOPs", unit="% of the model's FLOPs", chart_id="kernels-chart")
        note = ('<p class="note">Kernel times are not measured: the build was not tuned (tune with '
                "<code>--tune-trials N</code>); the chart shows each kernel's share of the FLOPs instead.</p>")
    rows = [[k["name"], k.get("weight", 1), f"{float(k.get('flops', 0)):.3g}", k.get("trials", 0),
             "" if k.get("best_us") is None else f"{float(k['best_us']):.2f}"] for k in ordered]
    return section("TVM kernels", note + chart + "<details><summary>table</summary>" + table(
        ["kernel", "occurrences", "FLOPs", "trials", "best µs"], rows, numeric=(1, 2, 3, 4)) + "</details>",
                   anchor="kernels")


def _db(x: float) -> str:
    return "inf" if x == math.inf else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
