"""bnfold + TVM (tuned) against PyTorch eager (unfolded, folded) and ONNX Runtime: batch 1, fp32, 224×224.

    nohup nice -n 10 .venv/bin/python bench/bench_tvm.py --trials-per-kernel 32 \\
        --json bench/tvm_results.json > bench_tvm.log 2>&1 &

For each model (random weights, randomized BatchNorm statistics, seeded):

1. fold it with :func:`bnfold.fold`;
2. export the folded model to ONNX (``bnfold.targets.onnx`` when present, else ``torch.onnx.export``) and open an
   ONNX Runtime session;
3. ``bnfold.compile(folded, x, tune_trials=N)`` with a fresh tuning database (``--cache-dir``), ``N`` =
   ``--trials-per-kernel`` × the number of kernels (counted first with :func:`bnfold.targets.tvm.tuning_tasks`)
   or ``--trials model=N,...``; records the tuning time;
4. compiles again with the same database (the "second compile": nothing left to tune) and times it;
5. checks parity of the TVM artifact against the folded model (bnfold's fp64-reference rule);
6. times all engines on the same input in interleaved rounds (``--rounds`` × ``--per-round`` calls each, after a
   warm-up, and one untimed call at the start of each engine's turn), so a burst of load from other processes
   hits every engine alike; reports the median and the minimum per call.

Every engine gets the same thread budget: the usable cores (PyTorch ``set_num_threads``, ORT
``intra_op_num_threads``, TVM ``TVM_NUM_THREADS``). Results print as a Markdown table (paste into
BENCHMARKS.md) and, with ``--json``, as a JSON file.
"""

from __future__ import annotations

import os
import sys

# Idle worker threads: each engine as it ships. ORT spins briefly before sleeping (its default,
# session.intra_op.allow_spinning=1), TVM yields 1000 times (bnfold's default), OpenMP (PyTorch) is made passive:
# its active wait would keep spinning through the next engine's turn in this process (a spinning pool under load
# made a 1 ms PyTorch conv take 70-130 ms here). --no-spin: no engine spins (ORT allow_spinning=0, TVM 0).
# Must be set before torch starts its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if "--no-spin" in sys.argv:
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import bnfold
from bnfold.targets.tvm import UntunedKernelsWarning, configure_threads, tuning_tasks
from bnfold.targets.tvm.target import usable_cores

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import randomize_bn

log = logging.getLogger("bench_tvm")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _onnx_runner(folded: nn.Module, x: torch.Tensor, workdir: Path, threads: int,
                 spin: bool) -> Callable[[], Any]:
    import onnxruntime as ort

    path = workdir / "model.onnx"
    try:
        from bnfold.targets.onnx import export_onnx

        export_onnx(folded, (x,), path, dynamic_batch=False)
        how = "bnfold.targets.onnx.export_onnx"
    except ImportError:
        torch.onnx.export(folded, (x,), str(path), dynamo=True)
        how = "torch.onnx.export"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    feed = {name: x.numpy()}
    log.info("ONNX model exported with %s", how)
    return lambda: sess.run(None, feed)


def _time_interleaved(engines: dict[str, Callable[[], Any]], rounds: int, per_round: int,
                      warmup: int) -> dict[str, dict[str, float]]:
    samples: dict[str, list[float]] = {k: [] for k in engines}
    with torch.inference_mode():
        for fn in engines.values():
            for _ in range(warmup):
                fn()
        for _ in range(rounds):
            for name, fn in engines.items():
                fn()  # untimed: the previous engine's idle workers stop spinning during this call
                for _ in range(per_round):
                    t = time.perf_counter()
                    fn()
                    samples[name].append(time.perf_counter() - t)
    return {k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v),
                "p90_ms": 1e3 * float(np.percentile(v, 90)), "calls": len(v)} for k, v in samples.items()}


def bench_model(arch: str, args: argparse.Namespace, cache_dir: Path, threads: int) -> dict[str, Any]:
    import torchvision

    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, arch)()).eval()
    x = torch.randn(1, 3, args.size, args.size)
    folded = bnfold.fold(model, (x,)).module
    kernels = tuning_tasks(folded, (x,), prepack=args.prepack, layout=args.layout)
    per_model = dict(kv.split("=") for kv in args.trials.split(",")) if args.trials else {}
    trials = int(per_model[arch]) if arch in per_model else args.trials_per_kernel * len(kernels)
    log.info("%s: %d kernels to tune, budget %d trials", arch, len(kernels), trials)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UntunedKernelsWarning)
        t0 = time.perf_counter()
        art = bnfold.compile(folded, (x,), tune_trials=trials, cache_dir=cache_dir, prepack=args.prepack,
                             layout=args.layout, progress=False)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        art2 = bnfold.compile(folded, (x,), tune_trials=trials, cache_dir=cache_dir, prepack=args.prepack,
                              layout=args.layout, progress=False)
        second_s = time.perf_counter() - t0
    for w in caught:
        log.warning("%s", w.message)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntunedKernelsWarning)
        t0 = time.perf_counter()
        default = bnfold.compile(folded, (x,), tune_trials=0, cache_dir=cache_dir / "empty", prepack=args.prepack,
                                 layout=args.layout, progress=False)  # no database: bnfold's hand schedules
        default_s = time.perf_counter() - t0
    tuning = art.build_info["tuning"]
    parity = bnfold.compare(folded, art, (x,)).summary()
    parity_default = bnfold.compare(folded, default, (x,)).summary()
    same = bool(torch.equal(art(x), art2(x)))
    with tempfile.TemporaryDirectory(prefix="bench-tvm-") as tmp:
        ort_run = _onnx_runner(folded, x, Path(tmp), threads, spin=not args.no_spin)
        engines = {
            "pytorch eager (unfolded)": lambda: model(x),
            "pytorch eager (folded)": lambda: folded(x),
            "onnx runtime (folded)": ort_run,
            "bnfold + tvm (default schedules, untuned)": lambda: default(x),
            "bnfold + tvm (tuned)": lambda: art(x),
        }
        timings = _time_interleaved(engines, args.rounds, args.per_round, args.warmup)
    return {
        "model": arch, "input": [1, 3, args.size, args.size], "kernels": len(kernels),
        "trials_budget": trials, "trials_run": tuning["trials_run"], "tuning_s": tuning["seconds"],
        "first_compile_s": round(first_s, 1), "second_compile_s": round(second_s, 1),
        "second_compile_trials_run": art2.build_info["tuning"]["trials_run"], "second_compile_same_output": same,
        "untuned": tuning["untuned"], "parity_vs_folded": parity, "timings": timings,
        "default_compile_s": round(default_s, 1), "default_parity_vs_folded": parity_default,
        "estimated_kernel_ms": tuning.get("estimated_kernel_ms"),
        "per_task": tuning["tasks"],
    }


def _table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | engine | median ms | min ms | TVM speed-up (median) |",
             "|---|---|---:|---:|---:|"]
    for r in results:
        tvm_ms = r["timings"]["bnfold + tvm (tuned)"]["median_ms"]
        for engine, t in r["timings"].items():
            ratio = t["median_ms"] / tvm_ms
            lines.append(f"| {r['model']} | {engine} | {t['median_ms']:.2f} | {t['min_ms']:.2f} | "
                         f"{'—' if engine.startswith('bnfold') else f'{ratio:.2f}×'} |")
    lines += ["", "| model | kernels | trial budget | trials run | tuning time | s / trial | first compile | "
              "second compile (cached db) | default-schedule compile | unscheduled kernels | parity vs folded "
              "(tuned / default) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        p, d = r["parity_vs_folded"], r["default_parity_vs_folded"]
        per_trial = r["tuning_s"] / r["trials_run"] if r["trials_run"] else float("nan")
        lines.append(f"| {r['model']} | {r['kernels']} | {r['trials_budget']} | {r['trials_run']} | "
                     f"{r['tuning_s'] / 60:.1f} min | {per_trial:.2f} | {r['first_compile_s'] / 60:.1f} min | "
                     f"{r['second_compile_s']:.1f} s | {r['default_compile_s']:.1f} s | {len(r['untuned'])} | "
                     f"{'PASS' if p['passed'] else 'FAIL'} ({p['max_abs']:.2g}) / "
                     f"{'PASS' if d['passed'] else 'FAIL'} ({d['max_abs']:.2g}) |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--trials-per-kernel", type=int, default=32, help="budget = this × kernels (default 32)")
    ap.add_argument("--trials", help="total budget per model, e.g. resnet18=576,mobilenet_v2=384 (overrides "
                                     "--trials-per-kernel for the models it names)")
    ap.add_argument("--cache-dir", help="tuning database root (default: a fresh temporary folder)")
    ap.add_argument("--no-prepack", dest="prepack", action="store_false", help="tune without weight prepacking")
    ap.add_argument("--layout", choices=["NCHWc", "NCHW", "NHWC"], help="convolution layout for TVM (default NCHWc)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", help="write results as JSON here")
    ap.add_argument("--no-spin", action="store_true", help="no engine spins while idle (ORT allow_spinning=0, "
                    "TVM spin count 0); default: ORT and TVM as they ship")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = usable_cores()
    torch.set_num_threads(threads)
    configure_threads(threads)
    cache = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="bench-tvm-cache-"))
    log.info("threads %d, cache %s, load average at start %s", threads, cache, os.getloadavg())
    results = []
    for arch in args.models.split(","):
        results.append(bench_model(arch.strip(), args, cache, threads))
        log.info("%s done:\n%s", arch, _table(results[-1:]))
    import onnxruntime
    import tvm

    from bnfold.targets.tvm.target import cpu_target

    spec = cpu_target()
    meta = {"machine": platform.machine(), "cpu": _cpu_name(), "mcpu": spec.mcpu,
            "isa": spec.isa()["features"], "threads": threads, "torch": torch.__version__,
            "tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__, "load_average_end": os.getloadavg(),
            "prepack": args.prepack, "layout": args.layout or "NCHWc",
            "wait_policy": {**{k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "TVM_THREAD_POOL_SPIN_COUNT")},
                            "ort_allow_spinning": not args.no_spin}}
    print(f"host: {meta['cpu']} (mcpu {meta['mcpu']}; {', '.join(meta['isa'])}), {threads} threads")
    print(_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
