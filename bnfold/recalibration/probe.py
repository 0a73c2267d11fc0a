"""Run a model over calibration batches with every BatchNorm input seen first by a probe.

The probe is the one mechanism behind :func:`bnfold.recalibrate` and :func:`bnfold.diagnose`. Before each
BatchNorm call it

1. measures the input (:meth:`bnfold.recalibration.stats.BatchNormLayer.measure`), if the :class:`Pass` records
   the layer, and
2. writes into the layer's ``running_mean`` / ``running_var`` the statistics the layer is to normalize with
   (:data:`Use`): ``"batch"`` — this batch's mean and biased variance, as training-mode BatchNorm normalizes;
   ``"new"`` — its freshly measured statistics; ``"stored"`` — its statistics as they were;
3. lets the call run unchanged, in eval mode: whatever form the BatchNorm takes (module, subclass with an
   activation, ``F.batch_norm``, aten op), it normalizes with what its running buffers hold.

Where the probe sits:

* a stock BatchNorm module (``BatchNorm1d/2d/3d``, whose ``forward`` is torch's own; plain modules and
  ``call_module`` sites of graphs alike): its ``forward`` is replaced for the run by :meth:`_Recorder.forward`.
  With batch statistics that is one native call that normalizes and measures in the same pass over memory
  (:meth:`bnfold.recalibration.stats.BatchNormLayer.normalize`) — the probe and the BatchNorm fused; otherwise the
  probe, then torch's forward;
* any other ``_BatchNorm`` module of a plain ``nn.Module`` (a subclass with its own ``forward``,
  ``SyncBatchNorm``): a forward pre-hook;
* functional / aten BatchNorm in a GraphModule (symbolic or ``torch.export``), in a *copy* of the graph (sharing
  the model's parameters and buffers; the user's graph is never edited): the call is replaced by
  :meth:`_Recorder.batch_norm_at` — the same as a stock module's replaced forward — or, where its saved
  statistics are used too, gets a probe before it and its ``training`` argument set to False. Calls of non-stock
  BatchNorm modules in a graph get a probe before them.

Every other module stays in eval mode (dropout off) and no other torch call is touched, so the forward costs what
an eval forward costs plus the measuring. The buffers are put back after every pass; replaced forwards and hooks
are removed when the :class:`Runner` exits, whatever happened.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from bnfold.errors import InputError
from bnfold.ir.graph import normalized_kwargs
from bnfold.recalibration import native
from bnfold.recalibration.stats import BatchNormLayer, restore_stats, world

__all__ = [
    "Call",
    "Pass",
    "Runner",
    "Use",
    "as_call",
    "batch_count",
    "eval_mode",
    "limited_calls",
    "progress_bar",
]

Use = Literal["batch", "new", "stored"]

Call = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class Pass:
    """What each layer does during one pass over the data."""

    default: Use
    record: set[BatchNormLayer]
    use: dict[BatchNormLayer, Use] = field(default_factory=dict)
    stop_after: tuple[BatchNormLayer, int] | None = None  # (layer, its number of calls per forward)


class _StopForward(BaseException):  # BaseException: a model's `except Exception` must not swallow it
    """Raised once the layer a sequential pass measures has seen its last input: the rest is not needed."""


class _Recorder:
    """What happens at a BatchNorm input, according to the current :class:`Pass`."""

    def __init__(self, layers: list[BatchNormLayer]) -> None:
        self.layers = layers
        self._fuse: dict[BatchNormLayer, bool] = {}
        self.plan = Pass(default="stored", record=set())
        self._calls: dict[BatchNormLayer, int] = {}
        self._order = 0

    @property
    def plan(self) -> Pass:
        return self._plan

    @plan.setter
    def plan(self, plan: Pass) -> None:
        """Set the pass; the layers it normalizes with batch statistics are found once here (with whether each is
        recorded), not at every call: a BatchNorm call of a small model costs a few µs."""
        self._plan = plan
        batch = [layer for layer in self.layers if plan.use.get(layer, plan.default) == "batch"]
        self._fuse = {layer: layer in plan.record for layer in batch} \
            if batch and native.native_ops() is not None else {}

    def begin_forward(self) -> None:
        self._calls = {}

    def end_forward(self) -> None:
        for layer, n in self._calls.items():
            layer.calls_per_forward.add(n)

    def _count(self, layer: BatchNormLayer) -> int:
        calls = self._calls.get(layer, 0) + 1
        self._calls[layer] = calls
        if layer.first_call == float("inf"):
            layer.first_call = self._order
        self._order += 1
        return calls

    def __call__(self, layer: BatchNormLayer, x: torch.Tensor) -> None:
        """The probe before a BatchNorm call: measure ``x`` and put what the layer normalizes with in its buffers."""
        calls = self._count(layer)
        plan = self.plan
        use = plan.use.get(layer, plan.default)
        record = layer in plan.record
        n = layer.measure(x, record=record, normalize=use == "batch") if record or use == "batch" else 0
        if plan.stop_after == (layer, calls):
            raise _StopForward
        if use == "batch":
            if n >= 2:
                pass  # measure() wrote this batch's statistics into the buffers
            elif layer.moments.count >= 2:  # one value per channel (training BatchNorm would refuse it):
                layer.hold("batch", *layer.stats())  # the estimate so far
            else:
                layer.hold("stored")
        elif use == "new" and layer.new_mean is not None:
            layer.hold("new", layer.new_mean, layer.new_var)
        else:
            layer.hold("stored")

    def probe_at(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """The probe as a graph node: ``x`` is the input of layer ``index`` (of the :class:`Runner`'s layers);
        returns ``x``, which the BatchNorm call then takes."""
        self(self.layers[index], x)
        return x

    def forward(self, layer: BatchNormLayer, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """In place of a stock BatchNorm module's forward: with batch statistics, normalize and measure in one
        pass over memory (:meth:`BatchNormLayer.normalize`); otherwise the probe, then the module's own forward."""
        module._check_input_dim(x)  # type: ignore[operator]
        y = self._fused(layer, x, module.weight, module.bias)
        if y is not None:
            return y
        self(layer, x)
        return _STOCK_FORWARD(module, x)

    def batch_norm_at(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      index: int) -> torch.Tensor:
        """In place of a functional/aten BatchNorm call in a graph copy (layer ``index``): the same as
        :meth:`forward`, then inference-mode ``F.batch_norm`` with what the buffers hold."""
        layer = self.layers[index]
        y = self._fused(layer, x, weight, bias)
        if y is not None:
            return y
        self(layer, x)
        return F.batch_norm(x, layer.running_mean, layer.running_var, weight, bias, False, 0.0, layer.eps)

    def _fused(self, layer: BatchNormLayer, x: torch.Tensor, weight: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor | None:
        """Normalized and measured in one native call when the layer uses batch statistics, else ``None``."""
        record = self._fuse.get(layer)  # None: not batch statistics in this pass, or no native kernels
        if record is None or not _fusable(layer, x):
            return None
        calls = self._count(layer)
        y = layer.normalize(x, weight, bias, record=record)
        if self._plan.stop_after is not None and self._plan.stop_after == (layer, calls):
            raise _StopForward
        return y


_STOCK_FORWARD = nn.modules.batchnorm._BatchNorm.forward


def _is_stock(module: nn.Module | None) -> bool:
    """A BatchNorm module whose forward is torch's own (BatchNorm1d/2d/3d, lazy ones): its forward can be
    replaced during a pass. Subclasses with their own forward (an activation, SyncBatchNorm) and instances whose
    forward was already replaced by someone else keep theirs (and get a probe)."""
    return module is not None and type(module).forward is _STOCK_FORWARD and "forward" not in vars(module)


def _fusable(layer: BatchNormLayer, x: torch.Tensor) -> bool:
    """Whether the native kernel takes ``x`` (a CPU tensor of ≥ 2 values per channel); the pass checked that the
    kernels are built."""
    return x.is_cpu and x.dim() >= 2 and x.shape[1] == layer.channels and x.numel() >= 2 * layer.channels


def _probed_graph_module(gm: torch.fx.GraphModule, layers: list[BatchNormLayer], replaced: set[BatchNormLayer],
                         recorder: _Recorder) -> torch.fx.GraphModule:
    """A copy of ``gm`` (same parameters and buffers, new graph) in which every functional/aten BatchNorm site of
    ``layers`` calls :meth:`_Recorder.batch_norm_at` instead (or, when its saved statistics are used too, gets a
    probe before it), and calls of other BatchNorm modules get a probe — but the module calls of ``replaced``
    layers, whose forward is replaced instead. ``gm`` itself when no site needs a change."""
    sites = [(i, site) for i, layer in enumerate(layers) for site in layer.graph_sites
             if isinstance(site.input, torch.fx.Node) and not (site.node.op == "call_module" and layer in replaced)]
    if not sites:
        return gm
    graph = torch.fx.Graph()
    mapping: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, mapping))
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    for i, site in sites:
        node = mapping[site.node]
        if node.op == "call_module":  # a BatchNorm subclass with its own forward: probe, then the module
            with graph.inserting_before(node):
                node.update_arg(0, graph.call_function(recorder.probe_at, (mapping[site.input], i)))
            continue
        kwargs = normalized_kwargs(gm, site.node)
        if kwargs is None:
            raise InputError(f"cannot read the arguments of BatchNorm call '{site.node.name}' ({site.kind})",
                             hint="please report this model form; recalibrate the nn.Module instead")
        kwargs = dict(torch.fx.node.map_arg(kwargs, lambda n: mapping[n]))
        output = mapping[site.output] if site.output is not None else None
        if output is not None and (output is node or all(user is output for user in node.users)):
            # only the normalized tensor is used: the call is replaced (see _Recorder.batch_norm_at)
            with graph.inserting_before(node):
                call = graph.call_function(recorder.batch_norm_at,
                                           (kwargs["input"], kwargs.get("weight"), kwargs.get("bias"), i))
            output.replace_all_uses_with(call)
            if output is not node:
                graph.erase_node(output)
            graph.erase_node(node)
            continue
        with graph.inserting_before(node):  # other outputs used (saved statistics): probe, then the call
            kwargs["input"] = graph.call_function(recorder.probe_at, (kwargs["input"], i))
        if "training" in kwargs:
            kwargs["training"] = False
        node.args, node.kwargs = (), kwargs
    return torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)


class Runner:
    """``model`` with a probe on every layer's input (module docstring); a context manager, so that hooks go away.

    ``run(plan, calls, bar)`` makes one pass over the batches with every layer doing what ``plan`` says.
    """

    def __init__(self, model: nn.Module, layers: list[BatchNormLayer]) -> None:
        self._model = model
        self._layers = layers
        self._recorder = _Recorder(layers)
        self._hooks: list[Any] = []
        self._replaced: list[nn.Module] = []
        self._forward: nn.Module = model

    def __enter__(self) -> Runner:
        stock = [layer for layer in self._layers if _is_stock(layer.module)]
        if isinstance(self._model, torch.fx.GraphModule):
            self._forward = _probed_graph_module(self._model, self._layers, set(stock), self._recorder)
        else:
            for layer in self._layers:
                if layer.module is not None and layer not in stock:
                    self._hooks.append(layer.module.register_forward_pre_hook(self._hook(layer), with_kwargs=True))
        for layer in stock:
            module = layer.module
            module.forward = self._forward_of(layer, module)  # type: ignore[union-attr, method-assign]
            self._replaced.append(module)  # type: ignore[arg-type]
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for module in self._replaced:
            del module.forward
        self._replaced.clear()

    def _forward_of(self, layer: BatchNormLayer, module: nn.Module) -> Any:
        recorder = self._recorder

        def forward(input: torch.Tensor) -> torch.Tensor:
            return recorder.forward(layer, module, input)

        return forward

    def _hook(self, layer: BatchNormLayer) -> Any:
        recorder = self._recorder

        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            recorder(layer, args[0] if args else kwargs["input"])

        return pre_hook

    def run(self, plan: Pass, calls: Iterable[tuple[Call, int]], bar: Any,
            keep: list[tuple[Call, int]] | None = None) -> tuple[int, int]:
        """Run every batch with the layers doing what ``plan`` says; return (batches, samples). ``keep`` (if
        given) collects the batches, for another pass. The running buffers hold the stored statistics after,
        whatever wrote them (a model may run a BatchNorm in training mode itself)."""
        recorder, forward = self._recorder, self._forward
        recorder.plan = plan
        shown = not getattr(bar, "disable", False)
        stop = contextlib.suppress(_StopForward)  # made once: it is reusable
        batches = samples = 0
        try:
            for call, size in calls:
                args, kwargs = call
                recorder.begin_forward()
                with stop:
                    forward(*args, **kwargs)
                recorder.end_forward()
                if keep is not None:
                    keep.append((call, size))
                batches += 1
                samples += size
                if shown:
                    bar.update(1)
                    bar.set_postfix(samples=samples, refresh=False)
        finally:
            restore_stats(self._layers)
        return batches, samples


# --------------------------------------------------------------------------------------------- batches


def as_call(batch: Any) -> Call:
    """A batch as call arguments: a tensor is the only input, a tuple/list the positional inputs, a dict keywords."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    raise InputError(f"a calibration batch is a {type(batch).__name__}; expected a tensor, a tuple of tensors "
                     "(positional inputs) or a dict (keyword inputs)",
                     hint="for a DataLoader of (inputs, labels) pass (x for x, _ in loader)")


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    for t in (*args, *kwargs.values()):
        if isinstance(t, torch.Tensor):
            return int(t.shape[0]) if t.dim() else 1
    raise InputError("a calibration batch holds no tensor", hint="each batch must contain the model's inputs")


def _truncate(args: tuple[Any, ...], kwargs: dict[str, Any], size: int, keep: int) -> Call:
    def cut(v: Any) -> Any:
        return v[:keep] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == size else v

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def limited_calls(batches: Iterable[Any], *, num_batches: int | None,
                  num_samples: int | None) -> Iterator[tuple[Call, int]]:
    """``(call arguments, samples)`` for each batch, stopping after ``num_batches`` batches or exactly
    ``num_samples`` samples (the last batch is cut to fit). Empty batches are skipped. ``batches`` is already read
    as batches (:class:`bnfold.batches.Batches`: a single tensor is one batch)."""
    seen = taken = 0
    for batch in batches:
        if num_batches is not None and taken >= num_batches:
            return
        args, kwargs = as_call(batch)
        size = _batch_size(args, kwargs)
        if num_samples is not None and seen + size > num_samples:
            args, kwargs = _truncate(args, kwargs, size, num_samples - seen)
            size = num_samples - seen
        if size <= 0:
            continue
        yield (args, kwargs), size
        seen += size
        taken += 1
        if num_samples is not None and seen >= num_samples:
            return


def batch_count(batches: Iterable[Any], limit: int | None) -> int | None:
    """How many batches a pass will see, when it can be told without consuming ``batches``."""
    try:
        n = len(batches)  # type: ignore[arg-type]
    except TypeError:
        return limit
    return n if limit is None else min(n, limit)


def progress_bar(progress: bool | None, *, total: int | None, desc: str) -> Any:
    """A tqdm bar on stderr; off when ``progress`` is False, when stderr is not a terminal (``None``) and on
    every rank but 0."""
    show = progress if progress is not None else sys.stderr.isatty()
    if not show or world()[1] != 0:
        return _HiddenBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, leave=False, dynamic_ncols=True)


class _HiddenBar:
    """What a hidden progress bar does: nothing (a disabled ``tqdm`` still costs its set-up on every call)."""

    disable = True

    def update(self, n: int = 1) -> None:
        pass

    def reset(self, total: int | None = None) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def eval_mode(model: nn.Module, modules: Iterable[nn.Module] | None = None) -> Iterator[None]:
    """Every module in eval mode (dropout off, BN reading its statistics) for the block; flags restored after.
    ``modules``: all of ``model.modules()``, if the caller has them already."""
    changed = [m for m in (model.modules() if modules is None else modules) if m.training]
    for m in changed:  # not model.train(False): torch.export's unlifted module refuses it
        m.training = False
    try:
        yield
    finally:
        for m in changed:
            m.training = True
