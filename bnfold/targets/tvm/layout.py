"""Blocked activation layout for CPU convolutions: ``NCHW[c]c`` data, ``OIHW[c]i[c]o`` weights, end to end.

``x[n, C, h, w]`` is stored as ``x'[n, C/c, h, w, c]`` (``c`` = the SIMD width in fp32 lanes: 16 with
AVX-512, 8 with AVX2), so a convolution's output channels are contiguous vectors: every store and every weight
load is one aligned vector, the input is broadcast one channel at a time. Relax's ``ConvertLayout`` rewrites
``conv2d`` to the blocked layouts and propagates them through the elementwise ops, pools and adds that follow,
inserting ``layout_transform`` only where a consumer needs plain NCHW (the stem conv on 3 channels, channel
counts ``c`` does not divide, depthwise convs, ``flatten``). The weights' transforms depend only on weights,
so ``LiftTransformParams`` runs them once at load.

Relax's stock legalization refuses sub-indexed layouts ("channel chunk cannot be legalized by TOPI"), so
:func:`legalize_conv2d` legalizes them itself: TOPI's ``conv2d_NCHWc`` compute for ordinary convs; any other
blocked conv (grouped) is unpacked to NCHW, computed with TOPI's NCHW conv and packed again (correct, not fast).
"""

from __future__ import annotations

import tvm
from tvm import relax, topi

__all__ = ["blocked_conv_passes", "legalize_conv2d"]


def legalize_conv2d(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """``relax.nn.conv2d`` → TIR, including the blocked layouts the stock legalization refuses."""
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d

    a = call.attrs
    data_layout, kernel_layout, out_layout = str(a.data_layout), str(a.kernel_layout), str(a.out_layout)
    if len(data_layout) == 4 and len(kernel_layout) == 4:
        return _nn_conv2d(bb, call)
    out_dtype = str(a.out_dtype) or str(call.args[0].struct_info.dtype)
    if int(a.groups) == 1:
        return bb.call_te(topi.nn.conv2d_NCHWc, call.args[0], call.args[1], a.strides, a.padding, a.dilation,
                          data_layout, out_layout, out_dtype, primfunc_name_hint="conv2d_NCHWc")

    def unpacked(data: tvm.te.Tensor, kernel: tvm.te.Tensor) -> tvm.te.Tensor:
        d = topi.layout_transform(data, data_layout, "NCHW")
        k = topi.layout_transform(kernel, kernel_layout, "OIHW")
        y = topi.nn.conv(d, k, a.strides, a.padding, a.dilation, int(a.groups), "NCHW", "OIHW", out_dtype)
        return topi.layout_transform(y, "NCHW", out_layout)

    return bb.call_te(unpacked, call.args[0], call.args[1], primfunc_name_hint="group_conv2d_blocked")


def blocked_conv_passes(block: int) -> list[tvm.transform.Pass]:
    """Convert 2-D convolutions to ``NCHW{block}c`` and legalize them (run before the zero pipeline)."""
    return [relax.transform.ConvertLayout({"relax.nn.conv2d": [f"NCHW{block}c", f"OIHW{block}i{block}o"]}),
            # one tensor feeding two blocked convs (a residual block's input) is transformed once, not twice
            relax.transform.EliminateCommonSubexpr(),
            relax.transform.LegalizeOps({"relax.nn.conv2d": legalize_conv2d})]
