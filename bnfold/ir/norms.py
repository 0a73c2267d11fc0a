"""Sample-dependent normalizations with an affine part, shared by the rules that split them
(:mod:`~bnfold.passes.split_norms`) and merge them back (:mod:`~bnfold.passes.lower_affines`).

LayerNorm, RMSNorm (affine on the last axis) and GroupNorm, InstanceNorm (affine on the channel axis, axis 1)::

    LN(x; γ, β) = γ ⊙ n(x) + β    with n the parameter-free normalization
                = channel_affine(n(x), γ, β, axis)

:func:`norm_of` reads a norm node as ``(split, input, γ, β, axis)``; :func:`bare_norm` builds ``n``, or the
whole norm again with new ``γ, β``; ``lower_affines`` puts an unfolded split affine back into its norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from bnfold.ir.graph import fetch_attr, get_constant, module_path, normalized_kwargs
from bnfold.ir.reasons import Fail

__all__ = ["NormSplit", "bare_norm", "handwritten_norm", "norm_label", "norm_of"]

aten = torch.ops.aten
f64 = torch.float64


@dataclass(frozen=True)
class NormSplit:
    """How to rebuild a split norm: ``kind`` and the arguments of its parameter-free form."""

    kind: str  # "layer_norm" | "rms_norm" | "group_norm" | "instance_norm"
    arg: Any  # normalized_shape or num_groups
    eps: float | None
    path: str


_LN = {F.layer_norm: "layer_norm", aten.layer_norm.default: "layer_norm",
       F.group_norm: "group_norm", aten.group_norm.default: "group_norm"}
_RMS = {aten.rms_norm.default}
_IN = {F.instance_norm, aten.instance_norm.default}
if hasattr(F, "rms_norm"):
    _RMS.add(F.rms_norm)


def norm_of(gm: torch.fx.GraphModule, node: torch.fx.Node
             ) -> tuple[NormSplit, torch.fx.Node, torch.Tensor, torch.Tensor | None, int] | Fail | None:
    """``(split, input, weight, bias, axis)`` for an affine LN/RMS/GN node; why it cannot be split (:class:`Fail`);
    or None (not an affine norm)."""
    if node.op == "call_module":
        m = fetch_attr(gm, str(node.target))
        x = node.args[0] if node.args else None
        if type(m) is nn.LayerNorm:
            if not m.elementwise_affine:
                return None
            if len(m.normalized_shape) != 1:
                return Fail(f"LayerNorm '{node.target}' normalizes over several axes")
            return (NormSplit("layer_norm", tuple(m.normalized_shape), m.eps, str(node.target)),
                    x, m.weight, m.bias, -1)
        if type(m) is nn.GroupNorm:
            if not m.affine:
                return None
            return NormSplit("group_norm", m.num_groups, m.eps, str(node.target)), x, m.weight, m.bias, 1
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and type(m).forward is type(m).__mro__[1].forward:
            if not m.affine:
                return None
            if m.track_running_stats and not m.training:
                return Fail(f"{type(m).__name__} '{node.target}' normalizes with running statistics; not supported")
            return NormSplit("instance_norm", None, m.eps, str(node.target)), x, m.weight, m.bias, 1
        if hasattr(nn, "RMSNorm") and type(m) is nn.RMSNorm:
            if m.weight is None:
                return None
            if len(m.normalized_shape) != 1:
                return Fail(f"RMSNorm '{node.target}' normalizes over several axes")
            return NormSplit("rms_norm", tuple(m.normalized_shape), m.eps, str(node.target)), x, m.weight, \
                None, -1
        return None
    if node.op != "call_function" or (node.target not in _LN and node.target not in _RMS
                                      and node.target not in _IN):
        return None
    kw = normalized_kwargs(gm, node)
    if kw is None:
        return None
    w_node, b_node = kw.get("weight"), kw.get("bias")
    if w_node is None:
        return None
    w, b = get_constant(gm, w_node), get_constant(gm, b_node)
    path = module_path(node)
    if w is None or (b_node is not None and b is None):
        return Fail(f"the norm at '{path}' takes its weight/bias from computed values")
    x = kw.get("input")
    if node.target in _IN:
        if not kw.get("use_input_stats", True):
            return Fail(f"the InstanceNorm at '{path}' normalizes with running statistics; not supported")
        return NormSplit("instance_norm", None, kw.get("eps", 1e-5), path), x, w, b, 1
    if node.target in _RMS:
        shape = tuple(kw["normalized_shape"])
        if len(shape) != 1:
            return Fail(f"the RMSNorm at '{path}' normalizes over several axes")
        return NormSplit("rms_norm", shape, kw.get("eps"), path), x, w, None, -1
    kind = _LN[node.target]
    if kind == "layer_norm":
        shape = tuple(kw["normalized_shape"])
        if len(shape) != 1:
            return Fail(f"the LayerNorm at '{path}' normalizes over several axes")
        return NormSplit(kind, shape, kw.get("eps", 1e-5), path), x, w, b, -1
    return NormSplit(kind, int(kw["num_groups"]), kw.get("eps", 1e-5), path), x, w, b, 1


def bare_norm(split: NormSplit, x: torch.fx.Node, weight: Any = None, bias: Any = None
               ) -> tuple[Any, tuple[Any, ...]]:
    if split.kind == "layer_norm":
        return aten.layer_norm.default, (x, list(split.arg), weight, bias, split.eps)
    if split.kind == "rms_norm":
        return aten.rms_norm.default, (x, list(split.arg), weight, split.eps)
    if split.kind == "instance_norm":
        return aten.instance_norm.default, (x, weight, bias, None, None, True, 0.1, split.eps, False)
    return aten.group_norm.default, (x, split.arg, weight, bias, split.eps)


def norm_label(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return type(fetch_attr(gm, str(node.target))).__name__
    return f"aten.{getattr(node.target, '__name__', node.target)}"


# -- norms written by hand (Hugging Face's LlamaRMSNorm, T5LayerNorm, …) ------------------------------------------

_CASTS = frozenset({"to", "to_copy", "type", "float", "contiguous", "clone", "type_as"})


def _op(node: Any) -> str | None:
    """An op's bare name alike in both captures (``operator.mul``, ``aten.mul.Tensor``, ``"mul"`` → ``mul``)."""
    if not isinstance(node, torch.fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    t = node.target
    name = (t if isinstance(t, str) else getattr(t, "__name__", str(t))).split(".")[0].lstrip("_")
    return "div" if name == "truediv" else name


def _uncast(node: Any) -> Any:
    while _op(node) in _CASTS and node.args:
        node = node.args[0]
    return node


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [a for a in node.args if isinstance(a, torch.fx.Node)]


def _is_mean_square(node: Any) -> bool:
    """``mean(h², -1)`` (``pow(h, 2)``, ``h * h`` or ``square(h)``) or ``var(h)``."""
    node = _uncast(node)
    if _op(node) in ("var", "var_mean"):
        return True
    if _op(node) != "mean" or not node.args:
        return False
    sq = _uncast(node.args[0])
    name = _op(sq)
    if name in ("pow", "square") and (name == "square" or (len(sq.args) > 1 and sq.args[1] == 2)):
        return True
    return name == "mul" and len(sq.args) == 2 and sq.args[0] is sq.args[1]


def _inverse_rms(node: Any) -> bool:
    """``rsqrt(ms + eps)`` / ``rsqrt(ms)``, with ``ms`` a mean square (see :func:`_is_mean_square`)."""
    node = _uncast(node)
    if _op(node) != "rsqrt" or not node.args:
        return False
    inner = _uncast(node.args[0])
    if _op(inner) == "add":
        return any(_is_mean_square(a) for a in _tensor_args(inner))
    return _is_mean_square(inner)


def _rms(node: Any) -> bool:
    """``sqrt(ms + eps)``."""
    node = _uncast(node)
    if _op(node) != "sqrt" or not node.args:
        return False
    inner = _uncast(node.args[0])
    return any(_is_mean_square(a) for a in _tensor_args(inner)) if _op(inner) == "add" else _is_mean_square(inner)


def handwritten_norm(x: Any) -> str | None:
    """``"RMSNorm"`` / ``"LayerNorm"`` when ``x`` (what a per-channel weight multiplies) is a normalization written
    out in tensor ops — ``h · rsqrt(mean(h²) + ε)`` or ``h / sqrt(…)``, possibly cast (``.to(dtype)``); LayerNorm
    when ``h = x − mean(x)`` (centred). A label for the report only: whether a fold is exact never depends on it."""
    node = _uncast(x)
    name = _op(node)
    if name not in ("mul", "div") or len(node.args) != 2:
        return None
    h, r = node.args
    if name == "mul" and not _inverse_rms(r):
        h, r = r, h
        if not _inverse_rms(r):
            return None
    if name == "div" and not _rms(r):
        return None
    h = _uncast(h)
    if _op(h) == "sub" and len(h.args) == 2 and _op(_uncast(h.args[1])) == "mean":
        return "LayerNorm"
    return "RMSNorm"
