"""Inline SVG charts drawn in Python: no script, no external file, every label escaped.

One chart kind covers the report: horizontal bars, one row per item (a BN layer, a stage, an artifact, a kernel)
and one bar per series in each row (before/after, median/min). The scale is linear from 0, or logarithmic for
quantities spanning decades (errors, times); a non-finite value is written as text (``∞``, ``n/a``) instead of a
bar, so a chart never lies about an infinite SQNR or a NaN drift. An optional vertical line marks a threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

__all__ = ["PALETTE", "Series", "bar_chart"]

PALETTE = ("#4269d0", "#efb118", "#3ca951", "#ff725c", "#a463f2", "#97bbf5")
LABEL_W, PLOT_W, VALUE_W, BAR_H, GAP, TOP, BOTTOM = 300, 520, 90, 13, 9, 40, 26
MAX_LABEL = 44


@dataclass(frozen=True)
class Series:
    """One bar per row: ``values[i]`` for row ``i`` (``None``: no value)."""

    name: str
    values: Sequence[float | None]
    color: str = PALETTE[0]


def _finite_positive(v: float | None, log: bool) -> bool:
    return v is not None and math.isfinite(v) and (v > 0 if log else True)


def _fmt(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.2e}"
    return f"{v:.4g}"


def _scale(series: Sequence[Series], log: bool, threshold: float | None
           ) -> tuple[Callable[[float], float], list[float]]:
    """``x(value)`` in plot pixels (0..PLOT_W) and the tick values."""
    vals = [v for s in series for v in s.values if _finite_positive(v, log)]
    vals += [threshold] if threshold is not None and _finite_positive(threshold, log) else []
    if log:
        lo = math.floor(math.log10(min(vals))) if vals else 0
        hi = math.ceil(math.log10(max(vals))) if vals else 1
        hi = max(hi, lo + 1)
        ticks = [10.0 ** e for e in range(lo, hi + 1)]
        if len(ticks) > 8:
            ticks = ticks[:: math.ceil(len(ticks) / 8)]
        return (lambda v: PLOT_W * (math.log10(v) - lo) / (hi - lo)), ticks
    top = max([abs(v) for v in vals if v is not None] or [1.0]) or 1.0
    step = 10 ** math.floor(math.log10(top / 4)) if top > 0 else 1.0
    for m in (1, 2, 2.5, 5, 10):
        if top / (m * step) <= 5:
            step *= m
            break
    n = max(1, math.ceil(top / step))
    return (lambda v: PLOT_W * max(0.0, v) / (n * step)), [k * step for k in range(n + 1)]


def bar_chart(labels: Sequence[str], series: Sequence[Series], *, title: str, unit: str = "", log: bool = False,
              threshold: float | None = None, threshold_label: str = "", chart_id: str = "") -> str:
    """An ``<svg>`` element: ``labels`` down the left, a bar per series per row, a legend, the axis in ``unit``.
    ``log``: logarithmic axis (values <= 0 are written, not drawn)."""
    n = len(labels)
    row_h = len(series) * BAR_H + GAP
    height = TOP + n * row_h + BOTTOM
    width = LABEL_W + PLOT_W + VALUE_W
    x, ticks = _scale(series, log, threshold)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}"' + (f' id="{escape(chart_id)}"' if chart_id else "") + ">",
           f"<title>{escape(title)}</title>"]
    for t in ticks:  # grid and axis labels
        px = LABEL_W + x(t)
        out.append(f'<line x1="{px:.1f}" y1="{TOP - 4}" x2="{px:.1f}" y2="{height - BOTTOM}" class="grid"/>')
        out.append(f'<text x="{px:.1f}" y="{height - BOTTOM + 14}" class="tick">{escape(_fmt(t))}</text>')
    out.append(f'<text x="{LABEL_W + PLOT_W}" y="{height - 2}" class="unit">{escape(unit)}'
               f'{" (log scale)" if log else ""}</text>')
    lx = LABEL_W
    for s in series:  # legend
        out.append(f'<rect x="{lx}" y="6" width="11" height="11" fill="{escape(s.color)}"/>'
                   f'<text x="{lx + 15}" y="16" class="legend">{escape(s.name)}</text>')
        lx += 24 + 7 * len(s.name)
    for i, label in enumerate(labels):
        y0 = TOP + i * row_h
        short = label if len(label) <= MAX_LABEL else "…" + label[-(MAX_LABEL - 1):]
        out.append(f'<text x="{LABEL_W - 8}" y="{y0 + row_h / 2 + 1:.1f}" class="label"><title>{escape(label)}'
                   f"</title>{escape(short)}</text>")
        for k, s in enumerate(series):
            v = s.values[i] if i < len(s.values) else None
            y = y0 + k * BAR_H
            text = _fmt(v)
            if _finite_positive(v, log) and v is not None:
                w = max(1.0, x(v))
                out.append(f'<rect x="{LABEL_W}" y="{y}" width="{w:.1f}" height="{BAR_H - 2}" '
                           f'fill="{escape(s.color)}" class="bar"><title>{escape(label)} · {escape(s.name)}: '
                           f"{escape(text)} {escape(unit)}</title></rect>")
                tx = LABEL_W + w + 4
            else:
                tx = LABEL_W + 4
            out.append(f'<text x="{tx:.1f}" y="{y + BAR_H - 3}" class="value">{escape(text)}</text>')
    if threshold is not None and _finite_positive(threshold, log):
        px = LABEL_W + x(threshold)
        out.append(f'<line x1="{px:.1f}" y1="{TOP - 4}" x2="{px:.1f}" y2="{height - BOTTOM}" class="threshold"/>'
                   f'<text x="{px + 3:.1f}" y="{TOP - 6}" class="threshold-label">{escape(threshold_label)}</text>')
    out.append("</svg>")
    return "".join(out)
