"""PyTorch → Relax: ``torch.export`` (optionally with a dynamic batch) then ``from_exported_program``.

Parameters stay *inputs* of the Relax ``main`` (``keep_params_as_input``) so the library and the weights are
saved separately; the input signature (shapes, dtypes, batch range, output structure) is recorded so the
artifact can refuse inputs it was not compiled for with a clear message.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import tvm
from torch import nn
from torch.utils import _pytree as pytree
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

from bnfold.errors import InputError

__all__ = ["Imported", "TensorSpec", "import_torch"]

log = logging.getLogger(__name__)

BATCH = "batch"


@dataclass(frozen=True)
class TensorSpec:
    """Shape (``"batch"`` for the dynamic dimension) and dtype of one input."""

    shape: tuple[int | str, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}


@dataclass
class Imported:
    """A Relax module with its weights and the signature it was exported with."""

    mod: tvm.IRModule
    params: list[torch.Tensor]
    inputs: list[TensorSpec]
    batch_range: tuple[int, int] | None
    out_spec: str | None = None  # torch pytree spec (JSON), None = flat tuple
    num_outputs: int = 1
    notes: list[str] = field(default_factory=list)


def _as_module(model: nn.Module | torch.export.ExportedProgram) -> nn.Module:
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()
    if not isinstance(model, nn.Module):
        raise InputError(f"expected an nn.Module or ExportedProgram, got {type(model).__name__}")
    return model


def _export_inputs(inputs: tuple[torch.Tensor, ...], batch_range: tuple[int, int] | None) -> tuple[torch.Tensor, ...]:
    """Example inputs for export: with a dynamic batch, a batch of 2 (torch.export specializes sizes 0 and 1)."""
    if batch_range is None:
        return inputs
    lo, hi = batch_range
    if not 1 <= lo <= hi:
        raise InputError(f"dynamic batch range {lo}..{hi} is empty or starts below 1", hint="e.g. (1, 32)")
    if hi < 2:
        raise InputError(f"dynamic batch range {lo}..{hi} allows a single size: compile with a static batch "
                         "instead", hint="leave dynamic_batch unset")
    b = max(2, lo)
    out = []
    for t in inputs:
        if t.dim() == 0:
            raise InputError("a dynamic batch needs every input to have a batch dimension (dim 0)")
        rep = [1] * t.dim()
        rep[0] = -(-b // t.shape[0]) if t.shape[0] else b
        out.append(t.repeat(*rep)[:b].contiguous())
    return tuple(out)


def import_torch(model: nn.Module | torch.export.ExportedProgram, example_inputs: Sequence[torch.Tensor], *,
                 batch_range: tuple[int, int] | None = None) -> Imported:
    """Export ``model`` (eval mode, on CPU) and translate it to Relax."""
    inputs = tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise InputError("example inputs must be a non-empty sequence of tensors")
    module = _as_module(model)
    with contextlib.suppress(NotImplementedError):  # ep.module() refuses eval(): it is inference-only already
        module = module.eval()
    ex_inputs = _export_inputs(tuple(t.detach().cpu() for t in inputs), batch_range)
    dynamic_shapes = None
    if batch_range is not None:
        dim = torch.export.Dim(BATCH, min=batch_range[0], max=batch_range[1])
        dynamic_shapes = tuple({0: dim} for _ in ex_inputs)
    try:
        ep = torch.export.export(module, ex_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        raise InputError(f"torch.export could not export the model: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}",
                         hint="with a dynamic batch the model must not specialize on the batch size") from exc
    try:
        mod = from_exported_program(ep, keep_params_as_input=True)
    except Exception as exc:
        raise InputError(f"TVM's Relax frontend cannot translate this model: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}",
                         hint="the error names the unsupported operator; fold/compile a model without it") from exc
    mod, params = relax.frontend.detach_params(mod)
    weights = [torch.from_numpy(p.numpy()).clone() for p in params.get("main", [])]
    specs = [TensorSpec(tuple(BATCH if (batch_range and i == 0) else int(s) for i, s in enumerate(t.shape)),
                        str(t.dtype).replace("torch.", "")) for t in ex_inputs]
    out_spec = _dump_spec(ep)
    num_outputs = len(ep.graph_signature.user_outputs)
    return Imported(mod, weights, specs, batch_range, out_spec, num_outputs)


def _dump_spec(ep: torch.export.ExportedProgram) -> str | None:
    try:
        return pytree.treespec_dumps(ep.call_spec.out_spec)
    except Exception:  # custom output classes: the artifact returns a flat tuple instead
        log.info("output structure %s is not serializable; the artifact returns a tuple", ep.call_spec.out_spec)
        return None
