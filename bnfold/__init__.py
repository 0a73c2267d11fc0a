"""bnfold: fold normalization layers into adjacent linear/conv ops, exactly.

Public API::

    result = bnfold.fold(model, example_inputs, capture="auto")   # FoldResult(.module, .report)
    report = bnfold.inspect(model, example_inputs)                # dry run: FoldReport
"""

from __future__ import annotations

from bnfold.api import FoldResult, fold, inspect
from bnfold.errors import BnfoldError
from bnfold.parity import ParityReport, compare
from bnfold.report import FoldReport

__all__ = ["BnfoldError", "FoldReport", "FoldResult", "ParityReport", "compare", "fold", "inspect"]
__version__ = "0.1.0"
