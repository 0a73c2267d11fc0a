"""Rule ``fold_into_embedding``: ``A(embedding(i)) → embedding'(i)`` for a per-channel affine on the embedding's
feature axis (the last one). An embedding copies rows of its table ``W`` (num_embeddings, D), so::

    A(W[i])[c] = a[c] · W[i, c] + b[c]   ⇒   W'[r, c] = a[c] · W[r, c] + b[c]   for every row r

is exact for every index (the padding row included: its output goes through ``A`` too). Not folded when the
affine has other inputs' users to serve (the embedding output feeds more than the affine), or when the
embedding renormalizes the rows it looks up (``max_norm``): a scaled row would be renormalized differently.
Recognised forms: ``nn.Embedding`` (stock forward), ``F.embedding`` and ``aten.embedding``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from bnfold.ir.affine_view import AffineView
from bnfold.ir.graph import fetch_attr, get_constant, normalized_kwargs, unique_attr_name
from bnfold.ir.uses import value_users
from bnfold.passes.context import PassContext
from bnfold.passes.engine import Category, Change
from bnfold.passes.fold_targets import describe, user_list
from bnfold.passes.rule import Fail, Rule

__all__ = ["FoldIntoEmbedding", "fold_affine_into_embedding"]

f64 = torch.float64
_FUNCTIONS = {F.embedding, torch.ops.aten.embedding.default}


def fold_affine_into_embedding(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``W'[r, c] = a[c] · W[r, c] + b[c]`` in float64 (the caller casts once)."""
    return weight.detach().to(f64) * a.reshape(1, -1) + b.reshape(1, -1)


@dataclass(frozen=True)
class Table:
    """The embedding to rewrite: its node, its table, and the module (None for a functional call)."""

    node: torch.fx.Node
    weight: torch.Tensor
    module: nn.Embedding | None
    kwargs: dict[str, Any]


class FoldIntoEmbedding(Rule[AffineView, Table]):
    name = "fold_into_embedding"
    category = Category.FOLD

    def match(self, ctx: PassContext, node: torch.fx.Node) -> AffineView | None:
        view = ctx.affine(node)
        return view if view is not None and _is_embedding(ctx, view.x) else None

    def check(self, ctx: PassContext, m: AffineView) -> Table | Fail:
        emb = m.x
        if len(value_users(emb)) > 1:
            return Fail(f"embedding '{emb.name}' also feeds {user_list(emb)}; folding would change those paths too")
        if m.axis != m.rank - 1:
            return Fail(f"it normalizes axis {m.axis}, but embedding '{emb.name}' has its features on the last axis")
        if emb.op == "call_module":
            module = fetch_attr(ctx.gm, str(emb.target))
            weight, kwargs = module.weight, {"max_norm": module.max_norm}
        else:
            module = None
            kwargs = normalized_kwargs(ctx.gm, emb) or {}
            weight = get_constant(ctx.gm, kwargs.get("weight"))
            if weight is None:
                return Fail(f"embedding '{emb.name}' ({describe(emb)}) reads a table computed in the graph")
        if kwargs.get("max_norm") is not None:
            return Fail(f"embedding '{emb.name}' renormalizes looked-up rows (max_norm), which a scale would change")
        if weight.dim() != 2 or weight.shape[1] != m.channels:
            return Fail(f"channel count {m.channels} ≠ embedding '{emb.name}' width {weight.shape[-1]}")
        return Table(emb, weight, module, kwargs)

    def rewrite(self, ctx: PassContext, m: AffineView, plan: Table) -> list[Change]:
        new = fold_affine_into_embedding(plan.weight, m.a, m.b).to(plan.weight.dtype)
        node = plan.node
        if plan.module is not None:  # clone-on-fold: another call site keeps the original table
            module, target = plan.module, str(node.target)
            if ctx.call_sites(target) > 1:
                module = copy.deepcopy(module)
                target = unique_attr_name(ctx.gm, f"{target}_bnfold")
                ctx.gm.add_submodule(target, module)
                ctx.retarget(node, target)
            module.weight = nn.Parameter(new, requires_grad=False)
            where = target
        else:
            kwargs = dict(plan.kwargs)
            kwargs["weight"] = ctx.constant(new, f"{node.name}_weight", before=node, parameter=True, copy=False)
            ctx.set_call(node, node.target, (), kwargs)
            where = node.name
        ctx.bypass(m.node, node)
        return [self.change(m.node, f"folded into embedding '{node.name}'", m.sources, into=where)]


def _is_embedding(ctx: PassContext, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        m = fetch_attr(ctx.gm, str(node.target))
        return isinstance(m, nn.Embedding) and type(m).forward is nn.Embedding.forward
    return node.op == "call_function" and node.target in _FUNCTIONS
