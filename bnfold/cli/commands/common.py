"""Arguments and helpers shared by subcommands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import IO, Any

import torch
import torch.fx

from bnfold.errors import InputError
from bnfold.io.data_checks import InputSpec, check_model_runs, input_specs
from bnfold.io.models import LoadedModel, load_model, parse_shapes
from bnfold.io.stream import CheckedData, TensorFile, open_data

__all__ = ["add_data_source_args", "add_factory_args", "add_model_args", "check_input_shapes", "check_target_options",
           "check_until", "dump_target", "dynamic_shapes", "fixed_batch", "load_any", "load_batches",
           "load_with_inputs", "open_args_data"]


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file: .pt2 (torch.export.save) or, with --trust-pickle, .pt/.pth")
    p.add_argument("--input-shape", action="append", metavar="SHAPE",
                   help="example input shape, e.g. 1,3,224,224 (repeat for several inputs); "
                        "default: the example inputs stored in the .pt2")
    p.add_argument("--dtype", default="float32", help="dtype of --input-shape inputs (default float32)")
    p.add_argument("--capture", choices=["auto", "symbolic", "export"], default="auto",
                   help="graph capture: torch.fx symbolic tracing, torch.export, or auto (default)")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading pickled .pt/.pth modules")
    add_factory_args(p)


def add_factory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-factory", metavar="MODULE:CALLABLE", help="build the model with this callable (e.g. "
                   "torchvision.models:resnet18) and load MODEL as its state_dict (torch.load weights_only=True)")
    p.add_argument("--factory-kwargs", metavar="JSON", help='keyword arguments for --model-factory, e.g. '
                   '\'{"num_classes": 10}\'')
    p.add_argument("--allow-missing-keys", action="store_true", help="with --model-factory: let parameters the "
                   "state_dict lacks keep their initialization (default: an error)")


def load_any(args: argparse.Namespace, *, own_example_inputs: bool = False) -> LoadedModel:
    """``load_model``, or a ``--model-factory`` model with MODEL as its state_dict (missing/unexpected keys are
    printed on stderr)."""
    spec = getattr(args, "model_factory", None)
    if not spec:
        if getattr(args, "factory_kwargs", None):
            raise InputError("--factory-kwargs needs --model-factory")
        return load_model(args.model, trusted_pickle=args.trust_pickle, own_example_inputs=own_example_inputs)
    from pathlib import Path

    from bnfold.io.factory import load_factory_model, parse_factory_kwargs

    kwargs = parse_factory_kwargs(getattr(args, "factory_kwargs", None))
    made = load_factory_model(spec, args.model, kwargs=kwargs, allow_missing=getattr(args, "allow_missing_keys",
                                                                                     False))
    if made.missing:
        print(f"bnfold: note: {len(made.missing)} parameters kept their initialization (--allow-missing-keys): "
              f"{', '.join(made.missing[:8])}{', …' if len(made.missing) > 8 else ''}", file=sys.stderr)
    if made.unexpected:
        print(f"bnfold: note: {len(made.unexpected)} entries of {args.model} fit no parameter and were ignored: "
              f"{', '.join(made.unexpected[:8])}{', …' if len(made.unexpected) > 8 else ''}", file=sys.stderr)
    return LoadedModel(made.module, None, Path(args.model), "factory")


def check_target_options(target: str | None, arch: str | None) -> None:
    """``--arch`` goes with ``--target cuda`` and is spelled like ``sm_90a`` (checked before any work)."""
    if arch is None:
        return
    if target != "cuda":
        raise InputError(f"--arch {arch} applies only to --target cuda")
    if not arch.startswith("sm_") or not arch[3:].rstrip("af").isdigit():
        raise InputError(f"--arch {arch!r} is not a CUDA architecture", hint="write it like sm_80, sm_89 or sm_90a")


def check_cache_dir(cache_dir: str | None) -> None:
    """``--cache-dir`` is a folder or a path that can become one (checked before any work, tuned or not)."""
    if cache_dir is None:
        return
    p = Path(cache_dir)
    if p.exists() and not p.is_dir():
        raise InputError(f"--cache-dir {p} is a file, not a folder", hint="point it at a folder (created if absent)")
    parent = next((q for q in p.absolute().parents if q.exists()), None)
    if not p.exists() and parent is not None and not parent.is_dir():
        raise InputError(f"--cache-dir {p} cannot be created: {parent} is a file")


def check_until(until: str | None, *, onnx: bool = False) -> None:
    """``--until`` names a pass of the model's pipeline (torch.fx, or ``onnx``; checked before any work)."""
    if onnx:
        from bnfold.passes.onnx import check_until as check_onnx

        check_onnx(until, spelled="--until ")
        return
    from bnfold.passes import check_until as check

    check(until, spelled="--until ")


def dump_target(dump_ir: str | None, stream: IO[str]) -> IO[str] | Path | None:
    """Where ``--dump-ir`` writes: ``stream`` for the bare flag, else the folder it names — created, and refused
    when it exists and is not empty (bnfold never writes among files it did not write)."""
    if dump_ir is None:
        return None
    if dump_ir == "-":
        return stream
    folder = Path(dump_ir)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(f"--dump-ir {folder}: {'not a folder' if not folder.is_dir() else 'the folder is not empty'}",
                         hint="name a new or empty folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--dump-ir {folder} cannot be created: {exc.strerror or exc}") from exc
    return folder


def load_with_inputs(args: argparse.Namespace) -> tuple[LoadedModel, tuple[torch.Tensor, ...]]:
    """Load ``args.model`` and its example inputs (``--input-shape``, checked against the model, or the ones
    stored in the file)."""
    requested = parse_shapes(args.input_shape, args.dtype)  # before loading: a typo costs nothing
    loaded = load_any(args, own_example_inputs=bool(args.input_shape))
    inputs = requested or loaded.example_inputs
    if inputs is None:
        raise InputError(f"{args.model} stores no example inputs", hint="pass --input-shape, e.g. 1,3,224,224")
    if requested:
        check_input_shapes(loaded.module, requested, args.input_shape)
    return loaded, inputs


def check_input_shapes(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], specs: list[str]) -> None:
    """``--input-shape`` tensors fit a ``torch.export`` graph's inputs (rank and static sizes, batch included)."""
    expected = input_specs(module)
    if expected is None or not isinstance(module, torch.fx.GraphModule):
        check_model_runs(module, inputs, "--input-shape " + " ".join(specs))  # shapes unknown: try them
        return
    if len(inputs) != len(expected):
        raise InputError(f"{len(inputs)} --input-shape given but the model takes {len(expected)} inputs "
                         f"({', '.join(s.describe() for s in expected)})")
    for spec_text, t, spec in zip(specs, inputs, expected, strict=True):
        if t.dtype != spec.dtype and t.dtype.is_floating_point and spec.dtype.is_floating_point:
            raise InputError(f"--input-shape {spec_text} makes {str(t.dtype).removeprefix('torch.')} inputs but the "
                             f"model takes {str(spec.dtype).removeprefix('torch.')}",
                             hint=f"pass --dtype {str(spec.dtype).removeprefix('torch.')}")
        ok = t.dim() == len(spec.sizes) and all(w is None or g == w for g, w in zip(t.shape, spec.sizes,
                                                                                   strict=True))
        if not ok:
            raise InputError(f"--input-shape {spec_text} does not fit the model's input {spec.describe()}",
                             hint="N marks a dynamic dimension; the others must match")


def add_data_source_args(p: argparse.ArgumentParser) -> None:
    """``--preprocess`` (a folder of images), ``--data-factory`` and ``--data-kwargs`` (data from the user's code)."""
    p.add_argument("--preprocess", metavar="SPEC", help="with --data FOLDER of images: 'imagenet' (resize 256, "
                   "centre crop 224, ImageNet mean/std) or key=value,... with resize=S|HxW, crop=S|HxW, mean=M[/M/M], "
                   "std=S[/S/S], color=gray (e.g. resize=32,crop=28,mean=0.5,std=0.25; imagenet,crop=192); default: "
                   "pixels scaled to [0, 1], no resize")
    p.add_argument("--data-factory", metavar="MODULE:CALLABLE", help="calibration batches from your code: the "
                   "callable returns an iterable of batches (a DataLoader); called once per pass over the data. "
                   "Naming it is consent to run it")
    p.add_argument("--data-kwargs", metavar="JSON", help='keyword arguments for --data-factory, e.g. '
                   '\'{"root": "/data/val", "batch_size": 32}\'')


def open_args_data(args: argparse.Namespace, data: str | None, *, factory: bool = True,
                   specs: list[InputSpec] | None = None, dtype: torch.dtype | None = None,
                   batch_size: int | None = None, exact: int | None = None, limit: bool = False) -> CheckedData:
    """``data`` (a file or a folder of images) or, with ``factory``, ``--data-factory`` as a checked stream
    (:func:`bnfold.io.stream.open_data`). ``limit``: apply ``--num-samples``/``--num-batches`` to it."""
    from bnfold.io.factory import parse_factory_kwargs

    spec = getattr(args, "data_factory", None) if factory else None
    kwargs = parse_factory_kwargs(getattr(args, "data_kwargs", None), "--data-kwargs")
    if kwargs and not spec:
        raise InputError("--data-kwargs needs --data-factory")
    keys = getattr(args, "key", None) or getattr(args, "data_key", None)
    return open_data(data if not spec else None, factory=spec, factory_kwargs=kwargs, keys=keys,
                     batch_size=batch_size, preprocess=getattr(args, "preprocess", None), specs=specs, dtype=dtype,
                     exact=exact, num_samples=getattr(args, "num_samples", None) if limit else None,
                     num_batches=getattr(args, "num_batches", None) if limit else None)


def _load_with_data(args: argparse.Namespace, data: str | None, *, limit: bool
                    ) -> tuple[LoadedModel, CheckedData]:
    opt = {name: getattr(args, name, None) for name in ("batch_size", "num_samples", "num_batches", "top")}
    for name, value in opt.items():
        if value is not None and value <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if data is not None and getattr(args, "data_factory", None):
        raise InputError("give the calibration data as --data PATH or as --data-factory, not both")
    loaded = load_any(args, own_example_inputs=True)
    example = loaded.example_inputs
    specs = input_specs(loaded.module, example)
    dtype = next((s.dtype for s in specs or () if s.dtype.is_floating_point), torch.float32)
    fixed = fixed_batch(loaded.module)
    batch_size = opt["batch_size"] or fixed
    if fixed is not None and batch_size != fixed:
        raise InputError(f"{args.model} was exported with a fixed batch size of {fixed}; --batch-size {batch_size} "
                         "cannot run", hint=f"use --batch-size {fixed}, or re-export the model with a dynamic "
                                            "batch dimension (torch.export.Dim)")
    num_samples = opt["num_samples"]
    if fixed is not None and num_samples is not None and num_samples % fixed:
        raise InputError(f"--num-samples {num_samples} is not a multiple of the model's fixed batch size {fixed}")
    factory = getattr(args, "data_factory", None)
    stream = open_args_data(args, data, specs=specs, dtype=dtype,
                            batch_size=batch_size or (None if factory else 64), exact=fixed, limit=limit)
    if isinstance(stream.inner, TensorFile):  # read whole anyway: every batch checked before any work
        for _ in stream:
            pass
    first = stream.first()  # a stream's first batch checked (and, below, run) before any work
    if not isinstance(loaded.module, torch.fx.GraphModule):  # shapes unknown: one forward finds a misfit
        check_model_runs(loaded.module, first, data or stream.source)
    return loaded, stream


def _input_values(module: torch.nn.Module) -> list[Any]:
    if not isinstance(module, torch.fx.GraphModule):
        return []
    return [n.meta.get("val") for n in module.graph.nodes if n.op == "placeholder"]


def fixed_batch(module: torch.nn.Module) -> int | None:
    """The batch size a torch.export graph was specialized to, or None when dynamic/unknown."""
    values = [v for v in _input_values(module) if isinstance(v, torch.Tensor) and v.dim() > 0]
    if not values:
        return None
    first = values[0].shape[0]
    return first if isinstance(first, int) else None


def dynamic_shapes(module: torch.nn.Module) -> tuple[dict[int, Any], ...] | None:
    """Keep the dynamic dimensions of a loaded .pt2 when it is exported again."""
    values = _input_values(module)
    if not values or not all(isinstance(v, torch.Tensor) for v in values):
        return None
    shapes = tuple({i: torch.export.Dim.AUTO for i, d in enumerate(v.shape) if not isinstance(d, int)}
                   for v in values)
    return shapes if any(shapes) else None


def load_batches(args: argparse.Namespace, data: str | None, *, limit: bool = False
                 ) -> tuple[LoadedModel, CheckedData | None]:
    """Load ``args.model`` and, when ``data`` (or ``--data-factory``) is given, its input batches as a checked
    stream (:mod:`bnfold.io.stream`): cast to the model's input dtype and cut to its batch size (a .pt2 exported
    with a fixed batch drops a last partial batch, with a warning). Reads ``args.key``/``batch_size``/
    ``num_samples``/``num_batches``/``preprocess``/``data_factory``/``data_kwargs`` when the command defines them;
    ``limit``: the stream applies ``--num-samples``/``--num-batches`` (else the command does)."""
    if data is None and not getattr(args, "data_factory", None):
        if getattr(args, "data_kwargs", None):
            raise InputError("--data-kwargs needs --data-factory")
        if getattr(args, "preprocess", None):
            raise InputError("--preprocess applies to --data FOLDER (a folder of images)")
        return load_any(args), None
    return _load_with_data(args, data, limit=limit)
