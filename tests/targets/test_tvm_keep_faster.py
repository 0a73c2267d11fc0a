"""A tuned build is kept only when it is faster end to end than the default schedules
(:mod:`bnfold.targets.tvm.keep_faster`). Real TVM builds: the slower one does 8x the work of the faster one, so
which must win holds on any host."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("tvm")

from bnfold.targets.tvm import UntunedKernelsWarning, compile
from bnfold.targets.tvm.artifact import MANIFEST
from bnfold.targets.tvm.keep_faster import keep_faster
from bnfold.targets.tvm.package import write_manifest


def _convs(n: int) -> nn.Module:
    torch.manual_seed(n)
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), *[nn.Conv2d(32, 32, 3, padding=1) for _ in range(n)]).eval()


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    x = torch.randn(1, 16, 40, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntunedKernelsWarning)
        fast = compile(_convs(1), (x,), cache_dir=tmp_path_factory.mktemp("a"), progress=False)
        slow = compile(_convs(8), (x,), cache_dir=tmp_path_factory.mktemp("b"), progress=False)
    return fast, slow, x


def _on_disk(artifact) -> dict:
    return json.loads((artifact.directory / MANIFEST).read_text())


def _write(a) -> None:
    write_manifest(a.directory, a.build_info)


def test_the_default_build_is_kept_when_the_tuned_one_is_slower(builds):
    fast, slow, x = builds
    slow.build_info["tuning"] = {**slow.build_info["tuning"], "note": "tuned with 8 trials", "untuned": ["k"],
                                 "default_scheduled": []}
    kept = keep_faster(slow, lambda: fast, (x,), write=_write)
    assert kept is fast
    e2e = kept.build_info["tuning"]["end_to_end"]
    assert e2e["kept"] == "default" and e2e["default_ms"] < e2e["tuned_ms"]
    note = kept.build_info["tuning"]["note"]
    assert note.startswith("tuned with 8 trials; the tuned build ran") and "kept the default schedules" in note
    assert kept.build_info["tuning"]["untuned"] == fast.build_info["tuning"]["untuned"] != ["k"]
    assert _on_disk(kept)["tuning"] == kept.build_info["tuning"]  # the manifest on disk says so too


def test_the_tuned_build_is_kept_when_it_is_faster(builds):
    fast, slow, x = builds
    built = []
    kept = keep_faster(fast, lambda: built.append(slow) or slow, (x,), write=_write)
    assert kept is fast and built == [slow]
    e2e = _on_disk(kept)["tuning"]["end_to_end"]
    assert e2e["kept"] == "tuned" and e2e["tuned_ms"] < e2e["default_ms"] and e2e["calls_each"] >= 21
