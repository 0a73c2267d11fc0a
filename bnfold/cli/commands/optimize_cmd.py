"""``bnfold optimize MODEL --data CALIB -o OUT_DIR``: the one-command pre-deployment step.

In: a ``.pt2`` model (and, optionally, unlabeled calibration data and validation data). Out: ``OUT_DIR`` with
``folded.pt2``, ``model.onnx``, ``tvm/`` and ``report.json``/``report.txt``/``report.html``; exit code 0 when every
stage keeps parity, 1 when one does not (the report says where the divergence starts), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch.fx

from bnfold.cli.commands import SUMMARY, onnx_cmd
from bnfold.cli.commands.common import (
    add_data_source_args,
    add_factory_args,
    check_cache_dir,
    check_target_options,
    load_batches,
    open_args_data,
)
from bnfold.cli.commands.quantize_cmd import add_int8_rule_args, int8_rule
from bnfold.deploy import FoldStage, OptimizeConfig, RecalibrateStage, run
from bnfold.deploy.ownership import owned_entries
from bnfold.errors import InputError
from bnfold.io.data_checks import check_model_runs, input_specs
from bnfold.io.outputs import OutputPlan
from bnfold.io.stream import TensorFile
from bnfold.quantization.stage import Int8Options
from bnfold.report import json_safe
from bnfold.targets.options import OnnxOptions, TvmOptions, parse_option

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("optimize", help=SUMMARY["optimize"][1])
    p.add_argument("model", help="model file: .pt2 (torch.export.save) or, with --trust-pickle, .pt/.pth")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder (created; must be "
                   "new or empty unless --force)")
    p.add_argument("--data", metavar="CALIB", help="unlabeled calibration inputs (a .npz/.npy/.pt file or a folder "
                   "of images, see --preprocess): recalibrate BatchNorm statistics on them before folding")
    p.add_argument("--validate", metavar="DATA", help="validation inputs for the parity checks, a file or a folder "
                   "of images (default: the first 8 batches of CALIB, else the model's example inputs)")
    p.add_argument("--key", action="append", metavar="NAME", help="array of the data files to use as input")
    p.add_argument("--batch-size", type=int, help="samples per batch (default: the model's batch size)")
    p.add_argument("--num-samples", type=int, help="use only the first N calibration samples")
    p.add_argument("--num-batches", type=int, help="use only the first N calibration batches")
    p.add_argument("--mode", choices=["batch", "sequential"], default="batch", help="recalibration mode")
    p.add_argument("--capture", choices=["auto", "symbolic", "export"], default="auto")
    p.add_argument("--target", choices=["llvm", "cuda", "none"], default="llvm", help="TVM target (none: skip TVM)")
    p.add_argument("--arch", help="CUDA architecture, e.g. sm_90a (with --target cuda)")
    p.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials for the CPU build (0: apply the "
                   "cached tuning database only)")
    p.add_argument("--cache-dir", help="tuning database folder (shared across models)")
    p.add_argument("--tvm-option", action="append", metavar="KEY=VALUE", default=[],
                   help="another TVM build option, e.g. layout=NHWC, mcpu=skylake-avx512, num_cores=4, prepack=false "
                        "(repeatable; the names of bnfold.targets.options.TvmOptions)")
    p.add_argument("--no-html", action="store_true", help="do not write report.html")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    p.add_argument("--int8", action="store_true", help="also write model_int8.onnx: equalized, bias-corrected and "
                   "quantized by ONNX Runtime on CALIB, judged by the int8 rule, timed beside fp32 (needs --data)")
    p.add_argument("--per-tensor", action="store_true", help="with --int8: one int8 scale per weight tensor "
                   "(default: per output channel)")
    p.add_argument("--keep-clamps", action="store_true", help="with --int8: never turn a ReLU6 into a per-channel "
                   "clamp (faster in ONNX Runtime, less equalization; see bnfold quantize --help)")
    add_int8_rule_args(p)
    p.add_argument("--reparameterize", action=argparse.BooleanOptionalAction, default=None,
                   help="merge parallel conv/identity branches summed at an add into one conv (default: on for a "
                        "torch model; an .onnx model is not reparameterized)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it is an earlier bnfold optimize output "
                   "(never a folder holding other files or the inputs)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading pickled .pt/.pth modules")
    add_factory_args(p)
    add_data_source_args(p)
    p.set_defaults(func=_optimize)


def _optimize(args: argparse.Namespace) -> int:
    if onnx_cmd.is_onnx(args.model) and (args.int8 or args.per_tensor or args.keep_clamps):
        raise InputError("--int8 applies to a torch model (bnfold prepares the int8 model in the torch graph)",
                         hint="optimize the torch model the .onnx file was exported from")
    if onnx_cmd.is_onnx(args.model):
        if args.tvm_option:
            raise InputError("--tvm-option applies to the build of a torch model; an .onnx model's TVM build takes "
                             "--target, --arch, --tune-trials and --cache-dir",
                             hint="use `bnfold compile` for the other build options")
        return onnx_cmd.optimize(args)
    if args.tune_trials < 0:
        raise InputError(f"--tune-trials must be >= 0, got {args.tune_trials}")
    check_target_options(args.target, args.arch)
    check_cache_dir(args.cache_dir)
    tvm_extra = dict(parse_option(TvmOptions, o, what="TVM") for o in args.tvm_option)
    if tvm_extra and args.target == "none":
        raise InputError("--tvm-option applies to a TVM build; --target none skips it")
    if {"target", "arch", "tune_trials", "cache_dir"} & set(tvm_extra):
        raise InputError("--tvm-option sets the build options that have no flag of their own",
                         hint="use --target, --arch, --tune-trials, --cache-dir")
    tvm = None if args.target == "none" else TvmOptions(target=args.target, arch=args.arch,
                                                        tune_trials=args.tune_trials, cache_dir=args.cache_dir,
                                                        progress=False, **tvm_extra)
    int8 = None
    if args.int8:
        if not args.data and not args.data_factory:
            raise InputError("--int8 needs --data CALIB: ONNX Runtime calibrates the int8 activation ranges on it")
        int8 = Int8Options(per_channel=not args.per_tensor, rule=int8_rule(args), move_clamps=not args.keep_clamps)
    elif args.per_tensor or args.keep_clamps:
        raise InputError("--per-tensor and --keep-clamps apply to --int8")
    plan = OutputPlan([args.model, args.data, args.validate], force=args.force)
    plan.folder(args.output, owned=owned_entries)  # before any work
    loaded, calibration = load_batches(args, args.data, limit=True)
    inputs = loaded.example_inputs or (calibration.first() if calibration is not None else None)
    if inputs is None:
        raise InputError(f"{args.model} stores no example inputs and no --data was given",
                         hint="pass --data CALIB (its first batch is used as example inputs)")
    validation = None
    if args.validate:
        dtype = next((t.dtype for t in inputs if t.is_floating_point()), None)
        validation = open_args_data(args, args.validate, factory=False, specs=input_specs(loaded.module, inputs),
                                    dtype=dtype, batch_size=args.batch_size or (64 if Path(args.validate).is_dir()
                                                                                else None))
        if isinstance(validation.inner, TensorFile):  # read whole anyway: every batch checked before any work
            validation = list(validation)
        first = validation[0] if isinstance(validation, list) else validation.first()  # checked before any work
        if not isinstance(loaded.module, torch.fx.GraphModule):
            check_model_runs(loaded.module, first, args.validate)
        del first
    config = OptimizeConfig(recalibrate=RecalibrateStage(mode=args.mode),
                            fold=FoldStage(capture=args.capture, reparameterize=args.reparameterize is not False),
                            onnx=None if args.no_onnx else OnnxOptions(), tvm=tvm, int8=int8, overwrite=args.force,
                            protect=tuple(plan.protect), html=not args.no_html)
    result = run(loaded.module, inputs, args.output, config, calibration=calibration, validation=validation)
    print(json.dumps(json_safe(result.to_dict()), indent=2, default=str, allow_nan=False) if args.json else result)
    return 0 if result.passed else 1
