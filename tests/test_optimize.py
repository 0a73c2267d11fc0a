"""The pre-deployment step: bnfold.optimize / `bnfold optimize` on the embedded digits CNN."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bnfold.cli import main
from bnfold.demo import load_digits, load_pretrained, shift_images
from bnfold.deploy import optimize
from bnfold.errors import InputError


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_optimize_writes_verified_artifacts(tmp_path: Path, digits) -> None:
    model = load_pretrained()
    calib = [(shift_images(digits.x_train[i:i + 128]),) for i in range(0, 512, 128)]
    val = [(shift_images(digits.x_test, seed=1),)]
    out = tmp_path / "deploy"
    result = optimize(model, (digits.x_test[:16],), out, calibration=calib, validation=val)
    assert result.passed, str(result)
    assert sorted(p.name for p in out.iterdir()) == [".bnfold-output.json", "folded.pt2", "model.onnx", "report.html",
                                                    "report.json", "report.txt", "tvm"]
    names = [s.name for s in result.stages.stages]
    assert names == ["original", "recalibrated", "folded", "onnx", "tvm"]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["fold"]["candidates"] == 4 and len(report["fold"]["folded"]) == 4
    assert report["recalibration"] is not None
    # drift per BN layer on the validation data, before and after recalibration: recalibrating on shifted digits
    # brings the worst layer's drift down (measured: ~1.5 → ~0.1 here)
    before, after = report["drift"]["before"], report["drift"]["after"]
    assert len(before["layers"]) == len(after["layers"]) == 4
    assert after["worst"]["score"] < before["worst"]["score"] / 2
    assert report["tvm_kernels"] and all("name" in k and "flops" in k for k in report["tvm_kernels"])
    page = (out / "report.html").read_text()
    for chart in ("drift-chart", "sqnr-chart", "maxerr-chart", "latency-chart", "kernels-chart"):
        assert f'id="{chart}"' in page, chart
    # every artifact timed side by side at the example batch, the fastest named
    assert set(report["latency_ms"]) == {"pytorch eager (original)", "pytorch eager (folded)", "onnx runtime", "tvm"}
    assert all(t["median_ms"] > 0 and t["calls"] >= 10 for t in report["latency_ms"].values())
    assert report["fastest"] in report["latency_ms"] and "fastest:" in (out / "report.txt").read_text()
    # the caller's model is untouched (recalibration works on a copy)
    fresh = load_pretrained()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(),
                                                 strict=True))
    # the folded artifact on disk reproduces the recalibrated, folded model
    folded = torch.export.load(str(out / "folded.pt2")).module()
    x = shift_images(digits.x_test[:16], seed=2)
    stage = result.stages.stages[1]
    assert stage.name == "recalibrated" and stage.expected_change
    recal = load_pretrained()
    from bnfold.recalibration import recalibrate

    recalibrate(recal, calib)
    torch.testing.assert_close(folded(x), recal(x), rtol=1e-4, atol=1e-4)


def test_optimize_refuses_non_empty_output(tmp_path: Path, digits) -> None:
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(InputError, match="not empty"):
        optimize(load_pretrained(), (digits.x_test[:8],), out, onnx=False, tvm_target=None)
    assert (out / "keep.txt").read_text() == "user data"


def test_failed_stage_is_reported_not_hidden(tmp_path: Path, digits) -> None:
    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    out = tmp_path / "deploy"
    result = optimize(Broken(), (digits.x_test[:8],), out, onnx=False, tvm_target=None)
    assert not result.passed and "fold" in result.errors and "boom" in result.errors["fold"]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False and report["stages"]["first_divergence"]["stage"] == "original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy"]  # no staging folder left


def test_interrupted_run_leaves_no_partial_output(tmp_path: Path, digits) -> None:
    def calibration():
        yield (shift_images(digits.x_train[:64]),)
        raise RuntimeError("data loader died")

    out = tmp_path / "deploy"
    with pytest.raises(RuntimeError, match="data loader died"):
        optimize(load_pretrained(), (digits.x_test[:8],), out, calibration=calibration(), tvm_target=None)
    assert list(tmp_path.iterdir()) == []


def test_optimize_cli(tmp_path: Path, digits, capsys: pytest.CaptureFixture[str]) -> None:
    model = load_pretrained()
    pt2 = tmp_path / "digits.pt2"
    torch.export.save(torch.export.export(model, (digits.x_test[:16],)), str(pt2))
    np.savez(tmp_path / "calib.npz", x=shift_images(digits.x_train[:512]).numpy())
    out = tmp_path / "out"
    code = main(["optimize", str(pt2), "--data", str(tmp_path / "calib.npz"), "-o", str(out), "--target", "none"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "stages PASS" in text and (out / "folded.pt2").exists() and (out / "model.onnx").exists()
    assert main(["optimize", str(pt2), "-o", str(out), "--target", "none"]) == 2  # exists: refuses
    assert "not empty" in capsys.readouterr().err


class _Loader:
    """A re-iterable source of batches, like a DataLoader: counts its passes and the batches alive at once."""

    def __init__(self, x: torch.Tensor, size: int) -> None:
        import weakref

        self.x, self.size, self.passes, self.most_alive = x, size, 0, 0
        self._alive: list[weakref.ref[torch.Tensor]] = []
        self._ref = weakref.ref

    def __iter__(self):
        self.passes += 1
        for i in range(0, len(self.x), self.size):
            batch = self.x[i:i + self.size].clone()  # a batch of its own, as a loader makes
            self._alive.append(self._ref(batch))  # CPython frees a batch as its last reference goes
            self.most_alive = max(self.most_alive, sum(r() is not None for r in self._alive))
            yield batch
            del batch

    def __len__(self) -> int:
        return -(-len(self.x) // self.size)


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_optimize_streams_a_reiterable_source(tmp_path: Path, digits, capture: str) -> None:
    """optimize(calibration=loader, validation=loader) re-reads the loaders instead of listing them (one batch alive,
    or two at a time) and reaches the same statistics and parity verdicts as with lists of the same batches."""
    model = load_pretrained()
    calib_x, val_x = shift_images(digits.x_train[:300]), shift_images(digits.x_test[:96], seed=1)
    calib, val = _Loader(calib_x, 40), _Loader(val_x, 24)
    streamed = optimize(model, (digits.x_test[:16],), tmp_path / "a", calibration=calib, validation=val,
                        capture=capture, onnx=False, tvm_target=None)
    listed = optimize(model, (digits.x_test[:16],), tmp_path / "b", calibration=list(calib_x.split(40)),
                      validation=list(val_x.split(24)), capture=capture, onnx=False, tvm_target=None)
    assert streamed.passed and listed.passed, str(streamed)
    # a consumer's loop variable still holds batch k while the loader makes batch k+1: two alive, never more
    assert calib.most_alive <= 2 and val.most_alive <= 2, (calib.most_alive, val.most_alive)
    assert calib.passes == 2 and val.passes >= 3  # calibration: the parity default peek + recalibration
    assert streamed.recalibration.samples == listed.recalibration.samples == 300
    for a, b in zip(streamed.recalibration.layers, listed.recalibration.layers, strict=True):
        torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
        torch.testing.assert_close(a.var, b.var, rtol=0, atol=0)
    s, t = streamed.stages.to_dict(), listed.stages.to_dict()
    assert (s["batches"], s["samples"]) == (t["batches"], t["samples"]) == (6, 96)
    for x, y in zip(s["stages"], t["stages"], strict=True):
        assert x["passed"] == y["passed"]
        for key in ("vs_previous", "vs_baseline"):
            if x[key] is not None:
                assert x[key]["outputs"] == y[key]["outputs"], key
