"""Fold the torchvision zoo in both capture modes and print the table for BENCHMARKS.md.

    .venv/bin/python bench/zoo.py [--models resnet18,densenet121]

    .venv/bin/python bench/zoo.py --seeds 3     # the ratio over several seeds (median per model)

Columns: BNs in the model, BNs torch.fx.experimental.optimization.fuse leaves, BNs bnfold leaves, the
rel-L2 error ratio vs a float64 reference (folded fp32 / original fp32: one sample of rounding noise, the goal
is a median ≤ 1.0), the verdict of the float64 parity rule (``bnfold.parity.Tolerance``, required), fold time,
and why BNs were left. The last line gives the median and worst ratio over all rows.
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
    ap.add_argument("--seeds", type=int, default=1, help="seeds per model (weights, statistics, input)")
    args = ap.parse_args()
    names = args.models.split(",") if args.models else list(ZOO)
    rows, all_ratios = [], []
    for n in names:
        for c in ("symbolic", "export"):
            runs = [run_model(n, c, seed) for seed in range(args.seeds)]
            all_ratios += [r.ratio for r in runs]
            row = runs[0]
            row.ratio = statistics.median(r.ratio for r in runs)
            row.passed = all(r.passed for r in runs)
            rows.append(row)
    print(format_rows(rows))
    print(f"\nmodels: {len(names)}, seeds: {args.seeds}; error ratio folded/original over all runs: median "
          f"{statistics.median(all_ratios):.3f} (goal ≤ 1.0), worst {max(all_ratios):.3f}; float64 parity rule "
          f"holds everywhere: {all(r.passed for r in rows)}")


if __name__ == "__main__":
    main()
