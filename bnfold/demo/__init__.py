"""The embedded default: a small BatchNorm CNN trained on the shipped digits data (see LICENSE-digits.txt)."""

from __future__ import annotations

from bnfold.demo.data import DigitsData, load_digits, shift_images
from bnfold.demo.model import DigitsNet, load_pretrained

__all__ = ["DigitsData", "DigitsNet", "load_digits", "load_pretrained", "shift_images"]
