"""Check the user's input batches against what the model takes, before any work is done with them.

What is checked (each failure an :class:`~bnfold.errors.InputError` naming the file, the input, the batch and,
where it applies, the sample): the number of inputs per batch, zero samples, rank, the static sizes of a
``torch.export`` graph's inputs (dimension 0 — the batch — is re-batched by the callers, so it is not
compared), the kind of dtype (integer/bool data for a floating-point input and the other way round), batches
whose shapes disagree with each other, and NaN/Inf values. Also the size of ``--input-shape`` requests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx

from bnfold.errors import BnfoldError, InputError

__all__ = ["InputSpec", "check_batch", "check_batches", "check_model_runs", "check_same_shapes", "check_shape_request",
           "input_specs"]

MAX_INPUT_BYTES = 4 << 30
"""``--input-shape`` requests above this (4 GiB per tensor) are refused as a likely typo."""


@dataclass(frozen=True)
class InputSpec:
    """One model input: ``sizes`` has an int for a static dimension and ``None`` for a dynamic one."""

    sizes: tuple[int | None, ...]
    dtype: torch.dtype

    def describe(self) -> str:
        return "(" + ", ".join("N" if d is None else str(d) for d in self.sizes) + ")"


def input_specs(module: torch.nn.Module, example: Sequence[torch.Tensor] | None = None) -> list[InputSpec] | None:
    """What ``module`` takes: from a ``torch.export`` graph's placeholders (static sizes exact), else the rank
    and dtype of ``example`` (a plain module may accept other sizes), else ``None`` (unknown)."""
    if isinstance(module, torch.fx.GraphModule):
        vals = [n.meta.get("val") for n in module.graph.nodes if n.op == "placeholder"]
        if vals and all(isinstance(v, torch.Tensor) for v in vals):
            return [InputSpec(tuple(d if isinstance(d, int) else None for d in v.shape), v.dtype) for v in vals]
    if example:
        return [InputSpec((None,) * t.dim(), t.dtype) for t in example]
    return None


def check_model_runs(module: torch.nn.Module, batch: Sequence[torch.Tensor], source: str) -> None:
    """For a model whose input shapes are unknown (a pickled module), run it once on ``batch`` (eval mode, no
    gradients, state unchanged) so that data it cannot take is an input error naming ``source``, not a crash
    in the middle of the work."""
    from bnfold.ir.graph import quiet_fx

    try:
        with torch.no_grad(), quiet_fx():
            module(*batch)
    except BnfoldError:  # already a message for people (a TVM artifact's signature check, say)
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        shapes = ", ".join(str(tuple(t.shape)) for t in batch)
        raise InputError(f"the model cannot run on {source} (inputs {shapes}): {type(exc).__name__}: {first}",
                         hint="check the data's shape and dtype against what the model takes") from exc


def check_shape_request(shape: Sequence[int], spec_text: str, dtype: torch.dtype) -> None:
    """Refuse an ``--input-shape`` too large to be meant (e.g. a missing comma: ``1,3,224224``)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes > MAX_INPUT_BYTES:
        raise InputError(f"--input-shape {spec_text} asks for a {nbytes / 2**30:.0f} GiB tensor",
                         hint="check the shape for a missing comma, e.g. 1,3,224,224")


def _first_bad_sample(t: torch.Tensor) -> tuple[int, str] | None:
    if not t.is_floating_point() and not t.is_complex():
        return None
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return None
    per_sample = bad.reshape(t.shape[0], -1).any(1) if t.dim() else bad.reshape(1)
    j = int(per_sample.nonzero()[0, 0])
    sample = t[j] if t.dim() else t
    kind = "NaN" if bool(torch.isnan(sample).any()) else "Inf"
    return j, kind


def _array_names(source: str) -> list[str] | None:
    """The array names of an ``.npz`` (its inputs, in order), to name the one at fault."""
    if not source.lower().endswith(".npz"):
        return None
    try:
        import numpy as np

        with np.load(source, allow_pickle=False) as archive:
            return [f"array {name!r}" for name in archive.files]
    except (OSError, ValueError):
        return None


def check_batches(batches: Sequence[Sequence[torch.Tensor]], specs: Sequence[InputSpec] | None, source: str,
                  *, names: Sequence[str] | None = None) -> None:
    """Validate ``batches`` (read from ``source``) against ``specs`` (see the module docstring). ``names``:
    the ``--key`` names of the inputs (default: an ``.npz``'s array names)."""
    names = [f"array {n!r}" for n in names] if names else _array_names(source)
    if not batches:
        raise InputError(f"{source} holds no batches (zero samples)")
    first_shapes: list[tuple[int, ...]] | None = None
    for k, batch in enumerate(batches):
        where_b = f"{source}, batch {k}" if len(batches) > 1 else source
        check_batch(batch, specs, where_b, names=names)
        first_shapes = check_same_shapes(batch, first_shapes, where_b)


def check_same_shapes(batch: Sequence[torch.Tensor], first: list[tuple[int, ...]] | None, where: str
                      ) -> list[tuple[int, ...]]:
    """``batch`` has the per-sample shapes of the first batch (``first``; ``None`` for the first batch itself);
    returns the first batch's shapes."""
    shapes = [tuple(t.shape) for t in batch]
    if first is not None and [s[1:] for s in shapes] != [s[1:] for s in first]:
        raise InputError(f"{where} has shapes {shapes} but batch 0 has {first}: batches of mixed "
                         "shapes", hint="store every batch with the same per-sample shape")
    return shapes if first is None else first


def check_batch(batch: Sequence[torch.Tensor], specs: Sequence[InputSpec] | None, where_b: str,
                *, names: Sequence[str] | None = None) -> None:
    """One batch (named ``where_b`` in messages): the count of inputs, zero samples, rank, static sizes, the kind
    of dtype and NaN/Inf (module docstring). ``names``: how to call each input (default ``input i``)."""
    if specs is not None and len(batch) != len(specs):
        raise InputError(f"{where_b} gives {len(batch)} input tensor(s) but the model takes {len(specs)}",
                         hint="choose the model inputs with --key NAME (labels do not belong in the data)")
    for i, t in enumerate(batch):
        label = names[i] if names is not None and i < len(names) else f"input {i}"
        where = f"{where_b}, {label}"
        if t.dim() == 0 or t.shape[0] == 0 or t.numel() == 0:
            raise InputError(f"{where} holds zero samples (shape {tuple(t.shape)})",
                             hint="give at least one sample; dimension 0 is the batch")
        if specs is not None:
            spec = specs[i]
            if t.dim() != len(spec.sizes):
                raise InputError(f"{where} has shape {tuple(t.shape)} (rank {t.dim()}) but the model expects "
                                 f"rank {len(spec.sizes)}, shape {spec.describe()}")
            wrong = [a for a, (got, want) in enumerate(zip(t.shape, spec.sizes, strict=True))
                     if a > 0 and want is not None and got != want]
            if wrong:
                raise InputError(f"{where} has shape {tuple(t.shape)} but the model expects {spec.describe()} "
                                 f"(dimension {wrong[0]} differs)")
            if spec.dtype.is_floating_point != t.is_floating_point() or (spec.dtype == torch.bool) != (
                    t.dtype == torch.bool):
                raise InputError(f"{where} is {str(t.dtype).removeprefix('torch.')} but the model takes "
                                 f"{str(spec.dtype).removeprefix('torch.')}",
                                 hint="store the inputs with the model's dtype")
        bad = _first_bad_sample(t)
        if bad is not None:
            raise InputError(f"{where}, sample {bad[0]} holds {bad[1]}",
                             hint="remove or fix non-finite samples; they make every statistic and parity "
                                  "verdict meaningless")
