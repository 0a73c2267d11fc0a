"""A folder of images as calibration or validation batches: :class:`ImageFolder`, :class:`Preprocess`.

Every ``.jpg``/``.jpeg``/``.png``/``.webp`` file under the folder (class sub-folders at any depth; sorted by its
path as a string, so the order is the same on every run; hidden files and other files are skipped) is decoded with
``torchvision.io.decode_image``, preprocessed and stacked, ``batch_size`` files a batch. Only the files of the
current batch are in memory: the folder is listed once, then read batch by batch on every pass.

Preprocessing (:meth:`Preprocess.parse`, the ``--preprocess`` option) on a ``uint8`` image ``x`` of ``C×H×W``::

    resize=S     shorter side to S, aspect kept (antialiased bilinear);  resize=HxW: exactly H×W
    crop=S       centre crop S×S (crop=HxW: H×W); a crop larger than the image is an error
    x ← x / 255  always: pixels in [0, 1]
    mean=m, std=s   x ← (x − m) / s per channel (one value, or one per channel separated by '/')

``imagenet`` is ``resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225``; a name may be followed
by overrides (``imagenet,crop=192``). Without ``--preprocess`` an image is only scaled to [0, 1].

Channels: the model's input ``(N, C, H, W)`` decides. A grayscale image for a 3-channel model is repeated into
three channels (exact: R = G = B); an alpha channel is dropped; a colour image for a 1-channel model is an error
unless ``color=gray`` asks for the conversion (ITU-R 601 luma, ``0.299 R + 0.587 G + 0.114 B``, as
``torchvision``'s ``rgb_to_grayscale``), since which weighting the model was trained on is not knowable here.
The size after preprocessing must be the model's ``H×W`` where the model fixes it (else every image must have
the size of the first): an image of another size is an error naming the file, never silently resized.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bnfold.errors import DataError, InputError

__all__ = ["IMAGE_SUFFIXES", "PRESETS", "ImageFolder", "Preprocess", "list_images"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_LUMA = (0.299, 0.587, 0.114)
_KEYS = ("resize", "crop", "mean", "std", "color")
_HINT = ("write it like --preprocess imagenet, --preprocess resize=32,crop=28,mean=0.5,std=0.25 or "
         "--preprocess imagenet,crop=192 (per-channel values separated by '/': mean=0.485/0.456/0.406)")


@dataclass(frozen=True)
class Preprocess:
    """What is done to each decoded image (module docstring). ``resize``: an int (shorter side) or ``(H, W)``;
    ``crop``: ``(H, W)``; ``mean``/``std``: one value or one per channel; ``color``: ``"gray"`` converts colour
    images for a 1-channel model."""

    resize: int | tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    color: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> Preprocess:
        """``--preprocess`` text → :class:`Preprocess` (a preset name, then ``key=value`` overrides)."""
        if text is None or not text.strip():
            return cls()
        out = cls()
        for k, item in enumerate(p.strip() for p in text.split(",")):
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            if not sep:
                if k == 0 and key in PRESETS:
                    out = PRESETS[key]
                    continue
                raise InputError(f"--preprocess: {item!r} is neither a preset ({', '.join(PRESETS)}, first only) "
                                 "nor key=value", hint=_HINT)
            if key not in _KEYS:
                raise InputError(f"--preprocess: unknown key {key!r}", hint=f"valid keys: {', '.join(_KEYS)}")
            out = replace(out, **{key: _value(key, value.strip())})
        if (out.mean is None) != (out.std is None):
            raise InputError("--preprocess: mean and std go together", hint=_HINT)
        return out

    def describe(self) -> str:
        parts = [f"resize={_size_text(self.resize)}" if self.resize is not None else "",
                 f"crop={_size_text(self.crop)}" if self.crop is not None else "",
                 f"mean={'/'.join(f'{v:g}' for v in self.mean)}" if self.mean is not None else "",
                 f"std={'/'.join(f'{v:g}' for v in self.std)}" if self.std is not None else "",
                 f"color={self.color}" if self.color else ""]
        return ",".join(p for p in parts if p) or "none (pixels scaled to [0, 1])"

    def check_channels(self, channels: int) -> None:
        """Per-channel ``mean``/``std`` fit a ``channels``-channel input."""
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) not in (1, channels):
                raise InputError(f"--preprocess {name} has {len(values)} values but the model takes {channels} "
                                 "channel(s)", hint="give one value, or one per channel")

    def apply(self, image: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
        """``uint8`` ``C×H×W`` → ``dtype`` ``C×H'×W'`` (module docstring); ``where`` names the file in errors."""
        from torchvision.transforms.v2 import functional as F

        if self.resize is not None:
            size = [self.resize] if isinstance(self.resize, int) else list(self.resize)
            image = F.resize(image, size, antialias=True)
        if self.crop is not None:
            h, w = image.shape[-2:]
            if self.crop[0] > h or self.crop[1] > w:
                raise DataError(f"{where} is {h}x{w} (after resize), smaller than the crop "
                                 f"{_size_text(self.crop)}", hint="resize it first: --preprocess resize=...,crop=...")
            image = F.center_crop(image, list(self.crop))
        x = image.to(torch.float32 if dtype == torch.float16 or dtype == torch.bfloat16 else dtype).div_(255.0)
        if self.mean is not None and self.std is not None:
            c = x.shape[0]
            mean = torch.tensor(self.mean, dtype=x.dtype).expand(c) if len(self.mean) == 1 else \
                torch.tensor(self.mean, dtype=x.dtype)
            std = torch.tensor(self.std, dtype=x.dtype).expand(c) if len(self.std) == 1 else \
                torch.tensor(self.std, dtype=x.dtype)
            x = x.sub_(mean[:, None, None]).div_(std[:, None, None])
        return x.to(dtype)


def _size_text(size: int | tuple[int, int] | None) -> str:
    if isinstance(size, tuple):
        return f"{size[0]}x{size[1]}"
    return str(size)


def _value(key: str, text: str) -> Any:
    try:
        if key == "color":
            if text.lower() not in ("gray", "rgb"):
                raise ValueError(text)
            return text.lower()
        if key in ("mean", "std"):
            values = tuple(float(v) for v in text.split("/"))
            if not all(math.isfinite(v) for v in values) or (key == "std" and any(v <= 0 for v in values)):
                raise ValueError(text)
            return values
        h, sep, w = text.lower().partition("x")
        dims = (int(h), int(w)) if sep else (int(h),)
        if any(d <= 0 for d in dims):
            raise ValueError(text)
    except ValueError as exc:
        what = {"color": "gray or rgb", "mean": "numbers ('/' between channels)",
                "std": "positive numbers ('/' between channels)"}.get(key, "a positive size: S or HxW")
        raise InputError(f"--preprocess {key}={text!r}: expected {what}", hint=_HINT) from exc
    if key == "crop":
        return dims if len(dims) == 2 else (dims[0], dims[0])
    return dims if len(dims) == 2 else dims[0]


PRESETS: dict[str, Preprocess] = {
    "imagenet": Preprocess(resize=256, crop=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "none": Preprocess(),
}


def list_images(folder: Path) -> list[str]:
    """The image files under ``folder`` (module docstring), sorted; an error naming the folder when none."""
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder" if not folder.exists() else f"{folder} is not a folder")
    found: list[str] = []
    others = 0
    for root, dirs, files in os.walk(folder, onerror=_walk_error):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_SUFFIXES):
                found.append(os.path.join(root, name))
            else:
                others += 1
    found.sort()
    if not found:
        raise InputError(f"{folder} holds no images ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files, in "
                         f"sub-folders too){f'; it has {others} other file(s)' if others else ''}",
                         hint="point --data at the folder of images, or at a .npz/.npy/.pt file")
    return found


def _walk_error(exc: OSError) -> None:
    raise InputError(f"{exc.filename}: cannot be listed: {exc.strerror}") from exc


def _channel_count(spec_channels: int | None, image_channels: int, color: str | None) -> int:
    if spec_channels is not None:
        return spec_channels
    if color == "gray":
        return 1
    return 3 if color == "rgb" else (1 if image_channels <= 2 else 3)


class ImageFolder:
    """The images under ``folder`` as batches of one ``(N, C, H, W)`` tensor (module docstring), re-read on every
    iteration. ``size``: the model's ``(C, H, W)`` (``None`` where it does not fix one)."""

    def __init__(self, folder: str | os.PathLike[str], *, batch_size: int, preprocess: Preprocess | None = None,
                 size: Sequence[int | None] = (None, None, None), dtype: torch.dtype = torch.float32) -> None:
        try:
            import torchvision.io  # noqa: F401
        except ImportError as exc:
            raise InputError("reading a folder of images needs torchvision",
                             hint="pip install 'bnfold[images]' (or torchvision)") from exc
        if batch_size <= 0:
            raise InputError(f"batch size must be positive, got {batch_size}")
        self.folder = Path(folder)
        self.files = list_images(self.folder)
        self.batch_size = batch_size
        self.preprocess = preprocess or Preprocess()
        self.channels, self.height, self.width = (*size, None, None, None)[:3]
        if self.channels not in (None, 1, 3):
            raise InputError(f"{self.folder}: images have 1 or 3 channels but the model takes {self.channels}")
        if self.channels is not None:
            self.preprocess.check_channels(self.channels)
        if self.channels == 3 and self.preprocess.color == "gray":
            raise InputError("--preprocess color=gray converts images for a 1-channel model; this model takes 3")
        self.dtype = dtype
        self.source = str(self.folder)

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.batch_size)

    @property
    def samples(self) -> int:
        return len(self.files)

    def files_of(self, k: int) -> list[str]:
        return self.files[k * self.batch_size:(k + 1) * self.batch_size]

    def describe_batch(self, k: int) -> str:
        """Batch ``k`` named by its files (for messages)."""
        files = self.files_of(k)
        span = files[0] if len(files) == 1 else f"{files[0]} … {files[-1]}"
        return f"{self.source}, batch {k} ({span})"

    def __iter__(self) -> Iterator[tuple[torch.Tensor]]:
        shape: tuple[int, ...] | None = None
        first = ""
        for k in range(len(self)):
            images = []
            for path in self.files_of(k):
                x = self._load(path)
                if shape is None:
                    shape, first = tuple(x.shape), path
                elif tuple(x.shape) != shape:
                    raise DataError(f"{path} is {_hw(x)} after preprocessing ({self.preprocess.describe()}) but "
                                     f"{first} is {shape[1]}x{shape[2]}: images of different sizes cannot be batched",
                                     hint="pass --preprocess resize=...,crop=... to bring them to one size")
                images.append(x)
            yield (torch.stack(images),)

    def _load(self, path: str) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_image

        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise DataError(f"{path} cannot be read: {exc.strerror or exc}") from exc
        try:
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
                warnings.simplefilter("ignore", DeprecationWarning)
                image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else
                                     torch.empty(0, dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
        except (RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise DataError(f"{path} is not a readable image (JPEG/PNG/WebP): {first.split(', ')[-1]}",
                             hint="remove or replace the file; bnfold never changes your data") from exc
        image = self._convert(image, path)
        x = self.preprocess.apply(image, self.dtype, path)
        if (self.height is not None and x.shape[1] != self.height) or (self.width is not None
                                                                       and x.shape[2] != self.width):
            want = f"{self.height or 'H'}x{self.width or 'W'}"
            how = f"after --preprocess {self.preprocess.describe()}" if self.preprocess != Preprocess() else \
                "and no --preprocess resizes it"
            raise DataError(f"{path} is {_hw(x)} {how}, but the model takes {want} images",
                             hint=f"pass --preprocess resize=...,crop={want} (e.g. --preprocess "
                                  f"resize={self.height or 224},crop={want})")
        return x

    def _convert(self, image: torch.Tensor, path: str) -> torch.Tensor:
        """Gray (+alpha) / RGB(A) → the model's channel count (module docstring)."""
        gray = image.shape[0] <= 2
        image = image[:1] if gray else image[:3]
        want = _channel_count(self.channels, image.shape[0], self.preprocess.color)
        if self.channels is None:  # the model does not say: the first image decides for all
            self.channels = want
        if want == 3 and gray:
            return image.expand(3, -1, -1)
        if want == 1 and not gray:
            if self.preprocess.color != "gray":
                raise DataError(f"{path} is a colour image but the model takes 1-channel (grayscale) input",
                                 hint="convert the images to grayscale, or pass --preprocess color=gray to let "
                                      "bnfold convert them (0.299 R + 0.587 G + 0.114 B)")
            weights = torch.tensor(_LUMA, dtype=torch.float32)[:, None, None]
            return (image.float() * weights).sum(0, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
        return image


def _hw(x: torch.Tensor) -> str:
    return f"{x.shape[-2]}x{x.shape[-1]}"
