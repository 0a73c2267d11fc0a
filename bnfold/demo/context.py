"""What the demo's stages share: the :class:`DemoContext` each stage reads and extends, and :func:`accuracy`.

Stages (``bnfold.demo.run`` and its ``*_stage`` modules) import this module; nothing here imports a stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bnfold.demo.data import DigitsData

__all__ = ["DemoContext", "accuracy"]


@dataclass
class DemoContext:
    data: DigitsData
    original: nn.Module
    folded: nn.Module | None = None
    results: dict[str, Any] = field(default_factory=dict)
    accuracy_rows: list[list[str]] = field(default_factory=list)


def accuracy(model: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (anything callable on a batch tensor)."""
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())
