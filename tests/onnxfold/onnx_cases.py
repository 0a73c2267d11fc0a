"""ONNX files for the ONNX-fold tests and ``bench/onnx_fold.py``: real architectures exported so that
BatchNormalization survives (legacy exporter, ``do_constant_folding=False``, ``TrainingMode.PRESERVE`` on a model in
eval mode), with randomized BatchNorm statistics, and built cases that single out one rule each."""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: helpers
from helpers import randomize_bn as _randomize_bn

__all__ = ["ARCHS", "BUILT", "export", "randomize_bn"]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """:func:`helpers.randomize_bn` (random BatchNorm statistics and affines: mean 0 / var 1 hide bugs), plus random
    LayerNorm/GroupNorm affines; eval mode."""
    model = _randomize_bn(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model.eval()


def bn_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def fold_file(src: Path, tmp: Path) -> tuple[onnx.ModelProto, onnx.ModelProto, Any, Path, list[Path]]:
    """Load ``src``, fold it (ONNX rules), write it to ``tmp`` (checked by ``onnx.checker``); return the original,
    the folded model, the report, the written path and every file written (external data too)."""
    from bnfold.onnx import fold_model, load_onnx, save_onnx

    loaded = load_onnx(src)
    original = onnx.ModelProto()
    original.CopyFrom(loaded.model)
    report = fold_model(loaded.model, base_dir=str(src.parent))
    dest = tmp / f"{src.stem}.folded.onnx"
    written = save_onnx(loaded.model, dest, external=loaded.external, threshold=loaded.threshold, protect=[src])
    onnx.checker.check_model(str(dest), full_check=True)
    return original, loaded.model, report, dest, written


def export(model: nn.Module, x: torch.Tensor, path: Path, *, dynamic_batch: bool = True, opset: int = 17,
           external: bool = False) -> Path:
    """Export ``model`` (eval) with BatchNormalization kept; dynamic batch axis named ``batch``."""
    model = model.eval()
    axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"], output_names=["y"],
                          dynamic_axes=axes, opset_version=opset)
    if external:
        m = onnx.load(str(path))
        onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=256)
    return path


def _tv(name: str, **kw: object) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        torch.manual_seed(0)
        return randomize_bn(getattr(torchvision.models, name)(**kw))
    return make


def _timm(name: str, **kw: object) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        torch.manual_seed(0)
        return randomize_bn(timm.create_model(name, pretrained=False, num_classes=10, **kw))
    return make


ARCHS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet18": (_tv("resnet18", num_classes=10), (1, 3, 32, 32)),
    "mobilenet_v2": (_tv("mobilenet_v2", num_classes=10), (1, 3, 32, 32)),
    "efficientnet_b0": (_tv("efficientnet_b0", num_classes=10), (1, 3, 32, 32)),
    "densenet121": (_tv("densenet121", num_classes=10), (1, 3, 32, 32)),
    "regnet_y_400mf": (_tv("regnet_y_400mf", num_classes=10), (1, 3, 32, 32)),
    "shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5", num_classes=10), (1, 3, 32, 32)),
    "googlenet": (_tv("googlenet", num_classes=10, aux_logits=False, init_weights=True), (1, 3, 64, 64)),
    "mnasnet0_5": (_tv("mnasnet0_5", num_classes=10), (1, 3, 32, 32)),
    "timm_resnet10t": (_timm("resnet10t"), (1, 3, 32, 32)),
    "timm_levit_128s": (_timm("levit_128s", img_size=64), (1, 3, 64, 64)),
}


# -- built cases -----------------------------------------------------------------------------------------------------

def convtranspose_bn() -> tuple[nn.Module, tuple[int, ...]]:
    """ConvTranspose2d with groups=4 → BatchNorm2d (weight (in, out/groups, k, k): the per-group channel map)."""
    torch.manual_seed(1)
    return randomize_bn(nn.Sequential(nn.ConvTranspose2d(8, 12, 3, stride=2, groups=4), nn.BatchNorm2d(12))), \
        (1, 8, 8, 8)


def gemm_bn() -> tuple[nn.Module, tuple[int, ...]]:
    """Linear (Gemm, transB=1) → BatchNorm1d."""
    torch.manual_seed(2)
    return randomize_bn(nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                      nn.Linear(16, 4))), (2, 3, 4, 4)


def bn_conv(padding: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """BatchNorm2d → Conv2d (a consumer fold: exact with padding 0, scale only with zero padding)."""
    torch.manual_seed(3)
    return randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3, padding=padding), nn.ReLU())), \
        (1, 3, 16, 16)


def bn_flatten_linear() -> tuple[nn.Module, tuple[int, ...]]:
    """Conv → ReLU → BatchNorm2d → Flatten → Linear: the BN moves through Flatten into the Gemm."""
    torch.manual_seed(4)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(),
                                      nn.Linear(4 * 6 * 6, 5))), (1, 3, 8, 8)


class _LNMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.norm(x))))


def layernorm_linear() -> tuple[nn.Module, tuple[int, ...]]:
    """LayerNorm → Linear on a (batch, tokens, features) input (LayerNormalization → MatMul + Add)."""
    torch.manual_seed(5)
    return randomize_bn(_LNMLP()), (2, 5, 16)


def shared_weight_model(path: Path) -> Path:
    """Two Convs reading ONE weight initializer, each followed by its own BatchNormalization: folding must clone."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    nodes = []
    for k in range(2):
        inits += [numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), f"g{k}"),
                  numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), f"b{k}"),
                  numpy_helper.from_array(rng.standard_normal(4).astype(np.float32) * 0.5, f"m{k}"),
                  numpy_helper.from_array(rng.uniform(0.1, 2, 4).astype(np.float32), f"v{k}")]
        nodes += [helper.make_node("Conv", ["x", "W"], [f"c{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"c{k}", f"g{k}", f"b{k}", f"m{k}", f"v{k}"], [f"y{k}"],
                                   name=f"bn{k}")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                              ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, ["batch", 4, 8, 8])
                               for k in range(2)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bnfold-tests")
    model.metadata_props.add(key="author", value="tests")
    onnx.save(model, str(path))
    return path


class LinearNorm(nn.Module):
    """timm LeViT's ``LinearNorm``: a bias-free Linear, then BatchNorm1d over the tokens flattened into the batch
    (ONNX: MatMul → Flatten → BatchNormalization → Reshape)."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.linear = nn.Linear(i, o, bias=False)
        self.bn = nn.BatchNorm1d(o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class _LeViTMLP(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.ln1 = LinearNorm(dim, hidden)
        self.act = nn.Hardswish()
        self.ln2 = LinearNorm(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ln2(self.act(self.ln1(x)))


def levit_mlp() -> tuple[nn.Module, tuple[int, ...]]:
    """A LeViT residual MLP: two LinearNorms; each BatchNorm moves back through Flatten into its MatMul."""
    torch.manual_seed(6)
    return randomize_bn(_LeViTMLP()), (2, 5, 16)


class _ConcatThenConv(nn.Module):
    """ReLU → BatchNorm2d, concatenated with another branch, then a 1x1 conv: the BN moves forward through the
    Concat (identity coefficients for the other branch) into the conv."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.out = nn.Conv2d(9, 6, 1) if dim == 1 else nn.Conv2d(4, 6, 1)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.bn(torch.relu(self.a(x)))
        v = torch.relu(self.b(x))
        if self.dim != 1:
            v = v[:, :4]
        return self.out(torch.cat([u, v], self.dim))


def concat_forward(dim: int = 1) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(7)
    return randomize_bn(_ConcatThenConv(dim)), (1, 3, 8, 8)


class _ConvsConcatBN(nn.Module):
    """Two convs concatenated on channels, then BatchNorm2d → ReLU: the BN splits back into both convs."""

    def __init__(self, leak: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 5, 1)
        self.bn = nn.BatchNorm2d(9)
        self.leak = leak

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.a(x)
        y = torch.relu(self.bn(torch.cat([u, self.b(x)], 1)))
        return y + u.mean() if self.leak else y  # leak: the first conv's output is also read elsewhere


def concat_backward(leak: bool = False) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(8)
    return randomize_bn(_ConvsConcatBN(leak)), (1, 3, 8, 8)


BUILT: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    "convtranspose_g4_bn": convtranspose_bn,
    "gemm_transB_bn": gemm_bn,
    "bn_conv_pad0": lambda: bn_conv(0),
    "bn_conv_pad1": lambda: bn_conv(1),
    "bn_flatten_gemm": bn_flatten_linear,
    "layernorm_matmul": layernorm_linear,
    "levit_mlp": levit_mlp,
    "concat_forward_conv": concat_forward,
    "conv_concat_bn": concat_backward,
}
