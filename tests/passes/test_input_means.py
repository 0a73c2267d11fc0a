"""Data-free expected values through a folded graph: the normal model of BN outputs, clamps composed exactly,
sums, and the places where BatchNorm statistics say nothing (each with its reason)."""

from __future__ import annotations

import math

import torch
from torch import nn

from bnfold.api import fold
from bnfold.ir.moments import clipped_mean, moments_of
from bnfold.ir.reasons import Fail
from bnfold.passes import PassContext
from bnfold.passes.input_means import Expectation, expected_values

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def graph(model: nn.Module) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2)
                m.bias.normal_()
                m.weight.uniform_(0.5, 2)
    return fold(model, (X,), capture="symbolic", check=False).module


def by_target(gm: torch.fx.GraphModule, values: dict, target: str) -> Expectation | Fail:
    return values[next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == target)]


def test_relu6_of_a_bn_output_is_the_clipped_normal_mean() -> None:
    gm = graph(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU6(), nn.Conv2d(4, 2, 1)))
    values = expected_values(PassContext(gm))
    m = moments_of(next(n for n in gm.graph.nodes if n.target == "0"))
    got = by_target(gm, values, "2")
    assert isinstance(got, Expectation) and got.axis == 1
    torch.testing.assert_close(got.mean, clipped_mean(m.mean, m.std, 0.0, 6.0), rtol=1e-15, atol=0)


def test_unknowns_have_reasons() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn, self.b = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn(self.a(x)))
            gate = torch.sigmoid(y.mean((2, 3), keepdim=True))
            return self.b(nn.functional.max_pool2d(y, 3, 1, 1)) + self.b(y * gate)

    gm = graph(Net())
    values = expected_values(PassContext(gm))
    first = by_target(gm, values, "a")
    assert isinstance(first, Expectation)
    text = " | ".join(v.reason for v in values.values() if isinstance(v, Fail))
    assert "model's input" in text and "max-pool" in text and "gate" in text


def test_sum_of_two_paths_adds_means() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.bn_a(self.a(x))) + self.bn_b(self.b(x))

    gm = graph(Two())
    values = expected_values(PassContext(gm))
    add = next(n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target))
    ma = moments_of(next(n for n in gm.graph.nodes if n.target == "a"))
    mb = moments_of(next(n for n in gm.graph.nodes if n.target == "b"))
    got = values[add]
    assert isinstance(got, Expectation)
    torch.testing.assert_close(got.mean, clipped_mean(ma.mean, ma.std, 0.0, math.inf) + mb.mean)
