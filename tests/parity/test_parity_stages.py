"""Stage tracking (bnfold.parity.stages): every stage against the previous one and the original (issue 5)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import bnfold
from bnfold.parity import Tolerance
from bnfold.parity.stages import StageTracker, track_stages

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6))
    _stats(net, seed)
    return net.eval()


def _stats(net: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(8, generator=g))
                m.running_var.copy_(torch.rand(8, generator=g) + 0.2)
                m.weight.copy_(torch.randn(8, generator=g))
                m.bias.copy_(torch.randn(8, generator=g))


def _batches() -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(4, 3, 12, 12, generator=g),), (torch.randn(3, 3, 12, 12, generator=g),)]


def test_original_folded_onnx_all_pass(tmp_path: Path) -> None:
    from bnfold.targets.onnx import OnnxRuntimeModel, export_onnx

    net, batches = _net(), _batches()
    folded = bnfold.fold(net, batches[0], check=False).module
    runtime = OnnxRuntimeModel(export_onnx(folded, batches[0], tmp_path / "m.onnx").path)
    report = track_stages({"original": net, "folded": folded, "onnx": runtime}, batches)
    assert report.passed and report.first_divergence is None, report
    onnx_stage = report.stages[2]
    assert onnx_stage.previous == "folded" and onnx_stage.baseline == "original"
    assert onnx_stage.vs_previous is not None and onnx_stage.vs_previous.passed
    assert onnx_stage.vs_baseline is not None and onnx_stage.vs_baseline.passed
    assert onnx_stage.batch_independence is not None and onnx_stage.batch_independence.passed
    record = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert [s["name"] for s in record["stages"]] == ["original", "folded", "onnx"]
    text = report.render()
    assert text.startswith("stages PASS") and "onnx" in text and "folded" in text


def test_divergence_starts_at_the_broken_stage_and_names_the_node() -> None:
    net, batches = _net(), _batches()
    folded = bnfold.fold(net, batches[0], check=False).module
    broken = copy.deepcopy(folded)
    with torch.no_grad():
        w = broken.get_submodule("3").weight
        w[2] += 0.3 * torch.randn(w[2].shape, generator=torch.Generator().manual_seed(0))
    tracker = StageTracker(batches)
    tracker.add("original", net)
    tracker.add("folded", folded)
    tracker.add("compiled", broken)
    tracker.add("after", copy.deepcopy(broken))
    report = tracker.report()
    div = report.first_divergence
    assert div is not None and (div.stage, div.against, div.kind) == ("compiled", "folded", "previous")
    assert div.node == "_3"  # the corrupted conv (Sequential index 3), localized against the folded stage
    assert report.stages[3].vs_previous is not None and report.stages[3].vs_previous.passed  # no new change
    assert not report.stages[3].passed  # but still out of bounds against the original
    assert "divergence starts at stage 'compiled'" in report.render()


def test_recalibration_is_an_expected_change_and_becomes_the_baseline() -> None:
    net, batches = _net(), _batches()
    recalibrated = copy.deepcopy(net)
    _stats(recalibrated, seed=7)  # new statistics, as recalibration would measure
    folded_recal = bnfold.fold(recalibrated, batches[0], check=False).module
    stale = bnfold.fold(net, batches[0], check=False).module  # folded from the *old* statistics
    report = track_stages([("original", net), ("recalibrated", recalibrated), ("folded", folded_recal)],
                          batches, expected_change={"recalibrated"})
    assert report.passed, report
    recal, fold = report.stages[1], report.stages[2]
    assert recal.vs_previous is not None and not recal.vs_previous.passed  # it did change the model…
    assert recal.passed  # …on purpose
    assert fold.baseline == "recalibrated" and fold.vs_previous is not None and fold.vs_previous.passed
    assert fold.vs_original is not None and not fold.vs_original.passed  # informational
    report = track_stages([("original", net), ("recalibrated", recalibrated), ("folded", stale)],
                          batches, expected_change={"recalibrated"})
    div = report.first_divergence
    assert div is not None and div.stage == "folded" and div.against == "recalibrated"


def test_a_stage_that_does_not_run_is_the_divergence() -> None:
    net, batches = _net(), _batches()

    def crashes(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("kernel not found")

    report = track_stages({"original": net, "tvm": crashes, "folded": net}, batches)
    div = report.first_divergence
    assert div is not None and (div.stage, div.kind) == ("tvm", "error") and "kernel not found" in div.reason
    assert report.stages[2].previous == "original"  # the stage after compares with the last one that ran


def test_drift_each_step_in_bounds_but_not_against_the_original() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(16, 64)
    with torch.no_grad():
        t = lin.double()(x.double())
        lin.float()
        eps = float((lin(x).double() - t).pow(2).mean().sqrt())
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(t.shape, generator=g, dtype=torch.float64)
    noise /= noise.pow(2).mean().sqrt()

    def step(k: float):
        return lambda inp: t + k * eps * noise  # rmse vs float64 = k·ε

    tol = Tolerance(multiplier=2.0, floor=0.0)
    report = track_stages({"original": lin, "a": step(1.5), "b": step(2.5)}, (x,), tolerance=tol)
    b = report.stages[2]
    assert b.vs_previous is not None and b.vs_previous.passed  # 2.5ε ≤ 2 × 1.5ε
    assert b.vs_baseline is not None and not b.vs_baseline.passed  # 2.5ε > 2 × ε
    div = report.first_divergence
    assert div is not None and (div.stage, div.kind, div.against) == ("b", "baseline", "original")


def test_random_inputs_are_reported() -> None:
    net = _net()
    report = track_stages({"original": net, "same": copy.deepcopy(net)}, None, example_inputs=_batches()[0])
    assert report.inputs == "random" and report.passed and "RANDOM" in report.render()
    with pytest.raises(ValueError, match="already added"):
        tracker = StageTracker(_batches())
        tracker.add("x", net)
        tracker.add("x", net)
