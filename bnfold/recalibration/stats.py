"""What every BatchNorm layer sees: per-channel count, Σ(x − K) and Σ(x − K)², added up in float64.

The statistics behind :func:`bnfold.recalibrate` and :func:`bnfold.diagnose` (:mod:`bnfold.recalibration.probe`
routes each layer's inputs here).

**Which layers.** A GraphModule's layers come from :func:`bnfold.ir.batchnorm.find_batchnorm_sites` (module,
functional and aten BatchNorm, including ``aten.batch_norm`` from ``torch.export`` whose running statistics are
``get_attr`` buffers); a plain ``nn.Module``'s are its ``_BatchNorm`` submodules that track running statistics.
A layer is identified by the running-mean *tensor* it reads, so several call sites of one layer are one layer.

**The math.** For a layer input ``x`` of shape ``(N, C, *)`` and each channel ``c``, with a shift ``K_c`` near the
channel's mean::

    n   += N · ∏(*)                    (values per channel)
    S_c += Σ (x[:, c, ...] − K_c)      (every value converted to float64 first, summed in float64)
    Q_c += Σ (x[:, c, ...] − K_c)²

    mean_c = K_c + S_c / n,    var_c = (Q_c − S_c² / n) / (n − 1)      (unbiased, like BatchNorm's running_var)

The sums add across batches of any size, so the result is the population mean and variance of everything the
layer saw, count-weighted. Under ``torch.distributed``, every rank's sums are moved to a shift all ranks share
(:meth:`Moments.rebase`, the mean of the ranks' shifts) and one all-reduce of the packed ``(n, S, Q)`` of all
layers makes every rank equal to one process over the union of the data.

**Precision.** Every value is converted to float64 before it is shifted, squared and added (one read of each
activation, :func:`bnfold.recalibration.native.channel_sums`): the sums carry float64 rounding (~1e-16 per addition),
and cancellation in ``Q − S²/n`` multiplies it by ``1 + (mean − K)²/var``. ``K`` starts as the layer's running mean
(non-finite values → 0); on a layer's first batch, channels with ``(mean − K)² > _FAR · var`` (stored statistics
that do not describe the data at all) take that batch's mean as ``K`` and are summed again, so the factor stays
below ``1 + _FAR`` (~1e-12 relative error). Ranks' shifts then differ by sampling noise only, and rebasing to
their mean costs nothing measurable.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.fx
from torch import nn

from bnfold.errors import InputError
from bnfold.ir.batchnorm import BatchNormSite, find_batchnorm_sites
from bnfold.recalibration.native import batch_norm_measured, channel_moments_

__all__ = [
    "BatchNormLayer",
    "Moments",
    "agree_on_order",
    "all_reduce_layers",
    "as_vector",
    "finalize_all",
    "find_layers",
    "moments_to_stats",
    "prepare_layers",
    "restore_stats",
    "world",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Largest (mean − shift)² / var a layer's first batch is summed with; beyond it the shift moves to the batch mean.
_FAR = 1e4


def moments_to_stats(n: int | torch.Tensor, sums: torch.Tensor, *,
                     unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """From ``sums = [S; Q]`` relative to some shift: ``mean = S / n`` (relative to it) and
    ``var = (Q − S·mean) / (n − 1)`` (``/ n`` when not ``unbiased``), clamped at 0. ``n`` is one count, or one
    per channel (float64)."""
    total, total_sq = sums[0], sums[1]
    mean = total / n
    var = torch.addcmul(total_sq, total, mean, value=-1.0).div_(n - 1 if unbiased else n)
    return mean, var.clamp_min_(0.0)


@dataclass
class Moments:
    """Running ``n`` and float64 ``sums = [S; Q]`` (shape ``(2, C)``) of one layer, relative to its shift."""

    count: int
    sums: torch.Tensor

    @classmethod
    def zeros(cls, channels: int, device: torch.device) -> Moments:
        return cls(0, torch.zeros(2, channels, dtype=torch.float64, device=device))

    def rebase(self, delta: torch.Tensor) -> None:
        """Make the sums relative to ``shift − delta`` instead of ``shift``: ``Σ(x − K + δ) = S + nδ`` and
        ``Σ(x − K + δ)² = Q + δ·(2S + nδ)`` (float64)."""
        total, total_sq = self.sums
        self.sums = torch.stack((total + self.count * delta,
                                 torch.addcmul(total_sq, delta, 2.0 * total + self.count * delta)))

    def pack(self) -> torch.Tensor:
        """``[n, S, Q]`` flat, for an all-reduce (every rank's sums must be relative to the same shift)."""
        return torch.cat([self.sums.new_tensor([float(self.count)]), self.sums.reshape(-1)])

    def unpack(self, packed: torch.Tensor) -> None:
        """Become the sum of all ranks' packs."""
        self.count = round(float(packed[0]))
        self.sums = packed[1:].reshape(2, -1).clone()


@dataclass(eq=False)
class BatchNormLayer:
    """One BatchNorm layer (possibly called at several sites), its stored statistics and what was measured."""

    name: str
    kind: str
    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: float
    module: nn.Module | None = None  # the _BatchNorm module it belongs to (None: functional/aten BatchNorm)
    graph_sites: list[BatchNormSite] = field(default_factory=list)  # its call sites, in a GraphModule
    stored_mean: torch.Tensor = field(init=False)  # copies of the statistics before measuring (restored after)
    stored_var: torch.Tensor = field(init=False)
    shift: torch.Tensor = field(init=False)  # float64 K: the stored mean (non-finite → 0), the same on every rank
    moments: Moments = field(init=False)
    new_mean: torch.Tensor | None = None  # float64, set once the layer is final
    new_var: torch.Tensor | None = None
    first_call: float = math.inf  # position of its first call in a forward (execution order)
    calls_per_forward: set[int] = field(default_factory=set)
    holding: str = "stored"  # what running_mean/running_var hold while data flows (see hold())
    settled: bool = False  # the shift was checked against a first batch
    _channels: int = field(init=False, repr=False)
    prepare: InitVar[bool] = True  # False: the caller runs prepare_layers() on many layers at once

    def __post_init__(self, prepare: bool) -> None:
        self._channels = self.running_mean.numel()
        if prepare:
            prepare_layers([self])

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def sites(self) -> int:
        """Call sites in the graph (1 for a module's layer)."""
        return max(1, len(self.graph_sites))

    @property
    def calls(self) -> int:
        """Largest number of calls in one forward (> 1: the layer is reused)."""
        return max(self.calls_per_forward, default=0)

    def measure(self, x: torch.Tensor, *, record: bool = True, normalize: bool = False) -> int:
        """Sum one input ``x`` (one read, :func:`bnfold.recalibration.native.channel_moments_`): into the layer's
        moments if ``record``; with ``normalize``, also write the batch's mean and biased variance (what training-mode
        BatchNorm normalizes with) into the running buffers, when it has ≥ 2 values per channel. Returns the
        number of values per channel (0 for an empty input)."""
        n = self._values_per_channel(x)
        if n == 0:
            return 0
        buffers = (self.running_mean, self.running_var) if normalize else (None, None)
        self._sum(x, n, record, lambda total: (None, channel_moments_(x, self.shift, total, *buffers)))
        if normalize and n >= 2:
            self.holding = "batch"
        return n

    def normalize(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, *,
                  record: bool = True) -> torch.Tensor:
        """Training-mode BatchNorm of ``x`` (batch mean, biased variance, the layer's eps) that measures it in the
        same pass over memory (:func:`bnfold.recalibration.native.batch_norm_measured`); the sums go into the layer's
        moments if ``record``. ``x`` must hold ≥ 2 values per channel."""
        n = self._values_per_channel(x)
        if self.settled and record:  # the usual call: into the moments, no closure
            y, _ = batch_norm_measured(x, weight, bias, self.shift, self.moments.sums, self.eps)
            self.moments.count += n
            return y
        return self._sum(x, n, record,
                         lambda total: batch_norm_measured(x, weight, bias, self.shift, total, self.eps))

    def _values_per_channel(self, x: torch.Tensor) -> int:
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise InputError(f"BatchNorm '{self.name}' of {self.channels} channels received a tensor of shape "
                             f"{tuple(x.shape)}", hint="BatchNorm normalizes dim 1 of an (N, C, ...) input")
        return x.numel() // self.channels

    def _sum(self, x: torch.Tensor, n: int, record: bool, run: Callable[[torch.Tensor], tuple[T, float]]) -> T:
        """``run(total)`` adds the sums of ``x`` to ``total`` and returns (its result, how far the shift is from
        the batch); into the moments if ``record``. On the layer's first batch a shift far from the data is
        moved (:meth:`_reshift`) and the batch summed again."""
        total = self.moments.sums if record else torch.zeros_like(self.moments.sums)
        result, farthest = run(total)
        if not self.settled:
            self.settled = True
            if farthest > _FAR and self.moments.count == 0:  # the stored statistics do not describe the data
                self._reshift(n, total)  # total holds this batch's sums alone
                total.zero_()
                result, _ = run(total)
        if record:
            self.moments.count += n
        return result

    def _reshift(self, n: int, sums: torch.Tensor) -> None:
        """Channels whose mean is farther than ``√_FAR`` standard deviations from the shift take the mean of the
        batch (``n`` values per channel, ``sums`` relative to the shift) as their shift (module docstring,
        "Precision")."""
        mean, var = moments_to_stats(n, sums, unbiased=False)
        self.shift = torch.where(mean.square() > _FAR * var, self.shift + mean, self.shift)

    def hold(self, what: str, mean: torch.Tensor | None = None, var: torch.Tensor | None = None) -> None:
        """Put the statistics the layer is to normalize with into its running buffers: ``mean``/``var``, or the
        stored ones when they are not given. ``what`` names them, so that holding the same twice costs nothing
        (``"batch"`` is written every time)."""
        if what == self.holding and what != "batch":
            return
        with torch.no_grad():
            self.running_mean.copy_(self.stored_mean if mean is None else mean)
            self.running_var.copy_(self.stored_var if var is None else var)
        self.holding = what

    def reset_moments(self) -> None:
        self.moments = Moments.zeros(self.channels, self.running_mean.device)

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Population mean and unbiased variance of everything measured so far (needs ``count ≥ 2``), float64."""
        mean, var = moments_to_stats(self.moments.count, self.moments.sums)
        return mean.add_(self.shift), var


def find_layers(model: nn.Module,
                named_modules: list[tuple[str, nn.Module]] | None = None) -> list[BatchNormLayer]:
    """Every BatchNorm layer of ``model`` that has running statistics to recalibrate, in graph/module order.
    ``named_modules``: ``list(model.named_modules())`` if the caller has it (one walk of a small model's modules
    costs ~0.1 ms)."""
    layers: dict[int, BatchNormLayer] = {}
    if isinstance(model, torch.fx.GraphModule):
        for site in find_batchnorm_sites(model):
            rm, rv = site.running_mean, site.running_var
            if rm is None or rv is None:
                log.debug("BatchNorm at %s has no constant running statistics; not recalibrated", site.path)
                continue
            layer = layers.get(id(rm))
            if layer is None:
                module = model.get_submodule(str(site.node.target)) if site.node.op == "call_module" else None
                layer = layers[id(rm)] = BatchNormLayer(site.path, site.kind, rm, rv, site.eps, module=module,
                                                        prepare=False)
            layer.graph_sites.append(site)
    else:
        for name, m in model.named_modules() if named_modules is None else named_modules:
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None \
                    and m.running_var is not None:
                layers[id(m.running_mean)] = BatchNormLayer(name, type(m).__name__, m.running_mean, m.running_var,
                                                            float(m.eps), module=m, prepare=False)
    found = list(layers.values())
    prepare_layers(found)
    return found


def prepare_layers(layers: list[BatchNormLayer]) -> None:
    """Every layer's copies of its stored statistics, its shift (the stored mean in float64, non-finite → 0) and
    zero moments, made for all layers on one device in one call per kind (views of one tensor each): five small
    tensor operations per layer cost ~20 µs, more than a batch of a small model takes in its BatchNorm layers."""
    groups: dict[tuple[torch.device, torch.dtype, torch.dtype], list[BatchNormLayer]] = {}
    for layer in layers:
        key = (layer.running_mean.device, layer.running_mean.dtype, layer.running_var.dtype)
        groups.setdefault(key, []).append(layer)
    for (device, _, _), group in groups.items():
        sizes = [layer.channels for layer in group]
        with torch.no_grad():  # 1-D buffers (every BatchNorm module's) as they are: a reshape per layer costs ~1 µs
            means = torch.cat([as_vector(layer.running_mean) for layer in group])
            variances = torch.cat([as_vector(layer.running_var) for layer in group])
            shifts = torch.nan_to_num(means.to(torch.float64), 0.0, 0.0, 0.0)
            sums = torch.zeros(2 * sum(sizes), dtype=torch.float64, device=device)
        for layer, mean, var, shift, total in zip(group, means.split(sizes), variances.split(sizes),
                                                  shifts.split(sizes), sums.split([2 * c for c in sizes]),
                                                  strict=True):
            layer.stored_mean = mean if layer.running_mean.dim() == 1 else mean.view(layer.running_mean.shape)
            layer.stored_var = var if layer.running_var.dim() == 1 else var.view(layer.running_var.shape)
            layer.shift = shift
            layer.moments = Moments(0, total.view(2, -1))


def as_vector(t: torch.Tensor) -> torch.Tensor:
    """``t`` flattened; itself when it is already 1-D (a BatchNorm module's buffers: no view to make)."""
    return t if t.dim() == 1 else t.reshape(-1)


def restore_stats(layers: list[BatchNormLayer]) -> None:
    """Every layer's running statistics back to what they were when it was found (whatever wrote them)."""
    if not layers:
        return
    with torch.no_grad():  # one call for all the copies: per-layer copies cost ~3 µs each
        torch._foreach_copy_([t for layer in layers for t in (layer.running_mean, layer.running_var)],
                             [t for layer in layers for t in (layer.stored_mean, layer.stored_var)])
    for layer in layers:
        layer.holding = "stored"


def finalize_all(layers: list[BatchNormLayer]) -> None:
    """Set ``new_mean`` / ``new_var`` (:meth:`BatchNormLayer.stats`) of every layer that saw at least 2 values per
    channel, computed once over all their channels (per-layer small operations cost more than the math)."""
    done = [layer for layer in layers if layer.moments.count >= 2]
    if not done:
        return
    sizes = [layer.channels for layer in done]
    counts = torch.repeat_interleave(torch.tensor([float(layer.moments.count) for layer in done],
                                                  dtype=torch.float64), torch.tensor(sizes))
    mean, var = moments_to_stats(counts, torch.cat([layer.moments.sums for layer in done], 1).to(counts.device))
    mean += torch.cat([layer.shift for layer in done]).to(mean.device)
    for layer, m, v in zip(done, mean.split(sizes), var.split(sizes), strict=True):
        device = layer.shift.device  # a no-op .to() still costs ~1 µs a call
        layer.new_mean, layer.new_var = (m, v) if device == m.device else (m.to(device), v.to(device))


# --------------------------------------------------------------------------------------------- ranks


def world() -> tuple[int, int]:
    """``(world_size, rank)`` of the default process group, ``(1, 0)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def all_reduce_layers(layers: list[BatchNormLayer], extra: list[float] | None = None) -> list[float]:
    """Sum every layer's ``(n, S, Q)`` (and ``extra`` counters) over all ranks in one all-reduce.

    First every layer's sums are moved to a shift all ranks share (the mean of their shifts, one all-reduce), so
    that they add. Every rank must pass the same layers in the same order (they come from the same model).
    """
    extra = list(extra or [])
    world_size, _ = world()
    if world_size == 1 or not layers:
        return extra
    device = layers[0].running_mean.device
    shifts = torch.cat([layer.shift for layer in layers])
    dist.all_reduce(shifts, op=dist.ReduceOp.SUM)
    at = 0
    for layer in layers:
        common = shifts[at:at + layer.channels] / world_size
        layer.moments.rebase(layer.shift - common)
        layer.shift = common
        at += layer.channels
    packed = torch.cat([layer.moments.pack() for layer in layers] +
                       [torch.tensor(extra, dtype=torch.float64, device=device)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    at = 0
    for layer in layers:
        width = 1 + 2 * layer.channels
        layer.moments.unpack(packed[at:at + width])
        at += width
    return [float(v) for v in packed[at:]]


def agree_on_order(layers: list[BatchNormLayer]) -> None:
    """Make ``first_call`` the minimum over ranks, so every rank measures the layers in the same order."""
    if world()[0] == 1 or not layers:
        return
    device = layers[0].running_mean.device
    first = torch.tensor([layer.first_call for layer in layers], dtype=torch.float64, device=device)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    for layer, value in zip(layers, first.tolist(), strict=True):
        layer.first_call = value
