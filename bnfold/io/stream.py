"""Calibration and validation data streamed from where the user holds it: :func:`open_data`.

Every source is an iterable of batches (tuples of tensors) that can be iterated again — each pass re-reads the
source — so a pass over the data holds one batch (two while re-chunking) in memory, whatever the number of
samples:

==========================  =====================================================================================
source                      read as
==========================  =====================================================================================
``.npy``                    memory-mapped (``np.load(mmap_mode="r")``); each batch copied out of the map, its pages
                            released after it (:class:`NpyFile`)
``.npz`` / ``.pt`` / ``.pth`` read whole, as :func:`bnfold.io.data.load_tensors` does (these formats cannot be read
                            in parts), batches cut as views (:class:`TensorFile`)
a folder of images          decoded batch by batch with ``torchvision.io`` (:class:`bnfold.io.images.ImageFolder`)
``--data-factory M:F``      ``F(**kwargs)`` — the user's own code, imported because they named it — called again
                            for every pass; it returns an iterable of batches (a ``DataLoader``) (:class:`Factory`)
==========================  =====================================================================================

:class:`CheckedData` wraps a source: each batch is checked as it arrives (:func:`bnfold.io.data_checks.check_batch`:
input count, zero samples, rank, static sizes, dtype kind, NaN/Inf, and the per-sample shape of batch 0), named in
the error with its batch number (and, for images, its files), and cast to the model's floating-point dtype. It
has a ``len`` whenever the source has one (a progress bar's total).
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from bnfold.errors import DataError, InputError
from bnfold.io.data import Batch, load_tensors
from bnfold.io.data_checks import InputSpec, check_batch, check_same_shapes

__all__ = ["CheckedData", "DataSource", "Factory", "NpyFile", "Rechunked", "TensorFile", "open_data", "rechunk"]

log = logging.getLogger(__name__)


class DataSource(Protocol):
    """What :class:`CheckedData` reads: batches, re-iterable; ``source`` names it in messages."""

    source: str

    def __iter__(self) -> Iterator[Batch]: ...


def _describe(src: Any, k: int) -> str:
    describe = getattr(src, "describe_batch", None)
    return describe(k) if describe is not None else f"{src.source}, batch {k}"


class TensorFile:
    """An ``.npz``/``.pt``/``.pth`` file (read whole, as :func:`~bnfold.io.data.load_tensors`), each batch split along
    dimension 0 into views of at most ``batch_size`` samples."""

    def __init__(self, path: str | os.PathLike[str], *, keys: Sequence[str] | None = None,
                 batch_size: int | None = None) -> None:
        self.source = str(path)
        self.batches = load_tensors(path, keys=keys)
        self.batch_size = batch_size
        self.names = [f"array {k!r}" for k in keys] if keys else _npz_names(Path(path))

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.batches:
            n = _common_size(batch)
            if self.batch_size is None or n is None or n <= self.batch_size:
                yield batch
                continue
            for i in range(0, n, self.batch_size):
                yield tuple(t[i:i + self.batch_size] for t in batch)

    def __len__(self) -> int:
        sizes = [_common_size(b) for b in self.batches]
        if self.batch_size is None:
            return len(sizes)
        return sum(1 if n is None or n == 0 else math.ceil(n / self.batch_size) for n in sizes)


def _common_size(batch: Batch) -> int | None:
    sizes = {int(t.shape[0]) if t.dim() else None for t in batch}
    if len(sizes) != 1 or None in sizes:
        return None  # left whole; the checks say what is wrong with it
    return next(iter(sizes))


def _npz_names(p: Path) -> list[str] | None:
    if p.suffix.lower() != ".npz":
        return None
    with np.load(p, allow_pickle=False) as archive:
        return [f"array {name!r}" for name in archive.files]


class NpyFile:
    """A ``.npy`` array memory-mapped, ``batch_size`` samples (rows of dimension 0) a batch, each copied out of the
    map; the pages of a C-ordered array are released from this process after each batch
    (``madvise(MADV_DONTNEED)``: the file stays in the page cache, not in this process's resident memory)."""

    def __init__(self, path: str | os.PathLike[str], *, batch_size: int) -> None:
        self.path, self.source, self.batch_size = Path(path), str(path), batch_size
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such file" if not self.path.exists() else f"{self.path} is not a file")
        array = self._open()
        if array.dtype.kind not in "biuf":
            raise InputError(f"{self.path} is a {array.dtype.name} array; bnfold needs numeric arrays")
        self.shape = array.shape
        del array

    def _open(self) -> np.ndarray:
        try:
            return np.load(self.path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise InputError(f"{self.path} cannot be memory-mapped (pickled objects?): {exc}") from exc
        except (OSError, EOFError) as exc:
            raise InputError(f"{self.path} is not a readable numpy file: {exc}") from exc

    def __len__(self) -> int:
        return 1 if not self.shape or self.shape[0] == 0 else math.ceil(self.shape[0] / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        array = self._open()
        if array.ndim == 0 or array.shape[0] == 0:
            yield (torch.from_numpy(np.array(array)),)
            return
        mapped = getattr(array, "_mmap", None)
        release = isinstance(mapped, mmap.mmap) and array.flags.c_contiguous and hasattr(mmap, "MADV_DONTNEED")
        row = array.strides[0]
        start = getattr(array, "offset", 0)
        for i in range(0, array.shape[0], self.batch_size):
            part = np.array(array[i:i + self.batch_size])  # a copy: the batch owns its memory
            if release:
                lo = (start + i * row) // mmap.PAGESIZE * mmap.PAGESIZE
                hi = min(start + (i + len(part)) * row, len(mapped))  # type: ignore[arg-type]
                if hi > lo:
                    mapped.madvise(mmap.MADV_DONTNEED, lo, hi - lo)  # type: ignore[union-attr]
            yield (torch.from_numpy(part),)


class Factory:
    """``--data-factory package.module:callable`` with ``kwargs``: the callable (imported now, so a missing
    module is an error before any work) is called at the start of every pass and must return an iterable of
    batches — a tensor, a tuple/list of tensors, or a dict of tensors each. ``keys`` pick the model's inputs out
    of each batch: positions of a tuple (``0`` for the images of ``(images, labels)``) or names of a dict."""

    def __init__(self, spec: str, kwargs: dict[str, Any] | None = None, *, keys: Sequence[str] | None = None) -> None:
        from bnfold.io.factory import import_callable

        self.spec, self.source = spec, f"--data-factory {spec}"
        self.fn = import_callable(spec, "--data-factory", "mypackage.data:calibration_loader")
        self.kwargs = dict(kwargs or {})
        self.keys = list(keys) if keys else None
        self.names = [f"key {k!r}" for k in self.keys] if self.keys else None
        self.length: int | None = None

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("the number of batches is known once the factory has run")
        return self.length

    def _call(self) -> Iterable[Any]:
        try:
            made = self.fn(**self.kwargs)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise DataError(f"{self.source} raised {type(exc).__name__}: {first}",
                             hint="check --data-kwargs and your data code") from exc
        if isinstance(made, (torch.Tensor, str, bytes, Mapping)) or not isinstance(made, Iterable):
            raise DataError(f"{self.source} returned a {type(made).__name__}, not an iterable of batches",
                             hint="return a DataLoader, a list or a generator of batches")
        with contextlib.suppress(TypeError):
            self.length = len(made)  # type: ignore[arg-type]
        return made

    def __iter__(self) -> Iterator[Batch]:
        iterator = iter(self._call())
        k = 0
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise DataError(f"{self.source} failed while producing batch {k}: {type(exc).__name__}: {first}",
                                 hint="the error is in your data code (its Dataset or DataLoader)") from exc
            yield self._batch(item, k)
            k += 1

    def _batch(self, item: Any, k: int) -> Batch:
        where = f"{self.source}, batch {k}"
        if isinstance(item, torch.Tensor):
            values: list[Any] = [item]
            if self.keys:
                raise DataError(f"{where} is one tensor; --key cannot select from it")
        elif isinstance(item, Mapping):
            chosen = self.keys or list(item)
            missing = [key for key in chosen if key not in item]
            if missing:
                raise DataError(f"{where} has no entries {missing}", hint=f"it holds {list(item)}")
            values = [item[key] for key in chosen]
        elif isinstance(item, (tuple, list)):
            values = list(item)
            if self.keys:
                try:
                    values = [values[int(key)] for key in self.keys]
                except (ValueError, IndexError) as exc:
                    raise DataError(f"{where} is a {type(item).__name__} of {len(item)}; --key {self.keys} must "
                                     f"be positions 0..{len(item) - 1}") from exc
        else:
            raise DataError(f"{where} is a {type(item).__name__}, not a tensor, a tuple of tensors or a dict of "
                             "tensors", hint="yield the model's inputs as torch tensors (e.g. with ToTensor / "
                                             "torch.as_tensor)")
        bad = next((i for i, v in enumerate(values) if not isinstance(v, torch.Tensor)), None)
        if bad is not None or not values:
            what = "nothing" if not values else f"a {type(values[bad]).__name__} at position {bad}"  # type: ignore
            raise DataError(f"{where} holds {what}, not a tensor",
                             hint="yield only tensors; pick the inputs out of (inputs, labels) with --key 0")
        return tuple(values)


class CheckedData:
    """``inner``'s batches checked one at a time, cast to ``dtype`` (floating-point tensors only) and, with
    ``exact``, re-chunked to exactly ``exact`` samples a batch (a model exported with a fixed batch size: a last
    smaller batch is dropped, with a warning; with ``keep_last`` it is kept). ``num_samples``/``num_batches`` stop
    early (the last batch cut)."""

    def __init__(self, inner: Any, *, specs: Sequence[InputSpec] | None = None, dtype: torch.dtype | None = None,
                 names: Sequence[str] | None = None, exact: int | None = None, num_samples: int | None = None,
                 num_batches: int | None = None, keep_last: bool = False) -> None:
        self.inner, self.specs, self.dtype, self.keep_last = inner, specs, dtype, keep_last
        self.source: str = getattr(inner, "source", type(inner).__name__)
        self.names = names if names is not None else getattr(inner, "names", None)
        self.exact, self.num_samples, self.num_batches = exact, num_samples, num_batches
        self.dropped = 0
        self._warned = False

    def __len__(self) -> int:
        if self.exact is not None and isinstance(self.inner, Factory):
            raise TypeError("re-chunked: the number of batches is not known ahead")
        n = len(self.inner)
        return n if self.num_batches is None else min(n, self.num_batches)

    def first(self) -> Batch:
        """The first batch (one batch read)."""
        for batch in self:
            return batch
        raise InputError(f"{self.source} holds no batches (zero samples)")  # pragma: no cover - __iter__ raises

    def _checked(self) -> Iterator[Batch]:
        shapes: list[tuple[int, ...]] | None = None
        k = -1
        for k, batch in enumerate(self.inner):
            where = _describe(self.inner, k)
            try:
                check_batch(batch, self.specs, where, names=self.names)
                shapes = check_same_shapes(batch, shapes, where)
            except DataError:
                raise
            except InputError as exc:  # found while streaming: the whole step stops
                raise DataError(exc.message, hint=exc.hint) from exc
            if self.dtype is not None:
                batch = tuple(t.to(self.dtype) if t.is_floating_point() else t for t in batch)
            yield batch
        if k < 0:
            raise DataError(f"{self.source} holds no batches (zero samples)")

    def __iter__(self) -> Iterator[Batch]:
        stream = self._checked()
        if self.exact is not None:
            stream = self._rechunk(stream, self.exact)
        seen = taken = 0
        for batch in stream:
            if self.num_batches is not None and taken >= self.num_batches:
                return
            n = int(batch[0].shape[0])
            if self.num_samples is not None and seen + n > self.num_samples:
                batch = tuple(t[:self.num_samples - seen] for t in batch)
                n = self.num_samples - seen
            yield batch
            seen, taken = seen + n, taken + 1
            if self.num_samples is not None and seen >= self.num_samples:
                return

    def _rechunk(self, stream: Iterator[Batch], size: int) -> Iterator[Batch]:
        dropped = yield from rechunk(stream, size, keep_last=self.keep_last, source=self.source)
        self.dropped = dropped
        if dropped and not self._warned:
            self._warned = True
            log.warning("dropping the last %d samples of %s (the model's batch size is fixed at %d)", dropped,
                        self.source, size)


def rechunk(stream: Iterable[Batch], size: int, *, keep_last: bool = False, source: str = "the data"
            ) -> Generator[Batch, None, int]:
    """Batches of exactly ``size`` samples out of ``stream`` (the rest held back for the next one: at most two
    batches held); a last smaller batch is yielded with ``keep_last``, else dropped. Returns the number of samples
    dropped; no full batch at all is an :class:`InputError`."""
    held: list[Batch] = []
    count = given = 0
    for batch in stream:
        if not held and int(batch[0].shape[0]) == size:
            given += 1
            yield batch
            continue
        held.append(batch)
        count += int(batch[0].shape[0])
        while count >= size:
            joined = tuple(torch.cat(parts) for parts in zip(*held, strict=True)) if len(held) > 1 else held[0]
            given += 1
            yield tuple(t[:size] for t in joined)
            rest = tuple(t[size:] for t in joined)
            count -= size
            held = [rest] if count else []
    if count and keep_last:
        yield held[0] if len(held) == 1 else tuple(torch.cat(parts) for parts in zip(*held, strict=True))
        return 0
    if not given:
        raise DataError(f"{source} holds fewer samples ({count}) than the batch size {size} the model runs with",
                         hint="give more samples, or re-export the model with a dynamic batch dimension")
    return count


class Rechunked:
    """:func:`rechunk` as a re-iterable: every pass re-reads ``batches`` (a tuple per batch) and re-chunks it."""

    def __init__(self, batches: Iterable[Batch], size: int, *, source: str = "the data") -> None:
        self.batches, self.size, self.source = batches, size, source

    def __iter__(self) -> Iterator[Batch]:
        yield from rechunk(self.batches, self.size, source=self.source)


def open_data(data: str | os.PathLike[str] | None = None, *, factory: str | None = None,
              factory_kwargs: dict[str, Any] | None = None, keys: Sequence[str] | None = None,
              batch_size: int | None = None, preprocess: str | None = None, specs: Sequence[InputSpec] | None = None,
              dtype: torch.dtype | None = None, exact: int | None = None, num_samples: int | None = None,
              num_batches: int | None = None) -> CheckedData:
    """The user's data as a checked stream of batches (module docstring): ``data`` a file or a folder of images,
    or ``factory`` a ``package.module:callable``. ``specs``: what the model takes (checks; an image folder's size);
    ``dtype``: floating-point inputs cast to it; ``exact``: the model's fixed batch size. ``batch_size``: samples
    per batch of a file or folder (default 64); a factory's batches are re-chunked to it only when it is given."""
    if (data is None) == (factory is None):
        raise InputError("give the data as a file or folder (--data) or as --data-factory, not both"
                         if data is not None else "no data: pass --data PATH or --data-factory MODULE:CALLABLE")
    if batch_size is not None and batch_size <= 0:
        raise InputError(f"--batch-size must be positive, got {batch_size}")
    if preprocess is not None and (factory is not None or not Path(data).is_dir()):  # type: ignore[arg-type]
        raise InputError("--preprocess applies to a folder of images",
                         hint="a factory or a tensor file gives inputs ready for the model")
    source: Any
    if factory is not None:
        source = Factory(factory, factory_kwargs, keys=keys)
        return CheckedData(source, specs=specs, dtype=dtype, exact=exact or batch_size, num_samples=num_samples,
                           num_batches=num_batches, keep_last=exact is None)
    path = Path(data)  # type: ignore[arg-type]
    batch_size = batch_size or exact or 64
    if factory_kwargs:
        raise InputError("--data-kwargs needs --data-factory")
    if path.is_dir():
        from bnfold.io.images import ImageFolder, Preprocess

        if keys:
            raise InputError(f"{path} is a folder of images; --key selects arrays of a data file")
        source = ImageFolder(path, batch_size=batch_size, preprocess=Preprocess.parse(preprocess),
                             size=_image_size(specs, path), dtype=dtype or torch.float32)
        return CheckedData(source, specs=specs, dtype=dtype, exact=exact, num_samples=num_samples,
                           num_batches=num_batches)
    if path.suffix.lower() == ".npy" and path.is_file():
        if keys:
            raise InputError(f"{path} holds a single array; keys {list(keys)} cannot select from it")
        source = NpyFile(path, batch_size=batch_size)
    else:
        source = TensorFile(path, keys=keys, batch_size=batch_size)
    return CheckedData(source, specs=specs, dtype=dtype, exact=exact, num_samples=num_samples,
                       num_batches=num_batches)


def _image_size(specs: Sequence[InputSpec] | None, folder: Path) -> tuple[int | None, ...]:
    """The ``(C, H, W)`` a model with one ``(N, C, H, W)`` input takes (``None`` where not fixed)."""
    if specs is None:
        return (None, None, None)
    if len(specs) != 1 or len(specs[0].sizes) != 4 or not specs[0].dtype.is_floating_point:
        took = ", ".join(s.describe() for s in specs)
        raise InputError(f"{folder} is a folder of images, which feeds a model with one floating-point "
                         f"(N, C, H, W) input; this model takes {took}",
                         hint="give the inputs as a .npz/.npy/.pt file or with --data-factory")
    return tuple(specs[0].sizes[1:])
