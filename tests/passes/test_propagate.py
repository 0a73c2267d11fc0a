"""Rule ``propagate``: move an affine through commuting ops to where it folds (only when it ends in folds)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from harness import ops, reasons, run_passes
from helpers import randomize_bn
from torch import nn

import bnfold
from bnfold.parity import compare
from bnfold.passes import Canonicalize, Category, FoldIntoConsumer, FoldIntoProducer, Propagate, SplitNormAffine


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


# -- paths opened for timm / transformer graphs (issue 12): each with its exactness condition and negative twin --


class CatThen1x1(nn.Module):
    """An affine on one input of a channel concat, after a ReLU (it cannot go back): it goes forward, with the
    identity on the other input, into the 1x1 conv after the concat."""

    def __init__(self, pad: int = 0) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)
        self.bn, self.out = nn.BatchNorm2d(4), nn.Conv2d(6, 5, 1, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.bn(torch.relu(self.a(x))), torch.relu(self.b(x))], dim=1))


def test_pushed_forward_through_a_channel_concat(capture_mode: str) -> None:
    gm, (_, move, fold) = run_passes(randomize_bn(CatThen1x1()), (torch.randn(2, 3, 6, 6),), capture_mode,
                                     Canonicalize(), Propagate(), FoldIntoConsumer())
    assert "channel_affine" not in ops(gm) and move.changes and fold.changes


class TokenConcat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.out = nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4), nn.Conv1d(4, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(torch.relu(self.a(x)))
        return self.out(torch.cat([y, torch.relu(self.a(x))], dim=2))  # along the length, not the channels


def test_negative_concat_along_another_axis_is_left(capture_mode: str) -> None:
    gm, (_, move) = run_passes(randomize_bn(TokenConcat()), (torch.randn(2, 3, 5),), capture_mode,
                               Canonicalize(), Propagate())
    assert "channel_affine" in ops(gm)
    assert any("another axis" in r for r in reasons(move))


class PadThenConv(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode, self.bn, self.conv = mode, nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.pad(self.bn(x), (1, 1, 1, 1), mode=self.mode))


def test_pushed_forward_through_replicate_pad_into_conv(capture_mode: str) -> None:
    gm, _ = run_passes(randomize_bn(PadThenConv("replicate")), (torch.randn(2, 3, 6, 6),), capture_mode,
                       Canonicalize(), Propagate(), FoldIntoConsumer())
    assert "channel_affine" not in ops(gm)


def test_zero_pad_passes_a_pure_scale_and_refuses_a_shift(capture_mode: str) -> None:
    model = randomize_bn(PadThenConv("constant"))
    with torch.no_grad():  # μ = 0, β = 0: b = β − μ·a = 0, a pure scale, which maps the zero padding to itself
        model.bn.bias.zero_()
        model.bn.running_mean.zero_()
    x = torch.randn(2, 3, 6, 6)
    gm, _ = run_passes(model, (x,), capture_mode, Canonicalize(), Propagate(), FoldIntoConsumer())
    assert "channel_affine" not in ops(gm)
    gm, (_, move, _) = run_passes(randomize_bn(PadThenConv("constant")), (x,), capture_mode, Canonicalize(),
                                  Propagate(), FoldIntoConsumer())
    assert "channel_affine" in ops(gm)
    assert any("pads with the constant 0" in r for r in reasons(move))


class ClassToken(nn.Module):
    """ViT's head: the last LayerNorm runs on every token, then the class token is selected for the head."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.head = nn.LayerNorm(8), nn.Linear(8, 3)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 2)
            self.norm.bias.uniform_(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x)[:, 0])


def test_norm_affine_pushed_through_the_class_token_select(capture_mode: str) -> None:
    gm, _ = run_passes(ClassToken().eval(), (torch.randn(2, 5, 8),), capture_mode, Canonicalize(),
                       SplitNormAffine(), Propagate(), FoldIntoConsumer())
    assert "channel_affine" not in ops(gm)


class LeViTBN(nn.Module):
    """LeViT's Linear → flatten(0, 1) → BatchNorm1d → reshape_as(x)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 8), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


def test_levit_batchnorm_folds_back_through_flatten_into_the_linear(capture_mode: str) -> None:
    gm, _ = run_passes(randomize_bn(LeViTBN()), (torch.randn(2, 5, 6),), capture_mode, Canonicalize(),
                       Propagate(), FoldIntoProducer())
    assert "channel_affine" not in ops(gm)


@pytest.mark.parametrize("make, shape", [
    (CatThen1x1, (2, 3, 6, 6)), (lambda: PadThenConv("replicate"), (2, 3, 6, 6)),
    (lambda: PadThenConv("constant"), (2, 3, 6, 6)), (ClassToken, (2, 5, 8)), (LeViTBN, (2, 5, 6)),
])
def test_new_paths_are_exact_through_the_whole_pipeline(make: Any, shape: tuple[int, ...], capture_mode: str
                                                        ) -> None:
    """The moves above, run by ``bnfold.fold``: every norm accounted for, parity against float64 passes."""
    model, x = randomize_bn(make()), torch.randn(*shape)
    result = bnfold.fold(model, (x,), capture=capture_mode, check=False)
    batches = [torch.randn(*shape) for _ in range(8)]  # an exported graph runs at its example's batch size
    report = compare(model, result.module, batches, batch_independence=False)
    assert report.passed, report
