"""Parity must hold on torchvision models folded by bnfold, and through ONNX Runtime (issue 5 acceptance).

Default run: four small models; ``BNFOLD_SLOW=1`` runs the rest of the zoo and more ONNX exports.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import randomize_bn
from torch import nn
from zoo import ZOO

import bnfold
from bnfold.parity import compare

FAST = ["resnet18", "shufflenet_v2_x0_5", "mnasnet0_5", "regnet_y_400mf"]
SLOW = [n for n in ZOO if n not in FAST]
ONNX_SLOW = ["resnet50", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "googlenet", "r3d_18"]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _model_and_batches(name: str) -> tuple[nn.Module, list[tuple[torch.Tensor]]]:
    build, shape = ZOO[name]
    torch.manual_seed(0)
    model = randomize_bn(build())
    g = torch.Generator().manual_seed(1)
    shape = (2, *shape[1:])  # two samples: the batch-independence check needs them
    return model, [(torch.randn(shape, generator=g),), (torch.randn(shape, generator=g),)]


def _fold_and_compare(name: str) -> None:
    model, batches = _model_and_batches(name)
    folded = bnfold.fold(model, batches[0], check=False).module
    report = compare(model, folded, batches)
    assert report.passed, report
    assert report.inputs == "user" and report.reference_fp64
    assert report.batch_independence is not None and report.batch_independence.passed
    for out in report.outputs:
        assert out.nonfinite == 0 and out.cosine > 0.999999
        assert out.top1_agreement in (None, 1.0)


@pytest.mark.parametrize("name", FAST)
def test_folded_zoo_keeps_parity(name: str) -> None:
    _fold_and_compare(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_folded_zoo_keeps_parity_slow(name: str) -> None:
    _fold_and_compare(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ONNX_SLOW)
def test_folded_zoo_through_onnx_runtime(name: str, tmp_path: Path) -> None:
    from bnfold.targets.onnx import OnnxRuntimeModel, export_onnx

    model, batches = _model_and_batches(name)
    folded = bnfold.fold(model, batches[0], check=False).module
    runtime = OnnxRuntimeModel(export_onnx(folded, batches[0], tmp_path / f"{name}.onnx").path)
    report = compare(model, runtime, batches)
    assert report.passed, report
