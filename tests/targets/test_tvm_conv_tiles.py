"""Register tiles and loop order of the blocked convolutions' hand schedule (bnfold/targets/tvm/schedules.py):
a tile's reduction step fits the register file (accumulators + weight vectors + broadcasts, else LLVM spills),
among the tiles that fit the one with the fewest loads per FMA is taken, and a conv whose weights outweigh its
input runs its output-channel blocks outermost (each core streams its own share of the weights once). The tile
rules are checked with explicit register files (AVX-512: 32, AVX2: 16), so they hold on any host; parity of
untuned builds against the folded model and float64 on the host's ISA and on AVX2, randomized BN statistics."""

from __future__ import annotations

import pytest
import torch
from helpers import compile_untuned_and_check, randomize_bn
from torch import nn

tvm = pytest.importorskip("tvm")

import bnfold  # noqa: E402
from bnfold.targets.tvm.schedules import ScheduleParams, _best_m, _divisors, _fits  # noqa: E402

AVX512 = ScheduleParams(16, 32, 2)
AVX2 = ScheduleParams(8, 16, 2)


@pytest.mark.parametrize(("p", "m_total", "t_ext", "expected"), [
    (AVX512, 80, 7, 2),  # 320 → 1280 on 7×7: 2 × 7; 4 × 7 needs 39 registers
    (AVX512, 60, 7, 3),  # 160 → 960 on 7×7: 3 × 7 (31 registers)
    (AVX512, 9, 56, 3),  # 24 → 144 on 56×56: 3 × 7, not 3 × 8 (35 registers)
    (AVX512, 20, 7, 2),  # 960 → 320: not 20 × 1 (one load per FMA)
    (AVX2, 18, 56, 2),  # 2 × 4 (14 registers of 16); 3 does not divide 56
])
def test_best_tile_fits_the_registers(p, m_total, t_ext, expected):
    m_opts = [d for d in _divisors(m_total) if _fits(d, 1, p)]
    assert _best_m(m_opts, _divisors(t_ext), p) == expected


@pytest.mark.parametrize("p", [AVX512, AVX2])
def test_no_default_tile_spills(p):
    for m_total in range(1, 130):
        for t_ext in (1, 7, 14, 28, 56, 112, 197):
            m = _best_m([d for d in _divisors(m_total) if _fits(d, 1, p)], _divisors(t_ext), p)
            t = max([d for d in _divisors(t_ext) if _fits(m, d, p)] or [1])
            assert m_total % m == 0 and t_ext % t == 0
            assert _fits(m, t, p) or (m == 1 and t == 1), (m_total, t_ext, m, t)


class PointwiseNet(nn.Module):
    """A wide 1×1 conv on a small map (weights ≫ input) after a narrow one on a large map (input ≫ weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(16, 96, 1), nn.BatchNorm2d(96), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.wide = nn.Sequential(nn.Conv2d(96, 640, 1), nn.BatchNorm2d(640), nn.ReLU6())
        self.head = nn.Conv2d(640, 64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.wide(self.pool(self.expand(self.stem(x)))))


def _kernels(gm: torch.fx.GraphModule, x: torch.Tensor, p: ScheduleParams) -> dict[str, str]:
    """Each kernel's scheduled TIR text, by name."""
    from bnfold.targets.tvm.build import kernel_tasks
    from bnfold.targets.tvm.importer import import_torch
    from bnfold.targets.tvm.schedules import default_schedule
    from bnfold.targets.tvm.target import cpu_target

    out = {}
    for t in kernel_tasks(import_torch(gm, (x,)), cpu_target(), prepack=True):
        sch = default_schedule(t.workload["main"], p)
        assert sch is not None, t.name
        out[t.name] = sch.mod["main"].script()
    return out


def _parallel_loops(script: str) -> list[str]:
    """The names of the kernel's parallel loops, in program order: each its fused axes, outermost first."""
    return [ln.split(" in T.parallel")[0].split("for ")[-1] for ln in script.splitlines() if "T.parallel(" in ln]


def test_weights_outermost_only_where_they_outweigh_the_input():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 56, 56)
    model = randomize_bn(PointwiseNet().eval())
    gm = bnfold.fold(model, (x,)).module
    loops = {name: _parallel_loops(s)[0] for name, s in _kernels(gm, x, AVX512).items()
             if name.startswith("fused_conv")}
    # 96 → 640 on 7×7 (246 KB of weights, 19 KB of input) and 640 → 64: channel blocks first
    wide = [loop for loop in loops.values() if loop.startswith("oc_chunk")]
    # 16 → 96 on 56×56 (6 KB of weights, 200 KB of input): rows first
    rows = [loop for loop in loops.values() if loop.startswith("n_oh")]
    assert len(wide) == 2 and len(rows) == 1, loops


@pytest.mark.parametrize("mcpu", [None, "x86-64-v3"])
def test_pointwise_net_matches_folded_and_float64(mcpu, tmp_path):
    torch.manual_seed(1)
    x = torch.randn(1, 3, 56, 56)
    model = randomize_bn(PointwiseNet().eval())
    gm = bnfold.fold(model, (x,)).module
    compile_untuned_and_check(model, gm, x, mcpu, tmp_path / "cache")


def test_winograd_product_keeps_its_transform_points_outermost():
    """A Winograd product's weights differ per transform point (its rows): no panel to reuse across them, so
    even where the transformed weights outweigh the input (128 → 128 on 14×14) the points stay outermost."""
    torch.manual_seed(2)
    x = torch.randn(1, 128, 14, 14)
    model = randomize_bn(nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU()).eval())
    gm = bnfold.fold(model, (x,)).module
    scripts = [s for name, s in _kernels(gm, x, AVX512).items() if "winograd" in name]
    assert len(scripts) == 1, "expected one Winograd kernel"
    loops = _parallel_loops(scripts[0])
    product = [loop for loop in loops if "nu" in loop]
    assert product and all(loop.startswith("e_nu") for loop in product), loops
