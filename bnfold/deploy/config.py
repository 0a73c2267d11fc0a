"""The pre-deployment step's configuration: one frozen dataclass per stage, composed into :class:`OptimizeConfig`.

A stage that is off is ``None`` (``OptimizeConfig(tvm=None)``: no TVM build); the target stages reuse the targets'
own typed options (:mod:`bnfold.targets.options`), so what the step passes to a back end is checked where it is
made — a misspelled option is an :class:`~bnfold.errors.InputError`, never ignored. Everything is validated in
``__post_init__``, before any work.

What the step fills in itself (the staging path, the user's protected inputs, the dynamic dims it found) is not
configuration: the driver passes it to the targets with :func:`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_args

from bnfold.capture import CaptureMode
from bnfold.errors import InputError
from bnfold.targets.options import OnnxOptions, TvmOptions

if TYPE_CHECKING:
    from bnfold.quantization.stage import Int8Options

__all__ = ["FoldStage", "OptimizeConfig", "RecalibrateStage"]

_MODES = ("batch", "sequential")


@dataclass(frozen=True)
class RecalibrateStage:
    """Recalibrate the BatchNorm statistics on the calibration data (run only when there is some). ``mode``:
    ``"batch"`` (one pass) or ``"sequential"`` (inference-exact, one pass per layer; :func:`bnfold.recalibrate`).
    ``drift_batches``: how many validation batches the drift chart measures, before and after (0: none)."""

    mode: str = "batch"
    drift_batches: int = 8

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise InputError(f"unknown recalibration mode {self.mode!r}; valid: {', '.join(_MODES)}")
        if not isinstance(self.drift_batches, int) or self.drift_batches < 0:
            raise InputError(f"drift_batches must be an integer >= 0, got {self.drift_batches!r}")


@dataclass(frozen=True)
class FoldStage:
    """Fold (:func:`bnfold.fold`). ``capture``: ``"auto"``, ``"symbolic"`` or ``"export"``; ``dynamic_shapes``:
    ``torch.export``'s format (default: those of an exported model); ``reparameterize``: merge parallel
    conv/identity branches into one conv (on by default here: the artifacts are for deployment)."""

    capture: CaptureMode = "auto"
    dynamic_shapes: Any = None
    reparameterize: bool = True

    def __post_init__(self) -> None:
        modes = get_args(CaptureMode)
        if self.capture not in modes:
            raise InputError(f"unknown capture {self.capture!r}; valid: {', '.join(modes)}")


@dataclass(frozen=True)
class OptimizeConfig:
    """Every stage of :func:`bnfold.optimize`; ``None`` turns a stage off.

    ``onnx``/``tvm``: the targets' options (the step sets ``path``, ``protect``, ``dynamic_shapes``,
    ``dynamic_batch`` and ``progress`` itself); ``int8``: a :class:`bnfold.quantization.Int8Options` (needs
    calibration data); ``overwrite``: replace an earlier bnfold output folder; ``protect``: files no output may be
    (the user's inputs); ``html``: also write ``report.html``."""

    recalibrate: RecalibrateStage = field(default_factory=RecalibrateStage)
    fold: FoldStage = field(default_factory=FoldStage)
    onnx: OnnxOptions | None = field(default_factory=OnnxOptions)
    tvm: TvmOptions | None = field(default_factory=TvmOptions)
    int8: Int8Options | None = None
    overwrite: bool = False
    protect: Sequence[str | os.PathLike[str]] = ()
    html: bool = True

    def __post_init__(self) -> None:
        for name, cls in (("recalibrate", RecalibrateStage), ("fold", FoldStage), ("onnx", OnnxOptions),
                          ("tvm", TvmOptions)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                raise InputError(f"OptimizeConfig.{name} must be a {cls.__name__}"
                                 f"{' or None' if name in ('onnx', 'tvm') else ''}, got {type(value).__name__}")
        if self.tvm is not None and self.tvm.target not in ("llvm", "cuda"):
            raise InputError(f"unknown TVM target {self.tvm.target!r}; valid: llvm, cuda (or tvm=None to skip TVM)")
        if self.tvm is not None and self.tvm.arch is not None and self.tvm.target != "cuda":
            raise InputError(f"arch={self.tvm.arch!r} applies only to the cuda target")

    def replace(self, **changes: Any) -> OptimizeConfig:
        """A copy with ``changes`` (:func:`dataclasses.replace`, validated again)."""
        return dataclasses.replace(self, **changes)

