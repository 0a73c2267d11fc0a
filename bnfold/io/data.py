"""Load the user's input tensors (validation or calibration batches) from a file, safely.

A *batch* is the tuple of positional inputs of one model call; :func:`load_tensors` returns a list of them.

=================  ===========================================================================================
file               what it may hold
=================  ===========================================================================================
``.pt``/``.pth``   read with ``torch.load(weights_only=True)`` (no code runs): a ``Tensor`` (one batch of a
                   single-input model), a tuple/list of ``Tensor`` (one batch: the positional inputs), a list of
                   tuples/lists of ``Tensor`` (several batches), or a ``dict`` name → ``Tensor`` (one batch,
                   inputs in the dict's order; ``keys`` picks and orders them)
``.npy``           one array: one batch of a single-input model
``.npz``           one array per positional input, in the file's order (``keys`` picks and orders them — e.g.
                   ``keys=["x_test"]`` for a file that also stores labels); pickled objects are refused
=================  ===========================================================================================

``batch_size`` then splits every batch along dimension 0 into chunks of at most that many samples (all inputs
of a batch must share dimension 0). ``dtype`` casts floating-point tensors (integer inputs such as token ids
are left alone).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnfold.errors import InputError

__all__ = ["Batch", "load_tensors", "split_batches"]

Batch = tuple[torch.Tensor, ...]

_HINT = ("save a Tensor, a tuple of Tensors (one batch) or a list of tuples (several batches) with torch.save, "
         "or arrays with numpy.save / numpy.savez")


def load_tensors(path: str | os.PathLike[str], *, keys: Sequence[str] | None = None,
                 batch_size: int | None = None, dtype: torch.dtype | None = None) -> list[Batch]:
    """Read input batches from ``path`` (formats in the module docstring)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p} is a folder, not a data file", hint=_HINT)
    suffix = p.suffix.lower()
    if suffix in (".pt", ".pth"):
        batches = _from_torch(p, keys)
    elif suffix == ".npy":
        if keys:
            raise InputError(f"{p} holds a single array; keys {list(keys)} cannot select from it")
        batches = [(_to_tensor(_np_load(p), p),)]
    elif suffix == ".npz":
        batches = [_from_npz(p, keys)]
    else:
        raise InputError(f"{p}: unsupported data file type {suffix or '(none)'}", hint=_HINT)
    if not batches or any(not b for b in batches):
        raise InputError(f"{p} holds no input tensors", hint=_HINT)
    if dtype is not None:
        batches = [tuple(t.to(dtype) if t.is_floating_point() else t for t in b) for b in batches]
    return split_batches(batches, batch_size) if batch_size else batches


def split_batches(batches: Sequence[Batch], batch_size: int) -> list[Batch]:
    """Split every batch along dimension 0 into chunks of at most ``batch_size`` samples."""
    if batch_size <= 0:
        raise InputError(f"batch size must be positive, got {batch_size}")
    out: list[Batch] = []
    for k, batch in enumerate(batches):
        sizes = {t.shape[0] if t.dim() else None for t in batch}
        if len(sizes) != 1 or None in sizes:
            raise InputError(f"batch {k}: inputs do not share a batch dimension (sizes along dim 0: "
                             f"{[tuple(t.shape) for t in batch]}), so it cannot be split",
                             hint="drop the batch size option, or store inputs with a common first dimension")
        n = int(next(iter(sizes)))  # type: ignore[arg-type]
        out.extend(tuple(t[i:i + batch_size] for t in batch) for i in range(0, n, batch_size))
    return out


def _np_load(p: Path) -> Any:
    try:
        return np.load(p, allow_pickle=False)
    except ValueError as exc:
        raise InputError(f"{p} could not be read without unpickling objects: {exc}", hint=_HINT) from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{p} is not a readable numpy file: {exc}", hint=_HINT) from exc


def _to_tensor(array: Any, p: Path, name: str = "") -> torch.Tensor:
    where = f"{p}{f'[{name}]' if name else ''}"
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        kind = getattr(getattr(array, "dtype", None), "name", type(array).__name__)
        raise InputError(f"{where} is a {kind} array; bnfold needs numeric arrays", hint=_HINT)
    return torch.from_numpy(np.ascontiguousarray(array))


def _from_npz(p: Path, keys: Sequence[str] | None) -> Batch:
    with _np_load(p) as archive:
        names = list(archive.files)
        chosen = list(keys) if keys else names
        missing = [k for k in chosen if k not in names]
        if missing:
            raise InputError(f"{p} has no array(s) {missing}", hint=f"it holds {names}")
        return tuple(_to_tensor(_npz_array(archive, k, p), p, k) for k in chosen)


def _npz_array(archive: Any, key: str, p: Path) -> Any:
    """One array of an open ``.npz`` (arrays are read lazily: an object array is refused only here)."""
    try:
        return archive[key]
    except ValueError as exc:
        raise InputError(f"{p}[{key}] could not be read without unpickling objects: {exc}", hint=_HINT) from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{p}[{key}] is not a readable array: {exc}", hint=_HINT) from exc


def _from_torch(p: Path, keys: Sequence[str] | None) -> list[Batch]:
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{p} could not be loaded with torch.load(weights_only=True): "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                         hint=_HINT) from exc
    if isinstance(obj, dict):
        chosen = list(keys) if keys else list(obj)
        missing = [k for k in chosen if k not in obj]
        if missing:
            raise InputError(f"{p} has no entries {missing}", hint=f"it holds {list(obj)}")
        obj = tuple(obj[k] for k in chosen)
    elif keys:
        raise InputError(f"{p} holds a {type(obj).__name__}, not a dict; keys cannot select from it")
    if isinstance(obj, torch.Tensor):
        return [(obj,)]
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        return [tuple(obj)]
    if isinstance(obj, (list, tuple)) and obj and all(
            isinstance(b, (list, tuple)) and b and all(isinstance(t, torch.Tensor) for t in b) for b in obj):
        return [tuple(b) for b in obj]
    raise InputError(f"{p} holds a {type(obj).__name__} that is not a tensor, a batch or a list of batches",
                     hint=_HINT)
