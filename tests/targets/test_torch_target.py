"""bnfold.targets: the Target/Artifact protocols, the registry, and the torch target (a folded module as .pt2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import bnfold
from bnfold.targets import TARGETS, Artifact, Target, get_target
from bnfold.targets.torch import TorchArtifact, TorchTarget, is_bnfold_pt2


def _folded() -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...]]:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = (torch.randn(2, 3, 8, 8),)
    return bnfold.fold(model, x).module, x


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_registered_target_is_a_target(name: str) -> None:
    if name == "tvm":
        pytest.importorskip("tvm")
    target = get_target(name)
    assert isinstance(target, Target) and target.name == name


def test_an_unknown_target_is_refused_with_the_known_names() -> None:
    with pytest.raises(KeyError, match="torch, onnx, tvm"):
        get_target("tensorrt")


def test_torch_target_runs_the_module_and_saves_a_bnfold_pt2(tmp_path: Path) -> None:
    gm, x = _folded()
    artifact = TorchTarget().lower(gm, x)
    assert isinstance(artifact, TorchArtifact) and isinstance(artifact, Artifact)
    assert artifact.build_info["target"] == "torch"
    torch.testing.assert_close(artifact(*x), gm(*x), rtol=0, atol=0)
    path = artifact.save(tmp_path / "folded.pt2")
    assert path.is_file() and is_bnfold_pt2(path)
    loaded = torch.export.load(path).module()
    torch.testing.assert_close(loaded(*x), gm(*x))


def test_torch_target_never_overwrites_a_protected_file(tmp_path: Path) -> None:
    gm, x = _folded()
    source = tmp_path / "model.pt2"
    source.write_bytes(b"the user's model")
    with pytest.raises(bnfold.BnfoldError):
        TorchTarget().lower(gm, x).save(source, protect=[source])
    assert source.read_bytes() == b"the user's model"
