"""``bnfold recalibrate MODEL --data CALIB -o OUT`` and ``bnfold diagnose MODEL --data CALIB``.

CALIB is read by :func:`bnfold.data.load_tensors` (``.npz`` / ``.npy`` / ``.pt``; format in docs/recalibration.md)
and split into batches of ``--batch-size`` samples. Floating-point inputs are cast to the dtype of the model's
stored example inputs (float32 when it stores none).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import torch.fx

from bnfold.data import load_tensors
from bnfold.drift import DEFAULT_THRESHOLD, diagnose
from bnfold.errors import InputError
from bnfold.io import LoadedModel, load_model, save_exported
from bnfold.recalibrate import recalibrate

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recalibrate", help="re-estimate BatchNorm statistics exactly on calibration data, save .pt2")
    _add_common(p)
    p.add_argument("-o", "--output", required=True, help="output .pt2 path (never the input file)")
    p.add_argument("--mode", choices=["batch", "sequential"], default="batch",
                   help="batch: layers normalize with batch statistics while measuring (1 pass, default); "
                        "sequential: inference-exact, one pass per BatchNorm layer")
    p.set_defaults(func=_recalibrate)

    p = sub.add_parser("diagnose", help="compare stored BatchNorm statistics with what the layers see on data")
    _add_common(p)
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"drift score above which recalibration is advised (default {DEFAULT_THRESHOLD})")
    p.add_argument("--top", type=int, help="show only the TOP most drifted layers")
    p.add_argument("--check", action="store_true", help="exit with code 1 when recalibration is advised")
    p.set_defaults(func=_diagnose)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file: .pt2 (torch.export.save) or, with --trust-pickle, .pt/.pth")
    p.add_argument("--data", required=True, metavar="CALIB",
                   help="calibration inputs (no labels): .npz, .npy or .pt (see docs/recalibration.md)")
    p.add_argument("--key", action="append", metavar="NAME",
                   help="array/entry of CALIB to use as input, in order (repeat for several inputs)")
    p.add_argument("--batch-size", type=int, help="samples per batch (default: the model's fixed batch size "
                                                  "if it has one, else 64)")
    p.add_argument("--num-samples", type=int, help="use only the first N samples")
    p.add_argument("--num-batches", type=int, help="use only the first N batches")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading pickled .pt/.pth modules")


def _recalibrate(args: argparse.Namespace) -> int:
    loaded, batches = _load(args)
    report = recalibrate(loaded.module, batches, num_batches=args.num_batches, num_samples=args.num_samples,
                         mode=args.mode, progress=False if args.no_progress else None)
    example = loaded.example_inputs or batches[0]
    dynamic = _dynamic_shapes(loaded.module)

    def export(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
        return torch.export.export(module, inputs, dynamic_shapes=dynamic)

    save_exported(loaded.module, example, args.output, protect=[args.model], export=export)
    if args.json:
        print(report.to_json())
    else:
        print(report)
        print(f"\nwrote {args.output}")
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    loaded, batches = _load(args)
    report = diagnose(loaded.module, batches, num_batches=args.num_batches, num_samples=args.num_samples,
                      threshold=args.threshold, progress=False if args.no_progress else None)
    print(report.to_json() if args.json else report.render(top=args.top))
    return 1 if args.check and report.should_recalibrate else 0


def _load(args: argparse.Namespace) -> tuple[LoadedModel, list[tuple[torch.Tensor, ...]]]:
    for name in ("batch_size", "num_samples", "num_batches", "top"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {value}")
    loaded = load_model(args.model, trusted_pickle=args.trust_pickle)
    example = loaded.example_inputs
    dtype = next((t.dtype for t in example or () if t.is_floating_point()), torch.float32)
    fixed = _fixed_batch(loaded.module)
    batch_size = args.batch_size or fixed or 64
    if fixed is not None and batch_size != fixed:
        raise InputError(f"{args.model} was exported with a fixed batch size of {fixed}; --batch-size {batch_size} "
                         "cannot run", hint=f"use --batch-size {fixed}, or re-export the model with a dynamic "
                                            "batch dimension (torch.export.Dim)")
    if fixed is not None and args.num_samples is not None and args.num_samples % fixed:
        raise InputError(f"--num-samples {args.num_samples} is not a multiple of the model's fixed batch size {fixed}")
    batches = load_tensors(args.data, keys=args.key, batch_size=batch_size, dtype=dtype)
    if example is not None and len(batches[0]) != len(example):
        raise InputError(f"{args.data} gives {len(batches[0])} input tensors per batch but the model takes "
                         f"{len(example)}", hint="choose the model inputs with --key NAME (labels do not belong "
                                                 "in calibration data)")
    if fixed is not None and batches[-1][0].shape[0] != fixed:
        print(f"bnfold: note: dropping the last {batches[-1][0].shape[0]} samples (the model's batch size is fixed "
              f"at {fixed})", file=sys.stderr)
        batches = batches[:-1]
        if not batches:
            raise InputError(f"{args.data} holds fewer samples than the model's fixed batch size {fixed}")
    return loaded, batches


def _input_values(module: torch.nn.Module) -> list[Any]:
    if not isinstance(module, torch.fx.GraphModule):
        return []
    return [n.meta.get("val") for n in module.graph.nodes if n.op == "placeholder"]


def _fixed_batch(module: torch.nn.Module) -> int | None:
    """The batch size a torch.export graph was specialized to, or None when dynamic/unknown."""
    values = [v for v in _input_values(module) if isinstance(v, torch.Tensor) and v.dim() > 0]
    if not values:
        return None
    first = values[0].shape[0]
    return first if isinstance(first, int) else None


def _dynamic_shapes(module: torch.nn.Module) -> tuple[dict[int, Any], ...] | None:
    """Keep the dynamic dimensions of a loaded .pt2 when it is exported again."""
    values = _input_values(module)
    if not values or not all(isinstance(v, torch.Tensor) for v in values):
        return None
    shapes = tuple({i: torch.export.Dim.AUTO for i, d in enumerate(v.shape) if not isinstance(d, int)}
                   for v in values)
    return shapes if any(shapes) else None
