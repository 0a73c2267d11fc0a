"""Throughput of :func:`bnfold.recalibrate` on captured graphs (symbolic fx and ``torch.export``), against an eval
forward of the same GraphModule over the same batches.

    nice -n 10 .venv/bin/python bench/bench_recalibrate_graphs.py [--repeats 7]

Same method as ``bench/bench_recalibrate.py`` (CPU time, one intra-op thread, median over back-to-back pairs of
eval / recalibrate). In a symbolic graph, stock BatchNorm modules are ``call_module`` nodes and take the fused
kernel through their replaced forward; in an exported graph, BatchNorm is an aten call, replaced by the fused call
in a copy of the graph — whose construction (copy + code generation, ~30 ms for mobilenet_v3_small) is a fixed
cost of every ``recalibrate`` call, so the ratio is shown for a short and a longer calibration set.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import bnfold
from bnfold.capture import capture


def _cpu(fn: Callable[[], Any]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    import torchvision.models as tvm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | capture | batches | eval forward (ms) | recalibrate (ms) | speed ratio |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    cases = [("mobilenet_v3_small", tvm.mobilenet_v3_small, (16, 3, 224, 224), (4, 12)),
             ("resnet18", tvm.resnet18, (8, 3, 224, 224), (3,))]
    for name, make, shape, counts in cases:
        model = make().eval()
        for count in counts:
            batches = [torch.randn(*shape, generator=g) for _ in range(count)]
            for mode in ("symbolic", "export"):
                reference = capture(model, (batches[0],), mode).module
                target = capture(model, (batches[0],), mode).module

                def eval_forward(gm: torch.nn.Module = reference, data: list[torch.Tensor] = batches) -> None:
                    with torch.no_grad():
                        for x in data:
                            gm(x)

                def recal(gm: torch.nn.Module = target, data: list[torch.Tensor] = batches) -> None:
                    bnfold.recalibrate(gm, data, progress=False)

                eval_forward()
                recal()
                pairs = [(_cpu(eval_forward), _cpu(recal)) for _ in range(args.repeats)]
                ratio = statistics.median(e / r for e, r in pairs)
                print(f"| {name} | {mode} | {count} × {shape[0]} | {statistics.median(p[0] for p in pairs) * 1e3:.1f} "
                      f"| {statistics.median(p[1] for p in pairs) * 1e3:.1f} | **{ratio:.2f}** |", flush=True)


if __name__ == "__main__":
    main()
