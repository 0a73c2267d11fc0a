"""The page around the sections: one self-contained HTML document (inline CSS, inline SVG, no script, no network).

A Content-Security-Policy ``<meta>`` forbids every external load and every script (``default-src 'none'``), so even
a string that slipped through unescaped could neither run nor fetch anything; every string that comes from the
model or the data (node names, reasons, file names) is escaped with :func:`esc` anyway. The generator ``<meta>``
marks the file as bnfold's (:func:`is_bnfold_html`: how ``--force`` recognizes its own earlier report).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

__all__ = ["GENERATOR", "document", "esc", "is_bnfold_html", "section", "table"]

GENERATOR = "bnfold"
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1d1d1f;background:#f6f7f9}
main{max-width:1000px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d9dce1;
padding-bottom:4px}h3{font-size:14px;margin:16px 0 6px}
.meta{color:#5b6068;font-size:12px}.verdict{display:inline-block;padding:2px 10px;border-radius:10px;
font-weight:600;color:#fff}.pass{background:#2f8f46}.fail{background:#c4352b}.info{background:#6b7280}
section{background:#fff;border:1px solid #e2e5ea;border-radius:8px;padding:6px 18px 14px;margin:14px 0}
table{border-collapse:collapse;width:100%;font-size:12.5px;margin:6px 0}th,td{text-align:left;padding:3px 8px;
border-bottom:1px solid #eceef1;vertical-align:top}th{background:#f1f3f6;font-weight:600}td.num{text-align:right;
font-variant-numeric:tabular-nums}code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;word-break:break-all}
ul{margin:4px 0 4px 18px;padding:0}.note{color:#5b6068}.warn{color:#8a5a00}.err{color:#b42318}
svg.chart{display:block;max-width:100%;height:auto;margin:6px 0}
svg .label{font:11px ui-monospace,monospace;text-anchor:end;fill:#1d1d1f}svg .value{font:10.5px system-ui,
sans-serif;fill:#3b3f45}svg .tick{font:10px system-ui,sans-serif;text-anchor:middle;fill:#6b7280}
svg .unit{font:10.5px system-ui,sans-serif;text-anchor:end;fill:#6b7280}svg .legend{font:11px system-ui,
sans-serif;fill:#1d1d1f}svg .grid{stroke:#eceef1;stroke-width:1}svg .threshold{stroke:#c4352b;stroke-width:1.5;
stroke-dasharray:4 3}svg .threshold-label{font:10.5px system-ui,sans-serif;fill:#c4352b}
"""


def esc(value: Any) -> str:
    """``value`` as text safe inside HTML elements and quoted attributes."""
    return escape(str(value), quote=True)


def verdict(passed: bool | None, *, yes: str = "PASS", no: str = "FAIL") -> str:
    if passed is None:
        return f'<span class="verdict info">{esc(yes)}</span>'
    return f'<span class="verdict {"pass" if passed else "fail"}">{esc(yes if passed else no)}</span>'


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, numeric: Sequence[int] = ()) -> str:
    """A ``<table>``: every cell escaped; columns in ``numeric`` right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cells = "".join(f'<td{" class=num" if i in numeric else ""}>{esc(c)}</td>' for i, c in enumerate(r))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def section(title: str, body: str, *, anchor: str) -> str:
    """A titled ``<section>``; ``body`` is HTML the caller built from escaped parts."""
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def document(title: str, subtitle: str, sections: Sequence[str]) -> str:
    """The whole page."""
    from bnfold import __version__

    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return ("<!DOCTYPE html>\n"
            f'<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{esc(_CSP)}">'
            f'<meta name="generator" content="{GENERATOR} {esc(__version__)}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n"
            f"<body><main><h1>{esc(title)}</h1><p class=meta>{subtitle} · written {esc(now)} by bnfold "
            f"{esc(__version__)}</p>\n" + "\n".join(sections) + "\n</main></body></html>\n")


def is_bnfold_html(path: str | os.PathLike[str]) -> bool:
    """``path`` is a report page bnfold wrote (its generator ``<meta>`` names bnfold)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b'<meta name="generator" content="bnfold ' in head
