"""The measured storage noise ``S`` of the float64-reference rule for fp16/bf16 references (stated in
:mod:`bnfold.parity`): what one storage rounding of every layer tensor does to the model's outputs on the user's
inputs, measured on float64 copies with seeded random perturbations.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from bnfold.parity.inputs import Batch, batch_to_float64, run_batches, to_float64
from bnfold.parity.tolerance import storage_roundoff

__all__ = ["STORAGE_DRAWS", "storage_noise64"]

log = logging.getLogger(__name__)

STORAGE_DRAWS = 4
"""Seeded draws of the storage-rounding perturbation pooled into the storage noise ``S``."""


def storage_noise64(reference: Any, batches: Sequence[Batch], draws: int = STORAGE_DRAWS, seed: int = 0
                    ) -> list[list[list[torch.Tensor]]]:
    """Outputs (per draw, per batch) of float64 copies of ``reference`` whose layer tensors are each multiplied
    by ``1 + δ``, ``δ`` uniform in ``[−u_s, u_s]`` per element (``u_s`` of the reference's own dtype): the
    noise that one storage rounding of every weight a fold may rewrite causes on this model and these inputs
    (the rule in :mod:`bnfold.parity`). Layer tensors: every floating parameter and buffer of each module that
    holds a tensor of rank ≥ 2 (conv/linear/embedding weights and their biases — the layers
    :func:`~bnfold.parity.tolerance.rounding_depth` counts).
    Empty unless ``reference`` is a module holding fp16/bf16 tensors (for fp32, ``u_s = u`` is in the floor), or
    when a copy cannot run."""
    if not isinstance(reference, torch.nn.Module):
        return []
    reduced = [t.dtype for t in (*reference.parameters(), *reference.buffers())
               if t.dtype in (torch.float16, torch.bfloat16)]
    if not reduced:
        return []
    u_s = max(storage_roundoff(d) for d in reduced)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(draws):
        try:
            noisy = to_float64(reference)
            with torch.no_grad():
                for t in _layer_tensors(noisy):
                    t.mul_(1 + u_s * (2 * torch.rand(t.shape, generator=gen, dtype=t.dtype) - 1).to(t.device))
            out.append(run_batches(noisy, [batch_to_float64(b) for b in batches]))
        except Exception:  # the float64 reference itself could not run: the note comes from run_reference64
            log.debug("storage-noise run failed", exc_info=True)
            return []
    return out


def _layer_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The floating tensors of every module that directly holds one of rank ≥ 2 (each tensor once)."""
    seen: set[int] = set()
    out = []
    for mod in model.modules():
        own = [t for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False)) if t.is_floating_point()]
        if any(t.dim() >= 2 for t in own):
            for t in own:
                if id(t) not in seen and t.numel():
                    seen.add(id(t))
                    out.append(t)
    return out
