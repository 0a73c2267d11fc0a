"""The register-tiled matmul schedule (bnfold/targets/tvm/dense.py): dense layers and attention's products on
token counts no tile divides (197: ViT's, prime; 50; 7), with their bias/GELU/residual epilogues, checked against
the folded model and float64; the tile bound, the epilogue computed per tile, the weights packed at load."""

from __future__ import annotations

import pytest
import torch
from helpers import compile_untuned_and_check
from torch import nn

tvm = pytest.importorskip("tvm")

import bnfold  # noqa: E402
from bnfold.targets.tvm.dense import accumulators, choose_tile  # noqa: E402
from bnfold.targets.tvm.schedules import ScheduleParams, schedule_kernel  # noqa: E402

AVX512 = ScheduleParams(lanes=16, registers=32, cores=2)
AVX2 = ScheduleParams(lanes=8, registers=16, cores=2)


class Encoder(nn.Module):
    """A pre-norm transformer layer with awkward sizes: 40 features (a multiple of 8, not of 16), 5 heads of 8,
    an MLP of 72 (GELU), attention through ``scaled_dot_product_attention``, residual adds, a 10-way head."""

    def __init__(self, dim: int = 40, heads: int = 5, hidden: int = 72) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(a)
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))
        return self.head(x)


def _folded(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return bnfold.fold(model.eval(), (x,)).module


@pytest.mark.parametrize(("tokens", "mcpu"), [(197, None), (50, None), (7, None), (197, "x86-64-v3")])
def test_encoder_on_odd_token_counts_matches_folded_and_float64(tokens, mcpu, tmp_path):
    torch.manual_seed(0)
    model, x = Encoder(), torch.randn(1, tokens, 40)
    art = compile_untuned_and_check(model, _folded(model, x), x, mcpu, tmp_path / "cache")
    names = art.build_info["tuning"]["default_scheduled"]
    assert any("matmul" in k and "gelu" in k for k in names), names


@pytest.mark.parametrize("p", [AVX512, AVX2], ids=["avx512", "avx2"])
@pytest.mark.parametrize(("rows", "vectors"), [(197, 48), (197, 24), (50, 12), (7, 3), (1, 64), (197, 13)])
def test_tile_fits_the_accumulator_budget(p, rows, vectors):
    m, t = choose_tile(rows, vectors, 1, p.registers, p.cores)
    assert vectors % m == 0 and 1 <= t <= rows
    assert m * t <= accumulators(p.registers) < p.registers
    assert 2 * m * t >= min(accumulators(p.registers), vectors * rows)  # enough FMAs in flight


def _linear_gelu(tokens: int, k: int, n: int) -> object:
    from tvm import te, topi

    from bnfold.targets.tvm.vecmath import _gelu

    a = te.placeholder((tokens, k), name="a")
    w = te.placeholder((k, n), name="w")
    b = te.placeholder((n,), name="b")
    return te.create_prim_func([a, w, b, _gelu(topi.add(topi.matmul(a, w), b))]).with_attr(
        "layout_free_buffers", [1, 2])


def test_epilogue_runs_per_tile_and_the_weight_is_packed():
    """Linear + bias + GELU on 197 tokens: one parallel loop (the GELU is applied per tile from the
    accumulators, not in loops of its own over memory); the weight read as 16-lane panels W'[j_o, k, j_m, j_v]."""
    from tvm import s_tir

    from bnfold.targets.tvm.schedules import _postprocess

    sch = s_tir.Schedule(tvm.IRModule({"main": _linear_gelu(197, 64, 256)}))
    schedule_kernel(sch, AVX512)
    assert _postprocess(sch)
    script = sch.mod.script()
    main = script[script.index("T.parallel"):]
    assert main.count("T.parallel") == 1, script
    assert "w_pad" not in script
    panels = [ln for ln in script.splitlines() if "w_global = T.sblock_alloc_buffer" in ln]
    assert panels and "((4, 64, 4, 16))" in panels[0], panels  # 4 × 6 tiles: j = (j_o 4, j_m 4, j_v 16)


def test_transposed_linear_weight_is_packed_at_load(tmp_path):
    """A ``Linear``'s weight reaches the matmul kernel transposed (a value computed from a parameter, which Relax
    does not mark layout-free): mark_weight_operands marks it, so it is packed once in main_transform_params."""
    from bnfold.targets.tvm.build import BuildOptions, _cpu_pipeline
    from bnfold.targets.tvm.importer import import_torch
    from bnfold.targets.tvm.target import cpu_target

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(32, 64), nn.GELU()).eval(), torch.randn(1, 50, 32)
    gm = bnfold.fold(model, (x,)).module
    mod, _ = _cpu_pipeline(import_torch(gm, (x,)), cpu_target(), BuildOptions(prepack=True, cache_dir=tmp_path))
    kernels = [f for gv, f in mod.functions_items() if "matmul" in gv.name_hint
               and "weight_prepack" not in gv.name_hint and isinstance(f, tvm.tirx.PrimFunc)]
    assert kernels
    script = "\n".join(f.script() for f in kernels)
    assert "T.Buffer((T.int64(32), T.int64(64))" not in script, script  # not the plain transposed weight
    assert "_global: T.Buffer((T.int64(32), T.int64(" in script, script  # but k × panel columns × lanes


def test_dynamic_batch_matmuls_keep_a_schedule(tmp_path):
    """A symbolic batch extent (matmul_axes declines it: the generic reduction schedule takes it): no kernel
    left as written, and the artifact computes every batch size of its range."""
    import warnings

    from bnfold.targets.tvm import UntunedKernelsWarning, compile

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 72), nn.GELU(), nn.Linear(72, 40)).eval()
    x = torch.randn(2, 7, 40)
    gm = bnfold.fold(model, (x,)).module
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntunedKernelsWarning)
        art = compile(gm, (x,), dynamic_batch=(1, 3), cache_dir=tmp_path)
    for b in (1, 3):
        xb = torch.randn(b, 7, 40)
        torch.testing.assert_close(art(xb), gm(xb), rtol=1e-5, atol=1e-5)
