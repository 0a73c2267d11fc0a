"""Rule ``lower_affines``: an affine no rule folds becomes x + b, x * a or addcmul(b, x, a) — never the BN formula."""

from __future__ import annotations

import torch
from harness import ops, run_passes
from helpers import randomize_bn
from torch import nn

from bnfold.passes import Canonicalize, Category, LowerAffines


def test_leftover_affine_is_lowered_to_addcmul(capture_mode: str) -> None:
    model = randomize_bn(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU()))
    gm, (_, low) = run_passes(model, (torch.randn(2, 4, 3, 3),), capture_mode, Canonicalize(), LowerAffines())
    assert ops(gm) == ["relu", "addcmul", "relu"]
    assert low.changes[0].category is Category.LOWER


def test_pure_shift_is_lowered_to_add(capture_mode: str) -> None:
    bn = nn.BatchNorm2d(4, affine=False, eps=0.0)
    bn.running_mean.copy_(torch.randn(4))
    model = nn.Sequential(nn.ReLU(), bn).eval()
    gm, _ = run_passes(model, (torch.randn(2, 4, 3, 3),), capture_mode, Canonicalize(), LowerAffines())
    assert ops(gm) == ["relu", "add"]


def test_negative_graph_without_affines_is_unchanged(capture_mode: str) -> None:
    gm, (low,) = run_passes(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (torch.randn(1, 3, 5, 5),), capture_mode,
                            LowerAffines())
    assert ops(gm) == ["conv2d", "relu"] and not low.modified
