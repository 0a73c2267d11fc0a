"""Grouped convolutions (``1 < groups < C``) in the blocked ``NCHW[b]c`` layout of :mod:`bnfold.targets.tvm.layout`.

A conv with ``groups`` groups of ``g_i = C_in / groups`` input and ``g_o = C_out / groups`` output channels,
channel blocks ``b_i``, ``b_o`` (:func:`~bnfold.targets.tvm.layout.channel_block`, a function of the channel count
alone, so no layout transform sits around the conv), is computed blocked in one of two ways:

* **groups of whole blocks** (``b_i | g_i`` and ``b_o | g_o``: RegNet/ResNeXt stages whose group width is a
  multiple of the SIMD width): TOPI's ``conv2d_NCHWc`` with ``OIHW[b_i]i[b_o]o`` weights, which reads, for output
  block ``C_o``, the ``g_i / b_i`` input blocks of its group:
  ``out[n, C_o, y, x, c] = Σ_{r<g_i, i, j} x[n, G(C_o)·g_i/b_i + r/b_i, y·s + i·d, x·s + j·d, r % b_i] ·
  w[C_o, r/b_i, i, j, r % b_i, c]``, ``G(C_o) = C_o·b_o / g_o`` the group;
* **blocks of whole groups** (``g_i | b_i``, ``g_o | b_o`` and ``k = b_i / g_i = b_o / g_o ≤`` :data:`MAX_EXPANSION`:
  group width 8 with 16-lane blocks, RegNetY-400MF's 48- and 208-channel stages): each channel block holds ``k``
  whole groups in its input and the same ``k`` in its output, so the conv is, block by block, a dense ``b_i → b_o``
  conv whose weight is block-diagonal —
  ``W[C_o, 0, i, j, r, c] = w[C_o·b_o + c, r % g_i, i, j]`` when ``r / g_i = c / g_o`` (same group), else 0 —
  and ``conv2d_NCHWc`` computes it with ``groups = C_in / b_i`` (one block per group). The zeros cost ``k``× the
  multiplications of the grouped conv, but every multiplication is a full vector FMA with a broadcast operand, the
  register-tiled reduction of :mod:`bnfold.targets.tvm.schedules`; the exact formulation would need a different
  input channel per lane (a gather). The block-diagonal weight depends only on the weights: it is its own binding,
  lifted to load time with the other weight transforms. Adding exact zeros changes no sum.

Anything else (groups that straddle blocks, a channel count no block divides, ``k`` larger than
:data:`MAX_EXPANSION`) stays plain NCHW.
"""

from __future__ import annotations

from tvm import relax, te, tirx, topi

__all__ = ["MAX_EXPANSION", "grouped_layouts", "legalize_grouped"]

MAX_EXPANSION = 4
"""Largest ``k`` (groups per block, the multiplication overhead of the block-diagonal weight) computed blocked."""


def grouped_layouts(c_in: int, c_out: int, groups: int, bi: int, bo: int) -> list[str] | None:
    """``[data, weight, output]`` layouts of a grouped conv (not depthwise) with channel blocks ``bi``, ``bo``
    (see the module docstring), None when it stays NCHW."""
    if groups <= 1 or c_in % groups or c_out % groups or bi < 4 or bo % 4:
        return None
    gi, go = c_in // groups, c_out // groups
    data, out = f"NCHW{bi}c", f"NCHW{bo}c"
    if gi % bi == 0 and go % bo == 0:
        return [data, f"OIHW{bi}i{bo}o", out]
    if bi % gi == 0 and bo % go == 0 and bi // gi == bo // go <= MAX_EXPANSION:
        return [data, f"OIHW{bo}o", out]
    return None


def block_diagonal_weight(kernel: te.Tensor, bi: int, gi: int, go: int) -> te.Tensor:
    """``OIHW[b_o]o`` grouped weights ``w'[C_o, r, i, j, c] = w[C_o·b_o + c, r, i, j]`` (``r < g_i``) → the dense
    per-block weight ``W[C_o, 0, i, j, r, c]`` (``r < b_i``) of the module docstring: zero across groups."""
    blocks, _, kh, kw, bo = (int(d) for d in kernel.shape)
    zero = tirx.const(0.0, kernel.dtype)
    return te.compute(
        (blocks, 1, kh, kw, bi, bo),
        lambda co, _z, i, j, r, c: tirx.Select(r // gi == c // go, kernel[co, r % gi, i, j, c], zero),
        name="group_weight_block_diagonal")


def legalize_grouped(bb: relax.BlockBuilder, call: relax.Call, out_dtype: str) -> relax.Expr | None:
    """A blocked grouped conv (the layouts of :func:`grouped_layouts`) as ``conv2d_NCHWc``; None when ``call``
    is not one."""
    a = call.attrs
    groups = int(a.groups)
    data_layout, kernel_layout = str(a.data_layout), str(a.kernel_layout)
    dshape = [int(d) for d in call.args[0].ty.shape]
    kshape = [int(d) for d in call.args[1].ty.shape]
    if groups <= 1 or len(dshape) != 5:
        return None
    kernel = call.args[1]
    if len(kshape) == 5 and kernel_layout.startswith("OIHW") and kernel_layout.endswith("o"):
        bi = dshape[4]
        gi = kshape[1]
        c_out = kshape[0] * kshape[4]
        go = c_out // groups
        if bi % gi or kshape[4] % go:
            return None
        kernel = bb.emit_te(block_diagonal_weight, kernel, bi, gi, go, primfunc_name_hint="group_weight")
    elif len(kshape) != 6 or kshape[4] != dshape[4]:
        return None
    return bb.call_te(topi.nn.conv2d_NCHWc, call.args[0], kernel, a.strides, a.padding, a.dilation,
                      data_layout, str(a.out_layout), out_dtype, primfunc_name_hint="group_conv2d_NCHWc")
