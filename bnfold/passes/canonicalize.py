"""Rule ``canonicalize``: every inference-time BatchNorm becomes one :func:`~bnfold.ir.ops.channel_affine`
node ``y = a ⊙ x + b`` along the channel axis (``a = γ/√(σ²+ε)``, ``b = β − μ·a``, float64).

Elementwise affines with constant per-channel operands (a frozen BatchNorm traced through, a hand-written
BN formula) need no rewriting: the fold rules read them through :func:`~bnfold.ir.affine_view.affine_view`.
This rule only marks them as report candidates: those that come from a norm-like module, and any per-channel
``mul``/``add`` by a parameter or buffer of the model (a hand-written RMSNorm/LayerNorm's weight and bias —
Hugging Face's ``weight * (x * rsqrt(mean(x²) + ε))`` —, LayerScale, a channel bias). Such a candidate is named by
the module that owns the parameter (``model.layers.0.input_layernorm``), so a norm's weight and bias are one
candidate, folded only when both parts fold; a hand-written RMSNorm/LayerNorm is reported as that norm.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx

from bnfold.ir.affine_math import bn_affine
from bnfold.ir.affine_view import AffineView
from bnfold.ir.batchnorm import BatchNormSite, batchnorm_site, batchnorm_sites
from bnfold.ir.graph import fetch_attr, module_class, module_path
from bnfold.ir.moments import bn_moments, set_moments
from bnfold.ir.norms import handwritten_norm
from bnfold.ir.ops import is_channel_affine
from bnfold.passes.constant_fold import model_tensors
from bnfold.passes.context import PassContext
from bnfold.passes.engine import Candidate, Category, Change, PassResult
from bnfold.passes.rule import Fail, Rule

__all__ = ["Canonicalize"]

_SITE = "batchnorm_site"

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

    def run(self, ctx: PassContext, worklist: Sequence[torch.fx.Node]) -> PassResult:
        """The rule over ``worklist``, the statistics of all its BatchNorms checked at once first
        (:func:`~bnfold.ir.batchnorm.batchnorm_sites`; remembered per node until an edit touches it)."""
        for node, site in batchnorm_sites(ctx.gm, worklist).items():
            ctx.remember(node, _SITE, site)
        return super().run(ctx, worklist)

    def match(self, ctx: PassContext, node: torch.fx.Node) -> BatchNormSite | TracedNorm | None:
        site = ctx.recall(node, _SITE) or batchnorm_site(ctx.gm, node)
        if site is not None:
            return site
        if node.op not in ("call_function", "call_method") or is_channel_affine(node) \
                or node.meta.get("bnfold_sources") or ctx.affine(node) is None:
            return None
        cls = module_class(node)
        if cls and _NORM_CLASS.search(cls):
            path = module_path(node)
            return TracedNorm(node, path, f"{cls} (traced: x·scale+shift)", path)
        return _parameter_affine(ctx, node, cls)

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
        set_moments(affine, bn_moments(site.running_var, site.weight, site.bias, site.eps))  # for data-free int8 prep
        ctx.replace_all_uses(site.output, affine)
        if site.output is not site.node:
            for u in list(site.node.users):  # the output getitem and unused saved-statistics getitems
                if not u.users:
                    ctx.erase(u)
        ctx.erase(site.node)
        return [self.change(site.id, f"{site.kind} at '{site.path}' → channel_affine", (site.id,))]


def _parameter_affine(ctx: PassContext, node: torch.fx.Node, cls: str | None) -> TracedNorm | None:
    """A per-channel affine whose constant is a parameter/buffer of the model, or computed from exactly one
    (Gemma's ``1 + weight``, folded by :mod:`~bnfold.passes.constant_fold`) — not one bnfold made."""
    params = [t for a in node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"
              and isinstance(fetch_attr(ctx.gm, str(a.target)), torch.Tensor)
              for t in _one(model_tensors(a))]
    if not params:
        return None
    owner, _, leaf = params[0].rpartition(".")
    path = owner or params[0]  # a parameter of the root module: its own name
    view = ctx.affine(node)
    assert view is not None
    inner = ctx.affine(view.x)  # a norm's bias is added to its weighted output
    norm = handwritten_norm(view.x) or (handwritten_norm(inner.x) if inner is not None else None)
    where = f"{cls}, " if cls else ""
    if norm is not None:
        kind = f"{norm} ({where}hand-written, affine part)"
    else:
        kind = f"per-channel {'scale' if _is_scale(view) else 'affine'} by '{leaf}' ({where}elementwise)"
    return TracedNorm(node, path, kind, path)


def _one(targets: tuple[str, ...]) -> tuple[str, ...]:
    return targets if len(targets) == 1 else ()


def _is_scale(view: AffineView) -> bool:
    return bool((view.b == 0).all())
