"""Shape, dtype, stride and device of every node of a captured graph, recorded without computing anything.

:func:`propagate_shapes` walks the graph once and gives each node

* ``node.meta['val']``: a fake tensor (``FakeTensorMode``: shape, dtype, strides, device, no data) for a tensor,
  the Python value for a size or a number, a tuple of them for a tuple — what ``torch.fx``'s ``FakeTensorProp``
  records; and
* ``node.meta['tensor_meta']``: the ``TensorMetadata`` of a tensor (a tuple of them for a tuple of tensors),
  which the passes read (:func:`bnfold.ir.graph.node_shape`, :func:`~bnfold.ir.graph.node_dtype`).

Each node's output is derived from its inputs' metadata in one of two ways:

1. **by a rule** (:mod:`bnfold.ir.shapes.rules`), for the ops whose output
   metadata is a short function of their inputs': elementwise ops and activations (the input's), normalizations —
   BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm — (the input's, instead of the decomposition torch's fake
   ``batch_norm`` kernel runs, which was most of the cost before), convolutions and pools (the output-size formula),
   linear layers, reshapes, permutations, reductions, concatenation, splits, and Python arithmetic on sizes (the
   values themselves). A rule answers only in the common case it is sure of — floating-point inputs of one dtype
   and device, contiguous (or, for ops that keep their input's layout, dense) memory, sizes that pass the op's own
   checks — and otherwise declines;
2. **by the op's fake kernel** (the op run in ``FakeTensorMode``), for every other op and every case a rule
   declines: what ``FakeTensorProp`` does for the whole graph.

A rule costs a few microseconds, a fake kernel tens to thousands; a real forward would cost what the model costs on
the example inputs, which grows with them. ``tests/ir/test_shapes.py`` checks every rule against ``FakeTensorProp``
node by node (shape, dtype, device, strides of every dimension larger than 1) on the model zoos. What is not
recorded: ``requires_grad`` (False throughout; nothing reads it) and aliasing between fake values.

When a fake kernel fails (an output shape that depends on the data: ``nonzero``, boolean masks), the graph is run
for real on the example inputs (``torch.fx``'s ``ShapeProp``), as before.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from bnfold.ir.graph import cached_lookups, fetch_attr, quiet_fx
from bnfold.ir.shapes.layout import fake, from_real, is_fake, tensor_meta
from bnfold.ir.shapes.rules import FUNCTION_RULES, METADATA_METHODS, METHOD_RULES, PURE_PYTHON, Rule, module_rule

__all__ = ["propagate_shapes"]

log = logging.getLogger(__name__)


def _has_tensor(args: Any) -> bool:
    found = False

    def visit(a: Any) -> Any:
        nonlocal found
        found = found or isinstance(a, torch.Tensor)
        return a
    map_aggregate(args, visit)
    return found


class _Propagator:
    """One walk over ``gm``'s nodes: each node's value from a rule, a Python computation or the fake kernel."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.env: dict[torch.fx.Node, Any] = {}
        self.seen: dict[tuple[Any, ...], Any] = {}  # fake kernel results by call signature
        self.metas: dict[int, TensorMetadata] = {}  # by id of a fake value (alive in node.meta for the run)
        self.rules = 0
        self.fake = 0

    def run(self, example_inputs: Sequence[Any]) -> None:
        with cached_lookups(self.gm):  # a submodule by its dotted path: one dictionary lookup
            self._run(example_inputs)

    def _run(self, example_inputs: Sequence[Any]) -> None:
        args = iter(self.gm.graph.process_inputs(*example_inputs))
        env, mode = self.env, self.mode
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                value: Any = [self._input(a) for a in args] if str(node.target).startswith("*") else \
                    self._input(next(args, *node.args[:1]))  # StopIteration: a missing input (as the Interpreter)
            elif node.op == "get_attr":
                value = fetch_attr(self.gm, str(node.target))
                if isinstance(value, torch.Tensor):
                    converted = from_real(mode, value)
                    value = mode.from_tensor(value) if converted is None else converted
            else:
                args_, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
                if node.op == "output":
                    self._record(node, args_[0], with_meta=False)
                    break
                value = self._compute(node, args_, kwargs)  # type: ignore[arg-type]
            env[node] = value
            self._record(node, value)

    def _input(self, value: Any) -> Any:
        return self.mode.from_tensor(value) if isinstance(value, torch.Tensor) else value

    def _record(self, node: torch.fx.Node, value: Any, *, with_meta: bool = True) -> None:
        """``node.meta['val']`` (what ``FakeTensorProp`` records: fake tensors and numbers, in their containers;
        anything else None) and ``['tensor_meta']`` (for a tensor, or a tuple/list of tensors)."""
        if isinstance(value, torch.Tensor):
            val: Any = value if is_fake(value) else self.mode.from_tensor(value)
        else:
            val = map_aggregate(value, self._meta_value)
        if val is None:
            return
        node.meta["val"] = val
        if not with_meta:
            return
        if isinstance(val, torch.Tensor):
            node.meta["tensor_meta"] = self._tensor_meta(val)
        elif isinstance(val, (tuple, list)) and val and all(isinstance(v, torch.Tensor) for v in val):
            node.meta["tensor_meta"] = tuple(self._tensor_meta(v) for v in val)

    def _tensor_meta(self, val: torch.Tensor) -> TensorMetadata:
        """:func:`~bnfold.ir.shapes.layout.tensor_meta`, once per fake value (an op that keeps its input's metadata
        shares its value)."""
        meta = self.metas.get(id(val))
        if meta is None:
            meta = self.metas[id(val)] = tensor_meta(val)
        return meta

    def _meta_value(self, v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v if is_fake(v) else self.mode.from_tensor(v)
        if isinstance(v, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)):
            return v
        return None

    def _compute(self, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        op, target = node.op, node.target
        value: Any = None
        if op == "call_module":
            value = module_rule(self.mode, fetch_attr(self.gm, str(target)), args, kwargs)
        elif op == "call_function":
            if target in PURE_PYTHON and not _has_tensor((args, kwargs)):
                self.rules += 1
                return target(*args, **kwargs)  # type: ignore[operator]
            rule = FUNCTION_RULES.get(target)
            if rule is not None:
                value = _call_rule(rule, self.mode, args, kwargs)
        elif op == "call_method":
            if target in METADATA_METHODS and args and is_fake(args[0]):
                self.rules += 1
                return getattr(args[0], str(target))(*args[1:], **kwargs)
            rule = METHOD_RULES.get(str(target))
            if rule is not None:
                value = _call_rule(rule, self.mode, args, kwargs)
        if value is not None:
            self.rules += 1
            return value
        self.fake += 1
        return self._fake_kernel(node, args, kwargs)

    def _fake_kernel(self, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The op run on fake values (in-place ops return a snapshot, so later writes do not change it).

        The output's metadata depends only on the inputs' metadata and the other arguments, so a function or
        method called again with the same ones (the next transformer block's attention) gets the metadata of
        the first call's output, rebuilt (:func:`_signature`, :func:`_rebuild`)."""
        from torch.fx.experimental.proxy_tensor import snapshot_fake

        key = None if node.op == "call_module" or str(node.target).endswith("_") else \
            _signature(node.target, args, kwargs)
        if key is not None and key in self.seen:
            return _rebuild(self.mode, self.seen[key])
        with self.mode:
            if node.op == "call_module":
                result = fetch_attr(self.gm, str(node.target))(*args, **kwargs)  # type: ignore[operator]
            elif node.op == "call_function":
                result = node.target(*args, **kwargs)  # type: ignore[operator]
            else:
                result = getattr(args[0], str(node.target))(*args[1:], **kwargs)
            if node.op == "call_method" and str(node.target).endswith("_"):
                result = map_aggregate(result, lambda v: snapshot_fake(v) if is_fake(v) else v)
        if key is not None:
            with contextlib.suppress(_Unkeyable):  # a constant result (values known): not reused
                self.seen[key] = _describe(result)
        return result


def _signature(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """A hashable key of a call by its arguments' metadata (tensors: shape, strides, dtype, device; other values
    themselves), or None when a value is neither (or a tensor carries a constant value: an op computed on it
    may depend on the data)."""
    try:
        key = (target, _sig(args), _sig(tuple(sorted(kwargs.items()))))
        hash(key)
        return key
    except (TypeError, _Unkeyable):
        return None


class _Unkeyable(Exception):
    pass


def _sig(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        if not is_fake(v) or v.constant is not None:
            raise _Unkeyable
        return ("T", tuple(v.shape), v.stride(), v.dtype, v.device)
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_sig(x) for x in v))
    if isinstance(v, slice):
        return ("slice", v.start, v.stop, v.step)
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format,
                                   torch.layout)) or v is Ellipsis:
        return (type(v).__name__, v)
    raise _Unkeyable


def _describe(v: Any) -> Any:
    """The metadata of a result, to rebuild it (:func:`_rebuild`): tensors, numbers and tuples/lists of them."""
    if isinstance(v, torch.Tensor):
        if not is_fake(v) or v.constant is not None:
            raise _Unkeyable
        return ("T", tuple(v.shape), v.stride(), v.dtype, v.device)
    if isinstance(v, (tuple, list)):
        return (type(v), [_describe(x) for x in v])
    if v is None or isinstance(v, (bool, int, float)):
        return ("V", v)
    raise _Unkeyable


def _rebuild(mode: FakeTensorMode, d: Any) -> Any:
    if d[0] == "T":
        return fake(mode, d[1], d[3], d[4], d[2])
    if d[0] == "V":
        return d[1]
    cls, items = d[0], [_rebuild(mode, x) for x in d[1]]
    return cls(*items) if hasattr(cls, "_fields") else cls(items)  # a named tuple takes its fields one by one


def _call_rule(rule: Rule, mode: FakeTensorMode, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        return rule(mode, *args, **kwargs)
    except TypeError:  # an argument form the rule does not take (an unexpected keyword): the fake kernel's
        return None


_METADATA_MUTATING = frozenset({"resize_", "resize_as_", "t_", "transpose_", "squeeze_", "unsqueeze_", "as_strided_",
                                 "set_", "swapdims_", "swapaxes_", "permute_"})
"""In-place methods that change a tensor's shape or strides: a graph with one is propagated by ``FakeTensorProp``,
which records a snapshot of every value (a value recorded here would change with the tensor afterwards)."""


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, real: bool = False) -> None:
    """Record ``node.meta['val']`` and ``node.meta['tensor_meta']`` on every node of ``gm`` for ``example_inputs``
    (module docstring: rules, then fake kernels; a real run when those fail).

    ``real``: run ``gm`` for real instead (``torch.fx``'s ``ShapeProp``, no gradients; ``tensor_meta`` only): the
    independent reference the tests compare against. It runs the graph's code on ``gm``'s own state, so only on a
    copy that may change.
    """
    if not real:
        try:
            if any(n.op == "call_method" and n.target in _METADATA_MUTATING for n in gm.graph.nodes):
                _fake_tensor_prop(gm, example_inputs)
                return
            propagator = _Propagator(gm)
            propagator.run(example_inputs)
            log.debug("shapes of %d nodes: %d by rules, %d by fake kernels", len(gm.graph.nodes), propagator.rules,
                      propagator.fake)
            return
        except Exception as exc:  # fake propagation is an optimisation only
            log.debug("fake shape propagation failed (%s); running the graph for real", exc)
    with torch.no_grad(), quiet_fx():
        ShapeProp(gm).propagate(*example_inputs)


def _fake_tensor_prop(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """``torch.fx``'s ``FakeTensorProp`` over the whole graph, ``tensor_meta`` from its values."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    from bnfold.ir.graph import shapes_from_vals

    class _FakeTensorProp(FakeTensorProp):
        """Also records a plain Python result (``x.size(-1)``: an int; ``x.size()``: a tuple of ints) as the node's
        ``val``, as torch >= 2.13's own does and the rules do: before 2.13 such a node had no value (or Nones), and
        a node without one may be a tensor (``x.view(-1, x.size(-1))``, transformers' ``Conv1D``, would read two)."""

        def run_node(self, n: torch.fx.Node) -> Any:
            result = super().run_node(n)
            if _plain(result):
                n.meta["val"] = tuple(result) if isinstance(result, (tuple, list)) else result
            return result

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
    _FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)
    shapes_from_vals(gm, complete=False)


def _plain(value: Any) -> bool:
    """An int / float / bool, or a tuple or list of them (a ``torch.Size``)."""
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, (int, float, bool)) for v in value)
    return isinstance(value, (int, float, bool))
