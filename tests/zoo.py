"""The torchvision model zoo used by the zoo test and ``bench/zoo.py``: random weights, randomized BN stats.

For each model: BNs in the model, BNs ``torch.fx.experimental.optimization.fuse`` leaves, BNs bnfold leaves
(and why), the error ratio ``rel_l2(folded, fp64) / rel_l2(original fp32, fp64)`` (the goal: ≤ 1 in the median;
one sample of rounding noise, so it is reported, not asserted) and the verdict of bnfold's float64 parity rule
(``bnfold.parity.Tolerance``: ``rel_l2(folded, fp64) ≤ 2 · rel_l2(original, fp64) + 17 · u · √D`` for fp32), which holds
whichever fp32 kernels the host runs.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from helpers import count_batchnorm, randomize_bn
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

import bnfold
from bnfold.parity import Tolerance, flatten_outputs, rounding_depth

tvm_ = torchvision.models


def _fpn() -> nn.Module:
    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d,
                               trainable_layers=5)


# name -> (constructor, input shape)
ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet18": (lambda: tvm_.resnet18(), (1, 3, 64, 64)),
    "resnet50": (lambda: tvm_.resnet50(), (1, 3, 64, 64)),
    "mobilenet_v2": (lambda: tvm_.mobilenet_v2(), (1, 3, 64, 64)),
    "mobilenet_v3_small": (lambda: tvm_.mobilenet_v3_small(), (2, 3, 64, 64)),
    "efficientnet_b0": (lambda: tvm_.efficientnet_b0(), (1, 3, 64, 64)),
    "regnet_y_400mf": (lambda: tvm_.regnet_y_400mf(), (1, 3, 64, 64)),
    "shufflenet_v2_x0_5": (lambda: tvm_.shufflenet_v2_x0_5(), (1, 3, 64, 64)),
    "mnasnet0_5": (lambda: tvm_.mnasnet0_5(), (1, 3, 64, 64)),
    "densenet121": (lambda: tvm_.densenet121(), (1, 3, 64, 64)),
    "googlenet": (lambda: tvm_.googlenet(aux_logits=False, init_weights=True), (1, 3, 64, 64)),
    "vgg11_bn": (lambda: tvm_.vgg11_bn(), (1, 3, 32, 32)),
    "resnext50_32x4d": (lambda: tvm_.resnext50_32x4d(), (1, 3, 64, 64)),
    "r3d_18": (lambda: tvm_.video.r3d_18(), (1, 3, 4, 32, 32)),
    "r2plus1d_18": (lambda: tvm_.video.r2plus1d_18(), (1, 3, 4, 32, 32)),
    "fcn_resnet50 (segmentation)": (lambda: tvm_.segmentation.fcn_resnet50(weights=None, weights_backbone=None,
                                                                          aux_loss=False), (1, 3, 64, 64)),
    "lraspp_mobilenet_v3 (segmentation)": (
        lambda: tvm_.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None), (1, 3, 64, 64)),
    "resnet18_fpn (detection, FrozenBN)": (_fpn, (1, 3, 64, 64)),
}

# the default run's subset: the two models whose folded error once broke a single-sample bound on an AVX2 host
# (resnet18, mobilenet_v2 and r3d_18 run by default in tests/test_api.py, four more in tests/test_parity_zoo.py)
FAST = ["googlenet", "resnet18_fpn (detection, FrozenBN)"]


@dataclass
class ZooRow:
    model: str
    capture: str
    bns: int
    left_by_fx_fuse: int | None
    left_by_bnfold: int
    why: str
    ratio: float
    passed: bool
    seconds: float


def n_batchnorm(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm | FrozenBatchNorm2d) for m in model.modules())


def left_by_fx_fuse(model: nn.Module) -> int | None:
    """BNs torch.fx.experimental.optimization.fuse leaves (None when it cannot trace the model)."""
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(copy.deepcopy(model))
    except Exception:
        return None
    return n_batchnorm(fused) if not isinstance(fused, torch.fx.GraphModule) else sum(
        1 for n in fused.graph.nodes if n.op == "call_module"
        and isinstance(fused.get_submodule(str(n.target)), nn.modules.batchnorm._BatchNorm))


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def run_model(name: str, capture: str, seed: int = 0) -> ZooRow:
    build, shape = ZOO[name]
    torch.manual_seed(seed)
    model = randomize_bn(build(), seed)
    x = torch.randn((max(shape[0], 2), *shape[1:]), generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    result = bnfold.fold(model, (x,), capture=capture, check=False)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        ref = flatten_outputs(model(x))
        got = flatten_outputs(result.module(x))
        ref64 = flatten_outputs(copy.deepcopy(model).double()(x.double()))
    tol = Tolerance.for_dtype(torch.float32, rounding_depth(model))
    ratios, passed = [], True
    for r, g, t in zip(ref, got, ref64, strict=True):
        e_orig, e_fold = rel_l2(r, t), rel_l2(g, t)
        ratios.append(e_fold / max(e_orig, 1e-300))
        passed &= e_fold <= tol.bound(e_orig, 1.0)  # rel_l2 is rmse / rms(t): the rule with rms(t) = 1
    left = len(result.report.skipped)
    assert count_batchnorm(result.module) <= left
    why = "; ".join(sorted({_short_reason(s.reason) for s in result.report.skipped}))
    return ZooRow(name, capture, n_batchnorm(model), left_by_fx_fuse(model) if capture == "symbolic" else None,
                  left, why, max(ratios), passed, seconds)


def _short_reason(reason: str) -> str:
    first = reason.split(";")[0].removeprefix("fold_into_producer: ")
    return first.split("'")[0] + "'…'" + first.split("'")[-1] if first.count("'") >= 2 else first


def format_rows(rows: list[ZooRow]) -> str:
    from bnfold.report import format_table

    return format_table(
        ["model", "capture", "BNs", "left by fx.fuse", "left by bnfold", "rel-L2 ratio", "parity", "fold s",
         "why left"],
        [[r.model, r.capture, r.bns, "n/a" if r.left_by_fx_fuse is None else r.left_by_fx_fuse, r.left_by_bnfold,
          f"{r.ratio:.3f}", "pass" if r.passed else "FAIL", f"{r.seconds:.1f}", r.why or "-"] for r in rows])
