"""Shared test fixtures: randomized BatchNorm statistics, capture modes, the slow-test switch."""

from __future__ import annotations

import os

import pytest

CAPTURE_MODES = ["symbolic", "export"]


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
