"""Speed of ``bnfold.fold`` — the call a user makes — against ``torch.fx.experimental.optimization.fuse``, side by
side in one run.

    nice -n 5 .venv/bin/python bench/bench_fold_speed.py [--chains 1000,10000] [--models resnet18,...]
                                                        [--timm mixnet_s,...] [--hf hf_bert,...] [--repeats 3]

One intra-op thread (``torch.set_num_threads(1)``), CPU time of the process (with one thread it is the work done;
a shared machine makes wall time unreliable), best of ``--repeats``, the calls of one model interleaved repeat by
repeat, a garbage collection before each. For each model (random weights, randomized norm statistics):

* **fx fuse**: ``fuse(model)`` — deep copy, ``symbolic_trace``, conv/BN fusion (``n/a``: fx cannot trace the model);
* **symbolic**, **auto**: the whole ``bnfold.fold(model, inputs, capture=..., check=False)`` call (copy, capture,
  shapes, passes, the folded module's code, the report); ``auto`` runs export capture too unless symbolic capture
  left nothing to gain (the *captures* column says which ran); **ratio** = call / fx fuse;
* **pipeline**: what the call does after capture (``bnfold.api.fold_captured`` on a graph captured outside the
  timer: passes, code, report) — the figure earlier versions of this script reported;
* **check**: the parity check ``fold`` runs by default (``check=True``; ``bnfold.api._check``: a float64 copy of
  the model and its forward, a forward of the folded module, and a float32 copy of the model and its forward only
  when the folded module's error is not within the float64 rule's floor), and **/ fwd** its cost in units of one
  float32 plus one float64 eval forward of the model on the same inputs;
* **µs/node**: the symbolic call per node of the captured graph.

Chains are ``Conv2d(8, 8, 3, padding=1) → BatchNorm2d → ReLU`` blocks (3 graph nodes each) on an 8x8 input; the
last lines give the growth of the time per node between consecutive chain sizes (whole call). The medians are over
the models with an fx baseline.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

ZOO_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
              "shufflenet_v2_x0_5", "mnasnet0_5", "densenet121", "googlenet", "vgg11_bn", "resnext50_32x4d"]
TIMM_MODELS = ["resnet26d", "mixnet_s", "efficientnet_lite0", "ghostnet_050", "repvgg_a0", "convnext_atto",
               "efficientformer_l1", "levit_128s", "vit_tiny_patch16_224", "mobilevit_xxs", "tiny_vit_5m_224",
               "coatnet_nano_rw_224"]
HF_MODELS = ["hf_bert", "hf_gpt2", "hf_vit", "hf_llama"]


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


def _forwards(model: nn.Module, inputs: tuple[torch.Tensor, ...], repeats: int) -> float:
    """Best CPU seconds of one float32 plus one float64 eval forward."""
    m64 = copy.deepcopy(model).double()
    x64 = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    t32, t64 = [], []
    with torch.no_grad():
        for _ in range(repeats):
            t32.append(_cpu(lambda: model(*inputs))[0])
            t64.append(_cpu(lambda: m64(*x64))[0])
    return min(t32) + min(t64)


def measure(name: str, model: nn.Module, inputs: tuple[torch.Tensor, ...], repeats: int, auto: bool = True,
            check: bool = True) -> dict[str, Any]:
    """The figures of one model (module docstring), best of ``repeats`` interleaved runs."""
    from torch.fx.experimental.optimization import fuse

    import bnfold
    import bnfold.api
    from bnfold.api import fold_captured
    from bnfold.capture import capture
    from bnfold.errors import CaptureError

    def run_check(folded: nn.Module) -> Any:
        if hasattr(bnfold.api, "_check"):
            return bnfold.api._check(model, folded, inputs)
        # code before issue 25: the check fold() ran inline
        return bnfold.api.compare(bnfold.api._reference(model), folded, inputs)  # type: ignore[attr-defined]

    model.eval()
    try:
        fuse(model)
        has_fx = True
    except Exception:  # fx cannot trace it (Hugging Face models branch on shapes)
        has_fx = False
    try:
        bnfold.fold(model, inputs, capture="symbolic", check=False)  # warm-up: imports, first kernels
        has_symbolic = True
    except CaptureError:  # symbolic capture cannot trace it: auto only (export)
        has_symbolic = False
    times: dict[str, list[float]] = {k: [] for k in ("fx", "symbolic", "auto", "pipeline", "check")}
    row: dict[str, Any] = {"model": name, "nodes": None}
    for _ in range(repeats):
        if has_fx:
            times["fx"].append(_cpu(lambda: fuse(model))[0])
        result = None
        if has_symbolic:
            t, result = _cpu(lambda: bnfold.fold(model, inputs, capture="symbolic", check=False))
            times["symbolic"].append(t)
        if auto or result is None:
            t, auto_result = _cpu(lambda: bnfold.fold(model, inputs, check=False))
            times["auto"].append(t)
            row["captures"] = "+".join(k for k, v in (auto_result.report.capture_alternatives or {}).items()
                                       if "error" not in v)
            result = result or auto_result
        row["folded"] = len(result.report.folded)
        row["candidates"] = len(result.report.folded) + len(result.report.skipped)
        if has_symbolic:
            captured = capture(model, inputs, "symbolic")
            row["nodes"] = len(captured.module.graph.nodes)
            times["pipeline"].append(_cpu(lambda c=captured: fold_captured(c))[0])
        if check:
            times["check"].append(_cpu(lambda r=result: run_check(r.module))[0])
    best = {k: min(v) if v else None for k, v in times.items()}
    row.update({f"{k}_s": v for k, v in best.items()})
    fx = best["fx"]
    for k in ("symbolic", "auto", "pipeline"):
        row[f"{k}_ratio"] = best[k] / fx if fx and best[k] is not None else None
    row["us_per_node"] = best["symbolic"] / row["nodes"] * 1e6 if row["nodes"] else None  # type: ignore[operator]
    if check:
        row["forwards_s"] = _forwards(model, inputs, repeats)
        row["check_forwards"] = best["check"] / row["forwards_s"]  # type: ignore[operator]
    return row


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1e3:.0f}"


def _x(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


HEADER = ("| model | nodes | folded | fx fuse (ms) | symbolic (ms) | ratio | auto (ms) | ratio | captures | "
          "pipeline (ms) | ratio | check (ms) | / fwd | µs/node |")


def _print_row(r: dict[str, Any]) -> None:
    print(f"| {r['model']} | {r['nodes'] or 'n/a'} | {r['folded']}/{r['candidates']} | {_ms(r['fx_s'])} | "
          f"{_ms(r['symbolic_s'])} | {_x(r['symbolic_ratio'])} | {_ms(r['auto_s'])} | {_x(r['auto_ratio'])} | "
          f"{r.get('captures', '-')} | {_ms(r['pipeline_s'])} | {_x(r['pipeline_ratio'])} | {_ms(r['check_s'])} | "
          f"{_x(r.get('check_forwards'))} | {_x(r['us_per_node'], 0)} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chains", default="1000,10000", help="chain sizes in graph nodes ('' for none)")
    ap.add_argument("--models", default=",".join(ZOO_MODELS), help="torchvision zoo models ('' for none)")
    ap.add_argument("--timm", default=",".join(TIMM_MODELS), help="timm models ('' for none)")
    ap.add_argument("--hf", default=",".join(HF_MODELS), help="transformers models ('' for none)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from helpers import randomize_bn
    from zoo import ZOO

    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread, CPU ms, best of {args.repeats}\n")
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|", flush=True)
    chain_rows = []
    for n in [int(s) for s in args.chains.split(",") if s]:
        torch.manual_seed(0)
        row = measure(f"chain {n}", randomize_bn(chain(n)), (torch.randn(1, 8, 8, 8),), args.repeats,
                      check=n <= 1000)
        chain_rows.append(row)
        _print_row(row)
    rows = []
    for name in [s for s in args.models.split(",") if s]:
        build, shape = ZOO[name]
        torch.manual_seed(0)
        rows.append(measure(name, randomize_bn(build()), (torch.randn((max(shape[0], 2), *shape[1:])),),
                            args.repeats))
        _print_row(rows[-1])
    if args.timm or args.hf:
        from zoo_timm import hf_models, timm_model

        hf = hf_models()
        for name in [s for s in args.timm.split(",") if s] + [s for s in args.hf.split(",") if s]:
            model, inputs = hf[name]() if name in hf else timm_model(name)
            rows.append(measure(name, model, inputs, args.repeats))
            _print_row(rows[-1])
    print()
    for kind in ("symbolic", "auto", "pipeline"):
        ratios = [r[f"{kind}_ratio"] for r in rows if r[f"{kind}_ratio"] is not None]
        if ratios:
            print(f"median ratio to fx fuse, {kind}: {statistics.median(ratios):.2f} over {len(ratios)} models "
                  f"(range {min(ratios):.2f}–{max(ratios):.2f})")
    checks = [r["check_forwards"] for r in rows if r.get("check_forwards") is not None]
    if checks:
        print(f"default parity check, in float32 + float64 forwards: median {statistics.median(checks):.2f} "
              f"(range {min(checks):.2f}–{max(checks):.2f})")
    for a, b in itertools.pairwise(chain_rows):
        print(f"time per node (whole symbolic call) {a['model']} → {b['model']}: "
              f"x{b['us_per_node'] / a['us_per_node']:.2f}")


if __name__ == "__main__":
    main()
