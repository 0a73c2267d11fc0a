"""Fuzz the folds (fast profile): random valid models from ``modelgen`` through ``bnfold.fold`` in both
captures, every property of ``foldcheck`` on each. The long profile is ``bench/fuzz_folds.py`` (and the
``slow`` test below)."""

from __future__ import annotations

import os
import warnings

import pytest
from foldcheck import check_fold
from modelgen import make_case

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

FAST_SEEDS = range(0, 32)


def _failures(seeds: range) -> list[str]:
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in seeds:
            case = make_case(seed)
            for capture in ("symbolic", "export"):
                problem = check_fold(case.model, case.inputs, capture)
                if problem:
                    found.append(f"seed {seed} {capture}: {problem}\n    {case.description}")
    return found


def test_fuzz_fast_profile() -> None:
    failures = _failures(FAST_SEEDS)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_fuzz_long_profile() -> None:
    """``BNFOLD_FUZZ_MODELS`` models from ``BNFOLD_FUZZ_SEED`` (default 2000 from 10000)."""
    first = int(os.environ.get("BNFOLD_FUZZ_SEED", "10000"))
    n = int(os.environ.get("BNFOLD_FUZZ_MODELS", "2000"))
    failures = _failures(range(first, first + n))
    assert not failures, "\n".join(failures)


def test_generator_covers_the_space() -> None:
    """The generator reaches every family of op the fuzzer promises (a cheap guard against it shrinking)."""
    text = " ".join(make_case(s).description for s in range(400))
    for needle in ("conv1d", "conv2d", "conv3d", "convT", "reflect", "replicate", "circular", ",g2,", "noaffine",
                   "nostats", "functional", "frozen", "sync", "plain_sub", "bnrelu", "groupnorm", " ln", " rms",
                   "bn1d", "add", "cat", "flatten", "maxpool", "avgpool", "upsample", "permute", "shared(",
                   "tied_conv", "tied-lm", "float16", "bfloat16", "float32"):
        assert needle in text, needle
