"""Constant folding before the fold rules: every value of an ONNX graph that depends only on constants becomes an
initializer, computed by onnxscript's constant folder (``onnxscript.optimizer.fold_constants``, on onnx-ir), not by
a folder of our own.

Why the rules need it: ``torch.onnx.export(..., dynamo=True, optimize=False)`` gives a bias-less conv its zero bias
as ``Expand(CastLike(0, x), Shape(W)[0:1])`` — computed from initializers (and ``x``'s *type*), not stored — so the
conv's bias is not a constant and nothing folds into it. After folding, the bias is an initializer like any other.

What stays as it was (what ``bnfold fold`` promises for ``.onnx`` files):

* graph inputs and outputs, their names and (dynamic) shapes: a value computed from a graph input is never folded
  (an initializer that is also a graph input may be overridden at run time, so it is an input here too);
* node names: the folder names every unnamed node; names are put back as they were (a node is known by its first
  output), so reports and ``--until`` dumps speak of the same nodes before and after;
* ``value_info``: only the entries the model declared (the folder's serializer adds one per typed value);
* opset imports, metadata, functions, and external data (the model is folded in memory with its data loaded;
  :func:`bnfold.onnx.save_onnx` writes it out as before);
* alias safety: a folded value becomes a *new* initializer; the initializers it was computed from stay for their
  other readers, and an initializer read by several nodes is cloned by the fold rules before it is rewritten
  (:meth:`~bnfold.ir.onnx.graph.OnnxGraph.write_input`).

A model in which nothing folds is left untouched, byte for byte; one with no node the folder could fold (no node
reads only constants, no ``Shape``/``Size``/``CastLike``) does not even import it (onnx-ir and onnxscript take
seconds to import). Nodes left without readers *by the folding* (the
``Constant`` inputs of a folded node) are removed; nodes that were dead before stay dead, as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import onnx

from bnfold.passes.constant_fold import ConstantFold
from bnfold.passes.engine import Category, Change, PassResult
from bnfold.passes.onnx.context import OnnxContext

__all__ = ["FoldedConstants", "OnnxConstantFold", "fold_initializer_constants"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldedConstants:
    """What :func:`fold_initializer_constants` did: the nodes it replaced by initializers (``label``: name or first
    output) and the values that became initializers."""

    nodes: tuple[str, ...]
    values: tuple[str, ...]

    @property
    def modified(self) -> bool:
        return bool(self.nodes)


def _label(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def fold_initializer_constants(model: onnx.ModelProto) -> FoldedConstants:
    """Replace every node of ``model`` whose inputs are all constants by initializers (in place; see the module
    docstring for what is kept). Returns what was folded; ``model`` is untouched when nothing was."""
    graph = model.graph
    if not _may_fold(graph):
        return FoldedConstants((), ())
    import onnx_ir as ir
    from onnxscript.optimizer import fold_constants

    before = {_label(n): n for n in graph.node}
    names = {n.output[0]: n.name for n in graph.node if n.output}
    declared = {vi.name for vi in graph.value_info}
    graph_outputs = {o.name for o in graph.output}
    read = {i for n in graph.node for i in n.input}
    dead_before = {n.output[0] for n in graph.node if n.output and not any(o in read or o in graph_outputs
                                                                             for o in n.output)}
    irm = ir.serde.deserialize_model(model)
    try:
        result = fold_constants(irm)
    except Exception as exc:  # a folder bug must not cost the fold: the rules run on the model as it is
        log.warning("constant folding skipped: %s: %s", type(exc).__name__, exc)
        return FoldedConstants((), ())
    if not result.modified:
        return FoldedConstants((), ())
    _remove_dead(irm.graph, dead_before)
    out = ir.serde.serialize_model(irm)
    for n in out.graph.node:  # the folder named unnamed nodes; a node is known by its first output
        if n.output and n.output[0] in names:
            n.name = names[n.output[0]]
    kept = [vi for vi in out.graph.value_info if vi.name in declared]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    after = {_label(n) for n in out.graph.node}
    initializers = {t.name for t in graph.initializer}
    new_values = tuple(t.name for t in out.graph.initializer if t.name not in initializers)
    folded = tuple(label for label in before if label not in after)
    model.CopyFrom(out)
    return FoldedConstants(folded, new_values)


_FROM_TYPES = {"Shape", "Size", "CastLike"}  # the folder evaluates these from types and static shapes


def _may_fold(graph: onnx.GraphProto) -> bool:
    """Whether a top-level node could fold: it reads only constants (initializers that are not graph inputs,
    ``Constant`` outputs), or it is one the folder evaluates from types and shapes."""
    default = ("", "ai.onnx")
    consts = {t.name for t in graph.initializer} - {i.name for i in graph.input}
    consts |= {n.output[0] for n in graph.node if n.op_type == "Constant" and n.domain in default and n.output}
    for n in graph.node:
        if n.domain not in default or n.op_type == "Constant":
            continue
        inputs = [i for i in n.input if i]
        if n.op_type in _FROM_TYPES or (inputs and all(i in consts for i in inputs)):
            return True
    return False


def _remove_dead(graph: object, dead_before: set[str]) -> None:
    """Remove the nodes of the onnx-ir ``graph`` that nothing reads any more because of the folding (a node already
    dead in the input stays), last first so that a chain goes at once."""
    for node in reversed(list(graph)):  # type: ignore[call-overload]
        outs = list(node.outputs)
        if not outs or (outs[0].name in dead_before):
            continue
        if any(v.uses() or v.is_graph_output() for v in outs):
            continue
        graph.remove(node, safe=True)  # type: ignore[attr-defined]


class OnnxConstantFold:
    """Pass ``constant_fold`` (first in the ONNX pipeline, as :class:`~bnfold.passes.constant_fold.ConstantFold` is
    in the torch one): :func:`fold_initializer_constants` once per run, then the context re-indexes the new graph.
    Later rounds find nothing new to fold (the rules never compute a constant), so it runs only once."""

    name = ConstantFold.name
    revisit_rejected = False

    def run(self, ctx: OnnxContext, worklist: Sequence[onnx.NodeProto]) -> PassResult:
        result = PassResult()
        if ctx.constants_folded:
            return result
        ctx.constants_folded = True
        folded = fold_initializer_constants(ctx.model)
        if folded.modified:
            ctx.reload()
            shown = ", ".join(f"'{n}'" for n in folded.nodes[:6]) + (", …" if len(folded.nodes) > 6 else "")
            result.changes.append(Change(self.name, folded.nodes[0], f"{len(folded.nodes)} nodes computed from "
                                         f"constants only became {len(folded.values)} initializers ({shown})",
                                         Category.CANONICALIZE))
        return result
