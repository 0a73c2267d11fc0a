"""Measure what every BatchNorm layer sees: per-channel count, Σ(x − K) and Σ(x − K)², added up in float64.

The engine behind :func:`bnfold.recalibrate` and :func:`bnfold.diagnose`.

**Which layers.** A GraphModule's layers come from :func:`bnfold.passes.detect.find_batchnorm_sites` (module,
functional and aten BatchNorm, including ``aten.batch_norm`` from ``torch.export`` whose running statistics are
``get_attr`` buffers); a plain ``nn.Module``'s are its ``_BatchNorm`` submodules that track running statistics.
A layer is identified by the running-mean *tensor* it reads, so several call sites of one layer are one layer.

**How calls are caught.** One :class:`torch.overrides.TorchFunctionMode` sees every torch call of the forward;
batch-norm calls (``F.batch_norm``, ``torch.batch_norm`` and the aten overloads) whose running mean is a tracked
buffer are answered by the engine, everything else runs untouched. One mechanism for every form of BatchNorm,
no graph surgery, no per-module hooks to forget to remove, and the model's code is never changed.

**The math.** For a layer input ``x`` of shape ``(N, C, *)``, a per-channel shift ``K`` near the channel means,
and each channel ``c``::

    n   += N · ∏(*)                    (values per channel)
    S_c += Σ (x[:, c, ...] − K_c)      (float32 per row x[n, c, :], rows added in float64)
    Q_c += Σ (x[:, c, ...] − K_c)²     (the same)

    mean_c = K_c + S_c / n,    var_c = (Q_c − S_c² / n) / (n − 1)      (unbiased, like BatchNorm's running_var)

Shifted sums still add across batches of any size and across processes (sums taken with another shift are
rebased in float64), so the result is the population mean and variance of everything the layer saw,
count-weighted, and under ``torch.distributed`` one all-reduce of the packed ``(n, S, Q)`` (rebased to a shift
every rank shares: the layer's running mean before measuring) makes every rank equal to one process over the
union of the data.

**Precision, and why the shift.** Summing float32 activations in float32 per row and only the row results in
float64 is ~3× cheaper than up-casting every activation to float64, and accurate to ~1e-7 (≤ 2e-7 measured, at
worst with many equal values) of ``Q``. The variance then loses ``1 + 2·(mean − K)²/var`` of that to cancellation,
so every batch is checked: if ``(mean − K)² > _TAU · var`` in some channel, ``K`` becomes that batch's mean and
its sums are taken again. ``K`` starts as 0 (no subtraction pass at all) when the stored statistics say the
input is centered, else as the stored running mean; on stationary data it is corrected at most once, on the first
batch. Result: variance within 1e-6 relative of a float64 full pass; mean within ~1e-7 of its standard deviation
(a float32 accumulation cannot resolve a mean a thousand times smaller than its spread to 1e-6 of itself).
Inputs of shape ``(N, C)`` and float64 inputs are summed in float64.

**What a layer normalizes with** while the data flows (:data:`Use`): ``"batch"`` — the statistics of the current
batch, as in training (biased variance; the output is then ``(x − mean_b) / √(var_b + eps) · γ + β``);
``"new"`` — the layer's freshly measured statistics (sequential recalibration); ``"stored"`` — its running
statistics as they are (diagnosis). Every other module stays in eval mode: dropout is off.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from bnfold.errors import InputError
from bnfold.passes.detect import find_batchnorm_sites

__all__ = [
    "BatchNormLayer",
    "Measurement",
    "Moments",
    "Pass",
    "Use",
    "Workspace",
    "agree_on_order",
    "all_reduce_layers",
    "as_call",
    "batch_count",
    "eval_mode",
    "find_layers",
    "limited_calls",
    "moments_to_stats",
    "progress_bar",
    "restore_stats",
    "run_pass",
    "shifted_sums",
    "snapshot_stats",
    "world",
]

log = logging.getLogger(__name__)

Use = Literal["batch", "new", "stored"]

# Longest row whose squares one float32 ``vector_norm`` call adds up. Torch's CPU kernel accumulates a row
# sequentially (one accumulator per SIMD lane), so its rounding error grows with the row: measured on ReLU-like
# data, the relative error of Σd² over a whole tensor is 3e-8 with rows of 64, 1.5e-7 at 256, 7e-7 at 784 and
# 1e-5 at 12544. Longer rows are split (see :func:`_norm_rows`).
_ROW = 256

# Largest (mean − shift)² / variance a batch's float32 sums are accepted with. Their relative error is ~2e-7 at
# worst (many equal values make the rounding errors of vector_norm's sequential float32 accumulation add up), and
# cancellation in ``var = Σd²/n − (Σd/n)²`` multiplies it by about 1 + 2·(mean − shift)²/var: measured worst
# 4.5e-7 at the bound, 1.4e-6 at 3 (tests/test_recalibrate.py::test_shifted_sums_precision_bound).
_TAU = 1.0
_TAU64 = 1e6  # the same for float64 sums (error ~1e-16 · (1 + 2·_TAU64))

# A float32 shift can only be as close to the mean as float32 resolves it: |mean − shift| below this fraction of
# |shift| is accepted whatever the variance (channels constant to float32 precision).
_RESOLUTION = 2.0 ** -20

# Per-batch sums kept before they are added up (bounded memory, few small operations inside the forward).
_PARTS = 256

_WIDE = (torch.float32, torch.float64)  # dtypes whose sums are taken without a float32 copy


# --------------------------------------------------------------------------------------------- the math


@functools.lru_cache(maxsize=1024)
def _norm_rows(length: int) -> int | None:
    """The row length the squares of a ``length``-long row are summed in: ``length`` itself up to ``_ROW``, else its
    largest divisor in ``[32, _ROW]``; ``None`` if it has none (then ``torch.sum`` of the squares, one pass more)."""
    if length <= _ROW:
        return length
    return next((m for m in range(_ROW, 31, -1) if length % m == 0), None)


def _check_input(x: torch.Tensor, channels: int) -> None:
    if x.dim() < 2 or x.shape[1] != channels:
        raise InputError(f"a BatchNorm of {channels} channels received a tensor of shape {tuple(x.shape)}",
                         hint="BatchNorm normalizes dim 1 of an (N, C, ...) input")


def shifted_sums(x: torch.Tensor, shift: torch.Tensor | None,
                 workspace: Workspace | None = None) -> tuple[int, torch.Tensor | None, torch.Tensor]:
    """``(n, d, sums)`` of one non-empty batch: ``n`` values per channel, ``sums = [Σ(x − shift); Σ(x − shift)²]``
    per channel (shape ``(2, C)``, float64) and ``d = x − shift`` viewed as ``(N, C, L)`` (``x`` itself when
    ``shift`` is ``None``; ``None`` for rows of one value, which are summed in float64 without it).

    ``shift`` (one float32 value per channel, or ``None`` for 0: no subtraction pass) should be near the channel
    means. The sums are taken per row ``d[n, c, :]`` in its dtype (``torch.sum``, and ``vector_norm`` over rows of
    at most ``_ROW`` values) and only the per-row results are added in float64: the relative error of float32 sums
    is ~1e-7 (~2e-7 at worst), and cancellation in ``var = Σd²/n − (Σd/n)²`` multiplies it by about
    ``1 + 2·(mean − shift)²/var``. Rows of one value (``(N, C)`` inputs) are summed exactly in float64.
    """
    batch, channels = x.shape[0], x.shape[1]
    rows = x.reshape(batch, channels, -1)
    length = rows.shape[2]
    if length == 1:  # (N, C): nothing to accumulate per row; float64 is exact and as cheap
        rows64 = rows.view(batch, channels).to(torch.float64)
        if shift is not None:
            rows64 = rows64 - shift.to(torch.float64)
        return batch, None, torch.stack((rows64, rows64 * rows64)).sum(1)
    d = rows
    if shift is not None:
        col = shift.view(channels, 1)
        out = None if workspace is None else \
            workspace.take(rows.shape, torch.promote_types(rows.dtype, col.dtype), x.device)
        d = torch.sub(rows, col, out=out)
    part = _norm_rows(length)
    if part == length:
        squares = torch.linalg.vector_norm(d, 2, -1).square_()
    elif part:
        squares = torch.linalg.vector_norm(d.view(batch, channels, length // part, part), 2, -1).square_().sum(-1)
    else:
        squares = (d * d).sum(-1)
    return batch * length, d, torch.stack((d.sum(-1), squares)).sum(1, dtype=torch.float64)


class Workspace:
    """One reusable buffer for ``x − shift``: a fresh activation-sized tensor per call costs page faults (measured:
    2–5 % of a whole recalibration of resnet50 / mobilenet_v3_small). Only valid until the next :meth:`take`."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffer
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffer = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


def moments_to_stats(n: int, sums: torch.Tensor, *, unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """From ``sums = [S; Q]``: ``mean = S / n``, ``var = (Q − S·mean) / (n − 1)`` (``/ n`` when not ``unbiased``),
    clamped at 0."""
    total, total_sq = sums[0], sums[1]
    mean = total / n
    var = torch.addcmul(total_sq, total, mean, value=-1.0).div_(n - 1 if unbiased else n)
    return mean, var.clamp_min_(0.0)


def _as_float64(shift: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if shift is None:
        return torch.zeros(like.shape[-1], dtype=torch.float64, device=like.device)
    return shift.detach().reshape(-1).to(torch.float64, copy=True)


@dataclass
class Moments:
    """Running ``(n, [S; Q])`` of one layer: float64 sums ``S = Σ(x − shift)``, ``Q = Σ(x − shift)²`` on the layer's
    device; ``source`` is the per-channel shift they are relative to (``None``: 0) and ``shift`` its float64 copy.
    Batches are appended and summed in groups of ``_PARTS``."""

    count: int
    parts: list[torch.Tensor]
    source: torch.Tensor | None
    shift: torch.Tensor

    @classmethod
    def zeros(cls, like: torch.Tensor, shift: torch.Tensor | None = None) -> Moments:
        """Nothing yet, relative to ``shift``, for the channels of ``like`` (a running mean)."""
        zeros = torch.zeros(2, like.numel(), dtype=torch.float64, device=like.device)
        return cls(0, [zeros], shift, _as_float64(shift, zeros))

    def add(self, n: int, sums: torch.Tensor, shift: torch.Tensor | None) -> None:
        """Add one batch's sums, taken relative to ``shift``."""
        if shift is not self.source:
            self.rebase(shift)
        self.count += n
        self.parts.append(sums)
        if len(self.parts) >= _PARTS:
            self.parts = [torch.stack(self.parts).sum(0)]

    @property
    def sums(self) -> torch.Tensor:
        """``[S; Q]``, shape ``(2, C)``."""
        if len(self.parts) > 1:
            self.parts = [torch.stack(self.parts).sum(0)]
        return self.parts[0]

    def rebase(self, shift: torch.Tensor | None) -> None:
        """Make the sums relative to another ``shift``: with ``δ = old − new``, ``Σ(x − new) = S + nδ`` and
        ``Σ(x − new)² = Q + δ·(2S + nδ)`` (float64; exact when nothing was added yet)."""
        shift64 = _as_float64(shift, self.parts[0])
        if self.count:
            total, total_sq = self.sums
            delta = self.shift - shift64
            self.parts = [torch.stack((total + self.count * delta,
                                       torch.addcmul(total_sq, delta, 2.0 * total + self.count * delta)))]
        self.source, self.shift = shift, shift64

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Population mean and unbiased variance (needs ``count ≥ 2``)."""
        mean, var = moments_to_stats(self.count, self.sums)
        return mean.add_(self.shift), var

    def pack(self, shift: torch.Tensor) -> torch.Tensor:
        """``[n, S, Q]`` flat, relative to ``shift`` (the same on every rank, so that packs add up)."""
        self.rebase(shift)
        sums = self.sums
        return torch.cat([sums.new_tensor([float(self.count)]), sums.reshape(-1)])

    def unpack(self, packed: torch.Tensor) -> None:
        """The sum of all ranks' packs (relative to the shift they were packed with)."""
        self.count = round(float(packed[0]))
        self.parts = [packed[1:].reshape(2, -1).clone()]


@dataclass(frozen=True)
class Measurement:
    """One batch at a layer's input: what :func:`shifted_sums` returns (``n``, ``d``, ``sums``), and the batch's
    ``mean`` (relative to the shift) and biased variance ``var``, float64."""

    n: int
    d: torch.Tensor | None
    sums: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor

    @classmethod
    def of(cls, n: int, d: torch.Tensor | None, sums: torch.Tensor) -> Measurement:
        mean, mean_sq = sums.div(n).unbind()
        return cls(n, d, sums, mean, torch.addcmul(mean_sq, mean, mean, value=-1.0))


# --------------------------------------------------------------------------------------------- layers


@dataclass(eq=False)
class BatchNormLayer:
    """One BatchNorm layer (possibly called at several sites) and what was measured at its input."""

    name: str
    kind: str
    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: float
    sites: int = 1
    moments: Moments = field(init=False)
    new_mean: torch.Tensor | None = None  # float64, set once the layer is final
    new_var: torch.Tensor | None = None
    first_call: float = math.inf  # position of its first call in a forward (execution order)
    calls_per_forward: set[int] = field(default_factory=set)
    shift: torch.Tensor | None = field(init=False)  # float32 per channel, subtracted before summing (None: 0)
    reference: torch.Tensor = field(init=False)  # float64 running mean before measuring: the same on every rank
    _slack: torch.Tensor = field(init=False)  # float64, (_RESOLUTION · shift)²

    def __post_init__(self) -> None:
        stored_mean = self.running_mean.detach().to(torch.float64, copy=True)
        self.reference = torch.nan_to_num(stored_mean, 0.0, 0.0, 0.0)
        self.moments = Moments.zeros(self.running_mean, self.reference)
        # First guess of the shift from the stored statistics: none if they say the input is centered (saves the
        # subtraction pass), else the stored mean. measure() corrects a wrong guess on the first batch.
        centered = bool((stored_mean.square() <= _TAU * self.running_var.detach().double()).all())
        self._set_shift(None if centered else self.reference.float())

    @property
    def channels(self) -> int:
        return self.running_mean.numel()

    @property
    def calls(self) -> int:
        """Largest number of calls in one forward (> 1: the layer is reused)."""
        return max(self.calls_per_forward, default=0)

    def measure(self, x: torch.Tensor, workspace: Workspace | None = None) -> Measurement | None:
        """The :func:`shifted_sums` of one input relative to :attr:`shift` (``None`` if the input is empty), with
        ``(mean − shift)² ≤ _TAU · var`` in every channel (``_TAU64`` for float64 sums), so that they are precise.

        If this batch is farther from the shift, the shift becomes this batch's mean and the sums are taken again:
        once per layer on stationary data, on the first batch, when the stored statistics were a poor guess.
        """
        _check_input(x, self.channels)
        if x.numel() == 0:
            return None
        if self.shift is None and x.dtype not in _WIDE:  # low precision: subtract (into float32) from the start
            self._set_shift(torch.zeros(self.channels, dtype=torch.float32, device=x.device))
        measured = Measurement.of(*shifted_sums(x, self.shift, workspace))
        tau = _TAU64 if measured.d is None or measured.d.dtype == torch.float64 else _TAU
        excess = torch.add(self._slack, measured.var, alpha=tau).addcmul_(measured.mean, measured.mean, value=-1.0)
        if not float(excess.min()) >= 0.0:  # also when NaN
            self._set_shift((measured.mean + _as_float64(self.shift, measured.mean)).float())
            measured = Measurement.of(*shifted_sums(x, self.shift, workspace))
        return measured

    def _set_shift(self, shift: torch.Tensor | None) -> None:
        self.shift = shift
        self._slack = torch.zeros_like(self.reference) if shift is None else (shift.double() * _RESOLUTION).square_()

    def reset_moments(self) -> None:
        self.moments = Moments.zeros(self.running_mean, self.shift)

    def finalize(self) -> None:
        if self.moments.count >= 2:
            self.new_mean, self.new_var = self.moments.stats()


def find_layers(model: nn.Module) -> list[BatchNormLayer]:
    """Every BatchNorm layer of ``model`` that has running statistics to recalibrate, in graph/module order."""
    layers: dict[int, BatchNormLayer] = {}
    if isinstance(model, torch.fx.GraphModule):
        for site in find_batchnorm_sites(model):
            rm, rv = site.running_mean, site.running_var
            if rm is None or rv is None:
                log.debug("BatchNorm at %s has no constant running statistics; not recalibrated", site.path)
                continue
            layer = layers.get(id(rm))
            if layer is None:
                layers[id(rm)] = BatchNormLayer(site.path, site.kind, rm, rv, site.eps)
            else:
                layer.sites += 1
    else:
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None \
                    and m.running_var is not None:
                layers[id(m.running_mean)] = BatchNormLayer(name, type(m).__name__, m.running_mean, m.running_var,
                                                            float(m.eps))
    return list(layers.values())


# --------------------------------------------------------------------------------------------- catching calls


@dataclass(frozen=True)
class _CallSpec:
    """Argument names of one batch-norm function, to bind ``(args, kwargs)`` to a flat positional list."""

    names: tuple[str, ...]
    defaults: Mapping[str, Any]
    input_at: int = field(init=False)
    running_mean_at: int = field(init=False)
    running_var_at: int = field(init=False)
    training_at: int | None = field(init=False)

    def __post_init__(self) -> None:
        for name in ("input", "running_mean", "running_var", "training"):
            object.__setattr__(self, f"{name}_at", self.names.index(name) if name in self.names else None)

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[Any] | None:
        if not kwargs and len(args) == len(self.names):  # the common case (nn.BatchNorm's own call)
            return list(args)
        values = list(args) + [inspect.Parameter.empty] * (len(self.names) - len(args))
        for key, value in kwargs.items():
            if key not in self.names:
                return None
            values[self.names.index(key)] = value
        for i, name in enumerate(self.names):
            if values[i] is inspect.Parameter.empty:
                if name not in self.defaults:
                    return None
                values[i] = self.defaults[name]
        return values


def _spec_of_op(op: Any) -> _CallSpec:
    args = op._schema.arguments
    return _CallSpec(tuple(a.name for a in args), {a.name: a.default_value for a in args if a.has_default_value()})


def _spec_of_function(fn: Any) -> _CallSpec:
    params = inspect.signature(fn).parameters.values()
    return _CallSpec(tuple(p.name for p in params),
                     {p.name: p.default for p in params if p.default is not inspect.Parameter.empty})


def _call_specs() -> dict[Any, _CallSpec]:
    aten = torch.ops.aten
    torch_names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                   "cudnn_enabled")
    specs: dict[Any, _CallSpec] = {F.batch_norm: _spec_of_function(F.batch_norm),
                                   torch.batch_norm: _CallSpec(torch_names, {})}
    for op in (aten.batch_norm.default, aten.native_batch_norm.default, aten._native_batch_norm_legit.default,
               aten._native_batch_norm_legit_no_training.default,
               aten._native_batch_norm_legit_functional.default):
        specs[op] = _spec_of_op(op)
    return specs


_SPECS = _call_specs()


class _StopForward(BaseException):  # BaseException: a model's `except Exception` must not swallow it
    """Raised after the last call of the layer a sequential pass measures: the rest of the forward is not needed."""


@dataclass
class Pass:
    """What each layer does during one pass over the data."""

    default: Use
    record: set[BatchNormLayer]
    use: dict[BatchNormLayer, Use] = field(default_factory=dict)
    stop_after: tuple[BatchNormLayer, int] | None = None  # (layer, its number of calls per forward)


class _Interceptor(TorchFunctionMode):
    """Answers the batch-norm calls of tracked layers according to the current :class:`Pass`."""

    def __init__(self, layers: list[BatchNormLayer], plan: Pass) -> None:
        super().__init__()
        self._by_buffer = {id(layer.running_mean): layer for layer in layers}
        self._layers = layers  # keeps the buffers (and so their ids) alive
        self.plan = plan
        self._calls: dict[BatchNormLayer, int] = {}
        self._order = 0
        self._workspace = Workspace()

    def begin_forward(self) -> None:
        self._calls = {}

    def end_forward(self) -> None:
        for layer, n in self._calls.items():
            layer.calls_per_forward.add(n)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        spec = _SPECS.get(func)
        if spec is None:
            return func(*args, **(kwargs or {}))
        values = spec.bind(args, kwargs or {})
        rm = values[spec.running_mean_at] if values is not None else None
        layer = self._by_buffer.get(id(rm)) if isinstance(rm, torch.Tensor) else None
        if layer is None or layer.running_mean is not rm:
            return func(*args, **(kwargs or {}))
        return self._answer(layer, func, spec, values)  # type: ignore[arg-type]

    def _answer(self, layer: BatchNormLayer, func: Any, spec: _CallSpec, values: list[Any]) -> Any:
        calls = self._calls.get(layer, 0) + 1
        self._calls[layer] = calls
        if layer.first_call == math.inf:
            layer.first_call = self._order
        self._order += 1
        plan = self.plan
        use = plan.use.get(layer, plan.default)
        record = layer in plan.record
        x = values[spec.input_at]
        mean, var = layer.running_mean, layer.running_var
        if use == "new" and layer.new_mean is not None and layer.new_var is not None:
            mean, var = layer.new_mean.to(mean.dtype), layer.new_var.to(var.dtype)
        if record or use == "batch":
            measured = layer.measure(x, self._workspace)
            if measured is not None and record:
                layer.moments.add(measured.n, measured.sums, layer.shift)
            if measured is not None and use == "batch" and measured.n >= 2:  # as training-mode BatchNorm does:
                batch_mean, batch_var = measured.mean, measured.var.clamp_min_(0.0)  # this batch, biased var
                if measured.d is not None and measured.d.dtype == x.dtype:  # normalize d = x − shift: no
                    values[spec.input_at] = measured.d.view(x.shape)  # rounding of shift + mean
                elif layer.shift is not None:
                    batch_mean = batch_mean + layer.shift.to(torch.float64)
                mean, var = batch_mean.to(mean.dtype), batch_var.to(var.dtype)
            elif measured is not None and use == "batch" and layer.moments.count >= 2:  # one value per channel:
                new_mean, new_var = layer.moments.stats()  # the estimate so far
                mean, var = new_mean.to(mean.dtype), new_var.to(var.dtype)
        values[spec.running_mean_at] = mean
        values[spec.running_var_at] = var
        if spec.training_at is not None:
            values[spec.training_at] = False
        out = func(*values)
        if plan.stop_after is not None and plan.stop_after == (layer, calls):
            raise _StopForward
        return out


# --------------------------------------------------------------------------------------------- running passes


def as_call(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
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


def _truncate(args: tuple[Any, ...], kwargs: dict[str, Any], size: int,
              keep: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    def cut(v: Any) -> Any:
        return v[:keep] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == size else v

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


Call = tuple[tuple[Any, ...], dict[str, Any]]


def limited_calls(batches: Iterable[Any], *, num_batches: int | None,
                  num_samples: int | None) -> Iterator[tuple[Call, int]]:
    """``(call arguments, samples)`` for each batch, stopping after ``num_batches`` batches or exactly
    ``num_samples`` samples (the last batch is cut to fit). Empty batches are skipped."""
    if isinstance(batches, (torch.Tensor, Mapping)):
        raise InputError(f"batches is a single {type(batches).__name__}; expected an iterable of batches",
                         hint="wrap one batch in a list: [x]")
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


def run_pass(model: nn.Module, layers: list[BatchNormLayer], plan: Pass, calls: Iterable[tuple[Call, int]],
             bar: Any, keep: list[tuple[Call, int]] | None = None) -> tuple[int, int]:
    """Run ``model`` on every batch with its BatchNorm calls answered according to ``plan``; return
    (batches, samples). ``keep`` (if given) collects the batches, for another pass."""
    interceptor = _Interceptor(layers, plan)
    batches = samples = 0
    with interceptor:
        for call, size in calls:
            args, kwargs = call
            interceptor.begin_forward()
            with contextlib.suppress(_StopForward):
                model(*args, **kwargs)
            interceptor.end_forward()
            if keep is not None:
                keep.append((call, size))
            batches += 1
            samples += size
            bar.update(1)
            bar.set_postfix(samples=samples, refresh=False)
    return batches, samples


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
    from tqdm import tqdm

    show = progress if progress is not None else sys.stderr.isatty()
    show = show and world()[1] == 0
    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, disable=not show, leave=False,
                dynamic_ncols=True)


# --------------------------------------------------------------------------------------------- state and ranks


def world() -> tuple[int, int]:
    """``(world_size, rank)`` of the default process group, ``(1, 0)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def all_reduce_layers(layers: list[BatchNormLayer], extra: list[float] | None = None) -> list[float]:
    """Sum every layer's ``(n, S, Q)`` (and ``extra`` counters) over all ranks in one all-reduce.

    Each rank's sums are first made relative to the layer's :attr:`BatchNormLayer.reference` (its running mean
    before measuring, the same on every rank), so that they add. Every rank must pass the same layers in the same
    order (they come from the same model).
    """
    extra = list(extra or [])
    if world()[0] == 1 or not layers:
        return extra
    device = layers[0].running_mean.device
    packed = torch.cat([layer.moments.pack(layer.reference) for layer in layers] +
                       [torch.tensor(extra, dtype=torch.float64, device=device)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    at = 0
    for layer in layers:
        size = 1 + 2 * layer.channels
        layer.moments.unpack(packed[at:at + size])
        at += size
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


def snapshot_stats(layers: list[BatchNormLayer]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every layer's running statistics (see :func:`restore_stats`)."""
    return [(layer.running_mean.detach().clone(), layer.running_var.detach().clone()) for layer in layers]


def restore_stats(layers: list[BatchNormLayer], snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for layer, (mean, var) in zip(layers, snapshot, strict=True):
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode (dropout off, BN reading its statistics) for the block; flags restored after."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(False)
    except NotImplementedError:  # torch.export's unlifted module refuses train(); its graph is fixed anyway
        for m, _ in flags:
            m.training = False
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training
