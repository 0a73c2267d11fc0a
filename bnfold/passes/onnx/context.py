"""The ONNX graph context: what the pass engine (:class:`~bnfold.passes.engine.GraphContext`) and the ONNX rules ask
of an ``onnx.ModelProto`` — the twin of :class:`~bnfold.passes.context.PassContext`.

Rules look the graph up through :attr:`OnnxContext.g` (:class:`~bnfold.ir.onnx.graph.OnnxGraph`: producers, readers,
constants, shapes) and edit it only through this context, which records every node an edit touched (the node, the
producers of its inputs and the readers of its outputs), so the pipeline gives each pass only those nodes after the
first round. Per-node analyses (a node's normalization :class:`~bnfold.ir.onnx.sites.Site`) are remembered until an
edit touches the node or a neighbour. ``NodeProto`` is not hashable: nodes are keyed by identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import onnx
import torch

from bnfold.ir.onnx.graph import OnnxGraph
from bnfold.ir.onnx.ops import OnnxLinearOp, write_linear_op
from bnfold.ir.onnx.sites import Site, find_site
from bnfold.ir.onnx.targets import OnnxTargets, label
from bnfold.passes.rule import GraphRule

__all__ = ["OnnxContext", "OnnxRule", "render"]

M = TypeVar("M")
P = TypeVar("P")


class OnnxContext:
    """``model`` (edited in place) plus the touched-node log, the per-node memo and the node a pass is working on.

    ``base_dir``: the folder external-data tensors are read from (when the model was loaded without them)."""

    def __init__(self, model: onnx.ModelProto, *, base_dir: str = "") -> None:
        self.model = model
        self.base_dir = base_dir
        self.current: onnx.NodeProto | None = None
        self.constants_folded = False
        self.reload()

    def reload(self) -> None:
        """Index the model afresh (after a pass replaced the whole graph: constant folding); forgets every node."""
        self.g = OnnxGraph(self.model, base_dir=self.base_dir)
        self.targets = OnnxTargets(self.g)
        self._log: list[onnx.NodeProto] = []
        self._erased: set[int] = set()
        self._memo: dict[int, dict[str, Any]] = {}
        self.current = None

    # -- what the engine asks of every graph kind -----------------------------------------------------------------
    def nodes(self) -> list[onnx.NodeProto]:
        return list(self.g.graph.node)

    def cursor(self) -> int:
        return len(self._log)

    def touched_since(self, cursor: int) -> list[onnx.NodeProto]:
        seen: dict[int, onnx.NodeProto] = {}
        for n in self._log[cursor:]:
            if id(n) not in self._erased:
                seen.setdefault(id(n), n)
        return list(seen.values())

    def is_live(self, node: onnx.NodeProto) -> bool:
        return id(node) not in self._erased

    def node_name(self, node: onnx.NodeProto) -> str:
        return label(node)

    def format_node(self, node: onnx.NodeProto) -> str:
        return _node_text(node)

    def render(self) -> str:
        return render(self.model)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """A run ends by removing the initializers and constants the rewrites stopped reading."""
        yield
        self.g.drop_unread_initializers(self.g.orphans)

    def verify(self, pass_name: str, example_inputs: Sequence[Any]) -> None:
        """The model passes ``onnx.checker`` with strict shape inference (``example_inputs`` are not needed: ONNX
        shapes are declared, not recorded)."""
        try:
            onnx.checker.check_model(self.model, full_check=True)
        except Exception as exc:
            raise AssertionError(f"after pass {pass_name}: the ONNX model fails onnx.checker: {exc}") from exc

    # -- per-node analyses ------------------------------------------------------------------------------------------
    def memo(self, node: onnx.NodeProto, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` for ``node``, remembered until an edit touches ``node`` or a neighbour."""
        per = self._memo.setdefault(id(node), {})
        if key not in per:
            per[key] = compute()
        return per[key]

    def site(self, node: onnx.NodeProto) -> Site | None:
        """The normalization at ``node`` (:func:`~bnfold.ir.onnx.sites.find_site`), remembered."""
        return self.memo(node, "site", lambda: find_site(self.g, node))

    # -- edits ------------------------------------------------------------------------------------------------------
    def touch(self, *nodes: onnx.NodeProto | None) -> None:
        """Record ``nodes``, the producers of their inputs and the readers of their outputs as changed."""
        start = len(self._log)
        for n in nodes:
            if n is None:
                continue
            self._log.append(n)
            for i in n.input:
                p = self.g.producer(i) if i else None
                if p is not None:
                    self._log.append(p)
            for o in n.output:
                self._log.extend(self.g.users(o))
        for n in self._log[start:]:
            self._memo.pop(id(n), None)

    def write_op(self, op: OnnxLinearOp, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
        """Write folded float64 ``(weight, bias)`` into ``op`` (:func:`~bnfold.ir.onnx.ops.write_linear_op`:
        clone-on-fold for shared initializers); returns where they went."""
        where = write_linear_op(self.g, op, weight, bias)
        self.touch(op.node, op.add, *(self.g.users(op.output)))
        return where

    def erase(self, node: onnx.NodeProto, *, keep_value_info: bool = False) -> None:
        """Remove ``node``; the constants only it read are removed at the end of the run."""
        self.g.orphans.update(i for i in node.input[1:] if i)
        producers = [self.g.producer(i) for i in node.input if i]
        self.g.remove_node(node, keep_value_info=keep_value_info)
        self._erased.add(id(node))
        self._memo.pop(id(node), None)
        self.touch(*producers)

    def take_over(self, site: Site) -> None:
        """Remove the normalization ``site`` whose input the op writing ``site.x`` now computes normalized: that op
        takes over its output name (graph outputs keep their names), and readers of the input's shape read the
        output (same shape)."""
        self.erase(site.node, keep_value_info=True)
        last = self.g.producer(site.x)
        assert last is not None
        self.g.rename_output(last, site.x, site.y)
        for u in list(self.g.users(site.x)):  # shape-only readers (Shape, Size)
            self.g.replace_input(u, site.x, site.y)
        self.touch(last)

    def bypass(self, site: Site) -> None:
        """Remove the normalization ``site``: whatever read its output reads its input."""
        users = list(self.g.users(site.y))
        for u in users:
            self.g.replace_input(u, site.y, site.x)
        self.erase(site.node)
        self.touch(*users)

    def to_shift(self, site: Site, shift: torch.Tensor, rank: int) -> None:
        """Turn the BatchNormalization ``site`` into ``Add(x, shift)`` with ``shift`` shaped ``(C, 1, …)`` (same node
        name and output), stored in the dtype of its scale."""
        g, node = self.g, site.node
        dtype = _storage_dtype(g, site)
        g.orphans.update(i for i in node.input[1:] if i)
        for i in node.input[1:]:
            if i:
                g.consumers[i] = [u for u in g.consumers.get(i, []) if u is not node]
        value = shift.reshape(-1, *([1] * (rank - 2))).numpy().astype(dtype)
        name = g.fresh(f"{label(node)}_shift")
        g.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
        g.initializers[name] = g.graph.initializer[-1]
        del node.input[1:]
        node.input.append(name)
        g.consumers.setdefault(name, []).append(node)
        del node.attribute[:]
        node.op_type = "Add"
        self.touch(node)

    def reset_norm(self, site: Site) -> None:
        """``γ = 1``, ``β = 0``: the norm keeps only its parameter-free part. ``β`` is dropped where the op allows it
        (LayerNormalization, RMSNormalization) and written as zeros where it is a required input
        (GroupNormalization)."""
        g, node = self.g, site.node
        old = g.constant(node.input[1])
        assert old is not None and site.dtype is not None
        g.orphans.update(i for i in node.input[1:] if i)
        g.write_input(node, 1, np.ones(old.shape, dtype=site.dtype))
        if len(node.input) > 2 and node.input[2]:
            if node.op_type == "GroupNormalization":
                beta = g.constant(node.input[2])
                assert beta is not None
                g.write_input(node, 2, np.zeros(beta.shape, dtype=site.dtype))
            else:
                g.consumers[node.input[2]] = [u for u in g.consumers.get(node.input[2], []) if u is not node]
                del node.input[2:]
        self.touch(node)


class OnnxRule(GraphRule[OnnxContext, M, P]):
    """A rule over an ONNX graph: :class:`~bnfold.passes.rule.GraphRule` with the :class:`OnnxContext`."""

    def match(self, ctx: OnnxContext, node: onnx.NodeProto) -> M | None:
        """The structure this rule applies to at ``node``, or None (cheap; no reason needed)."""
        raise NotImplementedError


def _storage_dtype(g: OnnxGraph, site: Site) -> np.dtype:
    v = g.constant(site.node.input[1]) if len(site.node.input) > 1 and site.node.input[1] else None
    return v.dtype if v is not None else np.dtype(np.float32)


def _attr_text(a: onnx.AttributeProto) -> str:
    if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        return f"{a.name}=<graph>"
    if a.type in (onnx.AttributeProto.TENSOR, onnx.AttributeProto.TENSORS):
        return f"{a.name}=<tensor>"
    v = _attr_value(a)
    return f"{a.name}={v}"


def _attr_value(a: onnx.AttributeProto) -> Any:
    v = onnx.helper.get_attribute_value(a)
    return v.decode() if isinstance(v, bytes) else v


def _node_text(node: onnx.NodeProto) -> str:
    attrs = ", ".join(_attr_text(a) for a in node.attribute)
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
    ins = ", ".join(f"%{i}" if i else "''" for i in node.input)
    outs = ", ".join(f"%{o}" for o in node.output)
    return f"{outs} = {op}{f'[{attrs}]' if attrs else ''}({ins})" + (f"  # {node.name}" if node.name else "")


def render(model: onnx.ModelProto) -> str:
    """The top-level graph as text: inputs, initializers (name, type, shape: no values), nodes, outputs."""
    g = model.graph

    def typed(vi: onnx.ValueInfoProto) -> str:
        t = vi.type.tensor_type
        dims = "x".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                        for d in t.shape.dim)
        return f"%{vi.name}[{onnx.TensorProto.DataType.Name(t.elem_type)}, {dims}]"

    lines = [f"graph {g.name} ("]
    lines += [f"  {typed(i)}" for i in g.input]
    lines.append(") initializers (")
    lines += [f"  %{t.name}[{onnx.TensorProto.DataType.Name(t.data_type)}, {'x'.join(map(str, t.dims))}]"
              for t in g.initializer]
    lines.append(") {")
    lines += [f"  {_node_text(n)}" for n in g.node]
    lines.append("  return " + ", ".join(f"%{o.name}" for o in g.output))
    lines.append("}")
    return "\n".join(lines)


