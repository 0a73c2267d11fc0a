"""Speed of the fold pass pipeline against ``torch.fx.experimental.optimization.fuse``, side by side in one run.

    nice -n 5 .venv/bin/python bench/bench_fold_speed.py [--chains 100,1000,10000] [--models resnet18,...]
                                                        [--repeats 3] [--markdown]

One intra-op thread (``torch.set_num_threads(1)``), CPU time of the process (with one thread it is the work done;
a shared machine makes wall time unreliable), best of ``--repeats``. For each model:

* **capture**: ``bnfold.capture.capture(model, x, "symbolic")`` (deep copy, BatchNorm-aware ``symbolic_trace``,
  shape propagation), timed on its own;
* **pipeline**: everything ``bnfold.fold(..., check=False)`` does after capture (passes, finalization, report)
  on the captured graph;
* **fx fuse**: ``torch.fx.experimental.optimization.fuse(model)`` (deep copy + ``symbolic_trace`` + conv/BN fusion);
* **ratio** = pipeline / fx fuse; **µs/node** = pipeline / nodes of the captured graph.

Chains are ``Conv2d(8, 8, 3, padding=1) → BatchNorm2d → ReLU`` blocks (3 graph nodes each) on an 8x8 input.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

ZOO_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
              "shufflenet_v2_x0_5", "mnasnet0_5", "densenet121", "googlenet", "vgg11_bn", "resnext50_32x4d"]


def chain(nodes: int) -> nn.Module:
    """``nodes // 3`` blocks of Conv2d(8, 8, 3) → BatchNorm2d → ReLU (plus the input and output nodes)."""
    blocks: list[nn.Module] = []
    for _ in range(max(nodes // 3, 1)):
        blocks += [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    return nn.Sequential(*blocks)


def _cpu(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def _fold_captured(captured: Any) -> Any:
    import bnfold.api

    if hasattr(bnfold.api, "fold_captured"):
        return bnfold.api.fold_captured(captured)  # no parity check: the same as fold(..., check=False)
    # pre-v2 code has no entry point after capture: hand fold() the graph captured outside the timer
    saved = bnfold.api._capture
    bnfold.api._capture = lambda *_args, **_kw: captured
    try:
        return bnfold.api.fold(captured.module, captured.example_inputs, capture="symbolic", check=False)
    finally:
        bnfold.api._capture = saved


def measure(name: str, model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, Any]:
    from torch.fx.experimental.optimization import fuse

    from bnfold.capture import capture

    model.eval()
    cap, pipe, fx = [], [], []
    nodes = folded = 0
    for _ in range(repeats):
        t_fx, _ = _cpu(lambda: fuse(model))
        fx.append(t_fx)
        t_cap, captured = _cpu(lambda: capture(model, (x,), "symbolic"))
        cap.append(t_cap)
        nodes = len(captured.module.graph.nodes)
        t_pipe, result = _cpu(lambda c=captured: _fold_captured(c))
        pipe.append(t_pipe)
        folded = len(result.report.folded)
    row = {"model": name, "nodes": nodes, "folded": folded, "capture_s": min(cap), "pipeline_s": min(pipe),
           "fx_fuse_s": min(fx)}
    row["ratio"] = row["pipeline_s"] / row["fx_fuse_s"]
    row["us_per_node"] = row["pipeline_s"] / nodes * 1e6
    return row


def _print_row(r: dict[str, Any]) -> None:
    print(f"| {r['model']} | {r['nodes']} | {r['folded']} | {r['capture_s'] * 1e3:.0f} | {r['pipeline_s'] * 1e3:.0f} "
          f"| {r['fx_fuse_s'] * 1e3:.0f} | {r['ratio']:.2f} | {r['us_per_node']:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chains", default="100,1000,10000", help="chain sizes in graph nodes ('' for none)")
    ap.add_argument("--models", default=",".join(ZOO_MODELS), help="zoo models ('' for none)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from helpers import randomize_bn
    from zoo import ZOO

    print("| model | nodes | folded | capture (ms) | pipeline (ms) | symbolic_trace + fuse (ms) | ratio | µs/node |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    chain_rows = []
    for n in [int(s) for s in args.chains.split(",") if s]:
        row = measure(f"chain {n}", randomize_bn(chain(n)), torch.randn(1, 8, 8, 8), args.repeats)
        chain_rows.append(row)
        _print_row(row)
    zoo_rows = []
    for name in [s for s in args.models.split(",") if s]:
        build, shape = ZOO[name]
        torch.manual_seed(0)
        row = measure(name, randomize_bn(build()), torch.randn((max(shape[0], 2), *shape[1:])), args.repeats)
        zoo_rows.append(row)
        _print_row(row)
    if zoo_rows:
        print(f"\nzoo median ratio (pipeline / fx fuse): {statistics.median(r['ratio'] for r in zoo_rows):.2f} "
              f"over {len(zoo_rows)} models")
    for a, b in itertools.pairwise(chain_rows):
        print(f"time per node {a['model']} → {b['model']}: x{b['us_per_node'] / a['us_per_node']:.2f}")


if __name__ == "__main__":
    main()
