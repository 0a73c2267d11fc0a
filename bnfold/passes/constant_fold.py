"""Constant folding in float64.

A node whose inputs are all constants (``get_attr`` tensors, Python scalars) is evaluated once, with every
floating-point constant promoted to float64, and each value that non-constant code reads is replaced by a
single ``get_attr`` cast once to the dtype the original graph produced. This turns parameter arithmetic that
tracing exposes (a frozen BatchNorm's ``w * (rv + eps).rsqrt()``, weight reshapes) into plain constants that
the folding rules can read, and makes that arithmetic exact to float64 before the one final cast.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch.fx.node import map_aggregate

from bnfold.ir.graph import fetch_attr, node_dtype
from bnfold.passes.context import PassContext
from bnfold.passes.engine import Category, Change, PassResult

__all__ = ["DERIVED_FROM", "ConstantFold", "model_tensors"]

log = logging.getLogger(__name__)

_IMPURE_WORDS = ("rand", "dropout", "bernoulli", "normal", "uniform", "empty", "manual_seed", "_assert",
                 "copy_", "set_", "print")


def _is_pure(node: torch.fx.Node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    if node.is_impure():
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    name = str(name)
    if name.endswith("_") and not name.endswith("__"):  # in-place methods
        return False
    return not any(w in name for w in _IMPURE_WORDS)


def _promote(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.detach().to(torch.float64)
    return v


DERIVED_FROM = "bnfold_derived_from"
"""``node.meta`` key of a folded constant: the model's parameters/buffers it was computed from (Gemma's RMSNorm
scale ``1 + weight`` comes from ``...input_layernorm.weight``), so it is reported as theirs."""


def model_tensors(node: torch.fx.Node) -> tuple[str, ...]:
    """The model's parameters/buffers behind the ``get_attr`` ``node``: its own target, unless bnfold made it
    (``_bnfold…``), then the ones it was folded from (:data:`DERIVED_FROM`)."""
    if node.op != "get_attr":
        return ()
    if not str(node.target).startswith("_bnfold"):
        return (str(node.target),)
    return tuple(node.meta.get(DERIVED_FROM, ()))


class ConstantFold:
    """Evaluate constant sub-graphs in float64 and replace them by one constant each.

    The first run sees every node in graph order (a constant's inputs come before it); later runs see the nodes
    that rewrites touched, whose constant inputs are by then single ``get_attr`` nodes.
    """

    name = "constant_fold"
    revisit_rejected = False

    def run(self, ctx: PassContext, worklist: Sequence[torch.fx.Node]) -> PassResult:
        gm = ctx.gm
        values: dict[torch.fx.Node, Any] = {}
        origins: dict[torch.fx.Node, tuple[str, ...]] = {}  # the model's tensors each value is computed from

        def value_of(n: torch.fx.Node) -> Any:
            if n not in values and n.op == "get_attr":
                v = fetch_attr(gm, str(n.target))
                if isinstance(v, torch.Tensor):
                    values[n] = _promote(v)
                    origins[n] = model_tensors(n)
            return values.get(n)

        for node in worklist:
            if not _is_pure(node):
                continue
            ctx.current = node
            inputs = node.all_input_nodes
            if not inputs or any(value_of(n) is None for n in inputs):
                continue
            args = map_aggregate(node.args, lambda a: values[a] if isinstance(a, torch.fx.Node) else a)
            kwargs = map_aggregate(node.kwargs, lambda a: values[a] if isinstance(a, torch.fx.Node) else a)
            try:
                with torch.no_grad():
                    if node.op == "call_method":
                        out = getattr(args[0], str(node.target))(*args[1:], **kwargs)
                    else:
                        out = node.target(*args, **kwargs)  # type: ignore[operator]
            except Exception as exc:  # not evaluable in float64: leave as is
                log.debug("constant fold skipped %s: %s", node.name, exc)
                continue
            if isinstance(out, torch.Tensor):
                values[node] = out
                origins[node] = tuple(dict.fromkeys(t for n in inputs for t in origins.get(n, ())))

        result = PassResult()
        computed = [n for n in values if n.op != "get_attr"]
        for node in computed:
            if not node.users or all(u in values and u.op != "get_attr" for u in node.users):
                continue  # dead, or interior of a constant sub-graph
            dtype = node_dtype(node)
            if dtype is None:  # shapes not propagated: the original dtype is unknown
                continue
            ctx.current = node
            const = ctx.constant(values[node].to(dtype), f"const_{node.name}", before=node)
            if origins.get(node):
                const.meta[DERIVED_FROM] = origins[node]
            ctx.replace_all_uses(node, const)
            result.changes.append(Change(self.name, node.name,
                                         f"constant expression folded (float64) into {const.target}",
                                         Category.CANONICALIZE))
        if result.changes:
            for node in reversed(computed):
                if not node.users:
                    ctx.erase(node)
        return result
