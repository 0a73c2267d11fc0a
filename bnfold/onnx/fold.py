"""Fold the normalizations of an ONNX model: the ONNX pipeline (:func:`bnfold.passes.onnx.onnx_pipeline`) on a
``ModelProto``, and the report — built like the torch fold's (:func:`bnfold.api.build_report`: same rules, reasons
and categories), plus what onnxsim prints (op counts before/after)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import IO

import onnx

from bnfold.onnx.files import op_counts
from bnfold.onnx.report import OnnxFoldReport
from bnfold.passes.engine import DumpIR, Instrument, Until
from bnfold.passes.onnx import OnnxContext, check_until, onnx_pipeline

__all__ = ["fold_model"]


def fold_model(model: onnx.ModelProto, *, base_dir: str = "", dry_run: bool = False, until: str | None = None,
               dump_ir: IO[str] | str | os.PathLike[str] | None = None, instruments: Sequence[Instrument] = ()
               ) -> OnnxFoldReport:
    """Fold every normalization of ``model`` that folds exactly (``model`` is edited in place; with ``dry_run``
    a copy is folded to report what would happen) and report.

    ``until`` stops after the named pass of the ONNX pipeline; ``dump_ir`` receives the graph before and after every
    pass that changed it (a stream, or a folder that gets one file per such pass); ``instruments`` observe every
    pass (:class:`~bnfold.passes.engine.Verify` in tests)."""
    from bnfold.api import build_report

    check_until(until)
    if dry_run:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    before = op_counts(model)
    extra: list[Instrument] = list(instruments)
    if dump_ir is not None:
        extra.append(DumpIR(dump_ir) if hasattr(dump_ir, "write") else DumpIR(folder=os.fspath(dump_ir)))
    if until is not None:
        extra.append(Until(until))
    ctx = OnnxContext(model, base_dir=base_dir)
    result = onnx_pipeline(extra).run_on(ctx)
    base = build_report("onnx", result)
    report = OnnxFoldReport(**{f: getattr(base, f) for f in ("capture", "folded", "skipped", "changes", "passes",
                                                             "rounds", "parity", "dry_run", "converged",
                                                             "stopped_after")})
    report.dry_run = dry_run
    after = op_counts(model)
    report.op_counts = {op: (before.get(op, 0), after.get(op, 0)) for op in sorted(set(before) | set(after))}
    report.opset = ctx.g.opset()
    return report
