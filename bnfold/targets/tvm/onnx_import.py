"""ONNX → Relax: ``tvm.relax.frontend.onnx.from_onnx`` for ``bnfold compile MODEL.onnx`` (the folded graph).

Like :func:`bnfold.targets.tvm.importer.import_torch`, the weights stay inputs of ``main`` (``keep_params_in_input``)
so the library and the weights are saved separately; the input signature is the example inputs' shapes. With
``batch_range=(lo, hi)`` dimension 0 of every input is one symbolic size ``batch`` (a ``tir`` variable handed to
the frontend in ``shape_dict``, bounded by ``tir_var_lower_bound``/``tir_var_upper_bound`` as the torch importer's
``torch.export`` range constraints are), so one build runs every batch size in the range.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import torch
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from bnfold.errors import InputError
from bnfold.targets.tvm.importer import BATCH, Imported, TensorSpec

__all__ = ["import_onnx"]


def _size_var() -> object:
    import tvm

    tir = getattr(tvm, "tirx", None) or tvm.tir  # TVM renamed tir → tirx
    return tir.Var(BATCH, "int64")


def import_onnx(model: onnx.ModelProto, example_inputs: Sequence[torch.Tensor], *,
                batch_range: tuple[int, int] | None = None) -> Imported:
    """Translate ``model`` to Relax for inputs shaped like ``example_inputs`` (one per graph input), with a
    dynamic batch in ``batch_range`` when given."""
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    inputs = tuple(example_inputs)
    if len(names) != len(inputs):
        raise InputError(f"the ONNX model takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}")
    if batch_range is not None:
        lo, hi = batch_range
        if not 1 <= lo <= hi or hi < 2:
            raise InputError(f"dynamic batch range {lo}..{hi} is empty, starts below 1 or allows a single size",
                             hint="e.g. (1, 32), or compile a static batch")
        if any(t.dim() == 0 for t in inputs):
            raise InputError("a dynamic batch needs every input to have a batch dimension (dim 0)")
        batch = _size_var()
        shapes = {n: [batch, *t.shape[1:]] for n, t in zip(names, inputs, strict=True)}
    else:
        shapes = {n: list(t.shape) for n, t in zip(names, inputs, strict=True)}
    dtypes = {n: str(t.dtype).removeprefix("torch.") for n, t in zip(names, inputs, strict=True)}
    try:
        mod = from_onnx(model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=True)
    except Exception as exc:
        raise InputError(f"TVM's Relax ONNX frontend cannot translate this model: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}",
                         hint="the error names the unsupported operator") from exc
    if batch_range is not None:
        main = mod["main"].with_attr("tir_var_lower_bound", {BATCH: batch_range[0]})
        mod["main"] = main.with_attr("tir_var_upper_bound", {BATCH: batch_range[1]})
    mod, params = relax.frontend.detach_params(mod)
    weights = [torch.from_numpy(p.numpy()).clone() for p in params.get("main", [])]
    specs = [TensorSpec(tuple(BATCH if (batch_range and i == 0) else int(s) for i, s in enumerate(t.shape)),
                        dtypes[n]) for n, t in zip(names, inputs, strict=True)]
    notes = ["imported from ONNX (tvm.relax.frontend.onnx.from_onnx)"]
    if batch_range is not None:
        notes.append(f"dynamic batch {batch_range[0]}..{batch_range[1]} (the ONNX inputs' dimension 0)")
    return Imported(mod, weights, specs, batch_range, None, len(model.graph.output), notes=notes)
