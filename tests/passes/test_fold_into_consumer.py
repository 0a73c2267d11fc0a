"""Rule ``fold_into_consumer``: conv(A(x)) → conv'(x); a zero-padded conv takes the scale only."""

from __future__ import annotations

import torch
from harness import ops, reasons, run_passes
from helpers import randomize_bn
from torch import nn

from bnfold.passes import Canonicalize, Category, FoldIntoConsumer


def test_affine_folds_into_linear(capture_mode: str) -> None:
    model = randomize_bn(nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 3)))
    gm, (_, fold) = run_passes(model, (torch.randn(4, 6),), capture_mode, Canonicalize(), FoldIntoConsumer())
    assert ops(gm) == ["linear"]
    assert fold.changes[0].category is Category.FOLD


def test_affine_folds_into_unpadded_conv(capture_mode: str) -> None:
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, groups=2)))
    gm, _ = run_passes(model, (torch.randn(2, 4, 7, 7),), capture_mode, Canonicalize(), FoldIntoConsumer())
    assert ops(gm) == ["conv2d"]


def test_zero_padded_conv_takes_the_scale_and_the_shift_stays(capture_mode: str) -> None:
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)))
    gm, (_, fold) = run_passes(model, (torch.randn(2, 4, 7, 7),), capture_mode, Canonicalize(), FoldIntoConsumer())
    assert ops(gm) == ["channel_affine", "conv2d"]  # x + b/a, then the conv with the scale folded in
    assert "scale only" in fold.changes[0].detail


def test_negative_identity_scale_before_zero_padded_conv_is_left(capture_mode: str) -> None:
    bn = nn.BatchNorm2d(4, affine=False, eps=0.0)
    model = nn.Sequential(bn, nn.Conv2d(4, 6, 3, padding=1)).eval()
    bn.running_var.fill_(1.0)
    bn.running_mean.copy_(torch.randn(4))
    gm, (_, fold) = run_passes(model, (torch.randn(2, 4, 7, 7),), capture_mode, Canonicalize(), FoldIntoConsumer())
    assert ops(gm) == ["channel_affine", "conv2d"]  # Expected = Before (canonicalized)
    assert "pads with zeros" in reasons(fold)[0]


def test_negative_consumer_is_not_linear(capture_mode: str) -> None:
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()))
    gm, (_, fold) = run_passes(model, (torch.randn(2, 4, 3, 3),), capture_mode, Canonicalize(), FoldIntoConsumer())
    assert ops(gm) == ["channel_affine", "relu"]
    assert "not a conv/linear" in reasons(fold)[0]
