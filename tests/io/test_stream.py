"""bnfold.io.stream: data streamed from memory-mapped .npy files, factories and image folders, checked per batch."""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import as_batch, randomize_bn, write_images
from torch import nn

from bnfold.errors import InputError
from bnfold.io.data_checks import InputSpec
from bnfold.io.images import ImageFolder
from bnfold.io.stream import CheckedData, Factory, NpyFile

pytest.importorskip("torchvision")


# ------------------------------------------------------------------------------------------------------ .npy


def test_npy_is_memory_mapped_and_copied_per_batch(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((37, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    before = (tmp_path / "x.npy").read_bytes()
    src = NpyFile(tmp_path / "x.npy", batch_size=10)
    batches = [b[0] for b in src]
    assert len(src) == 4 and [b.shape[0] for b in batches] == [10, 10, 10, 7]
    torch.testing.assert_close(torch.cat(batches), torch.from_numpy(x), rtol=0, atol=0)
    batches[0].add_(1.0)  # the batch owns its memory: the file is untouched
    assert (tmp_path / "x.npy").read_bytes() == before
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="cannot be memory-mapped"):
        NpyFile(tmp_path / "o.npy", batch_size=2)


# ------------------------------------------------------------------------------------------------- factories


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "userdata_bnfold_test.py").write_text('''
import torch
CALLS = []

def loader(n=4, size=2):
    CALLS.append(n)
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.zeros(size)) for _ in range(n)]

def stream(n=4):
    for k in range(n):
        yield torch.full((2, 3, 8, 8), float(k))

def raises():
    raise FileNotFoundError("/data/val does not exist")

def strings():
    return ["a", "b"]

def late_failure():
    yield torch.zeros(2, 3, 8, 8)
    raise KeyError("sample 17")

def nan_at_two():
    for k in range(4):
        t = torch.zeros(2, 3, 8, 8)
        if k == 2:
            t[1, 0, 0, 0] = float("nan")
        yield t

not_callable = 3
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userdata_bnfold_test"
    sys.modules.pop("userdata_bnfold_test", None)


def test_factory_called_once_per_pass(factory_module: str) -> None:
    src = Factory(f"{factory_module}:loader", {"n": 3}, keys=["0"])
    mod = sys.modules[factory_module]
    with pytest.raises(TypeError):
        len(src)  # unknown until the factory ran
    first = [b for b in src]
    assert len(first) == 3 and all(len(b) == 1 and b[0].shape == (2, 3, 8, 8) for b in first)
    assert len(src) == 3 and mod.CALLS == [3]
    second = [b for b in src]
    assert mod.CALLS == [3, 3]
    torch.testing.assert_close(torch.cat([b[0] for b in first]), torch.cat([b[0] for b in second]))


@pytest.mark.parametrize(("spec", "fragment"), [
    ("no_such_module_bnfold:loader", "importing 'no_such_module_bnfold' failed"),
    ("{m}:missing", "has no attribute 'missing'"),
    ("{m}:not_callable", "is a int, not a callable"),
    ("{m}", "is not 'package.module:callable'"),
    ("{m}:raises", "raised FileNotFoundError: /data/val does not exist"),
    ("{m}:strings", "batch 0 is a str, not a tensor"),
    ("{m}:late_failure", "failed while producing batch 1: KeyError"),
])
def test_factory_errors(factory_module: str, spec: str, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        list(Factory(spec.format(m=factory_module)))


def test_checked_data_names_the_batch(factory_module: str) -> None:
    data = CheckedData(Factory(f"{factory_module}:nan_at_two"), specs=[InputSpec((None, 3, 8, 8), torch.float32)])
    with pytest.raises(InputError, match=r"nan_at_two, batch 2, input 0, sample 1 holds NaN"):
        list(data)
    pairs = CheckedData(Factory(f"{factory_module}:loader"), specs=[InputSpec((None, 3, 8, 8), torch.float32)])
    with pytest.raises(InputError, match="batch 0 gives 2 input tensor"):
        list(pairs)


def test_rechunk_and_limits(factory_module: str) -> None:
    spec = f"{factory_module}:stream"
    exact = list(CheckedData(Factory(spec, {"n": 5}), exact=3))  # 10 samples → 3 + 3 + 3, one dropped
    assert [b[0].shape[0] for b in exact] == [3, 3, 3]
    torch.testing.assert_close(torch.cat([b[0] for b in exact])[:, 0, 0, 0],
                               torch.tensor([0., 0., 1., 1., 2., 2., 3., 3., 4.]))
    with pytest.raises(InputError, match=r"fewer samples \(2\) than the batch size 3 the model runs with"):
        list(CheckedData(Factory(spec, {"n": 1}), exact=3))
    kept = list(CheckedData(Factory(spec, {"n": 5}), exact=3, keep_last=True))  # a dynamic batch: nothing dropped
    assert [b[0].shape[0] for b in kept] == [3, 3, 3, 1]
    cut = list(CheckedData(Factory(spec), num_samples=5))
    assert [b[0].shape[0] for b in cut] == [2, 2, 1]
    assert len(list(CheckedData(Factory(spec), num_batches=2))) == 2


def test_a_pass_holds_one_batch(factory_module: str) -> None:
    """Streaming: when batch k+1 arrives, batch k (and what it was made from) is already freed."""
    alive: list[weakref.ref[torch.Tensor]] = []
    data = CheckedData(Factory(f"{factory_module}:stream", {"n": 6}), dtype=torch.float64,
                       specs=[InputSpec((None, 3, 8, 8), torch.float64)])
    most = 0
    for (t,) in data:
        alive.append(weakref.ref(t))
        del t  # CPython frees it here if nothing else holds it
        most = max(most, sum(r() is not None for r in alive))
    assert most <= 1


def test_recalibrate_streams_an_image_folder(tmp_path: Path) -> None:
    """bnfold.recalibrate on an ImageFolder gives the statistics of the same pixels passed as one tensor."""
    from bnfold.recalibration.core import recalibrate

    pixels = write_images(tmp_path, 10, gray_every=3)
    net = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1),
                                     nn.BatchNorm2d(2))).eval()
    a, b = net, __import__("copy").deepcopy(net)
    recalibrate(a, ImageFolder(tmp_path, batch_size=4, size=(3, 8, 8)), progress=False)
    recalibrate(b, as_batch(pixels).split(4), progress=False)
    for (name, t), (_, u) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(t, u, rtol=0, atol=0, msg=name)
