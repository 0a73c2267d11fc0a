"""Blocked activation layout for CPU convolutions: ``NCHW[c]c`` data, ``OIHW[c]i[c]o`` weights, end to end.

``x[n, C, h, w]`` is stored as ``x'[n, C/c, h, w, c]`` (``c`` = the SIMD width in fp32 lanes: 16 with
AVX-512, 8 with AVX2), so a convolution's output channels are contiguous vectors: every store and every weight
load is one aligned vector. Relax's ``ConvertLayout`` rewrites each ``conv2d`` to the layouts
:func:`conv_layouts` picks for it and propagates them through the elementwise ops, pools and adds that follow,
inserting ``layout_transform`` only where a consumer needs plain NCHW (``flatten``, a grouped conv that is not
depthwise). The weights' transforms depend only on weights, so ``LiftTransformParams`` runs them once at load.

The block of a tensor with ``C`` channels is a function of ``C`` alone (:func:`channel_block`), so a producer's
output block is its consumer's input block and no transform sits between them:

* ``C`` divisible by a power of two ``b`` with ``4 ≤ b ≤ lanes``: the largest such ``b`` (24 channels with
  AVX-512: blocks of 8, half vectors);
* a few channels (``C < 4``, an image): one block of all of them (the stem reads ``NCHW3c``, the image transposed
  once);
* otherwise: no block (plain NCHW; the conv is left as it is).

Depthwise convs (``groups = C_in = C_out``) take ``NCHW[b]c`` data and ``OIHW1i[b]o`` weights: ``out[n, C_o, y,
x, c] = Σ_{i,j} x[n, C_o, y·s + i·d, x·s + j·d, c] · w[C_o, 0, i, j, 0, c]`` — channels stay in their vector
lanes, the window is the reduction. Other grouped convs are blocked when their groups are whole blocks or their
blocks whole groups (:mod:`bnfold.targets.tvm.grouped`), else they stay NCHW.

Relax's stock legalization refuses sub-indexed layouts ("channel chunk cannot be legalized by TOPI"), so
:func:`legalize_conv2d` legalizes them itself: TOPI's ``conv2d_NCHWc`` compute for ordinary convs, the depthwise
compute above, and any other blocked grouped conv (ConvertLayout's propagation can produce one) unpacked to
NCHW, computed with TOPI's NCHW conv and packed again (correct, not fast). A 3×3 stride-1 conv that
:func:`bnfold.targets.tvm.winograd.winograd_tile` accepts is computed with Winograd instead: its weights'
transform emitted as its own binding (lifted to load time with the other weight-only work), the conv as one
kernel (:func:`bnfold.targets.tvm.winograd.winograd_conv2d_nchwc`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tvm
from tvm import relax, te, topi

from bnfold.targets.tvm.channel_norm import fuse_channel_norms
from bnfold.targets.tvm.grouped import grouped_layouts, legalize_grouped
from bnfold.targets.tvm.winograd import is_static, winograd_conv2d_nchwc, winograd_tile, winograd_weight_transform

__all__ = ["blocked_conv_passes", "channel_block", "conv_layouts", "legalize_conv2d"]


def channel_block(channels: int, lanes: int) -> int:
    """The channel block of a tensor with ``channels`` channels (1: not blocked), see the module docstring."""
    b = lanes
    while b >= 4:
        if channels % b == 0:
            return b
        b //= 2
    return channels if channels < 4 else 1


def _dtype(dtype: object) -> str | None:
    """A dtype attribute as a string, None when unset (Relax leaves a conv's ``out_dtype`` empty or void)."""
    text = "" if dtype is None else str(dtype)
    return None if text in ("", "void", "None") else text


def _blocked(layout: str, block: int) -> str:
    return layout if block == 1 else f"{layout}{block}c"


def conv_layouts(call: relax.Call, lanes: int) -> list[str]:
    """``[data, weight, output]`` layouts for one ``conv2d`` call. A conv that is not NCHW/OIHW, or whose channel
    count is symbolic, keeps its own layouts (asked for explicitly: with no wish, ``ConvertLayout`` would hand it
    its producer's blocked layout)."""
    a = call.attrs
    own = [str(a.data_layout), str(a.kernel_layout), str(a.out_layout)]
    try:
        c_in = int(call.args[0].ty.shape[1])
        c_out = int(call.args[1].ty.shape[0])
    except (TypeError, ValueError, AttributeError):  # a symbolic channel count
        return own
    if own != ["NCHW", "OIHW", "NCHW"]:
        return own
    groups = int(a.groups)
    bi, bo = channel_block(c_in, lanes), channel_block(c_out, lanes)
    if groups == 1 and bi > 1 and bo % 4 == 0:
        return [_blocked("NCHW", bi), f"OIHW{bi}i{bo}o", _blocked("NCHW", bo)]
    if groups == c_in == c_out and bo % 4 == 0:
        return [_blocked("NCHW", bo), f"OIHW1i{bo}o", _blocked("NCHW", bo)]
    return grouped_layouts(c_in, c_out, groups, bi, bo) or own


def _layout_callback(lanes: int) -> Callable[[relax.Call], dict[str, list[str]]]:
    def callback(call: relax.Call) -> dict[str, list[str]]:
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d":
            return {"relax.nn.conv2d": conv_layouts(call, lanes)}
        return {}

    return callback


def depthwise_conv2d_nchwc(data: te.Tensor, kernel: te.Tensor, strides: Sequence[int], padding: Sequence[int],
                           dilation: Sequence[int], out_dtype: str) -> te.Tensor:
    """``out[n, C, y, x, c] = Σ_{i,j} pad(data)[n, C, y·s_h + i·d_h, x·s_w + j·d_w, c] · w[C, 0, i, j, 0, c]``."""
    n, chunks, h, w, block = data.shape
    _, _, kh, kw, _, _ = kernel.shape
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilation)
    pt, pl, pb, pr = (int(p) for p in padding)
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    padded = topi.nn.pad(data, [0, 0, pt, pl, 0], [0, 0, pb, pr, 0], name="data_pad") if pt or pl or pb or pr \
        else data
    i = te.reduce_axis((0, kh), name="kh")
    j = te.reduce_axis((0, kw), name="kw")
    return te.compute(
        (n, chunks, oh, ow, block),
        lambda b, co, y, x, c: te.sum(
            padded[b, co, y * sh + i * dh, x * sw + j * dw, c].astype(out_dtype)
            * kernel[co, 0, i, j, 0, c].astype(out_dtype), axis=[i, j]),
        name="depthwise_conv2d_NCHWc", tag="depthwise_conv2d_NCHWc")


def _winograd(call: relax.Call) -> int | None:
    """The Winograd tile of a blocked conv (None: direct), see :func:`bnfold.targets.tvm.winograd.winograd_tile`."""
    a = call.attrs
    data, out = call.args[0], call
    if str(a.data_layout) == "NCHW" or not is_static(data, call.args[1], out):
        return None
    kshape = [int(d) for d in call.args[1].ty.shape]
    dshape = [int(d) for d in data.ty.shape]
    oshape = [int(d) for d in out.ty.shape]
    if len(dshape) != 5 or len(kshape) != 6 or len(oshape) != 5:
        return None
    return winograd_tile((kshape[2], kshape[3]), tuple(int(s) for s in a.strides),  # type: ignore[arg-type]
                         tuple(int(d) for d in a.dilation), int(a.groups),  # type: ignore[arg-type]
                         (dshape[1] * dshape[4], oshape[1] * oshape[4]), (oshape[2], oshape[3]))


def legalize_conv2d(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """``relax.nn.conv2d`` → TIR, including the blocked layouts the stock legalization refuses."""
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d

    a = call.attrs
    data_layout, kernel_layout, out_layout = str(a.data_layout), str(a.kernel_layout), str(a.out_layout)
    if len(data_layout) == 4 and len(kernel_layout) == 4:
        return _nn_conv2d(bb, call)
    out_dtype = _dtype(a.out_dtype) or _dtype(call.args[0].ty.dtype)
    m = _winograd(call)
    if m is not None:
        u = bb.emit_te(winograd_weight_transform, call.args[1], m, primfunc_name_hint="winograd_weight")
        return bb.call_te(winograd_conv2d_nchwc, call.args[0], u, a.padding, m, out_dtype,
                          primfunc_name_hint="conv2d_NCHWc_winograd")
    if int(a.groups) == 1:
        return bb.call_te(topi.nn.conv2d_NCHWc, call.args[0], call.args[1], a.strides, a.padding, a.dilation,
                          data_layout, out_layout, out_dtype, primfunc_name_hint="conv2d_NCHWc")
    if kernel_layout.startswith("OIHW1i") and data_layout == out_layout:
        return bb.call_te(depthwise_conv2d_nchwc, call.args[0], call.args[1], a.strides, a.padding,
                          a.dilation, out_dtype, primfunc_name_hint="depthwise_conv2d_NCHWc")
    grouped = legalize_grouped(bb, call, out_dtype)
    if grouped is not None:
        return grouped

    def unpacked(data: te.Tensor, kernel: te.Tensor) -> te.Tensor:
        d = topi.layout_transform(data, data_layout, "NCHW")
        k = topi.layout_transform(kernel, kernel_layout, "OIHW")
        y = topi.nn.conv(d, k, a.strides, a.padding, a.dilation, int(a.groups), "NCHW", "OIHW", out_dtype)
        return topi.layout_transform(y, "NCHW", out_layout)

    return bb.call_te(unpacked, call.args[0], call.args[1], primfunc_name_hint="group_conv2d_blocked")


@tvm.transform.module_pass(opt_level=0, name="ClipToMinMax")
def clip_to_min_max(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """``clip(x, lo, hi)`` → ``minimum(maximum(x, lo), hi)``: the same values, and ops ``ConvertLayout`` carries
    in a blocked layout (it has no layout rule for ``clip``, so a ReLU6 would be sent back to NCHW and forth)."""
    from tvm.relax.dpl import is_op, wildcard

    x, lo, hi = wildcard(), wildcard(), wildcard()
    pattern = is_op("relax.clip")(x, lo, hi)

    def rewrite(call: relax.Call, match: dict) -> relax.Expr:
        dtype = _dtype(getattr(call.ty, "dtype", None))
        bounds = [match[b] for b in (lo, hi)]
        if dtype is None or not all(isinstance(b, (tvm.tirx.FloatImm, tvm.tirx.IntImm)) for b in bounds):
            return call
        low, high = (relax.const(float(b.value), dtype) for b in bounds)
        return relax.op.minimum(relax.op.maximum(match[x], low), high)

    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = relax.dpl.rewrite_call(pattern, rewrite, func)
    return mod


def blocked_conv_passes(lanes: int, legalize: dict[str, Callable] | None = None) -> list[tvm.transform.Pass]:
    """Convert 2-D convolutions to blocked layouts (:func:`conv_layouts`) and legalize them (before the zero
    pipeline); ``legalize``: more ``LegalizeOps`` overrides for the other ops."""
    return [clip_to_min_max,
            relax.transform.ConvertLayout({}, _layout_callback(lanes)),
            # one tensor feeding two blocked convs (a residual block's input) is transformed once, not twice
            relax.transform.EliminateCommonSubexpr(),
            # LayerNorm over the channels (ConvNeXt's LayerNorm2d): one blocked kernel, not five
            fuse_channel_norms,
            relax.transform.LegalizeOps({**(legalize or {}), "relax.nn.conv2d": legalize_conv2d})]
