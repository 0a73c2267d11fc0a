"""The ONNX graph back end: use-def lookups and alias-safe edits over an ``onnx.ModelProto`` (top-level graph).

The fold rules (:mod:`bnfold.passes.onnx.rules`) ask this adapter what produces a value, who reads it, which values
are constants, and edit the graph only through it. Everything the rules do not touch stays byte-for-byte as it
was: node order and names, value names, ``value_info``, metadata, opsets, doc strings, sub-graphs.

Constants are initializers that are not also graph inputs (an initializer listed among the inputs is only a
default the caller may override at run time) and ``Constant`` nodes holding a ``value`` tensor.

Aliasing: a constant read by more than one place (several node inputs, a sub-graph, a graph output) is never
rewritten; :meth:`OnnxGraph.write_input` writes a fresh initializer for the one input being folded (clone on fold)
and leaves the shared tensor to its other readers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["OnnxGraph", "attr", "node_label"]


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of attribute ``name`` of ``node`` (ints, floats, strings decoded, lists), or ``default``."""
    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, bytes):
                return v.decode()
            if isinstance(v, list) and v and isinstance(v[0], bytes):
                return [x.decode() for x in v]
            return v
    return default


def set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    """Set (or add) attribute ``name`` of ``node``."""
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def node_label(node: onnx.NodeProto) -> str:
    """How a report names a node: ``Conv '/layer1/conv1/Conv'``."""
    return f"{node.op_type} '{node.name}'" if node.name else node.op_type


def _subgraph_reads(graph: onnx.GraphProto) -> Iterator[str]:
    """Every value name read inside ``graph`` and its nested sub-graphs (outer-scope references included)."""
    for n in graph.node:
        yield from (i for i in n.input if i)
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _subgraph_reads(g)
    yield from (o.name for o in graph.output)


class OnnxGraph:
    """Lookups over ``model.graph`` and the edits the fold rules make. ``model`` is edited in place.

    ``base_dir``: the folder external-data tensors are read from (when the model was loaded without them).
    """

    def __init__(self, model: onnx.ModelProto, *, base_dir: str = "") -> None:
        self.model = model
        self.graph = model.graph
        self.base_dir = base_dir
        self._fresh = Counter[str]()
        self.touched_initializers: set[str] = set()
        self.orphans: set[str] = set()  # constants an edit stopped reading (removed at the end when unread)
        self._shapes: dict[str, tuple[int | str | None, ...]] | None = None
        self._shapes_at: dict[int, dict[str, tuple[int, ...]]] | None = None
        self.reindex()

    @property
    def shapes(self) -> dict[str, tuple[int | str | None, ...]]:
        """Every value's shape from ONNX shape inference (:mod:`~bnfold.ir.onnx.shapes`), inferred on first use and
        kept: the fold rules never change the shape of a value they keep."""
        if self._shapes is None:
            from bnfold.ir.onnx.shapes import infer_shapes

            self._shapes = infer_shapes(self.model)
        return self._shapes

    @shapes.setter
    def shapes(self, value: dict[str, tuple[int | str | None, ...]]) -> None:
        self._shapes = value

    @property
    def shapes_at(self) -> dict[int, dict[str, tuple[int, ...]]]:
        """Numeric shapes with the dynamic input dimensions set to each of the symbol sizes (inferred on first use)."""
        if self._shapes_at is None:
            from bnfold.ir.onnx.shapes import SYMBOL_SIZES, concrete_shapes

            self._shapes_at = concrete_shapes(self.model, SYMBOL_SIZES)
        return self._shapes_at

    # -- index ---------------------------------------------------------------------------------------------------

    def reindex(self) -> None:
        """Rebuild producer/consumer maps (after a structural edit)."""
        g = self.graph
        self.initializers = {t.name: t for t in g.initializer}
        self.inputs = {i.name for i in g.input}
        self.outputs = {o.name for o in g.output}
        self.producers: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.sub_reads: Counter[str] = Counter()
        self.constant_nodes: dict[str, onnx.NodeProto] = {}
        for n in g.node:
            for o in n.output:
                if o:
                    self.producers[o] = n
            for i in n.input:
                if i:
                    users = self.consumers.setdefault(i, [])
                    if not users or users[-1] is not n:
                        users.append(n)
            for a in n.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    self.sub_reads.update(_subgraph_reads(sub))
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and attr(n, "value") is not None:
                self.constant_nodes[n.output[0]] = n
        self.names = set(self.producers) | set(self.initializers) | self.inputs

    def opset(self, domain: str = "") -> int:
        """The opset version imported for ``domain`` (default domain: ``""``/``ai.onnx``), 0 when absent."""
        for o in self.model.opset_import:
            if o.domain == domain or (domain == "" and o.domain == "ai.onnx"):
                return int(o.version)
        return 0

    def producer(self, value: str) -> onnx.NodeProto | None:
        return self.producers.get(value)

    def users(self, value: str) -> list[onnx.NodeProto]:
        """The top-level nodes that read ``value`` (each once)."""
        return self.consumers.get(value, [])

    def readers(self, value: str) -> int:
        """How many places read ``value``: node inputs (each occurrence), sub-graph reads, graph outputs."""
        count = sum(1 for n in self.users(value) for i in n.input if i == value)
        return count + self.sub_reads[value] + (value in self.outputs)

    def value_readers(self, value: str) -> int:
        """:meth:`readers` that read ``value``'s values: ``Shape`` / ``Size`` nodes read only its shape, which a
        fold keeps (the ONNX twin of :func:`bnfold.ir.uses.value_users`)."""
        shape_only = sum(1 for n in self.users(value) if n.op_type in ("Shape", "Size")
                         and n.domain in ("", "ai.onnx") for i in n.input if i == value)
        return self.readers(value) - shape_only

    def value_users(self, value: str) -> list[onnx.NodeProto]:
        """:meth:`users` that read ``value``'s values (``Shape`` / ``Size`` nodes left out)."""
        return [n for n in self.users(value) if not (n.op_type in ("Shape", "Size") and n.domain in ("", "ai.onnx"))]

    def only_reader(self, value: str, node: onnx.NodeProto) -> bool:
        """``node`` is the single place that reads ``value`` (once, no graph output, no sub-graph)."""
        return self.readers(value) == 1 and self.users(value) == [node]

    def _source(self, value: str) -> str:
        """``value`` with ``Identity`` nodes looked through (exporters route parameters through them)."""
        for _ in range(64):
            p = self.producers.get(value)
            if p is None or p.op_type != "Identity" or p.domain not in ("", "ai.onnx"):
                return value
            value = p.input[0]
        return value

    def _transposed(self, value: str) -> onnx.NodeProto | None:
        """The ``Transpose`` of a constant that computes ``value`` (an unfolded ``Linear`` weight), or None."""
        p = self.producers.get(self._source(value))
        if p is not None and p.op_type == "Transpose" and p.domain in ("", "ai.onnx") \
                and self._is_stored(self._source(p.input[0])):
            return p
        return None

    def _is_stored(self, value: str) -> bool:
        return (value in self.initializers and value not in self.inputs) or value in self.constant_nodes

    def is_constant(self, value: str) -> bool:
        return self._is_stored(self._source(value)) or self._transposed(value) is not None

    def why_not_constant(self, value: str) -> str:
        value = self._source(value)
        if value in self.initializers and value in self.inputs:
            return f"'{value}' is an initializer that is also a graph input (it may be overridden at run time)"
        p = self.producer(value)
        if p is not None:
            return f"'{value}' is computed by {node_label(p)}, not a constant"
        return f"'{value}' is a graph input, not a constant"

    def constant(self, value: str) -> np.ndarray | None:
        """The constant tensor ``value`` (an initializer or a ``Constant`` node, through ``Identity`` and a
        ``Transpose`` of a constant), or None."""
        t = self._transposed(value)
        if t is not None:
            base = self.constant(t.input[0])
            assert base is not None
            perm = attr(t, "perm", None)
            return np.transpose(base, perm if perm else None)
        value = self._source(value)
        if value in self.initializers and value not in self.inputs:
            return numpy_helper.to_array(self.initializers[value], self.base_dir)
        n = self.constant_nodes.get(value)
        if n is not None:
            return numpy_helper.to_array(attr(n, "value"))
        return None

    def elem_type(self, value: str) -> int | None:
        """The ONNX element type of a constant (``TensorProto.FLOAT`` …), or None."""
        t = self._transposed(value)
        value = self._source(t.input[0] if t is not None else value)
        if value in self.initializers:
            return int(self.initializers[value].data_type)
        n = self.constant_nodes.get(value)
        return None if n is None else int(attr(n, "value").data_type)

    # -- edits -----------------------------------------------------------------------------------------------------

    def fresh(self, base: str) -> str:
        """A value/initializer name not used anywhere in the graph, derived from ``base``."""
        while True:
            self._fresh[base] += 1
            name = f"{base}_bnfold{self._fresh[base]}" if self._fresh[base] > 1 or base in self.names else base
            if name not in self.names:
                self.names.add(name)
                return name

    def write_input(self, node: onnx.NodeProto, index: int, array: np.ndarray, *, like: str | None = None) -> str:
        """Give ``node``'s input ``index`` the constant ``array`` (already in its final dtype). The initializer it
        reads is rewritten in place only when ``node`` is its only reader and it is a plain initializer; otherwise
        (shared, a ``Constant`` node, absent) a new initializer is added and ``node`` alone is pointed at it.
        Returns the name written."""
        old = node.input[index] if index < len(node.input) else ""
        if old and old in self.initializers and old not in self.inputs and self.only_reader(old, node):
            tensor = numpy_helper.from_array(array, old)
            self._replace_initializer(old, tensor)
            self.touched_initializers.add(old)
            return old
        name = self.fresh(old or like or f"{node.name or node.op_type}_param")
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        self.initializers[name] = self.graph.initializer[-1]
        while len(node.input) <= index:
            node.input.append("")
        if old:
            self._drop_read(old, node)
            self.orphans.add(old)
        node.input[index] = name
        self.consumers.setdefault(name, []).append(node)
        self.touched_initializers.add(name)
        return name

    def _replace_initializer(self, name: str, tensor: onnx.TensorProto) -> None:
        for k, t in enumerate(self.graph.initializer):
            if t.name == name:
                self.graph.initializer[k].CopyFrom(tensor)
                self.initializers[name] = self.graph.initializer[k]
                return
        raise KeyError(name)

    def _drop_read(self, value: str, node: onnx.NodeProto) -> None:
        if sum(1 for i in node.input if i == value) <= 1:
            users = self.consumers.get(value, [])
            self.consumers[value] = [u for u in users if u is not node]

    def replace_input(self, node: onnx.NodeProto, old: str, new: str) -> None:
        """Make ``node`` read ``new`` wherever it read ``old``."""
        for k, i in enumerate(node.input):
            if i == old:
                node.input[k] = new
        self.consumers[old] = [u for u in self.consumers.get(old, []) if u is not node]
        self.consumers.setdefault(new, []).append(node)

    def remove_node(self, node: onnx.NodeProto, *, keep_value_info: bool = False) -> None:
        """Delete ``node`` (its outputs must have no readers left, or be taken over by another node)."""
        for k, n in enumerate(self.graph.node):
            if n is node:
                del self.graph.node[k]
                break
        for i in node.input:
            if i:
                self.consumers[i] = [u for u in self.consumers.get(i, []) if u is not node]
        for o in node.output:
            self.producers.pop(o, None)
            if not keep_value_info:
                self.drop_value_info(o)

    def insert_after(self, anchor: onnx.NodeProto, node: onnx.NodeProto) -> None:
        """Insert ``node`` right after ``anchor`` (keeps the node list topologically sorted)."""
        for k, n in enumerate(self.graph.node):
            if n is anchor:
                self.graph.node.insert(k + 1, node)
                break
        else:
            raise KeyError(anchor.name)
        inserted = self.graph.node[k + 1]
        for o in inserted.output:
            self.producers[o] = inserted
            self.names.add(o)
        for i in inserted.input:
            if i:
                self.consumers.setdefault(i, []).append(inserted)

    def node_ref(self, node: onnx.NodeProto) -> onnx.NodeProto:
        """The graph's own object for a node just inserted (protobuf copies on insert)."""
        return next(n for n in self.graph.node if n is node or (n.name == node.name and n.output == node.output))

    def rename_output(self, node: onnx.NodeProto, old: str, new: str) -> None:
        """``node`` now writes ``new`` instead of ``old`` (``old`` must have no other reader left)."""
        for k, o in enumerate(node.output):
            if o == old:
                node.output[k] = new
        self.producers.pop(old, None)
        self.producers[new] = node
        self.drop_value_info(old)

    def drop_value_info(self, value: str) -> None:
        for k, vi in enumerate(self.graph.value_info):
            if vi.name == value:
                del self.graph.value_info[k]
                return

    def drop_unread_initializers(self, names: set[str]) -> list[str]:
        """Remove those of ``names`` that nothing reads any more (only what the fold orphaned), and the
        ``Identity`` nodes that only forwarded them."""
        names = set(names)
        pending = list(names)
        while pending:
            v = pending.pop()
            p = self.producers.get(v)
            if p is not None and p.op_type in ("Identity", "Transpose") and self.readers(v) == 0 \
                    and self.is_constant(p.input[0]):
                self.remove_node(p)
                if p.input[0] not in names:
                    names.add(p.input[0])
                    pending.append(p.input[0])
        dead = [n for n in names if n in self.initializers and n not in self.inputs and self.readers(n) == 0]
        if dead:
            keep = [t for t in self.graph.initializer if t.name not in set(dead)]
            del self.graph.initializer[:]
            self.graph.initializer.extend(keep)
            for n in dead:
                self.initializers.pop(n, None)
        dead_nodes = [self.constant_nodes[n] for n in names if n in self.constant_nodes and self.readers(n) == 0]
        for node in dead_nodes:
            self.remove_node(node)
            self.constant_nodes.pop(node.output[0], None)
        return dead + [n.output[0] for n in dead_nodes]
