"""Localization (bnfold.parity.localize): parity failures are detected and the diverging node is named (issue 5)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
from torch import nn

import bnfold
from bnfold.capture import capture
from bnfold.parity import compare
from bnfold.parity.localize import localize

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _conv_node(gm: torch.fx.GraphModule, path: str) -> torch.fx.Node:
    """The conv node that came from module ``path`` (``call_module`` or aten conv with that source)."""
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target == path:
            return n
        if n.op == "call_function" and "conv" in str(n.target):
            stack = n.meta.get("nn_module_stack") or {}
            if stack and list(stack.values())[-1][0].endswith(path):
                return n
    raise AssertionError(f"no conv node for {path}")


def _weight(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    if node.op == "call_module":
        return gm.get_submodule(str(node.target)).weight
    w = node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None)
    return getattr(gm, str(w.target))


def test_correct_fold_has_no_diverging_node(resnet: nn.Module, folded: torch.fx.GraphModule,
                                            x: torch.Tensor) -> None:
    loc = localize(resnet, folded, (x,))
    assert loc.node is None and loc.diverged == 0
    assert loc.compared >= 45 and loc.exact == loc.compared  # every surviving node checked, all exact


def test_corrupted_folded_conv_weight_is_named(resnet: nn.Module, folded: torch.fx.GraphModule,
                                               x: torch.Tensor) -> None:
    gm = copy.deepcopy(folded)
    node = _conv_node(gm, "layer2.0.conv2")
    with torch.no_grad():
        w = _weight(gm, node)
        w[3] += 0.2 * float(w.abs().max()) * torch.randn(w[3].shape, generator=torch.Generator().manual_seed(0))
    report = compare(resnet, gm, (x,))
    assert not report.passed
    loc = report.localization
    assert loc is not None, report.notes
    assert loc.node == node.name and loc.culprit == node.name and loc.suspects == []
    assert loc.module_path == "layer2.0.conv2"
    assert loc.metrics is not None and loc.metrics.params_changed and loc.metrics.status == "diverged"
    assert loc.metrics.matched is not None  # compared with the BN output the conv absorbed
    assert node.name in report.render()


def test_wrong_fold_is_named(resnet: nn.Module, folded: torch.fx.GraphModule, x: torch.Tensor) -> None:
    """A fold that put each output channel's BN scale on the wrong filter (filters rolled by one channel)."""
    gm = copy.deepcopy(folded)
    node = _conv_node(gm, "layer3.1.conv1")
    with torch.no_grad():
        w = _weight(gm, node)
        w.copy_(w[torch.roll(torch.arange(w.shape[0]), 1)].clone())
    report = compare(resnet, gm, (x,))
    assert not report.passed and report.localization is not None
    assert report.localization.node == node.name and report.localization.module_path == "layer3.1.conv1"


def test_perturbed_weight_in_an_unfolded_graph_is_named(resnet: nn.Module, x: torch.Tensor) -> None:
    gm = capture(resnet, (x,), "symbolic").module
    with torch.no_grad():
        gm.get_submodule("fc").weight[2] *= 1.01
    report = compare(resnet, gm, (x,))
    assert not report.passed and report.localization is not None
    assert report.localization.node == "fc" and report.localization.culprit == "fc"


def test_batchnorm_left_in_training_mode_is_named(resnet: nn.Module, x: torch.Tensor) -> None:
    gm = capture(resnet, (x,), "symbolic").module
    gm.get_submodule("layer3.0.bn2").train()
    report = compare(resnet, gm, (x,))
    assert not report.passed
    assert report.batch_independence is not None and not report.batch_independence.passed
    loc = report.localization
    assert loc is not None and loc.node == "layer3_0_bn2" and loc.culprit == "layer3_0_bn2"
    assert loc.metrics is not None and loc.metrics.training_mode
    assert "training mode" in loc.render()


class _PoolThenNorm(nn.Module):
    """conv → max-pool → BN (positive scale) → flatten → linear: the BN cannot fold into its producer directly, so
    the fold moves it (through the pool, or forward into the linear) and intermediate values change by a
    per-channel affine."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(6)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.bn(self.pool(self.conv(x)))))


def test_moved_affines_are_not_divergences_but_corruption_after_them_is() -> None:
    torch.manual_seed(0)
    model = _PoolThenNorm().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 2)  # positive: commutes with max-pool
        model.bn.bias.uniform_(-1, 1)
    x = torch.randn(8, 3, 8, 8)
    result = bnfold.fold(model, (x,), capture="symbolic", check=False)
    assert len(result.report.folded) == 1, result.report
    gm = result.module
    loc = localize(model, gm, (x,))
    assert loc.node is None and loc.diverged == 0
    with torch.no_grad():
        gm.get_submodule("fc").weight[1, 7] += 1.0
    report = compare(model, gm, (x,))
    assert not report.passed and report.localization is not None
    assert report.localization.node == "fc"
