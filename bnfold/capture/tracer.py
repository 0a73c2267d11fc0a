"""The symbolic tracers: :class:`BnfoldTracer` (``torch.fx`` symbolic tracing that keeps conv/linear/BN modules
as leaves) and :class:`GuidedTracer`, the same tracer guided by the example inputs where plain symbolic tracing
has to give up.

Plain symbolic tracing knows nothing about values, so any Python decision on a traced value fails: ``if
x.shape[0] != n``, ``if x.dtype != w.dtype``, ``len(x)``, a buffer sliced with a traced length. Hugging Face
``transformers`` models are full of them (mask creation, rotary embeddings, input checks). ``GuidedTracer``
does what ``transformers``' own ``HFTracer`` (``transformers.utils.fx``, removed in 5.x) did: every proxy also
carries the *fake* value of what it stands for (``FakeTensorMode``: shapes, dtypes and devices, no data), so

* a decision on a shape, a dtype, a rank or a device is taken the way the example inputs take it (and recorded
  in :attr:`GuidedTracer.decisions`: the graph is specialized to them, as ``torch.export`` with static shapes
  is);
* a decision on tensor *values* (``if mask.any()``) cannot be taken: it fails with
  :class:`DataDependentControlFlow`, naming the line;
* the graph itself stays what symbolic tracing records (module calls, functional calls, shapes read with
  ``size``): only the control flow is resolved.
"""

from __future__ import annotations

import contextlib
import dis
import functools
import inspect
import logging
import operator
import os
import sys
import traceback
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, is_dataclass
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx._lazy_graph_module import _make_graph_module
from torch.fx.proxy import Attribute, Proxy, TraceError

from bnfold.ir.batchnorm import is_stock_batchnorm
from bnfold.ir.linear_ops import module_kind

__all__ = ["BnfoldTracer", "DataDependentControlFlow", "GuidedTracer", "SymbolicTrace", "check_example_input",
           "input_names", "symbolic_trace"]

log = logging.getLogger(__name__)

_NO_VALUE = object()


class UnpackingProxy(Proxy):
    """fx's ``Proxy``, whose ``a, b, c = proxy`` (``Proxy.__iter__``: one ``getitem`` per target when the caller's
    instruction is ``UNPACK_SEQUENCE``) reads that instruction from a per-code-object table instead of
    disassembling the caller's whole function at every unpacking — a tenth of a symbolic capture of timm's LeViT,
    whose attention unpacks shapes and splits; transformers write ``B, N, C = x.shape`` everywhere."""

    def __iter__(self) -> Iterator[Proxy]:
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        if caller is None:
            return super().__iter__()
        targets = _unpacked_targets(caller.f_code, caller.f_lasti)
        if targets is not None:
            return (self[i] for i in range(targets))
        return self.tracer.iter(self)

    def __getattr__(self, k: str) -> Any:
        return UnpackingAttribute(self, k)


class UnpackingAttribute(Attribute, UnpackingProxy):
    """``proxy.attr`` (fx's lazy ``Attribute``) that unpacks as :class:`UnpackingProxy` does."""


@functools.lru_cache(maxsize=4096)
def _instructions(code: Any) -> tuple[list[int], list[tuple[str, Any]]]:
    """Offsets and (opname, argval) of ``code``'s instructions, as ``dis.get_instructions`` lists them."""
    listed = list(dis.get_instructions(code))
    return [i.offset for i in listed], [(i.opname, i.argval) for i in listed]


def _unpacked_targets(code: Any, lasti: int) -> int | None:
    """How many targets the instruction at ``lasti`` unpacks into, or ``None`` when it is no
    ``UNPACK_SEQUENCE`` — the instruction ``Proxy.__iter__`` looks at (the first at or after ``lasti`` on
    Python ≥ 3.11, the ``lasti // 2``-th before)."""
    offsets, ops = _instructions(code)
    k = bisect_left(offsets, lasti) if sys.version_info >= (3, 11) else lasti // 2
    opname, argval = ops[k]
    return int(argval) if opname == "UNPACK_SEQUENCE" else None


class BnfoldTracer(torch.fx.Tracer):
    """``symbolic_trace`` tracer that keeps stock conv/linear/BN modules (and their plain subclasses, such as
    torchvision's ``Conv3DSimple``) as leaves, and traces *through* subclasses that override ``forward``
    (a BN that also applies an activation shows up as ``F.batch_norm`` followed by the activation).

    ``n_inputs``: how many positional inputs the model is called with. The root's ``forward`` then gets one
    placeholder per input and nothing else: its other parameters keep their defaults, as when bnfold calls
    the model (without it, an optional ``mask=None`` would become an input and be traced as a tensor)."""

    def __init__(self, n_inputs: int | None = None) -> None:
        super().__init__()
        self.n_inputs = n_inputs
        self._outside = 0  # > 0 while a module outside the model's hierarchy is being inlined
        # id(tensor of such a module) -> (that tensor, kept alive so its id is not reused; the graph's own copy)
        self._constants: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._model_parameters: set[int] | None = None  # ids of the model's parameters and buffers, once asked
        # id -> (first name, tensor) of the root's parameters / buffers, built at the first attribute read
        self._attr_names: dict[bool, dict[int, tuple[str, torch.Tensor]]] = {}

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        """A module that is called but is not a submodule of the model (a Hugging Face hub-kernel wrapper such
        as ``transformers``' ``apply_rotary_pos_emb`` since 5.25, a module held in a closure or a global) has
        no path in the model, so it cannot be a ``call_module`` node: it is inlined as its ``forward``, and
        its parameters and buffers become constants of the graph (copies: folding never writes to a module
        the model does not own)."""
        if self._outside or not self._is_submodule(m):
            self._outside += 1
            try:
                return forward(*args, **kwargs)
            finally:
                self._outside -= 1
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Proxy]) -> Any:
        """``torch.fx.Tracer.getattr`` — a parameter (or, with ``proxy_buffer_attributes``, a buffer) read as a
        module attribute becomes a ``get_attr`` node named by its first path in ``named_parameters()`` /
        ``named_buffers()``, once per name — looked up in an index of those paths instead of fx's scan of every
        parameter per read (linear in the model: a tenth of a symbolic capture on timm's ConvNeXt, whose norms
        and layer scales read their parameters as attributes). A tensor the index does not hold (registered
        during the trace) gets fx's own scan."""
        if isinstance(attr_val, nn.Parameter):
            name = self._attr_name(attr_val, parameters=True)
        elif self.proxy_buffer_attributes and isinstance(attr_val, torch.Tensor):
            name = self._attr_name(attr_val, parameters=False)
        else:
            return attr_val
        if name is None:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            factory = None if not self.param_shapes_constant else \
                (lambda node: torch.fx.proxy.ParameterProxy(self, node, name, attr_val))
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {}, proxy_factory_fn=factory)
        return parameter_proxy_cache[name]

    def _attr_name(self, t: torch.Tensor, *, parameters: bool) -> str | None:
        index = self._attr_names.get(parameters)
        if index is None:
            named = self.root.named_parameters() if parameters else self.root.named_buffers()
            index = self._attr_names[parameters] = {}
            for n, v in named:
                index.setdefault(id(v), (n, v))
        entry = index.get(id(t))
        return entry[0] if entry is not None and entry[1] is t else None

    def proxy(self, node: torch.fx.Node) -> Proxy:
        return UnpackingProxy(node, self)

    def _is_submodule(self, m: nn.Module) -> bool:
        try:
            self.path_of_module(m)
        except NameError:
            return False
        return True

    def create_arg(self, a: Any) -> Any:
        """A dataclass that is also a dict (``transformers``' ``ModelOutput``) is rebuilt as itself from its set
        fields, as ``torch.export`` returns it (fx alone would turn it into a plain dict). A tensor of a module
        outside the model (see :meth:`call_module`), or a parameter the model does not hold, becomes a
        constant of the graph holding a copy of it."""
        if isinstance(a, dict) and is_dataclass(a) and not isinstance(a, type):
            return self.create_node("call_function", type(a), (), {k: self.create_arg(v) for k, v in a.items()})
        if isinstance(a, torch.Tensor) and (self._outside or isinstance(a, nn.Parameter)) \
                and not self._held_by_model(a):
            if id(a) not in self._constants:
                self._constants[id(a)] = (a, a.detach().clone())
            a = self._constants[id(a)][1]
        return super().create_arg(a)

    def _held_by_model(self, a: torch.Tensor) -> bool:
        """``a`` is a parameter, buffer or tensor attribute of the model being traced (fx names it by its path)."""
        if a in self.tensor_attrs:
            return True
        if self._model_parameters is None:
            self._model_parameters = {id(t) for t in (*self.root.parameters(), *self.root.buffers())}
        return id(a) in self._model_parameters

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_stock_batchnorm(m) or module_kind(m) is not None:
            return True
        if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.modules.conv._ConvNd | nn.Linear):
            return False  # overridden forward: trace through it
        return super().is_leaf_module(m, module_qualified_name)

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool,
                             concrete_args: dict[str, Any] | tuple[Any, ...] | None = None
                             ) -> tuple[Any, list[Any]]:
        if self.n_inputs is None or not is_module or concrete_args:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        names = input_names(root_fn, self.n_inputs)
        if names is None:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        return root_fn, [self.root, *(self.create_proxy("placeholder", n, (), {}) for n in names)]


def input_names(forward: Callable[..., Any], n: int) -> list[str] | None:
    """Placeholder names for calling unbound ``forward(self, ...)`` with ``n`` positional inputs, or None when
    its signature cannot be read or does not take them positionally (a keyword-only input, too few
    parameters): fx's own handling then applies."""
    try:
        params = list(inspect.signature(inspect.unwrap(forward)).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    names: list[str] = []
    for p in params:
        if len(names) == n:
            break
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            names += [f"{p.name}_{i}" for i in range(n - len(names))]
        elif p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        else:
            return None
    return names if len(names) == n else None


class _MissingValue(LookupError):
    """An argument of the node has no fake value (the message: why the first one has none)."""


class DataDependentControlFlow(TraceError):
    """The model takes a Python decision on tensor values while being traced: a graph cannot hold it."""


class GuidedProxy(UnpackingProxy):
    """A proxy whose tracer knows the fake value of what it stands for (see :class:`GuidedTracer`)."""

    tracer: GuidedTracer

    def __len__(self) -> int:
        return self.tracer.length(self)

    def __getattr__(self, k: str) -> Any:
        if k in ("dtype", "device"):  # fixed for a graph, as in torch.export's: answered, no node
            value = self.tracer.value(self)
            if isinstance(value, torch.Tensor):
                return getattr(value, k)
        return GuidedAttribute(self, k)

    def __index__(self) -> int:
        return self.tracer.index(self)


class GuidedAttribute(Attribute, GuidedProxy):
    """``proxy.attr`` (``Attribute``: the node is made only if the attribute is used as a value) that knows its
    value."""


class GuidedTracer(BnfoldTracer):
    """:class:`BnfoldTracer` guided by the example inputs: each proxy's fake value is computed as the node is
    recorded, and a Python decision on a traced value (``bool``, ``len``, iteration, an index) is taken on it.

    Decisions on shapes/dtypes/devices are recorded in :attr:`decisions` (``"file:line: what"``); decisions on
    tensor values raise :class:`DataDependentControlFlow`. Buffers are proxied, so slicing one with a traced
    length (BERT's ``position_ids[:, :seq_len]``) is recorded, not computed on the spot."""

    proxy_buffer_attributes = True

    def __init__(self, example_inputs: Sequence[Any]) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        super().__init__(n_inputs=len(example_inputs))
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.examples = [self.fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
                         for t in example_inputs]
        self.decisions: list[str] = []
        self._values: dict[torch.fx.Node, Any] = {}
        self._failures: dict[torch.fx.Node, str] = {}  # why a node has no value
        self._placeholders = 0
        self._evaluating = False

    # -- values ----------------------------------------------------------------------------------------------

    def proxy(self, node: torch.fx.Node) -> Proxy:
        return GuidedProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     name: str | None = None, type_expr: Any | None = None,
                     proxy_factory_fn: Callable[[torch.fx.Node], Proxy] | None = None) -> Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self._evaluating:
            return proxy
        try:
            self._values[proxy.node] = self._evaluate(kind, target, args, kwargs)
        except _MissingValue as exc:  # an input has none: the first node that failed is the reason
            self._failures[proxy.node] = str(exc)
        except Exception as exc:  # no value: a decision on this node fails, saying why
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            self._failures[proxy.node] = f"{proxy.node.name}: {type(exc).__name__}: {first_line}"
            log.debug("no fake value for %s %s: %s", kind, target, exc)
        return proxy

    def _evaluate(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kind == "placeholder":
            i, self._placeholders = self._placeholders, self._placeholders + 1
            return self.examples[i] if i < len(self.examples) else _NO_VALUE
        if kind not in ("get_attr", "call_function", "call_method", "call_module"):
            return _NO_VALUE
        args, kwargs = torch.fx.node.map_aggregate((args, kwargs), self._value_or_raise)  # slices too
        self._evaluating = True
        try:
            if kind == "get_attr":
                return self._fake(_fetch(self.root, target))
            with self.fake_mode:
                if kind == "call_function":
                    return target(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
                return self.root.get_submodule(target)(*args, **kwargs)
        finally:
            self._evaluating = False

    def _fake(self, value: Any) -> Any:
        return self.fake_mode.from_tensor(value) if isinstance(value, torch.Tensor) else value

    def _value_or_raise(self, a: Any) -> Any:
        if isinstance(a, Proxy):
            value = self.value(a)
            if value is _NO_VALUE:
                raise _MissingValue(self._failures.get(a.node, f"{a.node.name} has no value"))
            return value
        return self._fake(a)

    def value(self, proxy: Proxy) -> Any:
        """The fake value ``proxy`` stands for (``_NO_VALUE`` when it could not be computed)."""
        return self._values.get(proxy.node, _NO_VALUE)

    # -- while a value is computed, modules run for real and attributes are plain ---------------------------

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Proxy]) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # -- decisions -------------------------------------------------------------------------------------------

    def _decide(self, proxy: Proxy, what: str, take: Callable[[Any], Any]) -> Any:
        value = self.value(proxy)
        if value is _NO_VALUE:
            why = self._failures.get(proxy.node, "not an input, parameter, buffer or op result")
            raise TraceError(f"symbolically traced variables cannot be used as inputs to control flow: {what} of "
                             f"{_describe(proxy.node)} at {_user_frame()}, whose fake value could not be "
                             f"computed ({why})")
        try:
            result = take(value)
        except Exception as exc:
            if isinstance(value, torch.Tensor):
                raise DataDependentControlFlow(
                    f"data-dependent control flow at {_user_frame()}: {what} of a tensor's values "
                    f"({_describe(proxy.node)}), which a symbolic trace cannot know: write the branch with "
                    f"torch.where (both sides in the graph), or fold with capture='export'") from exc
            raise
        self.decisions.append(f"{_user_frame()}: {what} = {result!r}")
        return result

    def to_bool(self, obj: Proxy) -> bool:
        return bool(self._decide(obj, "bool", bool))

    def length(self, obj: Proxy) -> int:
        """``len(obj)``, taken on its value."""
        return int(self._decide(obj, "len", len))

    def index(self, obj: Proxy) -> int:
        """``obj`` as a Python int (a slice bound, a size given to a Python function), taken on its value."""
        return int(self._decide(obj, "int", operator.index))

    def iter(self, obj: Proxy) -> Iterator[Any]:
        n = self._decide(obj, "len (iterated)", len)
        return (obj[i] for i in range(n))


def _describe(node: torch.fx.Node) -> str:
    target = getattr(node.target, "__name__", node.target)
    return f"'{node.name}' ({node.op} {target})"


def _fetch(root: nn.Module, target: str) -> Any:
    value: Any = root
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


_NOT_MODEL_CODE = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


def _user_frame() -> str:
    """``file:line`` of the innermost frame outside torch and bnfold's capture: the model code deciding."""
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith(_NOT_MODEL_CODE):
            return f"{frame.filename.rsplit('site-packages' + os.sep, 1)[-1]}:{frame.lineno}"
    return "<unknown>"


# ---------------------------------------------------------------------------------------------------------------
# tracing a model


@dataclass(frozen=True)
class SymbolicTrace:
    """A symbolic trace. ``decisions``: the Python decisions the trace took on the example inputs' shapes and
    dtypes (``"file:line: what = value"``, in order, each once); empty for a plain trace, which holds for any
    input shape. When there are decisions, the graph holds for the example shapes and dtypes only, and checks
    its inputs against them (:func:`check_example_input`) as an exported program does."""

    module: torch.fx.GraphModule
    decisions: tuple[str, ...] = ()


def symbolic_trace(model: nn.Module, example_inputs: Sequence[Any], *, specialize: bool = True) -> SymbolicTrace:
    """Trace ``model`` (called with ``example_inputs`` positionally) with :class:`BnfoldTracer`; where that fails
    (Python control flow on a traced value), trace again with :class:`GuidedTracer`.

    ``specialize=False`` refuses a guided trace that had to take decisions (the graph would hold for the example
    shapes only: with dynamic shapes, that is wrong), with a :class:`torch.fx.proxy.TraceError` naming the first.
    A guided trace that fails raises its own error (data-dependent control flow names the line)."""
    try:
        return SymbolicTrace(_trace(model, BnfoldTracer(n_inputs=len(example_inputs))))
    except Exception as exc:
        log.debug("plain symbolic tracing of %s failed (%s: %s); tracing guided by the example inputs",
                  type(model).__name__, type(exc).__name__, exc)
    tracer = GuidedTracer(example_inputs)
    gm = _trace(model, tracer)
    decisions = tuple(dict.fromkeys(tracer.decisions))
    if decisions and not specialize:
        raise TraceError(f"tracing takes {len(decisions)} Python decisions on the example inputs' shapes "
                         f"(first: {decisions[0]}), so the graph would hold for those shapes only, not the dynamic "
                         f"ones asked for")
    if decisions:
        _guard_inputs(gm, tracer.examples)
        log.info("symbolic capture of %s: %d decisions taken on the example inputs' shapes/dtypes (the graph "
                 "checks its inputs against them); first: %s", type(model).__name__, len(decisions), decisions[0])
    return SymbolicTrace(gm, decisions)


def _trace(model: nn.Module, tracer: BnfoldTracer) -> torch.fx.GraphModule:
    with _traceable_batchnorm():
        graph = tracer.trace(model)
    return _make_graph_module(tracer.root, graph, model.__class__.__name__)  # lazily compiled when asked


@contextlib.contextmanager
def _traceable_batchnorm() -> Iterator[None]:
    """Make ``_BatchNorm.forward`` symbolically traceable when a subclass calls ``super().forward``: its input
    checks (``input.dim()``, ``input.size(1)``) branch on tensor values, which symbolic tracing cannot do.
    The checks are validation only; shapes are checked again when the traced graph runs."""
    classes = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm]
    saved = [(cls, name, cls.__dict__[name]) for cls in classes
             for name in ("_check_input_dim", "_check_non_zero_input_channels") if name in cls.__dict__]
    try:
        for cls, name, _ in saved:
            setattr(cls, name, lambda self, input: None)
        yield
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


@torch.fx.node.has_side_effect
def check_example_input(x: Any, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Raise unless ``x`` has the shape and dtype a guided trace was specialized on (a graph node: kept by dead
    code elimination, like ``torch._assert``)."""
    if isinstance(x, torch.Tensor) and (tuple(x.shape) != shape or x.dtype != dtype):
        raise ValueError(
            f"input {name!r} is {tuple(x.shape)} {x.dtype}, but this graph was traced for {shape} {dtype} only: "
            f"symbolic capture took Python decisions on the example inputs' shapes (bnfold.capture, "
            f"GuidedTracer). Fold again with inputs of this shape, or use capture='export' with dynamic_shapes")


def _guard_inputs(gm: torch.fx.GraphModule, examples: Sequence[Any]) -> None:
    """Insert :func:`check_example_input` for every tensor input, right after the placeholders."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return
    with gm.graph.inserting_after(placeholders[-1]):
        for node, example in reversed(list(zip(placeholders, examples, strict=False))):
            if isinstance(example, torch.Tensor):
                gm.graph.call_function(check_example_input,
                                       (node, node.name, tuple(example.shape), example.dtype))
    gm.recompile()
