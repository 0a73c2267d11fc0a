"""The ONNX rules: the fold pipeline of :mod:`bnfold.passes` over an ONNX graph, one file per rule.

Every rule is a :class:`~bnfold.passes.onnx.context.OnnxRule` (match → check: a plan or a
:class:`~bnfold.ir.reasons.Fail` → rewrite through the :class:`~bnfold.passes.onnx.context.OnnxContext`) with the same
name, category and predicates (:mod:`bnfold.ir.fold_targets`, the crossing table of :mod:`bnfold.passes.commute`) as
its torch.fx twin, and runs in the same :class:`~bnfold.passes.engine.Pipeline` with the same instruments (``Timing``,
``Until``, ``DumpIR``, ``Verify``). The order is this one list. Adding a rule = one file plus one line here.
The ONNX graph itself (lookups, linear ops, shapes, normalization sites) is :mod:`bnfold.ir.onnx`; files in and out and
the front end (:func:`bnfold.onnx.fold_model`) are :mod:`bnfold.onnx`.
"""

from __future__ import annotations

from collections.abc import Sequence

from bnfold.passes.engine import Instrument, Pass, Pipeline
from bnfold.passes.onnx.canonicalize import OnnxCanonicalize
from bnfold.passes.onnx.constant_fold import OnnxConstantFold
from bnfold.passes.onnx.context import OnnxContext, OnnxRule
from bnfold.passes.onnx.fold_into_consumer import OnnxFoldIntoConsumer
from bnfold.passes.onnx.fold_into_producer import OnnxFoldIntoProducer
from bnfold.passes.onnx.propagate import OnnxPropagate
from bnfold.passes.onnx.split_norm_affine import OnnxSplitNormAffine

__all__ = ["FIXED_POINT", "OnnxCanonicalize", "OnnxConstantFold", "OnnxContext", "OnnxFoldIntoConsumer",
           "OnnxFoldIntoProducer", "OnnxPropagate", "OnnxRule", "OnnxSplitNormAffine", "check_until", "onnx_pipeline"]

FIXED_POINT: tuple[type[Pass], ...] = (
    OnnxConstantFold,      # values computed from constants only → initializers (onnxscript's folder)
    OnnxCanonicalize,      # BatchNormalization / norms read as affines (candidates; unfoldable statistics)
    OnnxSplitNormAffine,   # Layer/RMS/GroupNorm's (γ, β) → its consumers, when it folds completely
    OnnxFoldIntoProducer,  # BN(conv(x)) → conv'(x)
    OnnxFoldIntoConsumer,  # conv(BN(x)) → conv'(x)
    OnnxPropagate,         # move BN through commuting ops to where it folds
)


def onnx_pipeline(instruments: Sequence[Instrument] = ()) -> Pipeline:
    """The ONNX fold pipeline: :data:`FIXED_POINT` to a fixed point (the unread constants are dropped at the end of
    the run, :meth:`OnnxContext.session`)."""
    return Pipeline([p() for p in FIXED_POINT], instruments=instruments)


def check_until(until: str | None, *, spelled: str = "until=") -> None:
    """``until`` names a pass of :func:`onnx_pipeline` (checked before any work)."""
    if until is None:
        return
    names = onnx_pipeline().names
    if until not in names:
        from bnfold.errors import InputError

        raise InputError(f"{spelled}{until!r} names no pass of the ONNX pipeline",
                         hint=f"passes are: {', '.join(names)}")
