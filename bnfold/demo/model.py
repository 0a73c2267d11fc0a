"""DigitsNet: a small CNN with BatchNorm in the usual places (after conv, after linear) and dropout (channel dropout
between the conv blocks, as many CNNs have it, and before the classifier)."""

from __future__ import annotations

from importlib import resources

import torch
from torch import nn

__all__ = ["DigitsNet", "load_pretrained"]


class DigitsNet(nn.Module):
    """conv-BN-ReLU ×2 → max-pool → channel dropout → conv-BN-ReLU → global avg-pool → linear-BN1d-ReLU → dropout →
    linear.

    The ``Dropout2d`` sits in front of a BatchNorm: a tool that measures statistics with the model in training mode
    (``torch.optim.swa_utils.update_bn``) measures that BatchNorm's input with a fifth of its channels zeroed and
    the rest scaled by 1.25, which is not what it sees at inference.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2), nn.Dropout2d(0.2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(4 * w, 64), nn.BatchNorm1d(64), nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_pretrained() -> DigitsNet:
    """DigitsNet with the committed trained weights (``digits_cnn.pt``, a state_dict), in eval mode."""
    model = DigitsNet()
    with resources.files("bnfold.demo").joinpath("digits_cnn.pt").open("rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
