"""``batchnorm_affines`` (all BatchNorms at once) against ``batchnorm_problem`` (one by one): the same bits for every
layer it accepts, and it declines every layer whose statistics are not plainly fine."""

from __future__ import annotations

import math

import torch

from bnfold.ir.reasons import batchnorm_affines, batchnorm_problem


def _layer(c: int, g: torch.Generator, dtype: torch.dtype = torch.float32, affine: bool = True
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, float]:
    mean = torch.randn(c, generator=g).to(dtype)
    var = (torch.rand(c, generator=g) * 3).to(dtype)
    w = torch.randn(c, generator=g).to(dtype) if affine else None
    b = torch.randn(c, generator=g).to(dtype) if affine else None
    return mean, var, w, b, float(torch.rand(1, generator=g)) * 1e-3


def test_batched_affines_equal_one_by_one_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    layers = [_layer(c, g, dtype, affine) for c, dtype, affine in
              [(3, torch.float32, True), (64, torch.float16, True), (1, torch.float32, False),
               (17, torch.bfloat16, True), (128, torch.float64, False)]]
    bad_var = list(_layer(5, g))
    bad_var[1] = bad_var[1].clone()
    bad_var[1][2] = -1.0
    nan_mean = list(_layer(4, g))
    nan_mean[0] = nan_mean[0].clone()
    nan_mean[0][0] = math.nan
    zero = list(_layer(6, g))
    zero[1], zero[4] = torch.zeros(6), 0.0  # var + eps = 0: a division by zero
    overflow = list(_layer(2, g, torch.float64))
    overflow[2] = torch.full((2,), 1e308, dtype=torch.float64)  # a = γ/√(σ²+ε) overflows
    overflow[1], overflow[4] = torch.full((2,), 1e-30, dtype=torch.float64), 0.0
    stats = [*layers, tuple(bad_var), tuple(nan_mean), tuple(zero), tuple(overflow),
             (torch.zeros(0), torch.zeros(0), None, None, 1e-5), (*_layer(3, g)[:4], math.inf)]
    batched = batchnorm_affines(stats)  # type: ignore[arg-type]
    for i, (s, got) in enumerate(zip(stats, batched, strict=True)):
        alone = batchnorm_problem(f"bn{i}", *s)  # type: ignore[arg-type]
        if got is None:
            assert i >= len(layers), i  # only the bad ones are declined
            continue
        assert not isinstance(alone, str), (i, alone)
        for a, b in zip(got, alone, strict=True):
            assert a.dtype == b.dtype == torch.float64 and torch.equal(a, b), i
    assert [x is None for x in batched[len(layers):]] == [True] * 6


def test_batched_affines_keep_devices_apart() -> None:
    """A layer on another device (or shaped oddly) is left to ``batchnorm_problem``."""
    g = torch.Generator().manual_seed(1)
    odd = (torch.zeros(2, 2), torch.ones(2, 2), None, None, 1e-5)
    got = batchnorm_affines([_layer(3, g), odd, _layer(4, g)])  # type: ignore[list-item]
    assert got[0] is not None and got[1] is None and got[2] is not None
