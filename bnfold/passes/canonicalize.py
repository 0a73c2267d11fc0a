"""Rule ``canonicalize``: every inference-time BatchNorm becomes one :func:`~bnfold.ir.ops.channel_affine`
node ``y = a ⊙ x + b`` along the channel axis (``a = γ/√(σ²+ε)``, ``b = β − μ·a``, float64).

Elementwise affines with constant per-channel operands (a frozen BatchNorm traced through, a hand-written
BN formula) need no rewriting: the fold rules read them through :func:`~bnfold.ir.affine_view.affine_view`.
This rule only marks those that come from a norm-like module as report candidates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx

from bnfold.ir.affine_math import bn_affine
from bnfold.ir.batchnorm import BatchNormSite, batchnorm_site
from bnfold.ir.graph import module_class, module_path
from bnfold.ir.ops import is_channel_affine
from bnfold.passes.context import PassContext
from bnfold.passes.engine import Candidate, Category, Change
from bnfold.passes.rule import Fail, Rule

__all__ = ["Canonicalize"]

_NORM_CLASS = re.compile(r"batch.?norm|(^|[^a-z])bn", re.IGNORECASE)


@dataclass(frozen=True)
class TracedNorm:
    """A norm module traced through to an elementwise affine (e.g. FrozenBatchNorm2d: ``x * scale + shift``)."""

    node: torch.fx.Node
    id: str
    kind: str
    path: str


class Canonicalize(Rule[BatchNormSite | TracedNorm, str]):
    name = "canonicalize"
    category = Category.CANONICALIZE

    def match(self, ctx: PassContext, node: torch.fx.Node) -> BatchNormSite | TracedNorm | None:
        site = batchnorm_site(ctx.gm, node)
        if site is not None:
            return site
        if node.op not in ("call_function", "call_method") or is_channel_affine(node) \
                or node.meta.get("bnfold_sources") or ctx.affine(node) is None:
            return None
        cls = module_class(node)
        if not cls or not _NORM_CLASS.search(cls):
            return None
        path = module_path(node)
        return TracedNorm(node, path, f"{cls} (traced: x·scale+shift)", path)

    def candidate(self, ctx: PassContext, m: BatchNormSite | TracedNorm) -> Candidate:
        return Candidate(m.id, m.kind, m.path)

    def sources(self, m: BatchNormSite | TracedNorm) -> tuple[str, ...]:
        return (m.id,)

    def check(self, ctx: PassContext, m: BatchNormSite | TracedNorm) -> str | Fail:
        if isinstance(m, TracedNorm):
            return "mark"
        return Fail(m.problem) if m.problem is not None else "replace"

    def rewrite(self, ctx: PassContext, m: BatchNormSite | TracedNorm, plan: str) -> list[Change]:
        if isinstance(m, TracedNorm):  # already an affine: it only becomes a report candidate
            m.node.meta["bnfold_sources"] = (m.id,)
            return []
        site = m
        assert site.running_mean is not None and site.running_var is not None and site.output is not None
        x = site.node.args[0] if site.node.args else site.node.kwargs.get("input")
        assert isinstance(x, torch.fx.Node)
        a, b = site.affine or bn_affine(site.running_mean, site.running_var, site.weight, site.bias, site.eps)
        affine = ctx.insert_affine(x, a, b, 1, before=site.node, sources=(site.id,))
        ctx.replace_all_uses(site.output, affine)
        if site.output is not site.node:
            for u in list(site.node.users):  # the output getitem and unused saved-statistics getitems
                if not u.users:
                    ctx.erase(u)
        ctx.erase(site.node)
        return [self.change(site.id, f"{site.kind} at '{site.path}' → channel_affine", (site.id,))]
