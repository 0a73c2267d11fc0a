"""Fold the torchvision zoo in both capture modes and print the table for BENCHMARKS.md.

    .venv/bin/python bench/zoo.py [--models resnet18,densenet121]

Columns: BNs in the model, BNs torch.fx.experimental.optimization.fuse leaves, BNs bnfold leaves, the
rel-L2 error ratio vs a float64 reference (folded fp32 / original fp32; ≤ 1.25 required, goal ≤ 1.0),
fold time, and why BNs were left.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from zoo import ZOO, format_rows, run_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", help="comma-separated subset of: " + ", ".join(ZOO))
    args = ap.parse_args()
    names = args.models.split(",") if args.models else list(ZOO)
    rows = [run_model(n, c) for n in names for c in ("symbolic", "export")]
    print(format_rows(rows))
    ratios = [r.ratio for r in rows]
    print(f"\nmodels: {len(names)}; median ratio {statistics.median(ratios):.3f}; max {max(ratios):.3f}; "
          f"all within 1.25x: {all(r.passed for r in rows)}")


if __name__ == "__main__":
    main()
