"""bnfold.speed: side-by-side latency of artifacts (what ``optimize`` reports)."""

from __future__ import annotations

import time

import torch

from bnfold.speed import fastest, measure_latency, slower_than_eager


def test_interleaved_timing_ranks_a_slow_engine_behind_a_fast_one() -> None:
    def fast(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    def slow(x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.004)
        return x + 1

    lat = measure_latency({"eager": fast, "tvm": slow}, (torch.ones(2),), rounds=3, per_round=2, warmup=1)
    assert lat["tvm"]["calls"] == 6 and lat["tvm"]["median_ms"] >= 4.0 > lat["eager"]["median_ms"]
    assert lat["tvm"]["min_ms"] <= lat["tvm"]["median_ms"]
    assert fastest(lat) == "eager"
    ratio = slower_than_eager(lat, "tvm", "eager")
    assert ratio is not None and ratio > 1
    assert slower_than_eager(lat, "eager", "tvm") is None
    assert slower_than_eager(lat, "onnx", "eager") is None  # not measured: nothing to say
