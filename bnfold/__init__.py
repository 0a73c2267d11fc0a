"""bnfold: fold normalization layers into adjacent linear/conv ops, exactly.

Public API::

    result = bnfold.fold(model, example_inputs, capture="auto")   # FoldResult(.module, .report)
    report = bnfold.inspect(model, example_inputs)                # dry run: FoldReport
    bnfold.quantize(model, example_inputs, "out/", calibration=batches)   # verified int8 ONNX (QuantizeResult)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the public API, imported on first use (``import bnfold`` stays cheap: no torch, ONNX or TVM)
    from bnfold.api import FoldResult, fold, inspect
    from bnfold.deploy import OptimizeConfig, OptimizeResult, optimize
    from bnfold.errors import BnfoldError
    from bnfold.parity import ParityReport, Tolerance, compare
    from bnfold.parity.stages import StageReport, StageTracker, track_stages
    from bnfold.quantization.core import QuantizeResult, quantize
    from bnfold.recalibration.core import RecalibrationReport, recalibrate
    from bnfold.recalibration.drift import DriftReport, diagnose
    from bnfold.report import FoldReport
    from bnfold.targets.tvm import compile, load_artifact

_WHERE = {
    "FoldResult": "bnfold.api", "fold": "bnfold.api", "inspect": "bnfold.api",
    "DriftReport": "bnfold.recalibration.drift", "diagnose": "bnfold.recalibration.drift",
    "BnfoldError": "bnfold.errors",
    "OptimizeConfig": "bnfold.deploy", "OptimizeResult": "bnfold.deploy", "optimize": "bnfold.deploy",
    "ParityReport": "bnfold.parity", "Tolerance": "bnfold.parity", "compare": "bnfold.parity",
    "RecalibrationReport": "bnfold.recalibration.core", "recalibrate": "bnfold.recalibration.core",
    "FoldReport": "bnfold.report",
    "StageReport": "bnfold.parity.stages", "StageTracker": "bnfold.parity.stages",
    "track_stages": "bnfold.parity.stages",
    "compile": "bnfold.targets.tvm", "load_artifact": "bnfold.targets.tvm",
    "QuantizeResult": "bnfold.quantization.core", "quantize": "bnfold.quantization.core",
}


def __getattr__(name: str) -> Any:
    """PEP 562: ``bnfold.fold`` etc. import their module on first access. No API name is also a submodule's name
    (the step lives in ``bnfold.deploy``, recalibration in ``bnfold.recalibration``, int8 in
    ``bnfold.quantization``), so importing a submodule never hides a function."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})




__all__ = [
    "BnfoldError",
    "DriftReport",
    "FoldReport",
    "FoldResult",
    "OptimizeConfig",
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
