"""Graph passes: the pass engine (:mod:`~bnfold.passes.engine`), one file per rule, and the pipeline order.

The order is this one list. :data:`FIXED_POINT` runs to a fixed point from worklists (a later round only looks at
what the previous rounds touched); :data:`FINALIZE` runs once after it. Adding a rule = one file that subclasses
:class:`~bnfold.passes.rule.Rule` (match → check with a reason → rewrite) plus one line here.
"""

from __future__ import annotations

from collections.abc import Sequence

from bnfold.passes.absorb_bias import AbsorbBias
from bnfold.passes.canonicalize import Canonicalize
from bnfold.passes.constant_fold import ConstantFold
from bnfold.passes.context import PassContext
from bnfold.passes.correct_bias import CorrectBias
from bnfold.passes.drop_dead_state import DropDeadState
from bnfold.passes.engine import (
    Candidate,
    Category,
    Change,
    DumpIR,
    Instrument,
    Pass,
    PassResult,
    Pipeline,
    PipelineResult,
    Rejection,
    Until,
    Verify,
)
from bnfold.passes.equalize import Equalize
from bnfold.passes.fold_into_consumer import FoldIntoConsumer
from bnfold.passes.fold_into_embedding import FoldIntoEmbedding
from bnfold.passes.fold_into_producer import FoldIntoProducer
from bnfold.passes.lower_affines import LowerAffines
from bnfold.passes.merge_affines import MergeAffines
from bnfold.passes.propagate import Propagate
from bnfold.passes.reparameterize import Reparameterize
from bnfold.passes.rule import Fail, Rule
from bnfold.passes.split_norms import SplitNormAffine

__all__ = [
    "FINALIZE",
    "FIXED_POINT",
    "QUANTIZE_PREP",
    "AbsorbBias",
    "Candidate",
    "Canonicalize",
    "Category",
    "Change",
    "ConstantFold",
    "CorrectBias",
    "DropDeadState",
    "DumpIR",
    "Equalize",
    "Fail",
    "FoldIntoConsumer",
    "FoldIntoEmbedding",
    "FoldIntoProducer",
    "Instrument",
    "LowerAffines",
    "MergeAffines",
    "Pass",
    "PassContext",
    "PassResult",
    "Pipeline",
    "PipelineResult",
    "Propagate",
    "Rejection",
    "Reparameterize",
    "Rule",
    "SplitNormAffine",
    "Until",
    "Verify",
    "check_until",
    "default_pipeline",
]

# The pipeline order, as data. Each entry is a pass class (a Rule subclass or a plain pass).
FIXED_POINT: tuple[type[Pass], ...] = (
    ConstantFold,       # constant sub-graphs → one float64-exact constant
    Canonicalize,       # BatchNorm (module / functional / aten) → channel_affine
    SplitNormAffine,    # LayerNorm/RMSNorm/GroupNorm/InstanceNorm → bare norm + channel_affine, if it will fold
    MergeAffines,       # A2(A1(x)) → A(x); identities vanish
    FoldIntoProducer,   # A(conv(x)) → conv'(x)
    FoldIntoConsumer,   # conv(A(x)) → conv'(x)
    FoldIntoEmbedding,  # A(embedding(i)) → embedding'(i)
    Reparameterize,     # conv_K(x) + conv_k(x) + A(x) → conv'(x)  (optional: default_pipeline(reparameterize=…))
    Propagate,          # move A through commuting ops to where it folds
)
FINALIZE: tuple[type[Pass], ...] = (
    LowerAffines,       # leftovers → add / mul / addcmul, or back into their norm
    DropDeadState,      # dead nodes, parameters, buffers, submodules
)

# Quantization preparation (bnfold.quantize), on a folded graph: each pass to its own fixed point, in this order.
QUANTIZE_PREP: tuple[type[Pass], ...] = (
    Equalize,           # W1[i]/s_i, b1[i]/s_i, W2[:, i]·s_i across positively homogeneous ops (exact)
    AbsorbBias,         # b1 − c, b2 + W2·c across the activation (exact where the pre-activation ≥ c)
    CorrectBias,        # b − E[ΔW x] for the int8 weight error ΔW (changes the float model on purpose)
)


def default_pipeline(instruments: Sequence[Instrument] = (), *, reparameterize: bool = False) -> Pipeline:
    """The fold pipeline: :data:`FIXED_POINT` to a fixed point, then :data:`FINALIZE` once.

    ``reparameterize``: merge parallel conv/identity branches summed at an add into one conv
    (:mod:`~bnfold.passes.reparameterize`). Off, the rule still runs but only reports what it would merge."""
    passes: list[Pass] = [Reparameterize(enabled=reparameterize) if p is Reparameterize else p()
                          for p in FIXED_POINT]
    return Pipeline(passes, finalize=[p() for p in FINALIZE], instruments=instruments)


def check_until(until: str | None, *, spelled: str = "until=") -> None:
    """``until`` names a pass of :func:`default_pipeline` (checked before any work); ``spelled``: how the user
    wrote the option (``"until="`` in Python, ``"--until "`` on the command line), for the message."""
    if until is None:
        return
    names = default_pipeline().names
    if until not in names:
        from bnfold.errors import InputError

        raise InputError(f"{spelled}{until!r} names no pass", hint=f"passes are: {', '.join(names)}")
