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

from bnfold.parity import STORAGE_DRAWS, ParityReport, judge, run_batches

__all__ = ["DYNAMIC_DIM", "OrtModel", "float64_copy", "onnx_parity", "random_onnx_inputs", "storage_noise_onnx",
           "ungroup_conv_transpose"]

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
        options.log_severity_level = 4  # a failure is raised (and reported) by the caller, not logged on stderr
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
    from bnfold.ir.onnx.shapes import infer_shapes

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
    return _run64(float64_copy(model), model, batches)


def _run64(m64: onnx.ModelProto, model: onnx.ModelProto, batches: Sequence[tuple[torch.Tensor, ...]]
           ) -> tuple[list[list[torch.Tensor]] | None, str]:
    """Run the float64 graph ``m64`` (a copy of ``model``) on ``batches`` cast to float64: in ONNX Runtime, else in
    ``onnx.reference`` when ``model`` is small enough; the outputs (None when neither can) and how they were made."""
    b64 = [tuple(t.double() if t.is_floating_point() else t for t in b) for b in batches]
    try:
        return run_batches(OrtModel(m64), b64), "float64 reference: the ONNX graph in double, run by ONNX Runtime"
    except Exception as exc:
        blocked = _missing_kernels(exc)
        why = (f"ONNX Runtime has no float64 CPU kernel for {', '.join(blocked)}" if blocked
               else f"ONNX Runtime could not run the graph in double ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200] if str(exc) else ''})")
    samples = sum(int(b[0].shape[0]) if b and b[0].dim() else 1 for b in batches)
    m64 = floor_exact_pools(ungroup_conv_transpose(m64))
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


def infer_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value ONNX's shape inference can type (inputs, outputs, node outputs)."""
    try:
        found = onnx.shape_inference.infer_shapes(model)
    except Exception:
        found = model
    g = found.graph
    return {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.output, *g.value_info]
            if vi.type.HasField("tensor_type")}


def storage_noise_onnx(model: onnx.ModelProto, batches: Sequence[tuple[torch.Tensor, ...]],
                       draws: int = STORAGE_DRAWS, seed: int = 0) -> list[list[list[torch.Tensor]]]:
    """The measured storage noise ``S`` of the float64 rule (:func:`bnfold.parity.storage_noise64`, stated in
    :mod:`bnfold.parity`) for an ONNX graph: outputs (per draw, per batch) of float64 copies of ``model`` in which

    * every floating initializer read by a *layer* — a node reading a floating initializer of rank ≥ 2 (conv,
      conv-transpose, Gemm, MatMul weights) — and the bias an ``Add`` applies to a layer's output is multiplied by
      ``1 + δ``, ``δ`` uniform in ``[−u_s, u_s]`` per element (``u_s`` of the model's storage dtype);
    * every floating value a node writes is multiplied the same way (``1 + RandomUniformLike``, seeded per node and
      draw): ONNX Runtime stores each node's output in the model's dtype, and a normalization written as a dozen
      elementwise nodes (``ReduceMean``, ``Sub``, ``Div``, …) rounds a dozen times where torch's one module rounds
      once;

    the torch back end's two roundings (every layer weight a fold may rewrite, every stored output), found by what
    the nodes read since an ONNX graph has no modules. Empty when a noisy copy cannot run.
    :func:`onnx_parity` measures it only when the analytic bound fails (ill-conditioned models: a norm over two
    features whose inputs nearly cancel makes one sample decide the rmse)."""
    from onnx import helper, numpy_helper

    from bnfold.parity.tolerance import storage_roundoff

    floats = [t for t in model.graph.initializer if t.data_type in _FLOATS]
    if not floats:
        return []
    dtype = {onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16}.get(
        floats[0].data_type, torch.float32)
    u = storage_roundoff(dtype)
    rank = {t.name: len(t.dims) for t in floats}
    layers = [n for n in model.graph.node if any(rank.get(i, 0) >= 2 for i in n.input)]
    layer_outputs = {o for n in layers for o in n.output}
    perturbed = {i for n in layers for i in n.input if i in rank}
    perturbed |= {i for n in model.graph.node if n.op_type == "Add" and any(i in layer_outputs for i in n.input)
                  for i in n.input if i in rank}
    inferred = infer_types(model)
    computing = {n.output[0] for n in model.graph.node if n.output and inferred.get(n.output[0]) in _FLOATS}
    gen = np.random.default_rng(seed)
    out = []
    for draw in range(draws):
        m64 = float64_copy(model)
        g = m64.graph
        for k, t in enumerate(g.initializer):
            if t.name in perturbed:
                a = numpy_helper.to_array(t)
                g.initializer[k].CopyFrom(numpy_helper.from_array(a * (1 + u * gen.uniform(-1, 1, a.shape)), t.name))
        nodes: list[onnx.NodeProto] = []
        for j, n in enumerate(g.node):
            if not n.output or n.output[0] not in computing:
                nodes.append(n)
                continue
            final, raw = n.output[0], f"{n.output[0]}__exact"
            n.output[0] = raw
            noise = f"{final}__noise"
            nodes += [n, helper.make_node("RandomUniformLike", [raw], [noise], low=-u, high=u,
                                          dtype=onnx.TensorProto.DOUBLE, seed=float(draws * j + draw + seed)),
                      helper.make_node("Add", [noise, f"{final}__one"], [f"{final}__factor"]),
                      helper.make_node("Mul", [raw, f"{final}__factor"], [final])]
            g.initializer.append(numpy_helper.from_array(np.array(1.0), f"{final}__one"))
        del g.node[:]
        g.node.extend(nodes)
        del g.value_info[:]  # the renamed values: let shape inference find them again
        outputs, _ = _run64(m64, model, batches)
        if outputs is None:
            return []
        out.append(outputs)
    return out


def floor_exact_pools(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with ``ceil_mode=1`` dropped from every ``MaxPool``/``AveragePool`` whose output size is the same
    with floor rounding (``(L + pads − k) mod s = 0`` on every spatial axis of a statically known input) — the same
    function. For ``onnx.reference``, whose pools with ``ceil_mode=1`` give the wrong size even then (onnx 1.23:
    kernel 3, stride 1, pads 1 on 10 → 12, not 10); without this, torchvision's googlenet (``ceil_mode=True``
    Inception pools) got no float64 reference and was judged by the elementwise tolerances."""
    from bnfold.ir.onnx.shapes import infer_shapes

    pools = [n for n in model.graph.node if n.op_type in ("MaxPool", "AveragePool") and n.domain in ("", "ai.onnx")
             and any(a.name == "ceil_mode" and a.i for a in n.attribute)]
    if not pools:
        return model
    shapes = infer_shapes(model)
    exact: set[str] = set()
    for n in pools:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        dims = shapes.get(n.input[0])
        kernel = list(attrs.get("kernel_shape", []))
        if dims is None or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") \
                or any(not isinstance(d, int) for d in dims[2:]) or len(dims) - 2 != len(kernel):
            continue
        r = len(kernel)
        strides = list(attrs.get("strides", [1] * r))
        pads = list(attrs.get("pads", [0] * 2 * r))
        dil = list(attrs.get("dilations", [1] * r))
        spans = [int(dims[2 + k]) + pads[k] + pads[k + r] - (dil[k] * (kernel[k] - 1) + 1) for k in range(r)]
        if all(s >= 0 and s % strides[k] == 0 for k, s in enumerate(spans)):
            exact.add(n.output[0])
    if not exact:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in m.graph.node:
        if n.output and n.output[0] in exact:
            kept = [a for a in n.attribute if a.name != "ceil_mode"]
            del n.attribute[:]
            n.attribute.extend(kept)
    return m


def ungroup_conv_transpose(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every grouped ``ConvTranspose`` (constant weight) written as ``Split`` → one ``ConvTranspose``
    per group → ``Concat`` — exactly the same function: a grouped conv is its groups side by side. For
    ``onnx.reference``, whose ``ConvTranspose`` reshapes the whole weight for each group and fails on ``group > 1``
    (onnx 1.23: "cannot reshape array of size 18 into shape (1,1,9)"); without this, such models got no float64
    reference and were judged by the elementwise tolerances (found by the ONNX fuzzer, seed 83)."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    grouped = [n for n in model.graph.node if n.op_type == "ConvTranspose" and n.domain in ("", "ai.onnx")
               and next((a.i for a in n.attribute if a.name == "group"), 1) > 1 and n.input[1] in inits
               and (len(n.input) < 3 or not n.input[2] or n.input[2] in inits)]
    if not grouped:
        return model
    targets = {n.output[0] for n in grouped}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        if n.op_type != "ConvTranspose" or n.output[0] not in targets:
            nodes.append(n)
            continue
        groups = next(a.i for a in n.attribute if a.name == "group")
        w = numpy_helper.to_array(inits[n.input[1]])
        b = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] else None
        cin, cout = w.shape[0] // groups, w.shape[1]
        tag = f"{n.output[0]}__group"
        split = g.initializer.add()
        split.CopyFrom(numpy_helper.from_array(np.full(groups, cin, np.int64), f"{tag}_split"))
        parts = [f"{tag}{k}_in" for k in range(groups)]
        nodes.append(helper.make_node("Split", [n.input[0], split.name], parts, axis=1))
        attrs = [a for a in n.attribute if a.name != "group"]
        outs = []
        for k in range(groups):
            wk = g.initializer.add()
            wk.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w[k * cin:(k + 1) * cin]), f"{tag}{k}_w"))
            ins = [parts[k], wk.name]
            if b is not None:
                bk = g.initializer.add()
                bk.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(b[k * cout:(k + 1) * cout]), f"{tag}{k}_b"))
                ins.append(bk.name)
            node = helper.make_node("ConvTranspose", ins, [f"{tag}{k}_out"])
            node.attribute.extend(attrs)
            nodes.append(node)
            outs.append(node.output[0])
        nodes.append(helper.make_node("Concat", outs, [n.output[0]], axis=1))
    del g.node[:]
    g.node.extend(nodes)
    return m


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
    report, _ = judge(ref_out, cand_out, ref64, depth=rounding_depth(orig),
                      storage_noise=lambda: storage_noise_onnx(orig, batches))
    report.inputs = source
    report.notes.extend(notes)
    report.notes.append(note)
    return report
