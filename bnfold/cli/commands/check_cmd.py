"""``bnfold check REFERENCE CANDIDATE --data INPUTS`` and ``bnfold export-onnx MODEL -o OUT.onnx``.

``check`` loads both models through :data:`LOADERS` — a registry keyed by file type, so a new artifact kind
is one entry (:func:`register_loader`) — runs them on the user's batches (:func:`bnfold.io.data.load_tensors`) and
prints the parity report (``--json``: the full record). Exit code 0 on parity, 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bnfold.cli.commands import SUMMARY
from bnfold.cli.commands.common import add_data_source_args, check_input_shapes, open_args_data
from bnfold.errors import InputError
from bnfold.io.data import Batch, split_batches
from bnfold.io.data_checks import input_specs
from bnfold.io.models import load_model
from bnfold.io.stream import TensorFile
from bnfold.parity import ParityReport, compare
from bnfold.report import json_safe

__all__ = ["LOADERS", "Loaded", "Loader", "load_runnable", "register", "register_loader"]


@dataclass
class Loaded:
    """A model file made runnable: ``model`` is callable on torch tensors."""

    model: Callable[..., Any]
    kind: str
    path: Path
    example_inputs: tuple[torch.Tensor, ...] | None = None
    build_info: dict[str, Any] | None = None


@dataclass(frozen=True)
class Loader:
    """``matches(path)`` says whether this loader handles ``path``; ``load(path, trusted_pickle)`` loads it."""

    kind: str
    matches: Callable[[Path], bool]
    load: Callable[[Path, bool], Loaded]


def _load_torch(path: Path, trusted_pickle: bool) -> Loaded:
    loaded = load_model(path, trusted_pickle=trusted_pickle)
    return Loaded(loaded.module, loaded.kind, path, loaded.example_inputs)


def _load_onnx(path: Path, _trusted_pickle: bool) -> Loaded:
    from bnfold.targets.onnx import OnnxRuntimeModel

    model = OnnxRuntimeModel(path)
    return Loaded(model, "onnx", path, None, dict(model.build_info))


def _load_tvm(path: Path, trusted: bool) -> Loaded:
    """A compiled TVM folder: its ``model.so`` is native code that runs when loaded, so it is refused unless the
    user trusts it (``--trust-pickle``: the one switch for "this file may run code")."""
    import bnfold

    if not trusted and (path / "model.so").exists():
        raise InputError(f"{path}: a compiled TVM folder holds native code ({path / 'model.so'}) that runs as soon "
                         "as it is loaded; bnfold does not load code from a file without your consent",
                         hint="pass --trust-pickle if you built this folder or trust where it came from")

    load = getattr(bnfold, "load_artifact", None)
    if load is None:
        try:
            from bnfold.targets.tvm import load_artifact as load
        except ImportError as exc:
            raise InputError(f"{path} is a folder; compiled TVM artifacts need bnfold's TVM target",
                             hint="pip install 'bnfold[tvm]'") from exc
    artifact = load(path)
    return Loaded(artifact, "tvm", path, None, dict(getattr(artifact, "build_info", {}) or {}))


LOADERS: list[Loader] = [
    Loader("pt2", lambda p: p.suffix.lower() in (".pt2", ".pt", ".pth"), _load_torch),
    Loader("onnx", lambda p: p.suffix.lower() == ".onnx", _load_onnx),
    Loader("tvm", lambda p: p.is_dir(), _load_tvm),
]
"""Tried in order; the first whose ``matches`` accepts the path loads it."""


def register_loader(loader: Loader, *, first: bool = False) -> None:
    """Add a loader for another artifact kind (``first``: try it before the built-in ones)."""
    LOADERS.insert(0, loader) if first else LOADERS.append(loader)


def load_runnable(path: str | Path, *, trusted_pickle: bool = False, own_example_inputs: bool = False) -> Loaded:
    """Load ``path`` with the first matching entry of :data:`LOADERS`. ``own_example_inputs``: the caller has
    inputs, so a ``.pt2``'s stored example inputs that would need unpickling are skipped, not refused."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    for loader in LOADERS:
        if loader.matches(p):
            if loader.load is _load_torch and own_example_inputs:
                loaded = load_model(p, trusted_pickle=trusted_pickle, own_example_inputs=True)
                return Loaded(loaded.module, loaded.kind, p, loaded.example_inputs)
            return loader.load(p, trusted_pickle)
    kinds = ", ".join(loader.kind for loader in LOADERS)
    raise InputError(f"{p}: bnfold cannot run this kind of file ({p.suffix or 'no suffix'})",
                     hint=f"supported: {kinds} (.pt2 from torch.export.save, .onnx, a compiled TVM folder)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help=SUMMARY["check"][1],
                       description="Run REFERENCE and CANDIDATE on the same inputs and judge parity against a "
                                   "float64 copy of the reference. Exit 0 on parity, 1 on a failure.")
    p.add_argument("reference", help="reference model: .pt2 (or .onnx / a compiled TVM folder)")
    p.add_argument("candidate", help="candidate model: .pt2, .onnx or a compiled TVM folder")
    p.add_argument("--data", metavar="INPUTS",
                   help="input batches: a .npz/.npy/.pt file (see docs/parity.md) or a folder of images (see "
                        "--preprocess); without it, random inputs shaped like the reference's stored example inputs "
                        "(the report says so). A file is read whole; a folder of images or a factory is re-read by "
                        "every run")
    p.add_argument("--data-key", action="append", metavar="KEY",
                   help="arrays of an .npz (entries of a .pt dict) to use as inputs, in order (repeatable)")
    p.add_argument("--batch-size", type=int, help="split the data into batches of this many samples (a folder of "
                   "images: default 64)")
    add_data_source_args(p)
    p.add_argument("--dtype", help="cast floating-point inputs to this dtype (e.g. float32)")
    p.add_argument("--input-shape", action="append", metavar="SHAPE",
                   help="random inputs of this shape when there is no --data (repeat per input)")
    p.add_argument("--no-batch-check", action="store_true", help="skip the batch-independence check")
    p.add_argument("--no-localize", action="store_true", help="do not search for the first diverging node")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading files that run code: pickled .pt/.pth models, a compiled TVM folder")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--html", metavar="FILE", help="also write the report as a self-contained HTML page")
    p.add_argument("--force", action="store_true", help="replace FILE if it is an earlier bnfold report")
    p.set_defaults(func=_check)

    p = sub.add_parser("export-onnx", help=SUMMARY["export-onnx"][1])
    p.add_argument("model", help="model file: .pt2 (torch.export.save) or, with --trust-pickle, .pt/.pth")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (never the input file)")
    p.add_argument("--input-shape", action="append", metavar="SHAPE",
                   help="example input shape, e.g. 1,3,224,224 (repeat per input); default: the .pt2's own")
    p.add_argument("--dtype", default="float32", help="dtype of --input-shape inputs (default float32)")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    p.add_argument("--static-batch", action="store_true", help="keep the example's batch size fixed")
    p.add_argument("--opset", type=int, help="ONNX opset, 18..23 (default: the exporter's)")
    p.add_argument("--force", action="store_true", help="replace OUT if it is an earlier bnfold output")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime parity check")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading pickled .pt/.pth modules")
    p.add_argument("--json", action="store_true", help="print build info and parity as JSON")
    p.set_defaults(func=_export_onnx)


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise InputError(f"unknown dtype {name!r}", hint="use float32, float16, bfloat16 or float64")
    return dt


def _shapes(specs: list[str]) -> list[list[int]]:
    from bnfold.io.models import parse_shapes

    tensors = parse_shapes(specs) or ()
    return [list(t.shape) for t in tensors]


def _fit_batches(batches: Iterable[Batch], models: list[Loaded], notes: list[str]) -> Iterable[Batch]:
    """A ``.pt2`` exported with a fixed batch size only runs that size: re-split the data when it must."""
    for loaded in models:
        batches = _fit_one(batches, loaded, notes)
    return batches


def _fit_one(batches: Iterable[Batch], ref: Loaded, notes: list[str]) -> Iterable[Batch]:
    ex = ref.example_inputs
    first = next(iter(batches), None)
    if not ex or first is None or ex[0].dim() == 0:
        return batches
    b = int(ex[0].shape[0])
    if isinstance(batches, list) and all(t.dim() and t.shape[0] == b for batch in batches for t in batch[:1]):
        return batches
    try:
        with torch.no_grad():
            ref.model(*first)
        return batches
    except Exception:
        pass
    if not isinstance(batches, list):  # a stream: re-chunked as it is read
        from bnfold.io.stream import Rechunked

        notes.append(f"{ref.path.name} runs only batches of {b} (it was exported with a fixed batch size): the data "
                     f"was re-chunked into batches of {b}, a last smaller batch dropped")
        return Rechunked(batches, b, source=f"the data ({ref.path.name} runs batches of {b})")
    split = split_batches(batches, b)
    kept = [batch for batch in split if batch[0].shape[0] == b]
    dropped = sum(int(batch[0].shape[0]) for batch in split) - b * len(kept)
    notes.append(f"{ref.path.name} runs only batches of {b} (it was exported with a fixed batch size): the data "
                 f"was re-split into {len(kept)} batches of {b}"
                 + (f", dropping the last {dropped} samples" if dropped else ""))
    if not kept:
        raise InputError(f"the data has fewer than {b} samples, the batch size {ref.path.name} was exported with",
                         hint="re-export the model with a dynamic batch dimension, or pass more samples")
    return kept


def _check(args: argparse.Namespace) -> int:
    from bnfold.io.outputs import OutputPlan

    plan = OutputPlan([args.reference, args.candidate, args.data], force=args.force)
    if args.html:
        from bnfold.htmlreport import is_bnfold_html

        plan.file(args.html, is_ours=is_bnfold_html)  # before any work
    own = bool(args.data or args.input_shape)
    ref = load_runnable(args.reference, trusted_pickle=args.trust_pickle, own_example_inputs=own)
    cand = load_runnable(args.candidate, trusted_pickle=args.trust_pickle, own_example_inputs=own)
    notes: list[str] = []
    inputs: Iterable[Batch] | None = None
    shapes: list[list[int]] | None = None
    if args.batch_size is not None and args.batch_size <= 0:
        raise InputError(f"--batch-size must be positive, got {args.batch_size}")
    if args.data or args.data_factory:
        dtype = _dtype(args.dtype) or _model_dtype(ref) or _model_dtype(cand)
        specs = next((s for s in (_specs(ref), _specs(cand)) if s is not None), None)
        if specs is None and args.data and Path(args.data).is_dir():
            specs = _image_specs(ref, cand)
        stream = open_args_data(args, args.data, specs=specs, dtype=dtype, batch_size=args.batch_size or (
            64 if args.data and Path(args.data).is_dir() else None))
        # a file is read whole anyway (every batch checked before any work); a stream is re-read by every run
        inputs = list(stream) if isinstance(stream.inner, TensorFile) else stream
        inputs = _fit_batches(inputs, [ref, cand], notes)
    elif args.input_shape:
        shapes = _shapes(args.input_shape)
    elif ref.example_inputs is None and cand.example_inputs is None:
        raise InputError("no inputs to run the models on", hint="pass --data INPUTS (.npz/.npy/.pt or a folder of "
                                                                "images) or --input-shape")
    example = ref.example_inputs or cand.example_inputs
    report = compare(ref.model, cand.model, inputs, example_inputs=None if shapes else example,
                     input_shapes=shapes, batch_independence=not args.no_batch_check,
                     localize=not args.no_localize)
    report.notes[:0] = notes
    if args.html:
        from bnfold.htmlreport import parity_page, write_page

        write_page(args.html, parity_page(report, str(ref.path), str(cand.path)), protect=plan.protect)
    if args.json:
        record = {"reference": _describe(ref), "candidate": _describe(cand), "parity": report.to_dict()}
        print(json.dumps(json_safe(record), indent=2, allow_nan=False))
    else:
        print(f"bnfold check: reference {ref.path} ({ref.kind}), candidate {cand.path} ({cand.kind})")
        print(report.render())
    return 0 if report.passed else 1


def _image_specs(*models: Loaded) -> list[Any] | None:
    """For a folder of images and models that are not torch modules: the (N, C, H, W) of their stored example
    inputs, when one has any (the images are checked against it)."""
    from bnfold.io.data_checks import InputSpec

    ex = next((m.example_inputs for m in models if m.example_inputs), None)
    if not ex:
        return None
    return [InputSpec((None, *t.shape[1:]), t.dtype) for t in ex]


def _specs(loaded: Loaded) -> list[Any] | None:
    if isinstance(loaded.model, torch.nn.Module):
        return input_specs(loaded.model, loaded.example_inputs)
    return None


def _model_dtype(loaded: Loaded) -> torch.dtype | None:
    """The floating-point dtype a torch model's first floating input takes (data is cast to it)."""
    specs = _specs(loaded)
    return next((s.dtype for s in specs or () if s.dtype.is_floating_point), None)


def _describe(loaded: Loaded) -> dict[str, Any]:
    return {"path": str(loaded.path), "kind": loaded.kind, "build_info": loaded.build_info}


def _export_onnx(args: argparse.Namespace) -> int:
    from bnfold.io.models import parse_shapes
    from bnfold.io.outputs import OutputPlan
    from bnfold.targets.onnx import OnnxRuntimeModel, check_opset, export_onnx, is_bnfold_onnx

    check_opset(args.opset)
    plan = OutputPlan([args.model], force=args.force)
    plan.file(args.output, is_ours=is_bnfold_onnx)
    requested = parse_shapes(args.input_shape, args.dtype)
    loaded = load_model(args.model, trusted_pickle=args.trust_pickle, own_example_inputs=bool(args.input_shape))
    inputs = requested or loaded.example_inputs
    if inputs is None:
        raise InputError(f"{args.model} stores no example inputs", hint="pass --input-shape, e.g. 1,3,224,224")
    if requested:
        check_input_shapes(loaded.module, requested, args.input_shape)
    out = export_onnx(loaded.module, inputs, args.output, simplify=not args.no_simplify,
                      dynamic_batch=not args.static_batch, opset=args.opset, protect=plan.protect)
    report: ParityReport | None = None
    if not args.no_check:
        report = compare(loaded.module, OnnxRuntimeModel(out.path), None, example_inputs=inputs)
    if args.json:
        print(json.dumps({"output": str(out.path), "build_info": out.build_info,
                          "parity": None if report is None else report.to_dict()}, indent=2, allow_nan=False))
    else:
        info = out.build_info
        print(f"wrote {out.path}: {info['nodes']} nodes, opset {info['opset']}, "
              f"{'dynamic' if info['dynamic_batch'] else 'fixed'} batch, "
              f"{'simplified by onnxsim' if info['simplified'] else 'not simplified'}")
        if info.get("static_reason"):
            print(f"note: the batch is fixed: {info['static_reason']}")
        if report is not None:
            print(report.render())
    return 0 if report is None or report.passed else 1
