"""Small torch.fx helpers shared by every pass: constants, shapes, names.

Graph surgery lives here and in the passes; the arithmetic of folding lives in
``bnfold.ir.affine_math`` so each can be tested on its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any, List  # noqa: UP035 (List[int] is how torch schemas spell a list of ints)

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

__all__ = [
    "add_constant",
    "cached_lookups",
    "fetch_attr",
    "get_constant",
    "module_path",
    "node_dtype",
    "node_shape",
    "normalized_kwargs",
    "propagate_shapes",
    "shapes_from_vals",
    "unique_attr_name",
]

log = logging.getLogger(__name__)


_OWNERS: contextvars.ContextVar[tuple[torch.nn.Module, dict[str, Any]] | None] = contextvars.ContextVar(
    "bnfold_owner_modules", default=None)


@contextlib.contextmanager
def cached_lookups(gm: torch.nn.Module) -> Iterator[None]:
    """While active, :func:`fetch_attr` on ``gm`` remembers the module that owns each attribute path (a dotted
    path costs one dictionary lookup instead of one ``getattr`` per component). For code that adds submodules
    only under new names and never replaces one, such as the pass pipeline."""
    token = _OWNERS.set((gm, {}))
    try:
        yield
    finally:
        _OWNERS.reset(token)


def fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    """Resolve a dotted attribute path (``layer1.0.conv1.weight``) on ``gm``."""
    state = _OWNERS.get()
    if state is not None and state[0] is gm:
        owners = state[1]
        owner_path, _, leaf = target.rpartition(".")
        owner = owners.get(owner_path)
        if owner is None:
            owner = owners[owner_path] = _walk(gm, owner_path) if owner_path else gm
        return getattr(owner, leaf)
    return _walk(gm, target)


def _walk(obj: Any, target: str) -> Any:
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def get_constant(gm: torch.fx.GraphModule, arg: Any) -> torch.Tensor | None:
    """The tensor behind ``arg`` when it is a ``get_attr`` node of a tensor; otherwise ``None``."""
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        value = fetch_attr(gm, str(arg.target))
        if isinstance(value, torch.Tensor):
            return value
    return None


def unique_attr_name(gm: torch.nn.Module, hint: str) -> str:
    """An attribute name derived from ``hint`` that ``gm`` does not use yet."""
    base = re.sub(r"[^0-9a-zA-Z_]", "_", hint).rstrip("_") or "const"
    if base[0].isdigit():
        base = f"_{base}"
    name, k = base, 0
    while hasattr(gm, name):
        k += 1
        name = f"{base}_{k}"
    return name


def add_constant(
    gm: torch.fx.GraphModule,
    value: torch.Tensor,
    hint: str,
    *,
    before: torch.fx.Node,
    parameter: bool = False,
    copy: bool = True,
) -> torch.fx.Node:
    """Register ``value`` on ``gm`` under a fresh name and return a ``get_attr`` node placed before ``before``.

    Parameters are registered with ``requires_grad=False``: folded weights are inference constants. ``value`` is
    copied unless ``copy=False`` (for a tensor just computed, that nothing else holds). The node gets its shape
    metadata (``tensor_meta``, ``val``) directly from ``value``.
    """
    name = unique_attr_name(gm, f"_bnfold_{hint}")
    value = value.detach().clone() if copy else value.detach()
    if parameter:
        gm.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
    else:
        gm.register_buffer(name, value)
    with gm.graph.inserting_before(before):  # create_node: get_attr() would re-check the attribute just made
        node = gm.graph.create_node("get_attr", name, name=name)
    node.meta["tensor_meta"] = _constant_meta(value)
    node.meta["val"] = value
    return node


def _constant_meta(t: torch.Tensor) -> TensorMetadata:
    """``tensor_meta`` of a dense constant without the general (slow) memory-format probing."""
    if t.is_contiguous() and not t.is_quantized:
        return TensorMetadata(t.shape, t.dtype, False, t.stride(), torch.contiguous_format, False, {})
    return _tensor_meta(t)


def _tensor_meta(t: torch.Tensor) -> TensorMetadata:
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    return _extract_tensor_metadata(t)


def shapes_from_vals(gm: torch.fx.GraphModule, *, complete: bool = True) -> bool:
    """Record ``tensor_meta`` from the (fake) values in ``node.meta['val']`` — those ``torch.export`` leaves, or a
    fake-tensor propagation. ``complete``: all or nothing — False (nothing recorded) when a node that computes
    something has no value (export's input-guard call, which returns nothing, is not one)."""
    metas: dict[torch.fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if "val" not in node.meta:
            if complete and not (node.op == "call_module" and not node.users):
                return False
            continue
        val = node.meta["val"]
        if isinstance(val, torch.Tensor):
            metas[node] = _tensor_meta(val)
        elif isinstance(val, (tuple, list)) and val and all(isinstance(v, torch.Tensor) for v in val):
            metas[node] = tuple(_tensor_meta(v) for v in val)
    for node, meta in metas.items():
        node.meta["tensor_meta"] = meta
    return True


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Record shape/dtype of every node in ``node.meta['tensor_meta']`` by running ``gm`` once.

    Uses fake tensors (no real compute) when possible and falls back to a real run.
    """
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        class _FakeTensorProp(FakeTensorProp):
            """Also records a plain Python result (``x.size(-1)``: an int; ``x.size()``: a tuple of ints) as the
            node's ``val``, as torch >= 2.13's own does. Before 2.13 such a node had no value (or Nones), and a node
            without one may be a tensor: ``x.view(-1, x.size(-1))`` (transformers' ``Conv1D``, GPT-2) then read two
            tensors, and no affine crossed it."""

            def run_node(self, n: torch.fx.Node) -> Any:
                result = super().run_node(n)
                if _plain(result):  # torch < 2.13: no val, or one None per int of a torch.Size
                    n.meta["val"] = tuple(result) if isinstance(result, (tuple, list)) else result
                return result

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_inputs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
        _FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)
        shapes_from_vals(gm, complete=False)
        return
    except Exception as exc:  # fake propagation is an optimisation only
        log.debug("fake shape propagation failed (%s); running the graph for real", exc)
    with torch.no_grad(), quiet_fx():
        ShapeProp(gm).propagate(*example_inputs)


def _plain(value: Any) -> bool:
    """An int / float / bool, or a tuple or list of them (a ``torch.Size``)."""
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, (int, float, bool)) for v in value)
    return isinstance(value, (int, float, bool))


@contextlib.contextmanager
def quiet_fx() -> Iterator[None]:
    """Keep torch.fx from printing a traceback to stderr when a graph fails to run (``ShapeProp`` and
    ``GraphModule.__call__`` both do, before raising): the exception carries the message, and what fx wrote
    goes to the debug log."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    finally:
        if buffer.getvalue():
            log.debug("torch.fx wrote to stderr:\n%s", buffer.getvalue())


def _meta(node: torch.fx.Node) -> TensorMetadata | None:
    meta = node.meta.get("tensor_meta")
    return meta if isinstance(meta, TensorMetadata) else None


def node_shape(node: Any) -> tuple[int, ...] | None:
    """Static shape of a tensor-valued node, if known."""
    if not isinstance(node, torch.fx.Node):
        return None
    meta = _meta(node)
    if meta is None:
        return None
    try:
        return tuple(int(d) for d in meta.shape)
    except (TypeError, ValueError):  # symbolic sizes
        return None


def node_dtype(node: Any) -> torch.dtype | None:
    """dtype of a tensor-valued node, if known."""
    if not isinstance(node, torch.fx.Node):
        return None
    meta = _meta(node)
    return None if meta is None else meta.dtype


def normalized_kwargs(gm: torch.fx.GraphModule, node: torch.fx.Node) -> dict[str, Any] | None:
    """A ``call_function`` node's arguments by name (aten schema or Python signature), or ``None``. An overloaded
    function whose schema the values alone do not pick (``torch.conv2d``'s ``padding`` is ints or a string) is
    matched with the arguments' types."""
    if node.op != "call_function":
        return None
    try:
        pair = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    except RuntimeError:  # "the schema match was ambiguous"
        try:
            pair = node.normalized_arguments(
                gm, arg_types=tuple(_arg_type(a) for a in node.args),
                kwarg_types={k: _arg_type(v) for k, v in node.kwargs.items()}, normalize_to_only_use_kwargs=True)
        except RuntimeError:
            return None
    return None if pair is None else dict(pair.kwargs)


def _arg_type(value: Any) -> Any:
    """The type torch.fx's schema matching expects for an argument value (``List[int]`` for a list of ints)."""
    if isinstance(value, torch.fx.Node):
        val = value.meta.get("val")
        return type(val) if val is not None and not isinstance(val, torch.Tensor) else torch.Tensor
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, int) for v in value):
            return List[int]  # noqa: UP006 (the schema's own spelling)
        return list
    return type(value)


def module_path(node: torch.fx.Node) -> str:
    """Where ``node`` came from in the user's model (``layer1.0.bn1``), as well as can be told."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, _cls = list(stack.values())[-1]
        path = str(path)
        # torch.export spells paths like "L['self'].layer1[0].bn1" in some versions
        path = re.sub(r"^L\['self'\]\.?", "", path)
        path = re.sub(r"\[(\d+)\]", r".\1", path)
        if path:
            return path
    return node.name


def module_class(node: torch.fx.Node) -> str | None:
    """Class name of the innermost user module that produced ``node``, if recorded."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    _path, cls = list(stack.values())[-1]
    name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
    return str(name).rsplit(".", 1)[-1]
