"""Grouped and depthwise convs and squeeze-excite blocks in the blocked CPU layout (bnfold/targets/tvm/grouped.py,
layout.py, schedules.py): which layout each grouped conv gets, and parity of untuned builds — groups of whole
blocks, blocks of whole groups (block-diagonal weights), depthwise k×k of several sizes and strides, SE blocks
with ReLU/SiLU/hardsigmoid gates — against the folded model and a float64 reference, for the host's vector width
and for AVX2's. Randomized BN statistics throughout."""

from __future__ import annotations

import pytest
import torch
from helpers import compile_untuned_and_check, conv_layouts, randomize_bn
from torch import nn

tvm = pytest.importorskip("tvm")

import bnfold  # noqa: E402
from bnfold.targets.tvm.grouped import grouped_layouts  # noqa: E402


@pytest.mark.parametrize(("c_in", "c_out", "groups", "bi", "bo", "expected"), [
    (48, 48, 6, 16, 16, ["NCHW16c", "OIHW16o", "NCHW16c"]),  # group width 8, 2 groups per block
    (104, 104, 13, 8, 8, ["NCHW8c", "OIHW8i8o", "NCHW8c"]),  # one group per block
    (128, 256, 4, 16, 16, ["NCHW16c", "OIHW16i16o", "NCHW16c"]),  # groups of 2 and 4 blocks
    (128, 128, 32, 16, 16, ["NCHW16c", "OIHW16o", "NCHW16c"]),  # group width 4: 4 groups per block
    (128, 128, 64, 16, 16, None),  # group width 2: 8 groups per block, too many zeros
    (24, 32, 4, 8, 16, None),  # 6 in, 8 out per group: groups straddle the input blocks
    (18, 18, 3, 1, 1, None),  # no block divides 18
])
def test_grouped_layouts(c_in, c_out, groups, bi, bo, expected):
    assert grouped_layouts(c_in, c_out, groups, bi, bo) == expected


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int, act: type[nn.Module], gate: type[nn.Module]) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)
        self.act, self.gate = act(), gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


def _cbr(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1,
         act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), act())


class GroupedNet(nn.Module):
    """RegNetY-like blocks: grouped 3×3 convs of group width 8 (2 groups per 16-lane block, 1 per 8-lane block) and
    16 (whole blocks), strided and not, each followed by a squeeze-excite block (squeezed widths 12 and 26: one
    blocked, one that no block divides), a residual, a 4-wide group conv (4 groups per block)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 48, 3, stride=2)
        self.b1 = nn.Sequential(_cbr(48, 48, 3, stride=2, groups=6), SqueezeExcite(48, 12, nn.ReLU, nn.Sigmoid),
                                nn.Conv2d(48, 48, 1), nn.BatchNorm2d(48))
        self.b2 = nn.Sequential(_cbr(48, 104, 1), _cbr(104, 104, 3, groups=13),
                                SqueezeExcite(104, 26, nn.ReLU, nn.Sigmoid), nn.Conv2d(104, 64, 1))
        self.b3 = nn.Sequential(_cbr(64, 64, 3, groups=4), _cbr(64, 64, 3, stride=2, groups=16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.relu(self.b1(y) + y[:, :, ::2, ::2])
        return self.head(self.b3(self.b2(y)))


class DepthwiseNet(nn.Module):
    """MobileNetV3/EfficientNet/ConvNeXt-like blocks: depthwise 3×3, 5×5 (strides 1 and 2) and 7×7 with
    hardswish/SiLU activations and SE blocks gated by hardsigmoid and sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 32, 3, stride=2, act=nn.Hardswish)
        self.dw3 = _cbr(32, 32, 3, groups=32, act=nn.SiLU)
        self.se1 = SqueezeExcite(32, 8, nn.SiLU, nn.Sigmoid)
        self.dw5 = _cbr(32, 32, 5, stride=2, groups=32, act=nn.Hardswish)
        self.se2 = SqueezeExcite(32, 8, nn.ReLU, nn.Hardsigmoid)
        self.pw = _cbr(32, 48, 1)
        self.dw5s1 = _cbr(48, 48, 5, groups=48, act=nn.SiLU)
        self.dw7 = nn.Sequential(nn.Conv2d(48, 48, 7, padding=3, groups=48), nn.BatchNorm2d(48))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se1(self.dw3(self.stem(x)))
        y = self.pw(self.se2(self.dw5(y)))
        y = self.dw5s1(y) + y
        return self.head(self.dw7(y) + y)


def _conv_layouts(gm: torch.fx.GraphModule, x: torch.Tensor, lanes: int) -> list[tuple[int, str, str]]:
    from bnfold.targets.tvm.importer import import_torch
    from bnfold.targets.tvm.layout import blocked_conv_passes

    return conv_layouts(tvm.transform.Sequential(blocked_conv_passes(lanes)[:2])(import_torch(gm, (x,)).mod))


def _fold(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.fx.GraphModule]:
    model = randomize_bn(model)
    return model, bnfold.fold(model, (x,)).module


def test_grouped_convs_are_blocked():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    _, gm = _fold(GroupedNet(), x)
    layouts = _conv_layouts(gm, x, 16)
    assert (6, "NCHW16c", "OIHW16o") in layouts  # 2 groups of 8 per 16-lane block: block-diagonal weights
    assert (13, "NCHW8c", "OIHW8i8o") in layouts  # 104 channels: blocks of 8, one group each
    assert (4, "NCHW16c", "OIHW16i16o") in layouts  # 16 channels per group: one block each
    assert (16, "NCHW16c", "OIHW16o") in layouts  # group width 4
    assert not any(g > 1 and layout == "NCHW" for g, layout, _ in layouts), layouts
    avx2 = _conv_layouts(gm, x, 8)
    assert (6, "NCHW8c", "OIHW8i8o") in avx2  # 8 lanes: the same conv, one group per block


@pytest.mark.parametrize("mcpu", [None, "x86-64-v3"])
def test_grouped_net_matches_folded_and_float64(mcpu, tmp_path):
    torch.manual_seed(1)
    x = torch.randn(1, 3, 32, 32)
    model, gm = _fold(GroupedNet(), x)
    art = compile_untuned_and_check(model, gm, x, mcpu, tmp_path / "cache")
    scheduled = art.build_info["tuning"]["default_scheduled"]
    assert any("group_conv2d_NCHWc" in k for k in scheduled), scheduled


@pytest.mark.parametrize("mcpu", [None, "x86-64-v3"])
def test_depthwise_net_matches_folded_and_float64(mcpu, tmp_path):
    torch.manual_seed(2)
    x = torch.randn(1, 3, 40, 40)
    model, gm = _fold(DepthwiseNet(), x)
    compile_untuned_and_check(model, gm, x, mcpu, tmp_path / "cache")


def _scheduled_kernels(gm: torch.fx.GraphModule, x: torch.Tensor) -> dict[str, object]:
    """Each kernel of the untuned CPU build (host ISA) with its hand schedule applied, by name."""
    from tvm import s_tir

    from bnfold.targets.tvm.build import kernel_tasks
    from bnfold.targets.tvm.importer import import_torch
    from bnfold.targets.tvm.schedules import default_schedule, params_for
    from bnfold.targets.tvm.target import cpu_target

    spec = cpu_target()
    out = {}
    for t in kernel_tasks(import_torch(gm, (x,)), spec, prepack=True):
        sch = default_schedule(t.workload["main"], params_for(spec.target))
        assert sch is not None, t.name
        out[t.name] = s_tir.Schedule(sch.mod)
    return out


def _parallel_loops(sch: object) -> int:
    return str(sch.mod["main"]).count("T.parallel(")


def test_silu_epilogue_is_one_loop_nest_and_se_gate_is_per_channel():
    """A conv + SiLU (the product read twice: x · sigmoid(x)) is one parallel loop nest, its epilogue computed from
    registers; an SE block's fc2 + sigmoid + broadcast multiply computes the gate once per channel."""
    from tvm import tirx as tir

    torch.manual_seed(3)
    x = torch.randn(1, 3, 40, 40)
    _, gm = _fold(DepthwiseNet(), x)
    kernels = _scheduled_kernels(gm, x)
    silu = [n for n in kernels if "depthwise" in n and "sigmoid" in n]
    assert silu, sorted(kernels)
    for name in silu:
        assert _parallel_loops(kernels[name]) == 1, (name, kernels[name].mod)
    gates = 0
    for name in [n for n in kernels if n.startswith("fused_conv2d") and "sigmoid" in n]:
        sch = kernels[name]
        blocks = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if "sigmoid" in sch.get(b).name_hint]
        if not blocks:  # fc1 + SiLU: pointwise, folded into the epilogue
            assert _parallel_loops(sch) == 1, (name, sch.mod)
            continue
        gates += 1  # fc2 + sigmoid gate, then the broadcast multiply over the feature map
        iterations = 1
        for lp in sch.get_loops(blocks[0]):
            ext = sch.get(lp).extent
            iterations *= int(ext) if isinstance(ext, tir.IntImm) else 1
        assert iterations == 32, (name, sch.mod)  # 32 channels, not 32 × H × W
    assert gates == 1, sorted(kernels)
