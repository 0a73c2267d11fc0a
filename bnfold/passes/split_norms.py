"""Split the affine part off sample-dependent normalizations so it can fold into the next linear op(s).

LayerNorm, RMSNorm (affine on the last axis) and GroupNorm, InstanceNorm (affine on the channel axis, axis 1)::

    LN(x; γ, β) = γ ⊙ n(x) + β    with n the parameter-free normalization
                = channel_affine(n(x), γ, β, axis)

The split is made only when that affine then folds completely into every consumer (a Linear reading the last
axis, a conv without zero padding, possibly after a forward move through reshapes/pools); otherwise the norm
is left whole and the report says why. An affine that is split but later left unfolded is merged back into
its norm by :class:`~bnfold.passes.cleanup.LowerAffines`, so no graph ever gets worse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from bnfold.graph import fetch_attr, get_constant, module_path, node_shape, normalized_kwargs
from bnfold.passes.affine_view import affine_view
from bnfold.passes.base import Change, PassResult, Rejection
from bnfold.passes.canonicalize import Candidate, insert_affine
from bnfold.passes.fold import FoldIntoConsumer, erase_affine

__all__ = ["NormSplit", "SplitNormAffine", "merge_back"]

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


def _norm_of(gm: torch.fx.GraphModule, node: torch.fx.Node
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


def _bare_norm(split: NormSplit, x: torch.fx.Node, weight: Any = None, bias: Any = None
               ) -> tuple[Any, tuple[Any, ...]]:
    if split.kind == "layer_norm":
        return aten.layer_norm.default, (x, list(split.arg), weight, bias, split.eps)
    if split.kind == "rms_norm":
        return aten.rms_norm.default, (x, list(split.arg), weight, split.eps)
    if split.kind == "instance_norm":
        return aten.instance_norm.default, (x, weight, bias, None, None, True, 0.1, split.eps, False)
    return aten.group_norm.default, (x, split.arg, weight, bias, split.eps)


class SplitNormAffine:
    """LayerNorm / RMSNorm / GroupNorm → parameter-free norm + ``channel_affine``, when the affine will fold."""

    name = "split_norm_affine"

    def __init__(self) -> None:
        self.candidates: dict[str, Candidate] = {}

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        result = PassResult(False)
        for node in list(gm.graph.nodes):
            if node.meta.get("bnfold_split"):
                continue
            found = _norm_of(gm, node)
            if found is None:
                continue
            kind_label = _label(gm, node)
            cid = node.name
            path = module_path(node)
            self.candidates.setdefault(cid, Candidate(cid, f"{kind_label} (affine part)", path))
            if isinstance(found, str):
                result.rejections.append(Rejection(self.name, node.name, found, (cid,)))
                continue
            split, x, w, b, axis = found
            shape = node_shape(node)
            if shape is None or not isinstance(x, torch.fx.Node):
                continue
            axis %= len(shape)
            target, args = _bare_norm(split, x)
            with gm.graph.inserting_before(node):
                bare = gm.graph.call_function(target, args)
            bare.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", "val", "nn_module_stack")})
            bare.meta["bnfold_split"] = split
            a = w.detach().to(f64).reshape(-1)
            bb = torch.zeros_like(a) if b is None else b.detach().to(f64).reshape(-1)
            affine = insert_affine(gm, bare, a, bb, axis, before=node, sources=(cid,), hint=f"{node.name}_affine")
            node.replace_all_uses_with(affine)
            view = affine_view(gm, affine)
            why = _will_not_fold(gm, view)
            if why is None:
                gm.graph.erase_node(node)
                result.changes.append(Change(self.name, node.name, f"{kind_label} split into norm + affine", (cid,)))
            else:  # undo: the norm stays whole
                affine.replace_all_uses_with(node)
                if view is not None:
                    erase_affine(gm, view, bare)
                gm.graph.erase_node(bare)
                result.rejections.append(Rejection(self.name, node.name, f"its affine stays in the norm: {why}",
                                                   (cid,)))
        result.modified = bool(result.changes)
        return result


def _label(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return type(fetch_attr(gm, str(node.target))).__name__
    return f"aten.{getattr(node.target, '__name__', node.target)}"


def _will_not_fold(gm: torch.fx.GraphModule, view: Any) -> str | None:
    """None when the split affine will fold completely into its consumers (directly or after a forward move)."""
    from bnfold.passes.commute import Affine
    from bnfold.passes.linear_ops import LinearOp, match_linear_op
    from bnfold.passes.propagate import Propagate

    if view is None:
        return "internal: split affine not recognised"
    ops = FoldIntoConsumer.check(gm, view)
    if isinstance(ops, str):
        shape = node_shape(view.x)
        if shape is None:
            return ops
        dest = Propagate().push_target(gm, view, Affine(view.a, view.b, view.axis, shape))
        if isinstance(dest, str):
            return f"{ops}; moving it forward: {dest}"
        ops = [op for op in (match_linear_op(gm, u) for u in dest[0].users) if isinstance(op, LinearOp)]
        shift = dest[1].b
    else:
        shift = view.b
    if bool((shift != 0).any()) and any(op.reads_padding_zeros() or op.kind == "conv_transpose" for op in ops):
        return "a consumer conv pads with zeros, so the shift could not fold"
    return None


def merge_back(gm: torch.fx.GraphModule, affine: torch.fx.Node) -> torch.fx.Node | None:
    """If ``affine`` follows a norm we split (and is its only user), put it back into the norm's weight/bias."""
    from bnfold.graph import add_constant

    view = affine_view(gm, affine)
    if view is None:
        return None
    bare = view.x
    split = bare.meta.get("bnfold_split")
    if not isinstance(split, NormSplit):
        return None
    norm_axis = 1 if split.kind in ("group_norm", "instance_norm") else view.rank - 1
    if len(bare.users) != 1 or view.axis != norm_axis:
        return None
    if split.kind == "rms_norm" and bool((view.b != 0).any()):
        return None
    dtype = bare.meta["tensor_meta"].dtype if "tensor_meta" in bare.meta else torch.float32
    w = add_constant(gm, view.a.to(dtype), f"{bare.name}_weight", before=bare, parameter=True)
    b = add_constant(gm, view.b.to(dtype), f"{bare.name}_bias", before=bare, parameter=True) \
        if split.kind != "rms_norm" else None
    x = bare.args[0]
    target, args = _bare_norm(split, x, w, b)  # type: ignore[arg-type]
    with gm.graph.inserting_before(affine):
        whole = gm.graph.call_function(target, args)
    whole.meta.update({k: v for k, v in affine.meta.items() if k != "bnfold_sources"})
    erase_affine(gm, view, whole)
    gm.graph.erase_node(bare)
    return whole
