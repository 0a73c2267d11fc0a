"""Rule ``correct_bias``: b' = b − E[ΔW x] for the int8 weight error ΔW, data-free (BN statistics) or measured."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import apply, reasons
from torch import nn

from bnfold.api import fold
from bnfold.ir.linear_ops import LinearOp, match_linear_op
from bnfold.ir.moments import clipped_mean, moments_of
from bnfold.ir.quant_math import fake_quantize_weight
from bnfold.passes import Category, CorrectBias, PassContext, Pipeline
from bnfold.quantize.prepare import measure_shifts

f64 = torch.float64
X = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def folded(*layers: nn.Module) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.bias.normal_()
    return fold(model, (X,), capture="symbolic", check=False).module


def convs(gm: torch.fx.GraphModule) -> list[LinearOp]:
    return [op for n in gm.graph.nodes if isinstance(op := match_linear_op(gm, n), LinearOp)]


@pytest.mark.parametrize("per_channel", [False, True])
def test_data_free_correction_uses_the_clipped_normal_mean(per_channel: bool) -> None:
    gm = folded(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 4, 1))
    first, second = convs(gm)
    m = moments_of(first.node)
    mean_in = clipped_mean(m.mean, m.std, 0.0, float("inf"))
    dw = fake_quantize_weight(second.weight, per_channel=per_channel).double() - second.weight.double()
    expected = second.bias.double() - dw.flatten(1) @ mean_in
    (result,) = apply(gm, CorrectBias(per_channel=per_channel))
    assert [c.category for c in result.changes] == [Category.CORRECT]
    torch.testing.assert_close(convs(gm)[1].bias.double(), expected, rtol=0, atol=1e-6)
    assert "model's input" in reasons(result)[0]  # the first conv: no statistics describe the input


def test_measured_correction_makes_the_weight_error_zero_mean() -> None:
    """One conv on data: with b' = b − E[ΔW x] measured, the int8-weight layer's output error averages to zero per
    channel over that data (before: the mean shift ΔW E[x])."""
    conv = nn.Conv2d(3, 6, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.logspace(-2, 1, 6).reshape(6, 1, 1, 1))
    data = X + 2.0  # non-zero input mean: the shift is visible
    gm = fold(nn.Sequential(conv).eval(), (data,), capture="symbolic", check=False).module
    shifts = measure_shifts(gm, [(data,)], per_channel=False)
    apply(gm, CorrectBias(per_channel=False, shifts=shifts))
    op = convs(gm)[0]
    w_hat = fake_quantize_weight(op.weight, per_channel=False)
    with torch.no_grad():
        y_float = conv(data).double()
        y_int8w = F.conv2d(data, w_hat, op.bias, padding=1).double()
        plain = F.conv2d(data, w_hat, conv.bias, padding=1).double()
    err = (y_int8w - y_float).mean((0, 2, 3))
    before = (plain - y_float).mean((0, 2, 3))
    assert float(err.abs().max()) < 1e-5 * float(y_float.abs().mean())
    assert float(before.abs().max()) > 100 * float(err.abs().max())


def test_applied_once_at_a_fixed_point() -> None:
    gm = folded(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 4, 1))
    run = Pipeline([CorrectBias(per_channel=False)], max_rounds=5).run(gm, PassContext(gm))
    assert len(run.changes) == 1 and run.converged


def test_negative_after_a_max_pool_data_free() -> None:
    gm = folded(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(5, 4, 1))
    (result,) = apply(gm, CorrectBias())
    assert result.changes == [] and any("max-pool" in r for r in reasons(result))
