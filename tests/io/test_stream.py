"""bnfold.io.stream and bnfold.io.images: data streamed from image folders, factories and memory-mapped .npy."""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import randomize_bn
from PIL import Image
from torch import nn

from bnfold.errors import InputError
from bnfold.io.data_checks import InputSpec
from bnfold.io.images import PRESETS, ImageFolder, Preprocess
from bnfold.io.stream import CheckedData, Factory, NpyFile, open_data

pytest.importorskip("torchvision")


def write_images(folder: Path, n: int = 12, size: tuple[int, int] = (8, 8), *, gray_every: int = 0,
                 fmt: str = "png", seed: int = 0) -> list[np.ndarray]:
    """``n`` random images in two class folders; returns their pixels (H, W, 3) in the sorted order bnfold reads."""
    rng = np.random.default_rng(seed)
    pixels = []
    for i in range(n):
        sub = folder / f"class{i % 2}" / ("deep" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        gray = gray_every and i % gray_every == 0
        arr = rng.integers(0, 256, (*size, 1 if gray else 3), dtype=np.uint8)
        img = Image.fromarray(arr[..., 0] if gray else arr)
        img.save(sub / f"img{i:03d}.{fmt}")
        pixels.append((str(sub / f"img{i:03d}.{fmt}"), np.repeat(arr, 3, axis=2) if gray else arr))
    return [p for _, p in sorted(pixels, key=lambda t: t[0])]


def as_batch(pixels: list[np.ndarray]) -> torch.Tensor:
    return (torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255.0).contiguous()


# ------------------------------------------------------------------------------------------------ preprocess


def test_preprocess_parse_preset_and_overrides() -> None:
    assert Preprocess.parse("imagenet") == PRESETS["imagenet"]
    p = Preprocess.parse("imagenet,crop=192")
    assert p.crop == (192, 192) and p.resize == 256 and p.mean == (0.485, 0.456, 0.406)
    p = Preprocess.parse("resize=32x40,crop=28,mean=0.5,std=0.25,color=gray")
    assert (p.resize, p.crop, p.mean, p.std, p.color) == ((32, 40), (28, 28), (0.5,), (0.25,), "gray")
    assert Preprocess.parse(None) == Preprocess()


@pytest.mark.parametrize(("text", "fragment"), [
    ("imagenett", "neither a preset"),
    ("resize=32,scale=2", "unknown key 'scale'"),
    ("resize=0", "positive size"),
    ("crop=a", "positive size"),
    ("mean=0.5", "mean and std go together"),
    ("mean=0.5,std=0", "positive numbers"),
    ("mean=nan,std=1", "numbers"),
    ("color=sepia", "gray or rgb"),
    ("resize=8,imagenet", "first only"),
])
def test_preprocess_parse_errors(text: str, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        Preprocess.parse(text)


def test_preprocess_math() -> None:
    """(x/255 − m)/s per channel, after resize (shorter side) and centre crop."""
    img = torch.randint(0, 256, (3, 10, 20), dtype=torch.uint8)
    p = Preprocess(crop=(4, 6), mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    out = p.apply(img, torch.float64, "x.png")
    crop = img[:, 3:7, 7:13].double() / 255
    expected = (crop - torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)[:, None, None]) / torch.tensor(
        [0.5, 0.25, 2.0], dtype=torch.float64)[:, None, None]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
    assert Preprocess(resize=5).apply(img, torch.float32, "x").shape == (3, 5, 10)
    assert Preprocess(resize=(6, 7)).apply(img, torch.float32, "x").shape == (3, 6, 7)
    with pytest.raises(InputError, match=r"x.png is 10x20 .* smaller than the crop 12x12"):
        Preprocess(crop=(12, 12)).apply(img, torch.float32, "x.png")


# ---------------------------------------------------------------------------------------------- image folders


def test_image_folder_reads_nested_classes_exactly(tmp_path: Path) -> None:
    pixels = write_images(tmp_path, 12)
    (tmp_path / "README.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"junk")  # hidden files are skipped
    folder = ImageFolder(tmp_path, batch_size=5, size=(3, 8, 8))
    assert len(folder) == 3 and folder.samples == 12
    batches = [b[0] for b in folder]
    assert [b.shape[0] for b in batches] == [5, 5, 2]
    torch.testing.assert_close(torch.cat(batches), as_batch(pixels), rtol=0, atol=0)
    again = torch.cat([b[0] for b in folder])  # re-iterable: a second pass reads the same
    torch.testing.assert_close(again, as_batch(pixels), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_image_folder_other_formats(tmp_path: Path, fmt: str) -> None:
    write_images(tmp_path, 4, fmt=fmt)
    (batch,) = next(iter(ImageFolder(tmp_path, batch_size=4, size=(3, 8, 8))))
    assert batch.shape == (4, 3, 8, 8) and float(batch.min()) >= 0.0 and float(batch.max()) <= 1.0


def test_gray_images_become_three_equal_channels(tmp_path: Path) -> None:
    pixels = write_images(tmp_path, 6, gray_every=2)
    (batch,) = next(iter(ImageFolder(tmp_path, batch_size=6, size=(3, 8, 8))))
    torch.testing.assert_close(batch, as_batch(pixels), rtol=0, atol=0)


def test_colour_images_for_a_gray_model(tmp_path: Path) -> None:
    pixels = write_images(tmp_path, 3)
    with pytest.raises(InputError, match=r"img000.png is a colour image but the model takes 1-channel"):
        next(iter(ImageFolder(tmp_path, batch_size=3, size=(1, 8, 8))))
    (batch,) = next(iter(ImageFolder(tmp_path, batch_size=3, size=(1, 8, 8), preprocess=Preprocess(color="gray"))))
    rgb = torch.from_numpy(np.stack(pixels)).double()
    luma = (rgb @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)).round() / 255
    torch.testing.assert_close(batch[:, 0].double(), luma, rtol=0, atol=1e-7)


def test_wrong_size_names_the_file(tmp_path: Path) -> None:
    write_images(tmp_path, 3)
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(tmp_path / "class1" / "odd.png")
    with pytest.raises(InputError, match=r"odd.png is 9x8 and no --preprocess resizes it, but the model takes 8x8"):
        list(ImageFolder(tmp_path, batch_size=2, size=(3, 8, 8)))
    # a model without fixed sizes: the first image decides
    with pytest.raises(InputError, match=r"odd.png is 9x8 .* images of different sizes"):
        list(ImageFolder(tmp_path, batch_size=8, size=(3, None, None)))
    # resized and cropped to the model's size, every image fits
    out = list(ImageFolder(tmp_path, batch_size=8, size=(3, 8, 8), preprocess=Preprocess.parse("resize=8,crop=8")))
    assert out[0][0].shape == (4, 3, 8, 8)


def test_corrupt_and_empty(tmp_path: Path) -> None:
    write_images(tmp_path, 3)
    (tmp_path / "class0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InputError, match=r"broken.png is not a readable image"):
        list(ImageFolder(tmp_path, batch_size=2, size=(3, 8, 8)))
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"empty holds no images .* 1 other file"):
        ImageFolder(empty, batch_size=2)


def test_image_folder_refuses_models_it_cannot_feed(tmp_path: Path) -> None:
    write_images(tmp_path, 2)
    with pytest.raises(InputError, match=r"one floating-point \(N, C, H, W\) input"):
        open_data(tmp_path, specs=[InputSpec((None, 16), torch.float32)])
    with pytest.raises(InputError, match="mean has 2 values but the model takes 3"):
        open_data(tmp_path, specs=[InputSpec((None, 3, 8, 8), torch.float32)], preprocess="mean=0.1/0.2,std=1")


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
    from bnfold.recalibrate.core import recalibrate

    pixels = write_images(tmp_path, 10, gray_every=3)
    net = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1),
                                     nn.BatchNorm2d(2))).eval()
    a, b = net, __import__("copy").deepcopy(net)
    recalibrate(a, ImageFolder(tmp_path, batch_size=4, size=(3, 8, 8)), progress=False)
    recalibrate(b, as_batch(pixels).split(4), progress=False)
    for (name, t), (_, u) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(t, u, rtol=0, atol=0, msg=name)
