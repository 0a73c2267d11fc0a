"""Winograd convolution ``F(m×m, 3×3)`` on blocked ``NCHW[c]c`` data: 3×3 stride-1 convs with ``(m+2)²/(9m²)`` of
the direct method's multiplications (F(4, 3): 4× fewer, F(2, 3): 2.25× fewer).

With ``α = m + 2`` and the Cook–Toom matrices ``A`` (α×m), ``B`` (α×α), ``G`` (α×3) of TOPI's interpolation
points (0, −1, 1, ½, −2 for F(4, 3): the most accurate of Barabasz et al., arXiv:1803.10986), an output tile
``Y`` (m×m) of a 3×3 correlation of the input tile ``d`` (α×α) with a filter ``g`` (3×3) is

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A,

and over channels the elementwise product becomes, per point ``(ε, ν)`` of the α×α tile, a matrix product:

    U[ε, ν, o, i]  = (G g_oi Gᵀ)[ε, ν]                          weights, transformed once at load
    V[ε, ν, i, p]  = (Bᵀ d_ip B)[ε, ν]                          input tile ``p`` of channel ``i``
    M[ε, ν, o, p]  = Σ_i U[ε, ν, o, i] · V[ε, ν, i, p]          α² matrix products (the work)
    Y_op           = Aᵀ M[·, ·, o, p] A                         output tile ``p`` of channel ``o``

Channels keep their blocked layout throughout (``V[ε, ν, i/b, p, i%b]``, ``U[ε, ν, o/b, i, o%b]``,
``M[ε, ν, o/b, p, o%b]``), so the matrix product is the same register-tiled reduction as a direct conv
(:mod:`bnfold.targets.tvm.schedules`: vectors along ``o%b``, broadcasts along ``i%b``) and the transforms are
vector code over the channel lanes. Each transform is written ``Σ_i T[i, a] Σ_j T[j, b] x[i, j]`` per point
``(a, b)`` with every coefficient ``T[i, a]`` a selection among its row's constants by the point's coordinate;
the schedule unrolls those coordinates (block annotation :data:`UNROLL`), so the selections fold to constants
and the zero terms drop out at compile time. (Selecting among 36 whole expressions instead gives the same code
but took 10× longer to compile: 3.5 s per kernel.)

Used where it pays (:func:`winograd_tile`): groups 1, 3×3, stride 1, dilation 1, static shapes, at least 16
channels in and out, outputs of at least 6×6; m = 4 from 16×16 up, else m = 2. A side the tile does not divide
gets a partial last tile (its input read past the padding as zeros, its extra outputs never stored).
Measured on Zen 5 (AVX-512, 2 threads, two resnet basic blocks untuned, direct → Winograd): 64 ch @ 56² 2.9 →
1.2 ms (m = 4), 128 @ 28² 2.9 → 1.2 (m = 4; m = 2: 1.8), 256 @ 14² 3.0 → 1.5 (m = 2 and 4 alike), 512 @ 7²
3.8 → 2.4 (m = 2; m = 4: 3.9, its 4× larger transformed weights stream from memory at batch 1).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
import tvm
from tvm import te, tirx, topi

__all__ = ["UNROLL", "transform_matrices", "winograd_conv2d_nchwc", "winograd_tile", "winograd_weight_transform"]

UNROLL = "bnfold.unroll_tile"
"""Block annotation of the transforms: per iter var, the factor its loop is split by, the inner part unrolled
(0: not split)."""

MIN_CHANNELS = 16


@cache
def transform_matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A, B, G)`` of ``F(m, 3)`` in float64: ``A`` α×m, ``B`` α×α, ``G`` α×3 (``Y = Aᵀ[(GgGᵀ)⊙(BᵀdB)]A``)."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    a, b, g = _cook_toom_convolution(_interpolation_points(m + 1), m, 3)
    return np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(g, np.float64)


def winograd_tile(kernel: tuple[int, int], strides: tuple[int, int], dilation: tuple[int, int], groups: int,
                  channels: tuple[int, int], out_hw: tuple[int, int]) -> int | None:
    """The tile ``m`` a conv is computed with (None: the direct method), see the module docstring."""
    if kernel != (3, 3) or strides != (1, 1) or dilation != (1, 1) or groups != 1:
        return None
    if min(channels) < MIN_CHANNELS:
        return None
    side = min(out_hw)
    if side >= 16:
        return 4
    return 2 if side >= 6 else None


def _coefficient(t: np.ndarray, i: int, a: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
    """``t[i, a]`` for a symbolic ``a``: a selection among the row's constants (folds once ``a`` is unrolled)."""
    row = [float(v) for v in t[i]]
    expr: tirx.PrimExpr = tirx.const(row[-1], dtype)
    for pa in reversed(range(len(row) - 1)):
        if row[pa] != row[-1]:
            expr = tirx.Select(a == pa, tirx.const(row[pa], dtype), expr)
    return expr


def _bilinear(t: np.ndarray, a: tirx.PrimExpr, b: tirx.PrimExpr, load: Callable[[int, int], tirx.PrimExpr],
              dtype: str) -> tirx.PrimExpr:
    """``Σ_i t[i, a] · Σ_j t[j, b] · load(i, j)`` at the point ``(a, b)``, the coefficients selected by the
    point's coordinates (:func:`_coefficient`): once the schedule unrolls them, TIR's simplifier folds the
    selections and drops the zero terms."""
    n = t.shape[0]
    col_b = [_coefficient(t, j, b, dtype) for j in range(n)]  # the same for every row i
    outer = None
    for i in range(n):
        inner = None
        for j in range(n):
            term = col_b[j] * load(i, j)
            inner = term if inner is None else inner + term
        term = _coefficient(t, i, a, dtype) * inner
        outer = term if outer is None else outer + term
    assert outer is not None
    return outer


def winograd_weight_transform(kernel: te.Tensor, m: int) -> te.Tensor:
    """``U[ε, ν, O, i, o] = Σ_{h,w} G[ε, h] G[ν, w] · k[O, i/b_i, h, w, i%b_i, o]`` from ``OIHW[b_i]i[b_o]o``
    weights (``i`` unblocked: the matrix product's reduction axis)."""
    g_mat = transform_matrices(m)[2]
    chunks_o, chunks_i, _, _, bi, bo = (int(s) for s in kernel.shape)
    alpha = m + 2
    gt = g_mat.T  # 3×α: gt[h, ε] = G[ε, h]
    return te.compute(
        (alpha, alpha, chunks_o, chunks_i * bi, bo),
        lambda e, v, co, ci, c: _bilinear(gt, e, v, lambda h, w: kernel[co, ci // bi, h, w, ci % bi, c],
                                          kernel.dtype),
        name="winograd_weight", attrs={UNROLL: [alpha, alpha, 0, 0, 0]})


def winograd_conv2d_nchwc(data: te.Tensor, u: te.Tensor, padding: tuple[int, int, int, int], m: int,
                          out_dtype: str) -> te.Tensor:
    """The conv of ``data`` (``NCHW[b_i]c``) with transformed weights ``u`` (:func:`winograd_weight_transform`),
    ``NCHW[b_o]c`` out: input transform, α² matrix products, output transform (module docstring)."""
    a_mat, b_mat, _ = transform_matrices(m)
    n, chunks_i, h, w, bi = (int(s) for s in data.shape)
    alpha, _, chunks_o, c_in, bo = (int(s) for s in u.shape)
    pt, pl, pb, pr = (int(p) for p in padding)
    oh, ow = h + pt + pb - 2, w + pl + pr - 2
    nh, nw = -(-oh // m), -(-ow // m)  # a partial last tile reads zeros past the padding; its extra outputs unused
    tiles = n * nh * nw
    pb, pr = nh * m + 2 - h - pt, nw * m + 2 - w - pl
    padded = topi.nn.pad(data, [0, 0, pt, pl, 0], [0, 0, pb, pr, 0], name="data_pad") if pt or pl or pb or pr \
        else data

    def tile_input(ci: tirx.PrimExpr, p: tirx.PrimExpr, c: tirx.PrimExpr) -> Callable[[int, int], tirx.PrimExpr]:
        b, ty, tx = p // (nh * nw), p % (nh * nw) // nw, p % nw
        return lambda i, j: padded[b, ci, ty * m + i, tx * m + j, c].astype(out_dtype)

    v = te.compute((alpha, alpha, chunks_i, tiles, bi),
                   lambda e, nu, ci, p, c: _bilinear(b_mat, e, nu, tile_input(ci, p, c), out_dtype),
                   name="winograd_input", attrs={UNROLL: [alpha, alpha, 0, 0, 0]})
    r = te.reduce_axis((0, c_in), name="ci")
    mm = te.compute((alpha, alpha, chunks_o, tiles, bo),
                    lambda e, nu, co, p, c: te.sum(u[e, nu, co, r, c].astype(out_dtype)
                                                   * v[e, nu, r // bi, p, r % bi], axis=r),
                    name="winograd_gemm")

    def output(b: tirx.PrimExpr, co: tirx.PrimExpr, y: tirx.PrimExpr, x: tirx.PrimExpr,
               c: tirx.PrimExpr) -> tirx.PrimExpr:
        p = b * (nh * nw) + y // m * nw + x // m
        return _bilinear(a_mat, y % m, x % m, lambda i, j: mm[i, j, co, p, c], out_dtype)

    return te.compute((n, chunks_o, oh, ow, bo), output, name="winograd_output", tag="conv2d_NCHWc_winograd",
                      attrs={UNROLL: [0, 0, m, m, 0]})


def is_static(*tensors: object) -> bool:
    """Every dimension of every Relax tensor argument is a constant."""
    try:
        return all(all(isinstance(d, tvm.tirx.IntImm) for d in t.ty.shape) for t in tensors)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return False
