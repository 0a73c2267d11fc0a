"""Rule ``equalize`` (cross-layer equalization): W1[i]/s_i, b1[i]/s_i, W2[:, i]·s_i, s_i = √(r1_i r2_i)/r2_i, across
positively homogeneous ops; and its negative twins (a non-homogeneous activation, a residual, a shared tensor, a
weight used twice), each left with its reason."""

from __future__ import annotations

import copy

import pytest
import torch
from harness import apply, ops, reasons
from torch import nn

from bnfold.capture import capture
from bnfold.ir.linear_ops import LinearOp, match_linear_op
from bnfold.ir.quant_math import input_ranges, output_ranges
from bnfold.parity import compare
from bnfold.passes import Category, DropDeadState, Equalize, PassContext, Pipeline

f64 = torch.float64


def spread_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every conv/linear output channel a scale spread over four orders of magnitude (as folding BN with
    spread statistics does), and non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                k = 10.0 ** ((torch.rand(m.weight.shape[0], generator=g) * 4) - 2)
                m.weight.mul_(k.reshape(-1, *([1] * (m.weight.dim() - 1))))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * k)
    return model.eval()


def layers(gm: torch.fx.GraphModule) -> list[LinearOp]:
    return [op for n in gm.graph.nodes if isinstance(op := match_linear_op(gm, n), LinearOp)]


def pair_ranges(gm: torch.fx.GraphModule, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ops_ = layers(gm)
    p, c = ops_[first], ops_[first + 1]
    return output_ranges(p.weight, p.kind), input_ranges(c.weight, c.kind, c.groups)


def run_passes(model: nn.Module, inputs: tuple[torch.Tensor, ...], mode: str, *passes):
    """Capture, apply ``passes`` once each (bookkeeping verified), and require parity with ``model`` by the float64
    rule (weights spread over four orders of magnitude: a fixed elementwise tolerance would depend on the kernels)."""
    gm = capture(model, inputs, mode).module
    results = apply(gm, *passes, example_inputs=inputs)
    parity = compare(model, gm, inputs, batch_independence=False)
    assert parity.passed, parity
    return gm, results


def to_fixed_point(gm: torch.fx.GraphModule, tolerance: float = 1e-3):
    return Pipeline([Equalize(tolerance)], finalize=[DropDeadState()], max_rounds=100).run(gm, PassContext(gm))


X = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))


def conv_relu_conv(act: nn.Module) -> nn.Module:
    return spread_weights(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), act, nn.Conv2d(6, 5, 1)))


@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.2), nn.Identity(), nn.MaxPool2d(2)],
                         ids=["relu", "leaky_relu", "identity", "max_pool"])
def test_pair_is_equalized(capture_mode: str, act: nn.Module) -> None:
    model = conv_relu_conv(act)
    gm, (result,) = run_passes(model, (X,), capture_mode, Equalize())
    assert [c.category for c in result.changes] == [Category.EQUALIZE]
    r1, r2 = pair_ranges(gm)
    torch.testing.assert_close(r1, r2, rtol=1e-6, atol=0)  # both are √(r1 r2) now (fp32 weights)
    r1_0, r2_0 = pair_ranges(capture(model, (X,), capture_mode).module)
    torch.testing.assert_close(r1, (r1_0 * r2_0).sqrt(), rtol=1e-6, atol=0)


def test_exact_in_float64() -> None:
    """In float64 the rescaled model computes the same function to float64 rounding (≈1e-16 relative)."""
    model = conv_relu_conv(nn.ReLU()).double()
    x = X.double()
    gm, _ = run_passes(model, (x,), "symbolic", Equalize())
    with torch.no_grad():
        want, got = model(x), gm(x)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-13


class Chain(nn.Module):
    """conv → ReLU6 → depthwise → ReLU6 → conv → flatten of a 1x1 map → linear (mobilenet's pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(4, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.project = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(nn.functional.relu6(self.dw(nn.functional.relu6(self.expand(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_depthwise_chain_through_relu6_to_a_fixed_point(capture_mode: str) -> None:
    model = spread_weights(Chain())
    gm = capture(model, (X,), capture_mode).module
    run = to_fixed_point(gm)
    gm.recompile()
    assert run.converged
    # the ReLU6 clamps moved with the scales: per-channel minimum(relu(x), 6/s)
    assert ops(gm).count("minimum") == 2 and "hardtanh" not in ops(gm) and "relu6" not in ops(gm)
    assert any("clamp moved with the scales" in c.detail for c in run.changes)
    for first in range(3):  # every pair balanced: expand→dw, dw→project, project→fc
        r1, r2 = pair_ranges(gm, first)
        assert float((r1 / r2).log().abs().max()) < 2e-3
    assert compare(model, gm, X, batch_independence=False).passed
    # the fixed point is one: running it again changes nothing
    assert to_fixed_point(gm).changes == []


def test_bn_moments_follow_the_scales() -> None:
    """The BatchNorm statistics folded into the first layer are divided by s with it (data-free correction)."""
    from bnfold.api import fold
    from bnfold.ir.moments import moments_of

    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 1)).eval()
    gm = fold(model, (X,), capture="symbolic", check=False).module
    conv = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "0")
    before = moments_of(conv)
    assert before is not None and torch.equal(before.mean, model[1].bias.double())
    r1, r2 = pair_ranges(gm)
    apply(gm, Equalize())
    s = (r1 * r2).sqrt() / r2
    after = moments_of(conv)
    assert after is not None
    torch.testing.assert_close(after.std, before.std / s, rtol=1e-12, atol=0)


# -- negative twins: nothing changes, and the reason says why ---------------------------------------------------

@pytest.mark.parametrize("act,why", [(nn.SiLU(), "not positively homogeneous"),
                                     (nn.GELU(), "not positively homogeneous"),
                                     (nn.Hardswish(), "not positively homogeneous")],
                         ids=["silu", "gelu", "hardswish"])
def test_negative_non_homogeneous_activation(capture_mode: str, act: nn.Module, why: str) -> None:
    model = conv_relu_conv(act)
    gm, (result,) = run_passes(model, (X,), capture_mode, Equalize())
    assert result.changes == []
    assert any(why in r for r in reasons(result))
    assert torch.equal(layers(gm)[0].weight, model[0].weight)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(y)) + y)


def unchanged(gm: torch.fx.GraphModule, model: nn.Module) -> bool:
    mine = [op.weight for op in layers(gm)]
    theirs = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return len(mine) == len(theirs) and all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))


def test_negative_residual(capture_mode: str) -> None:
    model = spread_weights(Residual())
    gm, (result,) = run_passes(model, (X,), capture_mode, Equalize())
    assert result.changes == [] and unchanged(gm, model)
    assert all("residual" in r for r in reasons(result)) and len(reasons(result)) == 2


class SharedTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(self.a(x))
        return self.b(y), self.c(y)


def test_negative_shared_tensor(capture_mode: str) -> None:
    model = spread_weights(SharedTensor())
    gm, (result,) = run_passes(model, (X,), capture_mode, Equalize())
    assert result.changes == [] and unchanged(gm, model)
    assert len(reasons(result)) == 2 and all("shared tensor" in r for r in reasons(result))


class SharedWeight(nn.Module):
    """One conv module called twice: its weight is used at two sites."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.shared = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(torch.relu(self.shared(torch.relu(self.a(x)))))


def test_negative_weight_used_twice() -> None:
    """Symbolic capture keeps the shared module (export inlines the two calls as functional ops on one weight)."""
    model = spread_weights(SharedWeight())
    gm, (result,) = run_passes(model, (X,), "symbolic", Equalize())
    assert result.changes == []
    assert reasons(result) and all("used twice" in r for r in reasons(result))
    assert torch.equal(gm.get_submodule("shared").weight, model.shared.weight)


def test_the_callers_graph_is_not_the_one_rescaled() -> None:
    """A copy equalized leaves the original graph's weights alone (what bnfold.quantize relies on)."""
    gm = capture(conv_relu_conv(nn.ReLU()), (X,), "symbolic").module
    work = copy.deepcopy(gm)
    to_fixed_point(work)
    assert not torch.equal(layers(work)[0].weight, layers(gm)[0].weight)


def test_clamps_kept_when_moving_them_is_off(capture_mode: str) -> None:
    """move_clamps=False: the pairs across a ReLU6 are left (with the reason), the others equalized; no per-channel
    clamp appears (ONNX Runtime would run it as a float op)."""
    model = spread_weights(Chain())
    gm = capture(model, (X,), capture_mode).module
    run = Pipeline([Equalize(move_clamps=False)], max_rounds=100).run(gm, PassContext(gm))
    gm.recompile()
    assert "minimum" not in ops(gm)
    assert len(run.rejections) == 2 and all("moving clamps is off" in r.reason for r in run.rejections)
    r1, r2 = pair_ranges(gm, 2)  # project → fc is still balanced
    assert float((r1 / r2).log().abs().max()) < 2e-3
