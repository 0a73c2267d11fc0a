"""``bnfold check`` against a compiled TVM artifact folder (the loader registry's third entry), and data files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import randomize_bn
from torch import nn

import bnfold
from bnfold.cli import main
from bnfold.cli.commands.check_cmd import LOADERS, Loaded, Loader, load_runnable, register_loader
from bnfold.errors import InputError
from bnfold.io.data import load_tensors

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _net() -> nn.Module:
    torch.manual_seed(4)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Flatten(), nn.Linear(6 * 8 * 8, 4)))


def test_check_pt2_against_a_compiled_tvm_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tvm")
    net, x = _net(), torch.randn(2, 3, 8, 8)
    torch.export.save(torch.export.export(net, (x,)), str(tmp_path / "net.pt2"))
    folded = bnfold.fold(net, (x,), check=False).module
    artifact = bnfold.compile(folded, (x,), tune_trials=0, progress=False, cache_dir=tmp_path / "cache")
    artifact.save(tmp_path / "net_tvm")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype("float32"))
    argv = ["check", str(tmp_path / "net.pt2"), str(tmp_path / "net_tvm"), "--data", str(tmp_path / "x.npy")]
    assert main(argv) == 2  # model.so is code: loaded only with the user's consent
    assert "--trust-pickle" in capsys.readouterr().err
    code = main([*argv, "--trust-pickle", "--json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["candidate"]["kind"] == "tvm" and record["parity"]["passed"], record
    assert record["parity"]["samples"] == 4


def test_loader_registry_is_the_extension_point(tmp_path: Path) -> None:
    path = tmp_path / "model.fake"
    path.write_text("x")
    with pytest.raises(InputError, match="cannot run this kind of file"):
        load_runnable(path)
    loader = Loader("fake", lambda p: p.suffix == ".fake", lambda p, _trust: Loaded(lambda t: t * 2, "fake", p))
    register_loader(loader, first=True)
    try:
        loaded = load_runnable(path)
        assert loaded.kind == "fake" and torch.equal(loaded.model(torch.ones(2)), torch.full((2,), 2.0))
    finally:
        LOADERS.remove(loader)


def test_load_tensors_formats(tmp_path: Path) -> None:
    a, b = torch.randn(5, 3), torch.randint(0, 9, (5, 2))
    torch.save(a, tmp_path / "one.pt")
    torch.save((a, b), tmp_path / "batch.pt")
    torch.save([(a[:2], b[:2]), (a[2:], b[2:])], tmp_path / "batches.pt")
    torch.save({"ids": b, "x": a}, tmp_path / "named.pt")
    np.savez(tmp_path / "arrays.npz", x=a.numpy(), ids=b.numpy())
    np.save(tmp_path / "x.npy", a.numpy())
    assert [len(t) for t in load_tensors(tmp_path / "one.pt")] == [1]
    assert len(load_tensors(tmp_path / "batch.pt")) == 1 and len(load_tensors(tmp_path / "batch.pt")[0]) == 2
    assert [t[0].shape[0] for t in load_tensors(tmp_path / "batches.pt")] == [2, 3]
    (x, ids), = load_tensors(tmp_path / "named.pt", keys=["x", "ids"])
    assert torch.equal(x, a) and torch.equal(ids, b)
    (x, ids), = load_tensors(tmp_path / "arrays.npz")
    assert torch.equal(x, a) and ids.dtype == torch.int64
    chunks = load_tensors(tmp_path / "x.npy", batch_size=2, dtype=torch.float64)
    assert [c[0].shape[0] for c in chunks] == [2, 2, 1] and chunks[0][0].dtype == torch.float64
    with pytest.raises(InputError, match="has no array"):
        load_tensors(tmp_path / "arrays.npz", keys=["y"])
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="unpickling"):
        load_tensors(tmp_path / "obj.npy")
    with pytest.raises(InputError, match="no such file"):
        load_tensors(tmp_path / "missing.npz")
    (tmp_path / "table.csv").write_text("1,2\n")
    with pytest.raises(InputError, match="unsupported"):
        load_tensors(tmp_path / "table.csv")
