"""The normal model of a pre-activation: BatchNorm output moments, clipped-normal means, quadrature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bnfold.ir.moments import Moments, bn_moments, clipped_mean, gaussian_mean, leaky_relu_mean

f64 = torch.float64
MU = torch.tensor([-2.0, -0.3, 0.0, 0.7, 5.0], dtype=f64)
SIGMA = torch.tensor([0.5, 1.0, 2.0, 0.1, 3.0], dtype=f64)


def _numeric(fn, mu: torch.Tensor, sigma: torch.Tensor, n: int = 400001) -> torch.Tensor:
    """E[fn(x)] by the trapezoid rule over ±12 σ (independent of the closed forms)."""
    z = torch.linspace(-12, 12, n, dtype=f64)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    x = mu[:, None] + sigma[:, None] * z[None, :]
    return torch.trapezoid(fn(x) * pdf[None, :], z, dim=1)


def test_bn_output_moments() -> None:
    m = bn_moments(torch.tensor([4.0, 1e-6]), torch.tensor([-2.0, 3.0]), torch.tensor([0.5, -1.0]), 1e-5)
    assert m.mean.tolist() == [0.5, -1.0]
    torch.testing.assert_close(m.std, torch.tensor([2.0 * math.sqrt(4 / (4 + 1e-5)),
                                                     3.0 * math.sqrt(1e-6 / (1e-6 + 1e-5))], dtype=f64))


def test_affine_maps_mean_and_scales_std() -> None:
    m = Moments(MU, SIGMA).affine(-torch.ones(5, dtype=f64) * 2, torch.ones(5, dtype=f64))
    assert torch.equal(m.mean, -2 * MU + 1) and torch.equal(m.std, 2 * SIGMA)


def test_clipped_normal_mean_against_integration() -> None:
    for lo, hi in ((0.0, math.inf), (0.0, 6.0), (-1.0, 1.0), (-math.inf, 0.5)):
        got = clipped_mean(MU, SIGMA, lo, hi)
        want = _numeric(lambda x, lo=lo, hi=hi: x.clamp(lo, hi), MU, SIGMA)
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_per_channel_bounds_and_a_degenerate_channel() -> None:
    hi = torch.tensor([1.0, 2.0, 3.0, 0.5, 4.0], dtype=f64)
    got = clipped_mean(MU, SIGMA, torch.zeros(5, dtype=f64), hi)
    want = _numeric(lambda x: torch.minimum(x.clamp_min(0), hi[:, None]), MU, SIGMA)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    assert clipped_mean(torch.tensor([3.0], dtype=f64), torch.zeros(1, dtype=f64), 0.0, 2.0).item() == 2.0


def test_leaky_relu_mean() -> None:
    torch.testing.assert_close(leaky_relu_mean(MU, SIGMA, 0.1), _numeric(lambda x: F.leaky_relu(x, 0.1), MU, SIGMA),
                               rtol=1e-7, atol=1e-9)


def test_quadrature_of_smooth_activations() -> None:
    for fn in (F.silu, torch.sigmoid, F.gelu):
        torch.testing.assert_close(gaussian_mean(fn, MU, SIGMA), _numeric(fn, MU, SIGMA), rtol=1e-6, atol=1e-8)
    # exact for polynomials: E[x²] = μ² + σ²
    torch.testing.assert_close(gaussian_mean(lambda x: x * x, MU, SIGMA), MU ** 2 + SIGMA ** 2, rtol=1e-12, atol=0)
