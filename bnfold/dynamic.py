"""Dynamic dimensions: read them from an exported program, keep them through capture and every export.

bnfold accepts the ``dynamic_shapes`` of :func:`torch.export.export` (one ``{dim: Dim}`` per positional input,
``None`` for a fully static input) wherever it exports. A model loaded from a ``.pt2`` exported with a dynamic
batch carries its dims in its placeholders' ``val`` (symbolic sizes with a value range in the shape
environment): :func:`dynamic_dims` reads them back as named ``Dim``\\ s with those ranges, so re-exporting the
folded model keeps them. :func:`export` runs ``torch.export`` with them, first doubling any dynamic size-1
example dimension (``torch.export`` specializes sizes 0 and 1, so a batch of one would make the batch static).
:func:`batch_range` turns them into the ``(lo, hi)`` a TVM dynamic-batch build takes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

__all__ = ["DEFAULT_MAX_BATCH", "DynamicShapes", "batch_range", "describe", "dynamic_dims", "export", "is_exported"]

log = logging.getLogger(__name__)

DynamicShapes = tuple[dict[int, Any] | None, ...]
"""``torch.export``'s ``dynamic_shapes`` for positional inputs: per input, ``{dim index: Dim}`` or ``None``."""

DEFAULT_MAX_BATCH = 64
"""Upper end of a TVM batch range when the program's batch is unbounded (TVM plans memory for the upper end)."""


def _placeholder_values(module: nn.Module | torch.export.ExportedProgram) -> list[Any]:
    if isinstance(module, torch.export.ExportedProgram):
        user = set(module.graph_signature.user_inputs)
        return [n.meta.get("val") for n in module.graph.nodes if n.op == "placeholder" and n.name in user]
    if not isinstance(module, torch.fx.GraphModule):
        return []
    return [n.meta.get("val") for n in module.graph.nodes if n.op == "placeholder"]


def is_exported(module: object) -> bool:
    """``module`` is an ExportedProgram or the GraphModule of one (``ep.module()``: its placeholders carry the
    fake tensors ``torch.export`` traced with)."""
    if isinstance(module, torch.export.ExportedProgram):
        return True
    values = _placeholder_values(module) if isinstance(module, nn.Module) else []
    return bool(values) and all(isinstance(v, torch.Tensor) for v in values) and any(
        isinstance(n.meta.get("nn_module_stack"), dict) for n in module.graph.nodes)  # type: ignore[union-attr]


def _range(size: torch.SymInt) -> tuple[int, int | None]:
    """The value range torch.export recorded for a symbolic size (``None`` for an unbounded upper end)."""
    try:
        node = size.node
        vr = node.shape_env.var_to_range[node.expr]
        lo, hi = int(vr.lower), vr.upper
        return max(lo, 1), (int(hi) if hi.is_finite else None)
    except Exception:  # a size that is an expression of several symbols, or no shape environment
        return 1, None


def dynamic_dims(module: nn.Module | torch.export.ExportedProgram) -> DynamicShapes | None:
    """The dynamic dimensions of an exported program (or its ``.module()``), as ``torch.export`` takes them:
    one named ``Dim`` per symbol (inputs sharing a symbol share the ``Dim``), with the recorded range. ``None``
    when the program is static or not an exported one."""
    values = _placeholder_values(module)
    if not values or not all(isinstance(v, torch.Tensor) for v in values):
        return None
    dims: dict[str, Any] = {}
    out: list[dict[int, Any] | None] = []
    for v in values:
        spec: dict[int, Any] = {}
        for i, d in enumerate(v.shape):
            if isinstance(d, int):
                continue
            key = str(d)
            if key not in dims:
                lo, hi = _range(d)
                name = "batch" if i == 0 and not any(k for k in dims) else f"dim{len(dims)}"
                dims[key] = torch.export.Dim(name, min=lo, max=hi) if hi is not None else torch.export.Dim(name,
                                                                                                            min=lo)
            spec[i] = dims[key]
        out.append(spec or None)
    return tuple(out) if any(out) else None


def _dynamic_indices(spec: Any) -> set[int]:
    if isinstance(spec, Mapping):
        return {int(k) for k, v in spec.items() if v is not None}
    if isinstance(spec, (list, tuple)):
        return {i for i, v in enumerate(spec) if v is not None}
    return set()


def _widen(inputs: tuple[torch.Tensor, ...], dynamic_shapes: Any) -> tuple[torch.Tensor, ...]:
    """Inputs whose dynamic dims of size 1 are doubled (repeated), so that export does not specialize them."""
    if not isinstance(dynamic_shapes, (list, tuple)) or len(dynamic_shapes) != len(inputs):
        return inputs
    out = []
    for t, spec in zip(inputs, dynamic_shapes, strict=True):
        if isinstance(t, torch.Tensor):
            for i in sorted(_dynamic_indices(spec)):
                if i < t.dim() and t.shape[i] == 1:
                    t = torch.cat([t, t], dim=i)
        out.append(t)
    return tuple(out)


def export(module: nn.Module, inputs: Sequence[torch.Tensor], dynamic_shapes: Any = None
           ) -> torch.export.ExportedProgram:
    """``torch.export.export(module, inputs, dynamic_shapes=..., strict=False)``, dynamic size-1 example dims
    doubled first."""
    args = tuple(inputs)
    if dynamic_shapes is not None:
        args = _widen(args, dynamic_shapes)
    return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)


def batch_range(dynamic_shapes: Any, cap: int = DEFAULT_MAX_BATCH) -> tuple[int, int] | None:
    """``(lo, hi)`` when dimension 0 of every input is one dynamic ``Dim`` (an unbounded ``hi`` becomes ``cap``,
    or ``lo`` when that is larger); ``None`` otherwise."""
    if not isinstance(dynamic_shapes, (list, tuple)) or not dynamic_shapes:
        return None
    dims = [spec.get(0) if isinstance(spec, Mapping) else None for spec in dynamic_shapes]
    if any(d is None for d in dims) or len({id(d) for d in dims}) != 1:
        return None
    d = dims[0]
    lo = max(int(getattr(d, "min", 1) or 1), 1)
    hi = getattr(d, "max", None)
    hi = cap if hi is None or not isinstance(hi, int) or hi > 2**31 else int(hi)
    hi = max(hi, lo, 2)
    return lo, hi


def describe(dynamic_shapes: Any) -> list[dict[str, Any]] | None:
    """JSON-friendly form for reports: per input, ``{"dim": i, "name": ..., "min": ..., "max": ...}`` entries."""
    if not isinstance(dynamic_shapes, (list, tuple)):
        return None if dynamic_shapes is None else [{"spec": str(dynamic_shapes)}]
    out = []
    for k, spec in enumerate(dynamic_shapes):
        if not isinstance(spec, Mapping):
            continue
        for i, d in spec.items():
            if d is None:
                continue
            hi = getattr(d, "max", None)
            out.append({"input": k, "dim": int(i), "name": str(getattr(d, "__name__", d)),
                        "min": getattr(d, "min", None),
                        "max": hi if isinstance(hi, int) and hi < 2**31 else None})
    return out or None
