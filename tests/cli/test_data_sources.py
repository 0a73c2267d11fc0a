"""Data as users hold it, through every command that takes --data / --validate (issue 26): a folder of images with
--preprocess, --data-factory, a memory-mapped .npy; and the hostile versions of each (exit 2, the file or batch
named, the user's files unchanged, nothing written)."""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import randomize_bn
from PIL import Image
from torch import nn

from bnfold.cli import main

pytest.importorskip("torchvision")
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


class _Net(nn.Module):
    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


FACTORY = '''
import torch

def loader(n=6, size=4, labels=False):
    g = torch.Generator().manual_seed(1)
    out = [torch.rand(size, 3, 8, 8, generator=g) for _ in range(n)]
    return [(x, torch.zeros(size)) for x in out] if labels else out

def raises():
    raise RuntimeError("cannot open /data/calib")

def words():
    return iter(["not", "tensors"])

def late(n=5):
    for k in range(n):
        if k == 3:
            raise OSError("disk read error in shard 3")
        yield torch.rand(4, 3, 8, 8)
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data26")
    f: dict[str, Path] = {}
    for name, channels in (("model.pt2", 3), ("gray.pt2", 1)):
        net = randomize_bn(_Net(channels)).eval()
        ep = torch.export.export(net, (torch.randn(2, channels, 8, 8),),
                                 dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
        torch.export.save(ep, str(d / name))
        f[name] = d / name
        torch.save(net, d / f"{name}.module.pt")  # the module, for reference computations
    rng = np.random.default_rng(0)
    for i in range(24):  # 8x8 RGB and gray PNGs in class folders
        sub = d / "images" / f"c{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(arr[..., 0] if i % 5 == 0 else arr).save(sub / f"{i:02d}.png")
    for i in range(6):  # 12x10: preprocessing must bring them to 8x8
        (d / "big" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(d / "big" / "a" / f"{i}.jpg")
    (d / "corrupt").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / "corrupt" / f"{i}.png")
    (d / "corrupt" / "3.png").write_bytes((d / "corrupt" / "0.png").read_bytes()[:60])  # truncated
    (d / "odd").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "odd" / "a.png")
    Image.fromarray(np.zeros((8, 9, 3), np.uint8)).save(d / "odd" / "b.png")
    (d / "noimages" / "sub").mkdir(parents=True)
    (d / "noimages" / "sub" / "labels.csv").write_text("a,1\n")
    np.save(d / "calib.npy", rng.standard_normal((40, 3, 8, 8)).astype(np.float32))
    (d / "userdata26.py").write_text(FACTORY)
    f.update({k: d / k for k in ("images", "big", "corrupt", "odd", "noimages", "calib.npy")})
    f["dir"] = d
    return f


@pytest.fixture
def on_path(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(files["dir"]))
    yield
    sys.modules.pop("userdata26", None)


def _sums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _pixels(folder: Path) -> torch.Tensor:
    """The images of ``folder`` read with PIL (independently of bnfold), gray repeated to RGB, in path order."""
    arrays = []
    for p in sorted(str(q) for q in folder.rglob("*.png")):
        a = np.asarray(Image.open(p).convert("RGB"))
        arrays.append(a)
    return (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255).contiguous()


def test_recalibrate_on_an_image_folder(files: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The recalibrated statistics are those of the same pixels read by PIL and passed as tensors."""
    from bnfold.recalibration.core import recalibrate

    before = _sums(files["dir"])
    code, out, err = _run(["recalibrate", str(files["model.pt2"]), "--data", str(files["images"]), "--batch-size",
                           "10", "-o", str(tmp_path / "r.pt2"), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["samples"] == 24
    got = torch.export.load(str(tmp_path / "r.pt2")).module()
    ref = copy.deepcopy(torch.export.load(str(files["model.pt2"])).module())
    recalibrate(ref, _pixels(files["images"]).split(10), progress=False)
    got_state, ref_state = got.state_dict(), ref.state_dict()
    for name in ("bn.running_mean", "bn.running_var"):
        torch.testing.assert_close(got_state[name], ref_state[name], rtol=0, atol=0)
    assert _sums(files["dir"]) == before


def test_diagnose_and_check_on_images_and_npy(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["diagnose", str(files["model.pt2"]), "--data", str(files["big"]), "--preprocess",
                           "resize=8,crop=8,mean=0.5,std=0.25", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["samples"] == 6
    code, out, err = _run(["diagnose", str(files["model.pt2"]), "--data", str(files["calib.npy"]), "--batch-size",
                           "16", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["samples"] == 40 and json.loads(out)["batches"] == 3
    code, out, err = _run(["check", str(files["model.pt2"]), str(files["model.pt2"]), "--data",
                           str(files["images"]), "--no-localize"], capsys)
    assert code == 0, err
    assert "24 samples of your data" in out


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_optimize_on_images_and_factory(files: dict[str, Path], tmp_path: Path, on_path: None, capture: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    before = _sums(files["dir"])
    code, out, err = _run(["optimize", str(files["model.pt2"]), "--data", str(files["images"]), "--batch-size", "8",
                           "--capture", capture, "--target", "none", "--no-onnx", "-o", str(tmp_path / "a"),
                           "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["recalibration"]["samples"] == 24 and report["fold"]["folded"]
    code, out, err = _run(["optimize", str(files["model.pt2"]), "--data-factory", "userdata26:loader",
                           "--data-kwargs", '{"n": 5, "labels": true}', "--key", "0", "--capture", capture,
                           "--target", "none", "--no-onnx", "--num-samples", "18", "-o", str(tmp_path / "b"),
                           "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["recalibration"]["samples"] == 18  # --num-samples is applied by optimize too
    assert _sums(files["dir"]) == before


# id, command ({name}: a path of the fixture), fragment of the message
HOSTILE = [
    ("corrupt-image", "recalibrate {model.pt2} --data {corrupt} -o {out}/r.pt2 --batch-size 2",
     "corrupt/3.png is not a readable image"),
    ("wrong-size-no-preprocess", "diagnose {model.pt2} --data {big}",
     "is 12x10 and no --preprocess resizes it, but the model takes 8x8"),
    ("mixed-sizes", "optimize {model.pt2} --data {odd} -o {out}/o --target none", "odd/b.png is 8x9"),
    ("rgb-for-gray-model", "diagnose {gray.pt2} --data {images}",
     "is a colour image but the model takes 1-channel"),
    ("no-images", "check {model.pt2} {model.pt2} --data {noimages}", "holds no images"),
    ("factory-raises", "optimize {model.pt2} --data-factory userdata26:raises -o {out}/o --target none",
     "raised RuntimeError: cannot open /data/calib"),
    ("factory-non-tensors", "diagnose {model.pt2} --data-factory userdata26:words", "batch 0 is a str, not a tensor"),
    ("factory-labels", "recalibrate {model.pt2} --data-factory userdata26:loader --data-kwargs {kw} -o {out}/r.pt2",
     "gives 2 input tensor(s) but the model takes 1"),
    ("factory-missing-module", "quantize {model.pt2} --data-factory no_such_pkg_26.data:loader -o {out}/q",
     "importing 'no_such_pkg_26.data' failed"),
    ("factory-and-data", "diagnose {model.pt2} --data {images} --data-factory userdata26:loader", "not both"),
    ("preprocess-on-a-file", "diagnose {model.pt2} --data {calib.npy} --preprocess imagenet",
     "--preprocess applies to a folder of images"),
    ("preprocess-typo", "diagnose {model.pt2} --data {images} --preprocess resize=8,crop=8,men=0.5",
     "unknown key 'men'"),
    ("data-kwargs-alone", "diagnose {model.pt2} --data {images} --data-kwargs {kw}", "--data-kwargs needs"),
    ("no-data", "diagnose {model.pt2}", "needs data"),
    # found while streaming, after the first batch: the whole step stops (exit 2), no stage recorded as failed
    ("optimize-corrupt-calibration", "optimize {model.pt2} --data {corrupt} --batch-size 2 -o {out}/o --target none",
     "corrupt/3.png is not a readable image"),
    ("optimize-corrupt-validation", "optimize {model.pt2} --validate {corrupt} --batch-size 2 -o {out}/o "
     "--target none", "corrupt/3.png is not a readable image"),
    ("optimize-factory-fails-late", "optimize {model.pt2} --data-factory userdata26:late --validate {images} "
     "-o {out}/o --target none", "failed while producing batch 3: OSError: disk read error in shard 3"),
    ("check-corrupt-stream", "check {model.pt2} {model.pt2} --data {corrupt} --batch-size 2",
     "corrupt/3.png is not a readable image"),
    ("image-crop-too-big", "diagnose {model.pt2} --data {images} --preprocess crop=10", "smaller than the crop"),
]


@pytest.mark.parametrize("row", HOSTILE, ids=[r[0] for r in HOSTILE])
def test_hostile_data(row: tuple[str, str, str], files: dict[str, Path], tmp_path: Path, on_path: None,
                      capsys: pytest.CaptureFixture[str]) -> None:
    _, command, fragment = row
    before = _sums(files["dir"])
    argv = []
    for word in command.split():
        for name, path in files.items():
            word = word.replace("{" + name + "}", str(path))
        argv.append(word.replace("{out}", str(tmp_path)).replace("{kw}", '{"labels":true}'))
    code, _, err = _run(argv, capsys)
    assert code == 2, err
    assert fragment in err, err
    for wrong in ("Traceback", "internal error"):
        assert wrong not in err, err
    assert _sums(files["dir"]) == before  # the user's data is never changed
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())  # nothing written


def test_fixed_batch_model_on_images(files: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A .pt2 exported with a fixed batch of 5: the 24 images run as 4 batches of 5, the last 4 dropped (said)."""
    net = randomize_bn(_Net()).eval()
    torch.export.save(torch.export.export(net, (torch.randn(5, 3, 8, 8),)), str(tmp_path / "fixed.pt2"))
    code, out, err = _run(["diagnose", str(tmp_path / "fixed.pt2"), "--data", str(files["images"]), "--json"], capsys)
    assert code == 0, err
    assert (json.loads(out)["batches"], json.loads(out)["samples"]) == (4, 20)
    code, _, err = _run(["diagnose", str(tmp_path / "fixed.pt2"), "--data", str(files["images"]), "--batch-size",
                         "8"], capsys)
    assert code == 2 and "fixed batch size of 5" in err
