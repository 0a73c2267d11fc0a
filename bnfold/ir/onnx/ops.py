"""What an ONNX conv / conv-transpose / linear op *is*, in the layout :mod:`bnfold.ir.affine_math` speaks.

:func:`match_linear_op` reads a node into an :class:`OnnxLinearOp` whose ``weight`` is float64 in torch's layout
and whose ``bias`` is a float64 vector over the output channels:

* ``Conv``:           ``W (O, I/g, k…)``, ``B (O,)``  — as stored;
* ``ConvTranspose``:  ``W (I, O/g, k…)``, ``B (O,)``  — as stored (``O = W.shape[1]·g``);
* ``Gemm``:           ``Y = α·A'·B' + β·C``  →  ``W = α·B'ᵀ (N, K)``, ``bias = β·C`` broadcast to ``(N,)``
                      (``B' = Bᵀ`` when ``transB``; ``C`` must be a scalar or a vector over the ``N`` features);
* ``MatMul`` (+ ``Add``): ``Y = X·B (+ c)``  →  ``W = Bᵀ (N, K)``, ``bias = c`` (``B`` 2-D constant; ``c`` a
                      constant vector along the last axis, read when the MatMul's only reader is that ``Add``).

:func:`write_linear_op` writes a folded ``(W', bias')`` back (cast once to the weight's dtype): Gemm gets
``α = β = 1`` (they were multiplied into ``W`` and ``C`` in float64), a MatMul without a bias gets an ``Add``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch

from bnfold.ir.affine_math import OpKind
from bnfold.ir.fold_targets import NotFoldable
from bnfold.ir.onnx.graph import OnnxGraph, attr, node_label, set_attr

__all__ = ["FLOAT_TYPES", "NotFoldable", "OnnxLinearOp", "match_linear_op", "to64", "write_linear_op"]

f64 = torch.float64

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def to64(array: np.ndarray) -> torch.Tensor:
    """A float64 torch copy of a numpy array (any float dtype, bfloat16 included)."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))


@dataclass
class OnnxLinearOp:
    """A Conv / ConvTranspose / Gemm / MatMul(+Add) with constant parameters, described as every back end describes
    a conv/linear (:class:`~bnfold.ir.fold_targets.LinearOpLike`)."""

    node: onnx.NodeProto
    kind: OpKind
    weight: torch.Tensor  # float64, torch layout (module docstring)
    bias: torch.Tensor | None  # float64 (out,)
    groups: int
    dtype: np.dtype  # storage dtype of the weight
    in_channels: int
    out_channels: int
    in_axis: int  # channel axis of the input: 1 (conv, gemm) or -1 (matmul: the last)
    out_axis: int  # channel axis of the output: 1 or -1
    pads: bool  # a conv that reads zero padding (explicit pads, or SAME with a kernel larger than 1)
    add: onnx.NodeProto | None = None  # MatMul's bias Add
    add_index: int = 1  # which input of ``add`` is the bias

    @property
    def input(self) -> str:
        return self.node.input[0]

    @property
    def output(self) -> str:
        return self.add.output[0] if self.add is not None else self.node.output[0]

    def describe(self) -> str:
        return node_label(self.node) + (f" + Add '{self.add.name}'" if self.add is not None else "")

    def reads_padding_zeros(self) -> bool:
        return self.pads


def _reads_padding(node: onnx.NodeProto, kernel: tuple[int, ...]) -> bool:
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return False
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return any(k != 1 for k in kernel)
    return any(int(p) != 0 for p in attr(node, "pads", []) or [])


def _const(g: OnnxGraph, node: onnx.NodeProto, index: int, what: str) -> np.ndarray | NotFoldable | None:
    if index >= len(node.input) or not node.input[index]:
        return None
    name = node.input[index]
    if not g.is_constant(name):
        return NotFoldable(node, f"its {what} {g.why_not_constant(name)}")
    t = g.elem_type(name)
    if t not in FLOAT_TYPES:
        return NotFoldable(node, f"its {what} '{name}' is not a floating-point tensor")
    value = g.constant(name)
    assert value is not None
    return value


def _vector(c: np.ndarray, n: int) -> np.ndarray | None:
    """``c`` as an ``(n,)`` vector when it broadcasts along the last axis only (scalar, (n,), (1, n), (1, 1)…)."""
    if c.ndim == 0 or c.size == 1:
        return np.full((n,), c.reshape(()), dtype=c.dtype)
    if c.shape[-1] == n and all(d == 1 for d in c.shape[:-1]):
        return c.reshape(n)
    return None


def match_linear_op(g: OnnxGraph, node: onnx.NodeProto) -> OnnxLinearOp | NotFoldable | None:
    """``node`` as a conv/linear with constant parameters, why it cannot be one, or None (not such an op)."""
    if node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        w = _const(g, node, 1, "weight")
        if not isinstance(w, np.ndarray):
            return w or NotFoldable(node, "it has no weight")
        b = _const(g, node, 2, "bias")
        if isinstance(b, NotFoldable):
            return b
        groups = int(attr(node, "group", 1))
        kernel = tuple(w.shape[2:])
        if op == "Conv":
            in_ch, out_ch, kind = w.shape[1] * groups, w.shape[0], "conv"
        else:
            in_ch, out_ch, kind = w.shape[0], w.shape[1] * groups, "conv_transpose"
        if w.ndim < 3 or out_ch % groups or in_ch % groups:
            return NotFoldable(node, f"its weight shape {tuple(w.shape)} does not fit group={groups}")
        return OnnxLinearOp(node, kind, to64(w), None if b is None else to64(b).reshape(-1), groups, w.dtype,
                            in_ch, out_ch, 1, 1, _reads_padding(node, kernel))
    if op == "Gemm":
        bmat = _const(g, node, 1, "weight (B)")
        if not isinstance(bmat, np.ndarray):
            return bmat or NotFoldable(node, "it has no B input")
        if bmat.ndim != 2:
            return NotFoldable(node, "its B is not a matrix")
        w = to64(bmat) if attr(node, "transB", 0) else to64(bmat).T.contiguous()
        n, k = w.shape
        w = w * float(attr(node, "alpha", 1.0))
        c = _const(g, node, 2, "bias (C)")
        if isinstance(c, NotFoldable):
            return c
        bias = None
        if c is not None:
            vec = _vector(c, n)
            if vec is None:
                return NotFoldable(node, f"its C has shape {tuple(c.shape)}, not a vector over the {n} output "
                                         "features")
            bias = to64(vec) * float(attr(node, "beta", 1.0))
        in_axis = 0 if attr(node, "transA", 0) else 1
        return OnnxLinearOp(node, "linear", w, bias, 1, bmat.dtype, k, n, in_axis, 1, False)
    if op == "MatMul":
        if len(node.input) < 2 or not g.is_constant(node.input[1]):
            return None if len(node.input) < 2 else NotFoldable(
                node, f"its weight {g.why_not_constant(node.input[1])}")
        bmat = _const(g, node, 1, "weight")
        if not isinstance(bmat, np.ndarray):
            return bmat
        if bmat.ndim != 2:
            return NotFoldable(node, f"its constant operand has rank {bmat.ndim}, not a matrix")
        k, n = bmat.shape
        result = OnnxLinearOp(node, "linear", to64(bmat).T.contiguous(), None, 1, bmat.dtype, k, n, -1, -1, False)
        users = g.users(node.output[0])
        if len(users) == 1 and g.readers(node.output[0]) == 1 and users[0].op_type == "Add" \
                and users[0].domain in ("", "ai.onnx") and len(users[0].input) == 2:
            add = users[0]
            idx = 1 if add.input[0] == node.output[0] else 0
            c = g.constant(add.input[idx]) if g.is_constant(add.input[idx]) else None
            vec = None if c is None or c.ndim > 2 or g.elem_type(add.input[idx]) not in FLOAT_TYPES \
                else _vector(c, n)
            if vec is not None:
                result.add, result.add_index, result.bias = add, idx, to64(vec)
        return result
    return None


def _cast(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """Round a float64 tensor once into ``dtype``."""
    return t.detach().cpu().numpy().astype(dtype)


def write_linear_op(g: OnnxGraph, op: OnnxLinearOp, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """Write folded float64 ``(weight, bias)`` (torch layout, see the module docstring) into ``op``'s node;
    returns where they went (for the report). A MatMul that had no bias gets an ``Add`` after it."""
    node, dt = op.node, op.dtype
    if op.kind in ("conv", "conv_transpose"):
        g.write_input(node, 1, _cast(weight, dt))
        if bias is not None:
            g.write_input(node, 2, _cast(bias, dt), like=f"{node.input[1]}_bias")
        return node_label(node)
    if node.op_type == "Gemm":
        b = weight if attr(node, "transB", 0) else weight.T
        g.write_input(node, 1, _cast(b.contiguous(), dt))
        if float(attr(node, "alpha", 1.0)) != 1.0:
            set_attr(node, "alpha", 1.0)
        if bias is not None:
            g.write_input(node, 2, _cast(bias, dt), like=f"{node.input[1]}_bias")
            if float(attr(node, "beta", 1.0)) != 1.0:
                set_attr(node, "beta", 1.0)
        return node_label(node)
    # MatMul
    g.write_input(node, 1, _cast(weight.T.contiguous(), dt))
    if bias is None:
        return node_label(node)
    if op.add is not None:
        old = g.constant(op.add.input[op.add_index])
        assert old is not None
        shape = old.shape if old.size == bias.numel() else (bias.numel(),)
        g.write_input(op.add, op.add_index, _cast(bias.reshape(shape), dt))
        return op.describe()
    if not bool((bias != 0).any()):
        return node_label(node)
    out = node.output[0]
    mid = g.fresh(f"{out}_nobias")
    g.rename_output(node, out, mid)  # the Add takes over the name ``out``: readers and graph outputs keep it
    g.consumers[mid] = []
    name = g.fresh(f"{node.name or 'MatMul'}_bias") if node.name else ""
    bias_name = g.fresh(f"{node.input[1]}_bias")
    g.graph.initializer.append(onnx.numpy_helper.from_array(_cast(bias, dt), bias_name))
    add = onnx.helper.make_node("Add", [mid, bias_name], [out], name=name)
    g.insert_after(node, add)
    g.reindex()
    return f"{node_label(node)} + a new Add '{name}'"
