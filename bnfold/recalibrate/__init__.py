"""BatchNorm recalibration: exact population statistics measured on the user's data, and a drift diagnosis.

* :mod:`~bnfold.recalibrate.core`   — :func:`recalibrate` (the public ``bnfold.recalibrate``) and its report;
* :mod:`~bnfold.recalibrate.drift`  — :func:`diagnose` (``bnfold.diagnose``): stored vs measured statistics;
* :mod:`~bnfold.recalibrate.probe`  — the hooks and runners both use (one forward, every BN measured);
* :mod:`~bnfold.recalibrate.stats`  — per-layer float64 sums, finalization, distributed all-reduce;
* :mod:`~bnfold.recalibrate.native` — the C++ statistics kernel (``python -m bnfold.recalibrate.native`` builds it).

``bnfold.recalibrate`` is the *function* (``bnfold/__init__.py`` keeps it so); import this package's modules with
``from bnfold.recalibrate import native`` or ``from bnfold.recalibrate.core import recalibrate``, never
``import bnfold.recalibrate.native`` (that attribute path reaches the function, not this package).
"""

from __future__ import annotations

from bnfold.recalibrate.core import RecalibrationReport, recalibrate
from bnfold.recalibrate.drift import DriftReport, diagnose

__all__ = ["DriftReport", "RecalibrationReport", "diagnose", "recalibrate"]
