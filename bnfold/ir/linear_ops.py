"""A uniform view of the ops a normalization folds into: Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear.

They appear as modules (``call_module``, after ``symbolic_trace``), as functional calls
(``F.conv2d``, ``F.linear``) or as aten ops (``aten.conv2d``, ``aten.convolution``, ``aten.linear`` after
``torch.export``). :func:`match_linear_op` recognises all of them by what they *are* (isinstance on modules
whose ``forward`` is the stock one, aten overload or function identity), never by node names.
Writing folded parameters back (clone-on-fold) is graph surgery: :func:`bnfold.passes.fold_targets.replace_params`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from bnfold.ir.affine_math import OpKind
from bnfold.ir.fold_targets import NotFoldable
from bnfold.ir.graph import fetch_attr, get_constant, normalized_kwargs

__all__ = ["LinearOp", "NotFoldable", "match_linear_op", "module_kind"]

aten = torch.ops.aten

# function/overload -> (kind, transposed-known)
_FUNCTIONS: dict[Any, OpKind] = {
    F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv",
    torch.conv1d: "conv", torch.conv2d: "conv", torch.conv3d: "conv",
    F.conv_transpose1d: "conv_transpose", F.conv_transpose2d: "conv_transpose",
    F.conv_transpose3d: "conv_transpose",
    F.linear: "linear",
    aten.conv1d.default: "conv", aten.conv2d.default: "conv", aten.conv3d.default: "conv",
    aten.conv1d.padding: "conv", aten.conv2d.padding: "conv", aten.conv3d.padding: "conv",
    aten.conv_transpose1d.default: "conv_transpose", aten.conv_transpose2d.input: "conv_transpose",
    aten.conv_transpose3d.input: "conv_transpose",
    aten.linear.default: "linear",
}
_CONVOLUTION = {aten.convolution.default, aten._convolution.default}
_MATMUL = {aten.addmm.default, aten.mm.default, torch.addmm, torch.mm}  # torch.*: Conv1D (GPT-2) traced


@dataclass(frozen=True)
class LinearOp:
    """A conv / conv-transpose / linear node with constant parameters.

    ``channel_axis_out`` / ``channel_axis_in`` are the axes of the output / input tensor that index
    output / input channels (1 for convolutions, -1 for linear).
    """

    node: torch.fx.Node
    kind: OpKind
    input: torch.fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    padding: tuple[int, ...] | str
    padding_mode: str
    kernel: tuple[int, ...]
    module: nn.Module | None = None
    matmul: bool = False  # aten.addmm / aten.mm: weight stored transposed, as (in, out)

    @property
    def channel_axis(self) -> int:
        return -1 if self.kind == "linear" else 1

    @property
    def in_axis(self) -> int:
        return self.channel_axis

    @property
    def out_axis(self) -> int:
        return self.channel_axis

    @property
    def out_channels(self) -> int:
        if self.kind == "conv_transpose":
            return self.weight.shape[1] * self.groups
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        if self.kind == "conv_transpose":
            return self.weight.shape[0]
        return self.weight.shape[1] * (self.groups if self.kind == "conv" else 1)

    def reads_padding_zeros(self) -> bool:
        """True when the op may read zero padding (which a per-channel shift would not commute with)."""
        if self.kind == "linear":
            return False
        if self.padding_mode != "zeros":
            return False
        if isinstance(self.padding, str):
            return self.padding != "valid" and any(k != 1 for k in self.kernel)
        return any(p != 0 for p in self.padding)

    def describe(self) -> str:
        name = type(self.module).__name__ if self.module is not None else _target_name(self.node)
        return f"{name} '{self.node.name}'"


def _target_name(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"aten.{t.__name__}"
    return getattr(t, "__name__", str(t))


def module_kind(m: nn.Module) -> OpKind | None:
    """Kind of a leaf module whose forward is the stock torch.nn one (subclasses included)."""
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        stock = type(m).forward in (nn.ConvTranspose1d.forward, nn.ConvTranspose2d.forward,
                                    nn.ConvTranspose3d.forward)
        return "conv_transpose" if stock else None
    if isinstance(m, nn.modules.conv._ConvNd):
        stock = type(m).forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)
        return "conv" if stock else None
    if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
        return "linear"
    return None


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    return tuple(int(x) for x in v)


def match_linear_op(gm: torch.fx.GraphModule, node: torch.fx.Node) -> LinearOp | NotFoldable | None:
    """A :class:`LinearOp` view of ``node``; :class:`NotFoldable` when it is one with non-constant
    parameters; ``None`` when it is not a conv/linear at all."""
    if node.op == "call_module":
        m = fetch_attr(gm, str(node.target))
        kind = module_kind(m)
        if kind is None:
            return None
        if not node.args or not isinstance(node.args[0], torch.fx.Node):
            return NotFoldable(node, "its input is not a graph value")
        spatial = m.weight.dim() - 2
        padding = getattr(m, "padding", 0)
        return LinearOp(
            node=node, kind=kind, input=node.args[0], weight=m.weight, bias=m.bias,
            groups=int(getattr(m, "groups", 1)),
            padding=padding if isinstance(padding, str) else _tuple(padding, spatial),
            padding_mode=str(getattr(m, "padding_mode", "zeros")),
            kernel=tuple(m.weight.shape[2:]), module=m,
        )
    if node.op != "call_function":
        return None
    if node.target in _MATMUL:
        return _match_matmul(gm, node)
    if node.target in _CONVOLUTION:
        kwargs = _kwargs(gm, node)
        kind = "conv_transpose" if kwargs["transposed"] else "conv"
    elif node.target in _FUNCTIONS:
        kind = _FUNCTIONS[node.target]
        kwargs = _kwargs(gm, node)
    else:
        return None
    weight = get_constant(gm, kwargs.get("weight"))
    if weight is None:
        return NotFoldable(node, "its weight is computed in the graph, not a constant parameter")
    bias_arg = kwargs.get("bias")
    bias = get_constant(gm, bias_arg)
    if bias_arg is not None and bias is None:
        return NotFoldable(node, "its bias is computed in the graph, not a constant parameter")
    x = kwargs.get("input")
    if not isinstance(x, torch.fx.Node):
        return NotFoldable(node, "its input is not a graph value")
    spatial = weight.dim() - 2
    padding = kwargs.get("padding", 0)
    return LinearOp(
        node=node, kind=kind, input=x, weight=weight, bias=bias,
        groups=int(kwargs.get("groups", 1) or 1),
        padding=padding if isinstance(padding, str) else _tuple(padding, max(spatial, 0)),
        padding_mode="zeros", kernel=tuple(weight.shape[2:]),
    )


def _match_matmul(gm: torch.fx.GraphModule, node: torch.fx.Node) -> LinearOp | NotFoldable | None:
    """``addmm(bias, x, Wᵀ)`` / ``mm(x, Wᵀ)``: a Linear after ``run_decompositions``, or a layer that stores its
    weight as (in, out) (transformers' ``Conv1D``, GPT-2) traced symbolically."""
    kw = _kwargs(gm, node)
    if kw.get("beta", 1) != 1 or kw.get("alpha", 1) != 1:
        return NotFoldable(node, "its addmm scales by alpha/beta")
    w_t = get_constant(gm, kw.get("mat2"))
    if w_t is None or w_t.dim() != 2:
        return None  # a matmul of two activations, not a linear layer
    bias_arg = kw.get("input")  # aten's "self", renamed by normalize_function
    bias = get_constant(gm, bias_arg)
    if bias_arg is not None and (bias is None or bias.dim() != 1 or bias.numel() != w_t.shape[1]):
        return NotFoldable(node, "its bias is not a constant vector")
    x = kw.get("mat1")
    if not isinstance(x, torch.fx.Node):
        return NotFoldable(node, "its input is not a graph value")
    return LinearOp(node=node, kind="linear", input=x, weight=w_t.t(), bias=bias, groups=1, padding=(),
                    padding_mode="zeros", kernel=(), matmul=True)


def _kwargs(gm: torch.fx.GraphModule, node: torch.fx.Node) -> dict[str, Any]:
    kwargs = normalized_kwargs(gm, node)
    if kwargs is None:
        raise ValueError(f"cannot normalize the arguments of {node.format_node()}")
    return kwargs
