"""``bnfold inspect MODEL`` (dry run) and ``bnfold fold MODEL -o OUT``."""

from __future__ import annotations

import argparse
import sys

from bnfold.api import fold, inspect
from bnfold.cli.commands import SUMMARY, onnx_cmd
from bnfold.cli.commands.common import add_model_args, check_until, dump_target, load_with_inputs
from bnfold.errors import InputError
from bnfold.io.outputs import OutputPlan
from bnfold.targets import get_target
from bnfold.targets.torch import is_bnfold_pt2

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help=SUMMARY["inspect"][1])
    add_model_args(p)
    p.add_argument("--explain", action="store_true", help="print the full reason for every candidate left")
    _add_reparameterize(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("fold", help=SUMMARY["fold"][1])
    add_model_args(p)
    p.add_argument("-o", "--output", required=True, help="output .pt2 path (.onnx for an .onnx model; never the input "
                   "file)")
    p.add_argument("--force", action="store_true", help="replace OUT if it is an earlier bnfold output")
    p.add_argument("--until", help="stop after this pass (debugging; the passes of the model's pipeline: torch.fx or "
                   "ONNX)")
    p.add_argument("--dump-ir", nargs="?", const="-", metavar="DIR",
                   help="the graph before and after every pass that changes it: on stderr, or one file per such pass "
                        "in DIR (created; it must be empty)")
    p.add_argument("--data", metavar="DATA", help="inputs for the parity check (.npz/.npy/.pt; an .onnx model only)")
    p.add_argument("--key", action="append", metavar="NAME", help="array of --data to use as input (repeatable)")
    p.add_argument("--batch-size", type=int, help="samples per parity batch (default: the model's fixed batch, or 64)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_reparameterize(p)
    p.set_defaults(func=_fold)


def _add_reparameterize(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reparameterize", action=argparse.BooleanOptionalAction, default=False,
                   help="merge parallel conv/identity branches summed at an add (RepVGG, MobileOne, FastViT) into "
                        "one conv, exactly; changes which modules the folded model has (default: off; "
                        "bnfold optimize does it)")


def _inspect(args: argparse.Namespace) -> int:
    if onnx_cmd.is_onnx(args.model):
        return onnx_cmd.inspect(args)
    loaded, inputs = load_with_inputs(args)
    report = inspect(loaded.module, inputs, capture=args.capture, reparameterize=args.reparameterize)
    print(report.to_json() if args.json else report.render(explain=args.explain))
    return 0


def _fold(args: argparse.Namespace) -> int:
    if onnx_cmd.is_onnx(args.model):
        return onnx_cmd.fold(args)
    for given, spelled in ((args.data, "--data (parity inputs)"), (args.key, "--key"),
                           (args.batch_size, "--batch-size")):
        if given:
            raise InputError(f"{spelled} applies to an .onnx model here",
                             hint="for a torch model, check parity on your data with `bnfold check` or `bnfold "
                                  "optimize --validate DATA`")
    check_until(args.until)
    plan = OutputPlan([args.model], force=args.force)
    plan.file(args.output, is_ours=is_bnfold_pt2)
    loaded, inputs = load_with_inputs(args)
    result = fold(loaded.module, inputs, capture=args.capture, until=args.until,
                  dump_ir=dump_target(args.dump_ir, sys.stderr), reparameterize=args.reparameterize)
    get_target("torch").lower(result.module, inputs, {"dynamic_shapes": result.dynamic_shapes}).save(
        args.output, protect=plan.protect)
    print(result.report.to_json() if args.json else result.report)
    if not args.json:
        print(f"\nwrote {args.output}")
    parity = result.report.parity or {}
    return 0 if parity.get("passed", True) else 1
