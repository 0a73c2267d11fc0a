"""Has the data drifted away from what the BatchNorm statistics describe? :func:`diagnose` measures it.

For each BatchNorm layer, the stored statistics ``(μ_s, σ²_s)`` are compared with the measured statistics
``(μ_m, σ²_m)`` of what the layer receives on the user's data, with the model run exactly as at inference (every
layer normalizing with its stored statistics). Per channel ``c``::

    d_c = (μ_m − μ_s) / √(σ²_s + ε)                      standardized mean shift
    r_c = log((σ²_m + ε) / (σ²_s + ε))                   log variance ratio
    KL_c = ½ (e^r − 1 − r + d²)                           KL(N(μ_m, σ²_m + ε) ‖ N(μ_s, σ²_s + ε))

and per layer the *drift score* ``√(2 · mean_c KL_c) = √(mean_c (d² + e^r − 1 − r))``, which is ≈ the RMS of
``√(d² + r²/2)``: "how many stored standard deviations away" the layer's input now is (0 = no drift). Layers are
ranked by it; the verdict is *recalibrate* when the worst layer's score exceeds the threshold.

The default threshold, 0.25, sits between what sampling noise gives on in-distribution data and what a mild
deployment shift gives on the demo (see docs/recalibration.md for the measured numbers).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from bnfold.batches import Batches, positional_arity
from bnfold.errors import InputError
from bnfold.recalibration.probe import Pass, Runner, batch_count, eval_mode, limited_calls, progress_bar
from bnfold.recalibration.stats import all_reduce_layers, find_layers

__all__ = ["DEFAULT_THRESHOLD", "DriftReport", "LayerDrift", "diagnose", "drift_metrics", "shift_and_ratio"]

DEFAULT_THRESHOLD = 0.25


def drift_metrics(stored_mean: torch.Tensor, stored_var: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                  eps: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel ``(d, r, KL)`` in float64 (formulas in the module docstring); ``eps`` a number or one value per
    channel."""
    d, r = shift_and_ratio(stored_mean, stored_var, mean, var, eps)
    kl = 0.5 * (torch.expm1(r) - r + d.square())
    return d, r, kl


def shift_and_ratio(stored_mean: torch.Tensor, stored_var: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                    eps: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel ``(d, r)`` of :func:`drift_metrics`, without the KL (what a recalibration report needs)."""
    s_var = stored_var.detach().double() + eps
    m_var = var.detach().double() + eps
    d = (mean.detach().double() - stored_mean.detach().double()) / s_var.sqrt()
    return d, (m_var / s_var).log()


@dataclass(frozen=True)
class LayerDrift:
    """One layer's drift: the standardized mean shift ``d`` and log variance ratio ``r`` summarized over channels,
    and its score (module docstring)."""

    name: str
    kind: str
    channels: int
    count: int
    mean_shift: float  # RMS over channels of d
    max_mean_shift: float  # max over channels of |d|
    log_var_ratio: float  # mean over channels of r (signed: < 0 the variance shrank)
    max_log_var_ratio: float  # max over channels of |r|
    score: float

    @classmethod
    def measure(cls, name: str, kind: str, count: int, stored: tuple[torch.Tensor, torch.Tensor],
                measured: tuple[torch.Tensor, torch.Tensor], eps: float) -> LayerDrift:
        d, r, kl = drift_metrics(stored[0], stored[1], measured[0], measured[1], eps)

        def rms(t: torch.Tensor) -> float:
            return float(t.square().mean().sqrt())

        return cls(name, kind, d.numel(), count, rms(d), float(d.abs().max()), float(r.mean()), float(r.abs().max()),
                   float((2.0 * kl.mean()).clamp_min(0.0).sqrt()))


@dataclass
class DriftReport:
    """Per-layer drift (graph order), the ranking, and the verdict against ``threshold``."""

    layers: list[LayerDrift]
    threshold: float
    batches: int = 0
    samples: int = 0
    seconds: float = 0.0
    no_data: list[str] = field(default_factory=list)

    @property
    def ranking(self) -> list[LayerDrift]:
        """Layers from the most to the least drifted."""
        return sorted(self.layers, key=lambda layer: (not math.isfinite(layer.score), layer.score), reverse=True)

    @property
    def worst(self) -> LayerDrift | None:
        return self.ranking[0] if self.layers else None

    @property
    def should_recalibrate(self) -> bool:
        """The worst layer drifted past the threshold — or scores NaN/Inf, which is never "ok"."""
        worst = self.worst
        return worst is not None and (not math.isfinite(worst.score) or worst.score > self.threshold)

    @property
    def verdict(self) -> str:
        worst = self.worst
        if worst is not None and not math.isfinite(worst.score):
            return "not finite"
        return "recalibrate" if self.should_recalibrate else "ok"

    def to_dict(self) -> dict[str, Any]:
        worst = self.worst
        return {
            "verdict": self.verdict,
            "threshold": self.threshold,
            "worst": None if worst is None else {"name": worst.name, "score": worst.score},
            "batches": self.batches,
            "samples": self.samples,
            "seconds": self.seconds,
            "layers": [asdict(layer) for layer in self.ranking],
            "no_data": self.no_data,
        }

    def to_json(self, **kwargs: Any) -> str:
        from bnfold.report import json_safe

        return json.dumps(json_safe(self.to_dict()), indent=2, allow_nan=False, **kwargs)

    def render(self, top: int | None = None) -> str:
        from bnfold.report import format_table

        worst = self.worst
        if worst is None:
            head = "drift: no BatchNorm layer saw data"
        else:
            compare = ">" if self.should_recalibrate else "≤"
            if self.verdict == "not finite":
                compare = "(NaN/Inf: the statistics the layer saw are not finite, so drift cannot be judged;"\
                          " check the data and the model's stored statistics) vs"
            head = (f"drift verdict: {self.verdict.upper()} — worst layer {worst.name} scores {worst.score:.3f} "
                    f"{compare} threshold {self.threshold:g} ({self.samples} samples, {len(self.layers)} layers)")
        rows = [[str(i + 1), layer.name, f"{layer.score:.3f}", f"{layer.mean_shift:.3f}",
                 f"{layer.max_mean_shift:.2f}", f"{layer.log_var_ratio:+.3f}",
                 f"{layer.max_log_var_ratio:.2f}"]
                for i, layer in enumerate(self.ranking[:top] if top else self.ranking)]
        lines = [head]
        if rows:
            lines += ["", format_table(["rank", "layer", "score", "rms shift", "max |shift|", "mean log var ratio",
                                        "max |log ratio|"], rows)]
        if self.no_data:
            lines += ["", f"saw no data (not scored): {', '.join(self.no_data)}"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def diagnose(model: nn.Module, batches: Iterable[Any], *, num_batches: int | None = None,
             num_samples: int | None = None, threshold: float = DEFAULT_THRESHOLD,
             progress: bool | None = None) -> DriftReport:
    """Measure every BatchNorm layer's input on ``batches`` (model run as at inference) and compare it with the
    stored statistics. The model is not changed. Under ``torch.distributed`` the measurement covers all ranks."""
    if not (threshold > 0 and math.isfinite(threshold)):
        raise InputError(f"threshold must be a positive number, got {threshold!r}")
    named = list(model.named_modules())  # one walk for find_layers and eval_mode
    layers = find_layers(model, named)
    if not layers:
        raise InputError(f"{type(model).__name__} has no BatchNorm layer with running statistics",
                         hint="diagnose needs BatchNorm layers that track running statistics")
    batches = Batches(batches, positional_arity(model))  # read as everywhere (bnfold.batches)
    start = time.perf_counter()
    bar = progress_bar(progress, total=batch_count(batches, num_batches), desc="diagnose")
    try:
        with eval_mode(model, (m for _, m in named)), torch.no_grad(), Runner(model, layers) as runner:
            calls = limited_calls(batches, num_batches=num_batches, num_samples=num_samples)
            n_batches, n_samples = runner.run(Pass(default="stored", record=set(layers)), calls, bar)
    finally:
        bar.close()
    n_batches, n_samples = (int(v) for v in all_reduce_layers(layers, [n_batches, n_samples]))
    if n_samples == 0:
        raise InputError("no calibration data: the batches were empty", hint="pass at least one batch of inputs")
    report = DriftReport([], threshold, n_batches, n_samples, time.perf_counter() - start)
    for layer in sorted(layers, key=lambda layer: layer.first_call):
        if layer.moments.count < 2:
            report.no_data.append(layer.name)
            continue
        report.layers.append(LayerDrift.measure(layer.name, layer.kind, layer.moments.count,
                                                (layer.stored_mean, layer.stored_var), layer.stats(),
                                                layer.eps))
    return report

