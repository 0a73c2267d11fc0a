"""Pure quantization math: per-channel ranges, equalization scales, ONNX Runtime's int8 weight quantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnfold.ir.quant_math import (
    equalization_scales,
    fake_quantize_weight,
    input_ranges,
    output_ranges,
    range_spread,
    weight_scales,
)

f64 = torch.float64


def test_ranges_of_a_grouped_conv() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 2, 3, 3, generator=g)  # groups=2: 4 input channels, 3 outputs per group
    r_out = output_ranges(w, "conv")
    assert torch.equal(r_out, w.double().abs().flatten(1).amax(1))
    r_in = input_ranges(w, "conv", groups=2)
    expected = [float(w[3 * (c // 2):3 * (c // 2) + 3, c % 2].abs().max()) for c in range(4)]
    assert r_in.tolist() == pytest.approx(expected, rel=0, abs=0)


def test_depthwise_input_range_is_its_own_filter() -> None:
    w = torch.randn(5, 1, 3, 3)
    assert torch.equal(input_ranges(w, "conv", groups=5), output_ranges(w, "conv"))


def test_linear_input_ranges_are_column_maxima() -> None:
    w = torch.randn(4, 7)
    assert torch.equal(input_ranges(w, "linear"), w.double().abs().amax(0))


def test_equalization_makes_both_ranges_the_geometric_mean() -> None:
    r1 = torch.tensor([4.0, 0.01, 9.0, 0.0], dtype=f64)
    r2 = torch.tensor([1.0, 100.0, 1.0, 3.0], dtype=f64)
    s = equalization_scales(r1, r2)
    balanced = (r1 * r2).sqrt()
    torch.testing.assert_close((r1 / s)[:3], balanced[:3], rtol=1e-15, atol=0)
    torch.testing.assert_close((r2 * s)[:3], balanced[:3], rtol=1e-15, atol=0)
    assert s[3] == 1  # a dead channel keeps its scale


def test_spread_ignores_dead_channels() -> None:
    assert range_spread(torch.tensor([0.0, 2.0, 8.0])) == 4.0
    assert range_spread(torch.zeros(3)) == 1.0


@pytest.mark.parametrize("per_channel", [True, False])
def test_fake_quantization_is_onnxruntimes_bit_for_bit(per_channel: bool) -> None:
    """The weights bias correction assumes are those ORT's quantizer computes (its own numpy code, not a copy)."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 3, 3, 3, generator=g) * torch.logspace(-3, 1, 8).reshape(8, 1, 1, 1)
    w[2] = 0.0  # an all-zero channel: ORT uses scale 1
    mine = fake_quantize_weight(w, per_channel=per_channel)
    rows = [w[i].numpy() for i in range(8)] if per_channel else [w.numpy()]
    theirs = []
    for row in rows:
        zero, scale, q = quantize_data(row.reshape(-1), TensorProto.INT8, True)
        theirs.append(((q.astype(np.int32) - zero) * scale).astype(np.float32).reshape(row.shape))
    expected = np.stack(theirs) if per_channel else theirs[0]
    assert np.array_equal(mine.numpy(), expected)
    assert weight_scales(w, per_channel=per_channel).dtype == torch.float32
