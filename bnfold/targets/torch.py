"""The torch target: a folded GraphModule stays a torch module; saved, it is a ``torch.export`` ``.pt2``.

:class:`TorchTarget` lowers nothing (the folded GraphModule already runs eagerly); its :class:`TorchArtifact`
runs that module and saves it with :func:`save_exported`: exported with ``torch.export``, serialized in memory,
written to a temporary file in the destination folder and renamed into place, so a failure never leaves a
half-written file and the user's input file is never overwritten. Every ``.pt2`` bnfold writes carries
:data:`MARKER` among its extra files (:func:`is_bnfold_pt2`: how ``--force`` recognizes bnfold's own output).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from bnfold import dynamic
from bnfold.io.outputs import write_bytes_atomic
from bnfold.targets.options import TorchOptions, target_options

__all__ = ["MARKER", "TorchArtifact", "TorchTarget", "is_bnfold_pt2", "save_exported"]

MARKER = "bnfold.json"
"""Extra file bnfold adds to every ``.pt2`` it writes: how ``--force`` recognizes its own earlier output."""


def save_exported(module: nn.Module, example_inputs: Sequence[torch.Tensor], dest: str | os.PathLike[str], *,
                  protect: Sequence[str | os.PathLike[str]] = (),
                  export: Callable[..., torch.export.ExportedProgram] | None = None,
                  dynamic_shapes: Any = None) -> Path:
    """Export ``module`` with ``torch.export`` and save it to ``dest`` atomically. ``dynamic_shapes``
    (``torch.export``'s format, e.g. :attr:`bnfold.api.FoldResult.dynamic_shapes`) keeps those dims dynamic."""
    from bnfold import __version__

    if export is not None:
        ep = export(module, tuple(example_inputs))
    else:
        ep = dynamic.export(module, tuple(example_inputs), dynamic_shapes)
    buffer = io.BytesIO()  # serialized in memory first: torch's C++ writer aborts the process on a full disk
    torch.export.save(ep, buffer, extra_files={MARKER: json.dumps({"writer": "bnfold", "version": __version__})})
    return write_bytes_atomic(dest, buffer.getvalue(), protect=protect)


def is_bnfold_pt2(path: str | os.PathLike[str]) -> bool:
    """``path`` is a ``.pt2`` that bnfold wrote (it carries bnfold's marker among its extra files)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith(f"/extra/{MARKER}") for n in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class TorchArtifact:
    """A torch module as an :class:`~bnfold.targets.Artifact`: called eagerly, saved as a ``.pt2``.

    ``export``: how :meth:`save` runs ``torch.export`` (default ``torch.export.export``; the CLI passes one
    with dynamic shapes for a model loaded from such a file); ``dynamic_shapes``: the dims :meth:`save` keeps
    dynamic (with the default export)."""

    def __init__(self, module: nn.Module, example_inputs: Sequence[torch.Tensor], *,
                 export: Callable[..., torch.export.ExportedProgram] | None = None,
                 dynamic_shapes: Any = None) -> None:
        from bnfold import __version__

        self.module = module
        self.example_inputs = tuple(example_inputs)
        self.export = export
        self.dynamic_shapes = dynamic_shapes
        self.build_info: dict[str, Any] = {"target": "torch", "format": "pt2", "torch": torch.__version__,
                                           "bnfold": __version__}

    def __call__(self, *inputs: torch.Tensor) -> Any:
        return self.module(*inputs)

    def __repr__(self) -> str:
        return f"TorchArtifact({type(self.module).__name__})"

    def save(self, path: str | os.PathLike[str], *, protect: Sequence[str | os.PathLike[str]] = ()) -> Path:
        """Export the module and write it to ``path`` as a ``.pt2`` (:func:`save_exported`)."""
        return save_exported(self.module, self.example_inputs, path, protect=protect, export=self.export,
                             dynamic_shapes=self.dynamic_shapes)


class TorchTarget:
    """The :class:`~bnfold.targets.Target` for torch. ``options``: a :class:`~bnfold.targets.options.TorchOptions`
    (or a mapping of its fields: ``export``, ``dynamic_shapes``; see :class:`TorchArtifact`)."""

    name = "torch"
    options_type = TorchOptions

    def lower(self, gm: torch.fx.GraphModule | nn.Module, example_inputs: Sequence[torch.Tensor],
              options: TorchOptions | Mapping[str, Any] | None = None) -> TorchArtifact:
        opts = target_options(TorchOptions, options, what="torch target")
        return TorchArtifact(gm, example_inputs, export=opts.export, dynamic_shapes=opts.dynamic_shapes)
