"""Demo stage ``tvm``: compile the folded DigitsNet with Apache TVM for this CPU and check it on the digits.

The build is untuned on purpose (a demo must take seconds, tuning takes minutes): the stage says so, names how
many kernels are untuned, and shows the command that tunes them. Accuracy and parity are measured on every
held-out digit, compiled as one static batch.
"""

from __future__ import annotations

import time
import warnings

from bnfold.demo.context import DemoContext, accuracy
from bnfold.errors import BnfoldError
from bnfold.parity import compare

__all__ = ["stage_tvm"]


def stage_tvm(ctx: DemoContext) -> list[str]:
    """Compile ``ctx.folded`` (llvm, untuned), compare it with the original, add an accuracy row."""
    if ctx.folded is None:
        return ["== tvm ==", "skipped: no folded model"]
    try:
        import tvm  # noqa: F401
    except ImportError:
        return ["== tvm ==", "skipped: Apache TVM is not installed (pip install 'bnfold[tvm]')"]
    from bnfold.targets import get_target
    from bnfold.targets.tvm import UntunedKernelsWarning

    x, y = ctx.data.x_test, ctx.data.y_test
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UntunedKernelsWarning)  # reported below, in the demo's words
            artifact = get_target("tvm").lower(ctx.folded, (x,), {"target": "llvm", "tune_trials": 0,
                                                                    "progress": False})
    except BnfoldError as err:
        return ["== tvm ==", f"skipped: {err}"]
    seconds = time.perf_counter() - t0
    parity = compare(ctx.original, artifact, (x,))
    acc = accuracy(artifact, x, y)
    info = artifact.build_info
    ctx.results["tvm"] = {"build_info": info, "parity_test_set": parity.to_dict(), "compile_s": seconds}
    ctx.accuracy_rows.append(["tvm (llvm, untuned)", f"{acc:.4f}"])
    s = parity.summary()
    untuned = info["tuning"]["untuned"]
    t = info["target"]
    return [
        "== tvm ==",
        f"compiled the folded model with TVM {info['versions']['tvm']} for {t['mcpu']} ({t['num_cores']} cores, "
        f"{len(info['isa']['features'])} ISA extensions) in {seconds:.1f} s",
        f"untuned build: {len(untuned)} kernel(s) without a tuned schedule (fine for a demo; for speed run "
        "`bnfold compile MODEL.pt2 --tune-trials N -o OUT`)",
        f"TVM vs original on all {len(y)} held-out digits: {'PASS' if parity.passed else 'FAIL'} "
        f"(max abs {s['max_abs']:.3g}, rmse vs fp64 {s.get('rmse_vs_fp64', float('nan')):.3g} "
        f"≤ bound {s.get('bound', float('nan')):.3g})",
    ]
