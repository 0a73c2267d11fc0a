"""ONNX rule ``canonicalize``: find the normalizations and read each as a per-channel affine ``y = a ⊙ x + b``
(:func:`~bnfold.ir.onnx.sites.find_site`), the twin of :mod:`bnfold.passes.canonicalize`.

    BatchNormalization (inference):  a = γ/√(σ² + ε),  b = β − μ·a   on axis 1 (the whole node is the affine)
    Layer/RMS/GroupNormalization:    y = γ ⊙ n(x) + β                 (the affine part; the node stays)

An ONNX graph needs no rewrite for it — a BatchNormalization already *is* the canonical affine — so the rule only
registers every normalization as a report candidate and rejects, with the reason, those whose statistics or
parameters cannot be folded (training mode, computed statistics, negative variance, …). A norm whose affine part is
the identity (left so by its exporter, or split earlier) is no candidate.
"""

from __future__ import annotations

import onnx

from bnfold.ir.onnx.sites import Site
from bnfold.ir.reasons import Fail
from bnfold.passes.canonicalize import Canonicalize
from bnfold.passes.engine import Candidate, Category, Change
from bnfold.passes.onnx.context import OnnxContext, OnnxRule

__all__ = ["OnnxCanonicalize", "identity_norm"]


def identity_norm(site: Site) -> bool:
    """A norm whose affine part does nothing (``γ ≡ 1``, no ``β``)."""
    return site.norm and site.problem is None and site.a is not None and site.b is not None \
        and bool((site.a == 1).all()) and not bool(site.b.any())


class OnnxCanonicalize(OnnxRule[Site, Site]):
    name = Canonicalize.name
    category = Category.CANONICALIZE

    def match(self, ctx: OnnxContext, node: onnx.NodeProto) -> Site | None:
        site = ctx.site(node)
        return None if site is None or identity_norm(site) else site

    def candidate(self, ctx: OnnxContext, m: Site) -> Candidate:
        return Candidate(m.id, m.kind, m.id)

    def check(self, ctx: OnnxContext, m: Site) -> Site | Fail:
        return Fail(m.problem) if m.problem is not None else m

    def rewrite(self, ctx: OnnxContext, m: Site, plan: Site) -> list[Change]:
        return []  # already canonical: the fold rules read the node itself
