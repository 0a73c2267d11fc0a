"""Train DigitsNet on the shipped digits and write ``digits_cnn.pt`` (deterministic; ~20 s on 2 cores).

    python -m bnfold.demo.train [--epochs 40] [--out bnfold/demo/digits_cnn.pt]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from bnfold.demo.data import load_digits
from bnfold.demo.model import DigitsNet

M = TypeVar("M", bound=nn.Module)


def train(epochs: int = 40, seed: int = 0, make_model: Callable[[], M] = DigitsNet) -> M:  # type: ignore[assignment]
    """``make_model()`` (built right after seeding, so a seed gives one set of weights) trained on the digits:
    AdamW, cosine schedule, batches of 64 with mild Gaussian noise; returned in eval mode."""
    torch.manual_seed(seed)
    data = load_digits()
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(data.y_train), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            x = data.x_train[idx]
            x = x + 0.05 * torch.randn(x.shape, generator=g)  # mild augmentation
            loss = F.cross_entropy(model(x), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--out", default=str(Path(__file__).with_name("digits_cnn.pt")))
    args = ap.parse_args()
    model = train(args.epochs)
    data = load_digits()
    with torch.no_grad():
        acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    torch.save(model.state_dict(), args.out)
    print(f"test accuracy {acc:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
