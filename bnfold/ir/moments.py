"""What the BatchNorm statistics say about a tensor's distribution, kept through the fold (data-free statistics).

A BatchNorm ``y = γ (x − μ)/√(σ² + ε) + β`` whose running statistics ``μ, σ²`` describe its input makes its output,
per channel, of mean ``β`` and standard deviation ``|γ| σ/√(σ² + ε)``. Folding removes the BatchNorm but not that
knowledge: :data:`MOMENTS_KEY` in a node's ``meta`` holds these :class:`Moments` of the node's output along its
channel axis. ``canonicalize`` sets them on the affine a BatchNorm becomes; ``fold_into_producer`` hands them to the
conv/linear the affine folds into; a later affine ``a x + b`` folded there maps them to ``(a·mean + b, |a|·std)``;
cross-layer equalization divides them by its scales. Nagel et al. (ICCV 2019, §4.2) model such a pre-activation as
normal, ``N(mean, std²)`` per channel; the expected value after an activation ``f`` is then:

* a clamp to ``[lo, hi]`` (ReLU: ``[0, ∞)``, ReLU6: ``[0, 6]``), the *clipped normal* (``z_lo = (lo − m)/s``,
  ``z_hi = (hi − m)/s``, ``φ``/``Φ`` the standard normal density/CDF)::

      E[clip(x, lo, hi)] = lo·Φ(z_lo) + hi·(1 − Φ(z_hi)) + m·(Φ(z_hi) − Φ(z_lo)) + s·(φ(z_lo) − φ(z_hi))

  (ReLU: ``E = s·φ(m/s) + m·Φ(m/s)``);
* LeakyReLU with slope ``α``: ``E = (1 − α)·E[relu(x)] + α·m``;
* any other elementwise ``f`` (SiLU, GELU, hardswish, sigmoid …): Gauss–Hermite quadrature,
  ``E[f(x)] ≈ π^(-1/2) Σ_k w_k f(m + √2·s·t_k)`` with 64 nodes (exact for polynomials of degree < 128; a kink, as in
  hardswish, costs a small error).

Everything is float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx

__all__ = ["MOMENTS_KEY", "Moments", "bn_moments", "clipped_mean", "gaussian_mean", "leaky_relu_mean", "moments_of",
           "set_moments"]

f64 = torch.float64

MOMENTS_KEY = "bnfold_moments"
"""``node.meta`` key: the :class:`Moments` of the node's output along its channel axis, as BatchNorm statistics say."""

_HERMITE_POINTS = 64


@dataclass(frozen=True)
class Moments:
    """Per-channel mean and standard deviation (float64 vectors) of a tensor, each channel taken as normal."""

    mean: torch.Tensor
    std: torch.Tensor

    def affine(self, a: torch.Tensor, b: torch.Tensor) -> Moments:
        """The moments of ``a ⊙ x + b``: ``(a·mean + b, |a|·std)``."""
        a, b = a.to(f64), b.to(f64)
        return Moments(a * self.mean + b, a.abs() * self.std)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}


def bn_moments(running_var: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> Moments:
    """A BatchNorm's output moments under its own statistics: mean ``β``, std ``|γ|·σ/√(σ² + ε)``."""
    var = running_var.detach().to(f64)
    gamma = torch.ones_like(var) if weight is None else weight.detach().to(f64)
    beta = torch.zeros_like(var) if bias is None else bias.detach().to(f64)
    return Moments(beta.clone(), gamma.abs() * torch.sqrt(var / (var + float(eps))))


def moments_of(node: torch.fx.Node) -> Moments | None:
    value = node.meta.get(MOMENTS_KEY)
    return value if isinstance(value, Moments) else None


def set_moments(node: torch.fx.Node, moments: Moments | None) -> None:
    if moments is None:
        node.meta.pop(MOMENTS_KEY, None)
    else:
        node.meta[MOMENTS_KEY] = moments


def _phi(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-z / math.sqrt(2.0))


def clipped_mean(mean: torch.Tensor, std: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor | float
                 ) -> torch.Tensor:
    """``E[clip(x, lo, hi)]`` for ``x ~ N(mean, std²)`` per channel (module docstring); ``lo``/``hi`` may be ``∓inf``;
    a channel with ``std = 0`` gives ``clip(mean, lo, hi)``."""
    m, s = mean.to(f64), std.to(f64)
    lo_t = torch.as_tensor(lo, dtype=f64).expand_as(m)
    hi_t = torch.as_tensor(hi, dtype=f64).expand_as(m)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    z_lo, z_hi = (lo_t - m) / safe, (hi_t - m) / safe
    c_lo, c_hi = _cdf(z_lo), _cdf(z_hi)
    e = m * (c_hi - c_lo) + s * (torch.where(torch.isfinite(z_lo), _phi(z_lo), 0.0)
                                 - torch.where(torch.isfinite(z_hi), _phi(z_hi), 0.0))
    e = e + torch.where(torch.isfinite(lo_t), lo_t * c_lo, 0.0) + torch.where(torch.isfinite(hi_t), hi_t * (1 - c_hi),
                                                                               0.0)
    return torch.where(s > 0, e, torch.minimum(torch.maximum(m, lo_t), hi_t))


def leaky_relu_mean(mean: torch.Tensor, std: torch.Tensor, slope: float) -> torch.Tensor:
    """``E[leaky_relu(x)] = (1 − α)·E[relu(x)] + α·mean``."""
    return (1.0 - slope) * clipped_mean(mean, std, 0.0, math.inf) + slope * mean.to(f64)


_NODES: tuple[torch.Tensor, torch.Tensor] | None = None


def _hermite() -> tuple[torch.Tensor, torch.Tensor]:
    global _NODES
    if _NODES is None:
        import numpy as np

        t, w = np.polynomial.hermite.hermgauss(_HERMITE_POINTS)
        _NODES = torch.from_numpy(t).to(f64), torch.from_numpy(w).to(f64)
    return _NODES


def gaussian_mean(fn: Callable[[torch.Tensor], torch.Tensor], mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``E[fn(x)]`` for ``x ~ N(mean, std²)`` per channel by Gauss–Hermite quadrature (``fn`` elementwise, float64)."""
    t, w = _hermite()
    x = mean.to(f64)[:, None] + math.sqrt(2.0) * std.to(f64)[:, None] * t[None, :]
    with torch.no_grad():
        y = fn(x).to(f64)
    return (y * w[None, :]).sum(1) / math.sqrt(math.pi)
