"""Shared test fixtures: randomized BatchNorm statistics, capture modes, the slow-test switch."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

CAPTURE_MODES = ["symbolic", "export"]


def pytest_configure(config: pytest.Config) -> None:
    """``BNFOLD_TEST_ONEDNN=0`` runs the suite with oneDNN (mkldnn) off, one of the ways to make this host run the
    fp32 kernels another CPU would (with ``ONEDNN_MAX_CPU_ISA=AVX2``, ``ATEN_CPU_CAPABILITY=avx2|default`` and
    ``OMP_NUM_THREADS``): no numeric bound in the suite may depend on which kernels run (docs/parity.md)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # `make test` runs one worker per core: each gets one intra-op thread, or the workers' OpenMP pools would
        # spin against each other (tests that need more threads set them themselves)
        import torch

        torch.set_num_threads(1)
    if os.environ.get("BNFOLD_TEST_ONEDNN") == "0":
        import torch

        torch.backends.mkldnn.enabled = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("BNFOLD_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: run with BNFOLD_SLOW=1 (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=CAPTURE_MODES)
def capture_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def one_intra_op_thread() -> Iterator[None]:
    """One intra-op thread while a module runs (restored after): on a busy 2-core machine, two spinning OpenMP
    threads make small models several times slower, and parity does not depend on it. Opt in with
    ``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- a folded resnet18 (randomized BN statistics), shared by the parity and ONNX tests ---------------------------

@pytest.fixture(scope="module")
def resnet():
    """resnet18 (10 classes) with random weights and randomized BN statistics, in eval mode."""
    import torch
    import torchvision
    from helpers import randomize_bn

    torch.manual_seed(0)
    return randomize_bn(torchvision.models.resnet18(num_classes=10))


@pytest.fixture(scope="module")
def x():
    """A seeded (2, 3, 64, 64) input batch for ``resnet``."""
    import torch

    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=CAPTURE_MODES)
def folded(request: pytest.FixtureRequest, resnet, x):
    """``resnet`` folded by bnfold, once per capture mode."""
    import bnfold

    return bnfold.fold(resnet, (x,), capture=request.param, check=False).module
