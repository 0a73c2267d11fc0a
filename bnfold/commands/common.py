"""Arguments and helpers shared by subcommands."""

from __future__ import annotations

import argparse

import torch

from bnfold.errors import InputError
from bnfold.io import LoadedModel, load_model, parse_shapes

__all__ = ["add_model_args", "load_with_inputs"]


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file: .pt2 (torch.export.save) or, with --trust-pickle, .pt/.pth")
    p.add_argument("--input-shape", action="append", metavar="SHAPE",
                   help="example input shape, e.g. 1,3,224,224 (repeat for several inputs); "
                        "default: the example inputs stored in the .pt2")
    p.add_argument("--dtype", default="float32", help="dtype of --input-shape inputs (default float32)")
    p.add_argument("--capture", choices=["auto", "symbolic", "export"], default="auto",
                   help="graph capture: torch.fx symbolic tracing, torch.export, or auto (default)")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading pickled .pt/.pth modules")


def load_with_inputs(args: argparse.Namespace) -> tuple[LoadedModel, tuple[torch.Tensor, ...]]:
    loaded = load_model(args.model, trusted_pickle=args.trust_pickle)
    inputs = parse_shapes(args.input_shape, args.dtype) or loaded.example_inputs
    if inputs is None:
        raise InputError(f"{args.model} stores no example inputs", hint="pass --input-shape, e.g. 1,3,224,224")
    return loaded, inputs


def load_batches(args: argparse.Namespace, data: str | None) -> tuple[LoadedModel, list[tuple[torch.Tensor, ...]] | None]:
    """Load ``args.model`` and, when ``data`` is given, its input batches (see ``bnfold recalibrate``)."""
    if data is None:
        return load_model(args.model, trusted_pickle=args.trust_pickle), None
    from bnfold.commands.recalibrate_cmd import _load

    ns = argparse.Namespace(**{**vars(args), "data": data})
    for name in ("batch_size", "num_samples", "num_batches", "key"):
        setattr(ns, name, getattr(args, name, None))
    return _load(ns)
