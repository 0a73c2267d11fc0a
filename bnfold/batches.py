"""What "batches" means, once for the whole API (``recalibrate``, ``diagnose``, ``compare``, ``track_stages``,
``optimize``).

``inputs`` is an iterable of batches — a list, a generator, a ``DataLoader`` yielding inputs — where each batch is
a tensor (the model's only input), a tuple/list of tensors (its positional inputs) or a dict (keyword inputs).
A single tensor is one batch. A tuple of tensors is read by the model's number of positional inputs
(:func:`positional_arity`): as many tensors as the model takes → one batch of positional inputs (``model(*t)``);
a one-input model → one batch per tensor (what ``x.split(64)`` gives); unknown → one batch. A list of tensors is
several batches of a one-input model. So::

    compare(model, folded, x)                     # one batch
    compare(model, folded, (x,))                  # one batch
    compare(model, folded, [x1, x2, x3])          # three batches
    recalibrate(model, x.split(64))               # one batch per chunk
    compare(model, folded, [(a1, b1), (a2, b2)])  # two batches of a two-input model
    recalibrate(model, loader)                    # as many batches as the loader yields

A reading that fits the model in neither way is an error that says what was expected (a tuple of three tensors for
a two-input model; a list of tensors for a two-input model), instead of a failure deep inside the model.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.fx

from bnfold.errors import InputError

__all__ = ["Batches", "is_tensor_batch", "iter_batches", "positional_arity"]


def positional_arity(model: Any) -> int | None:
    """How many positional inputs ``model`` takes, or ``None`` when that cannot be told (``*args``, optional
    positional parameters, an opaque callable). A ``GraphModule`` takes one per placeholder."""
    if isinstance(model, torch.fx.GraphModule):
        placeholders = [n for n in model.graph.nodes if n.op == "placeholder"]
        return None if any(n.args for n in placeholders) else len(placeholders)  # args hold defaults
    forward = model.forward if isinstance(model, torch.nn.Module) else model
    func = getattr(forward, "__func__", None)  # a bound method: its function, once per class (inspect is slow)
    if func is not None and getattr(forward, "__self__", None) is not None:
        try:
            return _arity(func, bound=True)
        except TypeError:  # an unhashable callable
            pass
    return _arity.__wrapped__(forward, bound=False)


@functools.lru_cache(maxsize=256)
def _arity(forward: Any, *, bound: bool) -> int | None:
    """:func:`positional_arity` of a function (``bound``: its first parameter is the bound ``self``)."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if bound:
        if not params or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                                inspect.Parameter.POSITIONAL_OR_KEYWORD):
            return None
        params = params[1:]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_POSITIONAL for p in params) or any(p.default is not p.empty for p in positional):
        return None
    return len(positional)


def is_tensor_batch(value: Any) -> bool:
    """A non-empty tuple/list of tensors: one batch of positional inputs (or, at the top level, see above)."""
    return isinstance(value, (tuple, list)) and bool(value) and all(isinstance(t, torch.Tensor) for t in value)


def _one_batch(inputs: Any, arity: int | None) -> bool:
    """Whether ``inputs`` is one batch rather than an iterable of batches (module docstring)."""
    if isinstance(inputs, (torch.Tensor, Mapping)):
        return True
    return isinstance(inputs, tuple) and is_tensor_batch(inputs) and (arity is None or arity == len(inputs))


def iter_batches(inputs: Any, *, arity: int | None = None) -> Iterator[Any]:
    """The batches ``inputs`` stands for (module docstring), lazily: iterables are not consumed ahead.
    ``arity``: the model's :func:`positional_arity`, when known."""
    if _one_batch(inputs, arity):
        yield inputs
        return
    if is_tensor_batch(inputs) and arity is not None and arity != 1:
        kind = type(inputs).__name__
        raise InputError(
            f"a {kind} of {len(inputs)} tensors is neither one batch of this model's {arity} inputs nor "
            f"{len(inputs)} batches of one input", hint=f"pass one tuple of {arity} tensors per batch: "
                                                        "[(a, b, ...), ...]")
    if not isinstance(inputs, Iterable) or isinstance(inputs, (str, bytes)):
        raise InputError(f"inputs is a {type(inputs).__name__}; expected a tensor, a tuple of tensors (one batch) "
                         "or an iterable of batches")
    yield from inputs


class Batches:
    """``inputs`` read as batches (:func:`iter_batches`): iterable again whenever ``inputs`` is, with a ``len``
    whenever ``inputs`` has one (a progress bar's total)."""

    def __init__(self, inputs: Any, arity: int | None = None) -> None:
        self.inputs, self.arity = inputs, arity

    def __iter__(self) -> Iterator[Any]:
        return iter_batches(self.inputs, arity=self.arity)

    def __len__(self) -> int:
        return 1 if _one_batch(self.inputs, self.arity) else len(self.inputs)
