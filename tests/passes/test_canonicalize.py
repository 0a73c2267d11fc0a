"""Rule ``canonicalize``: every inference BatchNorm becomes one channel_affine; unusable ones stay, with the reason."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from harness import ops, reasons, run_passes
from helpers import randomize_bn
from torch import nn

from bnfold.ir.affine_view import affine_view
from bnfold.passes import Canonicalize, Category


def before() -> nn.Module:
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))


EXPECTED = ["conv2d", "channel_affine", "relu"]


def test_batchnorm_becomes_channel_affine(capture_mode: str) -> None:
    model = before()
    gm, (result,) = run_passes(model, (torch.randn(2, 3, 6, 6),), capture_mode, Canonicalize())
    assert ops(gm) == EXPECTED
    (change,) = result.changes
    assert change.category is Category.CANONICALIZE and change.sources == (result.candidates[0].id,)
    (affine,) = [n for n in gm.graph.nodes if affine_view(gm, n) is not None]
    bn = model[1]
    a = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    torch.testing.assert_close(affine_view(gm, affine).a, a, rtol=0, atol=0)  # exact float64


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.mean, self.var, training=False, eps=1e-3)


def test_functional_batch_norm_becomes_channel_affine(capture_mode: str) -> None:
    gm, _ = run_passes(Functional().eval(), (torch.randn(2, 4, 5),), capture_mode, Canonicalize())
    assert ops(gm) == ["channel_affine"]


def test_negative_training_mode_is_left_with_reason() -> None:
    model = before()
    model[1].train()
    x = torch.randn(2, 3, 6, 6)
    gm, (result,) = run_passes(model, (x,), "symbolic", Canonicalize())
    assert ops(gm) == ["conv2d", "batch_norm", "relu"]  # Expected = Before
    assert not result.modified and "training mode" in reasons(result)[0]


def test_negative_non_finite_statistics_are_left_with_reason(capture_mode: str) -> None:
    model = before()
    with torch.no_grad():
        model[1].running_mean[1] = float("inf")
    gm = run_passes(model, (torch.randn(2, 3, 6, 6),), capture_mode)[0]
    from harness import apply

    (result,) = apply(gm, Canonicalize())
    assert ops(gm) == ["conv2d", "batch_norm", "relu"]
    assert "non-finite" in reasons(result)[0]


def test_negative_negative_variance_is_left_with_reason() -> None:
    model = before()
    with torch.no_grad():
        model[1].running_var[0] = -1.0
    from harness import apply

    from bnfold.capture import capture

    gm = capture(model, (torch.randn(2, 3, 6, 6),), "symbolic").module
    (result,) = apply(gm, Canonicalize())
    assert ops(gm) == ["conv2d", "batch_norm", "relu"]
    assert "negative running_var" in reasons(result)[0]
