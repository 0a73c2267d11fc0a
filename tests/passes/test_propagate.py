"""Rule ``propagate``: move an affine through commuting ops to where it folds (only when it ends in folds)."""

from __future__ import annotations

import torch
from harness import ops, reasons, run_passes
from helpers import randomize_bn
from torch import nn

from bnfold.passes import Canonicalize, Category, FoldIntoProducer, Propagate


def test_pushed_forward_through_flatten(capture_mode: str) -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(),
                                       nn.Linear(36, 5)))
    gm, (_, move) = run_passes(model, (torch.randn(2, 3, 5, 5),), capture_mode, Canonicalize(), Propagate())
    assert ops(gm) == ["conv2d", "relu", "flatten", "channel_affine", "linear"]
    assert move.changes[0].category is Category.MOVE


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x) + self.b(x))


def test_pulled_back_into_both_residual_branches(capture_mode: str) -> None:
    gm, _ = run_passes(randomize_bn(Residual()), (torch.randn(2, 3, 6, 6),), capture_mode, Canonicalize(),
                       Propagate(), FoldIntoProducer())
    assert ops(gm) == ["conv2d", "conv2d", "add"]


def test_negative_relu_with_shift_is_left(capture_mode: str) -> None:
    bn = randomize_bn(nn.BatchNorm2d(4))
    with torch.no_grad():
        bn.weight.abs_().add_(0.1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), bn).eval()
    gm, (_, move) = run_passes(model, (torch.randn(2, 3, 8, 8),), capture_mode, Canonicalize(), Propagate())
    assert ops(gm) == ["conv2d", "relu", "channel_affine"]  # Expected = Before (canonicalized)
    assert "ReLU" in reasons(move)[0]
