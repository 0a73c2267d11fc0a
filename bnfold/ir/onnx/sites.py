"""Normalizations in an ONNX graph, read as per-channel affines ``y = a ⊙ x + b`` along one axis (float64).

* ``BatchNormalization`` (inference): ``a = γ/√(σ²+ε)``, ``b = β − μ·a`` on axis 1 — the whole node is the affine
  (:func:`bnfold.ir.reasons.batchnorm_problem`, the same check and words as the torch path);
* ``LayerNormalization`` (opset 17) / ``RMSNormalization`` (opset 23) over the last axis: ``y = γ ⊙ n(x) + β`` —
  the affine part ``(γ, β)`` on axis −1 (folding it resets ``γ`` to ones and drops ``β``);
* ``GroupNormalization``: ``y = γ ⊙ n(x) + β`` on axis 1; from opset 21 ``γ, β`` are per channel, in opsets
  18–20 per *group* (``a[c] = γ[c // (C/G)]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch

from bnfold.ir import reasons
from bnfold.ir.onnx.graph import OnnxGraph, attr
from bnfold.ir.onnx.ops import FLOAT_TYPES, to64
from bnfold.ir.reasons import Fail

__all__ = ["NORM_OPS", "Site", "find_site"]

NORM_OPS = {"LayerNormalization": "LayerNorm", "RMSNormalization": "RMSNorm", "GroupNormalization": "GroupNorm"}


@dataclass
class Site:
    """A normalization: ``node`` computes ``a ⊙ x + b`` on ``axis`` (``-1``: the last) of its input ``x``
    (whole node for a BatchNorm, its affine part for a norm), or has a ``problem``."""

    node: onnx.NodeProto
    id: str
    kind: str
    x: str
    y: str
    axis: int
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    problem: str | None = None
    norm: bool = False  # True: the affine part of a LayerNorm/RMSNorm/GroupNorm (the node stays)
    groups: int = 0  # GroupNorm (opset < 21): γ/β are per group and must be expanded to channels
    dtype: np.dtype | None = None  # storage dtype of γ (norms: their reset values are written in it)

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.id,)

    def per_channel(self, channels: int) -> tuple[torch.Tensor, torch.Tensor] | Fail:
        """``(a, b)`` over ``channels`` channels (a per-group GroupNorm affine expanded), or why not."""
        assert self.a is not None and self.b is not None
        if not self.groups:
            return self.a, self.b
        if channels % self.groups:
            return Fail(f"{channels} channels do not split into its {self.groups} groups")
        k = channels // self.groups
        return self.a.repeat_interleave(k), self.b.repeat_interleave(k)


def _site_id(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def find_site(g: OnnxGraph, node: onnx.NodeProto) -> Site | None:
    """The normalization at ``node`` (foldable or with its ``problem``), or None when it is none."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "BatchNormalization":
        return _batchnorm(g, node)
    if node.op_type in NORM_OPS:
        return _norm(g, node)
    return None


def _floats(g: OnnxGraph, node: onnx.NodeProto, index: int) -> np.ndarray | Fail | None:
    if index >= len(node.input) or not node.input[index]:
        return None
    name = node.input[index]
    if not g.is_constant(name):
        return Fail(g.why_not_constant(name))
    if g.elem_type(name) not in FLOAT_TYPES:
        return Fail(f"'{name}' is not a floating-point tensor")
    value = g.constant(name)
    assert value is not None
    return value


def _batchnorm(g: OnnxGraph, node: onnx.NodeProto) -> Site:
    sid = _site_id(node)
    site = Site(node, sid, "BatchNormalization", node.input[0], node.output[0], 1)
    if int(attr(node, "training_mode", 0)) or any(o for o in node.output[1:]):
        site.problem = (f"BatchNormalization '{sid}' is in training mode (uses batch statistics); "
                        "export the model in eval mode")
        return site
    if g.opset() < 9 and int(attr(node, "spatial", 1)) == 0:
        site.problem = f"BatchNormalization '{sid}' has spatial=0 (statistics per activation, not per channel)"
        return site
    values = [_floats(g, node, i) for i in range(1, 5)]
    for name, v in zip(("scale", "bias", "mean", "variance"), values, strict=True):
        if v is None:
            site.problem = f"batch norm at '{sid}' has no {name} input"
            return site
        if isinstance(v, Fail):
            site.problem = f"batch norm at '{sid}' has a {name} computed in the graph, not a constant ({v.reason})"
            return site
    scale, bias, mean, var = (to64(v) for v in values if isinstance(v, np.ndarray))
    if not (scale.dim() == bias.dim() == mean.dim() == var.dim() == 1
            and scale.shape == bias.shape == mean.shape == var.shape):
        site.problem = f"batch norm at '{sid}' has parameters that are not vectors of one length"
        return site
    found = reasons.batchnorm_problem(sid, mean, var, scale, bias, float(attr(node, "epsilon", 1e-5)))
    if isinstance(found, reasons.Fail):
        site.problem = found.reason
    else:
        site.a, site.b = found
    return site


def _norm(g: OnnxGraph, node: onnx.NodeProto) -> Site:
    op = node.op_type
    label = NORM_OPS[op]
    sid = _site_id(node)
    site = Site(node, sid, f"{op} (affine part)", node.input[0], node.output[0],
                1 if op == "GroupNormalization" else -1, norm=True)
    scale = _floats(g, node, 1)
    bias = _floats(g, node, 2) if op != "RMSNormalization" else None
    for what, v in (("weight", scale), ("bias", bias)):
        if isinstance(v, Fail):
            site.problem = f"the norm at '{sid}' takes its {what} from computed values ({v.reason})"
            return site
    if not isinstance(scale, np.ndarray):
        site.problem = f"the {label} at '{sid}' has no scale"
        return site
    site.dtype = scale.dtype
    if op != "GroupNormalization":
        axis = int(attr(node, "axis", -1))
        if axis != -1 and not (scale.ndim == 1 and _rank(g, node.input[0]) == axis + 1):
            site.problem = f"the {label} at '{sid}' normalizes over several axes"
            return site
        if scale.ndim != 1 and not (scale.ndim > 1 and all(d == 1 for d in scale.shape[:-1])):
            site.problem = f"the {label} at '{sid}' normalizes over several axes"
            return site
    elif g.opset() < 21:
        site.groups = int(attr(node, "num_groups", 0))
        if site.groups <= 0 or scale.size != site.groups:
            site.problem = f"the GroupNorm at '{sid}' has a scale that is not one value per group"
            return site
    a = to64(scale).reshape(-1)
    b = torch.zeros_like(a) if not isinstance(bias, np.ndarray) else to64(bias).reshape(-1)
    if b.shape != a.shape:
        site.problem = f"the {label} at '{sid}' has scale and bias of different shapes"
        return site
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        site.problem = f"'{sid}' has non-finite (NaN/Inf) statistics or parameters; recalibrate it first"
        return site
    site.a, site.b = a, b
    return site


def _rank(g: OnnxGraph, value: str) -> int | None:
    from bnfold.ir.onnx.shapes import rank

    return rank(g, value)
