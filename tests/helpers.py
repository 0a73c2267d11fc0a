"""Helpers shared by tests (import as ``from helpers import randomize_bn``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["as_batch", "count_batchnorm", "onnx_conv_bn", "randomize_bn", "write_images"]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters (default stats hide bugs:
    mean 0 / var 1 make folding nearly an identity). Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 2.0 + 0.1)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(c, generator=g))
                    m.bias.copy_(torch.randn(c, generator=g) * 0.5)
            for name in ("weight", "bias", "running_mean", "running_var"):
                # torchvision FrozenBatchNorm2d keeps all four as buffers
                if type(m).__name__ == "FrozenBatchNorm2d":
                    t = getattr(m, name)
                    if name == "running_var":
                        t.copy_(torch.rand(t.shape, generator=g) * 2.0 + 0.1)
                    else:
                        t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    return model.eval()


def onnx_conv_bn(seed: int = 0, *, batch: int | str = "batch", channels: int = 4) -> Any:
    """An ONNX ``Conv(3→channels, 3×3, pad 1) → BatchNormalization → Relu`` on ``(batch, 3, 8, 8)`` (opset 17),
    random weights and statistics: a model the ONNX fold folds, built without an exporter (``channels=16``: a
    1.7 KiB weight, which a model written with external data keeps outside)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def init(name: str, a: Any) -> Any:
        return numpy_helper.from_array(np.asarray(a, np.float32), name)

    c = channels
    inits = [init("W", rng.standard_normal((c, 3, 3, 3))), init("B", rng.standard_normal(c) * 0.1),
             init("gamma", rng.standard_normal(c)), init("beta", rng.standard_normal(c) * 0.5),
             init("mean", rng.standard_normal(c) * 0.5), init("var", rng.uniform(0.1, 2.0, c))]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                               [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, c, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bnfold-tests")
    onnx.checker.check_model(model, full_check=True)
    return model


def count_batchnorm(gm: torch.fx.GraphModule) -> int:
    """BatchNorm ops (any form) still in a graph."""
    from bnfold.ir.batchnorm import find_batchnorm_sites

    return len(find_batchnorm_sites(gm))


def fold_and_check(model: nn.Module, inputs: tuple[torch.Tensor, ...], capture: str, *, folded: int,
                   left: int = 0, rtol: float = 1e-4, atol: float = 1e-5):
    """Fold, assert the candidate counts, and check parity against the unfolded model and float64."""
    import bnfold
    from bnfold.parity import compare

    result = bnfold.fold(model, inputs, capture=capture)
    report = result.report
    assert len(report.folded) == folded, report
    assert len(report.skipped) == left, report
    with torch.no_grad():
        expected = model(*inputs)
        got = result.module(*inputs)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    parity = compare(model, result.module, inputs)
    assert parity.passed, parity.to_dict()
    return result


def tiny_vit() -> nn.Module:
    """torchvision's VisionTransformer, tiny, with non-trivial LayerNorm affines. Symbolic tracing keeps
    ``nn.MultiheadAttention`` as one module, so its input LayerNorm has no linear to fold into; export sees the
    in-projection as a linear and folds it."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                          num_classes=10).eval()
    for mod in m.modules():
        if isinstance(mod, nn.LayerNorm):
            nn.init.normal_(mod.weight)
            nn.init.normal_(mod.bias)
    return m


def conv_layouts(mod: Any) -> list[tuple[int, str, str]]:
    """``(groups, data layout, kernel layout)`` of every ``relax.nn.conv2d`` call in ``mod["main"]``."""
    import tvm
    from tvm import relax

    found = []

    def visit(e: relax.Expr) -> None:
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.nn.conv2d":
            found.append((int(e.attrs.groups), str(e.attrs.data_layout), str(e.attrs.kernel_layout)))

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def compile_untuned_and_check(model: nn.Module, gm: torch.fx.GraphModule, x: torch.Tensor, mcpu: str | None,
                              cache_dir: object) -> object:
    """Compile ``gm`` for the CPU with bnfold's hand schedules (``mcpu``: None for the host's ISA; skipped when
    the host cannot run it; a kernel left without any schedule is an error) and check the artifact against the
    folded model (bnfold's parity rule) and against ``model`` run in float64. Returns the artifact."""
    import copy
    import warnings

    import pytest

    import bnfold
    from bnfold.targets.tvm import UntunedKernelsWarning, compile
    from bnfold.targets.tvm.isa import host_cpu_flags

    flags = host_cpu_flags()
    if mcpu == "x86-64-v3" and (not flags or "avx2" not in flags):
        pytest.skip("this host cannot run AVX2 code")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntunedKernelsWarning)
        art = compile(gm, (x,), mcpu=mcpu, cache_dir=cache_dir)
    assert bnfold.compare(gm, art, (x,)).passed
    reference = copy.deepcopy(model).double()(x.double())
    torch.testing.assert_close(art(x).double(), reference, rtol=1e-4, atol=1e-4)
    return art


def write_images(folder: Any, n: int = 12, size: tuple[int, int] = (8, 8), *, gray_every: int = 0,
                 fmt: str = "png", seed: int = 0) -> list[Any]:
    """``n`` random images in two class folders (some one level deeper; every ``gray_every``-th grayscale); returns
    their pixels (H, W, 3 — gray repeated) in the sorted order bnfold reads them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = []
    for i in range(n):
        sub = folder / f"class{i % 2}" / ("deep" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        gray = gray_every and i % gray_every == 0
        arr = rng.integers(0, 256, (*size, 1 if gray else 3), dtype=np.uint8)
        img = Image.fromarray(arr[..., 0] if gray else arr)
        img.save(sub / f"img{i:03d}.{fmt}")
        pixels.append((str(sub / f"img{i:03d}.{fmt}"), np.repeat(arr, 3, axis=2) if gray else arr))
    return [p for _, p in sorted(pixels, key=lambda t: t[0])]


def as_batch(pixels: list[Any]) -> torch.Tensor:
    """Pixels from :func:`write_images` as one contiguous float batch in [0, 1]."""
    import numpy as np

    return (torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255.0).contiguous()
