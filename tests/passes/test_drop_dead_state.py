"""Pass ``drop_dead_state``: after folding, the pre-fold parameters and buffers are gone from the module."""

from __future__ import annotations

import torch
from harness import run_passes
from helpers import randomize_bn
from torch import nn

from bnfold.passes import Canonicalize, Category, DropDeadState, FoldIntoProducer


def test_folded_batchnorm_state_is_dropped(capture_mode: str) -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    gm, (*_, drop) = run_passes(model, (torch.randn(2, 3, 6, 6),), capture_mode, Canonicalize(), FoldIntoProducer(),
                                DropDeadState())
    names = {n for n, _ in gm.named_buffers()} | {n for n, _ in gm.named_parameters()}
    assert not any("running" in n for n in names), names
    if capture_mode == "symbolic":
        assert drop.changes and drop.changes[0].category is Category.CLEANUP


def test_negative_nothing_dead_changes_nothing(capture_mode: str) -> None:
    _, (drop,) = run_passes(nn.Sequential(nn.Conv2d(3, 4, 3)), (torch.randn(1, 3, 5, 5),), capture_mode,
                             DropDeadState())
    assert not drop.modified
