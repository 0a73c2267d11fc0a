"""The example report under docs/: a real ``bnfold.optimize`` run on torchvision's ResNet-18 whose BatchNorm statistics
no longer describe the data (randomized, as after a domain shift), recalibrated on unlabeled data, folded, exported
to ONNX, compiled with TVM; then ``report.html`` screenshotted in headless Chromium.

    python bench/report_example.py [--out /tmp/bnfold-report-example] [--screenshot docs/report.png]

The latency figures in it are measured on whatever host runs this (docs/report.png: a loaded 2-core machine).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torchvision

import bnfold

ROOT = Path(__file__).resolve().parents[1]


def shifted_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every BatchNorm's running statistics replaced by random ones: the state a model is in when the deployment
    data differs from what the statistics were measured on."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.empty(m.num_features).uniform_(0.3, 3.0, generator=g))
            m.weight.data.copy_(torch.empty(m.num_features).uniform_(0.5, 1.5, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bnfold-report-example")
    ap.add_argument("--screenshot", type=Path, default=ROOT / "docs" / "report.png")
    ap.add_argument("--size", type=int, default=64, help="input height and width")
    ap.add_argument("--no-tvm", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = shifted_bn(torchvision.models.resnet18(num_classes=10))
    g = torch.Generator().manual_seed(1)
    calibration = [(torch.randn(16, 3, args.size, args.size, generator=g),) for _ in range(8)]
    validation = [(torch.randn(16, 3, args.size, args.size, generator=g),) for _ in range(2)]
    if args.out.exists():
        shutil.rmtree(args.out)
    result = bnfold.optimize(model, (validation[0][0][:8],), args.out, calibration=calibration,
                             validation=validation, tvm_target=None if args.no_tvm else "llvm")
    print(result)
    page = args.out / "report.html"
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if chromium is None:
        print("no chromium: no screenshot", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bnfold-chromium-") as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--hide-scrollbars", f"--screenshot={args.screenshot.resolve()}",
                        "--window-size=1280,2000", page.resolve().as_uri()], check=True, capture_output=True)
    print(f"wrote {args.screenshot}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
