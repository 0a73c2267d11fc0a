"""Random valid ONNX models for fuzzing the ONNX fold: the torch fuzzer's models, written as ONNX graphs.

:func:`make_onnx_case` takes :func:`modelgen.make_case` for the same seed — the same plan, modules, randomized
statistics, and so the same placements of BatchNorm (module, functional, frozen, subclasses, ``affine=False``,
batch statistics), LayerNorm, RMSNorm and GroupNorm around convs, conv-transposes, linears, residual adds, concats,
pools, reshapes and activations — and writes each step as ONNX nodes with ``onnx.helper`` (no exporter: what the graph
holds is decided here, not by an exporter's choices). ONNX adds its own variation, drawn from a separate stream so
the plan stays the torch fuzzer's:

* the opset (17–23); ops are written natively where the opset has them (``RMSNormalization`` ≥ 23,
  ``GroupNormalization`` ≥ 21, ``Gelu`` ≥ 20, ``Pad`` ``wrap`` ≥ 19) and as the exporters' decompositions otherwise;
* a linear on a 2-D input as ``Gemm`` (``transB=1``) or ``MatMul`` + ``Add``; a padded conv as ``Pad`` (reflect,
  edge, wrap) + ``Conv``; ``"same"`` padding as explicit, possibly asymmetric ``pads``;
* shared weights as ONE initializer read by two nodes (a conv module called twice, tied convs, the tied LM head:
  ``Gather`` and ``Gemm(transB=1)`` on the embedding table);
* a symbolic or a fixed batch dimension, named or unnamed nodes, and external data (a data file named after the
  model, or another name) — which the fold's output rules must respect;
* float32, or float16 where modelgen chose a half type and ONNX Runtime's CPU kernels run the model.

Shape reads after a step (``torch._assert`` on ``x.shape`` in modelgen) become ``Shape`` nodes whose output nothing
reads. Every generated model is checked with ``onnx.checker`` (full) and runs in ONNX Runtime.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from modelgen import BNReLU2d, FrozenBN, FunctionalBN, TiedLM, make_case
from onnx import TensorProto, helper, numpy_helper
from torch import nn

__all__ = ["OPSETS", "OnnxCase", "make_onnx_case", "save_case"]

OPSETS = (17, 18, 19, 20, 21, 23)


@dataclass
class OnnxCase:
    """One generated ONNX model: ``model`` (weights inline), the torch model it was written from, inputs to fold
    with and to judge parity on (``check_inputs``: 32 samples), how to save it (``external``: data file name or None,
    ``threshold``: the smallest tensor kept outside) and a one-line description."""

    seed: int
    model: onnx.ModelProto
    torch_model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    check_inputs: tuple[torch.Tensor, ...]
    description: str
    external: str | None = None
    threshold: int = 0
    fixed_batch: int | None = None
    notes: list[str] = field(default_factory=list)


class _Writer:
    """Builds the graph: ``value(name, array)`` adds an initializer, ``node(op, inputs, **attrs)`` a node and returns
    its output name."""

    def __init__(self, rng: random.Random, opset: int, dtype: np.dtype) -> None:
        self.rng, self.opset, self.dtype = rng, opset, dtype
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0
        self.shared: dict[int, str] = {}  # id(parameter tensor) → initializer name: shared weights stay shared

    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def value(self, stem: str, array: Any, *, dtype: np.dtype | None = None) -> str:
        name = self.fresh(stem)
        a = np.asarray(array)
        if a.dtype.kind == "f":
            a = a.astype(dtype or self.dtype)
        self.inits.append(numpy_helper.from_array(a, name))
        return name

    def param(self, stem: str, t: torch.Tensor, *, transpose: bool = False) -> str:
        """An initializer for the parameter ``t`` — the same one each time ``t`` is asked for (tied weights)."""
        key = id(t) if not transpose else -id(t)
        if key not in self.shared:
            a = t.detach().float().numpy()
            self.shared[key] = self.value(stem, a.T if transpose else a)
        return self.shared[key]

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs: Any) -> str:
        outs = [self.fresh(op.lower()) for _ in range(n_out)]
        name = self.fresh(op) if self.rng.random() < 0.8 else ""
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0]

    def ints(self, values: list[int]) -> str:
        return self.value("ints", np.array(values, np.int64))

    def scalar(self, v: float) -> str:
        return self.value("c", np.array(v, np.float32))

    def channel(self, t: torch.Tensor, rank: int) -> str:
        """A per-channel constant ``(C, 1, …)`` broadcasting along axis 1 of a rank-``rank`` value."""
        return self.value("ch", t.detach().float().numpy().reshape(-1, *([1] * (rank - 2))))

    def reduce_mean(self, x: str, axes: list[int], keepdims: int) -> str:
        if self.opset >= 18:
            return self.node("ReduceMean", [x, self.ints(axes)], keepdims=keepdims)
        return self.node("ReduceMean", [x], axes=axes, keepdims=keepdims)


def _conv(w: _Writer, m: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: str, rank: int) -> str:
    d = rank - 2
    k = list(m.kernel_size)
    if isinstance(m.padding, str):  # "same" (stride 1): torch pads total = dilation·(k−1), the odd one at the end
        total = [m.dilation[i] * (k[i] - 1) for i in range(d)]
        begin, end = [t // 2 for t in total], [t - t // 2 for t in total]
    else:
        begin, end = list(m.padding), list(m.padding)
    if m.padding_mode != "zeros" and any(begin + end):
        mode = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}[m.padding_mode]
        x = w.node("Pad", [x, w.ints([0, 0, *begin, 0, 0, *end])], mode=mode)
        begin, end = [0] * d, [0] * d
    inputs = [x, w.param("W", m.weight)] + ([w.param("B", m.bias)] if m.bias is not None else [])
    return w.node("Conv", inputs, kernel_shape=k, strides=list(m.stride), dilations=list(m.dilation),
                  pads=begin + end, group=m.groups)


def _conv_t(w: _Writer, m: nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d, x: str) -> str:
    inputs = [x, w.param("Wt", m.weight)] + ([w.param("Bt", m.bias)] if m.bias is not None else [])
    return w.node("ConvTranspose", inputs, kernel_shape=list(m.kernel_size), strides=list(m.stride),
                  pads=list(m.padding) * 2, output_padding=list(m.output_padding), group=m.groups,
                  dilations=list(m.dilation))


def _batch_stats(w: _Writer, m: nn.Module, x: str, rank: int) -> str:
    """``track_running_stats=False`` in eval: normalized with the batch's own statistics (the exporters' form)."""
    axes = [0, *range(2, rank)]
    diff = w.node("Sub", [x, w.reduce_mean(x, axes, 1)])
    var = w.reduce_mean(w.node("Mul", [diff, diff]), axes, 1)
    y = w.node("Div", [diff, w.node("Sqrt", [w.node("Add", [var, w.scalar(m.eps)])])])
    if getattr(m, "weight", None) is not None:
        y = w.node("Add", [w.node("Mul", [y, w.channel(m.weight, rank)]), w.channel(m.bias, rank)])
    return y


def _bn(w: _Writer, m: nn.Module, x: str, rank: int) -> str:
    if isinstance(m, FrozenBN):
        return w.node("Add", [w.node("Mul", [x, w.param("scale", m.scale)]), w.param("shift", m.shift)])
    if not isinstance(m, FunctionalBN) and not m.track_running_stats:
        return _batch_stats(w, m, x, rank)
    c = m.running_mean.numel()
    scale = w.param("gamma", m.weight) if m.weight is not None else w.value("gamma", np.ones(c))
    bias = w.param("beta", m.bias) if m.bias is not None else w.value("beta", np.zeros(c))
    y = w.node("BatchNormalization", [x, scale, bias, w.param("mean", m.running_mean),
                                      w.param("var", m.running_var)], epsilon=float(m.eps))
    return w.node("Relu", [y]) if isinstance(m, BNReLU2d) else y


def _group_norm(w: _Writer, m: nn.GroupNorm, x: str, rank: int) -> str:
    if w.opset >= 21 and w.rng.random() < 0.6:
        return w.node("GroupNormalization", [x, w.param("gn_w", m.weight), w.param("gn_b", m.bias)],
                      num_groups=m.num_groups, epsilon=float(m.eps))
    shape = w.node("Shape", [x])  # the exporters' form: InstanceNorm over the groups, then the affine
    grouped = w.node("Reshape", [x, w.ints([0, m.num_groups, -1])])
    g = m.num_groups
    normed = w.node("InstanceNormalization", [grouped, w.value("one", np.ones(g)), w.value("zero", np.zeros(g))],
                    epsilon=float(m.eps))
    y = w.node("Reshape", [normed, shape])
    return w.node("Add", [w.node("Mul", [y, w.channel(m.weight, rank)]), w.channel(m.bias, rank)])


def _layer_norm(w: _Writer, m: nn.LayerNorm, x: str) -> str:
    inputs = [x, w.param("ln_w", m.weight)] + ([w.param("ln_b", m.bias)] if m.bias is not None else [])
    return w.node("LayerNormalization", inputs, axis=-1, epsilon=float(m.eps))


def _rms_norm(w: _Writer, m: nn.RMSNorm, x: str, dtype: torch.dtype) -> str:
    eps = float(m.eps) if m.eps is not None else float(torch.finfo(dtype).eps)
    if w.opset >= 23 and w.rng.random() < 0.6:
        return w.node("RMSNormalization", [x, w.param("rms_w", m.weight)], axis=-1, epsilon=eps)
    ms = w.reduce_mean(w.node("Mul", [x, x]), [-1], 1)  # the exporters' form
    y = w.node("Div", [x, w.node("Sqrt", [w.node("Add", [ms, w.scalar(eps)])])])
    return w.node("Mul", [y, w.param("rms_w", m.weight)])


def _linear(w: _Writer, m: nn.Linear, x: str, rank: int) -> str:
    if rank == 2 and w.rng.random() < 0.5:
        inputs = [x, w.param("fc_w", m.weight)] + ([w.param("fc_b", m.bias)] if m.bias is not None else [])
        return w.node("Gemm", inputs, transB=1)
    y = w.node("MatMul", [x, w.param("fc_wT", m.weight, transpose=True)])
    return w.node("Add", [y, w.param("fc_b", m.bias)]) if m.bias is not None else y


def _gelu(w: _Writer, x: str) -> str:
    if w.opset >= 20:
        return w.node("Gelu", [x])
    erf = w.node("Erf", [w.node("Div", [x, w.scalar(float(np.sqrt(2.0)))])])
    return w.node("Mul", [w.node("Mul", [x, w.scalar(0.5)]), w.node("Add", [erf, w.scalar(1.0)])])


def _act(w: _Writer, name: str, x: str) -> str:
    if name == "relu":
        return w.node("Relu", [x])
    if name == "relu6":
        return w.node("Clip", [x, w.scalar(0.0), w.scalar(6.0)])
    if name == "gelu":
        return _gelu(w, x)
    if name == "silu":
        return w.node("Mul", [x, w.node("Sigmoid", [x])])
    if name == "tanh":
        return w.node("Tanh", [x])
    if name == "leaky_relu":
        return w.node("LeakyRelu", [x], alpha=0.1)
    if name == "hardswish":
        return w.node("HardSwish", [x])
    return w.node("Identity", [x])


def _module(w: _Writer, m: nn.Module, x: str, rank: int, dtype: torch.dtype) -> str:
    if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return _conv(w, m, x, rank)
    if isinstance(m, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d):
        return _conv_t(w, m, x)
    if isinstance(m, nn.modules.batchnorm._NormBase | FunctionalBN | FrozenBN):
        return _bn(w, m, x, rank)
    if isinstance(m, nn.GroupNorm):
        return _group_norm(w, m, x, rank)
    if isinstance(m, nn.LayerNorm):
        return _layer_norm(w, m, x)
    if isinstance(m, nn.RMSNorm):
        return _rms_norm(w, m, x, dtype)
    if isinstance(m, nn.Linear):
        return _linear(w, m, x, rank)
    raise NotImplementedError(type(m).__name__)


def _step(w: _Writer, step: tuple[Any, ...], vals: list[str], ranks: list[int], mods: Any, dtype: torch.dtype
          ) -> tuple[str, int]:
    """The ONNX value of one modelgen plan step (see ``modelgen.apply_step``) and its rank."""
    op, x, r = step[0], vals[step[1]], ranks[step[1]]
    if op == "mod":
        return _module(w, mods[step[2]], x, r, dtype), r
    if op == "act":
        return _act(w, step[2], x), r
    if op == "add":
        return w.node("Add", [x, vals[step[2]]]), r
    if op == "cat":
        return w.node("Concat", [x, vals[step[2]]], axis=1), r
    if op in ("maxpool", "avgpool"):
        d = step[2]
        return w.node("MaxPool" if op == "maxpool" else "AveragePool", [x], kernel_shape=[2] * d,
                      strides=[2] * d), r
    if op == "gap":
        return w.reduce_mean(x, list(range(2, step[2])), 0), 2
    if op == "flatten":
        return w.node("Flatten", [x], axis=1), 2
    if op == "upsample":
        scales = w.value("scales", np.array([1.0, 1.0] + [2.0] * (r - 2), np.float32), dtype=np.dtype(np.float32))
        return w.node("Resize", [x, "", scales], mode="nearest", coordinate_transformation_mode="asymmetric",
                      nearest_mode="floor"), r
    if op == "to_seq":
        return w.node("Transpose", [x], perm=[0, 2, 1]), r
    if op == "permute_roundtrip":
        d = step[2]
        y = w.node("Transpose", [x], perm=[0, *range(2, d), 1])
        return w.node("Transpose", [y], perm=[0, d - 1, *range(1, d - 1)]), r
    raise NotImplementedError(op)


def _tied_lm(w: _Writer, m: TiedLM, x: str, dtype: torch.dtype) -> str:
    table = w.param("embed", m.embed.weight)
    h = w.node("Gather", [table, x], axis=0)
    for kind, block in zip(m.kinds, m.blocks, strict=True):
        norm, fc, _ = block
        y = _layer_norm(w, norm, h) if isinstance(norm, nn.LayerNorm) else _rms_norm(w, norm, h, dtype)
        y = _gelu(w, _linear(w, fc, y, 3))
        h = w.node("Add", [h, y]) if kind == "residual" else y
    h = _layer_norm(w, m.norm, h) if isinstance(m.norm, nn.LayerNorm) else _rms_norm(w, m.norm, h, dtype)
    shape = w.node("Shape", [h])
    flat = w.node("Reshape", [h, w.ints([-1, m.embed.weight.shape[1]])])
    logits = w.node("Gemm", [flat, table], transB=1)  # lm_head: the embedding table itself (tied)
    out_shape = w.node("Concat", [w.node("Slice", [shape, w.ints([0]), w.ints([2])]),
                                  w.ints([m.embed.weight.shape[0]])], axis=0)
    return w.node("Reshape", [logits, out_shape])


_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
          np.dtype(np.int64): TensorProto.INT64}


def _build(case: Any, rng: random.Random, opset: int, dtype: np.dtype, fixed: bool) -> onnx.ModelProto:
    x = case.inputs[0]
    tdtype = torch.float16 if dtype == np.float16 else torch.float32  # what the graph computes in (RMSNorm's eps)
    w = _Writer(rng, opset, dtype)
    in_type = _TYPES[np.dtype(np.int64) if not x.is_floating_point() else dtype]
    batch: int | str = int(x.shape[0]) if fixed else "batch"
    shape = [batch, *x.shape[1:]]
    if isinstance(case.model, TiedLM):
        out = _tied_lm(w, case.model, "x", tdtype)
    else:
        vals, ranks = ["x"], [x.dim()]
        for i, step in enumerate(case.model.plan):
            v, r = _step(w, step, vals, ranks, case.model.mods, tdtype)
            vals.append(v)
            ranks.append(r)
            if i in case.model.shape_reads:
                w.node("Shape", [v])  # read, never used: the fold must not count it as a consumer
        out = vals[-1]
    w.nodes.append(helper.make_node("Identity", [out], ["y"], name="output"))
    graph = helper.make_graph(w.nodes, f"fuzz_{case.seed}", [helper.make_tensor_value_info("x", in_type, shape)],
                              [helper.make_tensor_value_info("y", _TYPES[dtype], None)], w.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="bnfold-fuzz")
    inferred = _infer(model)
    found = next(vi for vi in [*inferred.graph.value_info, *inferred.graph.input] if vi.name == out)
    for m in (model, inferred):  # the output's shape, as inferred (symbolic batch kept)
        m.graph.output[0].type.CopyFrom(found.type)
    return inferred if rng.random() < 0.5 else model  # with the intermediate shapes (value_info) or without


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with inferred shapes (strict: also checks the graph). ONNX's inference gives a
    ``GroupNormalization`` (opset 21, a function op) no output type; its output has its input's, declared here."""
    while True:
        found = onnx.shape_inference.infer_shapes(model, data_prop=True)
        typed = {vi.name: vi for vi in [*found.graph.value_info, *found.graph.input]}
        missing = [n for n in model.graph.node if n.op_type == "GroupNormalization" and n.output[0] not in typed
                   and n.input[0] in typed]
        if not missing:
            return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        for n in missing:
            vi = model.graph.value_info.add()
            vi.CopyFrom(typed[n.input[0]])
            vi.name = n.output[0]


def _runs(model: onnx.ModelProto, x: torch.Tensor) -> bool:
    import onnxruntime as ort

    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        out = session.run(None, {"x": x.numpy()})[0]
    except Exception:
        return False
    return bool(np.isfinite(out).all())


def _needs(case: Any) -> int:
    """The lowest opset the torch model's ops need as ONNX (circular padding: ``Pad`` mode ``wrap``)."""
    mods = case.model.modules()
    return 19 if any(getattr(m, "padding_mode", "zeros") == "circular" for m in mods) else 17


def make_onnx_case(seed: int) -> OnnxCase:
    """The ONNX model for ``seed`` (deterministic): modelgen's model for the seed, written as ONNX."""
    case = make_case(seed)
    rng = random.Random(seed * 7919 + 17)  # ONNX-only choices: the plan above stays the torch fuzzer's
    opset = max(rng.choice(OPSETS), _needs(case))
    fixed = rng.random() < 0.3
    external = rng.choice([None, None, "model.onnx.data", "weights.bin"])
    threshold = rng.choice([0, 64, 1024])
    x = case.inputs[0]
    half = case.dtype in (torch.float16, torch.bfloat16) and x.is_floating_point() and rng.random() < 0.5
    dtype = np.dtype(np.float16 if half else np.float32)
    model = _build(case, rng, opset, dtype, fixed)
    tdtype = torch.float16 if half else torch.float32
    inputs = tuple(t.to(tdtype) if t.is_floating_point() else t for t in case.inputs)
    check = tuple(t.to(tdtype) if t.is_floating_point() else t for t in case.check_inputs)
    notes = []
    if half and not _runs(model, inputs[0]):  # ORT's CPU kernels lack some float16 ops: write it in float32
        notes.append("float16 not runnable in ORT: float32")
        dtype, tdtype = np.dtype(np.float32), torch.float32
        model = _build(case, random.Random(seed * 7919 + 17), opset, dtype, fixed)
        inputs = tuple(t.float() if t.is_floating_point() else t for t in case.inputs)
        check = tuple(t.float() if t.is_floating_point() else t for t in case.check_inputs)
    onnx.checker.check_model(model, full_check=True)
    torch_model = case.model.to(tdtype) if case.dtype != tdtype else case.model
    n = int(inputs[0].shape[0])
    described = (f"seed {seed} onnx opset {opset} {dtype.name} batch {n if fixed else 'dynamic'} "
                 f"external {external or 'no'}{f' ({threshold} B)' if external else ''}: "
                 f"{case.description.split(': ', 1)[-1]}")
    return OnnxCase(seed, model, torch_model, inputs, check, described, external, threshold,
                    n if fixed else None, notes)


def save_case(case: OnnxCase, folder: Path) -> Path:
    """Write ``case`` into ``folder`` as ``model.onnx`` and, with ``case.external``, every initializer of at least
    ``case.threshold`` bytes into that data file (integer ones too, as ``onnx.save_model`` does); the model's path.
    (Written here: ``onnx.save_model`` checks whether the data file exists relative to the working directory.)"""
    path = folder / "model.onnx"
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    if case.external:
        with open(folder / case.external, "wb") as f:
            for t in model.graph.initializer:
                raw = numpy_helper.to_array(t).tobytes()
                if len(raw) < case.threshold:
                    continue
                offset = f.tell()
                f.write(raw)
                kept = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
                t.CopyFrom(kept)
                for key, value in (("location", case.external), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
                t.data_location = TensorProto.EXTERNAL
    path.write_bytes(model.SerializeToString())
    return path
