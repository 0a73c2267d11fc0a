"""The shipped digits data (8x8 grayscale, 10 classes) and a deterministic distribution shift for demos."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DigitsData", "load_digits", "shift_images"]


@dataclass(frozen=True)
class DigitsData:
    x_train: torch.Tensor  # (N, 1, 8, 8) float32 in [0, 1]
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits() -> DigitsData:
    """Load ``digits.npz`` from the package (no network)."""
    with resources.files("bnfold.demo").joinpath("digits.npz").open("rb") as f:
        z = np.load(f)
        arrays = {k: z[k] for k in z.files}

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 16.0).unsqueeze(1)

    return DigitsData(images(arrays["x_train"]), torch.from_numpy(arrays["y_train"].astype(np.int64)),
                      images(arrays["x_test"]), torch.from_numpy(arrays["y_test"].astype(np.int64)))


def shift_images(x: torch.Tensor, *, contrast: float = 0.5, brightness: float = 0.3, blur: float = 0.6,
                 seed: int = 0, noise: float = 0.05) -> torch.Tensor:
    """A deployment-style shift: lower contrast, raised brightness, Gaussian blur, sensor noise."""
    k = torch.tensor([blur, 1.0, blur])
    k = (k[:, None] * k[None, :]) / (k.sum() ** 2)
    y = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.view(1, 1, 3, 3).to(x.dtype))
    g = torch.Generator().manual_seed(seed)
    y = contrast * y + brightness + noise * torch.randn(y.shape, generator=g, dtype=y.dtype)
    return y.clamp(0.0, 1.5)
