"""The blocked CPU layout (bnfold/targets/tvm/layout.py): which layout each conv gets, the clip rewrite, and
parity of blocked stems, depthwise, odd channel counts and grouped convs against the folded model and a float64
reference, for the host's vector width and for AVX2's."""

from __future__ import annotations

import pytest
import torch
from helpers import compile_untuned_and_check, conv_layouts, randomize_bn
from torch import nn

tvm = pytest.importorskip("tvm")

import bnfold  # noqa: E402
from bnfold.targets.tvm.layout import blocked_conv_passes, channel_block, clip_to_min_max  # noqa: E402


@pytest.mark.parametrize(("channels", "lanes", "block"), [
    (64, 16, 16), (24, 16, 8), (20, 16, 4), (3, 16, 3), (2, 16, 2), (7, 16, 1), (18, 16, 1),
    (24, 8, 8), (12, 8, 4), (64, 4, 4)])
def test_channel_block(channels, lanes, block):
    assert channel_block(channels, lanes) == block


class MixedNet(nn.Module):
    """Every layout case: a 3-channel stem (NCHW3c in), ReLU6 (a clip), a depthwise conv on 24 channels (blocks
    of 8 with AVX-512), a grouped conv that is not depthwise (stays NCHW), a 1x1 conv to 20 channels (blocks of
    4), a residual add, a strided depthwise conv with a channel count no block divides (18), a pool, a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24), nn.ReLU6())
        self.grouped = nn.Sequential(nn.Conv2d(24, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(32, 20, 1), nn.BatchNorm2d(20))
        self.skip = nn.Conv2d(24, 20, 1)
        self.odd = nn.Sequential(nn.Conv2d(20, 18, 1), nn.Hardswish(),
                                 nn.Conv2d(18, 18, 5, stride=2, padding=2, groups=18), nn.BatchNorm2d(18))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(18, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.stem(x))
        y = self.pw(self.grouped(y)) + self.skip(y)
        return self.head(self.odd(y))


@pytest.fixture(scope="module")
def mixed() -> tuple[torch.nn.Module, torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_bn(MixedNet())
    x = torch.randn(2, 3, 20, 20)
    return model, bnfold.fold(model, (x,)).module, x


def test_each_conv_gets_its_layout_and_clips_stay_blocked(mixed):
    from tvm import relax

    from bnfold.targets.tvm.importer import import_torch

    _, gm, x = mixed
    mod = import_torch(gm, (x,)).mod
    converted = tvm.transform.Sequential(blocked_conv_passes(16)[:2])(mod)
    layouts = conv_layouts(converted)
    assert ((1, "NCHW3c", "OIHW3i8o") in layouts)  # the stem, 24 output channels: blocks of 8
    assert ((24, "NCHW8c", "OIHW1i8o") in layouts)  # depthwise stays in its vector lanes
    assert ((4, "NCHW", "OIHW") in layouts)  # grouped, not depthwise: plain
    assert ((1, "NCHW8c", "OIHW8i4o") in layouts)  # the 1x1 skip: 24 → 20 channels
    assert ((18, "NCHW", "OIHW") in layouts)  # 18 channels: no block divides them
    text = str(converted["main"])
    assert "R.minimum" in text
    # the ReLU6s run in their conv's layout: none reads a value transformed back to NCHW
    bindings = [b for block in converted["main"].body.blocks for b in block.bindings
                if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)]
    transformed = [b.var for b in bindings if b.value.op.name == "relax.layout_transform"]
    sandwiched = [b for b in bindings if b.value.op.name in ("relax.maximum", "relax.clip")
                  and any(v.same_as(b.value.args[0]) for v in transformed)]
    assert sandwiched == []


def test_clip_rewrite_keeps_values():
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.clip(x, -0.5, 1.5))
        bb.emit_func_output(y)
    mod = clip_to_min_max(bb.get())
    assert "clip" not in str(mod["main"])
    ex = relax.build(relax.transform.LegalizeOps()(mod), "llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    data = torch.linspace(-2, 2, 32).reshape(4, 8)
    out = torch.from_numpy(vm["main"](tvm.runtime.tensor(data.numpy())).numpy())
    torch.testing.assert_close(out, data.clamp(-0.5, 1.5), rtol=0, atol=0)


@pytest.mark.parametrize("mcpu", [None, "x86-64-v3"])
def test_mixed_layouts_match_folded_and_float64(mixed, mcpu, tmp_path):
    """Untuned blocked build (host vector width, then AVX2's 8 lanes) against the folded model and against the
    unfolded model run in float64."""
    model, gm, x = mixed
    art = compile_untuned_and_check(model, gm, x, mcpu, tmp_path / "cache")
    scheduled = art.build_info["tuning"]["default_scheduled"]
    assert any("depthwise_conv2d_NCHWc" in k for k in scheduled), scheduled
