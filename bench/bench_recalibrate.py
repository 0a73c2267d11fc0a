"""Throughput of :func:`bnfold.recalibrate` against a plain ``torch.no_grad()`` eval forward over the same batches.

    nice -n 10 .venv/bin/python bench/bench_recalibrate.py [--repeats 9] [--threads 1] [--json out.json]

For each model, the same list of batches is run

* ``eval``: ``model(x)`` for every batch under ``torch.no_grad()``, model in eval mode (the baseline);
* ``recalibrate``: ``bnfold.recalibrate(model, batches)`` (batch mode, one pass, no progress bar);
* ``update_bn``: ``torch.optim.swa_utils.update_bn(batches, model)`` (context: the usual tool);

alternately, ``--repeats`` times after a warm-up, timed in CPU seconds of this process (a shared machine makes
wall time unreliable; with one intra-op thread CPU time is the work done). The speed ratio is
``t_eval / t_recalibrate`` of the medians: 1.0 = as fast as inference, the acceptance bar is ≥ 0.9.
Sequential mode is timed once and expressed in full-forward equivalents.

``stats alone`` is the cost of the float64 sums by themselves (:func:`bnfold.bnstats.channel_sums` on every
BatchNorm input, captured beforehand), as a fraction of the eval forward: measuring needs at least this much
extra work, so ``1 / (1 + stats alone)`` bounds the speed ratio any exact float64 recalibration can reach here.
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
from bnfold.bnstats import batch_mean, shifted_sums
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
    ]


def _cpu_seconds(fn: Callable[[], Any]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


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
    inputs = [(x, batch_mean(x)) for x in _bn_inputs(model, batches)]

    def stats_alone() -> None:
        for x, shift in inputs:  # results dropped at once, as in recalibration (no fresh pages for every layer)
            shifted_sums(x, shift)

    t_stats = statistics.median(_cpu_seconds(stats_alone) for _ in range(repeats))
    med = {k: statistics.median(v) for k, v in times.items()}
    layers = len(bnfold.recalibrate(copy.deepcopy(model), batches[:1], progress=False).layers)
    row = {"model": name, "bn_layers": layers, "eval_s": med["eval"], "recalibrate_s": med["recalibrate"],
           "update_bn_s": med["update_bn"], "ratio": med["eval"] / med["recalibrate"],
           "ratio_update_bn": med["eval"] / med["update_bn"], "sequential_s": t_seq,
           "sequential_forwards": t_seq / med["eval"], "stats_alone": t_stats / med["eval"]}
    print(f"| {name} | {layers} | {med['eval'] * 1e3:.1f} | {med['recalibrate'] * 1e3:.1f} | **{row['ratio']:.2f}** "
          f"| {row['stats_alone']:.0%} → ≤ {1 / (1 + row['stats_alone']):.2f} "
          f"| {med['update_bn'] * 1e3:.1f} ({row['ratio_update_bn']:.2f}) | {row['sequential_forwards']:.1f} |",
          flush=True)
    return row


def _bn_inputs(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0]))
               for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--only", help="run only the cases whose name contains this text")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), median of {args.repeats}, "
          "CPU ms per pass over all batches\n")
    print("| model, data | BN layers | eval forward | recalibrate | speed ratio | stats alone → bound "
          "| update_bn (ratio) | sequential (forwards) |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [bench(name, make, data(), args.repeats) for name, make, data in _cases()
            if not args.only or args.only in name]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
