"""bnfold.quantize.prepare: equalization checked exact, absorption measured, correction per mode; the caller's
graph untouched; and per-tensor int8 weights lose less after preparation (emulated in torch, no ORT)."""

from __future__ import annotations

import pytest
import torch
from int8_nets import ds_net, images

from bnfold.api import fold
from bnfold.errors import InputError
from bnfold.ir.linear_ops import LinearOp, match_linear_op
from bnfold.ir.quant_math import fake_quantize_weight
from bnfold.parity.int8 import judge_int8
from bnfold.quantize.prepare import prepare

CALIB = [(images(16, seed=s),) for s in range(3)]
VAL = [(images(16, seed=9),)]


@pytest.fixture(scope="module")
def folded() -> torch.fx.GraphModule:
    return fold(ds_net(), CALIB[0], capture="symbolic", check=False).module


def weights_quantized(gm: torch.fx.GraphModule, per_channel: bool) -> torch.fx.GraphModule:
    import copy

    q = copy.deepcopy(gm)
    with torch.no_grad():
        for n in q.graph.nodes:
            op = match_linear_op(q, n)
            if isinstance(op, LinearOp):
                op.module.weight.copy_(fake_quantize_weight(op.weight, per_channel=per_channel))
    return q


def sqnr(reference: torch.fx.GraphModule, candidate: torch.fx.GraphModule) -> float:
    with torch.no_grad():
        return judge_int8([[reference(*b)] for b in VAL], [[candidate(*b)] for b in VAL]).sqnr_db


def test_equalization_is_checked_exact_and_the_input_is_untouched(folded: torch.fx.GraphModule) -> None:
    before = {k: v.clone() for k, v in folded.state_dict().items()}
    result = prepare(folded, CALIB, absorb=False, bias_correction="none")
    assert all(torch.equal(before[k], v) for k, v in folded.state_dict().items())
    report = result.report
    assert report.equalize_parity is not None and report.equalize_parity["passed"]
    assert [s.name for s in report.steps] == ["equalize"] and report.steps[0].converged
    spread = report.spread_summary()
    assert spread is not None and spread["max_after"] < spread["max_before"] / 10


def test_per_tensor_weights_lose_less_after_equalization(folded: torch.fx.GraphModule) -> None:
    """Int8 weights (ORT's quantizer, emulated) per tensor: SQNR against the float model rises with equalization."""
    plain = sqnr(folded, weights_quantized(folded, per_channel=False))
    equalized = prepare(folded, CALIB, absorb=False, bias_correction="none").module
    after = sqnr(folded, weights_quantized(equalized, per_channel=False))
    assert after > plain + 6.0, (plain, after)


@pytest.mark.parametrize("mode", ["data", "bn"])
def test_bias_correction_modes(folded: torch.fx.GraphModule, mode: str) -> None:
    result = prepare(folded, CALIB, bias_correction=mode)  # type: ignore[arg-type]
    report = result.report
    assert [s.name for s in report.steps] == ["equalize", "absorb_bias", "correct_bias"]
    correct = report.steps[-1]
    layers = 6  # 5 convs + the classifier
    if mode == "data":
        assert len(correct.changed) == layers and report.statistics == "calibration data"
    else:  # data-free: the first conv reads the model's input, whose mean BN statistics cannot give
        assert len(correct.changed) == layers - 1 and "model's input" in correct.left[0]["reason"]
    assert report.absorb_sqnr_db is not None and report.absorb_sqnr_db > 20


def test_data_mode_needs_data(folded: torch.fx.GraphModule) -> None:
    with pytest.raises(InputError, match="needs calibration"):
        prepare(folded, None, bias_correction="data")


def test_moved_clamps_are_counted_and_can_be_kept(folded: torch.fx.GraphModule) -> None:
    """Equalization across a ReLU6 makes it a per-channel clamp (counted in the report); move_clamps=False leaves
    those pairs (with the reason) and creates none."""
    moved = prepare(folded, CALIB, absorb=False, bias_correction="none").report
    assert moved.clamps_moved == 2
    kept = prepare(folded, CALIB, absorb=False, bias_correction="none", move_clamps=False).report
    assert kept.clamps_moved == 0
    assert any("moving clamps is off" in e["reason"] for e in kept.steps[0].left)
