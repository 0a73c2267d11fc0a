"""``bnfold compile MODEL --target llvm|cuda [--tune-trials N] [--cache-dir D] -o OUT_DIR``.

Loads MODEL, folds it (targets never fold: folding happens here, once), compiles the folded module with TVM,
checks parity of the compiled CPU artifact against the folded model on the example inputs, and writes the
artifact folder atomically (built beside OUT_DIR, then renamed into place). Exit 0 on success, 1 if the
compiled model fails parity.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from bnfold.api import fold
from bnfold.cli.commands import SUMMARY, onnx_cmd
from bnfold.cli.commands.common import add_model_args, check_cache_dir, check_target_options, load_with_inputs
from bnfold.errors import InputError
from bnfold.io.outputs import OutputPlan
from bnfold.parity import compare
from bnfold.report import json_safe
from bnfold.targets import get_target
from bnfold.targets.tvm import UntunedKernelsWarning
from bnfold.targets.tvm.artifact import artifact_entries

__all__ = ["register"]


def _batch_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.replace(":", ",").split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN,MAX (e.g. 1,32)") from exc
    return lo, hi


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help=SUMMARY["compile"][1],
                       description="Fold MODEL, compile it with Apache TVM and write OUT_DIR: model.so, params.pt "
                                   "and manifest.json (load it with bnfold.load_artifact).")
    add_model_args(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="artifact folder to write")
    p.add_argument("--target", choices=["llvm", "cuda"], default="llvm", help="llvm: this CPU (default); cuda: GPU")
    p.add_argument("--arch", help="CUDA architecture, e.g. sm_90a (default: the visible GPU's)")
    p.add_argument("--mcpu", help="CPU to compile for (default: this host's, as LLVM names it)")
    p.add_argument("--tune-trials", type=int, default=0, metavar="N",
                   help="MetaSchedule trials in total, split across kernels by cost (0: only apply the tuning "
                        "database; roughly 32 per kernel for a fast result, ~2 s per trial)")
    p.add_argument("--cache-dir", metavar="D", help="tuning database root, shared across models "
                                                    "(default: $BNFOLD_CACHE_DIR/tvm or ~/.cache/bnfold/tvm)")
    p.add_argument("--retune", action="store_true", help="tune even kernels the database already covers")
    p.add_argument("--no-prepack", dest="prepack", action="store_false",
                   help="keep the weights' layout (default: tuned convolutions choose theirs, re-laid out at load)")
    p.add_argument("--layout", choices=["NCHWc", "NCHW", "NHWC"],
                   help="convolution layout for CPU builds (default NCHWc: channels blocked by the SIMD width)")
    p.add_argument("--dynamic-batch", type=_batch_range, metavar="MIN,MAX",
                   help="accept batch sizes MIN..MAX (untuned CPU / CUDA builds only)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it holds an earlier artifact")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while tuning")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=_compile)


def _compile(args: argparse.Namespace) -> int:
    if args.tune_trials < 0:
        raise InputError(f"--tune-trials must be >= 0, got {args.tune_trials}")
    if args.dynamic_batch is not None and not 1 <= args.dynamic_batch[0] <= args.dynamic_batch[1]:
        raise InputError(f"--dynamic-batch {args.dynamic_batch[0]},{args.dynamic_batch[1]} is not a range "
                         "1 <= MIN <= MAX")
    check_target_options(args.target, args.arch)
    check_cache_dir(args.cache_dir)
    if onnx_cmd.is_onnx(args.model):
        return onnx_cmd.compile_onnx(args)
    plan = OutputPlan([args.model], force=args.force)
    plan.folder(args.output, owned=artifact_entries)  # before any work
    loaded, inputs = load_with_inputs(args)
    folded = fold(loaded.module, inputs, capture=args.capture)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UntunedKernelsWarning)
        artifact = get_target("tvm").lower(folded.module, inputs, {
            "target": args.target, "tune_trials": args.tune_trials, "cache_dir": args.cache_dir, "arch": args.arch,
            "mcpu": args.mcpu, "dynamic_batch": args.dynamic_batch, "prepack": None if args.prepack else False,
            "layout": args.layout, "retune": args.retune, "progress": not args.no_progress})
    for w in caught:
        if issubclass(w.category, UntunedKernelsWarning):
            print(f"WARNING: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    passed = True
    info = artifact.build_info
    if info["target"]["kind"] == "llvm":
        parity = compare(folded.module, artifact, inputs)
        info["parity_vs_folded"] = parity.summary()
        passed = parity.passed
    artifact.save(args.output, overwrite=args.force, protect=plan.protect)
    if args.json:
        print(json.dumps(json_safe(info), indent=2, default=str, allow_nan=False))
    else:
        _print_summary(args.output, info)
    return 0 if passed else 1


def _print_summary(out: str, info: dict) -> None:
    t, tuning = info["target"], info["tuning"]
    what = t["arch"] if t["kind"] == "cuda" else f"{t['mcpu']}, {t['num_cores']} cores"
    print(f"compiled for {t['kind']} ({what}) with TVM {info['versions']['tvm']}")
    if tuning.get("trials_requested"):
        print(f"tuning: {tuning['trials_run']} trials in {tuning['seconds']:.0f} s over {len(tuning['tasks'])} "
              f"kernels (database {tuning['database']})")
        lost = tuning.get("failed_runs", 0) + tuning.get("failed_builds", 0)
        if lost:
            print(f"tuning: {tuning.get('failed_builds', 0)} candidate(s) did not compile and the runner lost "
                  f"{tuning.get('failed_runs', 0)} (the best of the others is used)")
        e2e = tuning.get("end_to_end")
        if e2e and e2e["kept"] == "tuned":
            print(f"tuning: end to end {e2e['tuned_ms']:.3f} ms tuned vs {e2e['default_ms']:.3f} ms on the default "
                  "schedules: kept the tuned build")
    if tuning.get("note"):
        print(f"tuning: {tuning['note']}")
    untuned = tuning.get("untuned") or []
    print(f"untuned kernels: {len(untuned)}" + (f" ({', '.join(untuned[:6])}{', …' if len(untuned) > 6 else ''})"
                                              if untuned else ""))
    parity = info.get("parity_vs_folded")
    if parity:
        print(f"parity vs folded model: {'PASS' if parity['passed'] else 'FAIL'} (max abs {parity['max_abs']:.3g})")
    print(f"wrote {out}/ ({', '.join(info['files'].values())}, manifest.json)")
