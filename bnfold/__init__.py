"""bnfold: fold normalization layers into adjacent linear/conv ops, exactly.

Public API::

    result = bnfold.fold(model, example_inputs, capture="auto")   # FoldResult(.module, .report)
    report = bnfold.inspect(model, example_inputs)                # dry run: FoldReport
"""

from __future__ import annotations

from bnfold.api import FoldResult, fold, inspect
from bnfold.drift import DriftReport, diagnose
from bnfold.errors import BnfoldError
from bnfold.optimize import OptimizeResult, optimize
from bnfold.parity import ParityReport, Tolerance, compare
from bnfold.recalibrate import RecalibrationReport, recalibrate
from bnfold.report import FoldReport
from bnfold.stages import StageReport, StageTracker, track_stages
from bnfold.targets.tvm import compile, load_artifact

__all__ = [
    "BnfoldError",
    "DriftReport",
    "FoldReport",
    "FoldResult",
    "OptimizeResult",
    "ParityReport",
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
    "recalibrate",
    "track_stages",
]
__version__ = "0.1.0"
