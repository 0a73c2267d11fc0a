"""Fold per-channel affines into adjacent conv / conv-transpose / linear ops, and merge affine chains.

Three rules, each on :class:`~bnfold.passes.affine_view.AffineView` (math in
:mod:`bnfold.passes.affine_math`):

* :class:`MergeAffines`   ``A2(A1(x)) → A(x)`` with ``a = a2·a1``, ``b = a2·b1 + b2``; identities vanish.
* :class:`FoldIntoProducer` ``A(op(x)) → op'(x)`` when the affine is the op's only user and acts on its
  output-channel axis.
* :class:`FoldIntoConsumer` ``op(A(x)) → op'(x)`` when every user of the affine is a conv/linear reading it
  on its input-channel axis. A zero-padded conv (or a conv-transpose) cannot take the shift exactly:
  it takes the scale, and ``A`` becomes the pure shift ``x + b/a`` (kept as one add, and reported).

Every affine that carries report candidates and is left alone gets a :class:`Rejection` with the reason.
"""

from __future__ import annotations

import torch
import torch.fx

from bnfold.passes.affine_math import compose, fold_into_consumer, fold_into_producer
from bnfold.passes.affine_view import AffineView, affine_view
from bnfold.passes.base import Change, PassResult, Rejection
from bnfold.passes.canonicalize import insert_affine
from bnfold.passes.linear_ops import LinearOp, NotFoldable, match_linear_op, replace_params

__all__ = ["FoldIntoConsumer", "FoldIntoProducer", "MergeAffines", "erase_affine", "user_list"]


def user_list(node: torch.fx.Node) -> str:
    return ", ".join(f"'{u.name}'" for u in node.users)


def erase_affine(gm: torch.fx.GraphModule, view: AffineView, replacement: torch.fx.Node) -> None:
    """Route ``view.node``'s users to ``replacement`` and delete the node and its now-unused constants."""
    node = view.node
    consts = [a for a in node.all_input_nodes if a.op == "get_attr"]
    node.replace_all_uses_with(replacement)
    gm.graph.erase_node(node)
    for c in consts:
        if not c.users:
            gm.graph.erase_node(c)


def _affines(gm: torch.fx.GraphModule) -> list[AffineView]:
    return [v for v in (affine_view(gm, n) for n in list(gm.graph.nodes)) if v is not None]


class MergeAffines:
    """Collapse chains of affines on the same axis into one, and delete identity affines."""

    name = "merge_affines"

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        result = PassResult(False)
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node not in gm.graph.nodes:
                continue
            v2 = affine_view(gm, node)
            if v2 is None:
                continue
            v1 = affine_view(gm, v2.x)
            if v1 is not None and len(v1.node.users) == 1 and v1.axis == v2.axis and v1.channels == v2.channels:
                a, b = compose(v1.a, v1.b, v2.a, v2.b)
                sources = tuple(dict.fromkeys(v1.sources + v2.sources))
                merged = insert_affine(gm, v1.x, a, b, v2.axis, before=v2.node, sources=sources,
                                       hint=v2.node.name)
                erase_affine(gm, v2, merged)
                erase_affine(gm, v1, v1.x)
                result.changes.append(Change(self.name, merged.name,
                                             f"merged '{v1.node.name}' and '{v2.node.name}' into one affine",
                                             sources, into=merged.name))
            elif bool((v2.a == 1).all()) and bool((v2.b == 0).all()):
                erase_affine(gm, v2, v2.x)
                result.changes.append(Change(self.name, node.name, "removed identity affine", v2.sources))
        result.modified = bool(result.changes)
        return result


class FoldIntoProducer:
    """``A(op(x)) → op'(x)`` for conv / conv-transpose / linear producers."""

    name = "fold_into_producer"

    @staticmethod
    def check(gm: torch.fx.GraphModule, view: AffineView) -> LinearOp | str:
        """The producer to fold into, or why there is none."""
        producer = view.x
        op = match_linear_op(gm, producer)
        if op is None:
            what = "a graph input" if producer.op == "placeholder" else f"'{producer.name}' ({_what(producer)})"
            return f"its input is {what}, not a conv/linear output"
        if isinstance(op, NotFoldable):
            return f"producer '{producer.name}' cannot be rewritten: {op.reason}"
        if len(producer.users) > 1:
            return (f"producer {op.describe()} also feeds {user_list(producer)}; folding would change "
                    "those paths too")
        if view.axis != op.channel_axis % view.rank:
            return f"it normalizes axis {view.axis}, but {op.describe()} has its channels on another axis"
        if view.channels != op.out_channels:
            return f"channel count {view.channels} ≠ {op.describe()} output channels {op.out_channels}"
        return op

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        result = PassResult(False)
        for view in _affines(gm):
            op = self.check(gm, view)
            if isinstance(op, str):
                if view.sources:
                    result.rejections.append(Rejection(self.name, view.node.name, op, view.sources))
                continue
            w, b = fold_into_producer(op.weight, op.bias, view.a, view.b, kind=op.kind, groups=op.groups)
            where = replace_params(gm, op, w, b)
            erase_affine(gm, view, op.node)
            result.changes.append(Change(self.name, view.node.name, f"folded into {op.describe()}",
                                         view.sources, into=where))
        result.modified = bool(result.changes)
        return result


def _what(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target}"
    t = node.target
    return getattr(t, "__name__", str(t))


class FoldIntoConsumer:
    """``op(A(x)) → op'(x)`` when every user of the affine is a conv / conv-transpose / linear."""

    name = "fold_into_consumer"

    @staticmethod
    def check(gm: torch.fx.GraphModule, view: AffineView) -> list[LinearOp] | str:
        users = list(view.node.users)
        if not users:
            return "its output is unused"
        ops: list[LinearOp] = []
        for u in users:
            op = match_linear_op(gm, u)
            if op is None:
                return f"it feeds '{u.name}' ({_what(u)}), which is not a conv/linear"
            if isinstance(op, NotFoldable):
                return f"consumer '{u.name}' cannot be rewritten: {op.reason}"
            if op.input is not view.node:
                return f"it reaches {op.describe()} through an argument other than its input"
            if view.axis != op.channel_axis % view.rank:
                return f"it normalizes axis {view.axis}, but {op.describe()} reads channels on another axis"
            if view.channels != op.in_channels:
                return f"channel count {view.channels} ≠ {op.describe()} input channels {op.in_channels}"
            ops.append(op)
        return ops

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        result = PassResult(False)
        for view in _affines(gm):
            ops = self.check(gm, view)
            if isinstance(ops, str):
                if view.sources:
                    result.rejections.append(Rejection(self.name, view.node.name, ops, view.sources))
                continue
            has_shift = bool((view.b != 0).any())
            blocked = [op for op in ops if has_shift and (op.reads_padding_zeros() or op.kind == "conv_transpose")]
            if blocked and (bool((view.a == 1).all()) or bool((view.a == 0).any())):
                why = "its shift would be added to the zero padding" if bool((view.a == 1).all()) else \
                    "its scale has zeros, so the shift cannot be moved before the scale"
                if view.sources:
                    result.rejections.append(Rejection(
                        self.name, view.node.name,
                        f"{blocked[0].describe()} pads with zeros (or is transposed); {why}. Use padding_mode "
                        "'replicate'/'reflect' or padding 0 to fold it fully", view.sources))
                continue
            self._apply(gm, view, ops, blocked, result)
        result.modified = bool(result.changes)
        return result

    def _apply(self, gm: torch.fx.GraphModule, view: AffineView, ops: list[LinearOp], blocked: list[LinearOp],
               result: PassResult) -> None:
        leftover: torch.fx.Node | None = None
        if blocked:  # a ⊙ x + b = a ⊙ (x + b/a): the pure shift b/a stays in front of the blocked ops
            leftover = insert_affine(gm, view.x, torch.ones_like(view.a), view.b / view.a, view.axis,
                                     before=view.node, sources=(), hint=f"{view.node.name}_shift")
        for op in ops:
            partial = op in blocked
            w, b = fold_into_consumer(op.weight, op.bias, view.a, None if partial else view.b,
                                      kind=op.kind, groups=op.groups)
            where = replace_params(gm, op, w, b)
            op.node.replace_input_with(view.node, leftover if partial and leftover is not None else view.x)
            detail = f"folded into consumer {op.describe()}"
            if partial:
                detail += " (scale only: it pads with zeros, so the shift stays as one add before it)"
            result.changes.append(Change(self.name, view.node.name, detail, view.sources, into=where))
        erase_affine(gm, view, view.x)
