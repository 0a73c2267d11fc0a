"""A user's own data code, as ``--data-factory bench_data_factory:loader`` runs it (bench/bench_data_stream.py).

``loader(root, batch_size)`` returns a ``torch.utils.data.DataLoader`` over every PNG under ``root``: each image
decoded with PIL, centre-cropped to 28×28, scaled to [0, 1] and normalized with mean 0.5, std 0.25; labels are
dropped (calibration takes inputs only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class Pngs(Dataset):
    def __init__(self, root: str) -> None:
        self.files = sorted(str(p) for p in Path(root).rglob("*.png"))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[i]) as img:
            a = np.asarray(img.convert("RGB"), dtype=np.float32)[2:30, 2:30] / 255.0
        return (torch.from_numpy(a).permute(2, 0, 1) - 0.5) / 0.25


def loader(root: str, batch_size: int = 32) -> DataLoader:
    return DataLoader(Pngs(root), batch_size=batch_size, shuffle=False, num_workers=0)
