"""Batch independence: a candidate's output for a sample must not change when the rest of the batch changes
(it does when a BatchNorm is left in training mode).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from bnfold.parity.inputs import Batch, flatten_outputs
from bnfold.parity.tolerance import Tolerance

__all__ = ['BatchIndependence', 'check_batch_independence']

log = logging.getLogger(__name__)


@dataclass
class BatchIndependence:
    """Does the candidate's output for sample 0 change when every other sample of the batch is replaced by a
    copy of it? (Same batch size, so fixed-shape artifacts can run it.) ``checked`` is False when no batch had
    two samples or no output is batched; then ``passed`` is True and ``note`` says why."""

    checked: bool
    passed: bool
    batch_size: int = 0
    max_abs: float = 0.0
    rel_rms: float = 0.0
    threshold: float = 0.0
    reference_passed: bool | None = None
    note: str = ""


def _batch_dim(batch: Batch) -> int | None:
    sizes = [t.shape[0] for t in batch if t.dim() > 0]
    return int(sizes[0]) if sizes else None


def _batch_deviation(fn: Callable[..., Any], batch: Batch, n: int) -> tuple[float, float, torch.dtype] | None:
    """(max |Δ|, rms(Δ)/rms(y)) between sample 0 in ``batch`` and sample 0 in a batch of copies of it."""
    copies = tuple(t[:1].expand(t.shape).contiguous() if t.dim() > 0 and t.shape[0] == n else t for t in batch)
    with torch.no_grad():
        full = flatten_outputs(fn(*batch))
        alone = flatten_outputs(fn(*copies))
    worst: tuple[float, float, torch.dtype] | None = None
    for y, z in zip(full, alone, strict=False):
        if y.dim() == 0 or y.shape[0] != n or tuple(y.shape) != tuple(z.shape):
            continue
        a, b = y[:1].detach().double().cpu(), z[:1].detach().double().cpu()
        d = (a - b).nan_to_num(nan=math.inf)
        scale = float(torch.sqrt(torch.mean(a.nan_to_num() ** 2)))
        rel = float(torch.sqrt(torch.mean(d**2))) / scale if scale > 0 else float(torch.sqrt(torch.mean(d**2)))
        cur = (float(d.abs().max()), rel, y.dtype)
        if worst is None or cur[1] > worst[1]:
            worst = cur
    return worst


def check_batch_independence(candidate: Callable[..., Any], batches: Sequence[Batch], *,
                             reference: Callable[..., Any] | None = None,
                             tolerance: Tolerance | None = None) -> BatchIndependence:
    """Check that ``candidate``'s output for a sample does not depend on the rest of its batch.

    Uses the first batch with at least two samples (dimension 0 of the first input). Fails when
    ``rms(y₀(copies) − y₀(batch)) > batch_rtol · rms(y₀(batch))``. When the candidate fails and ``reference``
    is given, the reference is checked too: if it depends on the batch as well, the candidate only reproduces
    it (``passed`` stays True, ``note`` says so).
    """
    batch = next((b for b in batches if (_batch_dim(b) or 0) >= 2), None)
    if batch is None:
        return BatchIndependence(False, True, note="skipped: no input batch has two or more samples")
    n = _batch_dim(batch) or 0
    try:
        dev = _batch_deviation(candidate, batch, n)
    except Exception as exc:  # a diagnosis aid: never hide the verdict on the outputs
        log.debug("batch-independence run failed", exc_info=True)
        return BatchIndependence(False, True, n, note=f"skipped: the candidate failed on a batch of copies "
                                                      f"({type(exc).__name__}: {exc})")
    if dev is None:
        return BatchIndependence(False, True, n, note="skipped: no output has the batch dimension first")
    max_abs, rel, dtype = dev
    thr = (tolerance or Tolerance.for_dtype(dtype)).batch_rtol
    result = BatchIndependence(True, rel <= thr, n, max_abs, rel, thr)
    if not result.passed:
        result.note = ("the output for a sample changes with the rest of its batch: is a BatchNorm (or dropout) "
                       "still in training mode?")
        if reference is not None:
            ref_dev = _batch_deviation(reference, batch, n)
            result.reference_passed = ref_dev is None or ref_dev[1] <= thr
            if not result.reference_passed:
                result.passed = True
                result.note = ("the reference depends on the batch too (training-mode BatchNorm?); the candidate "
                               "reproduces it")
    return result
