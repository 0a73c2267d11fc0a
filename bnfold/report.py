"""The fold report: every normalization candidate appears once, as folded (into what, by which rule) or
skipped (the rule that declined and a reason a user can act on), plus pass timings and parity.

``FoldReport.to_dict()`` is the JSON form; ``str(report)`` is a terminal table.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["FoldReport", "FoldedEntry", "SkippedEntry", "format_table", "json_safe"]


@dataclass(frozen=True)
class FoldedEntry:
    id: str
    kind: str
    path: str
    rule: str
    into: str
    detail: str


@dataclass(frozen=True)
class SkippedEntry:
    id: str
    kind: str
    path: str
    rule: str
    reason: str


@dataclass
class FoldReport:
    """What a fold did. ``folded``/``skipped`` partition the candidates; ``changes`` counts all rewrites.

    ``capture``: the capture the fold used; ``capture_choice``: why (``capture="auto"``), with
    ``capture_alternatives`` (per capture tried: folded/left counts and seconds, or the capture error);
    ``dynamic_shapes``: the dynamic dimensions the folded module keeps (per dim: input, dim, name, min, max);
    ``timings``: wall seconds of the fold call's parts — ``capture`` (copy, trace, shapes), ``fold`` (passes,
    the folded module's code, this report), ``check`` (the parity check) and ``total`` (with the captures
    ``capture="auto"`` tried and did not keep)."""

    capture: str
    folded: list[FoldedEntry] = field(default_factory=list)
    skipped: list[SkippedEntry] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)
    rounds: int = 0
    parity: dict[str, Any] | None = None
    dry_run: bool = False
    capture_choice: str | None = None
    capture_alternatives: dict[str, dict[str, Any]] | None = None
    dynamic_shapes: list[dict[str, Any]] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    converged: bool = True  # the passes reached a fixed point (False: stopped at the round limit)
    stopped_after: str | None = None  # the pass ``until`` stopped the pipeline after

    @property
    def modified(self) -> bool:
        return bool(self.changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "capture": self.capture,
            "capture_choice": self.capture_choice,
            "capture_alternatives": self.capture_alternatives,
            "dynamic_shapes": self.dynamic_shapes,
            "dry_run": self.dry_run,
            "candidates": len(self.folded) + len(self.skipped),
            "folded": [asdict(e) for e in self.folded],
            "skipped": [asdict(e) for e in self.skipped],
            "changes": self.changes,
            "passes": self.passes,
            "rounds": self.rounds,
            "converged": self.converged,
            "stopped_after": self.stopped_after,
            "parity": self.parity,
            "timings": self.timings,
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(json_safe(self.to_dict()), indent=2, default=str, allow_nan=False, **kwargs)

    def __str__(self) -> str:
        return self.render(explain=True)

    def render(self, *, explain: bool = True) -> str:
        n = len(self.folded) + len(self.skipped)
        verb = "would fold" if self.dry_run else "folded"
        lines = [f"bnfold ({self.capture} capture): {n} normalization candidates, {len(self.folded)} {verb}, "
                 f"{len(self.skipped)} left"]
        if self.capture_choice:
            lines.append(f"capture: {self.capture} ({self.capture_choice})")
        if self.dynamic_shapes:
            lines.append("dynamic: " + ", ".join(
                f"input {d['input']} dim {d['dim']} ({d['name']}: {d['min']}..{d['max'] or 'inf'})"
                for d in self.dynamic_shapes if "dim" in d))
        if self.folded:
            lines.append("")
            lines.append(format_table(["candidate", "kind", "rule", "into"],
                                      [[e.path, e.kind, e.rule, e.into] for e in self.folded]))
        if self.skipped:
            lines.append("")
            rows = [[e.path, e.kind, e.rule, e.reason if explain else _short(e.reason)] for e in self.skipped]
            lines.append(format_table(["left alone", "kind", "rule", "why"], rows))
        if self.parity:
            lines.append("")
            lines.append(_render_parity(self.parity))
        if self.passes:
            timing = ", ".join(f"{p['name']} {p['seconds'] * 1000:.0f} ms" for p in self.passes if p["runs"])
            lines.append("")
            lines.append(f"passes ({self.rounds} rounds): {timing}")
        if self.timings:
            names = {"capture": "capture", "fold": "fold", "check": "parity check", "total": "total"}
            lines.append("time: " + ", ".join(f"{label} {self.timings[k] * 1000:.0f} ms" for k, label in names.items()
                                               if k in self.timings))
        if self.stopped_after:
            lines.append(f"stopped after pass {self.stopped_after} (until): the graph is not fully folded")
        elif not self.converged:
            lines.append(f"note: the passes stopped after {self.rounds} rounds without reaching a fixed point; "
                         "more might fold (please report this model)")
        return "\n".join(lines)


def _short(reason: str, width: int = 60) -> str:
    return reason if len(reason) <= width else reason[: width - 1] + "…"


def _render_parity(p: dict[str, Any]) -> str:
    verdict = "PASS" if p.get("passed") else "FAIL"
    against = " vs float64" if p.get("against") == "float64" else ""
    parts = [f"parity {verdict}: max abs{against} {p.get('max_abs', float('nan')):.3g}, "
             f"max rel {p.get('max_rel', float('nan')):.3g}, cosine {p.get('cosine', float('nan')):.9f}"]
    if "reference_rmse_vs_fp64" in p:
        parts.append(f"rmse vs fp64: folded {p['rmse_vs_fp64']:.3g}, original {p['reference_rmse_vs_fp64']:.3g}")
    elif "rmse_vs_fp64" in p:  # the original was not run: the folded module is within the rule's floor
        parts.append(f"rmse vs fp64: folded {p['rmse_vs_fp64']:.3g} ≤ floor {p['bound']:.3g}")
    if p.get("batch_independent") is False:
        parts.append("output depends on the rest of the batch (a BatchNorm still uses batch statistics?)")
    if p.get("diverging_node"):
        parts.append(f"first diverging node: {p['diverging_node']}")
    return "; ".join(parts)


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain fixed-width table (no dependencies), long cells wrapped to 70 columns."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [min(max(len(r[i]) for r in cells), 70) for i in range(len(header))]
    out = []
    for k, r in enumerate(cells):
        wrapped = [_wrap(c, w) for c, w in zip(r, widths, strict=True)]
        height = max(len(w) for w in wrapped)
        for line in range(height):
            out.append("  ".join((w[line] if line < len(w) else "").ljust(widths[i])
                                 for i, w in enumerate(wrapped)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _wrap(text: str, width: int) -> list[str]:
    if len(text) <= width:
        return [text]
    words, lines, cur = text.split(" "), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    if cur:
        lines.append(cur)
    return lines


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats written as the strings ``"inf"``, ``"-inf"``, ``"nan"`` (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
