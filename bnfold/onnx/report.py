"""The ONNX fold report: the torch fold's :class:`~bnfold.report.FoldReport` (same entries, rules and reasons)
plus what onnxsim prints — nodes per op type before/after and file sizes — and notes (how parity was judged)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bnfold.report import FoldReport, format_table

__all__ = ["OnnxFoldReport", "human_size"]


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@dataclass
class OnnxFoldReport(FoldReport):
    """``op_counts``: op type → (before, after); ``sizes``: ``{"before": bytes, "after": bytes}`` (model file
    plus its external data); ``notes``: what the user should know about how the result was checked."""

    op_counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    sizes: dict[str, int | None] = field(default_factory=dict)
    opset: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["op_counts"] = {op: {"before": b, "after": a} for op, (b, a) in self.op_counts.items()}
        d["sizes"] = dict(self.sizes)
        d["opset"] = self.opset
        d["notes"] = list(self.notes)
        return d

    def render(self, *, explain: bool = True) -> str:
        text = super().render(explain=explain)
        lines = [text]
        if self.op_counts:
            rows = [[op, b, a] for op, (b, a) in self.op_counts.items()]
            total_b = sum(b for b, _ in self.op_counts.values())
            total_a = sum(a for _, a in self.op_counts.values())
            if self.sizes:
                rows.append(["Model Size", human_size(self.sizes.get("before")), human_size(self.sizes.get("after"))])
            rows.append(["(nodes)", total_b, total_a])
            lines += ["", format_table(["op", "before", "after" if not self.dry_run else "would be"], rows)]
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)
