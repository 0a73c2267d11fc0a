"""ONNX → Relax: ``tvm.relax.frontend.onnx.from_onnx`` for ``bnfold compile MODEL.onnx`` (the folded graph).

Like :func:`bnfold.targets.tvm.importer.import_torch`, the weights stay inputs of ``main`` (``keep_params_in_input``)
so the library and the weights are saved separately; the input signature is the example inputs' shapes (the
batch fixed at the example's size: a dynamic ONNX batch is compiled for that size).
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import torch
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from bnfold.errors import InputError
from bnfold.targets.tvm.importer import Imported, TensorSpec

__all__ = ["import_onnx"]


def import_onnx(model: onnx.ModelProto, example_inputs: Sequence[torch.Tensor]) -> Imported:
    """Translate ``model`` to Relax for inputs shaped like ``example_inputs`` (one per graph input)."""
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    inputs = tuple(example_inputs)
    if len(names) != len(inputs):
        raise InputError(f"the ONNX model takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}")
    shapes = {n: list(t.shape) for n, t in zip(names, inputs, strict=True)}
    dtypes = {n: str(t.dtype).removeprefix("torch.") for n, t in zip(names, inputs, strict=True)}
    try:
        mod = from_onnx(model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=True)
    except Exception as exc:
        raise InputError(f"TVM's Relax ONNX frontend cannot translate this model: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}",
                         hint="the error names the unsupported operator") from None
    mod, params = relax.frontend.detach_params(mod)
    weights = [torch.from_numpy(p.numpy()).clone() for p in params.get("main", [])]
    specs = [TensorSpec(tuple(int(s) for s in t.shape), dtypes[n]) for n, t in zip(names, inputs, strict=True)]
    return Imported(mod, weights, specs, None, None, len(model.graph.output),
                    notes=["imported from ONNX (tvm.relax.frontend.onnx.from_onnx)"])
