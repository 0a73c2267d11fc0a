"""The pass/fail rule's numbers: unit roundoffs, the floor of the float64-reference rule and its depth
(:class:`Tolerance`; the rule itself is stated in :mod:`bnfold.parity`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

__all__ = ['FLOOR_ROUNDOFFS', 'Tolerance', 'accumulation_roundoff', 'rounding_depth', 'storage_roundoff']


FLOOR_ROUNDOFFS = 16.0
"""``k`` of the floor ``(k · u + u_s) · √D · rms(t)`` (module docstring): roundoffs per layer a kernel choice may
cost."""


def storage_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff ``u_s`` of ``dtype`` itself (``finfo.eps / 2``; 0 for non-floating types)."""
    return torch.finfo(dtype).eps / 2 if dtype.is_floating_point else 0.0


def accumulation_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff ``u`` of the precision kernels accumulate in for outputs of ``dtype``: 2⁻⁵³ for float64,
    2⁻²⁴ for everything else (fp32, and fp16/bf16, which CPU kernels accumulate in fp32)."""
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def rounding_depth(model: Any) -> int:
    """``D`` of the float64-rule floor: the number of weight tensors of rank ≥ 2 in ``model`` (parameters and
    buffers: conv, linear, embedding and attention weights — the layers whose accumulation order a kernel
    chooses), at least 1; 1 for anything that is not a torch module."""
    if not isinstance(model, torch.nn.Module):
        return 1
    seen: set[int] = set()
    depth = 0
    for t in (*model.parameters(), *model.buffers()):
        if t.dim() >= 2 and t.is_floating_point() and id(t) not in seen:
            seen.add(id(t))
            depth += 1
    return max(depth, 1)


@dataclass(frozen=True)
class Tolerance:
    """Parameters of the pass/fail rules (module docstring).

    ``multiplier``/``floor``/``depth``: the float64-reference rule, ``rmse(c, t) ≤ multiplier · rmse(r, t) +
    floor · √depth · rms(t)`` (``floor`` = ``k · u + u_s`` per layer, ``depth`` = ``D``; ``storage`` = the
    ``u_s`` part of ``floor``, replaced by the measured noise when it is larger: :meth:`bound`); ``rtol``/``atol``: the
    elementwise view (defaults of ``torch.testing.assert_close``); ``batch_rtol``: the batch-independence check
    (``rms(y_alone − y_in_batch) ≤ batch_rtol · rms(y_in_batch)``).
    """

    multiplier: float = 2.0
    floor: float = (FLOOR_ROUNDOFFS + 1.0) * 2.0**-24
    rtol: float = 1.3e-6
    atol: float = 1e-5
    batch_rtol: float = 1e-4
    depth: int = 1
    storage: float = 2.0**-24

    @property
    def relative_floor(self) -> float:
        """``floor · √depth``: the floor as a fraction of ``rms(t)``."""
        return self.floor * math.sqrt(max(self.depth, 1))

    def bound(self, reference_rmse: float, target_rms: float, storage_noise: float | None = None) -> float:
        """The float64 rule's bound on ``rmse(c, t)``: ``multiplier · rmse(r, t) + relative_floor · rms(t)``;
        with a measured storage noise ``S`` (:func:`bnfold.parity.noise.storage_noise64`), the floor's storage
        part ``storage · √depth · rms(t)`` becomes ``max(storage · √depth · rms(t), multiplier · S)``."""
        if storage_noise is None:
            return self.multiplier * reference_rmse + self.relative_floor * target_rms
        root = math.sqrt(max(self.depth, 1))
        storage = max(self.storage * root * target_rms, self.multiplier * storage_noise)
        return self.multiplier * reference_rmse + (self.floor - self.storage) * root * target_rms + storage

    @staticmethod
    def for_dtype(dtype: torch.dtype, depth: int = 1) -> Tolerance:
        """Defaults per dtype for a model of ``depth`` accumulating layers; ``rtol``/``atol`` equal
        ``torch.testing.assert_close``'s."""
        floor = FLOOR_ROUNDOFFS * accumulation_roundoff(dtype) + storage_roundoff(dtype)
        if dtype in (torch.float16, torch.bfloat16):
            rtol = 1e-3 if dtype == torch.float16 else 1.6e-2
            return Tolerance(multiplier=3.0, floor=floor, rtol=rtol, atol=1e-5, batch_rtol=1e-2, depth=depth,
                             storage=storage_roundoff(dtype))
        if dtype == torch.float64:
            return Tolerance(multiplier=2.0, floor=floor, rtol=1e-7, atol=1e-7, batch_rtol=1e-8, depth=depth,
                             storage=storage_roundoff(dtype))
        if not dtype.is_floating_point and not dtype.is_complex:
            return Tolerance(multiplier=2.0, floor=0.0, rtol=0.0, atol=0.0, batch_rtol=0.0, depth=depth, storage=0.0)
        return Tolerance(floor=floor, depth=depth, storage=storage_roundoff(dtype))
