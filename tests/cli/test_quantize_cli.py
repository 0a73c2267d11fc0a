"""`bnfold quantize` and `bnfold optimize --int8` on saved files: exit codes and messages for people."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from int8_nets import ds_net, images

from bnfold.cli import main

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("files")
    pt2 = d / "net.pt2"
    torch.export.save(torch.export.export(ds_net(), (images(16),)), str(pt2))
    np.savez(d / "calib.npz", x=images(48, seed=2).numpy())
    return pt2, d / "calib.npz"


def test_quantize_per_tensor_json(files: tuple[Path, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    pt2, calib = files
    out = tmp_path / "out"
    code = main(["quantize", str(pt2), "--data", str(calib), "-o", str(out), "--per-tensor", "--json",
                 "--capture", "symbolic", "--batch-size", "16"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["passed"] and report["int8"]["per_channel"] is False
    assert (out / "model_int8.onnx").exists() and (out / "model_fp32.onnx").exists()
    # a second run into the same folder is refused without --force, replaces it with --force
    assert main(["quantize", str(pt2), "--data", str(calib), "-o", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_quantize_text_report_explains(files: tuple[Path, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    pt2, calib = files
    code = main(["quantize", str(pt2), "--data", str(calib), "-o", str(tmp_path / "o"), "--explain",
                 "--capture", "symbolic", "--bias-correction", "bn"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "int8 parity PASS" in text and "weight-range spread" in text and "int8 / fp32 speed-up" in text
    assert "model's input" in text  # data-free correction cannot do the first conv, and says why


@pytest.mark.parametrize("argv,expect", [
    (["--min-top1", "1.5"], "--min-top1 is a fraction"),
    (["--min-sqnr", "nan"], "--min-sqnr must be a finite"),
])
def test_quantize_bad_options(files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              argv: list[str], expect: str) -> None:
    pt2, calib = files
    assert main(["quantize", str(pt2), "--data", str(calib), "-o", str(tmp_path / "o"), *argv]) == 2
    assert expect in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_quantize_needs_data(files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", str(files[0]), "-o", str(tmp_path / "o")]) == 2  # --data or --data-factory
    assert "needs calibration data" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_quantize_refuses_onnx(tmp_path: Path, files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    assert main(["quantize", str(model), "--data", str(files[1]), "-o", str(tmp_path / "o")]) == 2
    assert "takes a torch model" in capsys.readouterr().err


def test_optimize_int8(files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pt2, calib = files
    assert main(["optimize", str(pt2), "-o", str(tmp_path / "x"), "--int8", "--target", "none"]) == 2
    assert "--int8 needs --data" in capsys.readouterr().err
    out = tmp_path / "deploy"
    code = main(["optimize", str(pt2), "--data", str(calib), "-o", str(out), "--int8", "--target", "none",
                 "--capture", "symbolic", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["int8"]["passed"] and report["artifacts"]["int8"] == "model_int8.onnx"
    assert {"onnx runtime", "onnx runtime int8"} <= set(report["latency_ms"])
    assert (out / "model_int8.onnx").exists() and (out / "model.onnx").exists()
