"""The int8 parity rule: SQNR and top-1 agreement against the float model, not the float64 rule."""

from __future__ import annotations

import math

import torch

from bnfold.parity.int8 import Int8Rule, judge_int8

G = torch.Generator().manual_seed(0)


def noisy(ref: torch.Tensor, sqnr_db: float) -> torch.Tensor:
    noise = torch.randn(ref.shape, generator=G)
    noise *= (ref.pow(2).sum() / noise.pow(2).sum() / 10 ** (sqnr_db / 10)).sqrt()
    return ref + noise


def test_sqnr_threshold() -> None:
    ref = torch.randn(64, 3, 8, 8, generator=G)
    ok = judge_int8([[ref]], [[noisy(ref, 25.0)]])
    assert ok.passed and math.isclose(ok.sqnr_db, 25.0, abs_tol=1e-6) and ok.top1_agreement is None
    bad = judge_int8([[ref]], [[noisy(ref, 15.0)]])
    assert not bad.passed and "SQNR 15.0 dB < 20 dB" in bad.reasons[0]


def test_top1_agreement_threshold() -> None:
    logits = torch.randn(100, 10, generator=G)
    flipped = logits.clone()
    top = logits.argmax(1)
    for i in range(8):  # 8 % of samples change their class; SQNR stays high
        flipped[i, (top[i] + 1) % 10] = logits[i, top[i]] + 1e-3
    v = judge_int8([[logits]], [[flipped]], Int8Rule(min_sqnr_db=0.0))
    assert v.top1_agreement == 0.92 and not v.passed and "top-1 agreement 92.0% < 95%" in v.reasons[0]
    assert judge_int8([[logits]], [[flipped]], Int8Rule(min_sqnr_db=0.0, min_top1=0.9)).passed


def test_nan_and_empty_never_pass() -> None:
    ref = torch.randn(4, 10, generator=G)
    cand = ref.clone()
    cand[0, 0] = math.nan
    assert not judge_int8([[ref]], [[cand]]).passed
    empty = torch.zeros(0, 10)
    assert not judge_int8([[empty]], [[empty]]).passed
