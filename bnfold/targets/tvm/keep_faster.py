"""A tuned CPU build is kept only when it is faster, end to end, than the default schedules.

MetaSchedule keeps, per kernel, the candidate it measured fastest *alone* (one measurement of ~100 ms of calls on
warm caches, whatever else the machine was doing at the time). A model assembled from those kernels is not always
faster than the one built from bnfold's hand schedules: measured here, mobilenet_v2 tuned with 4 trials per kernel
ran 2.97 ms against 2.75 ms untuned. So after a compile that applied tuning records, :func:`keep_faster` builds the
default too, times both on the example inputs in interleaved rounds (:func:`bnfold.speed.measure_latency`, so a
burst of load hits both alike) and returns the one with the lower median latency; the manifest's
``tuning.end_to_end`` records ``{"tuned_ms", "default_ms", "kept"}``. Cost: one more build and about a second of
timing, paid by tuned compiles only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from bnfold.speed import measure_latency

if TYPE_CHECKING:
    from bnfold.targets.tvm.artifact import TvmArtifact

__all__ = ["keep_faster"]

log = logging.getLogger(__name__)

#: Each timing round calls each build for at least this long (ms), so a 1 ms model is not judged on 3 calls.
ROUND_MS = 25.0


def _calls_per_round(fn: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> int:
    with torch.inference_mode():
        fn(*inputs)  # first call: lazy initialization
        t0 = time.perf_counter()
        fn(*inputs)
        ms = 1e3 * (time.perf_counter() - t0)
    return max(3, min(50, math.ceil(ROUND_MS / max(ms, 1e-3))))


def keep_faster(tuned: TvmArtifact, build_default: Callable[[], TvmArtifact], inputs: Sequence[torch.Tensor],
                *, write: Callable[[TvmArtifact], None], rounds: int = 7) -> TvmArtifact:
    """The faster of ``tuned`` and ``build_default()`` on ``inputs`` (median of interleaved calls; ties keep the
    tuned build). The kept artifact's ``build_info["tuning"]`` is the tuned build's, plus ``end_to_end``; when the
    default wins, its kernel lists (``untuned``, ``default_scheduled``) replace the tuned build's and ``note``
    says why. ``write(artifact)`` persists the changed manifest. A build that cannot run here (cross-compiled)
    is returned as is."""
    if not tuned.runnable:
        return tuned
    default = build_default()
    per_round = _calls_per_round(tuned, inputs)
    lat = measure_latency({"tuned": tuned, "default": default}, inputs, rounds=rounds, per_round=per_round)
    t_ms, d_ms = lat["tuned"]["median_ms"], lat["default"]["median_ms"]
    keep_tuned = t_ms <= d_ms
    info = dict(tuned.build_info["tuning"])
    info["end_to_end"] = {"tuned_ms": t_ms, "default_ms": d_ms, "kept": "tuned" if keep_tuned else "default",
                          "calls_each": lat["tuned"]["calls"]}
    kept = tuned if keep_tuned else default
    if not keep_tuned:
        base = default.build_info["tuning"]
        info["untuned"], info["default_scheduled"] = base.get("untuned", []), base.get("default_scheduled", [])
        why = (f"the tuned build ran {t_ms:.3f} ms end to end, the default schedules {d_ms:.3f} ms: kept the "
               "default schedules (the database is kept: more trials may still find faster kernels)")
        info["note"] = f"{info['note']}; {why}" if info.get("note") else why
        log.info("%s", why)
    else:
        log.info("tuned build %.3f ms end to end vs default schedules %.3f ms: kept the tuned build", t_ms, d_ms)
    kept.build_info["tuning"] = info
    write(kept)
    return kept
