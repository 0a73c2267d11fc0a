"""LayerNorm / RMSNorm / GroupNorm: the affine part folds into the following linear/conv, or stays whole."""

from __future__ import annotations

import torch
import torchvision
from helpers import fold_and_check
from torch import nn


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) and m.weight is not None:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()


class Attention(nn.Module):
    """Pre-norm block: one LayerNorm feeding two linears (q, k); RMSNorm before the output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8, bias=False)
        self.rms = nn.RMSNorm(8)
        self.o = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return self.o(self.rms(self.q(h) * self.k(h)))


def test_layernorm_and_rmsnorm_fold_into_following_linears(capture_mode: str) -> None:
    result = fold_and_check(randomize_norms(Attention()), (torch.randn(2, 5, 8),), capture_mode, folded=2)
    assert {e.rule for e in result.report.folded} == {"fold_into_consumer"}


class NormThenRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.ln(x))


def test_layernorm_before_nonlinearity_stays_whole(capture_mode: str) -> None:
    model = randomize_norms(NormThenRelu())
    result = fold_and_check(model, (torch.randn(2, 8),), capture_mode, folded=0, left=1)
    assert "stays in the norm" in result.report.skipped[0].reason
    assert not result.report.modified  # split and undone: the graph is unchanged


def test_groupnorm_into_pointwise_conv(capture_mode: str) -> None:
    model = randomize_norms(nn.Sequential(nn.GroupNorm(2, 4), nn.Conv2d(4, 6, 1)))
    fold_and_check(model, (torch.randn(2, 4, 5, 5),), capture_mode, folded=1)


def test_instancenorm_into_pointwise_conv(capture_mode: str) -> None:
    model = nn.Sequential(nn.InstanceNorm2d(4, affine=True), nn.Conv2d(4, 6, 1)).eval()
    with torch.no_grad():
        model[0].weight.normal_()
        model[0].bias.normal_()
    fold_and_check(model, (torch.randn(2, 4, 5, 5),), capture_mode, folded=1)


def test_groupnorm_into_zero_padded_conv_stays_whole(capture_mode: str) -> None:
    model = randomize_norms(nn.Sequential(nn.GroupNorm(2, 4), nn.Conv2d(4, 6, 3, padding=1)))
    result = fold_and_check(model, (torch.randn(2, 4, 5, 5),), capture_mode, folded=0, left=1)
    assert "pads with zeros" in result.report.skipped[0].reason


def test_small_vision_transformer(capture_mode: str) -> None:
    import bnfold

    model = randomize_norms(torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64))
    with torch.no_grad():
        model.heads.head.weight.normal_()  # zero-initialised by torchvision: make the output informative
    x = torch.randn(2, 3, 32, 32)
    n = len(bnfold.inspect(model, (x,), capture=capture_mode).folded)
    # the MLP LayerNorms always fold into fc1 and the final LayerNorm into the head through the class-token select;
    # export also sees the attention in-projections as linears, so all five fold
    assert n >= 3 if capture_mode == "symbolic" else n == 5
    fold_and_check(model, (x,), capture_mode, folded=n, left=5 - n)


def test_convnext_layernorms(capture_mode: str) -> None:
    """torchvision's ConvNeXt, two stages of two blocks (convnext_tiny's structure at a fraction of its size):
    each block's LN folds into pwconv1, the downsampling LN2d into its conv, the classifier's LN into the head.
    Each block's LayerScale (``layer_scale * x``, a per-channel scale by a parameter) is a candidate too; it feeds
    the residual add (through ``stochastic_depth``, opaque to the symbolic tracer), so it is left."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    model = randomize_norms(ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], num_classes=10))
    result = fold_and_check(model, (torch.randn(1, 3, 32, 32),), capture_mode, folded=6, left=5)
    (stem,) = [e for e in result.report.skipped if "layer_norm" in e.kind.lower()]
    assert "users" in stem.reason  # the stem LN output also feeds a residual add
    scales = [e for e in result.report.skipped if "layer_scale" in e.kind]
    assert len(scales) == 4 and all("which is not a conv/linear" in e.reason for e in scales)


# -- the rule run directly (Before / Expected) --------------------------------------------------------------------

def test_split_rule_layernorm_before_linear(capture_mode: str) -> None:
    from harness import ops, run_passes

    from bnfold.passes import Category, SplitNormAffine

    model = randomize_norms(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 3)))
    gm, (split,) = run_passes(model, (torch.randn(2, 8),), capture_mode, SplitNormAffine())
    assert ops(gm) == ["layer_norm", "channel_affine", "linear"]
    assert split.changes[0].category is Category.CANONICALIZE and len(split.candidates) == 1


def test_split_rule_negative_layernorm_before_relu(capture_mode: str) -> None:
    from harness import ops, reasons, run_passes

    from bnfold.passes import SplitNormAffine

    gm, (split,) = run_passes(randomize_norms(NormThenRelu()), (torch.randn(2, 8),), capture_mode, SplitNormAffine())
    assert ops(gm) == ["layer_norm", "relu"]  # Expected = Before: nothing split to be tested
    assert not split.modified and "stays in the norm" in reasons(split)[0]
