"""``bnfold fold model.onnx --data inputs.npz`` (parity on the user's inputs) and ``bnfold optimize model.onnx
--target llvm`` (an untuned TVM build of the folded file, dynamic batch kept, parity vs ONNX Runtime)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from onnx_cases import BUILT, export

BNFOLD = [sys.executable, "-m", "bnfold.cli"]


def test_fold_checks_parity_on_the_users_data(tmp_path: Path) -> None:
    model, shape = BUILT["gemm_transB_bn"]()
    src = export(model, torch.randn(shape), tmp_path / "g.onnx")
    data = tmp_path / "inputs.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((7, *shape[1:])).astype(np.float32))
    out = tmp_path / "g.folded.onnx"
    r = subprocess.run([*BNFOLD, "fold", str(src), "-o", str(out), "--data", str(data), "--batch-size", "4",
                        "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    parity = json.loads(r.stdout)["parity"]
    assert parity["passed"] and parity["inputs"] == "user", parity
    assert not any("random inputs" in n for n in parity.get("notes", [])), parity
    out2 = tmp_path / "g.shape.onnx"  # --input-shape: random inputs, and the report says so
    r = subprocess.run([*BNFOLD, "fold", str(src), "-o", str(out2), "--input-shape", ",".join(map(str, shape)),
                        "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    parity = json.loads(r.stdout)["parity"]
    assert parity["inputs"] == "random", parity


def test_fold_data_that_does_not_fit_the_model_exits_2(tmp_path: Path) -> None:
    model, shape = BUILT["gemm_transB_bn"]()
    src = export(model, torch.randn(shape), tmp_path / "g.onnx")
    data = tmp_path / "two.npz"
    np.savez(data, x=np.zeros((2, *shape[1:]), np.float32), z=np.zeros((2, 3), np.float32))
    out = tmp_path / "g.folded.onnx"
    r = subprocess.run([*BNFOLD, "fold", str(src), "-o", str(out), "--data", str(data)], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "takes 1 inputs" in r.stderr and not out.exists(), (r.stdout, r.stderr)


def test_optimize_onnx_builds_tvm_with_a_dynamic_batch(tmp_path: Path) -> None:
    """Untuned llvm build of the folded file: the ONNX input's dynamic batch becomes the artifact's batch range,
    and the artifact matches ONNX Runtime at a batch size other than the parity batch."""
    pytest.importorskip("tvm")
    model, shape = BUILT["bn_flatten_gemm"]()
    src = export(model, torch.randn(shape), tmp_path / "m.onnx")
    out = tmp_path / "opt"
    r = subprocess.run([*BNFOLD, "optimize", str(src), "-o", str(out), "--target", "llvm", "--json",
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    tvm_info = report["stages"]["tvm"]
    assert report["passed"] and tvm_info["parity_vs_folded"]["passed"], tvm_info
    assert tvm_info["signature"]["batch_range"] == [1, 64] and tvm_info["signature"]["inputs"][0]["shape"][0] == \
        "batch"
    assert report["stages"]["fold"]["folded"] and (out / "folded.onnx").exists()

    from bnfold.parity.ort import OrtModel
    from bnfold.targets.tvm import load_artifact

    artifact = load_artifact(out / "tvm")
    x = torch.randn(5, *shape[1:])
    got = artifact(x)
    got = got[0] if isinstance(got, (tuple, list)) else got
    torch.testing.assert_close(got, OrtModel(out / "folded.onnx")(x)[0], rtol=1e-4, atol=1e-5)
