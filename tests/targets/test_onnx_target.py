"""The ONNX target (bnfold.targets.onnx) and the ``check`` / ``export-onnx`` commands (issue 5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import randomize_bn, tiny_vit
from torch import nn

import bnfold
from bnfold.cli import main
from bnfold.errors import InputError
from bnfold.parity import compare
from bnfold.targets import Artifact, Target
from bnfold.targets.onnx import OnnxRuntimeModel, OnnxTarget, export_onnx

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory, folded: torch.fx.GraphModule, x: torch.Tensor) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "resnet18_folded.onnx"
    export_onnx(folded, (x[:1],), path)  # a batch of 1: the exported batch dimension must still be dynamic
    return path


def test_folded_resnet18_through_onnxsim_and_ort_keeps_parity(resnet: nn.Module, onnx_file: Path) -> None:
    model = onnx.load(str(onnx_file))
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    runtime = OnnxRuntimeModel(onnx_file)
    info = runtime.build_info
    assert info["target"] == "onnx" and info["simplified"] and info["dynamic_batch"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(3, 3, 64, 64, generator=g),), (torch.randn(5, 3, 64, 64, generator=g),)]
    report = compare(resnet, runtime, data)
    assert report.passed, report
    assert report.samples == 8 and report.outputs[0].top1_agreement == 1.0


def test_onnx_runtime_model_checks_its_inputs(onnx_file: Path, x: torch.Tensor) -> None:
    runtime = OnnxRuntimeModel(onnx_file)
    with pytest.raises(InputError, match="expects float32"):
        runtime(x.double())
    with pytest.raises(InputError, match="takes 1 inputs"):
        runtime(x, x)
    with pytest.raises(InputError, match="failed"):
        runtime(torch.randn(1, 3, 64))
    with pytest.raises(InputError, match="no such ONNX file"):
        OnnxRuntimeModel(onnx_file.with_name("missing.onnx"))


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.bn(self.conv(x))
        return y.mean((2, 3)), y.amax((2, 3))


def test_static_batch_runs_in_chunks_and_tuples_come_back(tmp_path: Path) -> None:
    model = randomize_bn(_TwoHeads())
    x = torch.randn(2, 3, 8, 8)
    folded = bnfold.fold(model, (x,), check=False).module
    out = export_onnx(folded, (x,), tmp_path / "two.onnx", dynamic_batch=False)
    assert out.build_info["dynamic_batch"] is False
    runtime = OnnxRuntimeModel(out.path)
    y = runtime(torch.randn(6, 3, 8, 8))  # 3 chunks of the fixed batch of 2
    assert isinstance(y, tuple) and len(y) == 2 and y[0].shape == (6, 4)
    report = compare(model, runtime, [(torch.randn(6, 3, 8, 8),)])
    assert report.passed and len(report.outputs) == 2


def test_export_writes_atomically_and_protects_inputs(tmp_path: Path) -> None:
    model = randomize_bn(_TwoHeads())
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(InputError, match="does not exist"):
        export_onnx(model, (x,), tmp_path / "missing" / "m.onnx")
    src = tmp_path / "model.onnx"
    src.write_bytes(b"keep me")
    with pytest.raises(InputError, match="refusing to overwrite"):
        export_onnx(model, (x,), src, protect=[src])
    assert src.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary files left behind


def test_onnx_target_follows_the_protocol(tmp_path: Path) -> None:
    model = randomize_bn(_TwoHeads())
    x = torch.randn(2, 3, 8, 8)
    target = OnnxTarget()
    assert isinstance(target, Target)
    artifact = target.lower(bnfold.fold(model, (x,), check=False).module, (x,), {"path": tmp_path / "t.onnx"})
    assert isinstance(artifact, Artifact)
    copy_path = artifact.save(tmp_path / "copy.onnx")
    assert OnnxRuntimeModel(copy_path).build_info == artifact.build_info


# --- the CLI ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(3)
    model = randomize_bn(_SmallNet())
    x = torch.randn(2, 3, 16, 16)
    torch.export.save(torch.export.export(model, (x,)), str(d / "orig.pt2"))
    folded = bnfold.fold(model, (x,), check=False).module
    torch.export.save(torch.export.export(folded, (x,)), str(d / "folded.pt2"))
    broken = bnfold.fold(model, (x,), check=False).module
    with torch.no_grad():
        broken.get_submodule("c2").weight[1] *= 1.05
    torch.export.save(torch.export.export(broken, (x,)), str(d / "broken.pt2"))
    np.savez(d / "data.npz", x=np.random.default_rng(0).standard_normal((6, 3, 16, 16)).astype("float32"),
             labels=np.arange(6))
    return {"dir": d, "orig": d / "orig.pt2", "folded": d / "folded.pt2", "broken": d / "broken.pt2",
            "data": d / "data.npz"}


class _SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)))
        return self.fc(y.mean((2, 3)))


def test_cli_check_pt2_vs_pt2_and_onnx(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data", str(files["data"]), "--data-key", "x"]
    assert main(["check", str(files["orig"]), str(files["folded"]), *data]) == 0
    out = capsys.readouterr().out
    assert "parity PASS" in out and "your data" in out
    onnx_path = files["dir"] / "folded.onnx"
    assert main(["export-onnx", str(files["folded"]), "-o", str(onnx_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["check", str(files["orig"]), str(onnx_path), *data, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["candidate"]["kind"] == "onnx" and record["parity"]["passed"] is True
    assert record["parity"]["inputs"] == "user" and record["parity"]["samples"] == 6


def test_cli_check_fails_and_names_the_node(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", str(files["orig"]), str(files["broken"]), "--data", str(files["data"]),
                 "--data-key", "x", "--json"])
    assert code == 1
    record = json.loads(capsys.readouterr().out)
    assert record["parity"]["passed"] is False
    loc = record["parity"]["localization"]
    # the filter was scaled: the conv agrees up to a per-channel affine, the ReLU after it diverges
    assert loc is not None and loc["culprit_module_path"] == "c2", loc
    assert loc["culprit"] in loc["suspects"]


def test_cli_check_without_data_says_random(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(files["orig"]), str(files["folded"])]) == 0
    assert "RANDOM inputs" in capsys.readouterr().out


def test_cli_check_bad_inputs_exit_2(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(files["orig"]), str(files["dir"] / "nope.onnx"), "--data", str(files["data"])]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["check", str(files["orig"]), str(files["folded"]), "--data", str(files["data"]),
                 "--data-key", "missing"]) == 2
    assert "has no array" in capsys.readouterr().err


# -- a dynamic batch that really is dynamic (issue 12) ----------------------------------------------------------

class _LeViTStyle(nn.Module):
    """LeViT's ``Linear → x.flatten(0, 1) → BatchNorm1d → reshape_as(x)`` on tokens, twice, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.l1, self.bn1 = nn.Linear(16, 32), nn.BatchNorm1d(32)
        self.l2, self.bn2 = nn.Linear(32, 16), nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 5)

    @staticmethod
    def _lin_bn(x: torch.Tensor, lin: nn.Linear, bn: nn.BatchNorm1d) -> torch.Tensor:
        x = lin(x)
        return bn(x.flatten(0, 1)).reshape_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, C)
        t = torch.nn.functional.hardswish(self._lin_bn(t, self.l1, self.bn1))
        t = self._lin_bn(t, self.l2, self.bn2)
        return self.head(t.mean(1))


@pytest.mark.parametrize("make", [tiny_vit, lambda: randomize_bn(_LeViTStyle()).eval()], ids=["vit", "levit_style"])
def test_an_export_captured_fold_with_a_dynamic_batch_runs_in_ort_at_other_batch_sizes(make, tmp_path: Path
                                                                                         ) -> None:
    model, x = make(), torch.randn(2, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1, max=16)
    result = bnfold.fold(model, x, capture="export", dynamic_shapes=({0: batch},))
    assert result.report.folded
    out = export_onnx(result.module, (x,), tmp_path / "m.onnx", dynamic_shapes=result.dynamic_shapes)
    assert out.build_info["dynamic_batch"] and "static_reason" not in out.build_info
    runtime = OnnxRuntimeModel(out.path)
    for b in (1, 3, 5):  # never the example's 2; each size on its own, vs the model and a float64 reference
        report = compare(model, runtime, [(torch.randn(b, 3, 32, 32),)])
        assert report.passed, (b, report.to_dict())


def test_a_graph_with_the_batch_baked_in_is_written_static_and_says_so(tmp_path: Path) -> None:
    """Regression: a fold captured by torch.export at batch 2 has 2 in its reshape sizes; its ONNX file declared
    a dynamic batch and failed in ORT at any other size ("Reshape node 'node_view'"). Now it is written with the
    fixed batch, and says so (the re-export claims a dynamic batch: ORT at batch 3 finds it baked)."""
    from bnfold.targets.onnx import StaticBatchWarning

    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    folded = bnfold.fold(model, x, capture="export").module
    with pytest.warns(StaticBatchWarning, match="fixed batch of 2"):
        out = export_onnx(folded, (x,), tmp_path / "m.onnx")
    reason = out.build_info["static_reason"]
    assert out.build_info["dynamic_batch"] is False and "baked" in reason and "fold with dynamic_shapes" in reason
    proto = onnx.load(str(out.path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    runtime = OnnxRuntimeModel(out.path)
    assert runtime.build_info["static_reason"] == out.build_info["static_reason"]
    report = compare(model, runtime, [(torch.randn(4, 3, 32, 32),)])  # 4 = two runs of the fixed batch 2
    assert report.passed, report.to_dict()
