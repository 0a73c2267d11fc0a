"""Per-kernel report of a TVM CPU build: every fused kernel's time and GFLOP/s next to the host's sgemm peak and
oneDNN's time for the same convolution (PyTorch's CPU conv), so the gap is visible layer by layer. A conv's
GFLOP/s count the direct method's FLOPs (2 · outputs · C_in/groups · k²) whatever the kernel computes, so a
Winograd kernel's figure is its direct-equivalent rate and may exceed the peak.

    .venv/bin/python bench/tvm_kernels.py --models resnet18,mobilenet_v2 --cache-dir /tmp/tvmbench/cache

For each model (torchvision, or timm when torchvision has no such name; random weights, randomized norm statistics,
folded with :func:`bnfold.fold`, batch 1, fp32, 224×224): the kernels :func:`bnfold.compile` would build (blocked
NCHWc layout by default), each with the schedule the build would use — the tuning database's best record when
``--cache-dir`` has one, else bnfold's default hand schedule — compiled alone and timed with TVM's
``time_evaluator`` (best of ``--repeat`` × 20 calls) on the usable cores. oneDNN: ``F.conv2d`` on a tensor of the
layer's input shape with the same weights' shape, stride, padding and groups (PyTorch dispatches fp32 CPU convs to
oneDNN), matched to the TVM kernel by its channels, kernel size, stride and input size read off the kernel's
buffers.
Peak: ``torch.mm`` of two 2048×2048 fp32 matrices (MKL/oneDNN sgemm), the practical ceiling for these
kernels on this host.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import randomize_bn

import bnfold


def _best_of(fn: Any, repeat: int, number: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def sgemm_peak(threads: int) -> float:
    """GFLOP/s of a 2048³ fp32 matrix product (torch.mm)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    t = _best_of(lambda: torch.mm(a, b), 5, 3)
    return 2 * 2048**3 / t / 1e9


def onednn_convs(model: nn.Module, x: torch.Tensor, repeat: int) -> list[dict[str, Any]]:
    """Every Conv2d of ``model`` timed alone with PyTorch (oneDNN), with its conv FLOPs."""
    shapes: dict[nn.Conv2d, tuple[int, ...]] = {}
    def record(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        shapes.setdefault(mod, tuple(inp[0].shape))  # type: ignore[arg-type]

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    rows = []
    with torch.no_grad():
        for conv, shape in shapes.items():
            inp = torch.randn(shape)
            out = conv(inp)
            flops = 2 * out.numel() * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
            t = _best_of(lambda c=conv, i=inp: F.conv2d(i, c.weight, c.bias, c.stride, c.padding, c.dilation,
                                                        c.groups), repeat, 20)
            key = (shape[1], conv.out_channels, conv.kernel_size[0], conv.stride[0], shape[2])
            rows.append({"flops": flops, "us": t * 1e6, "key": key, "shape": f"{shape[1]}→{conv.out_channels} "
                         f"k{conv.kernel_size[0]} s{conv.stride[0]} g{conv.groups} @{shape[2]}×{shape[3]}"})
    return rows


def conv_key(func: Any) -> tuple[int, ...] | None:
    """(in channels, out channels, kernel, stride, input height) of a conv kernel, read off its buffers
    (plain NCHW/OIHW, blocked NCHW[c]c/OIHW[c]i[c]o, or a Winograd conv's transformed ``(α, α, O/c, I, c)``
    weights: a 3×3 stride-1 conv), or None when it is not a conv."""
    shapes = [[int(d) for d in p.shape] for p in func.params]
    if len(shapes) >= 3 and len(shapes[0]) == 5 and len(shapes[1]) == 5 and shapes[1][0] == shapes[1][1]:
        data, u = shapes[0], shapes[1]
        return (data[1] * data[4], u[2] * u[4], 3, 1, data[2])
    if len(shapes) < 3 or len(shapes[1]) not in (4, 6) or len(shapes[0]) not in (4, 5):
        return None
    data, weight, out = shapes[0], shapes[1], shapes[-1]
    channels = data[1] * (data[4] if len(data) == 5 else 1)
    o = weight[0] * (weight[5] if len(weight) == 6 else 1)
    kh, height, out_h = weight[2], data[2], out[2]
    return (channels, o, kh, max(1, round(height / out_h)) if out_h else 1, height)


def tvm_kernels(folded: nn.Module, x: torch.Tensor, cache_dir: str | None, repeat: int,
                layout: str | None) -> list[dict[str, Any]]:
    """Each kernel of the CPU build timed alone, with the schedule the build would give it."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from bnfold.targets.tvm.build import kernel_tasks
    from bnfold.targets.tvm.cache import TuningCache
    from bnfold.targets.tvm.importer import import_torch
    from bnfold.targets.tvm.schedules import default_schedule, params_for
    from bnfold.targets.tvm.target import cpu_target

    spec = cpu_target()
    tasks = kernel_tasks(import_torch(folded, (x,)), spec, prepack=True, layout=layout)
    db = None
    if cache_dir:
        cache = TuningCache(cache_dir, spec)
        if cache.dir.exists():
            with cache.locked():
                db = cache.open()
    dev, p = tvm.cpu(), params_for(spec.target)
    rows = []
    for t in tasks:
        sch, source = None, "default"
        if db is not None:
            sch = db.query_schedule(t.workload, spec.target, "main")
            source = "tuned" if sch is not None else source
        if sch is None:
            sch = default_schedule(t.workload["main"], p)
        if sch is None:
            source, mod = "none", t.workload
        else:
            mod = sch.mod
        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)  # weights come pre-laid-out
        lib = tvm.compile(mod, target=spec.target)
        args = [tvm.runtime.tensor(np.random.randn(*[int(d) for d in b.shape]).astype(str(b.dtype)), dev)
                for b in mod["main"].params]
        ev = lib.mod.time_evaluator("main", dev, number=20, repeat=repeat)
        sec = min(ev(*args).results)
        rows.append({"name": t.name, "weight": t.weight, "flops": t.flops, "us": sec * 1e6, "schedule": source,
                     "key": conv_key(t.workload["main"])})
    return rows


def report(arch: str, args: argparse.Namespace, peak: float) -> dict[str, Any]:
    import torchvision

    from bnfold.targets.tvm import configure_threads
    from bnfold.targets.tvm.target import usable_cores

    threads = usable_cores()
    configure_threads(threads)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if hasattr(torchvision.models, arch):
        model = randomize_bn(getattr(torchvision.models, arch)()).eval()
    else:  # a timm model (convnext_nano): random norm statistics and affines
        import timm
        from zoo_timm import randomize_norms

        model = randomize_norms(timm.create_model(arch, pretrained=False)).eval()
    x = torch.randn(1, 3, 224, 224)
    folded = bnfold.fold(model, (x,)).module
    convs = onednn_convs(model, x, args.repeat)
    kernels = tvm_kernels(folded, x, args.cache_dir, args.repeat, args.layout)
    by_key = {c["key"]: c for c in convs}
    for k in kernels:
        match = by_key.get(tuple(k["key"])) if k["key"] else None
        if match is not None:  # GFLOP/s of the direct method's FLOPs (a Winograd kernel performs fewer)
            k["onednn_us"], k["conv"], k["flops"] = match["us"], match["shape"], match["flops"]
    return {"model": arch, "threads": threads, "peak_gflops": peak, "kernels": kernels}


def table(r: dict[str, Any]) -> str:
    lines = [f"**{r['model']}** (sgemm peak {r['peak_gflops']:.0f} GFLOP/s, {r['threads']} threads)", "",
             "| kernel | conv | × | schedule | TVM µs | GFLOP/s | % peak | oneDNN µs | TVM / oneDNN |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    total_tvm = total_dnn = 0.0
    for k in sorted(r["kernels"], key=lambda k: -k["us"] * k["weight"]):
        if k["us"] * k["weight"] < 1.0:
            continue
        gf = k["flops"] / k["us"] / 1e3
        dnn = k.get("onednn_us")
        total_tvm += k["us"] * k["weight"]
        total_dnn += (dnn or 0.0) * k["weight"]
        lines.append(f"| {k['name']} | {k.get('conv', '')} | {k['weight']} | {k['schedule']} | {k['us']:.0f} | "
                     f"{gf:.0f} | {100 * gf / r['peak_gflops']:.0f} | {'' if dnn is None else f'{dnn:.0f}'} | "
                     f"{'' if dnn is None else format(k['us'] / dnn, '.2f')} |")
    lines.append(f"| **sum (× occurrences)** | | | | {total_tvm:.0f} | | | {total_dnn:.0f} (convs only) | |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--cache-dir", help="tuning database root (tuned schedules); default: hand schedules only")
    ap.add_argument("--layout", choices=["NCHWc", "NCHW", "NHWC"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args()
    from bnfold.targets.tvm.target import usable_cores

    peak = sgemm_peak(usable_cores())
    results = [report(m.strip(), args, peak) for m in args.models.split(",")]
    for r in results:
        print(table(r), end="\n\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
