"""BatchNorm recalibration: exact population statistics measured on the user's data, and a drift diagnosis.

* :mod:`~bnfold.recalibration.core`   — :func:`recalibrate` (the public ``bnfold.recalibrate``) and its report;
* :mod:`~bnfold.recalibration.drift`  — :func:`diagnose` (``bnfold.diagnose``): stored vs measured statistics;
* :mod:`~bnfold.recalibration.probe`  — the hooks and runners both use (one forward, every BN measured);
* :mod:`~bnfold.recalibration.stats`  — per-layer float64 sums, finalization, distributed all-reduce;
* :mod:`~bnfold.recalibration.native` — the C++ statistics kernel (``python -m bnfold.recalibration.native`` builds it).

``bnfold.recalibrate`` is the function (:func:`~bnfold.recalibration.core.recalibrate`); this package is
``bnfold.recalibration``, so neither hides the other.
"""

from __future__ import annotations

from bnfold.recalibration.core import RecalibrationReport, recalibrate
from bnfold.recalibration.drift import DriftReport, diagnose

__all__ = ["DriftReport", "RecalibrationReport", "diagnose", "recalibrate"]
