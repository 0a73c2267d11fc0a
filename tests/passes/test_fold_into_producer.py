"""Rule ``fold_into_producer``: A(conv(x)) → conv'(x), W' = a·W, b' = a·b + b_A (float64, cast once)."""

from __future__ import annotations

import torch
from harness import ops, reasons, run_passes
from helpers import randomize_bn
from torch import nn

from bnfold.passes import Canonicalize, Category, FoldIntoProducer


def test_affine_folds_into_conv(capture_mode: str) -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.BatchNorm2d(4), nn.ReLU()))
    gm, (_, fold) = run_passes(model, (torch.randn(2, 3, 6, 6),), capture_mode, Canonicalize(), FoldIntoProducer())
    assert ops(gm) == ["conv2d", "relu"]
    (change,) = fold.changes
    assert change.category is Category.FOLD and change.into


def test_affine_folds_into_grouped_conv_transpose(capture_mode: str) -> None:
    model = randomize_bn(nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)))
    gm, _ = run_passes(model, (torch.randn(2, 4, 4, 4),), capture_mode, Canonicalize(), FoldIntoProducer())
    assert ops(gm) == ["conv_transpose2d"]


def test_weight_is_rounded_once_from_float64() -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    gm, _ = run_passes(model, (torch.randn(2, 3, 6, 6),), "symbolic", Canonicalize(), FoldIntoProducer())
    conv, bn = model
    a = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    expected = (conv.weight.double() * a.reshape(-1, 1, 1, 1)).float()
    assert torch.equal(gm.get_submodule("0").weight, expected)


class OtherUser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return self.bn(y), y


def test_negative_producer_with_other_users_is_left(capture_mode: str) -> None:
    gm, (_, fold) = run_passes(randomize_bn(OtherUser()), (torch.randn(2, 3, 6, 6),), capture_mode, Canonicalize(),
                               FoldIntoProducer())
    assert ops(gm) == ["conv2d", "channel_affine"]  # Expected = Before (canonicalized)
    assert "also feeds" in reasons(fold)[0]


def test_negative_input_is_not_a_conv(capture_mode: str) -> None:
    gm, (_, fold) = run_passes(randomize_bn(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4))), (torch.randn(2, 4, 3, 3),),
                               capture_mode, Canonicalize(), FoldIntoProducer())
    assert ops(gm) == ["relu", "channel_affine"]
    assert "not a conv/linear output" in reasons(fold)[0]


def test_in_place_only_for_owned_unshared_weights() -> None:
    """A weight is overwritten in place only when the graph owns its state and no other slot shares the storage."""
    from bnfold.capture import capture
    from bnfold.passes import PassContext

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3)))
    gm = capture(model, (torch.randn(1, 3, 7, 7),), "symbolic").module
    assert PassContext(gm, owns_state=True).writable(gm.get_submodule("0").weight)
    assert not PassContext(gm, owns_state=False).writable(gm.get_submodule("0").weight)
    gm.get_submodule("2").weight = gm.get_submodule("0").weight  # tied: two slots, one storage
    assert not PassContext(gm, owns_state=True).writable(gm.get_submodule("0").weight)


def test_in_place_fold_gives_the_same_bits_as_a_fresh_one() -> None:
    from bnfold.api import fold_captured
    from bnfold.capture import capture

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    x = torch.randn(2, 3, 6, 6)
    owned = fold_captured(capture(model, (x,), "symbolic"))  # the copy is ours: written in place
    original, saved = model[0].weight, model[0].weight.detach().clone()
    fresh = fold_captured(capture(model, (x,), "symbolic", copy_model=False))  # the caller's tensors
    assert torch.equal(owned.module.get_submodule("0").weight, fresh.module.get_submodule("0").weight)
    assert torch.equal(original, saved)  # never written in place
