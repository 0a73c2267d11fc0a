"""Rule ``merge_affines``: A2(A1(x)) = (a2·a1) ⊙ x + (a2·b1 + b2); identities vanish."""

from __future__ import annotations

import torch
from harness import ops, run_passes
from helpers import randomize_bn
from torch import nn

from bnfold.passes import Canonicalize, Category, MergeAffines


def test_consecutive_affines_merge(capture_mode: str) -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)))
    gm, (canon, merged) = run_passes(model, (torch.randn(2, 3, 6, 6),), capture_mode, Canonicalize(),
                                     MergeAffines())
    assert ops(gm) == ["conv2d", "channel_affine"]
    (change,) = merged.changes
    assert change.category is Category.CANONICALIZE
    assert set(change.sources) == {c.id for c in canon.candidates}  # the merged affine carries both


def test_identity_affine_vanishes(capture_mode: str) -> None:
    bn = nn.BatchNorm2d(4, affine=False, eps=0.0).eval()  # mean 0, var 1: the identity
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn).eval()
    gm, _ = run_passes(model, (torch.randn(2, 3, 6, 6),), capture_mode, Canonicalize(), MergeAffines())
    assert ops(gm) == ["conv2d"]


class Branching(nn.Module):
    """The first affine also feeds another op: merging would need two copies of it."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.bn1(x)
        return self.bn2(y), torch.relu(y)


def test_negative_affine_with_two_users_is_not_merged(capture_mode: str) -> None:
    gm, (_, merged) = run_passes(randomize_bn(Branching()), (torch.randn(2, 4, 5, 5),), capture_mode,
                                 Canonicalize(), MergeAffines())
    assert ops(gm) == ["channel_affine", "channel_affine", "relu"]  # Expected = Before (canonicalized)
    assert not merged.modified
