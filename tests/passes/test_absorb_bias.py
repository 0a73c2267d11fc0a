"""Rule ``absorb_bias``: b1 − c, b2 + W2·c across the ops between two layers; c = the channel means across
identity-like ops (exact), c = max(0, mean − 3·std) across a ReLU (exact where the pre-activation ≥ c)."""

from __future__ import annotations

import copy

import torch
from harness import apply, reasons
from torch import nn

from bnfold.api import fold
from bnfold.ir.linear_ops import LinearOp, match_linear_op
from bnfold.ir.moments import Moments, moments_of, set_moments
from bnfold.parity import compare
from bnfold.passes import AbsorbBias, Category

f64 = torch.float64
X = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def folded(*layers: nn.Module) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(2.0, 4.0)  # BN outputs mostly positive: a ReLU passes them
    return fold(model, (X,), capture="symbolic", check=False).module


def convs(gm: torch.fx.GraphModule) -> list[LinearOp]:
    return [op for n in gm.graph.nodes if isinstance(op := match_linear_op(gm, n), LinearOp)]


def test_identity_pair_absorbs_the_means_exactly() -> None:
    gm = folded(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.Conv2d(5, 4, 1))
    before = copy.deepcopy(gm)
    mean = moments_of(convs(gm)[0].node).mean
    (result,) = apply(gm, AbsorbBias(), example_inputs=(X,))
    assert [c.category for c in result.changes] == [Category.ABSORB]
    assert "exact (c = the channel means)" in result.changes[0].detail
    assert torch.allclose(moments_of(convs(gm)[0].node).mean, torch.zeros_like(mean), atol=1e-6)
    assert compare(before, gm, X, batch_independence=False).passed  # exact: the float64 rule holds


def test_relu_pair_absorbs_mean_minus_three_std() -> None:
    gm = folded(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 4, 1))
    first = convs(gm)[0]
    m = moments_of(first.node)
    c = (m.mean - 3 * m.std).clamp_min(0)
    assert bool((c > 0).any())
    b1 = first.bias.detach().double().clone()
    (result,) = apply(gm, AbsorbBias())
    assert len(result.changes) == 1
    torch.testing.assert_close(convs(gm)[0].bias.double(), b1 - c, rtol=0, atol=1e-6)


def test_relu_pair_is_exact_where_the_pre_activation_is_above_c() -> None:
    """relu(y) − c = relu(y − c) for y ≥ c: with c set below every value the data gives, nothing changes."""
    gm = folded(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 4, 1))
    first = convs(gm)[0].node
    before = copy.deepcopy(gm)
    with torch.no_grad():
        y = gm.get_submodule(str(first.target))(X)
    low = y.transpose(0, 1).reshape(5, -1).amin(1).double() - 0.01  # every value is above it
    set_moments(first, Moments(low.clamp_min(0) + 3.0, torch.ones(5, dtype=f64)))  # c = max(0, low)
    apply(gm, AbsorbBias())
    assert compare(before, gm, X, batch_independence=False).passed


def test_relu6_becomes_a_clamp_with_shifted_bound() -> None:
    gm = folded(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5), nn.ReLU6(), nn.Conv2d(5, 4, 1))
    apply(gm, AbsorbBias())
    mins = [n for n in gm.graph.nodes if n.op == "call_function" and "minimum" in str(n.target)]
    assert len(mins) == 1


def test_negative_zero_padding_blocks_the_shift() -> None:
    gm = folded(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 4, 3, padding=1))
    (result,) = apply(gm, AbsorbBias())
    assert result.changes == []
    assert "zero padding blocks the shift" in reasons(result)[0]


def test_negative_without_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 5, 1), nn.ReLU(), nn.Conv2d(5, 4, 1)).eval()
    gm = fold(model, (X,), capture="symbolic", check=False).module
    (result,) = apply(gm, AbsorbBias())
    assert result.changes == [] and "no statistics" in reasons(result)[0]


def test_negative_non_homogeneous_activation() -> None:
    gm = folded(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5), nn.SiLU(), nn.Conv2d(5, 4, 1))
    (result,) = apply(gm, AbsorbBias())
    assert result.changes == [] and "not positively homogeneous" in reasons(result)[0]
