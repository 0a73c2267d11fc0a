"""bnfold.recalibrate / bnfold.diagnose: exact statistics, semantics of the modes, safety, CLI, demo claims.

References are computed independently of the engine: forward pre-hooks on the BatchNorm modules of a plain
copy of the model capture every BatchNorm input, and the float64 statistics of all of them concatenated (one
full pass, ``torch.var_mean``) are what recalibration must reproduce: the variance to 1e-6 relative, the mean to
1e-6 relative where the inputs are the reference's own, else 1e-6 of ``max(|mean|, std)`` (:func:`_mean_err`).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnfold
from bnfold.capture import capture
from bnfold.cli import main as cli_main
from bnfold.demo.model import DigitsNet
from bnfold.errors import InputError
from bnfold.recalibration import stats as bnstats
from bnfold.recalibration.drift import drift_metrics

BN = nn.modules.batchnorm._BatchNorm
UNEVEN = (7, 64, 33, 2, 100, 1)  # batch sizes, including a single sample


def _require_native():
    """The native ops; skip (with the reason) only where no C++ compiler exists — the README promises the torch
    fallback there, and it is tested on its own. With a compiler, a failed build is a test failure."""
    import os
    import shutil

    from bnfold.recalibration.native import native_ops

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this host: bnfold uses (and these tests cover) the torch fallback")
    ops = native_ops()
    assert ops is not None, "the native kernel did not build (see the warning logged)"
    return ops


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The machine is shared; one intra-op thread keeps timings and results stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _digits_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(DigitsNet(width=8), seed=seed)


def _batches(sizes: tuple[int, ...] = UNEVEN, seed: int = 0, shape: tuple[int, ...] = (1, 8, 8),
             offset: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand((n, *shape), generator=g) * 3 + offset for n in sizes]


def _bn_inputs(model: nn.Module, batches: list[torch.Tensor], *, bn_train: bool) -> dict[str, torch.Tensor]:
    """Every BatchNorm input of a plain forward (BN in training mode when ``bn_train``), channel-major, float64."""
    ref = copy.deepcopy(model).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, m in ref.named_modules():
        if isinstance(m, BN):
            m.train(bn_train)
            handles.append(m.register_forward_pre_hook(
                lambda mod, inp, name=name: seen.setdefault(name, []).append(inp[0].detach().clone())))
    with torch.no_grad():
        for x in batches:
            ref(x)
    for h in handles:
        h.remove()
    return {name: torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in ts], 1).double()
            for name, ts in seen.items()}


def _reference_stats(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(inputs, dim=1, correction=1)
    return mean, var


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()).abs() / b.double().abs()).max())


def _mean_err(got: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, floor: float = 1.0) -> float:
    """Largest error of a mean over channels, relative to ``max(|mean|, std)``: relative where the mean is at least
    one standard deviation from 0, and in units of the spread (what BatchNorm divides by) below that. The engine
    adds float64 values in float64; later layers' inputs differ from the reference's by float32 rounding of the
    normalization (~1e-7 of the spread), so a mean far smaller than its spread cannot agree to 1e-6 of itself
    there. On identical inputs it does: ``floor=1e-9`` makes the bound relative to ``|mean|`` unless the mean is
    below 1e-9 of the spread (float64 noise)."""
    scale = torch.maximum(mean.double().abs(), floor * var.double().sqrt())
    return float(((got.double() - mean.double()).abs() / scale).max())


def _stats_of(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in model.named_modules() if isinstance(m, BN)}


# --------------------------------------------------------------------------------------------- the math


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 9), c=st.integers(1, 4),
       hw=st.sampled_from([(), (1,), (3,), (2, 3), (16, 16), (5, 67), (257,)]), scale=st.floats(1e-3, 1e3),
       offset=st.floats(-1e3, 1e3), relu=st.booleans(), stored=st.floats(-1e3, 1e3), seed=st.integers(0, 2**16))
def test_measured_sums_equal_float64_statistics(n: int, c: int, hw: tuple[int, ...], scale: float, offset: float,
                                               relu: bool, stored: float, seed: int) -> None:
    """Whatever the stored statistics (the shift) and the data's offset, for (N, C) inputs, short and long rows,
    and ReLU'd data (many equal values): mean and variance within 1e-6 relative of float64 (far below, in fact)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c, *hw), generator=g)
    x = ((x.relu() if relu else x) * scale + offset).float()
    layer = bnstats.BatchNormLayer("bn", "BatchNorm", torch.full((c,), stored), torch.ones(c), 1e-5)
    n = layer.measure(x)
    x64 = x.double().transpose(0, 1).reshape(c, -1)
    assert layer.moments.count == n == x64.shape[1] and layer.moments.sums.dtype == torch.float64
    if x64.shape[1] < 2 or float(x64.var(1).min()) == 0.0:
        return
    mean, var = layer.stats()
    assert _mean_err(mean, x64.mean(1), x64.var(1), floor=1e-9) <= 1e-6
    assert _rel(var, x64.var(1)) <= 1e-6


def _layouts(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 3).relu().to(dtype)
    yield "contiguous", x
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        yield "channels_last_3d", x.contiguous(memory_format=torch.channels_last_3d)
    yield "strided", x.transpose(0, -1).contiguous().transpose(0, -1) if x.dim() > 2 else x.t().contiguous().t()
    yield "sliced", torch.cat([x, x], 0)[::2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_channel_sums_are_float64_sums_for_every_layout_and_dtype(dtype: torch.dtype) -> None:
    """The native kernel and the torch fallback both equal float64 sums of the float64 values, for contiguous,
    channels-last and strided inputs of every shape BatchNorm takes; over 10^6 values per channel the error is
    float64 rounding (≤ 1e-10 relative; float32 sums carry ~1e-7)."""
    from bnfold.recalibration.native import channel_sums, channel_sums_reference

    _require_native()
    shapes = [(64, 128), (7, 3, 5), (16, 96, 14, 14), (32, 24, 7, 7), (2, 8, 4, 8, 8), (4, 16, 256, 256)]
    for i, shape in enumerate(shapes):
        if dtype != torch.float32 and i == len(shapes) - 1:
            continue
        for layout, x in _layouts(shape, dtype, i):
            shift = torch.linspace(-1, 4, shape[1], dtype=torch.float64)
            d = x.double().transpose(0, 1).reshape(shape[1], -1) - shift[:, None]
            expected = torch.stack((d.sum(1), d.square().sum(1)))
            scale = torch.stack((d.abs().sum(1), d.square().sum(1)))
            for name, got in (("native", channel_sums(x, shift)), ("torch", channel_sums_reference(x, shift))):
                assert got.dtype == torch.float64 and got.shape == (2, shape[1])
                err = float(((got - expected).abs() / scale).max())
                assert err <= 1e-10, (shape, layout, name, err)


@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.float16, torch.float64])
def test_channel_moments_accumulates_and_writes_batch_statistics(buffer_dtype: torch.dtype) -> None:
    """channel_moments_ adds the sums to the accumulator and writes the batch mean and biased variance into the
    buffers (cast to their dtype), natively and in the torch fallback, and returns how far the shift is from the
    batch mean (max over channels of (mean − shift)² / var); with one value per channel it writes nothing."""
    from bnfold.recalibration import native
    from bnfold.recalibration.native import channel_moments_, channel_sums_reference, native_ops

    x = torch.randn(5, 3, 7, 9, generator=torch.Generator().manual_seed(3)) * 2 + 4
    shift = torch.tensor([4.0, 0.0, -3.0], dtype=torch.float64)
    flat = x.double().transpose(0, 1).reshape(3, -1)
    farthest = float(((flat.mean(1) - shift).square() / flat.var(1, correction=0)).max())
    for ops in (native_ops(), None):
        total = torch.ones(2, 3, dtype=torch.float64)
        mean, var = torch.zeros(3, dtype=buffer_dtype), torch.zeros(3, dtype=buffer_dtype)
        if ops is None:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(native, "native_ops", lambda: None)
                far = channel_moments_(x, shift, total, mean, var)
        else:
            far = channel_moments_(x, shift, total, mean, var)
        assert far == pytest.approx(farthest, rel=1e-9)
        torch.testing.assert_close(total, channel_sums_reference(x, shift) + 1, rtol=1e-12, atol=0)
        tol = {torch.float16: 1e-3, torch.float32: 1e-6, torch.float64: 1e-12}[buffer_dtype]
        torch.testing.assert_close(mean.double(), flat.mean(1), rtol=tol, atol=0)
        torch.testing.assert_close(var.double(), flat.var(1, correction=0), rtol=tol, atol=0)
    single = torch.randn(1, 3)
    mean = torch.full((3,), 7.0)
    channel_moments_(single, shift, torch.zeros(2, 3, dtype=torch.float64), mean, torch.ones(3))
    assert bool((mean == 7.0).all())  # one value per channel: nothing to normalize with


def test_fused_batch_norm_equals_training_mode_batch_norm_natively_and_in_the_fallback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """batch_norm_measured is torch's training-mode BatchNorm (float64 reference) that also adds the sums, for
    contiguous and channels-last inputs, with and without affine parameters."""
    from bnfold.recalibration import native
    from bnfold.recalibration.native import batch_norm_measured, channel_sums_reference

    g = torch.Generator().manual_seed(4)
    for shape, fmt in (((6, 5, 9, 7), None), ((6, 5, 9, 7), torch.channels_last), ((40, 3), None),
                       ((2, 70, 33, 17), None)):
        x = (torch.randn(shape, generator=g) * 3 + 2).contiguous(memory_format=fmt or torch.contiguous_format)
        c = shape[1]
        affine = (torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g))
        shift = torch.randn(c, dtype=torch.float64, generator=g)
        for weight, bias in (affine, (None, None)):
            expected = F.batch_norm(x.double(), None, None, None if weight is None else weight.double(),
                                    None if bias is None else bias.double(), True, 0.0, 1e-5)
            for fallback in (False, True):
                with pytest.MonkeyPatch.context() as mp:
                    if fallback:
                        mp.setattr(native, "native_ops", lambda: None)
                    total = torch.zeros(2, c, dtype=torch.float64)
                    y, _ = batch_norm_measured(x, weight, bias, shift, total, 1e-5)
                assert y.shape == x.shape and y.dtype == x.dtype
                torch.testing.assert_close(y.double(), expected, rtol=0, atol=2e-6)
                torch.testing.assert_close(total, channel_sums_reference(x, shift), rtol=1e-12, atol=1e-9)


def test_native_results_do_not_depend_on_the_number_of_threads() -> None:
    """Every channel's sums are added in an order fixed by the shape alone: 1 and 2 intra-op threads give the
    same bits, in each of the paths the kernels take — with 2 threads the blocked path reads by chunks of samples
    (one thread per half) when there are at least 2 chunks, by channel blocks otherwise; with 1 thread always by
    channel blocks; rows of every length modulo the vector lanes, the last row's tail read without reading past
    the tensor. The sums are also checked against the float64 reference."""
    from bnfold.recalibration.native import channel_sums_reference

    ops = _require_native()
    shapes = [((4, 8, 128, 128), torch.float32),  # row by row
              ((16, 96, 28, 28), torch.float32),  # blocks, long rows: 4 chunks of 4 samples
              ((33, 40, 7, 7), torch.float32),  # blocks, short rows: 4 chunks of 9 samples, the last of 6
              ((16, 576, 7, 7), torch.float32),  # mobilenet_v3_small's last layer: 4 chunks of 4 samples
              ((256, 32, 8, 8), torch.float32),  # DigitsNet's second layer: 4 chunks of 64 samples
              ((67, 64, 4, 4), torch.float64),  # 4 chunks of 17 samples, the last of 16
              ((5, 24, 61), torch.float32),  # rows of 32 + 3 · 8 + 5 values: every set of lanes; 2 chunks
              ((9, 8, 3), torch.float16),  # rows shorter than one vector; one chunk
              ((2, 16, 8, 8), torch.float32),  # one chunk: channel blocks with 2 threads too
              ((64, 300), torch.float32)]  # rows of C values
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)  # the autouse fixture restores the setting
        for i, (shape, dtype) in enumerate(shapes):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(i), dtype=dtype) + 3.0
            shift = torch.full((x.shape[1],), 2.5, dtype=torch.float64)
            total = torch.zeros(2, x.shape[1], dtype=torch.float64)
            y, _ = ops.batch_norm_measured(x, None, None, shift, total, 1e-5)
            sums = ops.channel_sums(x, shift)
            torch.testing.assert_close(sums, channel_sums_reference(x, shift), rtol=1e-12, atol=1e-9)
            results.append((sums, total, y))
    for (a, t1, y1), (b, t2, y2) in zip(results[:len(shapes)], results[len(shapes):], strict=True):
        assert torch.equal(a, b) and torch.equal(t1, t2) and torch.equal(y1, y2) and torch.equal(a, t1)


def test_a_kernel_that_cannot_be_built_warns_and_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """No compiler, a broken toolchain: one warning that says what to do, and no native ops (the torch path)."""
    from bnfold.recalibration import native

    broken = tmp_path / "channel_sums.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "_SOURCE", broken)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    with caplog.at_level("WARNING", logger="bnfold.recalibration.native"):
        assert native.native_ops.__wrapped__() is None
    assert "could not be built" in caplog.text and "BNFOLD_NATIVE_VERBOSE=1" in caplog.text


def test_the_torch_fallback_gives_the_same_recalibration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the native kernels (no compiler, BNFOLD_NATIVE=0) the same statistics come out: the probe and
    torch's BatchNorm instead of the fused kernel."""
    from bnfold.recalibration import native as kernel

    model, batches = _digits_net(), _batches()
    native, fallback = copy.deepcopy(model), copy.deepcopy(model)
    bnfold.recalibrate(native, batches)
    monkeypatch.setattr(kernel, "native_ops", lambda: None)
    bnfold.recalibrate(fallback, batches)
    for (name, a), (_, b) in zip(_stats_of(native).items(), _stats_of(fallback).items(), strict=True):
        # later layers see activations normalized by different kernels (float32 rounding differs)
        assert _mean_err(a[0], b[0], b[1]) <= 1e-6 and _rel(a[1], b[1]) <= 1e-6, name


def test_native_kernel_can_be_turned_off_and_a_fresh_process_reuses_the_build() -> None:
    """BNFOLD_NATIVE=0 skips the build; otherwise a fresh process finds the kernel already built (by the install
    step or an earlier call) and does not rebuild it: the library file is the same one."""
    import os
    import subprocess
    import sys

    from bnfold.recalibration.native import build_name, built_library

    _require_native()
    library = built_library(build_name())
    assert library is not None and library.exists()
    before = library.stat().st_mtime_ns
    code = "from bnfold.recalibration import native as n; print(n.native_ops() is not None)"
    for env, expected in (({"BNFOLD_NATIVE": "0"}, "False"), ({}, "True"), ({}, "True")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, **env})
        assert out.stdout.strip() == expected, out.stderr
    assert library.stat().st_mtime_ns == before, "a fresh process rebuilt the native kernel"


def test_build_key_changes_with_what_makes_a_build_incompatible(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two environments (another interpreter, another compiler, other flags) get different build names, so they
    never overwrite each other's build in a shared cache; the same environment always gets the same name."""
    from bnfold.recalibration import native

    flags = ["-O3"]
    base = native.build_key(flags)
    assert native.build_key(flags) == base
    assert native.build_key(["-O2"]) != base
    monkeypatch.setattr(native.sys, "executable", "/elsewhere/.venv/bin/python")
    other_env = native.build_key(flags)
    assert other_env != base
    monkeypatch.setenv("CXX", "clang++-nonexistent")
    assert native.build_key(flags) not in (base, other_env)


def test_drift_metrics_zero_for_identical_stats_and_signed_for_shrinking_variance() -> None:
    # float64 inputs: with float32 ones, `mean + var.sqrt()` rounds, and d missed 1 by more than float64's
    # tolerance for ~1 % of random draws (a flaky test)
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, generator=g, dtype=torch.float64)
    var = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    d, r, kl = drift_metrics(mean, var, mean, var, 1e-5)
    assert float(d.abs().max()) == 0.0 and float(r.abs().max()) == 0.0 and float(kl.max()) == 0.0
    d, r, kl = drift_metrics(mean, var, mean + var.sqrt(), var / 4, 0.0)
    torch.testing.assert_close(d, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(r, torch.full((4,), -math.log(4), dtype=torch.float64))
    torch.testing.assert_close(kl, 0.5 * (0.25 - 1 + math.log(4) + 1) * torch.ones(4, dtype=torch.float64))


# --------------------------------------------------------------------------------------------- exactness


def test_batch_mode_first_layer_equals_float64_full_pass_with_uneven_batches() -> None:
    """No BatchNorm upstream: its inputs are bit-identical to a plain forward's, so statistics must match the
    float64 reference to 1e-6 (here, well below)."""
    model, batches = _digits_net(), _batches()
    mean, var = _reference_stats(_bn_inputs(model, batches, bn_train=False)["features.1"])
    report = bnfold.recalibrate(model, batches)
    bn = model.features[1]
    assert _rel(bn.running_mean, mean) <= 1e-6 and _rel(bn.running_var, var) <= 1e-6
    entry = report.layer("features.1")
    assert _rel(entry.mean, mean) < 1e-12 and _rel(entry.var, var) < 1e-12  # the float64 result itself
    assert report.samples == sum(UNEVEN) and report.batches == len(UNEVEN)
    assert entry.count == sum(UNEVEN) * 64


class _Offset(nn.Module):
    """conv → x·0.1 + 20 → BN: the BatchNorm sees means 320–480 standard deviations away from 0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) * 0.1 + 20)


@pytest.mark.parametrize("stored_mean", [0.0, 20.0, -1e3], ids=["stored-centered", "stored-near", "stored-far"])
@pytest.mark.parametrize("mode", ["batch", "sequential"])
def test_inputs_with_a_large_mean_are_exact_whatever_the_stored_statistics(stored_mean: float, mode: str) -> None:
    """Sums of x and x² would cancel in float32 (E[x²] − E[x]² loses 1e5-fold); the
    statistics match float64 to 1e-6 with uneven batches whether the old running mean (the first guess of the
    shift) says "centered" (0), is near the new mean (20), or is far from it (−1000)."""
    torch.manual_seed(12)
    model = _Offset().eval()
    with torch.no_grad():
        model.bn.running_mean.fill_(stored_mean)
    batches = _batches(seed=12)
    mean, var = _reference_stats(_bn_inputs(model, batches, bn_train=False)["bn"])
    assert float((mean.abs() / var.sqrt()).min()) > 100
    entry = bnfold.recalibrate(model, batches, mode=mode).layer("bn")
    assert _rel(entry.mean, mean) <= 1e-6 and _rel(entry.var, var) <= 1e-6
    assert _rel(model.bn.running_mean, mean) <= 1e-6 and _rel(model.bn.running_var, var) <= 1e-6


def test_batch_mode_matches_training_semantics_of_every_layer() -> None:
    """Later layers see activations normalized with batch statistics, as torch's training-mode BatchNorm does
    (float32 rounding of the normalization differs slightly: the tolerance is 1e-5 of the spread)."""
    model, batches = _digits_net(), _batches(UNEVEN[:-1])  # torch's training BN refuses a single-sample BN1d batch
    inputs = _bn_inputs(model, batches, bn_train=True)
    report = bnfold.recalibrate(model, batches, mode="batch")
    for name, x in inputs.items():
        mean, var = _reference_stats(x)
        entry = report.layer(name)
        assert float(((entry.mean - mean).abs() / var.sqrt()).max()) < 1e-5, name
        assert _rel(entry.var, var) < 1e-5, name


@pytest.mark.parametrize("form", ["module", "symbolic", "export"])
def test_sequential_mode_is_inference_exact(form: str) -> None:
    """After sequential recalibration, what every layer receives at inference (eval forward with the new
    statistics) has exactly the statistics it stores: ≤ 1e-6 relative to the float64 full pass, all layers."""
    model, batches = _digits_net(seed=1), _batches(seed=1)
    target = _as_form(model, batches, form)
    report = bnfold.recalibrate(target, batches, mode="sequential")
    assert report.passes == 4 and report.mode == "sequential"
    _copy_stats(target, model, form)
    for name, x in _bn_inputs(model, batches, bn_train=False).items():
        mean, var = _reference_stats(x)
        assert _mean_err(report.layer(name).mean, mean, var) <= 1e-6, name
        assert _rel(report.layer(name).var, var) <= 1e-6, name
    assert bnfold.diagnose(model, batches).worst.score < 1e-5


@pytest.mark.parametrize("form", ["symbolic", "export"])
def test_graph_modules_give_the_same_statistics_as_the_module(form: str) -> None:
    model, batches = _digits_net(seed=2), _batches(seed=2)
    expected = bnfold.recalibrate(copy.deepcopy(model), batches)
    target = _as_form(model, batches, form)
    got = bnfold.recalibrate(target, batches)
    assert [e.name for e in got.layers] == [e.name for e in expected.layers]
    for a, b in zip(got.layers, expected.layers, strict=True):
        assert _mean_err(a.mean, b.mean, b.var) <= 1e-6 and _rel(a.var, b.var) <= 1e-6, a.name
    if form == "export":
        assert all(e.kind.startswith("aten.batch_norm") for e in got.layers)


def _as_form(model: nn.Module, batches: list[torch.Tensor], form: str) -> nn.Module:
    if form == "module":
        return model
    if form == "symbolic":
        return capture(model, (batches[1],), "symbolic").module
    ep = torch.export.export(copy.deepcopy(model), (batches[1],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    return ep.module()


def _copy_stats(source: nn.Module, dest: nn.Module, form: str) -> None:
    if form == "module":
        return
    buffers = dict(source.named_buffers())
    with torch.no_grad():
        for name, buf in dest.named_buffers():
            if "running_" in name:
                buf.copy_(buffers[name])


def test_functional_batchnorm_in_a_traced_subclass_is_recalibrated() -> None:
    class BNReLU(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(super().forward(x))

    torch.manual_seed(3)
    model = randomize_bn(nn.Sequential(nn.Conv2d(1, 4, 3), BNReLU(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)))
    batches = _batches(seed=3)
    gm = capture(model, (batches[0],), "symbolic").module
    assert any(n.target is F.batch_norm for n in gm.graph.nodes)
    got = bnfold.recalibrate(gm, batches, mode="sequential")
    expected = bnfold.recalibrate(model, batches, mode="sequential")
    assert len(got.recalibrated) == 2
    for a, b in zip(got.layers, expected.layers, strict=True):
        assert _rel(a.var, b.var) <= 1e-6


def _recalibrate_counting_paths(model: nn.Module, batches: list[torch.Tensor]) -> tuple[dict[str, list[int]],
                                                                                      bnfold.RecalibrationReport]:
    """Recalibrate, recording which path measured each call (by the channel count of its input): ``"fused"``
    (normalized and measured in one native call) or ``"probe"`` (measured before the BatchNorm runs)."""
    used: dict[str, list[int]] = {"fused": [], "probe": []}
    fused, probe = bnstats.batch_norm_measured, bnstats.channel_moments_
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bnstats, "batch_norm_measured", lambda x, *a: used["fused"].append(x.shape[1]) or fused(x, *a))
        mp.setattr(bnstats, "channel_moments_", lambda x, *a: used["probe"].append(x.shape[1]) or probe(x, *a))
        report = bnfold.recalibrate(model, batches)
    return used, report


def test_every_way_of_catching_a_batchnorm_gives_training_semantics() -> None:
    """Stock BatchNorm modules are normalized and measured by the fused kernel, a subclass with its own forward
    (BN + activation) through a pre-hook probe, functional BatchNorm in a graph through a probe node: in batch
    mode all of them give the statistics of torch's training-mode BatchNorm, and nothing is left behind."""
    class BNReLU(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(super().forward(x))

    torch.manual_seed(5)
    model = randomize_bn(nn.Sequential(nn.Conv2d(1, 6, 3), BNReLU(6), nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6),
                                       nn.Flatten(), nn.Linear(96, 8), nn.BatchNorm1d(8)))
    batches = _batches(UNEVEN[:-1], seed=5)
    inputs = _bn_inputs(model, batches, bn_train=True)
    gm = capture(model, (batches[0],), "symbolic").module
    assert any(n.target is F.batch_norm for n in gm.graph.nodes)  # BNReLU is traced through
    used, _ = _recalibrate_counting_paths(copy.deepcopy(model), batches)
    assert set(used["fused"]) == {6, 8} and set(used["probe"]) == {6}  # BatchNorm2d/1d fused, BNReLU probed
    assert len(used["probe"]) == len(batches)
    same_size = _batches((7, 7, 7), seed=5)  # an exported graph runs the batch size it was exported with
    used, _ = _recalibrate_counting_paths(capture(model, (same_size[0],), "export").module, same_size)
    assert sorted(used["fused"]) == sorted([6, 6, 8] * len(same_size)) and not used["probe"]  # aten: all fused
    for target in (copy.deepcopy(model), gm):
        report = bnfold.recalibrate(target, batches)
        for name, x in inputs.items():
            mean, var = _reference_stats(x)
            entry = report.layer(name)
            assert _mean_err(entry.mean, mean, var) < 1e-5 and _rel(entry.var, var) < 1e-5, (type(target), name)
        _assert_untouched_modules(target)


def test_channels_last_and_half_precision_models_get_the_same_statistics() -> None:
    """A model run in channels-last memory format (conv outputs channels-last: the kernels' row layout) gives the
    statistics of the contiguous model; a bfloat16 model gives them to bfloat16's resolution."""
    torch.manual_seed(6)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3),
                                       nn.BatchNorm2d(16))).eval()
    batches = [torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(n)) for n in (5, 16, 3)]
    expected = bnfold.recalibrate(copy.deepcopy(model), batches)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    got = bnfold.recalibrate(last, [b.contiguous(memory_format=torch.channels_last) for b in batches])
    for a, b in zip(got.layers, expected.layers, strict=True):
        assert _mean_err(a.mean, b.mean, b.var) <= 1e-6 and _rel(a.var, b.var) <= 1e-6, a.name
    half = bnfold.recalibrate(copy.deepcopy(model).to(torch.bfloat16), [b.to(torch.bfloat16) for b in batches])
    for a, b in zip(half.layers, expected.layers, strict=True):
        assert _mean_err(a.mean, b.mean, b.var) <= 0.05 and _rel(a.var, b.var) <= 0.05, a.name


def test_a_forward_the_user_replaced_on_an_instance_is_kept() -> None:
    """A stock BatchNorm whose instance forward was patched by the user gets a probe, and the patch survives."""
    torch.manual_seed(7)
    model = randomize_bn(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))).eval()
    batches = _batches((5, 9), seed=7)
    expected = bnfold.recalibrate(copy.deepcopy(model), batches).layers[0]
    bn = model[1]
    calls: list[int] = []

    def patched(x: torch.Tensor, bn: nn.Module = bn) -> torch.Tensor:
        calls.append(1)
        return nn.BatchNorm2d.forward(bn, x)

    bn.forward = patched
    got = bnfold.recalibrate(model, batches).layers[0]
    assert vars(bn)["forward"] is patched and len(calls) == len(batches)
    assert _rel(got.mean, expected.mean) <= 1e-6 and _rel(got.var, expected.var) <= 1e-6


def test_an_aten_batchnorm_whose_saved_statistics_are_used_is_probed_not_replaced() -> None:
    """native_batch_norm's other outputs (saved mean / invstd) feed the result: the call must stay, so it gets a
    probe before it (and training=False); the statistics are still exact and the graph's other uses intact."""
    class SavedStats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("rm", torch.zeros(4))
            self.register_buffer("rv", torch.ones(4))
            self.w = nn.Parameter(torch.rand(4) + 0.5)
            self.b = nn.Parameter(torch.randn(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.ops.aten.native_batch_norm.default(x, self.w, self.b, self.rm, self.rv, False, 0.1, 1e-5)
            return out[0] + out[1].sum()

    gm = torch.fx.symbolic_trace(SavedStats())
    batches = [torch.rand(n, 4, 5, 5, generator=torch.Generator().manual_seed(n)) * 2 + 1 for n in (3, 8)]
    used, report = _recalibrate_counting_paths(gm, batches)
    assert used == {"fused": [], "probe": [4, 4]}  # one probe call per batch
    flat = torch.cat([b.transpose(0, 1).reshape(4, -1) for b in batches], 1).double()
    mean, var = _reference_stats(flat)
    assert len(report.recalibrated) == 1
    assert _rel(gm.rm, mean) <= 1e-6 and _rel(gm.rv, var) <= 1e-6
    assert any(n.target is torch.ops.aten.native_batch_norm.default for n in gm.graph.nodes)  # user's graph kept


# --------------------------------------------------------------------------------------------- semantics


class _DropoutThenBN(nn.Module):
    """A BatchNorm behind dropout: if dropout ran, the BN input would have zeros and ×2 values."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.drop(self.fc(x)))


def test_dropout_is_off_during_recalibration_and_training_flags_are_restored() -> None:
    torch.manual_seed(4)
    model = _DropoutThenBN().train()  # the user left it in training mode
    batches = _batches((32, 17, 50), seed=4, shape=(6,))
    with torch.no_grad():
        clean = torch.cat([model.fc(x) for x in batches]).double()
    for mode in ("batch", "sequential"):
        bnfold.recalibrate(model, batches, mode=mode)
        assert _rel(model.bn.running_var, clean.var(0)) <= 1e-6, mode  # dropout would inflate it ~2x
        assert _rel(model.bn.running_mean, clean.mean(0)) <= 1e-6, mode
        assert all(m.training for m in model.modules()), "training flags must be restored"
    # the contrast: torch's update_bn runs dropout, and its statistics are far off
    swa = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, swa)
    assert _rel(swa.bn.running_var, clean.var(0)) > 0.1


def test_layer_reused_at_two_sites_is_pooled_and_reported() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 3, 3), nn.Conv2d(1, 3, 3)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.a(x)) + self.bn(self.b(x))

    torch.manual_seed(5)
    model = randomize_bn(Twice())
    batches = _batches((9, 4), seed=5)
    pooled = _bn_inputs(model, batches, bn_train=False)["bn"]
    mean, var = _reference_stats(pooled)
    for target in (model, capture(model, (batches[0],), "symbolic").module):
        report = bnfold.recalibrate(target, batches)
        assert report.reused == ["bn"] and report.layers[0].calls == 2
        assert "pooled over 2 call sites" in report.layers[0].status
        assert _mean_err(report.layers[0].mean, mean, var) <= 1e-6 and _rel(report.layers[0].var, var) <= 1e-6


def test_layer_that_saw_no_data_keeps_its_statistics_and_is_reported() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)
            self.used, self.unused = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.used(y) if x.shape[0] > 0 else self.unused(y)

    torch.manual_seed(6)
    model = randomize_bn(Branchy())
    before = model.unused.running_var.clone()
    report = bnfold.recalibrate(model, _batches((5, 3), seed=6))
    assert report.no_data == ["unused"] and report.recalibrated == ["used"]
    assert torch.equal(model.unused.running_var, before)
    assert "no data" in str(report)


def test_num_samples_cuts_exactly_and_does_not_overconsume() -> None:
    model, batches = _digits_net(seed=7), _batches((32, 32, 32, 32), seed=7)
    pulled = []

    def stream() -> Iterator[torch.Tensor]:
        for x in batches:
            pulled.append(x)
            yield x

    report = bnfold.recalibrate(model, stream(), num_samples=50)
    assert report.samples == 50 and report.batches == 2 and len(pulled) == 2
    mean, var = _reference_stats(_bn_inputs(_digits_net(seed=7), [torch.cat(batches)[:50]], bn_train=False)
                                 ["features.1"])
    assert _rel(model.features[1].running_var, var) <= 1e-6
    assert _mean_err(model.features[1].running_mean, mean, var) <= 1e-6
    assert bnfold.recalibrate(model, batches, num_batches=3).batches == 3


def test_tuple_and_dict_batches() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.bn(x + y)

    model = TwoInputs()
    x, y = torch.randn(10, 3), torch.randn(10, 3)
    bnfold.recalibrate(model, [(x, y)])
    assert _rel(model.bn.running_mean, (x + y).double().mean(0)) <= 1e-6
    bnfold.recalibrate(model, [{"x": x, "y": 2 * y}])
    assert _rel(model.bn.running_mean, (x + 2 * y).double().mean(0)) <= 1e-6


# --------------------------------------------------------------------------------------------- safety


def _failing(batches: list[torch.Tensor], after: int, exc: BaseException) -> Iterator[torch.Tensor]:
    for i, x in enumerate(batches):
        if i == after:
            raise exc
        yield x


@pytest.mark.parametrize("exc", [RuntimeError("loader broke"), KeyboardInterrupt()])
@pytest.mark.parametrize("mode", ["batch", "sequential"])
def test_failure_or_interrupt_restores_statistics(exc: BaseException, mode: str) -> None:
    model = _digits_net(seed=8).train()
    before = _stats_of(model)
    with pytest.raises(type(exc)):
        bnfold.recalibrate(model, _failing(_batches(seed=8), 3, exc), mode=mode)
    for name, (mean, var) in _stats_of(model).items():
        assert torch.equal(mean, before[name][0]) and torch.equal(var, before[name][1])
    assert all(m.training for m in model.modules())
    _assert_untouched_modules(model)


def _assert_untouched_modules(model: nn.Module) -> None:
    """No forward left replaced on an instance, no hook left behind."""
    for m in model.modules():
        assert "forward" not in vars(m) and not m._forward_pre_hooks and not m._forward_hooks, type(m).__name__


def test_statistics_changed_by_the_forward_itself_are_restored_on_failure() -> None:
    """The engine writes only at the end; the snapshot also undoes what the model's own forward wrote."""

    class SelfUpdating(nn.BatchNorm1d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.running_mean.add_(1.0)
            return super().forward(x)

    model = nn.Sequential(nn.Linear(3, 4), SelfUpdating(4))
    before = model[1].running_mean.clone()
    batches = [torch.randn(8, 3) for _ in range(4)]
    with pytest.raises(RuntimeError, match="loader broke"):
        bnfold.recalibrate(model, _failing(batches, 2, RuntimeError("loader broke")))
    assert torch.equal(model[1].running_mean, before)


def test_non_finite_activations_are_refused_and_nothing_changes() -> None:
    model = _digits_net(seed=9)
    before = _stats_of(model)
    batches = _batches(seed=9)
    batches[2][0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="non-finite"):
        bnfold.recalibrate(model, batches)
    assert all(torch.equal(m, before[n][0]) for n, (m, _) in _stats_of(model).items())


def test_bad_arguments_are_input_errors() -> None:
    model = _digits_net()
    with pytest.raises(InputError, match="mode"):
        bnfold.recalibrate(model, _batches(), mode="ema")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="num_samples"):
        bnfold.recalibrate(model, _batches(), num_samples=0)
    with pytest.raises(InputError, match="no BatchNorm"):
        bnfold.recalibrate(nn.Linear(2, 2), [torch.randn(3, 2)])
    with pytest.raises(InputError, match="empty"):
        bnfold.recalibrate(model, [])
    with pytest.raises(InputError, match="iterable of batches"):
        bnfold.recalibrate(model, 3.0)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="labels"):
        bnfold.recalibrate(model, [object()])


def test_progress_bar_goes_to_stderr_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    bnfold.recalibrate(_digits_net(), _batches(), progress=True)
    assert "recalibrate" in capsys.readouterr().err
    bnfold.recalibrate(_digits_net(), _batches(), progress=False)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------------------------- diagnose


def test_diagnose_ranks_layers_and_gives_a_verdict_without_changing_the_model() -> None:
    model = _digits_net(seed=10)
    batches = _batches(seed=10)
    before = _stats_of(model)
    drifted = bnfold.diagnose(model, batches)
    assert all(torch.equal(m, before[n][0]) for n, (m, _) in _stats_of(model).items())
    assert drifted.verdict == "recalibrate" and drifted.should_recalibrate
    scores = [layer.score for layer in drifted.ranking]
    assert scores == sorted(scores, reverse=True) and drifted.worst.score == scores[0]
    assert drifted.to_dict()["threshold"] == drifted.threshold
    bnfold.recalibrate(model, batches, mode="sequential")
    calm = bnfold.diagnose(model, batches)
    assert calm.verdict == "ok" and calm.worst.score < 1e-5
    assert "OK" in str(calm) and json.loads(calm.to_json())["verdict"] == "ok"


def test_diagnose_threshold_must_be_positive() -> None:
    with pytest.raises(InputError, match="threshold"):
        bnfold.diagnose(_digits_net(), _batches(), threshold=0)


# --------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def exported(tmp_path: Path) -> tuple[Path, Path, nn.Module]:
    model = _digits_net(seed=11)
    x = _batches((16,), seed=11)[0]
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    model_path = tmp_path / "model.pt2"
    torch.export.save(ep, str(model_path))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=torch.cat(_batches(seed=12)).numpy(), y=np.zeros(207))
    return model_path, calib, model


def test_cli_recalibrate_writes_a_new_model_and_never_the_input(exported: tuple[Path, Path, nn.Module],
                                                                tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    model_path, calib, model = exported
    original = model_path.read_bytes()
    out = tmp_path / "recal.pt2"
    code = cli_main(["recalibrate", str(model_path), "--data", str(calib), "--key", "x", "-o", str(out),
                     "--batch-size", "50", "--mode", "sequential", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 207 and summary["mode"] == "sequential"
    assert model_path.read_bytes() == original
    reloaded = torch.export.load(str(out)).module()
    data = torch.from_numpy(np.load(calib)["x"])
    expected = copy.deepcopy(model)
    bnfold.recalibrate(expected, data.split(50), mode="sequential")
    assert _rel(dict(reloaded.named_buffers())["head.1.running_var"], expected.head[1].running_var) <= 1e-6
    assert cli_main(["recalibrate", str(model_path), "--data", str(calib), "--key", "x",
                     "-o", str(model_path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert model_path.read_bytes() == original


def test_cli_diagnose(exported: tuple[Path, Path, nn.Module], capsys: pytest.CaptureFixture[str]) -> None:
    model_path, calib, _ = exported
    assert cli_main(["diagnose", str(model_path), "--data", str(calib), "--key", "x"]) == 0
    assert "drift verdict: RECALIBRATE" in capsys.readouterr().out
    assert cli_main(["diagnose", str(model_path), "--data", str(calib), "--key", "x", "--check"]) == 1
    capsys.readouterr()
    assert cli_main(["diagnose", str(model_path), "--data", str(calib), "--key", "x", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "recalibrate"
    assert cli_main(["diagnose", str(model_path), "--data", str(calib)]) == 2  # x and y: which is the input?
    assert "--key" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- demo


def test_demo_stage_recovers_at_least_half_of_the_lost_accuracy() -> None:
    from bnfold.demo.data import load_digits
    from bnfold.demo.drift_stage import stage_drift
    from bnfold.demo.model import load_pretrained
    from bnfold.demo.run import DemoContext

    ctx = DemoContext(data=load_digits(), original=load_pretrained())
    lines = stage_drift(ctx)
    result = ctx.results["drift"]
    assert result["clean"] - result["shifted"] > 0.5  # the shift really hurts
    assert result["diagnosis"]["verdict"] == "recalibrate"
    repaired = result["repaired"]
    for mode in ("batch", "sequential"):
        assert repaired[f"recalibrate ({mode})"]["recovered"] >= 0.5
    assert repaired["recalibrate (sequential)"]["residual_drift"] < 1e-5
    assert "update_bn" in repaired and any("update_bn" in line for line in lines)
    # the same calibration batches: update_bn measures with DigitsNet's Dropout2d on, and falls behind
    assert repaired["recalibrate (batch)"]["accuracy"] > repaired["update_bn"]["accuracy"]
    assert repaired["recalibrate (batch)"]["residual_drift"] < repaired["update_bn"]["residual_drift"]


@pytest.mark.parametrize("mode", ["batch", "sequential"])
def test_tt_metal_55440_running_variance_is_unbiased(mode: str) -> None:
    """tt-metal PR#55440: recalibrated running variance without Bessel's correction (biased, n instead of n-1).
    With 3 values per channel the two differ by a factor 1.5, so the check cannot pass by accident."""
    model = nn.Sequential(nn.Identity(), nn.BatchNorm1d(2)).eval()
    x = torch.tensor([[1.0, 10.0], [2.0, 20.0], [4.0, 70.0]])
    bnfold.recalibrate(model, [x], mode=mode)
    bn = model[1]
    torch.testing.assert_close(bn.running_var, x.var(0, correction=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(bn.running_mean, x.mean(0), rtol=1e-6, atol=0)
    assert not torch.allclose(bn.running_var, x.var(0, correction=0))


class _Source:
    """A re-iterable source like a DataLoader: counts its passes and the batches it made that are still alive."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        import weakref

        self.batches, self.passes, self.most_alive, self._alive, self._ref = batches, 0, 0, [], weakref.ref

    def __iter__(self):
        self.passes += 1
        for b in self.batches:
            copy_ = b.clone()  # a batch of its own, as a loader makes
            self._alive.append(self._ref(copy_))
            self.most_alive = max(self.most_alive, sum(r() is not None for r in self._alive))
            yield copy_
            del copy_

    def __len__(self) -> int:
        return len(self.batches)


def test_sequential_mode_rereads_a_reiterable_source() -> None:
    """Sequential mode reads a re-iterable source once per pass instead of keeping its batches (two alive at most:
    the loop's last one and the new one) and gets the statistics it gets from a list of the same batches."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3),
                                       nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))).eval()
    batches = [torch.randn(5, 3, 10, 10) * 2 + 0.5 for _ in range(7)]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    source = _Source(batches)
    ra = bnfold.recalibrate(a, source, mode="sequential", progress=False)
    rb = bnfold.recalibrate(b, batches, mode="sequential", progress=False)
    assert ra.passes == rb.passes == 3 and source.passes == 3 and source.most_alive <= 2
    assert (ra.batches, ra.samples) == (rb.batches, rb.samples) == (7, 35)
    for (name, t), (_, u) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(t, u, rtol=0, atol=0, msg=name)
    one_shot = bnfold.recalibrate(copy.deepcopy(model), iter(batches), mode="sequential", progress=False)
    assert one_shot.samples == 35 and not one_shot.no_data  # a generator is kept, not re-read (it cannot be)


def test_sequential_mode_refuses_a_source_that_changes_size() -> None:
    """A source giving other samples on a later pass (random sampling) cannot be measured sequentially: said, and
    the model's statistics are left as they were."""
    from bnfold.errors import DataError

    class Shrinking(_Source):
        def __iter__(self):
            self.passes += 1
            yield from self.batches[: len(self.batches) - self.passes + 1]

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                                       nn.BatchNorm2d(4))).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(DataError, match="gave 15 samples on pass 2 but 20 on pass 1"):
        bnfold.recalibrate(model, Shrinking([torch.randn(5, 3, 6, 6) for _ in range(4)]), mode="sequential",
                           progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
