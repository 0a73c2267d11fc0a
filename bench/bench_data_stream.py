"""Peak memory of ``bnfold optimize`` on calibration data as users hold it: N vs 10·N images (issue 26).

    .venv/bin/python bench/bench_data_stream.py [--small 2000] [--factor 10] [--work /tmp/bnfold-bench26]
                                                [--json out.json]

1. ``make_images``: writes ``n`` 32×32 RGB PNG images into ten class folders (``images_n/3/00042.png``): the
   scikit-learn digits shipped with bnfold (``bnfold/demo/digits.npz``, 8×8 gray), upscaled 4× (nearest), shifted
   by up to ±3 pixels and tinted per image, so that 20,000 images are 20,000 different files.
2. ``make_model``: a small CNN with BatchNorm (randomized statistics), exported with a dynamic batch to
   ``model.pt2`` (example batch 32, input 3×28×28).
3. For each case, ``bnfold optimize model.pt2 ... -o out --target none`` (recalibrate on every image, fold,
   export ONNX, ONNX Runtime parity; TVM skipped: compilation time does not depend on the data) runs as a child
   of a one-child wrapper process whose ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is the child's peak RSS:

   * ``folder``: ``--data images_n/ --preprocess resize=32,crop=28,mean=0.5,std=0.25``;
   * ``factory``: ``--data-factory bench_data_factory:loader --data-kwargs '{"root": "images_n", ...}'`` (a
     ``torch.utils.data.DataLoader`` over the same PNG files, decoded and cropped by the user's Dataset);
   * ``validate``: ``folder`` plus ``--validate images_n/``: the parity checks of every stage on every image
     (re-read by each run);
   * ``npy``: the same images preprocessed into one ``(n, 3, 28, 28)`` float32 ``calib_n.npy`` (memory-mapped);
   * ``npz``: the same array in ``calib_n.npz``, which cannot be read in parts: the control, whose peak must grow
     by about the array's size (20,000 images: 179 MiB) — the measurement can see growth.

   The report is the peak RSS for N and 10·N and their ratio (acceptance: within 10%), plus the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` PNG images in class folders (module docstring); kept when the folder already holds ``n``."""
    from PIL import Image

    from bnfold.demo.data import load_digits

    done = folder / ".complete"
    if done.exists() and done.read_text() == str(n):
        return
    d = load_digits()  # (N, 1, 8, 8) float in [0, 1], labels
    digits = (np.concatenate([d.x_train.numpy(), d.x_test.numpy()])[:, 0] * 255).astype(np.uint8)
    labels = np.concatenate([d.y_train.numpy(), d.y_test.numpy()])
    rng = np.random.default_rng(seed)
    for c in range(10):
        (folder / str(c)).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        k = i % len(digits)
        big = np.kron(digits[k], np.ones((4, 4), np.uint8))  # 32×32
        big = np.roll(big, tuple(rng.integers(-3, 4, 2)), axis=(0, 1))
        tint = rng.uniform(0.5, 1.0, 3)
        rgb = (big[..., None] * tint).astype(np.uint8)
        Image.fromarray(rgb).save(folder / str(int(labels[k])) / f"{i:05d}.png")
    done.write_text(str(n))


def make_arrays(work: Path, n: int) -> None:
    """``calib_n.npy`` / ``calib_n.npz``: the images of ``images_n`` as bnfold's folder reader makes them."""
    if (work / f"calib_{n}.npz").exists():
        return
    import torch

    from bnfold.io.images import ImageFolder, Preprocess

    folder = ImageFolder(work / f"images_{n}", batch_size=500, size=(3, 28, 28),
                         preprocess=Preprocess.parse("resize=32,crop=28,mean=0.5,std=0.25"))
    x = torch.cat([b[0] for b in folder]).numpy()
    np.save(work / f"calib_{n}.npy", x)
    np.savez(work / f"calib_{n}.npz", x=x)


def make_model(path: Path) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(32, 3, 28, 28)
    ep = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    torch.export.save(ep, str(path))


def peak_rss(argv: list[str], env: dict[str, str]) -> tuple[int, float, int]:
    """Run ``argv`` as the only child of a fresh wrapper; (peak RSS of the child in bytes, seconds, exit code)."""
    wrapper = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
               "rc = subprocess.run(sys.argv[1:]).returncode; "
               "print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
               "time.perf_counter() - t, rc]))")
    out = subprocess.run([sys.executable, "-c", wrapper, *argv], env=env, capture_output=True, text=True)
    try:
        kib, seconds, rc = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise SystemExit(f"wrapper failed: {out.stderr[-2000:]}") from exc
    if rc != 0:
        print(out.stderr[-3000:], file=sys.stderr)
    return int(kib) * 1024, float(seconds), int(rc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bnfold-bench26"))
    ap.add_argument("--cases", default="folder,factory,validate,npy,npz")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sizes = [args.small, args.small * args.factor]
    for n in sizes:
        t = time.perf_counter()
        make_images(args.work / f"images_{n}", n)
        print(f"images_{n}: ready ({time.perf_counter() - t:.1f}s)", flush=True)
    for n in sizes:
        make_arrays(args.work, n)
    model = args.work / "model.pt2"
    if not model.exists():
        make_model(model)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE),
                                                       os.environ.get("PYTHONPATH", "")]))
    rows = []
    for case in args.cases.split(","):
        for n in sizes:
            images = args.work / f"images_{n}"
            out = args.work / f"out_{case}_{n}"
            argv = [sys.executable, "-m", "bnfold.cli", "optimize", str(model), "-o", str(out), "--force",
                    "--target", "none", "--batch-size", "32"]
            if case in ("folder", "validate"):
                argv += ["--data", str(images), "--preprocess", "resize=32,crop=28,mean=0.5,std=0.25"]
                argv += ["--validate", str(images)] if case == "validate" else []
            elif case in ("npy", "npz"):
                argv += ["--data", str(args.work / f"calib_{n}.{case}")]
            else:
                argv += ["--data-factory", "bench_data_factory:loader", "--data-kwargs",
                         json.dumps({"root": str(images), "batch_size": 32})]
            rss, seconds, rc = peak_rss(argv, env)
            report = json.loads((out / "report.json").read_text()) if rc in (0, 1) else {}
            recal = report.get("recalibration") or {}
            stages = report.get("stages") or {}
            rows.append({"case": case, "images": n, "peak_rss_mib": round(rss / 2**20, 1), "seconds": round(seconds, 1),
                         "exit": rc, "samples": recal.get("samples"), "parity_samples": stages.get("samples"),
                         "passed": report.get("passed")})
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"{'case':8} {'images':>7} {'peak RSS MiB':>13} {'s':>7} {'calib':>7} {'parity':>7} exit")
    for r in rows:
        print(f"{r['case']:8} {r['images']:>7} {r['peak_rss_mib']:>13} {r['seconds']:>7} {r['samples']!s:>7} "
              f"{r['parity_samples']!s:>7} {r['exit']}")
    for case in args.cases.split(","):
        small, big = (next(r for r in rows if r["case"] == case and r["images"] == n) for n in sizes)
        print(f"{case}: peak RSS {big['images']} / {small['images']} images = "
              f"{big['peak_rss_mib'] / small['peak_rss_mib']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"(resource: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} KiB this process)")


if __name__ == "__main__":
    main()
