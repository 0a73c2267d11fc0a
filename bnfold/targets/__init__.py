"""Back ends that *lower* a folded GraphModule; they never fold (folding lives in :mod:`bnfold.passes`).

A :class:`Target` turns a GraphModule plus example inputs into an :class:`Artifact`: something callable on
torch tensors (so :func:`bnfold.parity.compare` can judge it like any module), that can be saved, and that
records how it was built (``build_info``: target, versions, options).

Targets:

* ``bnfold.targets.onnx`` — ``torch.onnx.export`` → onnxsim → ONNX Runtime (:class:`~bnfold.targets.onnx.OnnxTarget`).
* ``bnfold.targets.tvm`` — Relax → ``tvm.compile`` (llvm / cuda) (:class:`~bnfold.targets.tvm.TvmTarget`,
  :func:`bnfold.compile`; docs/tvm.md).

Each target module imports its optional dependencies lazily, so ``import bnfold`` never needs them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.fx

__all__ = ["Artifact", "Target"]


@runtime_checkable
class Artifact(Protocol):
    """A lowered model: ``artifact(*tensors)`` returns a tensor or a tuple of tensors, like the module did."""

    build_info: Mapping[str, Any]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]: ...

    def save(self, path: str | os.PathLike[str]) -> Path: ...


@runtime_checkable
class Target(Protocol):
    """Lowers a (folded) GraphModule; ``name`` is what reports and the CLI call it (``"onnx"``, ``"tvm"``)."""

    name: str

    def lower(self, gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor],
              options: Mapping[str, Any] | None = None) -> Artifact: ...
