"""``bnfold demo``: the whole available pipeline on the embedded DigitsNet, as a list of stages.

Each stage takes the shared :class:`DemoContext`, does its job, and returns the lines it wants printed.
Later capabilities add a stage to :data:`STAGES`.
"""

from __future__ import annotations

from collections.abc import Callable

from bnfold.api import fold
from bnfold.demo.context import DemoContext, accuracy
from bnfold.demo.data import load_digits
from bnfold.demo.drift_stage import stage_drift
from bnfold.demo.model import load_pretrained
from bnfold.demo.tvm_stage import stage_tvm
from bnfold.parity import compare
from bnfold.report import format_table

__all__ = ["STAGES", "run_demo"]


def _stage_fold(ctx: DemoContext) -> list[str]:
    example = (ctx.data.x_test[:8],)
    result = fold(ctx.original, example)
    ctx.folded = result.module
    parity = compare(ctx.original, result.module, (ctx.data.x_test,))
    ctx.results["fold"] = {"report": result.report.to_dict(), "parity_test_set": parity.to_dict()}
    acc_before = accuracy(ctx.original, ctx.data.x_test, ctx.data.y_test)
    acc_after = accuracy(result.module, ctx.data.x_test, ctx.data.y_test)
    ctx.accuracy_rows.append(["original", f"{acc_before:.4f}"])
    ctx.accuracy_rows.append(["folded", f"{acc_after:.4f}"])
    s = parity.summary()
    return [
        "== fold ==",
        str(result.report),
        "",
        f"parity on all {len(ctx.data.y_test)} held-out digits: {'PASS' if parity.passed else 'FAIL'} "
        f"(max abs {s['max_abs']:.3g}, rmse vs fp64 {s.get('rmse_vs_fp64', float('nan')):.3g} "
        f"≤ bound {s.get('bound', float('nan')):.3g})",
    ]


def _stage_onnx(ctx: DemoContext) -> list[str]:
    """Export the folded model to ONNX (onnxsim), run it with ONNX Runtime, check it against the original."""
    import tempfile
    from pathlib import Path

    from bnfold.errors import BnfoldError

    if ctx.folded is None:
        return ["== onnx ==", "skipped: no folded model"]
    try:
        from bnfold.targets import get_target

        with tempfile.TemporaryDirectory(prefix="bnfold-demo-") as tmp:
            runtime = get_target("onnx").lower(ctx.folded, (ctx.data.x_test[:8],),
                                               {"path": Path(tmp) / "digits_folded.onnx"})
            parity = compare(ctx.original, runtime, (ctx.data.x_test,))
            acc = accuracy(runtime, ctx.data.x_test, ctx.data.y_test)
            info = runtime.build_info
    except BnfoldError as err:
        return ["== onnx ==", f"skipped: {err}"]
    ctx.results["onnx"] = {"build_info": info, "parity_test_set": parity.to_dict()}
    ctx.accuracy_rows.append(["onnx (ONNX Runtime)", f"{acc:.4f}"])
    s = parity.summary()
    ops = ", ".join(f"{k} {v}" for k, v in info["op_types"].items())
    return [
        "== onnx ==",
        f"exported the folded model: {info['nodes']} ONNX nodes ({ops}), opset {info['opset']}, simplified by "
        "onnxsim",
        f"ONNX Runtime vs original on all {len(ctx.data.y_test)} held-out digits: "
        f"{'PASS' if parity.passed else 'FAIL'} (max abs {s['max_abs']:.3g}, rmse vs fp64 "
        f"{s.get('rmse_vs_fp64', float('nan')):.3g} ≤ bound {s.get('bound', float('nan')):.3g})",
    ]


def _stage_pipeline(ctx: DemoContext) -> list[str]:
    """The whole chain as one pre-deployment step (bnfold.optimize), with stage-by-stage parity on shifted data."""
    import tempfile
    from pathlib import Path

    from bnfold.demo.data import shift_images
    from bnfold.deploy import optimize

    calibration = [(b,) for b in shift_images(ctx.data.x_train, seed=1).split(64)]
    validation = [(shift_images(ctx.data.x_test, seed=2),)]
    with tempfile.TemporaryDirectory(prefix="bnfold-demo-") as tmp:
        result = optimize(ctx.original, (ctx.data.x_test[:16],), Path(tmp) / "deploy", calibration=calibration,
                          validation=validation)
        files = sorted(p.name for p in (Path(tmp) / "deploy").iterdir())
    ctx.results["optimize"] = result.to_dict()
    return ["== one command: bnfold optimize (recalibrate on shifted digits → fold → ONNX → TVM) ==",
            f"wrote {', '.join(files)}", "", str(result.stages)]


Stage = Callable[[DemoContext], list[str]]
STAGES: list[tuple[str, Stage]] = [("drift", stage_drift), ("fold", _stage_fold), ("onnx", _stage_onnx),
                                   ("tvm", stage_tvm), ("optimize", _stage_pipeline)]


def run_demo(emit: Callable[[str], None] = print) -> DemoContext:
    """Run every stage, emitting its lines as it finishes; return the context with all results."""
    ctx = DemoContext(data=load_digits(), original=load_pretrained())
    emit(f"bnfold demo: DigitsNet on the shipped digits ({len(ctx.data.y_train)} train / "
         f"{len(ctx.data.y_test)} held-out images)")
    for _name, stage in STAGES:
        emit("")
        for line in stage(ctx):
            emit(line)
    emit("")
    emit("== held-out accuracy ==")
    emit(format_table(["model", "top-1"], ctx.accuracy_rows))
    return ctx
