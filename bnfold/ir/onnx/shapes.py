"""Static shapes of an ONNX graph's values, from ONNX shape inference run on a light copy of the model.

The copy turns large initializers into graph inputs of the same type and shape (inference needs their shapes,
never their bytes), so a model of any size is inferred without copying its weights. A dimension is an ``int``,
a symbol (``str``, e.g. ``"batch"``) or ``None`` (unknown).

A move that depends on a symbolic dimension (a dynamic batch) is computed twice, with every symbol set to each of
:data:`SYMBOL_SIZES` (:func:`concrete_shape`), and accepted only when both agree.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import onnx

__all__ = ["SYMBOL_SIZES", "Shape", "concrete", "concrete_shape", "concrete_shapes", "infer_shapes", "rank", "shape"]

Shape = tuple[int | str | None, ...]


class Shaped(Protocol):
    """What the shape helpers read of a graph (:class:`~bnfold.ir.onnx.graph.OnnxGraph`)."""

    graph: onnx.GraphProto

    @property
    def shapes(self) -> dict[str, Shape]: ...

    @property
    def shapes_at(self) -> dict[int, dict[str, tuple[int, ...]]]: ...


SYMBOL_SIZES = (2, 3)
"""Sizes given to symbolic dimensions; a move must give the same affine for both."""

log = logging.getLogger(__name__)


_INLINE_LIMIT = 64  # initializers up to this many elements stay (Reshape targets, axes: inference reads them)


def _dims(t: onnx.TypeProto) -> Shape | None:
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in t.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return tuple(out)


def infer_shapes(model: onnx.ModelProto, *, dynamic: int | None = None) -> dict[str, Shape]:
    """Shapes of every value ONNX shape inference can type (empty when inference fails). ``dynamic``: every
    dimension of a graph input that is not a number (a dynamic batch, a symbol) is set to this size first, so
    values computed from it get concrete sizes too (``B·N`` after a flatten, for instance)."""
    light = onnx.ModelProto()
    _light_copy(model, light)
    _inputs_for_large(light)
    if dynamic is not None:
        _fix_dynamic(light.graph, dynamic)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # a model ONNX cannot type: rules that need shapes say "shape unknown"
        log.info("ONNX shape inference failed: %s: %s", type(exc).__name__, exc)
        return {}
    g = inferred.graph
    out: dict[str, Shape] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        dims = _dims(vi.type)
        if dims is not None:
            out[vi.name] = dims
    for t in model.graph.initializer:
        out.setdefault(t.name, tuple(int(d) for d in t.dims))
    return out


def _light_copy(model: onnx.ModelProto, light: onnx.ModelProto) -> None:
    """Copy ``model`` into ``light`` without the bytes of large initializers."""
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(light, field, getattr(model, field))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = light.graph
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if n <= _INLINE_LIMIT:
            g.initializer.append(t)
        else:
            meta = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
            g.initializer.append(meta)


def _inputs_for_large(light: onnx.ModelProto) -> None:
    """Large initializers of ``light`` become typed graph inputs (their shapes stay known)."""
    g = light.graph
    declared = {i.name for i in g.input}
    keep = []
    for t in g.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if n <= _INLINE_LIMIT:
            keep.append(t)
        elif t.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del g.initializer[:]
    g.initializer.extend(keep)


def _fix_dynamic(g: onnx.GraphProto, size: int) -> None:
    """Give every non-numeric input dimension of ``g`` the size ``size``; drop what the graph declares about other
    values' shapes (their symbols would no longer match)."""
    for vi in g.input:
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = size
    del g.value_info[:]
    for vi in g.output:
        if vi.type.tensor_type.HasField("shape"):
            vi.type.tensor_type.ClearField("shape")


def concrete_shapes(model: onnx.ModelProto, sizes: tuple[int, ...]) -> dict[int, dict[str, tuple[int, ...]]]:
    """For each size in ``sizes``, the fully numeric shapes inference finds with the dynamic input dimensions set
    to it (:func:`infer_shapes` with ``dynamic``)."""
    out: dict[int, dict[str, tuple[int, ...]]] = {}
    for v in sizes:
        shapes = infer_shapes(model, dynamic=v)
        out[v] = {k: tuple(int(d) for d in s) for k, s in shapes.items() if all(isinstance(d, int) for d in s)}
    return out


def shape(g: Shaped, value: str) -> Shape | None:
    return g.shapes.get(value)


def rank(g: Shaped, value: str) -> int | None:
    s = g.shapes.get(value)
    return None if s is None else len(s)


def concrete(dims: Shape | None, v: int, *, symbols: set[str] | None = None, total: int | None = None
             ) -> tuple[int, ...] | None:
    """``dims`` with every symbol (of ``symbols``, or any symbol when None) set to ``v``; one dimension left
    unknown is solved from ``total`` elements. None when that is not possible."""
    if dims is None:
        return None
    out: list[int | None] = []
    for d in dims:
        if isinstance(d, int):
            out.append(d)
        elif isinstance(d, str) and (symbols is None or d in symbols):
            out.append(v)
        else:
            out.append(None)
    missing = [k for k, d in enumerate(out) if d is None]
    if missing:
        known = math.prod(d for d in out if d is not None)
        if total is None or len(missing) > 1 or known == 0 or total % known:
            return None
        out[missing[0]] = total // known
    return tuple(int(d) for d in out if d is not None)


def concrete_shape(g: Shaped, value: str, v: int, *, total: int | None = None) -> tuple[int, ...] | None:
    """The shape of ``value`` with the graph's dynamic input dimensions set to ``v``: from shape inference run
    at that size (``g.shapes_at``), else from the symbolic shape (the inputs' symbols set to ``v``, one unknown
    dimension solved from ``total``)."""
    s = g.shapes_at.get(v, {}).get(value)
    if s is not None:
        return s
    roots = {d.dim_param for i in g.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
    return concrete(shape(g, value), v, symbols=roots, total=total)
