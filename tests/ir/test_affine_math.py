"""Property tests for the fold arithmetic (pure functions, no graphs): random shapes, groups and dtypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.ir.affine_math import bn_affine, compose, fold_into_consumer, fold_into_producer

f64 = torch.float64
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _affine(c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, generator=g, dtype=f64), torch.randn(c, generator=g, dtype=f64)


def _per_channel(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * (t.dim() - 2)))


conv_cases = st.fixed_dictionaries({
    "dims": st.integers(1, 3),
    "groups": st.integers(1, 3),
    "in_g": st.integers(1, 3),
    "out_g": st.integers(1, 3),
    "k": st.integers(1, 3),
    "bias": st.booleans(),
    "seed": st.integers(0, 2**16),
})


@settings(max_examples=60, deadline=None)
@given(conv_cases)
def test_fold_into_producer_conv_and_transpose(case: dict) -> None:
    d, g, k = case["dims"], case["groups"], case["k"]
    cin, cout = g * case["in_g"], g * case["out_g"]
    gen = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(2, cin, *([5] * d), generator=gen, dtype=f64)
    a, b = _affine(cout, case["seed"])
    for transposed in (False, True):
        shape = (cin, cout // g, *([k] * d)) if transposed else (cout, cin // g, *([k] * d))
        w = torch.randn(shape, generator=gen, dtype=f64)
        bias = torch.randn(cout, generator=gen, dtype=f64) if case["bias"] else None
        op = CONVT[d] if transposed else CONV[d]
        y = op(x, w, bias, groups=g)
        expected = y * _per_channel(y, a) + _per_channel(y, b)
        w2, b2 = fold_into_producer(w, bias, a, b, kind="conv_transpose" if transposed else "conv", groups=g)
        torch.testing.assert_close(op(x, w2, b2, groups=g), expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=60, deadline=None)
@given(conv_cases)
def test_fold_into_consumer_conv_exact_without_padding(case: dict) -> None:
    d, g, k = case["dims"], case["groups"], case["k"]
    cin, cout = g * case["in_g"], g * case["out_g"]
    gen = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(2, cin, *([5] * d), generator=gen, dtype=f64)
    a, b = _affine(cin, case["seed"] + 1)
    w = torch.randn(cout, cin // g, *([k] * d), generator=gen, dtype=f64)
    bias = torch.randn(cout, generator=gen, dtype=f64) if case["bias"] else None
    expected = CONV[d](x * _per_channel(x, a) + _per_channel(x, b), w, bias, groups=g)
    w2, b2 = fold_into_consumer(w, bias, a, b, kind="conv", groups=g)
    torch.testing.assert_close(CONV[d](x, w2, b2, groups=g), expected, rtol=1e-10, atol=1e-10)
    # scale only: the shift must then be applied before the conv
    w3, b3 = fold_into_consumer(w, bias, a, None, kind="conv", groups=g)
    torch.testing.assert_close(CONV[d](x + _per_channel(x, b / a), w3, b3, groups=g), expected,
                               rtol=1e-8, atol=1e-8)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 3), st.booleans(), st.integers(0, 2**16))
def test_linear_folds(fin: int, fout: int, extra_dims: int, has_bias: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*([2] * extra_dims), fin, generator=gen, dtype=f64)
    w = torch.randn(fout, fin, generator=gen, dtype=f64)
    bias = torch.randn(fout, generator=gen, dtype=f64) if has_bias else None
    a_out, b_out = _affine(fout, seed)
    w2, b2 = fold_into_producer(w, bias, a_out, b_out, kind="linear")
    torch.testing.assert_close(F.linear(x, w2, b2), F.linear(x, w, bias) * a_out + b_out, rtol=1e-10, atol=1e-10)
    a_in, b_in = _affine(fin, seed + 1)
    w3, b3 = fold_into_consumer(w, bias, a_in, b_in, kind="linear")
    torch.testing.assert_close(F.linear(x, w3, b3), F.linear(x * a_in + b_in, w, bias), rtol=1e-10, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.floats(1e-6, 1e-1), st.integers(0, 2**16),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
def test_bn_affine_matches_batch_norm(c: int, eps: float, seed: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    mean, w, bias = (torch.randn(c, generator=gen).to(dtype) for _ in range(3))
    var = (torch.rand(c, generator=gen) + 0.01).to(dtype)
    x = torch.randn(3, c, 4, generator=gen, dtype=f64)
    a, b = bn_affine(mean, var, w, bias, eps)
    assert a.dtype == f64 and b.dtype == f64  # exact math, cast once by the caller
    ref = F.batch_norm(x, mean.double(), var.double(), w.double(), bias.double(), False, 0.0, eps)
    torch.testing.assert_close(x * a.view(1, -1, 1) + b.view(1, -1, 1), ref, rtol=1e-10, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.integers(0, 2**16))
def test_compose(c: int, seed: int) -> None:
    a1, b1 = _affine(c, seed)
    a2, b2 = _affine(c, seed + 7)
    x = torch.randn(5, c, dtype=f64)
    a, b = compose(a1, b1, a2, b2)
    torch.testing.assert_close(x * a + b, (x * a1 + b1) * a2 + b2, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(conv_cases, st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), st.integers(1, 400))
def test_fold_into_producer_rounds_once_into_the_weight_dtype(case: dict, dtype: torch.dtype, rows: int) -> None:
    """``out_dtype`` (blockwise) gives the bits of the float64 product cast once, for any block split."""
    import bnfold.ir.affine_math as am

    d, g, k = case["dims"], case["groups"], case["k"]
    cin, cout = g * case["in_g"], g * case["out_g"] * rows
    gen = torch.Generator().manual_seed(case["seed"])
    a, b = _affine(cout, case["seed"])
    for transposed in (False, True):
        shape = (cin, cout // g, *([k] * d)) if transposed else (cout, cin // g, *([k] * d))
        w = torch.randn(shape, generator=gen).to(dtype)
        kind = "conv_transpose" if transposed else "conv"
        w64, b64 = fold_into_producer(w, None, a, b, kind=kind, groups=g)
        saved = am.BLOCK_ELEMENTS
        am.BLOCK_ELEMENTS = 7  # force many blocks
        try:
            w_once, b_once = fold_into_producer(w, None, a, b, kind=kind, groups=g, out_dtype=dtype)
        finally:
            am.BLOCK_ELEMENTS = saved
        assert w_once.dtype == dtype and torch.equal(w_once, w64.to(dtype)) and torch.equal(b_once, b64)


@settings(max_examples=40, deadline=None)
@given(conv_cases, st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), st.integers(1, 50))
def test_fold_into_consumer_rounds_once_into_the_weight_dtype(case: dict, dtype: torch.dtype, rows: int) -> None:
    """``out_dtype`` gives the bits of the float64 result cast once (conv, conv-transpose, linear; with and
    without the shift), for any block split."""
    import bnfold.ir.affine_math as am

    d, g, k = case["dims"], case["groups"], case["k"]
    cin, cout = g * case["in_g"], g * case["out_g"] * rows
    gen = torch.Generator().manual_seed(case["seed"])
    a, b = _affine(cin, case["seed"])
    cases = [("conv", (cout, cin // g, *([k] * d)), g, b), ("conv", (cout, cin // g, *([k] * d)), g, None),
             ("conv_transpose", (cin, cout // g, *([k] * d)), g, None), ("linear", (cout, cin), 1, b),
             ("linear", (cout, cin), 1, None)]
    for kind, shape, groups, shift in cases:
        w = torch.randn(shape, generator=gen).to(dtype)
        bias = torch.randn(shape[1] * groups if kind == "conv_transpose" else shape[0], generator=gen).to(dtype) \
            if case["bias"] else None
        w64, b64 = fold_into_consumer(w, bias, a, shift, kind=kind, groups=groups)
        saved = am.BLOCK_ELEMENTS
        am.BLOCK_ELEMENTS = 7  # force many blocks
        try:
            w_once, b_once = fold_into_consumer(w, bias, a, shift, kind=kind, groups=groups, out_dtype=dtype)
        finally:
            am.BLOCK_ELEMENTS = saved
        assert w64.dtype == f64 and w_once.dtype == dtype and torch.equal(w_once, w64.to(dtype)), kind
        assert (b_once is None and b64 is None) or torch.equal(b_once, b64), kind  # type: ignore[arg-type]
