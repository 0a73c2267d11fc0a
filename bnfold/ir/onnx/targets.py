"""The ONNX answers to the fold-target questions (:class:`~bnfold.ir.fold_targets.TargetGraph`): values are names,
nodes are ``NodeProto``; the decisions and reasons are :mod:`bnfold.ir.fold_targets`' own."""

from __future__ import annotations

import onnx

from bnfold.ir.fold_targets import NotFoldable
from bnfold.ir.onnx.graph import OnnxGraph
from bnfold.ir.onnx.ops import OnnxLinearOp, match_linear_op
from bnfold.ir.reasons import Fail

__all__ = ["OnnxTargets", "label", "linear_at"]


def label(node: onnx.NodeProto) -> str:
    """How a report names a node: its name, else its first output."""
    return node.name or (node.output[0] if node.output else node.op_type)


def linear_at(g: OnnxGraph, node: onnx.NodeProto) -> OnnxLinearOp | NotFoldable | None:
    """``node`` as a conv/linear — also the ``Add`` of a ``MatMul + Add`` pair, read as the whole linear."""
    op = match_linear_op(g, node)
    if op is None and node.op_type == "Add":
        for v in node.input:
            p = g.producer(v)
            if p is not None and p.op_type == "MatMul":
                mm = match_linear_op(g, p)
                if isinstance(mm, OnnxLinearOp) and mm.add is node:
                    return mm
    return op


class OnnxTargets:
    """:class:`~bnfold.ir.fold_targets.TargetGraph` over an :class:`~bnfold.ir.onnx.graph.OnnxGraph`."""

    def __init__(self, g: OnnxGraph) -> None:
        self.g = g

    def producer_op(self, x: str) -> OnnxLinearOp | NotFoldable | None:
        p = self.g.producer(x)
        if p is None:
            return None
        op = linear_at(self.g, p)
        if isinstance(op, OnnxLinearOp) and op.output != x:
            return None  # a MatMul whose Add comes after: x is not the linear's output
        return op

    def describe_value(self, x: str) -> str:
        p = self.g.producer(x)
        if p is None:
            return "a graph input" if x in self.g.inputs else f"the constant '{x}'"
        return f"'{label(p)}' ({p.op_type})"

    def value_name(self, x: str) -> str:
        return x

    def shared_with(self, x: str) -> str | None:
        if self.g.value_readers(x) <= 1:
            return None
        others = [f"'{label(u)}'" for u in self.g.value_users(x)]
        if x in self.g.outputs:
            others.append("a graph output")
        if self.g.sub_reads[x]:
            others.append("a sub-graph")
        return ", ".join(others)

    def consumers(self, x: str) -> list[onnx.NodeProto] | Fail:
        if x in self.g.outputs:
            return Fail(f"its output '{x}' is a graph output")
        if self.g.sub_reads[x]:
            return Fail(f"its output '{x}' is read inside a sub-graph")
        return self.g.value_users(x) or Fail("its output is unused")

    def consumer_op(self, node: onnx.NodeProto) -> OnnxLinearOp | NotFoldable | None:
        return match_linear_op(self.g, node)

    def label(self, node: onnx.NodeProto) -> str:
        return label(node)

    def op_name(self, node: onnx.NodeProto) -> str:
        return node.op_type

    def reads_as_input(self, op: OnnxLinearOp, x: str) -> bool:
        return op.input == x and sum(1 for i in op.node.input if i == x) == 1
