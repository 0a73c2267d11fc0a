"""A ``.pt2`` exported with a dynamic batch stays dynamic through ``bnfold fold`` and ``bnfold optimize``
(issue 12): ``folded.pt2``, ``model.onnx`` and the TVM build each run, with parity, at batch sizes 1, 3 and 7
(the file's example batch is 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import count_batchnorm, randomize_bn
from torch import nn

from bnfold.cli import main
from bnfold.parity import compare

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

BATCHES = (1, 3, 7)


class Net(nn.Module):
    """conv → BN → ReLU, then a batch-shaped ``view`` (``x.shape[0]`` must stay symbolic) and a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        y = nn.functional.adaptive_avg_pool2d(y, 4)
        return self.fc(y.view(x.shape[0], -1))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(Net()).eval()


@pytest.fixture(scope="module")
def pt2(tmp_path_factory: pytest.TempPathFactory, model: nn.Module) -> Path:
    path = tmp_path_factory.mktemp("models") / "dyn.pt2"
    batch = torch.export.Dim("batch", min=1, max=32)
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: batch},)),
                      str(path))
    return path


def _inputs() -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 3, 16, 16, generator=g),) for b in BATCHES]


def _check_pt2(path: Path, model: nn.Module) -> None:
    ep = torch.export.load(str(path))
    [(lo, hi)] = [(int(r.lower), int(r.upper)) for r in ep.range_constraints.values()]
    assert (lo, hi) == (1, 32)  # the file's own range, not the example batch
    folded = ep.module()
    assert count_batchnorm(folded) == 0
    for batch in _inputs():  # each size on its own: vs the unfolded model and a float64 reference
        report = compare(model, folded, [batch])
        assert report.passed, (batch[0].shape, report.to_dict())


def test_fold_keeps_the_dynamic_batch(pt2: Path, model: nn.Module, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "folded.pt2"
    assert main(["fold", str(pt2), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dynamic: input 0 dim 0 (batch: 1..32)" in text
    assert "bn  " in text and "conv" in text  # module paths, not node names
    _check_pt2(out, model)


def test_optimize_keeps_the_dynamic_batch_in_every_artifact(pt2: Path, model: nn.Module, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tvm")
    from bnfold.targets.onnx import OnnxRuntimeModel
    from bnfold.targets.tvm import load_artifact

    out = tmp_path / "out"
    assert main(["optimize", str(pt2), "-o", str(out), "--no-progress", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["passed"] and not doc["errors"]
    assert doc["fold"]["dynamic_shapes"] == [{"input": 0, "dim": 0, "name": "batch", "min": 1, "max": 32}]
    _check_pt2(out / "folded.pt2", model)
    onnx_model = OnnxRuntimeModel(out / "model.onnx")
    assert onnx_model.build_info["dynamic_batch"] and "static_reason" not in onnx_model.build_info
    tvm = load_artifact(out / "tvm")
    assert tvm.build_info["signature"]["batch_range"] == [1, 32]
    for runtime in (onnx_model, tvm):
        for batch in _inputs():
            report = compare(model, runtime, [batch])
            assert report.passed, (runtime, batch[0].shape, report.to_dict())
