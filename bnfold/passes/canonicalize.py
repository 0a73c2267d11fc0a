"""Canonicalize: every inference-time BatchNorm becomes one :func:`~bnfold.passes.ops.channel_affine`
node ``y = a ⊙ x + b`` along the channel axis (``a = γ/√(σ²+ε)``, ``b = β − μ·a``, float64).

Elementwise affines with constant per-channel operands (a frozen BatchNorm traced through, a hand-written
BN formula) need no rewriting: the fold rules read them through :func:`~bnfold.passes.affine_view.affine_view`.
This pass only marks those that come from a norm-like module as report candidates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx

from bnfold.graph import add_constant, module_class, module_path
from bnfold.passes.affine_math import bn_affine
from bnfold.passes.affine_view import affine_view
from bnfold.passes.base import Change, PassResult, Rejection
from bnfold.passes.detect import BatchNormSite, find_batchnorm_sites
from bnfold.passes.ops import channel_affine, is_channel_affine

__all__ = ["Candidate", "Canonicalize", "insert_affine"]

f64 = torch.float64

_NORM_CLASS = re.compile(r"batch.?norm|(^|[^a-z])bn", re.IGNORECASE)


@dataclass(frozen=True)
class Candidate:
    """A normalization the user will want accounted for in the report."""

    id: str
    kind: str
    path: str


def insert_affine(
    gm: torch.fx.GraphModule,
    x: torch.fx.Node,
    a: torch.Tensor,
    b: torch.Tensor,
    axis: int,
    *,
    before: torch.fx.Node,
    sources: tuple[str, ...],
    hint: str,
) -> torch.fx.Node:
    """Insert ``channel_affine(x, a, b, axis)`` before ``before`` (constants stored in float64)."""
    scale = add_constant(gm, a.to(f64), f"{hint}_scale", before=before)
    shift = add_constant(gm, b.to(f64), f"{hint}_shift", before=before)
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(channel_affine, (x, scale, shift, axis))
    node.meta["bnfold_sources"] = tuple(sources)
    for key in ("tensor_meta", "val", "nn_module_stack", "stack_trace"):
        if key in x.meta and key in ("tensor_meta", "val"):
            node.meta[key] = x.meta[key]
        elif key in before.meta:
            node.meta[key] = before.meta[key]
    return node


class Canonicalize:
    """Inference-time BatchNorm sites → ``channel_affine``; problem sites are reported with their reason."""

    name = "canonicalize"

    def __init__(self) -> None:
        self.candidates: dict[str, Candidate] = {}

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        result = PassResult(False)
        for site in find_batchnorm_sites(gm):
            self.candidates.setdefault(site.id, Candidate(site.id, site.kind, site.path))
            if site.problem is not None:
                result.rejections.append(Rejection(self.name, site.node.name, site.problem, (site.id,)))
                continue
            self._replace_batchnorm(gm, site, result)
        for node in gm.graph.nodes:
            self._mark_traced_norm(gm, node)
        result.modified = bool(result.changes)
        return result

    def _replace_batchnorm(self, gm: torch.fx.GraphModule, site: BatchNormSite, result: PassResult) -> None:
        assert site.running_mean is not None and site.running_var is not None and site.output is not None
        x = site.node.args[0] if site.node.args else site.node.kwargs.get("input")  # current, not as detected
        assert isinstance(x, torch.fx.Node)
        a, b = bn_affine(site.running_mean, site.running_var, site.weight, site.bias, site.eps)
        affine = insert_affine(gm, x, a, b, 1, before=site.node, sources=(site.id,), hint=site.id)
        site.output.replace_all_uses_with(affine)
        if site.output is not site.node:
            for u in list(site.node.users):  # the output getitem and unused saved-statistics getitems
                if not u.users:
                    gm.graph.erase_node(u)
        gm.graph.erase_node(site.node)
        result.changes.append(Change(self.name, site.id, f"{site.kind} at '{site.path}' → channel_affine",
                                     (site.id,)))

    def _mark_traced_norm(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
        """A traced-through norm module (e.g. FrozenBatchNorm2d: ``x * scale + shift``) is a candidate too."""
        cls = module_class(node)
        if is_channel_affine(node) or not cls or not _NORM_CLASS.search(cls) or node.meta.get("bnfold_sources"):
            return
        if affine_view(gm, node) is None:
            return
        path = module_path(node)
        node.meta["bnfold_sources"] = (path,)
        self.candidates.setdefault(path, Candidate(path, f"{cls} (traced: x·scale+shift)", path))
