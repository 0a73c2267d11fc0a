"""Winograd 3×3 convolutions on the blocked CPU layout (bnfold/targets/tvm/winograd.py): the transform matrices,
when Winograd is chosen, that its kernels get the tiled schedule, and parity of the built artifact against the
folded model and a float64 reference (whole and partial tiles, no padding, batch 2, residual epilogues, blocks of
8 and 16, the host's width and AVX2's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import compile_untuned_and_check, randomize_bn
from torch import nn

tvm = pytest.importorskip("tvm")

import bnfold  # noqa: E402
from bnfold.targets.tvm.winograd import transform_matrices, winograd_tile  # noqa: E402


@pytest.mark.parametrize("m", [2, 4])
def test_transform_matrices_compute_a_3x3_correlation(m):
    """``Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A`` is the valid 3×3 correlation of an (m+2)² tile, in float64."""
    a, b, g = transform_matrices(m)
    rng = np.random.default_rng(m)
    d, k = rng.standard_normal((m + 2, m + 2)), rng.standard_normal((3, 3))
    y = a.T @ ((g @ k @ g.T) * (b.T @ d @ b)) @ a
    direct = np.array([[np.sum(d[i:i + 3, j:j + 3] * k) for j in range(m)] for i in range(m)])
    np.testing.assert_allclose(y, direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("kernel", "stride", "groups", "channels", "out_hw", "tile"), [
    ((3, 3), (1, 1), 1, (64, 64), (56, 56), 4),
    ((3, 3), (1, 1), 1, (128, 128), (16, 20), 4),
    ((3, 3), (1, 1), 1, (256, 256), (14, 14), 2),
    ((3, 3), (1, 1), 1, (512, 512), (7, 7), 2),  # partial last tile
    ((3, 3), (1, 1), 1, (512, 512), (5, 5), None),  # too small to pay
    ((3, 3), (2, 2), 1, (64, 128), (28, 28), None),  # strided
    ((1, 1), (1, 1), 1, (64, 64), (56, 56), None),
    ((3, 3), (1, 1), 64, (64, 64), (56, 56), None),  # depthwise
    ((3, 3), (1, 1), 1, (3, 64), (224, 224), None),  # an image's 3 channels: no product to speak of
])
def test_winograd_tile_rule(kernel, stride, groups, channels, out_hw, tile):
    assert winograd_tile(kernel, stride, (1, 1), groups, channels, out_hw) == tile


class WinoNet(nn.Module):
    """3×3 stride-1 convs of every Winograd case (input 16×22): a residual block at 16×22 (m = 4, a partial last
    tile across the width; bias + add + ReLU epilogue), an unpadded conv on 24 channels (blocks of 8 on AVX-512)
    at 8×11 → 6×9 (m = 2, a partial tile), and a 3-channel stem and a strided conv that stay direct."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32))
        self.down = nn.Sequential(nn.Conv2d(32, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.valid = nn.Sequential(nn.Conv2d(24, 24, 3), nn.BatchNorm2d(24), nn.ReLU())  # no padding
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.relu(self.b(self.a(y)) + y)
        return self.head(self.valid(self.down(y)))


@pytest.fixture(scope="module")
def wino() -> tuple[torch.nn.Module, torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_bn(WinoNet())
    x = torch.randn(2, 3, 16, 22)
    return model, bnfold.fold(model, (x,)).module, x


@pytest.mark.parametrize("mcpu", [None, "x86-64-v3"])
def test_winograd_convs_match_folded_and_float64(wino, mcpu, tmp_path):
    model, gm, x = wino
    art = compile_untuned_and_check(model, gm, x, mcpu, tmp_path / "cache")
    scheduled = art.build_info["tuning"]["default_scheduled"]
    assert sum("winograd" in k for k in scheduled if "weight" not in k) == 3, scheduled


def test_winograd_kernels_get_the_tiled_schedule(wino):
    """The hand schedule applies in full (tiled product, unrolled transforms), not its elementwise fallback."""
    from bnfold.targets.tvm.build import _prepare_cpu
    from bnfold.targets.tvm.importer import import_torch
    from bnfold.targets.tvm.schedules import apply_default_schedules
    from bnfold.targets.tvm.target import cpu_target

    _, gm, x = wino
    spec = cpu_target()
    mod = _prepare_cpu(import_torch(gm, (x,)).mod, spec, prepack=False)
    names = [gv.name_hint for gv in mod.get_global_vars() if "winograd" in gv.name_hint]
    assert names
    mod, missed = apply_default_schedules(mod, spec.target, names)
    assert missed == []
    for name in names:
        text = mod[name].script()
        assert "T.unroll" in text and "T.parallel" in text, name
        if "weight" not in name:
            assert 'T.sblock("winograd_gemm_update")' in text, name  # the register-tiled product


def test_weights_are_matched_by_buffer_not_by_name():
    """A depthwise kernel whose data and weight parameters share a name (mobilenet_v2's first one: ``lv3``):
    no axis is weight-only (channels index both)."""
    from tvm import s_tir, te

    from bnfold.targets.tvm.layout import depthwise_conv2d_nchwc
    from bnfold.targets.tvm.schedules import _inline_producers, _main_reduction, _weight_only_axes

    data = te.placeholder((1, 2, 8, 8, 16), name="lv3")
    weight = te.placeholder((2, 1, 3, 3, 1, 16), name="lv3")
    out = depthwise_conv2d_nchwc(data, weight, (1, 1), (1, 1, 1, 1), (1, 1), "float32")
    sch = s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func([data, weight, out])}))
    block = _main_reduction(sch)
    assert _weight_only_axes(sch, block) == []
    _inline_producers(sch, block)  # the padding: the conv now reads the data parameter itself
    assert _weight_only_axes(sch, block) == []


def test_winograd_kernels_are_tuned_in_bnfolds_space_alone(wino):
    """MetaSchedule's stock rules do not know the transforms: Winograd tasks get the hand space only, the
    others both."""
    from bnfold.targets.tvm.build import kernel_tasks
    from bnfold.targets.tvm.importer import import_torch
    from bnfold.targets.tvm.target import cpu_target
    from bnfold.targets.tvm.tuning import _by_space

    _, gm, x = wino
    tasks = kernel_tasks(import_torch(gm, (x,)), cpu_target())
    split = {only: {t.name for t in subset} for subset, only in _by_space(tasks)}
    assert split[True] and all("winograd" in n for n in split[True]), split
    assert split[False] and not any("winograd" in n for n in split[False]), split
