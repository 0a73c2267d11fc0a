"""The reasons users read when a fold is declined, shared by every graph back end (torch.fx and ONNX).

Each function words one situation; the back end supplies how it names ops (``describe``) and values. Two back ends
that meet the same situation say the same thing, so a report reads alike whatever the model's format.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bnfold.ir.affine_math import bn_affine

__all__ = [
    "Fail",
    "batchnorm_affines",
    "batchnorm_problem",
    "consumer_axis",
    "consumer_channels",
    "consumer_not_linear",
    "consumer_other_argument",
    "not_a_linear_output",
    "producer_axis",
    "producer_channels",
    "producer_shared",
    "shift_blocked",
    "unusable",
]


@dataclass(frozen=True)
class Fail:
    """A check that failed: ``reason`` a user can act on (it lands in the report), and the ``node`` it is about when
    that is not the candidate itself (the producer that cannot be rewritten, the op an affine does not cross).

    Every check and predicate of every back end returns a plan or a ``Fail`` (as onnxscript's ``MatchResult.fail``);
    a ``str`` is never both a reason and a plan, and no caller reads the reason to decide what to do next."""

    reason: str
    node: str | None = None

    def __str__(self) -> str:
        return self.reason

    def prefixed(self, prefix: str) -> Fail:
        """The same failure, its reason said after ``prefix`` (``"through 'pool': "``)."""
        return Fail(prefix + self.reason, self.node)


def not_a_linear_output(what: str) -> str:
    """``A(x)`` where ``x`` is ``what`` (a graph input, ``'relu_3' (relu)``)."""
    return f"its input is {what}, not a conv/linear output"


def unusable(role: str, name: str, reason: str) -> str:
    """The producer/consumer ``name`` matched but cannot be rewritten (its weight is computed, …)."""
    return f"{role} '{name}' cannot be rewritten: {reason}"


def producer_shared(op: str, users: str) -> str:
    return f"producer {op} also feeds {users}; folding would change those paths too"


def producer_axis(axis: int, op: str) -> str:
    return f"it normalizes axis {axis}, but {op} has its channels on another axis"


def producer_channels(channels: int, op: str, out_channels: int) -> str:
    return f"channel count {channels} ≠ {op} output channels {out_channels}"


def consumer_not_linear(user: str, what: str) -> str:
    return f"it feeds '{user}' ({what}), which is not a conv/linear"


def consumer_other_argument(op: str) -> str:
    return f"it reaches {op} through an argument other than its input"


def consumer_axis(axis: int, op: str) -> str:
    return f"it normalizes axis {axis}, but {op} reads channels on another axis"


def consumer_channels(channels: int, op: str, in_channels: int) -> str:
    return f"channel count {channels} ≠ {op} input channels {in_channels}"


def shift_blocked(op: str, scale: torch.Tensor) -> str:
    """Why an affine in front of a zero-padding consumer ``op`` stays: its scale is all ones (nothing to fold but
    the shift) or has zeros (the shift cannot move before the scale)."""
    why = "its shift would be added to the zero padding" if bool((scale == 1).all()) else \
        "its scale has zeros, so the shift cannot be moved before the scale"
    return (f"{op} pads with zeros (or is transposed); {why}. Use padding_mode "
            "'replicate'/'reflect' or padding 0 to fold it fully")


def batchnorm_problem(path: str, running_mean: torch.Tensor, running_var: torch.Tensor,
                      weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor] | Fail:
    """``(a, b)`` of an inference BatchNorm (:func:`~bnfold.ir.affine_math.bn_affine`, float64), or why its
    statistics cannot be folded. Fast path: they are fine when ``a`` and ``b`` are finite and ``0 ≤ σ² < ∞``
    (every non-finite input shows up in one of them); only a failing one is examined input by input."""
    if math.isfinite(eps) and running_var.numel() > 0:
        a, b = bn_affine(running_mean, running_var, weight, bias, eps)
        lo, hi = torch.aminmax(running_var.detach())
        if float(lo) >= 0 and math.isfinite(float(hi)) and bool(torch.isfinite(a).all()) \
                and bool(torch.isfinite(b).all()):
            return a, b
    var = running_var.detach().double()
    tensors = [running_mean, running_var, weight, bias]
    if not all(bool(torch.isfinite(t.detach()).all()) for t in tensors if t is not None):
        return Fail(f"'{path}' has non-finite (NaN/Inf) statistics or parameters; recalibrate it first")
    if bool((var < 0).any()):
        return Fail(f"'{path}' has a negative running_var; its statistics are corrupt, recalibrate first")
    if bool((var + eps <= 0).any()) or not math.isfinite(eps):
        return Fail(f"'{path}' has running_var + eps = 0 in some channel (division by zero)")
    return Fail(f"'{path}' has statistics whose affine form overflows (a or b is not finite)")


BatchNormStats = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, float]
"""A BatchNorm's ``(running_mean, running_var, weight, bias, eps)``."""


def batchnorm_affines(stats: Sequence[BatchNormStats]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """For each BatchNorm, ``(a, b)`` when :func:`batchnorm_problem`'s fast path accepts its statistics, else None
    (:func:`batchnorm_problem` then says why, or computes it alone).

    All of them at once: the statistics of the BatchNorms on one device, with one channel count everywhere (the
    usual case), are concatenated into float64 vectors and :func:`~bnfold.ir.affine_math.bn_affine` and the checks
    run once over all channels — elementwise, so each ``(a, b)`` has the bits computing it alone gives. Per-layer
    tensor operations cost more than the arithmetic on a model's few thousand channels; this makes them a few
    dozen in all."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(stats)
    if not stats:
        return out
    device = stats[0][1].device
    batch = [i for i, (mean, var, w, b, eps) in enumerate(stats)
             if math.isfinite(eps) and var.dim() == 1 and var.numel() > 0 and var.device == device
             and all(t is None or (t.shape == var.shape and t.device == device) for t in (mean, w, b))]
    if not batch:
        return out
    f64 = torch.float64
    counts = [stats[i][1].numel() for i in batch]

    def joined(k: int, fill: float) -> torch.Tensor:
        parts = [stats[i][k] for i in batch]
        return torch.cat([torch.full((n,), fill, dtype=f64, device=device) if t is None else t.detach()
                          for t, n in zip(parts, counts, strict=True)]).to(f64)

    mean, var, gamma, beta = joined(0, 0.0), joined(1, 0.0), joined(2, 1.0), joined(3, 0.0)
    eps = torch.repeat_interleave(torch.tensor([stats[i][4] for i in batch], dtype=f64, device=device),
                                  torch.tensor(counts, device=device))
    a = gamma / torch.sqrt(var + eps)
    b = beta - mean * a
    bad_channels = ~((var >= 0) & torch.isfinite(var) & torch.isfinite(a) & torch.isfinite(b))
    ends = torch.tensor(counts).cumsum(0)
    bad = set(torch.searchsorted(ends, bad_channels.nonzero().flatten().cpu(), right=True).tolist())
    start = 0
    for k, (i, n) in enumerate(zip(batch, counts, strict=True)):
        if k not in bad:
            out[i] = (a[start:start + n], b[start:start + n])
        start += n
    return out
