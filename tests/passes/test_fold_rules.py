"""One test per fold rule, each with a negative twin, on randomized BN statistics, in both capture modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import count_batchnorm, fold_and_check, randomize_bn
from torch import nn

import bnfold


class Seq(nn.Module):
    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


# -- fold into the producer -----------------------------------------------------------------------------------

CONV_CASES = [
    ("conv1d", lambda: nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6), (2, 4, 11)),
    ("conv2d_groups_dilation_nobias", lambda: nn.Conv2d(4, 8, 3, groups=2, dilation=2, bias=False),
     nn.BatchNorm2d(8), (2, 4, 12, 12)),
    ("conv3d_depthwise", lambda: nn.Conv3d(4, 4, 3, groups=4, padding=1), nn.BatchNorm3d(4), (1, 4, 5, 6, 6)),
    ("convT1d", lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1), nn.BatchNorm1d(6), (2, 4, 7)),
    ("convT2d_grouped", lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, output_padding=1),
     nn.BatchNorm2d(6), (2, 4, 5, 5)),
    ("convT3d_grouped_nobias", lambda: nn.ConvTranspose3d(6, 4, 2, stride=2, groups=2, bias=False),
     nn.BatchNorm3d(4), (1, 6, 3, 3, 3)),
    ("linear", lambda: nn.Linear(5, 7), nn.BatchNorm1d(7), (4, 5)),
]


@pytest.mark.parametrize("name,make_op,bn,shape", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_fold_into_producer(name: str, make_op, bn: nn.Module, shape, capture_mode: str) -> None:
    torch.manual_seed(0)
    model = randomize_bn(Seq(make_op(), bn))
    result = fold_and_check(model, (torch.randn(shape),), capture_mode, folded=1)
    assert result.report.folded[0].rule == "fold_into_producer"
    assert count_batchnorm(result.module) == 0


class ConvBNOtherUser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return self.bn(y), y


def test_fold_into_producer_negative_multi_user(capture_mode: str) -> None:
    model = randomize_bn(ConvBNOtherUser())
    result = fold_and_check(model, (torch.randn(2, 3, 8, 8),), capture_mode, folded=0, left=1)
    assert "also feeds" in result.report.skipped[0].reason


# -- fold into the consumer (BN before the op) ----------------------------------------------------------------

def test_bn_before_linear(capture_mode: str) -> None:
    model = randomize_bn(Seq(nn.BatchNorm1d(6), nn.Linear(6, 3)))
    result = fold_and_check(model, (torch.randn(4, 6),), capture_mode, folded=1)
    assert result.report.folded[0].rule == "fold_into_consumer"


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_bn_before_conv_non_zero_padding_folds_fully(padding_mode: str, capture_mode: str) -> None:
    model = randomize_bn(Seq(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1, padding_mode=padding_mode, groups=2)))
    result = fold_and_check(model, (torch.randn(2, 4, 7, 7),), capture_mode, folded=1)
    assert "scale only" not in result.report.folded[0].detail


def test_bn_before_conv_without_padding_folds_fully(capture_mode: str) -> None:
    model = randomize_bn(Seq(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=0)))
    result = fold_and_check(model, (torch.randn(2, 4, 7, 7),), capture_mode, folded=1)
    assert "scale only" not in result.report.folded[0].detail


def test_bn_before_zero_padded_conv_keeps_shift(capture_mode: str) -> None:
    """Negative twin: zero padding does not commute with the shift; only the scale folds, an add remains."""
    model = randomize_bn(Seq(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)))
    result = fold_and_check(model, (torch.randn(2, 4, 7, 7),), capture_mode, folded=1)
    assert "scale only" in result.report.folded[0].detail
    ops = [n.target for n in result.module.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.add.Tensor in ops  # the shift stays as one add


def test_bn_before_zero_padded_conv_identity_scale_is_left(capture_mode: str) -> None:
    """With scale ≡ 1 there is nothing to fold into a zero-padded conv: left, with the reason."""
    bn = nn.BatchNorm2d(4, affine=False, eps=0.0)
    model = Seq(bn, nn.Conv2d(4, 6, 3, padding=1)).eval()
    bn.running_var.fill_(1.0)
    bn.running_mean.copy_(torch.randn(4))
    result = fold_and_check(model, (torch.randn(2, 4, 7, 7),), capture_mode, folded=0, left=1)
    assert "pads with zeros" in result.report.skipped[0].reason


# -- propagation ----------------------------------------------------------------------------------------------

class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x) + self.b(x))


def test_bn_after_residual_add_goes_into_both_branches(capture_mode: str) -> None:
    model = randomize_bn(Residual())
    fold_and_check(model, (torch.randn(2, 3, 8, 8),), capture_mode, folded=1)


class ResidualIdentity(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(x)
        return self.bn(self.a(x) + x)


def test_bn_after_residual_with_identity_branch(capture_mode: str) -> None:
    """The conv branch takes scale and shift; the identity branch keeps one multiply (no more ops than before)."""
    model = randomize_bn(ResidualIdentity())
    result = fold_and_check(model, (torch.randn(2, 8, 6, 6),), capture_mode, folded=1)
    muls = [n for n in result.module.graph.nodes if n.target in (torch.ops.aten.mul.Tensor,)]
    assert len(muls) == 1


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, padding=1)
        self.b = nn.ConvTranspose2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([self.a(x), self.b(x)], dim=1))


def test_bn_after_concat_is_split_per_input(capture_mode: str) -> None:
    fold_and_check(randomize_bn(Concat()), (torch.randn(2, 3, 6, 6),), capture_mode, folded=1)


class FlattenHead(nn.Module):
    """BN2d after a ReLU (no producer to fold into) → flatten → linear: pushed forward into the linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.bn(torch.relu(self.conv(x))), 1))


def test_bn_pushed_through_flatten_into_linear(capture_mode: str) -> None:
    fold_and_check(randomize_bn(FlattenHead()), (torch.randn(2, 3, 5, 5),), capture_mode, folded=1)


class Transposed(nn.Module):
    """Linear on (N, L, F) then BatchNorm1d over features via transpose: the channel axis is remapped."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x).transpose(1, 2))


def test_linear_nd_bn1d_through_transpose(capture_mode: str) -> None:
    fold_and_check(randomize_bn(Transposed()), (torch.randn(3, 5, 6),), capture_mode, folded=1)


POOL_CASES = [
    ("avgpool", nn.AvgPool2d(2)),
    ("avgpool_pad_exclude", nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)),
    ("adaptive_avg", nn.AdaptiveAvgPool2d(2)),
    ("upsample_nearest", nn.Upsample(scale_factor=2)),
    ("upsample_bilinear", nn.Upsample(scale_factor=2, mode="bilinear")),
    ("dropout_eval", nn.Dropout(0.5)),
    ("identity", nn.Identity()),
]


@pytest.mark.parametrize("name,pool", POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_bn_after_value_preserving_op(name: str, pool: nn.Module, capture_mode: str) -> None:
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), pool, nn.BatchNorm2d(4)))
    fold_and_check(model, (torch.randn(2, 3, 8, 8),), capture_mode, folded=1)


def test_bn_after_zero_padded_avgpool_is_left(capture_mode: str) -> None:
    """Negative twin: count_include_pad=True averages padding zeros, so the shift is not constant."""
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.AvgPool2d(3, stride=1, padding=1), nn.BatchNorm2d(4)))
    result = fold_and_check(model, (torch.randn(2, 3, 8, 8),), capture_mode, folded=0, left=1)
    assert "count_include_pad" in result.report.skipped[0].reason


def _positive_bn(c: int) -> nn.BatchNorm2d:
    bn = randomize_bn(nn.BatchNorm2d(c))
    with torch.no_grad():
        bn.weight.abs_().add_(0.1)
    return bn


def test_bn_after_maxpool_with_positive_scale(capture_mode: str) -> None:
    model = Seq(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), _positive_bn(4)).eval()
    fold_and_check(model, (torch.randn(2, 3, 8, 8),), capture_mode, folded=1)


def test_bn_after_maxpool_with_negative_scale_is_left(capture_mode: str) -> None:
    bn = _positive_bn(4)
    with torch.no_grad():
        bn.weight[1] = -0.5
    model = Seq(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), bn).eval()
    result = fold_and_check(model, (torch.randn(2, 3, 8, 8),), capture_mode, folded=0, left=1)
    assert "not positive" in result.report.skipped[0].reason


def test_bn_after_relu_with_shift_is_left(capture_mode: str) -> None:
    model = Seq(nn.Conv2d(3, 4, 3), nn.ReLU(), _positive_bn(4)).eval()
    result = fold_and_check(model, (torch.randn(2, 3, 8, 8),), capture_mode, folded=0, left=1)
    assert "ReLU" in result.report.skipped[0].reason


def test_scale_only_affine_crosses_relu(capture_mode: str) -> None:
    """relu(a·x) = a·relu(x) for a > 0: a pure positive scale after a ReLU folds into the conv before it."""
    bn = nn.BatchNorm2d(4, affine=True)
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.copy_(torch.rand(4) + 0.5)
        bn.weight.copy_(torch.rand(4) + 0.5)
        bn.bias.zero_()
    model = Seq(nn.Conv2d(3, 4, 3), nn.ReLU(), bn).eval()
    fold_and_check(model, (torch.randn(2, 3, 8, 8),), capture_mode, folded=1)


def test_consecutive_bns_merge(capture_mode: str) -> None:
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)))
    fold_and_check(model, (torch.randn(2, 3, 6, 6),), capture_mode, folded=2)


# -- sources ---------------------------------------------------------------------------------------------------

class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.w = nn.Parameter(torch.randn(4))
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), self.mean, self.var, self.w, self.b, training=False, eps=1e-3)


def test_functional_batch_norm(capture_mode: str) -> None:
    fold_and_check(Functional().eval(), (torch.randn(2, 3, 6, 6),), capture_mode, folded=1)


class BNReLU(nn.BatchNorm2d):
    """A BN subclass that also applies an activation: the activation must survive the fold."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def test_bn_subclass_with_activation_keeps_activation(capture_mode: str) -> None:
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), BNReLU(4)))
    result = fold_and_check(model, (torch.randn(2, 3, 6, 6),), capture_mode, folded=1)
    assert (result.module(torch.randn(2, 3, 6, 6)) >= 0).all()
    assert any("relu" in str(n.target) for n in result.module.graph.nodes)


def test_sync_batchnorm(capture_mode: str) -> None:
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)))
    fold_and_check(model, (torch.randn(2, 3, 6, 6),), capture_mode, folded=1)


def test_frozen_batchnorm_traced_through(capture_mode: str) -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4)))
    result = fold_and_check(model, (torch.randn(2, 3, 6, 6),), capture_mode, folded=1)
    assert "FrozenBatchNorm2d" in result.report.folded[0].kind


def test_affine_false_bn(capture_mode: str) -> None:
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)))
    fold_and_check(model, (torch.randn(2, 3, 6, 6),), capture_mode, folded=1)


def test_zero_running_var_with_eps_folds(capture_mode: str) -> None:
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with torch.no_grad():
        model.layers[1].running_var[0] = 0.0
    fold_and_check(model, (torch.randn(2, 3, 6, 6),), capture_mode, folded=1, rtol=1e-3, atol=1e-3)


def test_non_finite_stats_are_left_with_reason(capture_mode: str) -> None:
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with torch.no_grad():
        model.layers[1].running_var[2] = float("nan")
    report = bnfold.inspect(model, (torch.randn(2, 3, 6, 6),), capture=capture_mode)
    assert report.folded == [] and "non-finite" in report.skipped[0].reason


# -- alias safety -----------------------------------------------------------------------------------------------

class ReusedConv(nn.Module):
    """One conv module called at two sites; only the first is followed by a BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(torch.tanh(x))


def test_reused_module_is_cloned_on_fold(capture_mode: str) -> None:
    model = randomize_bn(ReusedConv())
    w0 = model.conv.weight.detach().clone()
    fold_and_check(model, (torch.randn(2, 4, 6, 6),), capture_mode, folded=1)
    assert torch.equal(model.conv.weight, w0)


class TiedConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2.weight = self.c1.weight
        self.c3.weight = self.c1.weight
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c1(x)) + self.c2(x) * self.c3(x)


def test_tied_weights_stay_tied_where_unchanged() -> None:
    model = randomize_bn(TiedConvs())
    result = fold_and_check(model, (torch.randn(2, 4, 5, 5),), "symbolic", folded=1)
    gm = result.module
    assert gm.c2.weight is gm.c3.weight
    assert gm.c1.weight is not gm.c2.weight


# -- idempotence -------------------------------------------------------------------------------------------------

def test_second_run_changes_nothing(capture_mode: str) -> None:
    model = randomize_bn(Residual())
    x = torch.randn(2, 3, 8, 8)
    once = bnfold.fold(model, (x,), capture=capture_mode).module
    again = bnfold.fold(once, (x,), capture=capture_mode)
    assert not again.report.modified and again.report.folded == [] and again.report.skipped == []


def test_decomposed_export_program() -> None:
    """A .pt2 saved after run_decompositions(): _native_batch_norm_legit_no_training, convolution, addmm."""
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 5),
                             nn.BatchNorm1d(5)))
    x = torch.randn(2, 3, 6, 6)
    ep = torch.export.export(model, (x,)).run_decompositions()
    kinds = {str(n.target) for n in ep.graph.nodes}
    assert any("_native_batch_norm_legit_no_training" in k for k in kinds) and any("addmm" in k for k in kinds)
    result = bnfold.fold(ep, (x,), capture="export")
    assert len(result.report.folded) == 2 and result.report.skipped == [], result.report
    assert count_batchnorm(result.module) == 0
    torch.testing.assert_close(result.module(x), model(x), rtol=1e-4, atol=1e-5)
    assert result.report.parity["passed"]
