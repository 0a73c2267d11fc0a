"""Pass ``constant_fold``: constant sub-graphs are evaluated once in float64 and replaced by one constant."""

from __future__ import annotations

import torch
from harness import ops, run_passes
from torch import nn

from bnfold.passes import Category, ConstantFold


class ScaleFromParams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.rand(4) + 0.5)
        self.rv = nn.Parameter(torch.rand(4) + 0.5, requires_grad=False)  # a parameter: traced, not pre-evaluated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.w * (self.rv + 1e-5).rsqrt()).reshape(1, -1, 1, 1)


def test_constant_expression_becomes_one_constant() -> None:
    model = ScaleFromParams().eval()
    gm, (result,) = run_passes(model, (torch.randn(2, 4, 3, 3),), "symbolic", ConstantFold())
    assert ops(gm) == ["mul"]
    assert result.changes[0].category is Category.CANONICALIZE
    (const,) = [n for n in gm.graph.nodes if n.op == "get_attr"]
    exact = (model.w.double() * (model.rv.double() + 1e-5).rsqrt()).float().reshape(1, -1, 1, 1)
    assert torch.equal(getattr(gm, str(const.target)), exact)  # float64, cast once


def test_negative_expression_of_the_input_is_left() -> None:
    gm, (result,) = run_passes(nn.Sequential(nn.ReLU()), (torch.randn(2, 3),), "symbolic", ConstantFold())
    assert ops(gm) == ["relu"] and not result.modified
