"""Throughput of :func:`bnfold.recalibrate` against a plain ``torch.no_grad()`` eval forward over the same batches.

    nice -n 10 .venv/bin/python bench/bench_recalibrate.py [--repeats 15] [--threads 1] [--json out.json]

For each model, the same list of batches is run

* ``eval``: ``model(x)`` for every batch under ``torch.no_grad()``, model in eval mode (the baseline);
* ``recalibrate``: ``bnfold.recalibrate(model, batches)`` (batch mode, one pass, no progress bar);
* ``update_bn``: ``torch.optim.swa_utils.update_bn(batches, model)`` (context: the usual tool);

back to back, ``--repeats`` times after a warm-up, timed in CPU seconds of this process (a shared machine makes
wall time unreliable; with one intra-op thread CPU time is the work done). With ``--threads`` > 1 the clock is
wall time: CPU time would also count OpenMP threads spinning while they wait for work. The speed ratio is the
median over the repeats of ``t_eval / t_recalibrate`` (each pair measured back to back, so slow phases of the
machine cancel), with the interquartile range: 1.0 = as fast as inference, the acceptance bar is ≥ 0.9.
Sequential mode is timed once and expressed in full-forward equivalents.

The stock BatchNorm modules of these models are normalized and measured by the fused native kernel
(``bnfold.recalibration.native.batch_norm_measured``); ``BNFOLD_NATIVE=0`` times the torch fallback instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import bnfold
from bnfold.demo.data import load_digits, shift_images
from bnfold.demo.model import load_pretrained

Case = tuple[str, Callable[[], nn.Module], Callable[[], list[torch.Tensor]]]


def _cases() -> list[Case]:
    import torchvision.models as tvm

    def digits(batch: int) -> Callable[[], list[torch.Tensor]]:
        return lambda: list(shift_images(load_digits().x_train).split(batch))

    def images(n: int, batch: int, size: int) -> Callable[[], list[torch.Tensor]]:
        def make() -> list[torch.Tensor]:
            g = torch.Generator().manual_seed(0)
            return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]
        return make

    return [
        ("DigitsNet, 1347 digits in batches of 64", load_pretrained, digits(64)),
        ("DigitsNet, 1347 digits in batches of 256", load_pretrained, digits(256)),
        ("resnet18, 3 x 8 x 3x224x224", lambda: tvm.resnet18(), images(3, 8, 224)),
        ("resnet50, 2 x 4 x 3x224x224", lambda: tvm.resnet50(), images(2, 4, 224)),
        ("mobilenet_v3_small, 3 x 16 x 3x224x224", lambda: tvm.mobilenet_v3_small(), images(3, 16, 224)),
        ("mobilenet_v3_small, 8 x 16 x 3x224x224", lambda: tvm.mobilenet_v3_small(), images(8, 16, 224)),
    ]


_CLOCK = time.process_time  # main() switches to wall time for more than one thread


def _cpu_seconds(fn: Callable[[], Any]) -> float:
    start = _CLOCK()
    fn()
    return _CLOCK() - start


def bench(name: str, make_model: Callable[[], nn.Module], batches: list[torch.Tensor], repeats: int) -> dict[str, Any]:
    model = make_model().eval()
    target = copy.deepcopy(model)

    def eval_forward() -> None:
        with torch.no_grad():
            for x in batches:
                model(x)

    def recal() -> None:
        bnfold.recalibrate(target, batches, progress=False)

    times: dict[str, list[float]] = {"eval": [], "recalibrate": [], "update_bn": []}
    eval_forward()
    recal()
    for _ in range(repeats):
        times["eval"].append(_cpu_seconds(eval_forward))
        times["recalibrate"].append(_cpu_seconds(recal))
        swa = copy.deepcopy(model)
        times["update_bn"].append(_cpu_seconds(lambda swa=swa: update_bn(batches, swa)))
    t_seq = _cpu_seconds(lambda: bnfold.recalibrate(copy.deepcopy(model), batches, mode="sequential",
                                                    progress=False))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = sorted(e / r for e, r in zip(times["eval"], times["recalibrate"], strict=True))
    iqr = (ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4])
    layers = len(bnfold.recalibrate(copy.deepcopy(model), batches[:1], progress=False).layers)
    row = {"model": name, "bn_layers": layers, "eval_s": med["eval"], "recalibrate_s": med["recalibrate"],
           "update_bn_s": med["update_bn"], "ratio": statistics.median(ratios), "ratio_iqr": iqr,
           "ratio_update_bn": statistics.median(e / u for e, u in zip(times["eval"], times["update_bn"], strict=True)),
           "sequential_s": t_seq, "sequential_forwards": t_seq / med["eval"]}
    print(f"| {name} | {layers} | {med['eval'] * 1e3:.1f} | {med['recalibrate'] * 1e3:.1f} | **{row['ratio']:.2f}** "
          f"({iqr[0]:.2f}–{iqr[1]:.2f}) | {med['update_bn'] * 1e3:.1f} ({row['ratio_update_bn']:.2f}) "
          f"| {row['sequential_forwards']:.1f} |", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--only", help="run only the cases whose name contains this text")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global _CLOCK
    if args.threads > 1:  # CPU time would count OpenMP threads spinning while they wait for work
        _CLOCK = time.perf_counter
    clock = "CPU" if args.threads == 1 else "wall-clock"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), median of {args.repeats}, "
          f"{clock} ms per pass over all batches\n")
    print("| model, data | BN layers | eval forward | recalibrate | speed ratio (IQR) | update_bn (ratio) "
          "| sequential (forwards) |")
    print("|---|---|---|---|---|---|---|")
    rows = [bench(name, make, data(), args.repeats) for name, make, data in _cases()
            if not args.only or args.only in name]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
