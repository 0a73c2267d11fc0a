"""bnfold.quantize end to end with ONNX Runtime (no mocks): a verified int8 folder, per channel and per tensor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from int8_nets import ds_net, images
from onnx import numpy_helper

from bnfold.errors import InputError
from bnfold.parity.int8 import Int8Rule
from bnfold.quantize import Int8Options, quantize
from bnfold.targets.onnx import OnnxRuntimeModel

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

CALIB = [images(16, seed=s) for s in range(3)]
VAL = [images(16, seed=9)]


@pytest.fixture(scope="module")
def per_channel(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("q") / "int8"
    return out, quantize(ds_net(), (CALIB[0],), out, calibration=CALIB, validation=VAL, capture="symbolic")


def test_writes_a_verified_int8_folder(per_channel) -> None:
    out, result = per_channel
    assert result.passed, result.render(explain=True)
    assert sorted(p.name for p in out.iterdir()) == [".bnfold-output.json", "model_fp32.onnx", "model_int8.onnx",
                                                    "report.json", "report.txt"]
    report = json.loads((out / "report.json").read_text())
    int8 = report["int8"]
    assert int8["passed"] and int8["per_channel"] and int8["bias_correction"] == "auto"
    assert int8["verdict"]["sqnr_db"] >= 20 and int8["verdict"]["top1_agreement"] >= 0.9
    # ORT wrote exactly the int8 weights bias correction was computed for
    assert int8["weights"]["weights"] == 6 and int8["weights"]["matching"] == 6
    steps = {s["name"]: s for s in int8["prepare"]["steps"]}
    assert set(steps) == {"equalize", "absorb_bias", "correct_bias"} and steps["equalize"]["changed"]
    assert int8["prepare"]["equalize_parity"]["passed"]
    assert set(report["latency_ms"]) == {"onnx runtime fp32", "onnx runtime int8"}
    runtime = OnnxRuntimeModel(out / "model_int8.onnx")
    assert runtime.build_info["target"] == "onnx-int8"
    assert runtime(VAL[0]).shape == (16, 10)


def test_the_int8_file_holds_int8_weights_per_channel(per_channel) -> None:
    out, _ = per_channel
    model = onnx.load(str(out / "model_int8.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = [v for k, v in inits.items() if k.endswith("weight_quantized")]
    scales = [v for k, v in inits.items() if k.endswith("weight_scale")]
    assert len(weights) == 6 and all(w.dtype == np.int8 for w in weights)
    assert all(s.size == w.shape[0] for s, w in zip(scales, weights, strict=False))
    assert {n.op_type for n in model.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"}


def test_per_tensor(tmp_path: Path) -> None:
    result = quantize(ds_net(), (CALIB[0],), tmp_path / "o", calibration=CALIB, validation=VAL,
                      options=Int8Options(per_channel=False), capture="symbolic")
    assert result.int8 is not None and not result.int8.options.per_channel
    model = onnx.load(str(tmp_path / "o" / "model_int8.onnx"))
    scales = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("weight_scale")]
    assert scales and all(s.size == 1 for s in scales)
    assert result.int8.weights["matching"] == result.int8.weights["weights"]


def test_a_failing_rule_fails_with_its_reason(tmp_path: Path) -> None:
    result = quantize(ds_net(), (CALIB[0],), tmp_path / "o", calibration=CALIB, validation=VAL, capture="symbolic",
                      options=Int8Options(rule=Int8Rule(min_sqnr_db=150.0)))
    assert not result.passed
    assert result.int8 is not None and result.int8.verdict is not None
    assert "< 150 dB" in result.int8.verdict.reasons[0]


def test_needs_calibration(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="calibration data"):
        quantize(ds_net(), (CALIB[0],), tmp_path / "o", calibration=[])
    assert not (tmp_path / "o").exists()


def test_replaces_only_its_own_output(tmp_path: Path, per_channel) -> None:
    out, _ = per_channel
    with pytest.raises(InputError, match="not empty"):
        quantize(ds_net(), (CALIB[0],), out, calibration=CALIB)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a bnfold"):
        quantize(ds_net(), (CALIB[0],), foreign, calibration=CALIB, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
