"""Value uses vs metadata uses (:mod:`bnfold.ir.uses`): reading ``x.shape`` / ``x.ndim`` / ``x.size()`` /
the shape argument of ``reshape_as`` never blocks a fold, in either capture mode; a real second value use does."""

from __future__ import annotations

import torch
from harness import ops, reasons, run_passes
from helpers import randomize_bn
from torch import nn

import bnfold
from bnfold.ir.uses import value_users
from bnfold.parity import compare
from bnfold.passes import Canonicalize, FoldIntoConsumer, FoldIntoProducer


class ShapeReaders(nn.Module):
    """timm's BatchNormAct2d asserts ``x.ndim``; ViT/Llama attention unpacks ``B, N, C = x.shape``; LeViT ends in
    ``reshape_as(x)``: every use of the conv output besides the BN reads only its metadata."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        torch._assert(y.ndim == 4, "expected a 4-D tensor")
        b, c, h, w = y.shape
        z = self.bn(y).reshape(b, c, h * w).transpose(1, 2)
        return self.fc(z).reshape_as(z) + z.size(1)


class ValueReader(ShapeReaders):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = self.conv(x)
        return self.bn(y) + y.mean()  # a second *value* use of the conv output


class ConsumerShapeReader(nn.Module):
    """The BN's own output is read for its shape and by a conv: folding into the consumer keeps that shape."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.bn(x)
        return self.conv(z) * z.shape[-1]


def test_shape_readers_do_not_block_the_producer_fold(capture_mode: str) -> None:
    model, x = randomize_bn(ShapeReaders()), torch.randn(2, 3, 8, 8)
    gm, (_, fold) = run_passes(model, (x,), capture_mode, Canonicalize(), FoldIntoProducer())
    assert "channel_affine" not in ops(gm) and "batch_norm" not in ops(gm)
    assert len(fold.changes) == 1 and not fold.rejections
    conv = next(n for n in gm.graph.nodes if (n.op == "call_module" and n.target == "conv")
                or (n.op == "call_function" and "conv2d" in str(n.target)))
    assert len(value_users(conv)) == 1  # the reshape; the rest read metadata


def test_shape_reader_of_the_affine_does_not_block_the_consumer_fold(capture_mode: str) -> None:
    model, x = randomize_bn(ConsumerShapeReader()), torch.randn(2, 3, 5, 5)
    gm, (_, fold) = run_passes(model, (x,), capture_mode, Canonicalize(), FoldIntoConsumer())
    assert "channel_affine" not in ops(gm) and len(fold.changes) == 1


def test_negative_a_second_value_use_blocks_and_is_named(capture_mode: str) -> None:
    gm, (_, fold) = run_passes(randomize_bn(ValueReader()), (torch.randn(2, 3, 8, 8),), capture_mode,
                               Canonicalize(), FoldIntoProducer())
    assert "channel_affine" in ops(gm)
    (why,) = reasons(fold)
    assert "also feeds" in why and "getattr" not in why and "size" not in why


def test_both_captures_fold_the_same_set_and_stay_exact() -> None:
    model, x = randomize_bn(ShapeReaders()), torch.randn(2, 3, 8, 8)
    folded = {}
    for mode in ("symbolic", "export"):
        result = bnfold.fold(model, (x,), capture=mode, check=False)
        folded[mode] = sorted(e.path for e in result.report.folded)
        assert not result.report.skipped, result.report.skipped
        assert compare(model, result.module, (x,), batch_independence=False).passed
    assert folded["symbolic"] == folded["export"] == ["bn"]
