"""bnfold.io.images: image folders decoded with torchvision.io, --preprocess, channels and sizes checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import as_batch, write_images
from PIL import Image

from bnfold.errors import InputError
from bnfold.io.data_checks import InputSpec
from bnfold.io.images import PRESETS, ImageFolder, Preprocess
from bnfold.io.stream import open_data

pytest.importorskip("torchvision")


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
