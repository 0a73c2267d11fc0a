"""The measured storage noise ``S`` of the float64-reference rule for fp16/bf16 references (stated in
:mod:`bnfold.parity`): what one storage rounding of every layer tensor does to the model's outputs on the user's
inputs, measured on float64 copies with seeded random perturbations.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from bnfold.parity.inputs import Batch, Mapped, batch_to_float64, run_batches, to_float64
from bnfold.parity.tolerance import storage_roundoff

__all__ = ["STORAGE_DRAWS", "storage_noise64"]

log = logging.getLogger(__name__)

STORAGE_DRAWS = 4
"""Seeded draws of the storage-rounding perturbation; the storage noise ``S`` is the largest of their rmses."""


def storage_noise64(reference: Any, batches: Iterable[Batch], draws: int = STORAGE_DRAWS, seed: int = 0
                    ) -> list[list[list[torch.Tensor]]]:
    """Outputs (per draw, per batch) of float64 copies of ``reference`` whose layer tensors are each multiplied
    by ``1 + δ``, ``δ`` uniform in ``[−u_s, u_s]`` per element (``u_s`` of the reference's own dtype), and whose
    computing leaf modules' outputs are rounded the same way: the noise that one storage rounding of every weight a fold
    may rewrite, and of every layer output a run stores, causes on this model and these inputs (the rule in
    :mod:`bnfold.parity`) — the typical size of what the reference's own error is one draw of. Layer tensors:
    every floating parameter and buffer of each module that holds a tensor of rank ≥ 2 (conv/linear/embedding
    weights and their biases — the layers :func:`~bnfold.parity.tolerance.rounding_depth` counts).
    Empty when ``reference`` is not a module with floating tensors, or when a copy cannot run. Callers measure it
    only when the analytic bound does not already pass (:func:`~bnfold.parity.core.compare`): it costs
    :data:`STORAGE_DRAWS` float64 forward runs."""
    if not isinstance(reference, torch.nn.Module):
        return []
    dtypes = {t.dtype for t in (*reference.parameters(), *reference.buffers()) if t.is_floating_point()}
    if not dtypes:
        return []
    u_s = max(storage_roundoff(d) for d in dtypes)
    gen = torch.Generator().manual_seed(seed)
    batches64 = Mapped(batches, batch_to_float64)  # one float64 batch at a time
    out = []
    for _ in range(draws):
        try:
            noisy = to_float64(reference)
            with torch.no_grad():
                for t in _layer_tensors(noisy):
                    t.mul_(_relative_noise(t, u_s, gen))
            hooks = [m.register_forward_hook(_output_rounding(u_s, gen)) for m in _leaf_modules(noisy)]
            try:
                out.append(run_batches(noisy, batches64))
            finally:
                for h in hooks:
                    h.remove()
        except Exception:  # the float64 reference itself could not run: the note comes from run_reference64
            log.debug("storage-noise run failed", exc_info=True)
            return []
    return out


def _relative_noise(t: torch.Tensor, u: float, gen: torch.Generator) -> torch.Tensor:
    """``1 + δ`` with ``δ`` uniform in ``[−u, u]`` per element (one rounding to a unit roundoff ``u``)."""
    return (1 + u * (2 * torch.rand(t.shape, generator=gen, dtype=torch.float64) - 1)).to(t.dtype).to(t.device)


def _output_rounding(u: float, gen: torch.Generator) -> Any:
    """A forward hook that rounds a module's floating output once, in the sense of :func:`_relative_noise`."""
    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            return output * _relative_noise(output, u, gen)
        return output
    return hook


def _leaf_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Leaf modules that compute with tensors of their own (conv, linear, norms): the layers whose outputs a real
    run rounds into the model's dtype. Parameter-free layers (ReLU, Flatten, max pooling, Identity) mostly move
    or select values exactly and are left alone."""
    return [m for m in model.modules() if m is not model and not any(True for _ in m.children())
            and any(True for _ in (*m.parameters(recurse=False), *m.buffers(recurse=False)))]


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
