"""``compare(..., run_reference="when_needed")``, the check ``bnfold.fold`` runs by default (issue 25): the float32
reference runs only when the verdict needs it, and the verdict is the float64 rule's either way."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch
from helpers import randomize_bn
from torch import nn

import bnfold
from bnfold.parity import compare

CALLS: Counter[torch.dtype] = Counter()
"""Conv2d forwards by input dtype: two per forward of the model, of its copies and of the folded module."""


@pytest.fixture(autouse=True)
def _count_convs(monkeypatch: pytest.MonkeyPatch) -> None:
    real = nn.Conv2d.forward

    def counted(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        if type(x) is torch.Tensor:  # not the fake tensors of shape propagation (a patched forward has no rule)
            CALLS[x.dtype] += 1
        return real(self, x)

    monkeypatch.setattr(nn.Conv2d, "forward", counted)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                                      nn.BatchNorm2d(4)).eval())


def _perturbed(gm: torch.fx.GraphModule, rel: float) -> torch.fx.GraphModule:
    """``gm`` with its last conv's weight scaled by ``1 + rel``: an error of about ``rel`` relative."""
    conv = [m for m in gm.modules() if isinstance(m, nn.Conv2d)][-1]
    with torch.no_grad():
        conv.weight.mul_(1 + rel)
    return gm


def test_fold_check_runs_the_folded_module_and_a_float64_copy_only() -> None:
    model, x = _model(), torch.randn(4, 3, 10, 10)
    folded = bnfold.fold(model, x, capture="symbolic", check=False).module
    CALLS.clear()
    report = compare(model, folded, (x,), batch_independence=False, run_reference="when_needed")
    assert dict(CALLS) == {torch.float32: 2, torch.float64: 2}  # the folded module, the float64 copy
    assert report.passed and report.against == "float64" and report.reference_fp64
    out = report.outputs[0]
    assert out.reference_rmse_vs_fp64 is None and out.rmse_vs_fp64 is not None and out.bound is not None
    assert out.rmse_vs_fp64 <= out.bound
    summary = report.summary()
    assert summary["against"] == "float64" and "reference_rmse_vs_fp64" not in summary
    assert "not run" in report.render()
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left as it was


def test_fold_report_says_the_metrics_are_against_float64() -> None:
    model, x = _model(), torch.randn(4, 3, 10, 10)
    CALLS.clear()
    result = bnfold.fold(model, x, capture="symbolic")
    assert dict(CALLS) == {torch.float32: 2, torch.float64: 2}  # capture runs no forward; the check two
    assert result.report.parity is not None and result.report.parity["passed"]
    assert "max abs vs float64" in result.report.render()


@pytest.mark.parametrize("rel", [1e-3, 3e-6])
def test_an_error_past_the_floor_runs_the_reference_and_judges_by_the_whole_rule(rel: float) -> None:
    """Past the floor, a copy of the reference runs, and the verdict and metrics are those of ``"always"``."""
    model, x = _model(), torch.randn(4, 3, 10, 10)
    folded = _perturbed(bnfold.fold(model, x, capture="symbolic", check=False).module, rel)
    CALLS.clear()
    lazy = compare(model, folded, (x,), batch_independence=False, run_reference="when_needed", localize=False)
    always = compare(model, folded, (x,), batch_independence=False, localize=False)
    assert lazy.passed == always.passed
    if lazy.against == "reference":  # the reference ran: one float32 forward of a copy of it
        assert CALLS[torch.float32] == 2 * 4 and lazy.summary() == always.summary()  # each: folded + reference
    else:  # within the floor after all: the rule holds whatever the reference's error
        assert lazy.passed and lazy.outputs[0].rmse_vs_fp64 <= lazy.outputs[0].bound  # type: ignore[operator]
    if rel == 1e-3:
        assert not lazy.passed and lazy.against == "reference"


def _verdicts(seed: int) -> tuple[bool, bool, float]:
    torch.manual_seed(seed)
    model = _model()
    x = torch.randn(3, 3, 10, 10)
    folded = bnfold.fold(model, x, capture="symbolic", check=False).module
    rel = [0.0, 1e-7, 1e-6, 3e-6, 1e-5, 1e-4][seed % 6]
    folded = _perturbed(folded, rel)
    lazy = compare(model, folded, (x,), batch_independence=False, run_reference="when_needed", localize=False)
    always = compare(model, folded, (x,), batch_independence=False, localize=False)
    return lazy.passed, always.passed, always.outputs[0].ratio


def test_the_verdict_is_the_rules_on_errors_around_the_bound() -> None:
    """Errors from none to 100x the bound: the lazy verdict equals the full rule's every time."""
    results = [_verdicts(seed) for seed in range(24)]
    assert all(lazy == full for lazy, full, _ in results), results
    ratios = [r for _, _, r in results]
    assert min(ratios) < 1 < max(ratios) and math.isfinite(max(ratios))  # both sides of the bound were tried


def test_when_needed_needs_a_module() -> None:
    def fn(x: Any) -> Any:
        return x

    with pytest.raises(TypeError, match=r"nn\.Module"):
        compare(fn, fn, (torch.randn(2, 3),), run_reference="when_needed")
