"""What parity runs models on: batches read the bnfold way, random inputs when none are given, outputs flattened
to tensors, float64 copies of models and batches.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from bnfold.copying import copy_module
from bnfold.errors import InputError

__all__ = [
    'COMPACT_EVERY',
    'Batch',
    'Mapped',
    'StreamedBatches',
    'as_batches',
    'batch_to_float64',
    'compact_outputs',
    'flatten_outputs',
    'random_inputs',
    'read_batches',
    'run_batches',
    'to_float64',
]


Batch = tuple[torch.Tensor, ...]
"""The positional inputs of one model call."""


def _as_batch(batch: Any, k: int) -> Batch:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    from bnfold.batches import is_tensor_batch

    if is_tensor_batch(batch):
        return tuple(batch)
    if isinstance(batch, dict):
        raise InputError(f"batch {k} is a dict (keyword inputs); parity checks call the models with positional "
                         "inputs", hint="pass each batch as a tuple of tensors in the order forward() takes them")
    raise InputError(f"batch {k} is a {type(batch).__name__}, not a tensor or a tuple of tensors",
                     hint="labels do not belong in the inputs: pass only model inputs")


def as_batches(inputs: Any, arity: int | None = None) -> list[Batch]:
    """``inputs`` as a list of batches of positional inputs, read as everywhere in bnfold
    (:mod:`bnfold.batches`: a tensor or a tuple of tensors is one batch, a list or other iterable holds batches);
    ``arity``: the reference's number of positional inputs, when known, to refuse a reading that cannot fit."""
    from bnfold.batches import iter_batches

    batches = [_as_batch(batch, k) for k, batch in enumerate(iter_batches(inputs, arity=arity))]
    if not batches:
        raise InputError("no input tensors were given", hint="pass a tensor, a tuple of tensors or a list of batches")
    return batches


class StreamedBatches:
    """Batches read as by :func:`as_batches` from a source that every pass iterates again from the start (a
    ``DataLoader`` without shuffling, a :mod:`bnfold.io.stream` source): never listed, so a pass holds one batch.
    ``len``, ``samples`` and indexing (by iterating up to the batch) once a first pass has counted them. Every
    model must see the same inputs: a later pass that gives other batches than the first (a float64 sum and the
    shape per input) is a :class:`~bnfold.errors.DataError`."""

    def __init__(self, inputs: Any, arity: int | None = None) -> None:
        self.inputs, self.arity = inputs, arity
        self.count: int | None = None
        self.samples = 0
        self._prints: list[tuple[Any, ...]] = []

    def __iter__(self) -> Iterator[Batch]:
        from bnfold.batches import iter_batches
        from bnfold.errors import DataError

        n = samples = 0
        first = self.count is None
        if first:
            self._prints = []
        for k, batch in enumerate(iter_batches(self.inputs, arity=self.arity)):
            b = _as_batch(batch, k)
            mark = _fingerprint(b)
            if first:
                self._prints.append(mark)
            elif k >= len(self._prints) or self._prints[k] != mark:
                raise DataError(f"the inputs changed between two runs over them (batch {k} differs): parity runs "
                                "every model on the same inputs, so the source must give the same batches each time",
                                hint="a DataLoader: shuffle=False and no random augmentation; or pass a list")
            n += 1
            samples += int(b[0].shape[0]) if b and b[0].dim() > 0 else 0
            yield b
        if not n:
            raise InputError("no input tensors were given", hint="pass at least one batch")
        if not first and n != self.count:
            raise DataError(f"the inputs changed between two runs over them ({n} batches, then {self.count})",
                            hint="a DataLoader: shuffle=False and no random augmentation; or pass a list")
        self.count, self.samples = n, samples

    def __len__(self) -> int:
        if self.count is None:
            raise TypeError("the number of batches is known after a first pass")
        return self.count

    def __getitem__(self, k: int) -> Batch:
        for i, b in enumerate(self):
            if i == k:
                return b
        raise IndexError(k)


def _fingerprint(batch: Batch) -> tuple[Any, ...]:
    return tuple((tuple(t.shape), t.dtype, float(t.detach().sum(dtype=torch.float64)) if t.numel() else 0.0)
                 for t in batch)


def _rereadable(inputs: Any) -> bool:
    """Whether ``inputs`` can be read again rather than listed: an iterable that is not itself an iterator, not
    already in memory, and — a ``DataLoader`` — one that does not shuffle (a sampler other than sequential would
    give every model other batches)."""
    if isinstance(inputs, (list, tuple, torch.Tensor, Mapping, Iterator)) or not isinstance(inputs, Iterable):
        return False
    sampler = getattr(inputs, "sampler", None)
    if sampler is not None and hasattr(inputs, "batch_sampler"):  # a torch DataLoader
        from torch.utils.data import SequentialSampler

        return isinstance(sampler, SequentialSampler)
    return True


def read_batches(inputs: Any, arity: int | None = None) -> list[Batch] | StreamedBatches:
    """:class:`StreamedBatches` for a source that can be read again (:func:`_rereadable`), else the list
    :func:`as_batches` reads."""
    return StreamedBatches(inputs, arity) if _rereadable(inputs) else as_batches(inputs, arity)


class Mapped:
    """``fn`` applied to each batch of ``batches`` as a pass reaches it (re-iterable: e.g. the float64 copies of the
    inputs, made one batch at a time instead of all at once)."""

    def __init__(self, batches: Iterable[Batch], fn: Callable[[Batch], Batch]) -> None:
        self.batches, self.fn = batches, fn

    def __iter__(self) -> Iterator[Batch]:
        return (self.fn(b) for b in self.batches)


def random_inputs(example_inputs: Sequence[torch.Tensor] | None = None,
                  input_shapes: Sequence[Sequence[int]] | None = None, *,
                  dtype: torch.dtype = torch.float32, batches: int = 1, seed: int = 0) -> list[Batch]:
    """Seeded random batches shaped like ``example_inputs`` (same dtypes; integer inputs drawn from their
    observed range) or like ``input_shapes`` (``dtype``, standard normal)."""
    gen = torch.Generator().manual_seed(seed)
    if example_inputs is not None:
        specs = [(tuple(t.shape), t.dtype, t) for t in example_inputs]
    elif input_shapes is not None:
        specs = [(tuple(int(d) for d in s), dtype, None) for s in input_shapes]
    else:
        raise InputError("no inputs and no input shapes: cannot run the models",
                         hint="pass inputs (your data), example_inputs or input_shapes")
    out: list[Batch] = []
    for _ in range(batches):
        batch = []
        for shape, dt, like in specs:
            if dt.is_floating_point:
                batch.append(torch.randn(shape, generator=gen).to(dt))
            elif dt == torch.bool:
                batch.append(torch.randint(0, 2, shape, generator=gen).bool())
            else:
                lo, hi = (0, 10) if like is None or like.numel() == 0 else (int(like.min()), int(like.max()) + 1)
                batch.append(torch.randint(lo, hi, shape, generator=gen).to(dt))
        out.append(tuple(batch))
    return out


def flatten_outputs(value: Any) -> list[torch.Tensor]:
    """All tensors in a (nested) model output, in a stable order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in flatten_outputs(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flatten_outputs(v)]
    if hasattr(value, "__dataclass_fields__"):
        return [t for k in value.__dataclass_fields__ for t in flatten_outputs(getattr(value, k))]
    return []


def to_float64(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 deep copy of ``model`` (the reference every parity check measures against):
    ``copy.deepcopy(model).to(torch.float64)``, made in one step (:func:`bnfold.copying.copy_module`) unless a
    module converts itself its own way (its own ``_apply``, as RNNs have)."""
    if any(type(m)._apply is not torch.nn.Module._apply for m in model.modules()):
        return copy.deepcopy(model).to(torch.float64)
    return copy_module(model, dtype=torch.float64)


def batch_to_float64(batch: Batch) -> Batch:
    """``batch`` with its floating-point tensors in float64 (the input of a float64 reference)."""
    return tuple(t.double() if t.is_floating_point() else t for t in batch)


def run_batches(fn: Callable[..., Any], batches: Iterable[Batch]) -> list[list[torch.Tensor]]:
    """``fn`` on every batch (no autograd); each output flattened, detached and moved to the CPU."""
    from bnfold.errors import BnfoldError, InputError
    from bnfold.ir.graph import quiet_fx

    out: list[list[torch.Tensor]] = []
    pending: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for k, b in enumerate(batches):
            try:
                with quiet_fx():
                    result = fn(*b)
            except BnfoldError:
                raise
            except (RuntimeError, ValueError, TypeError, AssertionError, IndexError) as exc:
                # the model (the user's, in every call of this) cannot run on the user's inputs
                shapes = ", ".join("x".join(map(str, t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
                                   for t in b)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise InputError(f"{type(fn).__name__} failed on batch {k} (inputs {shapes}): "
                                 f"{type(exc).__name__}: {first}",
                                 hint="check the inputs' shapes and dtypes against the model's") from exc
            pending.append([t.detach().cpu() for t in flatten_outputs(result)])
            if len(pending) == COMPACT_EVERY:
                out += compact_outputs(pending)
                pending = []
                release_free_memory()
    return out + compact_outputs(pending)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` on another C library (macOS, musl, Windows)."""
    import ctypes

    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim(0)``; nothing elsewhere).

    Why: between the kept outputs of a long run, the freed activations of each forward leave free pages that glibc
    keeps for the process; without this, parity on 20,000 images peaked 116 MiB above the same on 2,000 although the
    outputs kept are 6 MiB (BENCHMARKS.md, issue 26). Called once per :data:`COMPACT_EVERY` batches: a walk of
    the heap's free lists, microseconds next to 64 forwards."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


COMPACT_EVERY = 64
"""Batches whose outputs :func:`run_batches` moves into one block each time."""


def compact_outputs(group: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """The outputs of several batches (one list per batch) as views of one tensor per output (same values).

    Why: a run keeps every batch's small outputs while each forward allocates and frees large activations; glibc's
    heap cannot reuse or return the space around so many small live blocks, and RSS grew with every batch kept
    (measured: ~1.4 MB per batch of 32 on a float64 CNN with 10 outputs, 600 batches: +830 MiB); one block per
    :data:`COMPACT_EVERY` batches keeps it flat (+97 MiB). Outputs whose shapes past dimension 0 or dtypes differ
    between the batches, or that have no batch dimension, are left as they are."""
    if len(group) < 2 or len({len(g) for g in group}) != 1:
        return group
    columns: list[list[torch.Tensor] | tuple[torch.Tensor, ...]] = []
    for col in zip(*group, strict=True):
        if any(t.dim() == 0 for t in col) or len({(tuple(t.shape[1:]), t.dtype, t.device) for t in col}) != 1:
            columns.append(list(col))
            continue
        columns.append(torch.cat(col).split([int(t.shape[0]) for t in col]))
    return [list(row) for row in zip(*columns, strict=True)]
