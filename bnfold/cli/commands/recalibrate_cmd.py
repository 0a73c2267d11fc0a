"""``bnfold recalibrate MODEL --data CALIB -o OUT`` and ``bnfold diagnose MODEL --data CALIB``.

CALIB is a data file (``.npz`` / ``.npy`` memory-mapped / ``.pt``; format in docs/recalibration.md) or a folder of
images (``--preprocess``), or the batches come from ``--data-factory MODULE:CALLABLE``; they are streamed
(:mod:`bnfold.io.stream`: one batch in memory at a time, each checked as it arrives) in batches of ``--batch-size``
samples. Floating-point inputs are cast to the dtype of the model's
stored example inputs (float32 when it stores none).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.fx

from bnfold.cli.commands import SUMMARY
from bnfold.cli.commands.common import add_data_source_args, dynamic_shapes, load_batches
from bnfold.errors import InputError
from bnfold.io.outputs import OutputPlan
from bnfold.recalibration.core import recalibrate
from bnfold.recalibration.drift import DEFAULT_THRESHOLD, diagnose
from bnfold.targets import get_target
from bnfold.targets.torch import is_bnfold_pt2

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recalibrate", help=SUMMARY["recalibrate"][1])
    _add_common(p)
    p.add_argument("-o", "--output", required=True, help="output .pt2 path (never the input file)")
    p.add_argument("--force", action="store_true", help="replace OUT if it is an earlier bnfold output")
    p.add_argument("--mode", choices=["batch", "sequential"], default="batch",
                   help="batch: layers normalize with batch statistics while measuring (1 pass, default); "
                        "sequential: inference-exact, one pass per BatchNorm layer")
    p.set_defaults(func=_recalibrate)

    p = sub.add_parser("diagnose", help=SUMMARY["diagnose"][1])
    _add_common(p)
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"drift score above which recalibration is advised (default {DEFAULT_THRESHOLD})")
    p.add_argument("--top", type=int, help="show only the TOP most drifted layers")
    p.add_argument("--check", action="store_true", help="exit with code 1 when recalibration is advised")
    p.add_argument("--html", metavar="FILE", help="also write the drift chart as a self-contained HTML page")
    p.add_argument("--force", action="store_true", help="replace FILE if it is an earlier bnfold report")
    p.set_defaults(func=_diagnose)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file: .pt2 (torch.export.save) or, with --trust-pickle, .pt/.pth")
    p.add_argument("--data", metavar="CALIB",
                   help="calibration inputs (no labels): a .npz, .npy or .pt file (see docs/recalibration.md) or a "
                        "folder of images (JPEG/PNG/WebP, class sub-folders allowed; see --preprocess)")
    p.add_argument("--key", action="append", metavar="NAME",
                   help="array/entry of CALIB to use as input, in order (repeat for several inputs)")
    p.add_argument("--batch-size", type=int, help="samples per batch (default: the model's fixed batch size "
                                                  "if it has one, else 64)")
    p.add_argument("--num-samples", type=int, help="use only the first N samples")
    p.add_argument("--num-batches", type=int, help="use only the first N batches")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading pickled .pt/.pth modules")
    add_data_source_args(p)


def _needs_data(args: argparse.Namespace) -> None:
    if not args.data and not args.data_factory:
        raise InputError(f"bnfold {args.command} needs data", hint="pass --data CALIB (a file or a folder of images) "
                                                                   "or --data-factory MODULE:CALLABLE")


def _recalibrate(args: argparse.Namespace) -> int:
    _needs_data(args)
    plan = OutputPlan([args.model, args.data], force=args.force)
    plan.file(args.output, is_ours=is_bnfold_pt2)
    loaded, batches = load_batches(args, args.data)
    assert batches is not None
    report = recalibrate(loaded.module, batches, num_batches=args.num_batches, num_samples=args.num_samples,
                         mode=args.mode, progress=False if args.no_progress else None)
    example = loaded.example_inputs or batches.first()
    dynamic = dynamic_shapes(loaded.module)

    def export(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
        return torch.export.export(module, inputs, dynamic_shapes=dynamic)

    artifact = get_target("torch").lower(loaded.module, example, {"export": export})
    artifact.save(args.output, protect=plan.protect)
    if args.json:
        print(report.to_json())
    else:
        print(report)
        print(f"\nwrote {args.output}")
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    if not math.isfinite(args.threshold) or args.threshold < 0:
        raise InputError(f"--threshold must be a finite number >= 0, got {args.threshold}")
    _needs_data(args)
    plan = OutputPlan([args.model, args.data], force=args.force)
    if args.html:
        from bnfold.htmlreport import is_bnfold_html

        plan.file(args.html, is_ours=is_bnfold_html)  # before any work
    loaded, batches = load_batches(args, args.data)
    assert batches is not None
    report = diagnose(loaded.module, batches, num_batches=args.num_batches, num_samples=args.num_samples,
                      threshold=args.threshold, progress=False if args.no_progress else None)
    if args.html:
        from bnfold.htmlreport import drift_page, write_page

        write_page(args.html, drift_page(report, str(args.model)), protect=plan.protect)
    print(report.to_json() if args.json else report.render(top=args.top))
    return 1 if args.check and report.should_recalibrate else 0
