"""Fuzz the folds: generate random valid models and check every fold property on each (long profile).

    .venv/bin/python bench/fuzz_folds.py --models 20000 --seed 0 [--captures symbolic,export] [--log fails.txt]
    .venv/bin/python bench/fuzz_folds.py --profile onnx --models 5000 --seed 100000

``--profile torch`` (default): models from ``tests/fuzz/modelgen.py`` (seeds ``seed .. seed+models-1``), folded by
``bnfold.fold`` in each capture mode, the properties in ``tests/fuzz/foldcheck.py``. ``--profile onnx``: the same
models written as ONNX graphs (``tests/fuzz/onnxgen.py``), folded by ``bnfold fold model.onnx`` (the CLI, in
process), the properties in ``tests/fuzz/onnxcheck.py``. Prints progress, every failure (seed, capture, what broke,
the model) and a summary line with the count and models per second (also when stopped early: SIGINT or SIGTERM).
Exit 1 when anything failed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fuzz"))

import torch
from foldcheck import check_fold
from modelgen import make_case
from onnxcheck import check_onnx_fold
from onnxgen import make_onnx_case


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=1000, help="how many models to generate")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--profile", choices=["torch", "onnx"], default="torch",
                    help="torch: bnfold.fold on the torch models; onnx: bnfold fold on them written as ONNX graphs")
    ap.add_argument("--captures", default="symbolic,export", help="capture modes to check each model in (torch)")
    ap.add_argument("--log", help="also append failures to this file")
    ap.add_argument("--every", type=int, default=500, help="progress line every N models")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    # stop cleanly on SIGTERM and SIGINT (a background job starts with SIGINT ignored) with the summary line
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.default_int_handler)
    captures = args.captures.split(",") if args.profile == "torch" else ["onnx"]
    failures = done = 0
    start = time.perf_counter()
    try:
        for seed in range(args.seed, args.seed + args.models):
            failures += _one(seed, captures, args.log) if args.profile == "torch" else _one_onnx(seed, args.log)
            done += 1
            if done % args.every == 0:
                rate = done / (time.perf_counter() - start)
                print(f"  {done} models (last seed {seed}), {failures} failures, {rate:.2f} models/s", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    elapsed = time.perf_counter() - start
    print(f"fuzz ({args.profile}): {done} models (seeds {args.seed}..{args.seed + done - 1}) x {len(captures)} "
          f"{'captures' if args.profile == 'torch' else 'profile'}: "
          f"{failures} failures in {elapsed:.0f} s ({done / max(elapsed, 1e-9):.2f} models/s)", flush=True)
    return 1 if failures else 0


def _one(seed: int, captures: list[str], log: str | None) -> int:
    """Check one generated model in every capture mode; return the number of failures."""
    failures = 0
    case = make_case(seed)
    for capture in captures:
        problem = check_fold(case.model, case.inputs, capture, case.check_inputs)
        if problem:
            failures += 1
            line = f"FAIL seed={seed} capture={capture}: {problem}\n  model: {case.description}"
            print(line, flush=True)
            if log:
                with open(log, "a") as f:
                    f.write(line + "\n")
    return failures


def _one_onnx(seed: int, log: str | None) -> int:
    """Check one generated ONNX model; return the number of failures (0 or 1)."""
    case = make_onnx_case(seed)
    problem = check_onnx_fold(case)
    if not problem:
        return 0
    line = f"FAIL seed={seed} onnx: {problem}\n  model: {case.description}"
    print(line, flush=True)
    if log:
        with open(log, "a") as f:
            f.write(line + "\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
