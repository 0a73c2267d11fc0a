"""bnfold.parity: metrics, the pass/fail rules, inputs, batch independence, the report (issue 5)."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.fx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing._comparison import default_tolerances

import bnfold
from bnfold.errors import InputError
from bnfold.parity import (
    STORAGE_DRAWS,
    OutputStats,
    Tolerance,
    as_batches,
    check_batch_independence,
    compare,
    judge,
    storage_noise64,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "parity.md"


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 10))
    with torch.no_grad():
        bn = net[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return net.eval()


def _x(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_elementwise_defaults_are_assert_close_defaults(dtype: torch.dtype) -> None:
    tol = Tolerance.for_dtype(dtype)
    assert (tol.rtol, tol.atol) == default_tolerances(dtype)


def test_fold_passes_the_fp64_rule_and_a_small_perturbation_fails() -> None:
    net, x = _net(), _x()
    folded = bnfold.fold(net, (x,), check=False).module
    ok = compare(net, folded, (x,))
    assert ok.passed, ok
    assert ok.reference_fp64 and ok.outputs[0].rule == "fp64"
    assert ok.outputs[0].rmse_vs_fp64 <= ok.outputs[0].bound
    with torch.no_grad():
        folded.get_submodule("4").weight[0] *= 1.001  # 0.1 % on one row of the classifier
    bad = compare(net, folded, (x,))
    assert not bad.passed
    assert "rmse vs float64" in bad.outputs[0].reason


@pytest.mark.parametrize("dtype, defect", [(torch.float16, 1.02), (torch.bfloat16, 1.15)])
def test_half_precision_rule_measures_storage_noise_and_still_catches_a_defect(dtype: torch.dtype,
                                                                               defect: float) -> None:
    """The bound may add the measured noise of one storage rounding per weight and layer output
    (``storage_noise64``, measured only when the analytic bound fails); a fold passes, a change of one classifier
    row by ~40 storage roundoffs (2 % fp16, 15 % bf16) still fails with it."""
    net, x = _net().to(dtype), _x(16).to(dtype)
    noise = storage_noise64(net, [(x,)])
    assert len(noise) == STORAGE_DRAWS and all(len(d) == 1 for d in noise)
    folded = bnfold.fold(net, (x,), check=False).module
    ok = compare(net, folded, (x,))
    assert ok.passed, ok
    with torch.no_grad():
        folded.get_submodule("4").weight[0] *= defect
    bad = compare(net, folded, (x,))
    assert not bad.passed and "storage noise" in bad.outputs[0].reason


def test_metrics_match_their_definitions() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 10, generator=g)
    cand = ref + 1e-3 * torch.randn(64, 10, generator=g)
    stats = OutputStats()
    stats.add(ref, cand, None, Tolerance())
    out = stats.verdict(0, Tolerance())
    d = (cand - ref).double()
    assert out.max_abs == pytest.approx(float(d.abs().max()))
    assert out.sqnr_db == pytest.approx(10 * math.log10(float((ref.double() ** 2).sum() / (d**2).sum())))
    assert out.cosine == pytest.approx(float(nn.functional.cosine_similarity(ref.double().flatten(),
                                                                             cand.double().flatten(), dim=0)))
    assert out.rmse == pytest.approx(float(d.pow(2).mean().sqrt()))
    assert out.rule == "elementwise" and not out.passed  # 1e-3 noise is far outside assert_close's fp32 view


def test_identical_outputs_give_infinite_sqnr_and_strict_json() -> None:
    net, x = _net(), _x()
    report = compare(net, net, (x,))
    assert report.passed
    assert report.outputs[0].sqnr_db == math.inf and report.outputs[0].max_abs == 0
    text = json.dumps(report.to_dict(), allow_nan=False)  # strict JSON: no Infinity/NaN literals
    assert '"sqnr_db": "inf"' in text


@pytest.mark.parametrize("scale, close", [(1 + 1e-7, True), (1 + 1e-4, False)])
def test_elementwise_view_agrees_with_assert_close(scale: float, close: bool) -> None:
    ref = torch.linspace(-50, 50, 101)
    cand = ref * scale
    report = compare(lambda x: ref, lambda x: cand, (torch.zeros(1),), batch_independence=False)
    assert not report.reference_fp64  # a lambda has no float64 copy: the elementwise rule decides
    try:
        torch.testing.assert_close(cand, ref)
        expected = True
    except AssertionError:
        expected = False
    assert expected is close
    assert report.outputs[0].allclose is close and report.passed is close


def test_top_k_agreement_on_classifier_outputs() -> None:
    ref = torch.tensor([[9.0, 1, 2, 3, 4, 5, 6], [1.0, 9, 2, 3, 4, 5, 6], [1.0, 2, 9, 3, 4, 5, 6],
                        [1.0, 2, 3, 9, 4, 5, 6]])
    cand = ref.clone()
    cand[0, 0] = 5.5  # sample 0: class 0 drops to rank 3 of the candidate (9 → 5.5 < 6): top-1 differs, top-5 holds
    cand[1, 1] = -1.0  # sample 1: class 1 falls out of the candidate's top 5
    report = compare(lambda x: ref, lambda x: cand, (torch.zeros(4),), batch_independence=False)
    o = report.outputs[0]
    assert o.top1_agreement == pytest.approx(2 / 4)
    assert o.top5_agreement == pytest.approx(3 / 4)
    one_d = compare(lambda x: ref.flatten(), lambda x: cand.flatten(), (torch.zeros(4),), batch_independence=False)
    assert one_d.outputs[0].top1_agreement is None  # not classifier-shaped


def test_nan_and_inf_are_counted_and_must_match() -> None:
    ref = torch.tensor([[1.0, float("nan"), 3.0], [float("inf"), 5.0, 6.0]])
    same = compare(lambda x: ref, lambda x: ref.clone(), (torch.zeros(2),), batch_independence=False)
    o = same.outputs[0]
    assert (o.nan, o.inf, o.reference_nan, o.reference_inf, o.nonfinite_mismatch) == (1, 1, 1, 1, 0)
    assert not same.passed and "NaN" in o.reason  # NaN never passes, even where both sides agree (issue 13)
    inf_only = ref.nan_to_num(nan=2.0, posinf=float("inf"))
    assert compare(lambda x: inf_only, lambda x: inf_only.clone(), (torch.zeros(2),), batch_independence=False).passed
    cand = ref.clone()
    cand[0, 0] = float("nan")
    cand[1, 0] = -float("inf")
    diff = compare(lambda x: ref, lambda x: cand, (torch.zeros(2),), batch_independence=False)
    o = diff.outputs[0]
    assert (o.nan, o.inf, o.nonfinite_mismatch) == (2, 1, 2)
    assert not diff.passed and "NaN/Inf" in o.reason


def test_random_inputs_only_without_inputs_and_said_so() -> None:
    net = _net()
    report = compare(net, net, None, example_inputs=(_x(2),))
    assert report.inputs == "random" and any("random" in n for n in report.notes)
    assert "RANDOM" in report.render()
    by_shape = compare(net, net, None, input_shapes=[(3, 3, 6, 6)])
    assert by_shape.inputs == "random" and by_shape.samples == 3
    user = compare(net, net, (_x(2),))
    assert user.inputs == "user" and not user.notes
    with pytest.raises(InputError, match="no inputs"):
        compare(net, net, None)


def test_batches_are_pooled() -> None:
    net, x = _net(), _x(6)
    folded = bnfold.fold(net, (x,), check=False).module
    report = compare(net, folded, [(x[:2],), (x[2:],)])
    assert report.batches == 2 and report.samples == 6 and report.passed
    assert as_batches(x) == [(x,)]
    assert len(as_batches((x, x))) == 1 and len(as_batches([(x,), (x,)])) == 2
    with pytest.raises(InputError, match="labels"):
        as_batches([(x, "cat")])


def test_compare_reads_batches_as_recalibrate_does() -> None:
    """One meaning of "batches" across the API (bnfold.batches): a list of tensors is several batches for
    compare too (it used to be one batch of three inputs: "forward() takes 2 positional arguments but 4 were
    given"); an ambiguous reading for the model at hand is an error that names both readings."""
    net, x = _net(), _x(6)
    folded = bnfold.fold(net, (x,), check=False).module
    xs = [x[:2], x[2:4], x[4:]]
    report = compare(net, folded, xs)
    assert report.batches == 3 and report.samples == 6 and report.passed
    assert compare(net, folded, (x,)).batches == 1 and compare(net, folded, x).batches == 1
    assert compare(net, folded, x.split(2)).batches == 3  # a one-input model: a tuple of tensors is batches
    recal = copy.deepcopy(net)
    assert bnfold.recalibrate(recal, xs).batches == 3
    assert bnfold.recalibrate(copy.deepcopy(net), x).batches == 1  # a tensor is one batch here too
    assert bnfold.diagnose(copy.deepcopy(net), xs).batches == 3


def test_multi_input_models_get_a_clear_error_for_a_list_of_tensors() -> None:
    class Two(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    a = torch.randn(2, 3)
    with pytest.raises(InputError, match="neither one batch of this model's 2 inputs"):
        compare(Two(), Two(), [a, a])
    with pytest.raises(InputError, match="neither one batch of this model's 2 inputs"):
        compare(Two(), Two(), (a, a, a))
    assert compare(Two(), Two(), (a, a)).batches == 1
    assert compare(Two(), Two(), [(a, a), (a, a)]).batches == 2


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(0, 10_000))
def test_pooled_metrics_equal_one_concatenated_batch(n1: int, n2: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    r1, r2 = torch.randn(n1, 7, generator=g), torch.randn(n2, 7, generator=g)
    c1, c2 = r1 + 0.01 * torch.randn(n1, 7, generator=g), r2 + 0.01 * torch.randn(n2, 7, generator=g)
    t1, t2 = r1.double() + 1e-4, r2.double() - 1e-4
    pooled, _ = judge([[r1], [r2]], [[c1], [c2]], [[t1], [t2]])
    whole, _ = judge([[torch.cat([r1, r2])]], [[torch.cat([c1, c2])]], [[torch.cat([t1, t2])]])
    a, b = pooled.outputs[0], whole.outputs[0]
    for name in ("max_abs", "max_rel", "cosine", "sqnr_db", "rmse", "rmse_vs_fp64", "bound", "top1_agreement",
                 "top5_agreement"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-9), name
    assert a.passed == b.passed


def test_shape_or_count_mismatch_is_a_failure_not_a_crash() -> None:
    report = compare(lambda x: torch.zeros(2, 3), lambda x: torch.zeros(2, 4), (torch.zeros(2),))
    assert not report.passed and "shape" in report.errors[0]
    report = compare(lambda x: torch.zeros(2), lambda x: (torch.zeros(2), torch.zeros(2)), (torch.zeros(2),))
    assert not report.passed and "returns 1 tensors" in report.errors[0]


def test_batch_independence_catches_training_mode_batchnorm() -> None:
    net, x = _net(), _x(4)
    assert check_batch_independence(net, [(x,)]).passed
    train = _net().train()
    result = check_batch_independence(train, [(x,)])
    assert result.checked and not result.passed and "training mode" in result.note
    assert result.rel_rms > result.threshold
    single = check_batch_independence(train, [(x[:1],)])
    assert not single.checked and single.passed and "two or more" in single.note
    # the reference in training mode too: the candidate only reproduces it
    both = check_batch_independence(train, [(x,)], reference=_net().train())
    assert both.passed and both.reference_passed is False


def test_compare_fails_on_batch_dependence() -> None:
    net, x = _net(), _x(4)
    train = _net().train()
    report = compare(net, train, (x,), localize=False)
    assert not report.passed
    assert report.batch_independence is not None and not report.batch_independence.passed
    assert report.summary()["batch_independent"] is False


def test_summary_keeps_the_fields_the_fold_report_reads() -> None:
    net, x = _net(), _x()
    s = compare(net, bnfold.fold(net, (x,), check=False).module, (x,)).summary()
    for key in ("passed", "max_abs", "max_rel", "cosine", "inputs", "rmse_vs_fp64", "reference_rmse_vs_fp64",
                "bound", "sqnr_db", "top1_agreement", "nonfinite"):
        assert key in s, key
    assert s["passed"] is True


def _documented_fields() -> set[str]:
    return set(re.findall(r"^\|\s*`([a-z0-9_]+)`", DOCS.read_text(), flags=re.MULTILINE))


def test_every_json_field_is_documented() -> None:
    net, x = _net(), _x()
    train = torch.fx.symbolic_trace(_net().train())
    report = compare(net, train, (x,))  # fails: fills batch_independence and localization too
    d = report.to_dict()
    keys = set(d) | set(d["outputs"][0]) | set(d["batch_independence"]) | set(d["localization"])
    keys |= set(d["localization"]["metrics"])
    missing = keys - _documented_fields()
    assert not missing, f"fields missing from docs/parity.md: {sorted(missing)}"


def test_render_is_a_table_with_the_verdict() -> None:
    net, x = _net(), _x()
    text = compare(net, torch.fx.symbolic_trace(_net().train()), (x,)).render()
    assert text.startswith("parity FAIL")
    assert "SQNR dB" in text and "batch independence FAIL" in text and "first divergence" in text


class _Reread:
    """A re-iterable source that counts its passes; ``drift`` makes every pass after the first give other values."""

    def __init__(self, xs: list[torch.Tensor], drift: bool = False) -> None:
        self.xs, self.drift, self.passes = xs, drift, 0

    def __iter__(self):
        self.passes += 1
        for x in self.xs:
            yield x + (self.passes - 1) * 1e-3 if self.drift else x.clone()


def test_compare_rereads_a_source_and_refuses_one_that_changes() -> None:
    """A re-iterable source is read again by every run (same verdict and numbers as a list); one whose batches change
    between runs (a shuffling or augmenting loader) is refused, naming the batch; a shuffling DataLoader is listed
    once, as before, and compares fine."""
    from torch.utils.data import DataLoader

    from bnfold.errors import DataError

    torch.manual_seed(0)
    from helpers import randomize_bn

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                       nn.Linear(4 * 6 * 6, 5))).eval()
    folded = bnfold.fold(model, (torch.randn(2, 3, 8, 8),), capture="symbolic").module
    xs = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    source = _Reread(xs)
    streamed, listed = bnfold.compare(model, folded, source), bnfold.compare(model, folded, xs)
    assert streamed.passed and source.passes >= 3  # reference, candidate, float64 reference (and more)
    assert streamed.to_dict()["outputs"] == listed.to_dict()["outputs"]
    with pytest.raises(DataError, match="batch 0 differs"):
        bnfold.compare(model, folded, _Reread(xs, drift=True))
    loader = DataLoader(torch.cat(xs), batch_size=4, shuffle=True)
    assert bnfold.compare(model, folded, loader).passed


def test_run_batches_compacts_kept_outputs() -> None:
    """Kept outputs are moved into one block per 64 batches (the allocator's heap stays flat) with the same values,
    batch by batch; outputs whose trailing shapes differ between batches, and 0-dim outputs, are left alone."""
    from bnfold.parity.inputs import COMPACT_EVERY, compact_outputs, run_batches

    xs = [(torch.randn(3 if k % 7 else 2, 5),) for k in range(COMPACT_EVERY + 9)]
    out = run_batches(lambda x: (x * 2, x.sum()), xs)
    assert len(out) == len(xs)
    for (x,), (y, s) in zip(xs, out, strict=True):
        assert torch.equal(y, x * 2) and torch.equal(s, x.sum())
    assert out[0][0].untyped_storage().data_ptr() == out[COMPACT_EVERY - 1][0].untyped_storage().data_ptr()
    mixed = [[torch.zeros(2, 3)], [torch.zeros(2, 4)]]
    assert all(a[0] is b[0] for a, b in zip(compact_outputs(mixed), mixed, strict=True))
