"""``--model-factory MODULE:CALLABLE`` with a state_dict file: loads with weights_only, reports keys, fails cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bnfold.cli import main


class Small(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def not_a_module() -> int:
    return 3


def raises() -> nn.Module:
    raise RuntimeError("no weights here")


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    p = tmp_path / "small.pth"
    torch.save(Small(4).state_dict(), p)
    return p


def _run(*argv: str) -> int:
    return main([*argv])


def test_factory_folds_and_writes(weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "small.pt2"
    rc = _run("fold", str(weights), "--model-factory", f"{__name__}:Small", "--factory-kwargs",
              json.dumps({"width": 4}), "--input-shape", "1,3,8,8", "-o", str(out))
    assert rc == 0 and out.exists()
    assert "1 folded" in capsys.readouterr().out


@pytest.mark.parametrize(("spec", "kwargs", "message"), [
    ("no_such_pkg_xyz.models:Net", None, "importing 'no_such_pkg_xyz.models' failed"),
    (f"{__name__}:not_a_module", None, "returned a int, not a torch nn.Module"),
    (f"{__name__}:raises", None, "raised RuntimeError: no weights here"),
    (f"{__name__}:Small", '{"width": 8}', "do not fit"),
    (f"{__name__}:Small", "[1]", "must be a JSON object"),
    (f"{__name__}", None, "is not 'package.module:callable'"),
])
def test_factory_failures_exit_2_without_output(weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                spec: str, kwargs: str | None, message: str) -> None:
    out = tmp_path / "o.pt2"
    argv = ["fold", str(weights), "--model-factory", spec, "--input-shape", "1,3,8,8", "-o", str(out)]
    if kwargs:
        argv += ["--factory-kwargs", kwargs]
    assert _run(*argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_keys_are_an_error_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "partial.pth"
    sd = Small(4).state_dict()
    del sd["conv.weight"]
    sd["extra.head"] = torch.zeros(1)
    torch.save({"state_dict": sd, "epoch": 3}, p)  # a checkpoint wrapping the state_dict
    argv = ["inspect", str(p), "--model-factory", f"{__name__}:Small", "--input-shape", "1,3,8,8"]
    assert _run(*argv) == 2
    assert "1 parameters of" in capsys.readouterr().err
    assert _run(*argv, "--allow-missing-keys") == 0
    err = capsys.readouterr().err
    assert "conv.weight" in err and "extra.head" in err
