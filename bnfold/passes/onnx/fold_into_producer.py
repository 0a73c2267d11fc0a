"""ONNX rule ``fold_into_producer``: ``BN(op(x)) → op'(x)`` for a Conv / ConvTranspose (grouped: weight
``(I, O/g, k…)``) / Gemm / MatMul(+Add) producer whose output only the BatchNormalization reads::

    W'[o] = a[o] · W[o],   b'[o] = a[o] · b[o] + b_A[o]     (conv-transpose: W'[i, j] = a[g(i)·O_g + j] · W[i, j])

Checked by :func:`~bnfold.ir.fold_targets.producer_target` (the torch rule's predicate); math in
:func:`bnfold.ir.affine_math.fold_into_producer` (float64, cast once). The BatchNormalization disappears and the
producer takes over its output name (graph outputs keep their names).
"""

from __future__ import annotations

import onnx

from bnfold.ir.affine_math import fold_into_producer
from bnfold.ir.fold_targets import producer_target
from bnfold.ir.onnx.ops import OnnxLinearOp
from bnfold.ir.onnx.shapes import rank
from bnfold.ir.onnx.sites import Site
from bnfold.ir.reasons import Fail
from bnfold.passes.engine import Category, Change
from bnfold.passes.fold_into_producer import FoldIntoProducer
from bnfold.passes.onnx.context import OnnxContext, OnnxRule

__all__ = ["OnnxFoldIntoProducer", "batchnorm"]


def batchnorm(ctx: OnnxContext, node: onnx.NodeProto) -> Site | None:
    """The foldable BatchNormalization at ``node`` (statistics read, at least one channel), or None."""
    site = ctx.site(node)
    if site is None or site.norm or site.problem is not None or site.a is None or site.a.numel() == 0:
        return None
    return site


class OnnxFoldIntoProducer(OnnxRule[Site, OnnxLinearOp]):
    name = FoldIntoProducer.name
    category = Category.FOLD

    def match(self, ctx: OnnxContext, node: onnx.NodeProto) -> Site | None:
        return batchnorm(ctx, node)

    def check(self, ctx: OnnxContext, m: Site) -> OnnxLinearOp | Fail:
        assert m.a is not None
        return producer_target(ctx.targets, m.x, m.axis, rank(ctx.g, m.x), m.a.numel())

    def rewrite(self, ctx: OnnxContext, m: Site, plan: OnnxLinearOp) -> list[Change]:
        assert m.a is not None and m.b is not None
        w, b = fold_into_producer(plan.weight, plan.bias, m.a, m.b, kind=plan.kind, groups=plan.groups)
        where = ctx.write_op(plan, w, b)
        ctx.take_over(m)
        return [self.change(m.id, f"folded into {where}", m.sources, into=where)]
