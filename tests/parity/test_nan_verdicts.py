"""NaN never yields a verdict of OK: parity (API and ``check``), drift (API and ``diagnose --check``); and the
JSON they print is strict (no bare NaN)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bnfold
from bnfold.cli import main
from bnfold.parity import compare


def _strict(text: str) -> object:
    def refuse(name: str) -> None:
        raise AssertionError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=refuse)


class Sqrt(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x)  # NaN for negative inputs


def test_compare_with_nan_outputs_fails_even_when_both_agree() -> None:
    x = torch.randn(4, 8)
    report = compare(Sqrt(), Sqrt(), [(x,)], batch_independence=False)
    assert not report.passed
    assert "NaN" in report.outputs[0].reason
    _strict(json.dumps(report.to_dict(), allow_nan=False))


def test_compare_with_zero_samples_fails() -> None:
    report = compare(nn.Identity(), nn.Identity(), [(torch.zeros(0, 3),)], batch_independence=False)
    assert not report.passed


def test_diagnose_with_nan_statistics_is_never_ok() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[1].running_mean[0] = float("nan")
    report = bnfold.diagnose(model, [torch.randn(8, 3, 4, 4)])
    assert report.verdict != "ok" and report.should_recalibrate
    assert "NaN" in report.render()
    data = _strict(report.to_json())
    assert data["verdict"] == "not finite"


def test_diagnose_api_with_nan_data_is_never_ok() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    x = torch.randn(8, 3, 4, 4)
    x[3, 0, 0, 0] = float("nan")
    report = bnfold.diagnose(model, [x])
    assert report.verdict != "ok"


def test_cli_check_with_a_model_that_outputs_nan_is_not_a_pass(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sqrt.pt2"
    torch.export.save(torch.export.export(Sqrt(), (torch.randn(4, 8),)), str(path))
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((4, 8)).astype("float32"))
    assert main(["check", str(path), str(path), "--data", str(tmp_path / "x.npz"), "--json",
                 "--no-localize", "--no-batch-check"]) == 1
    assert _strict(capsys.readouterr().out)["parity"]["passed"] is False
