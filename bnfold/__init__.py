"""bnfold: fold normalization layers into adjacent linear/conv ops, exactly.

Public API::

    result = bnfold.fold(model, example_inputs, capture="auto")   # FoldResult(.module, .report)
    report = bnfold.inspect(model, example_inputs)                # dry run: FoldReport
    bnfold.quantize(model, example_inputs, "out/", calibration=batches)   # verified int8 ONNX (QuantizeResult)
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the public API, imported on first use (``import bnfold`` stays cheap: no torch, ONNX or TVM)
    from bnfold.api import FoldResult, fold, inspect
    from bnfold.errors import BnfoldError
    from bnfold.optimize import OptimizeResult, optimize
    from bnfold.parity import ParityReport, Tolerance, compare
    from bnfold.parity.stages import StageReport, StageTracker, track_stages
    from bnfold.quantize.core import QuantizeResult, quantize
    from bnfold.recalibrate.core import RecalibrationReport, recalibrate
    from bnfold.recalibrate.drift import DriftReport, diagnose
    from bnfold.report import FoldReport
    from bnfold.targets.tvm import compile, load_artifact

_WHERE = {
    "FoldResult": "bnfold.api", "fold": "bnfold.api", "inspect": "bnfold.api",
    "DriftReport": "bnfold.recalibrate.drift", "diagnose": "bnfold.recalibrate.drift",
    "BnfoldError": "bnfold.errors",
    "OptimizeResult": "bnfold.optimize", "optimize": "bnfold.optimize",
    "ParityReport": "bnfold.parity", "Tolerance": "bnfold.parity", "compare": "bnfold.parity",
    "RecalibrationReport": "bnfold.recalibrate.core", "recalibrate": "bnfold.recalibrate.core",
    "FoldReport": "bnfold.report",
    "StageReport": "bnfold.parity.stages", "StageTracker": "bnfold.parity.stages",
    "track_stages": "bnfold.parity.stages",
    "compile": "bnfold.targets.tvm", "load_artifact": "bnfold.targets.tvm",
    "QuantizeResult": "bnfold.quantize.core", "quantize": "bnfold.quantize.core",
}


def __getattr__(name: str) -> Any:
    """PEP 562: ``bnfold.fold`` etc. import their module on first access."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """``bnfold`` itself. Three API functions share their name with a submodule (``bnfold.recalibrate``,
    ``bnfold.optimize``, ``bnfold.quantize``); importing such a submodule makes Python set the package attribute to
    the module, which would hide the function. The function wins, as it did when this file imported everything
    eagerly."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WHERE and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            self.__dict__.pop(name, None)  # leave the name to __getattr__: the function
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "BnfoldError",
    "DriftReport",
    "FoldReport",
    "FoldResult",
    "OptimizeResult",
    "ParityReport",
    "QuantizeResult",
    "RecalibrationReport",
    "StageReport",
    "StageTracker",
    "Tolerance",
    "compare",
    "compile",
    "diagnose",
    "fold",
    "inspect",
    "load_artifact",
    "optimize",
    "quantize",
    "recalibrate",
    "track_stages",
]
__version__ = "0.1.0"
