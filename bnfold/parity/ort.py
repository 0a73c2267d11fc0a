"""Parity of an ONNX fold with ONNX Runtime: the original file vs the folded one, judged by :func:`bnfold.parity.judge`.

Inputs: the user's batches, or — when none are given — seeded random ones shaped from the model's declared inputs,
every dynamic dimension set to a small number (:data:`DYNAMIC_DIM`); the report says which.

The float64 reference is built from the ONNX graph itself: every floating initializer, ``Constant``, ``Cast`` target,
input, output and ``value_info`` of the original model becomes ``DOUBLE``, and ONNX Runtime runs that copy on the
inputs cast to float64. ONNX Runtime's CPU provider has no double kernel for some ops (``Conv``, ``ConvTranspose``,
pools, …); then the double copy runs in ONNX's reference evaluator (``onnx.reference``, exact float64 numpy) when the
model is small enough (:data:`REFERENCE_EVAL_MACS` multiply-adds per batch), and otherwise parity falls back to the
elementwise ``assert_close`` tolerances. The report's notes name the ops that blocked ONNX Runtime and what was used.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

import numpy as np
import onnx
import torch

from bnfold.parity import ParityReport, judge, run_batches

__all__ = ["DYNAMIC_DIM", "OrtModel", "float64_copy", "onnx_parity", "random_onnx_inputs"]

log = logging.getLogger(__name__)

DYNAMIC_DIM = 2
"""Size given to every dynamic dimension of a random input (batch 2: a batch-dependence shows)."""

REFERENCE_EVAL_MACS = 2e10
"""Most multiply-adds (convs/matmuls, all batches) that ``onnx.reference`` runs as the float64 reference (~10 s)."""

NUMPY_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
       onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32,
       onnx.TensorProto.BOOL: np.bool_, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8}
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


class OrtModel:
    """An in-memory ONNX model run by ONNX Runtime on the CPU, callable on torch tensors (outputs as torch)."""

    def __init__(self, model: onnx.ModelProto | str | os.PathLike[str], *, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        source = str(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.inputs = self.session.get_inputs()

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feed = {spec.name: t.detach().cpu().contiguous().numpy() for spec, t in zip(self.inputs, inputs, strict=True)}
        return tuple(torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feed))


class _ReferenceEvaluator:
    """``onnx.reference`` on a model, callable on torch tensors (float64 reference when ORT has no kernels)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from onnx.reference import ReferenceEvaluator

        self.names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        self.evaluator = ReferenceEvaluator(model)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feed = {n: t.detach().cpu().numpy() for n, t in zip(self.names, inputs, strict=True)}
        return tuple(torch.from_numpy(np.asarray(o)) for o in self.evaluator.run(None, feed))


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller feeds (initializers listed as inputs excluded)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def random_onnx_inputs(model: onnx.ModelProto, *, seed: int = 0, dynamic: int = DYNAMIC_DIM
                       ) -> tuple[tuple[torch.Tensor, ...], list[str]]:
    """One seeded random batch for ``model``'s inputs (dynamic dimensions set to ``dynamic``) and a description of
    each input's shape (``x: 2x3x32x32 (batch=2)``)."""
    gen = torch.Generator().manual_seed(seed)
    batch, described = [], []
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        dims, dyn = [], []
        for k, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                dims.append(dynamic)
                dyn.append(f"{d.dim_param or f'dim {k}'}={dynamic}")
        dtype = NUMPY_DTYPES.get(tt.elem_type)
        if dtype is None:
            from bnfold.errors import InputError

            raise InputError(f"input '{vi.name}' has an element type bnfold cannot draw random values for",
                             hint="pass your own inputs")
        if np.issubdtype(dtype, np.floating):
            t = torch.randn(dims, generator=gen, dtype=torch.float64).numpy().astype(dtype)
        else:
            t = np.zeros(dims, dtype=dtype)
        batch.append(torch.from_numpy(t))
        described.append(f"{vi.name}: {'x'.join(map(str, dims)) or 'scalar'}" + (f" ({', '.join(dyn)})" if dyn else ""))
    return tuple(batch), described


def float64_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` computing in float64: floating initializers, constants, casts, inputs, outputs and value_info
    become ``DOUBLE`` (integer tensors stay)."""
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for k, t in enumerate(g.initializer):
        if t.data_type in _FLOATS:
            g.initializer[k].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Constant" and a.name == "value" and a.t.data_type in _FLOATS:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
            elif n.op_type in ("Cast", "CastLike", "RandomNormal", "RandomUniform", "EyeLike") and a.name in (
                    "to", "dtype") and a.i in _FLOATS:
                a.i = onnx.TensorProto.DOUBLE
            elif n.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type in _FLOATS:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64)))
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.type.tensor_type.elem_type in _FLOATS:
            vi.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    return m


def _missing_kernels(exc: Exception) -> list[str]:
    return sorted(set(re.findall(r"implementation for (\w+)\(", str(exc))))


def _macs(model: onnx.ModelProto) -> float:
    """Multiply-adds per sample of the model's convs/matmuls (from inferred shapes; unknown dimensions count as 1):
    to decide whether ``onnx.reference`` can run it in reasonable time."""
    from bnfold.passes.onnx.shapes import infer_shapes

    shapes = infer_shapes(model)
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    total = 0.0
    for n in model.graph.node:
        if n.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm") or len(n.input) < 2:
            continue
        w = weights.get(n.input[1])
        out = shapes.get(n.output[0]) or ()
        if w is None:
            continue
        if n.op_type == "Conv":
            positions = np.prod([d for d in out[2:] if isinstance(d, int)] or [1])
        elif n.op_type == "ConvTranspose":
            positions = np.prod([d for d in (shapes.get(n.input[0]) or ())[2:] if isinstance(d, int)] or [1])
        else:
            positions = np.prod([d for d in out[1:-1] if isinstance(d, int)] or [1])
        total += float(np.prod(w)) * float(positions)
    return total


def reference64(model: onnx.ModelProto, batches: Sequence[tuple[torch.Tensor, ...]]
                ) -> tuple[list[list[torch.Tensor]] | None, str]:
    """Outputs of the float64 copy of ``model`` and a note saying how they were computed (or why there are none)."""
    m64 = float64_copy(model)
    b64 = [tuple(t.double() if t.is_floating_point() else t for t in b) for b in batches]
    try:
        return run_batches(OrtModel(m64), b64), "float64 reference: the ONNX graph in double, run by ONNX Runtime"
    except Exception as exc:
        blocked = _missing_kernels(exc)
        why = (f"ONNX Runtime has no float64 CPU kernel for {', '.join(blocked)}" if blocked
               else f"ONNX Runtime could not run the graph in double ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200] if str(exc) else ''})")
    samples = sum(int(b[0].shape[0]) if b and b[0].dim() else 1 for b in batches)
    if _macs(model) * samples > REFERENCE_EVAL_MACS:
        return None, (f"no float64 reference: {why}, and the model is too large for onnx.reference; verdict by the "
                      "elementwise assert_close tolerances")
    try:
        return run_batches(_ReferenceEvaluator(m64), b64), (f"float64 reference: {why}, so the ONNX graph in "
                                                             "double ran in onnx.reference (numpy)")
    except Exception as exc:
        log.debug("onnx.reference float64 run failed", exc_info=True)
        first = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else ""
        return None, (f"no float64 reference: {why}, and onnx.reference failed too ({type(exc).__name__}: "
                      f"{first}); verdict by the elementwise assert_close tolerances")


def rounding_depth(model: onnx.ModelProto) -> int:
    """``D`` of the float64 rule's floor: floating initializers of rank ≥ 2 (conv/matmul weights), at least 1."""
    return max(1, sum(1 for t in model.graph.initializer if len(t.dims) >= 2 and t.data_type in _FLOATS))


def onnx_parity(original: onnx.ModelProto | str | os.PathLike[str], folded: onnx.ModelProto | str | os.PathLike[str],
                batches: Sequence[tuple[torch.Tensor, ...]] | None = None, *, seed: int = 0,
                random_batches: bool = False, reference: OrtModel | None = None) -> ParityReport:
    """Run ``original`` and ``folded`` with ONNX Runtime on ``batches`` (random when None) and judge parity with the
    float64 rule when a float64 reference can be computed (module docstring), else elementwise.
    ``random_batches``: the given batches are random ones (shaped by ``--input-shape``), not the user's data.
    ``reference``: an ONNX Runtime session of ``original`` made earlier (else one is made here)."""
    orig = original if isinstance(original, onnx.ModelProto) else onnx.load(str(original))
    source = "random" if random_batches else "user"
    notes: list[str] = []
    if random_batches:
        notes.append("compared on random inputs shaped by --input-shape; parity on random data says little about "
                     "your data — pass real batches (--data)")
    if batches is None:
        batch, described = random_onnx_inputs(orig, seed=seed)
        batches, source = [batch], "random"
        notes.append(f"no inputs were given: compared on random inputs ({'; '.join(described)}, seed {seed}; "
                     f"dynamic dimensions set to {DYNAMIC_DIM}); parity on random data says little about your data "
                     "— pass real batches")
    ref_out = run_batches(reference or OrtModel(orig), batches)
    cand_out = run_batches(OrtModel(folded if isinstance(folded, onnx.ModelProto) else str(folded)), batches)
    ref64, note = reference64(orig, batches)
    report, _ = judge(ref_out, cand_out, ref64, depth=rounding_depth(orig))
    report.inputs = source
    report.notes.extend(notes)
    report.notes.append(note)
    return report
