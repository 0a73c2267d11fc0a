"""What :func:`bnfold.optimize` produced: :class:`OptimizeResult` (its JSON twin is ``report.json``, its page
``report.html``, its terminal form ``report.txt``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnfold.report import FoldReport, format_table
from bnfold.speed import fastest

if TYPE_CHECKING:
    from bnfold.quantization.stage import Int8Result
    from bnfold.recalibration.drift import DriftReport

__all__ = ["OptimizeResult"]


@dataclass
class OptimizeResult:
    """What :func:`optimize` produced. ``artifacts`` maps a name to its path inside ``out_dir``."""

    out_dir: Path
    fold: FoldReport | None
    recalibration: Any | None
    stages: Any | None
    artifacts: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # per artifact, example batch
    int8: Int8Result | None = None  # with optimize(..., int8=Int8Options())
    drift: dict[str, DriftReport] = field(default_factory=dict)  # "before"/"after" recalibration, validation data
    tvm_kernels: list[dict[str, Any]] = field(default_factory=list)  # the TVM build's kernels (best_us: measured)

    @property
    def passed(self) -> bool:
        int8_ok = self.int8 is None or bool(self.int8.passed)
        return not self.errors and self.stages is not None and bool(self.stages.passed) and int8_ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "out_dir": str(self.out_dir),
            "artifacts": self.artifacts,
            "errors": self.errors,
            "warnings": self.warnings,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "latency_ms": self.latency_ms,
            "fastest": fastest(self.latency_ms),
            "recalibration": None if self.recalibration is None else self.recalibration.to_dict(),
            "fold": None if self.fold is None else self.fold.to_dict(),
            "stages": None if self.stages is None else self.stages.to_dict(),
            "int8": None if self.int8 is None else self.int8.to_dict(),
            "drift": {k: v.to_dict() for k, v in self.drift.items()},
            "tvm_kernels": self.tvm_kernels,
        }

    def __str__(self) -> str:
        slow = next((f" ({w.split(';')[0]})" for w in self.warnings if w.startswith("tvm: the compiled artifact")), "")
        lines = [f"bnfold optimize → {self.out_dir}: {'PASS' if self.passed else 'FAIL'}{slow}", ""]
        if self.recalibration is not None:
            lines += [str(self.recalibration), ""]
        if "before" in self.drift and "after" in self.drift:
            b, a = self.drift["before"].worst, self.drift["after"].worst
            if b is not None and a is not None:
                lines += [f"drift on the validation data: worst layer {b.name} {b.score:.3f} before recalibration, "
                          f"worst {a.name} {a.score:.3f} after", ""]
        if self.fold is not None:
            lines += [self.fold.render(explain=False), ""]
        if self.stages is not None:
            lines += [str(self.stages), ""]
        if self.int8 is not None:
            lines += [self.int8.render(), ""]
        rows = [[name, path] for name, path in self.artifacts.items()]
        lines.append(format_table(["artifact", "path"], rows))
        if self.latency_ms:
            rows = [[name, f"{t['median_ms']:.2f}", f"{t['min_ms']:.2f}"] for name, t in self.latency_ms.items()]
            lines += ["", format_table(["latency (example batch)", "median ms", "min ms"], rows),
                      f"fastest: {fastest(self.latency_ms)}"]
        for stage, err in self.errors.items():
            lines.append(f"ERROR in {stage}: {err}")
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)
