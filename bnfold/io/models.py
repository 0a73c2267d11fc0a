"""Load model files safely (saving a ``.pt2`` is the torch target's job: :mod:`bnfold.targets.torch`).

Inputs: a ``torch.export``-saved ``.pt2`` (example inputs are read from the file when it has them), inspected
before loading so that nothing in it unpickles or runs (:mod:`bnfold.io.pt2_inspect`), or a pickled ``nn.Module``
(``.pt``/``.pth``) when the user says it is trusted.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bnfold.errors import InputError
from bnfold.io.data_checks import check_shape_request
from bnfold.io.pt2_inspect import load_exported

__all__ = ["LoadedModel", "load_model", "parse_shapes"]

@dataclass
class LoadedModel:
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...] | None
    path: Path
    kind: str


def parse_shapes(specs: Sequence[str] | None, dtype: str = "float32") -> tuple[torch.Tensor, ...] | None:
    """``["1,3,224,224", "1,10"]`` → random example tensors (seeded) of those shapes."""
    if not specs:
        return None
    try:
        torch_dtype = getattr(torch, dtype)
        assert isinstance(torch_dtype, torch.dtype)
    except (AttributeError, AssertionError) as exc:
        raise InputError(f"unknown dtype {dtype!r}", hint="use float32, float16, bfloat16 or float64") from exc
    gen = torch.Generator().manual_seed(0)
    out = []
    for spec in specs:
        try:
            shape = [int(s) for s in spec.replace("x", ",").split(",") if s.strip()]
        except ValueError as exc:
            raise InputError(f"--input-shape {spec!r} is not a comma-separated list of integers",
                             hint="write it like 1,3,224,224") from exc
        if not shape or any(d <= 0 for d in shape):
            raise InputError(f"--input-shape {spec!r} must list positive sizes", hint="e.g. 1,3,224,224")
        check_shape_request(shape, spec, torch_dtype)
        out.append(torch.randn(shape, generator=gen).to(torch_dtype))
    return tuple(out)


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a model file",
                         hint="pass a .pt2 file saved with torch.export.save")


def load_model(path: str | os.PathLike[str], *, trusted_pickle: bool = False,
               own_example_inputs: bool = False) -> LoadedModel:
    """Load a model file for bnfold (see module docstring for the formats).

    A ``.pt2`` is inspected first (:mod:`bnfold.io.pt2_inspect`): members that would unpickle or run code are
    refused unless ``trusted_pickle``. ``own_example_inputs``: the caller has its own example inputs (the CLI's
    ``--input-shape``), so stored ones that would need unpickling are skipped rather than refused."""
    p = Path(path)
    _check_readable(p)
    suffix = p.suffix.lower()
    if suffix == ".pt2":
        if not zipfile.is_zipfile(p):
            raise InputError(f"{p} is not a torch.export archive (not a zip file); it may be truncated",
                             hint="re-save it with torch.export.save(torch.export.export(model, inputs), path)")
        try:
            ep = load_exported(p, trusted=trusted_pickle, drop_example_inputs=own_example_inputs)
        except InputError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            first = first.replace(" Please check the warnings above for possible errors.", "")  # we silence them
            raise InputError(f"{p} could not be loaded by torch.export.load: {type(exc).__name__}: {first}",
                             hint="was it saved by a compatible torch version with torch.export.save?") from exc
        inputs = _example_inputs(ep)
        try:
            module = ep.module()
        except Exception as exc:
            raise InputError(f"{p} holds a program torch cannot rebuild: {type(exc).__name__}: {exc}") from exc
        return LoadedModel(module, inputs, p, "pt2")
    if suffix in (".pt", ".pth"):
        if not trusted_pickle:
            raise InputError(f"{p} is a pickle; loading it runs arbitrary code",
                             hint="pass --trust-pickle if you trust the file, or save the model with "
                                  "torch.export.save as .pt2")
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=False)
        except Exception as exc:
            raise InputError(f"{p} could not be unpickled: {type(exc).__name__}: {exc}") from exc
        if not isinstance(obj, nn.Module):
            raise InputError(f"{p} holds a {type(obj).__name__}, not an nn.Module",
                             hint="a state_dict needs its model class: use the Python API (bnfold.fold)")
        return LoadedModel(obj.eval(), None, p, "pickle")
    raise InputError(f"{p}: unsupported file type {suffix or '(none)'}",
                     hint="bnfold reads .pt2 (torch.export.save) and, with --trust-pickle, .pt/.pth modules")


def _example_inputs(ep: torch.export.ExportedProgram) -> tuple[torch.Tensor, ...] | None:
    ex = getattr(ep, "example_inputs", None)
    if not ex:
        return None
    args, kwargs = ex
    if kwargs:
        return None
    tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
    return tensors if len(tensors) == len(args) else None
