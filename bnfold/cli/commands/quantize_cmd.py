"""``bnfold quantize MODEL --data CALIB -o OUT_DIR [--per-tensor]``: a verified int8 ONNX model.

In: a ``.pt2`` model (or a pickled module with ``--trust-pickle``, or a state dict with ``--model-factory``) and
unlabeled calibration data. Out: ``OUT_DIR`` with ``model_fp32.onnx`` (the folded float model), ``model_int8.onnx``
(QDQ: int8 weights per channel, or per tensor with ``--per-tensor``; uint8 activations calibrated on CALIB) and
``report.json``/``report.txt``. Exit code 0 when the fold keeps parity and the int8 model passes the int8 rule
(SQNR and top-1 agreement against the float model on ``--validate`` data, default: CALIB), 1 when not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch.fx

from bnfold.cli.commands import SUMMARY, onnx_cmd
from bnfold.cli.commands.common import add_data_source_args, add_factory_args, load_batches, open_args_data
from bnfold.deploy.ownership import owned_entries
from bnfold.errors import InputError
from bnfold.io.data_checks import check_model_runs, input_specs
from bnfold.io.outputs import OutputPlan
from bnfold.parity.int8 import DEFAULT_MIN_SQNR_DB, DEFAULT_MIN_TOP1, Int8Rule
from bnfold.quantization import Int8Options, quantize
from bnfold.report import json_safe

__all__ = ["add_int8_rule_args", "int8_rule", "register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help=SUMMARY["quantize"][1])
    p.add_argument("model", help="model file: .pt2 (torch.export.save) or, with --trust-pickle, .pt/.pth")
    p.add_argument("--data", metavar="CALIB", help="unlabeled calibration inputs (a .npz/.npy/.pt file or a folder "
                   "of images, see --preprocess; or --data-factory): activation ranges, and the statistics of bias "
                   "correction, come from them (the int8 step keeps these batches in memory)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder (created; must be new or "
                   "empty unless --force)")
    p.add_argument("--per-tensor", action="store_true", help="one int8 scale per weight tensor (default: one per "
                   "output channel)")
    p.add_argument("--validate", metavar="DATA", help="inputs to judge the int8 model on, a file or a folder of "
                   "images (default: the first 8 batches of CALIB)")
    p.add_argument("--no-equalize", action="store_true", help="no cross-layer equalization")
    p.add_argument("--no-absorb", action="store_true", help="no bias absorption")
    p.add_argument("--keep-clamps", action="store_true", help="never turn a ReLU6/clamp into a per-channel clamp "
                   "(equalization and absorption leave those layer pairs): faster in ONNX Runtime, which runs a "
                   "per-channel clamp as a float op, at the cost of less equalization")
    p.add_argument("--bias-correction", choices=["auto", "data", "bn", "none"], default="auto",
                   help="correct biases for the int8 weight error, with statistics measured on CALIB (data, the "
                        "default 'auto'), from the BatchNorm statistics that preceded the fold (bn: data-free), or "
                        "not at all (none)")
    add_int8_rule_args(p)
    p.add_argument("--key", action="append", metavar="NAME", help="array of the data files to use as input")
    p.add_argument("--batch-size", type=int, help="samples per batch (default: the model's batch size, else 64)")
    p.add_argument("--num-samples", type=int, help="use only the first N calibration samples")
    p.add_argument("--num-batches", type=int, help="use only the first N calibration batches")
    p.add_argument("--capture", choices=["auto", "symbolic", "export"], default="auto")
    p.add_argument("--reparameterize", action=argparse.BooleanOptionalAction, default=True,
                   help="merge parallel conv/identity branches summed at an add into one conv (default: on)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it is an earlier bnfold output")
    p.add_argument("--explain", action="store_true", help="list every layer pair left alone, with the reason, "
                   "and the weight-range spread of every layer equalization changed")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading pickled .pt/.pth modules")
    add_factory_args(p)
    add_data_source_args(p)
    p.set_defaults(func=_quantize)


def add_int8_rule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-sqnr", type=float, default=DEFAULT_MIN_SQNR_DB, metavar="DB",
                   help=f"int8 parity: output SQNR against the float model at least DB (default "
                        f"{DEFAULT_MIN_SQNR_DB:g})")
    p.add_argument("--min-top1", type=float, default=DEFAULT_MIN_TOP1, metavar="FRACTION",
                   help=f"int8 parity: top-1 agreement of classifier outputs at least FRACTION (default "
                        f"{DEFAULT_MIN_TOP1:g})")


def int8_rule(args: argparse.Namespace) -> Int8Rule:
    """The int8 rule from ``--min-sqnr``/``--min-top1``, checked before any work."""
    if not math.isfinite(args.min_sqnr):
        raise InputError(f"--min-sqnr must be a finite number of dB, got {args.min_sqnr}")
    if not 0.0 <= args.min_top1 <= 1.0:
        raise InputError(f"--min-top1 is a fraction between 0 and 1, got {args.min_top1}")
    return Int8Rule(min_sqnr_db=args.min_sqnr, min_top1=args.min_top1)


def _quantize(args: argparse.Namespace) -> int:
    if onnx_cmd.is_onnx(args.model):
        raise InputError("bnfold quantize takes a torch model (.pt2, or .pt/.pth with --trust-pickle): it folds, "
                         "equalizes and corrects biases in the torch graph before exporting",
                         hint="quantize the torch model the .onnx file was exported from")
    rule = int8_rule(args)
    plan = OutputPlan([args.model, args.data, args.validate], force=args.force)
    plan.folder(args.output, owned=owned_entries)  # before any work
    if not args.data and not args.data_factory:
        raise InputError("bnfold quantize needs calibration data", hint="pass --data CALIB (a file or a folder of "
                                                                        "images) or --data-factory MODULE:CALLABLE")
    loaded, stream = load_batches(args, args.data, limit=True)
    assert stream is not None
    calibration = list(stream)  # ONNX Runtime's calibration and bias correction take a list of batches
    inputs = loaded.example_inputs or calibration[0]
    validation = None
    if args.validate:
        dtype = next((t.dtype for t in inputs if t.is_floating_point()), None)
        checked = open_args_data(args, args.validate, factory=False, specs=input_specs(loaded.module, inputs),
                                 dtype=dtype, batch_size=args.batch_size or (64 if Path(args.validate).is_dir()
                                                                             else None))
        validation = list(checked)
        if not isinstance(loaded.module, torch.fx.GraphModule):
            check_model_runs(loaded.module, validation[0], args.validate)
    options = Int8Options(per_channel=not args.per_tensor, equalize=not args.no_equalize, absorb=not args.no_absorb,
                          bias_correction=args.bias_correction, rule=rule, move_clamps=not args.keep_clamps)
    result = quantize(loaded.module, inputs, args.output, calibration=calibration, validation=validation,
                      options=options, capture=args.capture, overwrite=args.force, protect=plan.protect,
                      reparameterize=args.reparameterize)
    if args.json:
        print(json.dumps(json_safe(result.to_dict()), indent=2, default=str, allow_nan=False))
    else:
        print(result.render(explain=args.explain))
    return 0 if result.passed else 1
