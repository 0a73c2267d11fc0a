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

__all__ = ["NormSplit", "bare_norm", "norm_label", "norm_of"]

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
             ) -> tuple[NormSplit, torch.fx.Node, torch.Tensor, torch.Tensor | None, int] | str | None:
    """``(split, input, weight, bias, axis)`` for an affine LN/RMS/GN node; a reason string; or None."""
    if node.op == "call_module":
        m = fetch_attr(gm, str(node.target))
        x = node.args[0] if node.args else None
        if type(m) is nn.LayerNorm:
            if not m.elementwise_affine:
                return None
            if len(m.normalized_shape) != 1:
                return f"LayerNorm '{node.target}' normalizes over several axes"
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
                return f"{type(m).__name__} '{node.target}' normalizes with running statistics; not supported"
            return NormSplit("instance_norm", None, m.eps, str(node.target)), x, m.weight, m.bias, 1
        if hasattr(nn, "RMSNorm") and type(m) is nn.RMSNorm:
            if m.weight is None:
                return None
            if len(m.normalized_shape) != 1:
                return f"RMSNorm '{node.target}' normalizes over several axes"
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
        return f"the norm at '{path}' takes its weight/bias from computed values"
    x = kw.get("input")
    if node.target in _IN:
        if not kw.get("use_input_stats", True):
            return f"the InstanceNorm at '{path}' normalizes with running statistics; not supported"
        return NormSplit("instance_norm", None, kw.get("eps", 1e-5), path), x, w, b, 1
    if node.target in _RMS:
        shape = tuple(kw["normalized_shape"])
        if len(shape) != 1:
            return f"the RMSNorm at '{path}' normalizes over several axes"
        return NormSplit("rms_norm", shape, kw.get("eps"), path), x, w, None, -1
    kind = _LN[node.target]
    if kind == "layer_norm":
        shape = tuple(kw["normalized_shape"])
        if len(shape) != 1:
            return f"the LayerNorm at '{path}' normalizes over several axes"
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
