"""The CPU kernels transformers and modern CNNs run (issue 23): matmuls padded to full register tiles
(schedules._pad_einsum), row kernels (softmax, LayerNorm: schedules.row_reduction), polynomial transcendental
functions (vecmath.py), elementwise ops moved across reshapes into the matmul epilogue (epilogues.py), and the two
ops TVM 0.27 cannot compile as stock (cumsum, boolean equal). Each artifact is checked against the folded model
and a float64 reference, for the host's vector width and for AVX2's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import compile_untuned_and_check
from torch import nn

tvm = pytest.importorskip("tvm")

import bnfold  # noqa: E402
from bnfold.targets.tvm.epilogues import sink_reshapes  # noqa: E402
from bnfold.targets.tvm.schedules import ScheduleParams, schedule_kernel  # noqa: E402

AVX512 = ScheduleParams(lanes=16, registers=32, cores=2)


class Block(nn.Module):
    """A pre-norm ViT block on a prime number of tokens (as ViT's 197): LayerNorm, multi-head attention through
    ``scaled_dot_product_attention`` (softmax over the prime length), GELU MLP, two residual adds."""

    def __init__(self, dim: int = 48, heads: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(a)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class SqueezeExcite(nn.Module):
    """EfficientNet's MBConv tail: depthwise 5×5 + BN + SiLU, squeeze-excite (mean → 1×1 → SiLU → 1×1 →
    sigmoid → multiply), 1×1 projection + BN."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.dw = nn.Sequential(nn.Conv2d(c, c, 5, padding=2, groups=c), nn.BatchNorm2d(c), nn.SiLU())
        self.se1, self.se2 = nn.Conv2d(c, 8, 1), nn.Conv2d(8, c, 1)
        self.proj = nn.Sequential(nn.Conv2d(c, 16, 1), nn.BatchNorm2d(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(x)
        s = torch.sigmoid(self.se2(nn.functional.silu(self.se1(y.mean((2, 3), keepdim=True)))))
        return self.proj(y * s)


def _fold(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return bnfold.fold(model.eval(), (x,)).module


@pytest.mark.parametrize("mcpu", [None, "x86-64-v3"])
def test_transformer_block_matches_folded_and_float64(mcpu, tmp_path):
    torch.manual_seed(0)
    model, x = Block(), torch.randn(1, 13, 48)
    art = compile_untuned_and_check(model, _fold(model, x), x, mcpu, tmp_path / "cache")
    names = art.build_info["tuning"]["default_scheduled"]
    assert any("gelu" in k and "matmul" in k for k in names), names  # GELU is fc1's epilogue, not its own kernel
    assert not any(k.startswith("fused_reshape") and "add" in k for k in names), names  # nor the residual adds


@pytest.mark.parametrize("mcpu", [None, "x86-64-v3"])
def test_squeeze_excite_matches_folded_and_float64(mcpu, tmp_path):
    torch.manual_seed(0)
    model, x = SqueezeExcite(), torch.randn(1, 32, 14, 14)
    compile_untuned_and_check(model, _fold(model, x), x, mcpu, tmp_path / "cache")


class Masks(nn.Module):
    """What transformers' mask code lowers to: ``cumsum`` over a mask, ``==`` of booleans. (The mask is cast
    to int first: TVM 0.27's importer types the ``cumsum`` of a bool tensor as bool, where PyTorch gives int64.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = x > 0
        pos = torch.cumsum(keep.to(torch.int32), dim=-1)
        same = keep == keep.flip(-1)
        return x * same + pos.to(x.dtype)


def test_cumsum_and_boolean_equal_compile(tmp_path):
    torch.manual_seed(0)
    model, x = Masks(), torch.randn(2, 9)
    gm = bnfold.fold(model, (x,)).module
    from bnfold.targets.tvm import compile

    art = compile(gm, (x,), cache_dir=tmp_path / "cache")
    torch.testing.assert_close(art(x), model(x), rtol=0, atol=0)


def _build(fn: object, n: int) -> tuple[object, object]:
    from tvm import te

    a = te.placeholder((n,), name="a")
    return tvm.compile(te.create_prim_func([a, fn(a)]), target="llvm"), a


@pytest.mark.parametrize("name", ["exp", "sigmoid", "silu", "tanh", "gelu", "gelu_tanh"])
def test_polynomial_functions_are_float32_accurate(name):
    """Each function against float64 on [-30, 30] and at ±inf/0: within 16 float32 ulps (relative; for GELU and
    SiLU, of max(|f(x)|, |x|)): a few ulp for the polynomial, plus Cephes' range reduction ``x − n·ln 2``, whose
    error grows with ``n = x/ln 2`` (9 ulp measured at x = 29); exact limits at ±inf where the function has
    them."""
    from bnfold.targets.tvm import vecmath

    fns = {"exp": (vecmath.topi.math.fast_exp, np.exp),
           "sigmoid": (vecmath._sigmoid, lambda v: 1 / (1 + np.exp(-v))),
           "silu": (vecmath._silu, lambda v: v / (1 + np.exp(-v))),
           "tanh": (vecmath.topi.math.fast_tanh, np.tanh),
           "gelu": (vecmath._gelu, lambda v: v * 0.5 * (1 + np.vectorize(math.erf)(v / math.sqrt(2)))),
           "gelu_tanh": (vecmath._gelu_tanh, lambda v: 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi)
                                                                              * (v + 0.044715 * v**3))))}
    te_fn, ref = fns[name]
    x = np.concatenate([np.linspace(-30, 30, 6001), [0.0]]).astype(np.float32)
    lib, _ = _build(te_fn, x.size)
    out = tvm.runtime.tensor(np.zeros_like(x))
    lib["main"](tvm.runtime.tensor(x), out)
    want = ref(x.astype(np.float64))
    scale = np.maximum(np.abs(want), np.abs(x.astype(np.float64)) * (name in ("gelu", "gelu_tanh", "silu")))
    err = np.abs(out.numpy() - want) / np.maximum(scale, np.finfo(np.float32).tiny)
    assert np.max(err) <= 16 * np.finfo(np.float32).eps, (name, x[np.argmax(err)], np.max(err))
    if name == "exp":
        lib2, _ = _build(te_fn, 2)
        edge = tvm.runtime.tensor(np.zeros(2, np.float32))
        lib2["main"](tvm.runtime.tensor(np.array([-np.inf, -200.0], np.float32)), edge)
        assert edge.numpy().tolist() == [0.0, 0.0]  # a masked attention score contributes nothing


def _schedule(func: object) -> object:
    from tvm import s_tir

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    schedule_kernel(sch, AVX512)
    return sch


def test_token_rows_are_padded_to_a_register_tile():
    """A linear layer on 197 tokens (prime): rows padded so the tile is several rows wide (one row: a weight
    load per FMA); the weight is never padded."""
    from tvm import te, topi

    a = te.placeholder((197, 192), name="a")
    w = te.placeholder((192, 768), name="w")
    sch = _schedule(te.create_prim_func([a, w, topi.matmul(a, w)]))
    trace = str(sch.trace)
    assert "pad_einsum" in trace and "padding=[6, 1, 1]" in trace, trace  # 4 × 6 tiles: 197 → 198 rows
    assert "w_pad" not in sch.mod.script()


def test_attention_scores_are_padded_to_the_vector_width():
    """``Q·Kᵀ`` over 197 tokens: the key axis (vectorized) padded to whole vectors of 16 (else lanes = 1) —
    here 14 of them (224), which allows 7 × 3 tiles where 13 vectors (prime) allow 13 × 1 or 1 × t only."""
    from tvm import te

    q = te.placeholder((3, 197, 64), name="q")
    kt = te.placeholder((3, 64, 197), name="kt")
    r = te.reduce_axis((0, 64), name="r")
    s = te.compute((3, 197, 197), lambda b, i, j: te.sum(q[b, i, r] * kt[b, r, j], axis=r), name="s")
    sch = _schedule(te.create_prim_func([q, kt, s]))
    assert "padding=[1, 3, 224, 1]" in str(sch.trace), str(sch.trace)
    assert "T.vectorized(16)" in sch.mod.script().replace("T.int64(16)", "16")


def test_softmax_rows_reduce_in_vector_partials():
    """A softmax over rows of 128: one parallel loop over rows, max and sum as 16 partial results (rfactor)."""
    from tvm import te, topi

    x = te.placeholder((4, 8, 128), name="x")
    sch = _schedule(te.create_prim_func([x, topi.nn.fast_softmax(x, -1)]))
    script = sch.mod.script()
    assert script.count("T.parallel") == 1
    assert "T_softmax_maxelem_rf" in script and "T_softmax_expsum_rf" in script


def test_sink_reshapes_moves_gelu_and_residual_into_the_matmul_side():
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((13, 8), "float32"))
    w = relax.Var("w", relax.TensorType((8, 8), "float32"))
    r = relax.Var("r", relax.TensorType((1, 13, 8), "float32"))
    with bb.function("main", [x, w, r]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, w))
            y3 = bb.emit(relax.op.reshape(y, (1, 13, 8)))
            g = bb.emit(relax.op.nn.gelu(y3))
            g2 = bb.emit(relax.op.reshape(g, (13, 8)))
            z = bb.emit(relax.op.matmul(g2, w))
            z3 = bb.emit(relax.op.reshape(z, (1, 13, 8)))
            out = bb.emit_output(relax.op.add(r, z3))
        bb.emit_func_output(out)
    before = bb.get()
    after = sink_reshapes(before)
    text = after["main"].script()
    assert "R.nn.gelu(lv)" in text or "gelu" in text
    ops = []
    relax.analysis.post_order_visit(after["main"], lambda e: ops.append(
        (e.op.name, [int(d) for d in e.ty.shape]) if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op)
        and e.op.name in ("relax.nn.gelu", "relax.add") else None))
    assert ("relax.nn.gelu", [13, 8]) in ops and ("relax.add", [13, 8]) in ops, ops
    data = [np.random.default_rng(i).standard_normal([int(d) for d in v.ty.shape]).astype("float32")
            for i, v in enumerate([x, w, r])]
    results = []
    for mod in (before, after):
        ex = relax.build(relax.transform.LegalizeOps()(mod), "llvm")
        vm = relax.VirtualMachine(ex, tvm.cpu())
        results.append(vm["main"](*[tvm.runtime.tensor(d) for d in data]).numpy())
    np.testing.assert_array_equal(results[0], results[1])


def test_optimize_report_says_a_slower_tvm_artifact_in_its_first_line(tmp_path):
    from bnfold.deploy import OptimizeResult

    result = OptimizeResult(tmp_path, None, None, None, warnings=[
        "tvm: the compiled artifact is 1.31x slower than PyTorch eager on this host at the example batch; deploy "
        "'pytorch eager (folded)' or tune it (--tune-trials N, ~32 per kernel)"])
    first = str(result).splitlines()[0]
    assert "1.31x slower than PyTorch eager" in first, first
    assert "slower" not in str(OptimizeResult(tmp_path, None, None, None)).splitlines()[0]
