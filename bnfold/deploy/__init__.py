"""The pre-deployment step (``bnfold.optimize``, ``bnfold optimize``): model → recalibrated, folded, exported,
compiled and verified artifacts in one output folder, with a report.

* :mod:`~bnfold.deploy.config`    — :class:`OptimizeConfig`: one frozen dataclass per stage;
* :mod:`~bnfold.deploy.step`      — :func:`optimize` (the public ``bnfold.optimize``) and the driver;
* :mod:`~bnfold.deploy.result`    — :class:`OptimizeResult` (``report.json``/``.txt``; ``report.html`` is drawn
  by :mod:`bnfold.htmlreport`);
* :mod:`~bnfold.deploy.ownership` — the manifest that marks an output folder as bnfold's.
"""

from __future__ import annotations

from bnfold.deploy.config import FoldStage, OptimizeConfig, RecalibrateStage
from bnfold.deploy.result import OptimizeResult
from bnfold.deploy.step import optimize, run

__all__ = ["FoldStage", "OptimizeConfig", "OptimizeResult", "RecalibrateStage", "optimize", "run"]
