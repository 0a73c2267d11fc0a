"""Back ends that *lower* a folded GraphModule; they never fold (folding lives in :mod:`bnfold.passes`).

A :class:`Target` turns a GraphModule plus example inputs into an :class:`Artifact`: something callable on
torch tensors (so :func:`bnfold.parity.compare` can judge it like any module), that can be saved, and that
records how it was built (``build_info``: target, versions, options). :func:`get_target` is the one way
``bnfold.optimize``, the CLI and the demo reach a target.

Targets:

* ``bnfold.targets.torch`` — the folded GraphModule itself, saved as a ``torch.export`` ``.pt2``
  (:class:`~bnfold.targets.torch.TorchTarget`).
* ``bnfold.targets.onnx`` — ``torch.onnx.export`` → onnxsim → ONNX Runtime (:class:`~bnfold.targets.onnx.OnnxTarget`).
* ``bnfold.targets.tvm`` — Relax → ``tvm.compile`` (llvm / cuda) (:class:`~bnfold.targets.tvm.TvmTarget`,
  :func:`bnfold.compile`; docs/tvm.md).

Their options are typed (:mod:`bnfold.targets.options`: ``TorchOptions``, ``OnnxOptions``, ``TvmOptions``).

Each target module imports its optional dependencies lazily, so ``import bnfold`` never needs them.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # not a global here: the submodule ``bnfold.targets.torch`` would take the name ``torch``
    import torch
    import torch.fx

__all__ = ["TARGETS", "Artifact", "Target", "get_target"]


@runtime_checkable
class Artifact(Protocol):
    """A lowered model: ``artifact(*tensors)`` returns a tensor or a tuple of tensors, like the module did."""

    build_info: Mapping[str, Any]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]: ...

    def save(self, path: str | os.PathLike[str]) -> Path: ...


@runtime_checkable
class Target(Protocol):
    """Lowers a (folded) GraphModule; ``name`` is what reports and the CLI call it (``"onnx"``, ``"tvm"``).
    ``options_type``: the frozen dataclass of its options (:mod:`bnfold.targets.options`); :meth:`lower` takes one,
    or a mapping of its fields (an unknown key is an :class:`~bnfold.errors.InputError` naming the valid ones)."""

    name: str
    options_type: type[Any]

    def lower(self, gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor],
              options: Any = None) -> Artifact: ...


TARGETS: dict[str, str] = {
    "torch": "bnfold.targets.torch:TorchTarget",
    "onnx": "bnfold.targets.onnx:OnnxTarget",
    "tvm": "bnfold.targets.tvm:TvmTarget",
}
"""Every target by name: ``module:class``, imported only when asked for (a new back end is one entry)."""


def get_target(name: str) -> Target:
    """The target called ``name`` (a key of :data:`TARGETS`), its module imported now."""
    if name not in TARGETS:
        raise KeyError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    module, cls = TARGETS[name].split(":")
    return getattr(importlib.import_module(module), cls)()
