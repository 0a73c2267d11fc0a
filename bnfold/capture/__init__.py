"""Capture an ``nn.Module`` as a ``torch.fx.GraphModule``: by symbolic tracing (module structure kept,
conv/linear/BN as ``call_module``; guided by the example inputs where the model branches on shapes or dtypes:
:mod:`bnfold.capture.tracer`) or by ``torch.export`` (aten ops, works through most Python control flow).
``"auto"`` here tries symbolic tracing first and falls back to export (:func:`bnfold.fold`'s ``"auto"`` runs both
and keeps the better fold). Every pass works on both.

Dynamic dimensions: ``dynamic_shapes`` (``torch.export``'s format) is passed to the export; an ExportedProgram
or its ``.module()`` brings its own (:func:`bnfold.dynamic.dynamic_dims`). ``Captured.dynamic_shapes`` keeps
them for whoever exports the folded graph again (a plain symbolic trace is shape-generic: it only records them;
a guided one that had to decide on the example shapes is refused with dynamic shapes).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx
from torch import nn
from torch.fx._lazy_graph_module import _use_lazy_graph_module

from bnfold import dynamic
from bnfold.capture.tracer import BnfoldTracer, SymbolicTrace, symbolic_trace
from bnfold.copying import copy_module
from bnfold.errors import CaptureError
from bnfold.ir.graph import shapes_from_vals
from bnfold.ir.shapes import propagate_shapes

__all__ = ["BnfoldTracer", "CaptureMode", "Captured", "SymbolicTrace", "capture", "symbolic_trace"]

log = logging.getLogger(__name__)

CaptureMode = Literal["symbolic", "export", "auto"]


@dataclass
class Captured:
    """``module``: the graph; ``owns_state``: its parameters and buffers are bnfold's own copies (the model was
    deep-copied), so folds may overwrite a weight in place when nothing else in the graph shares it;
    ``decisions``: a symbolic trace guided by the example inputs took these Python decisions on their shapes
    and dtypes (:class:`bnfold.capture.tracer.SymbolicTrace`; the graph checks its inputs against them)."""

    module: torch.fx.GraphModule
    mode: Literal["symbolic", "export"]
    example_inputs: tuple[torch.Tensor, ...]
    owns_state: bool = False
    dynamic_shapes: dynamic.DynamicShapes | None = None
    decisions: tuple[str, ...] = ()


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...], dynamic_shapes: object) -> torch.fx.GraphModule:
    ep = dynamic.export(model, inputs, dynamic_shapes)
    gm = ep.module()
    assert isinstance(gm, torch.fx.GraphModule)
    return gm


def capture(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor,
            mode: CaptureMode = "auto", *, copy_model: bool = True,
            dynamic_shapes: object = None) -> Captured:
    """Turn ``model`` into a GraphModule with shapes recorded on every node.

    The model is deep-copied first (``copy_model``), so nothing bnfold does touches the caller's module.
    ``dynamic_shapes``: as :func:`torch.export.export` takes it (default: the exported program's own, if any).
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    inputs = tuple(example_inputs)
    if mode not in ("symbolic", "export", "auto"):
        raise CaptureError(f"unknown capture mode {mode!r}", hint="use 'symbolic', 'export' or 'auto'")
    if dynamic.is_exported(model):  # already an export graph: re-export it (module paths and dims survive)
        if dynamic_shapes is None:
            dynamic_shapes = dynamic.dynamic_dims(model)  # type: ignore[arg-type]
        mode = "export" if mode == "auto" else mode
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if copy_model:
        model = copy_module(model)
    errors: list[str] = []
    failures: list[BaseException] = []
    order: list[Literal["symbolic", "export"]] = ["symbolic", "export"] if mode == "auto" else [mode]
    for m in order:
        try:
            decisions: tuple[str, ...] = ()
            if m == "symbolic":
                with _use_lazy_graph_module(True):  # its code is generated once, after the fold
                    traced = symbolic_trace(model, inputs, specialize=dynamic_shapes is None)
                gm, decisions = traced.module, traced.decisions
            else:
                gm = _export(model, inputs, dynamic_shapes)
            # export already recorded every node's (fake) value; with dynamic dims those sizes are symbolic, and
            # the passes read concrete example shapes: propagate again from the example inputs then
            if m == "symbolic" or dynamic_shapes is not None or not shapes_from_vals(gm):
                propagate_shapes(gm, inputs)
            return Captured(gm, m, inputs, owns_state=copy_model, dynamic_shapes=dynamic_shapes,  # type: ignore[arg-type]
                            decisions=decisions)
        except Exception as exc:
            log.debug("capture by %s failed: %s", m, exc)
            cause = exc.__cause__ if exc.__cause__ is not None and "ShapeProp error" in str(exc) else exc
            errors.append(f"{m}: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
            failures.append(cause)
    raise CaptureError(
        f"could not capture {type(model).__name__} as a graph ({'; '.join(errors)})",
        hint="try capture='export' for data-dependent Python control flow, or check the example inputs' "
             "shapes and dtypes",
    ) from failures[-1]  # the last mode tried (its message and the others' are in the text)
