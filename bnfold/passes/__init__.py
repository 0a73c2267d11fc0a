"""Graph passes. ``fold_pipeline()`` is the default fixed-point pipeline; ``finalize_pipeline()`` runs once
after it (lowering leftovers, dropping dead state)."""

from __future__ import annotations

from bnfold.passes.base import Change, Pass, PassResult, Pipeline, PipelineResult, Rejection
from bnfold.passes.canonicalize import Candidate, Canonicalize
from bnfold.passes.cleanup import DropDeadState, LowerAffines
from bnfold.passes.constant_fold import ConstantFold
from bnfold.passes.fold import FoldIntoConsumer, FoldIntoProducer, MergeAffines
from bnfold.passes.propagate import Propagate
from bnfold.passes.split_norms import SplitNormAffine

__all__ = [
    "Candidate",
    "Canonicalize",
    "Change",
    "ConstantFold",
    "DropDeadState",
    "FoldIntoConsumer",
    "FoldIntoProducer",
    "LowerAffines",
    "MergeAffines",
    "Pass",
    "PassResult",
    "Pipeline",
    "PipelineResult",
    "Propagate",
    "Rejection",
    "SplitNormAffine",
    "finalize_passes",
    "fold_passes",
]


def fold_passes() -> list[Pass]:
    """canonicalize (BN) → split norm affines → merge → fold (producer, consumer) → propagate, to a fixed point."""
    return [ConstantFold(), Canonicalize(), SplitNormAffine(), MergeAffines(), FoldIntoProducer(), FoldIntoConsumer(),
            Propagate()]


def finalize_passes() -> list[Pass]:
    return [LowerAffines(), DropDeadState()]
