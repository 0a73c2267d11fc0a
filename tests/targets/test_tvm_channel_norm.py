"""LayerNorm over the channels of a blocked map as one kernel (bnfold/targets/tvm/channel_norm.py): timm's
``LayerNorm2d`` (permute → layer_norm → permute: ConvNeXt's stem, block and downsampling norms) compiled in the
blocked CPU layout. Parity of untuned builds against the folded model and a float64 reference (host ISA and AVX2's
8 lanes; channel blocks of 16, 8 — half a vector with AVX-512 — and 4), randomized affines and input statistics,
both captures; the chain is one kernel per norm, scheduled one row per core iteration with vector lanes."""

from __future__ import annotations

import pytest
import torch
from helpers import compile_untuned_and_check
from torch import nn

tvm = pytest.importorskip("tvm")
timm_layers = pytest.importorskip("timm.layers")

import bnfold  # noqa: E402


class ConvNeXtLike(nn.Module):
    """Stem conv + LayerNorm2d, a ConvNeXt block with a conv MLP (depthwise 7×7 → LayerNorm2d → 1×1 → GELU → 1×1,
    residual), LayerNorm2d + 2×2 stride-2 downsampling to 24 channels (blocks of 8), a block with 20 channels
    (blocks of 4) followed by a 1×1 conv, a LayerNorm2d head on the pooled map (its output read as NCHW by the
    flatten)."""

    def __init__(self) -> None:
        super().__init__()
        ln = timm_layers.LayerNorm2d
        self.stem, self.n0 = nn.Conv2d(3, 32, 4, stride=4), ln(32)
        self.dw, self.n1 = nn.Conv2d(32, 32, 7, padding=3, groups=32), ln(32)
        self.fc1, self.fc2 = nn.Conv2d(32, 64, 1), nn.Conv2d(64, 32, 1)
        self.n2, self.down = ln(32), nn.Conv2d(32, 24, 2, stride=2)
        self.n3, self.pw = ln(24), nn.Conv2d(24, 20, 1)
        self.n4, self.pw2, self.head = ln(20), nn.Conv2d(20, 20, 1), ln(20)
        self.fc = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.n0(self.stem(x))
        y = y + self.fc2(nn.functional.gelu(self.fc1(self.n1(self.dw(y)))))
        y = self.down(self.n2(y))
        y = self.pw2(self.n4(self.pw(self.n3(y)) + 1.0))
        return self.fc(self.head(y.mean((2, 3), keepdim=True)).flatten(1))


def _model_and_input(seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = ConvNeXtLike().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return model, torch.randn(1, 3, 64, 64) * 3.0 + 1.0  # a mean and spread far from 0 and 1


@pytest.mark.parametrize("mcpu", [None, "x86-64-v3"])
def test_channel_norms_match_folded_and_float64(mcpu, tmp_path):
    model, x = _model_and_input(0)
    gm = bnfold.fold(model, (x,)).module
    art = compile_untuned_and_check(model, gm, x, mcpu, tmp_path / "cache")
    scheduled = art.build_info["tuning"]["default_scheduled"]
    assert any(k.startswith("channel_layer_norm") for k in scheduled), scheduled


def _kernels(gm: torch.fx.GraphModule, x: torch.Tensor) -> list[str]:
    """The kernels ``main`` calls per inference in the untuned CPU build (host ISA), in order."""
    from tvm import relax

    from bnfold.targets.tvm.build import _main_only, _prepare_cpu
    from bnfold.targets.tvm.importer import import_torch
    from bnfold.targets.tvm.target import cpu_target

    mod = _main_only(_prepare_cpu(import_torch(gm, (x,)).mod, cpu_target(), True))
    call_tir = tvm.ir.Op.get("relax.call_tir")
    names: list[str] = []

    def visit(e: relax.Expr) -> None:
        if isinstance(e, relax.Call) and e.op.same_as(call_tir):
            names.append(e.args[0].name_hint)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return names


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_layer_norm_2d_is_one_kernel(capture):
    """Each of the six LayerNorm2d is one ``channel_layer_norm`` kernel on the blocked tensor: no layer_norm, no
    transpose, and one layout transform besides the image's (the head's output to NCHW for the flatten)."""
    model, x = _model_and_input(1)
    gm = bnfold.fold(model, (x,), capture=capture).module
    names = _kernels(gm, x)
    assert sum(n.startswith("channel_layer_norm") for n in names) == 6, names
    assert not any("transpose" in n or n.startswith("layer_norm") or "fused_layer_norm" in n for n in names), names
    assert sum("layout_transform" in n for n in names) == 2, names  # the image in, the head's norm out


def test_channel_norm_schedule_is_one_parallel_row_loop():
    from tvm import s_tir

    from bnfold.targets.tvm.build import kernel_tasks
    from bnfold.targets.tvm.importer import import_torch
    from bnfold.targets.tvm.schedules import default_schedule, params_for
    from bnfold.targets.tvm.target import cpu_target

    model, x = _model_and_input(2)
    gm = bnfold.fold(model, (x,)).module
    spec = cpu_target()
    tasks = [t for t in kernel_tasks(import_torch(gm, (x,)), spec, prepack=True) if "channel_layer_norm" in t.name]
    assert tasks
    for t in tasks:
        sch = default_schedule(t.workload["main"], params_for(spec.target))
        assert sch is not None, t.name
        text = str(s_tir.Schedule(sch.mod).mod["main"])
        assert text.count("T.parallel(") == 1, text  # rows (n, h), every stage inside
        assert text.count("T.vectorized(") == 3, text  # the two lane partial sums and the output
