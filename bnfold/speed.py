"""Latency of every artifact on the same input, side by side: what ``bnfold optimize`` reports so a user can see
whether the compiled artifact is worth deploying (PyTorch eager, the folded module, ONNX Runtime, TVM).

Engines are timed in interleaved rounds (each round calls every engine ``per_round`` times), so a burst of load
from other processes hits all of them alike; the median per call is the figure, the minimum is kept beside it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["fastest", "measure_latency", "slower_than_eager"]


def measure_latency(engines: Mapping[str, Callable[..., Any]], inputs: Sequence[torch.Tensor], *, rounds: int = 5,
                    per_round: int = 3, warmup: int = 2) -> dict[str, dict[str, float]]:
    """``{engine: {"median_ms", "min_ms", "calls"}}`` for ``engine(*inputs)``."""
    samples: dict[str, list[float]] = {name: [] for name in engines}
    with torch.inference_mode():
        for fn in engines.values():
            for _ in range(warmup):
                fn(*inputs)
        for _ in range(rounds):
            for name, fn in engines.items():
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    fn(*inputs)
                    samples[name].append(time.perf_counter() - t0)
    return {name: {"median_ms": round(1e3 * statistics.median(v), 3), "min_ms": round(1e3 * min(v), 3),
                   "calls": len(v)} for name, v in samples.items()}


def fastest(latency: Mapping[str, Mapping[str, float]]) -> str | None:
    """The engine with the lowest median."""
    return min(latency, key=lambda k: latency[k]["median_ms"], default=None)


def slower_than_eager(latency: Mapping[str, Mapping[str, float]], engine: str, eager: str) -> float | None:
    """``engine``'s median over ``eager``'s when it is slower (a ratio > 1), else None."""
    if engine not in latency or eager not in latency:
        return None
    ratio = latency[engine]["median_ms"] / latency[eager]["median_ms"]
    return ratio if ratio > 1.0 else None
