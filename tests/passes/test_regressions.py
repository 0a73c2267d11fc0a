"""Regression tests named after upstream bugs this project must not repeat."""

from __future__ import annotations

import torch
from helpers import count_batchnorm, fold_and_check, randomize_bn
from torch import nn

import bnfold
from bnfold.parity import Tolerance, rounding_depth


class SharedConvModule(nn.Module):
    """pytorch#104593 / #197539: a conv module reused at two call sites, only one followed by BN.
    fx fusion wrote the fused weights into the shared module, corrupting the other call site."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x.flip(-1))


def test_pytorch_104593_reused_conv_module_is_not_overwritten(capture_mode: str) -> None:
    model = randomize_bn(SharedConvModule())
    result = fold_and_check(model, (torch.randn(2, 3, 6, 6),), capture_mode, folded=1)
    assert count_batchnorm(result.module) == 0


def test_pytorch_197539_shared_module_other_site_unchanged() -> None:
    model = randomize_bn(SharedConvModule())
    x = torch.randn(2, 3, 6, 6)
    folded = bnfold.fold(model, (x,), capture="symbolic").module
    sites = [n for n in folded.graph.nodes if n.op == "call_module"]
    assert len({n.target for n in sites}) == 2  # the folded site got its own clone
    plain = next(n for n in sites if n.target == "conv")
    assert torch.equal(folded.get_submodule(str(plain.target)).weight, model.conv.weight)


def test_pytorch_180995_grouped_conv_transpose_bn_fold(capture_mode: str) -> None:
    """pytorch#180995: fusing BN into a grouped ConvTranspose crashed (weight layout (in, out/groups, k…))."""
    model = randomize_bn(nn.Sequential(nn.ConvTranspose2d(6, 9, 3, stride=2, groups=3, output_padding=1),
                                       nn.BatchNorm2d(9)))
    fold_and_check(model, (torch.randn(2, 6, 4, 4),), capture_mode, folded=1)


def test_onnxruntime_14270_bn_after_conv_transpose_is_fused(capture_mode: str) -> None:
    """onnxruntime#14270: BN after ConvTranspose was not fused."""
    model = randomize_bn(nn.Sequential(nn.ConvTranspose2d(4, 4, 2, stride=2), nn.BatchNorm2d(4)))
    result = fold_and_check(model, (torch.randn(1, 4, 5, 5),), capture_mode, folded=1)
    assert result.report.folded[0].rule == "fold_into_producer"


def test_pytorch_120545_half_precision_fold_does_not_grow_error(capture_mode: str) -> None:
    """pytorch#120545: fp16/bf16 conv-BN folding drifted ~10x; folding in float64 and casting once must not: the
    folded model passes the float64 parity rule for its dtype (3x the unfolded model's own error + floor), which a
    10x drift fails whichever half-precision kernels the host has (AMX, AVX-512 bf16, AVX2 emulation)."""
    import torchvision

    for dtype in (torch.float16, torch.bfloat16):
        model = randomize_bn(torchvision.models.resnet18()).to(dtype)
        x = torch.randn(2, 3, 32, 32).to(dtype)
        result = bnfold.fold(model, (x,), capture=capture_mode)
        assert result.report.skipped == []
        assert all(p.dtype == dtype for p in result.module.parameters())
        with torch.no_grad():
            ref64 = model.double()(x.double())
            model.to(dtype)
            e_orig = float((model(x).double() - ref64).norm() / ref64.norm())
            e_fold = float((result.module(x).double() - ref64).norm() / ref64.norm())
        tol = Tolerance.for_dtype(dtype, rounding_depth(model))
        assert e_fold <= tol.bound(e_orig, 1.0), (dtype, e_fold, e_orig)
