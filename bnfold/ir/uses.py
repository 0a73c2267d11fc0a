"""Value uses vs metadata uses of a graph node.

A fold changes the *values* a node computes, never its shape, dtype or device. A user that reads only that
metadata — ``x.shape``, ``x.ndim``, ``x.size()``, ``x.dim()``, the shape argument of ``y.reshape_as(x)`` /
``view_as`` / ``expand_as``, ``torch.zeros_like(x)``, ``aten.sym_size`` after ``torch.export`` — computes the same
thing before and after, so it never blocks a fold. Only :func:`value_users` count when a rule asks "does anything
else read this output?". The classification is per (user, argument position) and the same in both capture modes.
"""

from __future__ import annotations

import builtins
from typing import Any

import torch
import torch.fx

__all__ = ["METADATA_ATTRS", "nodes_in", "reads_values", "value_users"]

METADATA_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "layout", "is_cuda", "is_sparse", "is_quantized",
                            "is_floating_point", "requires_grad"})
"""Tensor attributes that do not depend on the values (``getattr(x, name)`` after symbolic tracing)."""

_METHODS_ON_SELF = frozenset({"size", "dim", "ndimension", "numel", "nelement", "get_device", "is_contiguous",
                              "new_zeros", "new_ones", "new_empty", "new_full", "element_size", "stride"})
"""Methods whose result depends only on ``self``'s metadata (its first argument)."""

_METHODS_SHAPE_OF_OTHER = frozenset({"reshape_as", "view_as", "expand_as", "type_as"})
"""``a.method(b)``: ``b`` contributes only its shape (dtype for ``type_as``); ``a``'s values are read."""

_LIKE_FUNCTIONS: frozenset[Any] = frozenset({torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
                                             torch.numel})


def _aten(name: str, overload: str) -> Any:
    packet = getattr(torch.ops.aten, name, None)
    return getattr(packet, overload, None) if packet is not None else None


_ATEN_META_OF_FIRST: frozenset[Any] = frozenset(op for op in (
    _aten("sym_size", "int"), _aten("sym_size", "default"), _aten("sym_numel", "default"),
    _aten("sym_stride", "int"), _aten("sym_stride", "default"), _aten("sym_storage_offset", "default"),
    _aten("size", "int"), _aten("size", "default"), _aten("dim", "default"), _aten("numel", "default"),
    _aten("zeros_like", "default"), _aten("ones_like", "default"), _aten("empty_like", "default"),
    _aten("full_like", "default"), _aten("new_zeros", "default"), _aten("new_ones", "default"),
    _aten("new_empty", "default"), _aten("new_full", "default"),
    _aten("_assert_tensor_metadata", "default"),  # export's check of a cast's input dtype/shape (Olmo2's `.to`)
) if op is not None)
"""aten overloads (``torch.export`` graphs) reading only the metadata of their first argument."""

_ATEN_SHAPE_OF_SECOND: frozenset[Any] = frozenset(op for op in (
    _aten("reshape_as", "default"), _aten("view_as", "default"), _aten("expand_as", "default"),
    _aten("type_as", "default"),
) if op is not None)


def _metadata_positions(user: torch.fx.Node) -> tuple[int, ...]:
    """Positional arguments of ``user`` that contribute only metadata (empty: every argument is a value)."""
    t = user.target
    if user.op == "call_function":
        if t is builtins.getattr:
            return (0,) if len(user.args) > 1 and user.args[1] in METADATA_ATTRS else ()
        if t in _LIKE_FUNCTIONS or t in _ATEN_META_OF_FIRST:
            return (0,)
        if t in _ATEN_SHAPE_OF_SECOND:
            return (1,)
        return ()
    if user.op == "call_method":
        if t in _METHODS_ON_SELF:
            return (0,)
        if t in _METHODS_SHAPE_OF_OTHER:
            return (1,)
    return ()


def nodes_in(value: Any) -> list[torch.fx.Node]:
    """The graph nodes inside an argument value (nested tuples, lists and dicts included)."""
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(value, found.append)
    return found


def reads_values(user: torch.fx.Node, node: torch.fx.Node) -> bool:
    """Whether ``user`` reads the values of ``node`` (not only its shape, dtype or device)."""
    meta = _metadata_positions(user)
    if not meta:
        return True
    if node in nodes_in(user.kwargs):
        return True
    return node in nodes_in([a for i, a in enumerate(user.args) if i not in meta])


def value_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The users of ``node`` that read its values, in graph order (``node.users`` minus metadata-only uses)."""
    return [u for u in node.users if reads_values(u, node)]
