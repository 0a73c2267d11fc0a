"""The arithmetic of quantization-ready folding, as pure functions on tensors (no graphs).

**Per-channel weight ranges.** For a conv/linear weight ``W`` (output channels on dim 0; a conv with ``groups`` g has
``W`` of shape ``(O, I/g, k…)``)::

    r_out[o] = max |W[o, …]|                                      (output channel o)
    r_in[c]  = max_{o in group g(c)} max |W[o, c mod I_g, …]|      (input channel c, group g(c) = c // I_g)

A depthwise conv (``groups = C``) reads input channel ``c`` only in its own filter: ``r_in[c] = r_out[c]``.

**Cross-layer equalization** (Nagel et al., ICCV 2019, eq. 5-7). Two layers ``y = W2 · f(W1 x + b1) + b2`` with ``f``
positively homogeneous (``f(x/s) = f(x)/s`` for ``s > 0``: ReLU, LeakyReLU, identity, a clamp whose bounds are scaled
too) compute the same function after ``W1[i] ← W1[i]/s_i``, ``b1[i] ← b1[i]/s_i``, ``W2[:, i] ← W2[:, i]·s_i``. With::

    s_i = √(r1_i · r2_i) / r2_i        (r1 = r_out of layer 1, r2 = r_in of layer 2)

both ranges become ``√(r1_i · r2_i)``: channel i has the same range in both layers, which maximizes the product of the
layers' per-channel precisions under one per-tensor scale each. A channel with ``r1_i · r2_i = 0`` (dead or unread)
keeps ``s_i = 1``.

**Weight quantization as ONNX Runtime does it** (``onnxruntime.quantization.quant_utils``: ``compute_scale_zp``
with ``symmetric=True``, ``quantize_nparray``; int8 weights, ``WeightSymmetric`` — the default for int8): per output
channel (``per_channel``) or per tensor, ``m = max |W|``, ``scale = fp32(2m / 254)`` (computed in float64, stored in
float32; ``scale = 1`` when it would be below fp32's smallest normal), ``q = clip(round_half_even(fp32(W) / scale),
−128, 127)``, zero point 0. ``Ŵ = q · scale`` is what the int8 model computes with; ``ΔW = Ŵ − W`` its error.

**Bias correction** (Nagel et al., §4.2). With quantized weights a layer computes ``Ŵ x + b = W x + b + ΔW x``; its
output is shifted on average by ``E[ΔW x] = ΔW E[x]`` (linearity of expectation; for a conv, per output channel
``Σ_{c,k} ΔW[o, c, k] E[x_c]``, exact away from zero-padded borders). Subtracting it from the bias makes the int8
layer's error zero-mean. ``E[x]`` comes from the BatchNorm statistics that preceded the fold (:mod:`bnfold.ir.moments`)
or from calibration data.
"""

from __future__ import annotations

import torch

from bnfold.ir.affine_math import OpKind

__all__ = [
    "equalization_scales",
    "fake_quantize_weight",
    "input_ranges",
    "output_ranges",
    "range_spread",
    "weight_scales",
]

f64 = torch.float64

_FP32_TINY = torch.finfo(torch.float32).tiny
_QMIN, _QMAX = -128, 127  # int8 (clipping range of quantize_nparray)
_SYMMETRIC_STEPS = 254.0  # symmetric int8: [-127, 127]


def output_ranges(weight: torch.Tensor, kind: OpKind) -> torch.Tensor:
    """``r_out[o] = max |W[o, …]|`` in float64 (conv and linear: output channels on dim 0)."""
    if kind == "conv_transpose":
        raise ValueError("output ranges of a conv-transpose weight (in, out/groups, k…) are not supported")
    return weight.detach().to(f64).abs().flatten(1).amax(1) if weight.dim() > 1 else weight.detach().to(f64).abs()


def input_ranges(weight: torch.Tensor, kind: OpKind, groups: int = 1) -> torch.Tensor:
    """``r_in[c]``: the largest ``|W|`` that reads input channel ``c`` (module docstring), float64."""
    w = weight.detach().to(f64).abs()
    if kind == "linear":
        return w.amax(0)
    if kind != "conv":
        raise ValueError(f"input ranges of a {kind} weight are not supported")
    out_ch, in_g = w.shape[0], w.shape[1]
    per = w.flatten(2).amax(2) if w.dim() > 2 else w  # (O, I/g)
    per = per.reshape(groups, out_ch // groups, in_g).amax(1)  # (g, I/g): max over each group's outputs
    return per.reshape(-1)


def equalization_scales(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """``s_i = √(r1_i r2_i) / r2_i`` (float64); ``1`` where ``r1_i r2_i`` is zero or not finite."""
    r1, r2 = r1.to(f64), r2.to(f64)
    prod = r1 * r2
    ok = (prod > 0) & torch.isfinite(prod)
    s = torch.ones_like(r1)
    s[ok] = torch.sqrt(prod[ok]) / r2[ok]
    return s


def range_spread(r: torch.Tensor) -> float:
    """``max r / min r`` over the non-zero entries (1 for fewer than one; ``inf`` never: zeros are left out)."""
    nz = r[r > 0]
    if nz.numel() == 0:
        return 1.0
    return float(nz.max() / nz.min())


def weight_scales(weight: torch.Tensor, *, per_channel: bool) -> torch.Tensor:
    """ONNX Runtime's symmetric int8 weight scales (float32): one per output channel (dim 0) or one per tensor."""
    w = weight.detach().to(torch.float32)
    absmax = w.abs().flatten(1).amax(1) if per_channel and w.dim() > 1 else w.abs().max().reshape(1)
    scale = (2.0 * absmax.to(f64) / _SYMMETRIC_STEPS).to(torch.float32)
    return torch.where(scale.to(f64) < _FP32_TINY, torch.ones_like(scale), scale)


def fake_quantize_weight(weight: torch.Tensor, *, per_channel: bool) -> torch.Tensor:
    """``Ŵ = q · scale``: the weight ONNX Runtime's static quantization gives an int8 model (module docstring), float32,
    bit for bit what its ``DequantizeLinear`` computes."""
    w = weight.detach().to(torch.float32)
    scale = weight_scales(w, per_channel=per_channel)
    view = scale.reshape(-1, *([1] * (w.dim() - 1))) if scale.numel() > 1 else scale.reshape(())
    q = torch.round(w / view).clamp_(_QMIN, _QMAX)
    return q * view
