"""Attention's guarded softmax as one row kernel (bnfold/targets/tvm/attention.py): the rewrite of PyTorch's
``_safe_softmax`` pattern, the kernel against float64 on row lengths with and without a partial last vector
(197, 33, 16, 7), ``−∞`` entries (masked keys) and rows that are all ``−∞`` (fully masked queries: zeros, as
PyTorch), and a masked ``scaled_dot_product_attention`` compiled end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

import bnfold  # noqa: E402
from bnfold.targets.tvm.attention import safe_softmax_te  # noqa: E402
from bnfold.targets.tvm.schedules import ScheduleParams, schedule_kernel  # noqa: E402


def _reference(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    safe = np.where(np.isneginf(m), 0.0, m)
    e = np.exp(x - safe)
    s = e.sum(-1, keepdims=True)
    return np.where(s == 0, 0.0, e / np.where(s == 0, 1.0, s))


@pytest.mark.parametrize("lanes", [16, 8])
@pytest.mark.parametrize("n", [197, 33, 16, 7])
def test_kernel_matches_float64_with_masked_entries_and_rows(n, lanes):
    from tvm import s_tir, te

    rng = np.random.default_rng(n)
    x = (3 * rng.standard_normal((2, 5, n))).astype(np.float32)
    x[0, 1, rng.integers(0, n, size=max(1, n // 3))] = -np.inf  # masked keys
    x[1, 2, :] = -np.inf  # a fully masked query
    xt = te.placeholder(x.shape, "float32", name="x")
    func = te.create_prim_func([xt, safe_softmax_te(xt, lanes)])
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    schedule_kernel(sch, ScheduleParams(lanes=lanes, registers=32 if lanes == 16 else 16, cores=2))
    assert sch.mod.script().count("T.parallel") == 1
    lib = tvm.compile(sch.mod, target="llvm")
    out = tvm.runtime.tensor(np.zeros_like(x))
    lib["main"](tvm.runtime.tensor(x), out)
    got = out.numpy()
    assert not np.isnan(got).any()
    assert np.all(got[1, 2] == 0.0)
    # float32 rounding of a sum of n terms and of the polynomial exp (16 ulp, see test_tvm_transformers)
    np.testing.assert_allclose(got, _reference(x), rtol=0, atol=(n + 16) * np.finfo(np.float32).eps)


class MaskedAttention(nn.Module):
    """Self-attention with a boolean mask that hides some keys and, for query 0, every key."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        keep = torch.ones(n, n, dtype=torch.bool).tril()
        keep[0] = False
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(b, n, c)


def test_masked_attention_compiles_to_one_softmax_kernel(tmp_path):
    from bnfold.targets.tvm import compile

    torch.manual_seed(0)
    model, x = MaskedAttention().eval(), torch.randn(1, 19, 32)
    gm = bnfold.fold(model, (x,)).module
    want = gm(x)
    assert torch.all(want[0, 0] == 0) and not torch.isnan(want).any()  # PyTorch: zeros for a fully masked query
    art = compile(gm, (x,), cache_dir=tmp_path / "cache")
    assert bnfold.compare(gm, art, (x,)).passed
    torch.testing.assert_close(art(x), want, rtol=1e-5, atol=1e-5)
    names = art.build_info["tuning"]["default_scheduled"]
    assert any("safe_softmax" in k for k in names), names
    assert not any("equal" in k or "where" in k for k in names), names  # the guard is not a kernel of its own
