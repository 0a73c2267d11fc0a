"""Small models for the int8 tests: a depthwise-separable net whose BatchNorm statistics spread the folded weight
ranges over orders of magnitude (what makes per-tensor int8 hard), and its calibration data."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ds_net", "images"]


def ds_net(seed: int = 0) -> nn.Module:
    """conv 3x3 → (depthwise 3x3-BN-ReLU6, pointwise 1x1-BN-ReLU) × 2 → avg pool → linear, BN variances
    10^U(-2, 2) per channel."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()]
    for cin, cout in ((8, 16), (16, 16)):
        layers += [nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
                   nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_var.copy_(10.0 ** ((torch.rand(c, generator=g) * 2 - 1) * 2))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.25 * torch.randn(c, generator=g))
    return model.eval()


def images(n: int, seed: int = 1, size: int = 12) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
