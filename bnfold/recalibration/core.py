"""Re-estimate BatchNorm running statistics exactly on unlabeled data: :func:`recalibrate`.

Each layer's new statistics are the population mean and unbiased variance of everything it receives,

    mean_c = K_c + S_c / n,    var_c = (Q_c − S_c² / n) / (n − 1),

from sums ``n, S_c = Σ(x − K_c), Q_c = Σ(x − K_c)²`` over all batches (of any size) and all ranks, ``K_c`` the
layer's old running mean (:mod:`bnfold.recalibration.stats`: every value summed in float64, by one read of each
activation in :mod:`bnfold.recalibration.native`). Not an average of per-batch
statistics (equal weights for unequal batches), not an exponential moving average, not the per-batch variances
averaged (which drops the between-batch spread).

Only the BatchNorm layers see the data "in training semantics"; every other module stays in eval mode, so
dropout and other train-only behaviour are off (:mod:`bnfold.recalibration.probe`: a probe before each BatchNorm
measures its input and sets the statistics it normalizes with). Two modes say what a layer normalizes with while the
data flows:

``"batch"`` (default, one pass over the data)
    every layer normalizes with the statistics of the current batch, as during training — the standard
    procedure (AdaBN, ``update_bn``): layer k is measured on the activations training would produce.
``"sequential"`` (inference-exact, L passes for L layers)
    layer k is measured with every earlier layer already normalizing with its *new* statistics, exactly as at
    inference after recalibration. Pass k stops each forward right after layer k (so the L passes cost about
    L/2 full forwards). A source that can be iterated again (a ``DataLoader``, an image folder) is read again by
    every pass — it must give the same samples each time, in any order or batching (what layer k receives no
    longer depends on the batch); a list or a generator is kept in memory between passes.

The model is changed only at the end, and only its running_mean / running_var; if anything fails or is
interrupted the statistics are restored from a snapshot and the error propagates. Layers that saw no data keep
their statistics; layers called at several sites get statistics pooled over all their calls. Both are reported.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from bnfold.batches import Batches, positional_arity
from bnfold.errors import DataError, InputError
from bnfold.recalibration.drift import shift_and_ratio
from bnfold.recalibration.probe import Pass, Runner, batch_count, eval_mode, limited_calls, progress_bar
from bnfold.recalibration.stats import (
    BatchNormLayer,
    agree_on_order,
    all_reduce_layers,
    as_vector,
    finalize_all,
    find_layers,
    restore_stats,
    world,
)

__all__ = ["LayerRecalibration", "Mode", "RecalibrationReport", "recalibrate"]

log = logging.getLogger(__name__)

Mode = Literal["batch", "sequential"]


@dataclass(frozen=True)
class LayerRecalibration:
    """One layer after recalibration.

    ``count`` is the number of values per channel it saw (N·H·W summed over batches and ranks); ``calls`` the
    largest number of times it ran in one forward (> 1: reused); ``mean_shift`` and ``log_var_ratio`` compare
    new with old statistics (RMS over channels of ``(μ_new − μ_old)/√(σ²_old + ε)`` and of
    ``log((σ²_new + ε)/(σ²_old + ε))``). ``mean``/``var`` are the new float64 statistics (``None`` if unchanged).
    """

    name: str
    kind: str
    channels: int
    count: int
    calls: int
    status: str
    mean_shift: float = float("nan")
    log_var_ratio: float = float("nan")
    mean: torch.Tensor | None = field(default=None, repr=False, compare=False)
    var: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def updated(self) -> bool:
        return self.mean is not None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("name", "kind", "channels", "count", "calls", "status",
                                              "mean_shift", "log_var_ratio")}


@dataclass
class RecalibrationReport:
    """What :func:`recalibrate` did: per layer (execution order) and in total."""

    mode: str
    layers: list[LayerRecalibration]
    passes: int
    batches: int
    samples: int
    seconds: float
    world_size: int = 1

    @property
    def recalibrated(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.updated]

    @property
    def no_data(self) -> list[str]:
        """Layers that saw no data (or one value per channel): their statistics were left unchanged."""
        return [layer.name for layer in self.layers if not layer.updated]

    @property
    def reused(self) -> list[str]:
        """Layers called at several sites: their statistics are pooled over all the calls."""
        return [layer.name for layer in self.layers if layer.calls > 1]

    def layer(self, name: str) -> LayerRecalibration:
        for entry in self.layers:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "passes": self.passes, "batches": self.batches, "samples": self.samples,
                "seconds": self.seconds, "world_size": self.world_size, "recalibrated": len(self.recalibrated),
                "no_data": self.no_data, "reused": self.reused, "layers": [e.to_dict() for e in self.layers]}

    def to_json(self, **kwargs: Any) -> str:
        from bnfold.report import json_safe

        return json.dumps(json_safe(self.to_dict()), indent=2, allow_nan=False, **kwargs)

    def __str__(self) -> str:
        from bnfold.report import format_table

        ranks = f" on {self.world_size} processes" if self.world_size > 1 else ""
        lines = [f"recalibrated {len(self.recalibrated)} of {len(self.layers)} BatchNorm layers ({self.mode} mode, "
                 f"{self.passes} pass{'es' if self.passes != 1 else ''}, {self.batches} batches, "
                 f"{self.samples} samples{ranks}, {self.seconds:.2f} s)", ""]
        rows = [[e.name, e.kind, str(e.channels), str(e.count), f"{e.mean_shift:.3f}", f"{e.log_var_ratio:.3f}",
                 e.status] for e in self.layers]
        lines.append(format_table(["layer", "kind", "channels", "values/channel", "rms mean shift",
                                   "rms log var ratio", "status"], rows))
        return "\n".join(lines)


def recalibrate(model: nn.Module, batches: Iterable[Any], *, num_batches: int | None = None,
                num_samples: int | None = None, mode: Mode = "batch",
                progress: bool | None = None) -> RecalibrationReport:
    """Replace the running statistics of every BatchNorm in ``model`` by exact statistics measured on ``batches``.

    ``model``: an ``nn.Module`` or a captured GraphModule (symbolic or ``torch.export``); changed in place (running
    mean and variance only). ``batches``: an iterable of batches, each a tensor (the only input), a tuple/list
    (positional inputs) or a dict (keyword inputs) — inputs only, no labels; a single tensor or tuple of tensors
    is one batch (:mod:`bnfold.batches`, as in ``compare``). ``num_batches`` / ``num_samples`` stop
    early (the last batch is cut to give exactly ``num_samples``). ``mode``: ``"batch"`` or ``"sequential"``
    (module docstring). ``progress``: a tqdm bar on stderr (default: only when stderr is a terminal).
    Under ``torch.distributed`` every rank must call this with its share of the data; all ranks end with the
    statistics of the union.
    """
    if mode not in ("batch", "sequential"):
        raise InputError(f"unknown recalibration mode {mode!r}", hint="use 'batch' or 'sequential'")
    for name, value in (("num_batches", num_batches), ("num_samples", num_samples)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(model, torch.export.ExportedProgram):
        raise InputError("recalibrate needs a module, not an ExportedProgram",
                         hint="pass ep.module() and re-export it afterwards")
    named = list(model.named_modules())  # one walk for find_layers and eval_mode
    layers = find_layers(model, named)
    if not layers:
        raise InputError(f"{type(model).__name__} has no BatchNorm layer with running statistics",
                         hint="recalibration updates running_mean/running_var; models without them have none")
    batches = Batches(batches, positional_arity(model))
    start = time.perf_counter()
    try:
        with eval_mode(model, (m for _, m in named)), torch.no_grad(), Runner(model, layers) as runner:
            measure = _measure_batch if mode == "batch" else _measure_sequential
            passes, n_batches, n_samples = measure(runner, layers, batches, num_batches, num_samples, progress)
        entries = _commit(layers)
    except BaseException:
        restore_stats(layers)
        raise
    report = RecalibrationReport(mode, entries, passes, n_batches, n_samples, time.perf_counter() - start,
                                 world()[0])
    if report.no_data:
        log.warning("BatchNorm layers that saw no data keep their statistics: %s", ", ".join(report.no_data))
    if report.reused:
        log.warning("BatchNorm layers called at several sites got statistics pooled over all calls: %s",
                    ", ".join(report.reused))
    return report


def _measure_batch(runner: Runner, layers: list[BatchNormLayer], batches: Iterable[Any], num_batches: int | None,
                   num_samples: int | None, progress: bool | None) -> tuple[int, int, int]:
    """One pass, every layer normalizing with batch statistics and recording its input."""
    bar = progress_bar(progress, total=batch_count(batches, num_batches), desc="recalibrate")
    try:
        calls = limited_calls(batches, num_batches=num_batches, num_samples=num_samples)
        n_batches, n_samples = runner.run(Pass(default="batch", record=set(layers)), calls, bar)
    finally:
        bar.close()
    n_batches, n_samples = _check_data(all_reduce_layers(layers, [n_batches, n_samples]))
    finalize_all(layers)
    return 1, n_batches, n_samples


def _measure_sequential(runner: Runner, layers: list[BatchNormLayer], batches: Iterable[Any],
                        num_batches: int | None, num_samples: int | None,
                        progress: bool | None) -> tuple[int, int, int]:
    """Pass 0 measures every layer in batch mode (final for the first layer called) and finds the execution order;
    pass k re-measures layer k with layers < k on their new statistics, stopping each forward after layer k."""
    replay = _replayable(batches)
    kept: list[Any] | None = None if replay else []
    length = batch_count(batches, num_batches)
    bar = progress_bar(progress, total=length, desc="recalibrate 1/?")
    try:
        calls = limited_calls(batches, num_batches=num_batches, num_samples=num_samples)
        local, local_samples = runner.run(Pass(default="batch", record=set(layers)), calls, bar, keep=kept)
        n_batches, n_samples = _check_data(all_reduce_layers(layers, [local, local_samples]))
        agree_on_order(layers)
        order = sorted((layer for layer in layers if layer.moments.count > 0), key=lambda layer: layer.first_call)
        finalize_all(order[:1])
        bar.reset(total=local * len(order))
        bar.update(local)
        for k, target in enumerate(order[1:], start=1):
            bar.set_description(f"recalibrate {k + 1}/{len(order)}")
            target.reset_moments()
            calls_per_forward = target.calls_per_forward
            stop = (target, next(iter(calls_per_forward))) if len(calls_per_forward) == 1 else None
            plan = Pass(default="batch", record={target}, use=dict.fromkeys(order[:k], "new"), stop_after=stop)
            seen = runner.run(plan, kept if kept is not None else
                              limited_calls(batches, num_batches=num_batches, num_samples=num_samples), bar)
            if seen[1] != local_samples:
                raise DataError(f"the calibration data gave {seen[1]} samples on pass {k + 1} but {local_samples} on "
                                "pass 1: sequential mode reads it once per pass and needs the same samples each time",
                                hint="no random augmentation or sampling in the loader, or pass a list of batches")
            all_reduce_layers([target])
            finalize_all([target])
    finally:
        bar.close()
    return max(1, len(order)), n_batches, n_samples


def _replayable(batches: Iterable[Any]) -> bool:
    """Whether every pass can iterate ``batches`` from the start, reading them again (a ``DataLoader``, a
    :mod:`bnfold.io.stream` source): then sequential mode re-reads them instead of keeping them in memory. A list
    (already in memory) and a one-shot iterator (a generator) are kept."""
    inner: Any = batches
    while isinstance(inner, Batches):  # what the batches are read from
        inner = inner.inputs
    return not isinstance(inner, (Iterator, list, tuple, torch.Tensor, Mapping))


def _check_data(counters: list[float]) -> tuple[int, int]:
    n_batches, n_samples = (int(v) for v in counters)
    if n_samples == 0:
        raise InputError("no calibration data: the batches were empty", hint="pass at least one batch of inputs")
    return n_batches, n_samples


def _commit(layers: list[BatchNormLayer]) -> list[LayerRecalibration]:
    """Check every new statistic, then write them all; one report entry per layer in execution order.

    The checks and the drift summaries are computed for all layers at once (one concatenation of their
    channels): per-layer small tensor operations would cost more than a whole batch of a small model."""
    done = [layer for layer in layers if layer.new_mean is not None and layer.new_var is not None]
    summaries: dict[BatchNormLayer, tuple[float, float]] = {}
    if done:
        mean = torch.cat([layer.new_mean for layer in done])  # type: ignore[misc]
        var = torch.cat([layer.new_var for layer in done])  # type: ignore[misc]
        finite_t = torch.isfinite(mean) & torch.isfinite(var)
        if not bool(finite_t.all()):  # one check; which layer: only if needed
            finite = finite_t.tolist()
            at = 0
            for layer in done:
                if not all(finite[at:at + layer.channels]):
                    raise InputError(f"BatchNorm '{layer.name}' received non-finite values (NaN/Inf) on the "
                                     "calibration data; nothing was changed",
                                     hint="check the calibration inputs (NaN/Inf, unnormalized values) and the model")
                at += layer.channels
        counts = torch.tensor([layer.channels for layer in done])
        epsilons = {layer.eps for layer in done}
        eps: float | torch.Tensor = next(iter(epsilons)) if len(epsilons) == 1 else \
            torch.repeat_interleave(torch.tensor([layer.eps for layer in done], dtype=torch.float64), counts)
        d, r = shift_and_ratio(torch.cat([as_vector(layer.stored_mean) for layer in done]),
                           torch.cat([as_vector(layer.stored_var) for layer in done]), mean, var, eps)
        squares = torch.segment_reduce(torch.stack((d, r), 1).square_(), "sum", lengths=counts)  # (layers, 2)
        rms = squares.div_(counts.unsqueeze(1)).sqrt_().tolist()
        summaries = {layer: (rms[i][0], rms[i][1]) for i, layer in enumerate(done)}
        with torch.no_grad():  # one call for all the copies
            torch._foreach_copy_([t for layer in done for t in (layer.running_mean, layer.running_var)],
                                 [t for layer in done for t in (layer.new_mean, layer.new_var)])  # type: ignore[misc]
    entries: list[LayerRecalibration] = []
    for layer in sorted(layers, key=lambda layer: (layer.first_call, layers.index(layer))):
        calls = max(layer.calls, layer.sites)
        if layer not in summaries:
            status = "no data: statistics unchanged" if layer.moments.count == 0 else \
                "one value per channel: statistics unchanged"
            entries.append(LayerRecalibration(layer.name, layer.kind, layer.channels, layer.moments.count, calls,
                                              status))
            continue
        status = "recalibrated" if calls <= 1 else f"recalibrated, pooled over {calls} call sites"
        entries.append(LayerRecalibration(layer.name, layer.kind, layer.channels, layer.moments.count, calls, status,
                                          *summaries[layer], layer.new_mean, layer.new_var))
    return entries
