"""Load and save model files safely.

Inputs: a ``torch.export``-saved ``.pt2`` (example inputs are read from the file when it has them), or a
pickled ``nn.Module`` (``.pt``/``.pth``) when the user says it is trusted. Outputs are written to a temporary
file in the destination folder and renamed into place, so a failure never leaves a half-written file, and
the user's input file is never overwritten.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bnfold.errors import InputError

__all__ = ["LoadedModel", "atomic_output", "load_model", "parse_shapes", "save_exported"]


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
    except (AttributeError, AssertionError):
        raise InputError(f"unknown dtype {dtype!r}", hint="use float32, float16, bfloat16 or float64") from None
    gen = torch.Generator().manual_seed(0)
    out = []
    for spec in specs:
        try:
            shape = [int(s) for s in spec.replace("x", ",").split(",") if s.strip()]
        except ValueError:
            raise InputError(f"--input-shape {spec!r} is not a comma-separated list of integers",
                             hint="write it like 1,3,224,224") from None
        if not shape or any(d <= 0 for d in shape):
            raise InputError(f"--input-shape {spec!r} must list positive sizes", hint="e.g. 1,3,224,224")
        out.append(torch.randn(shape, generator=gen).to(torch_dtype))
    return tuple(out)


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a model file",
                         hint="pass a .pt2 file saved with torch.export.save")


def load_model(path: str | os.PathLike[str], *, trusted_pickle: bool = False) -> LoadedModel:
    """Load a model file for bnfold (see module docstring for the formats)."""
    p = Path(path)
    _check_readable(p)
    suffix = p.suffix.lower()
    if suffix == ".pt2":
        if not zipfile.is_zipfile(p):
            raise InputError(f"{p} is not a torch.export archive (not a zip file); it may be truncated",
                             hint="re-save it with torch.export.save(torch.export.export(model, inputs), path)")
        try:
            ep = torch.export.load(str(p))
        except Exception as exc:
            raise InputError(f"{p} could not be loaded by torch.export.load: {type(exc).__name__}: {exc}",
                             hint="was it saved by a compatible torch version with torch.export.save?") from None
        inputs = _example_inputs(ep)
        module = ep.module()
        return LoadedModel(module, inputs, p, "pt2")
    if suffix in (".pt", ".pth"):
        if not trusted_pickle:
            raise InputError(f"{p} is a pickle; loading it runs arbitrary code",
                             hint="pass --trust-pickle if you trust the file, or save the model with "
                                  "torch.export.save as .pt2")
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=False)
        except Exception as exc:
            raise InputError(f"{p} could not be unpickled: {type(exc).__name__}: {exc}") from None
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


@contextlib.contextmanager
def atomic_output(dest: str | os.PathLike[str], *, protect: Sequence[str | os.PathLike[str]] = ()) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success rename it to ``dest``, on failure delete it.

    Refuses to write over any path in ``protect`` (the user's inputs).
    """
    d = Path(dest)
    for q in protect:
        if Path(q).exists() and d.exists() and d.resolve() == Path(q).resolve():
            raise InputError(f"refusing to overwrite the input file {q}", hint="choose another -o path")
    if d.is_dir():
        raise InputError(f"{d} is a folder", hint="give a file name such as model_folded.pt2")
    parent = d.parent if str(d.parent) else Path(".")
    if not parent.exists():
        raise InputError(f"output folder {parent} does not exist")
    # keep the real suffix last: some writers (torch.export.save) check it
    fd, tmp = tempfile.mkstemp(prefix=f".{d.stem}.", suffix=f".partial{d.suffix}", dir=parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, d)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_exported(module: nn.Module, example_inputs: Sequence[torch.Tensor], dest: str | os.PathLike[str], *,
                  protect: Sequence[str | os.PathLike[str]] = (),
                  export: Callable[..., torch.export.ExportedProgram] | None = None) -> Path:
    """Export ``module`` with ``torch.export`` and save it to ``dest`` atomically."""
    ep = (export or torch.export.export)(module, tuple(example_inputs))
    with atomic_output(dest, protect=protect) as tmp:
        torch.export.save(ep, str(tmp))
    return Path(dest)
