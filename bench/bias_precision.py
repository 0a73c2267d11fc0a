"""Why some folded models are (slightly) less accurate than the unfolded ones under PyTorch CPU.

For conv → BN with randomized statistics, compare the rel-L2 error vs a float64 reference of:
the original conv + BN, the folded conv with its bias inside the conv, and the same folded weights with the
bias added after the conv. Prints one line per (kernel, groups) case, averaged over seeds.

    .venv/bin/python bench/bias_precision.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import randomize_bn

import bnfold


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def main() -> None:
    torch.manual_seed(0)
    x = torch.relu(torch.randn(4, 32, 16, 16))
    print(f"{'case':22s} {'original':>10s} {'bias in conv':>13s} {'bias after':>11s}")
    for k, groups, cout in [(1, 1, 64), (3, 1, 32), (3, 32, 32)]:
        rows = []
        for seed in range(5):
            model = randomize_bn(nn.Sequential(nn.Conv2d(32, cout, k, padding=k // 2, groups=groups, bias=False),
                                               nn.BatchNorm2d(cout)), seed)
            folded = bnfold.fold(model, (x,), check=False).module
            w = next(p for p in folded.parameters() if p.dim() == 4)
            b = next(p for p in folded.parameters() if p.dim() == 1)
            with torch.no_grad():
                ref = model.double()(x.double())
                model.float()
                rows.append((rel(model(x), ref), rel(F.conv2d(x, w, b, padding=k // 2, groups=groups), ref),
                             rel(F.conv2d(x, w, None, padding=k // 2, groups=groups) + b.view(1, -1, 1, 1), ref)))
        means = [statistics.mean(r[i] for r in rows) for i in range(3)]
        print(f"{f'{k}x{k} groups={groups}':22s} {means[0]:10.3g} {means[1]:13.3g} {means[2]:11.3g}")


if __name__ == "__main__":
    main()
