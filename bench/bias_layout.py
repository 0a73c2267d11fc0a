"""Can a folded fp32 model keep the unfolded model's accuracy at no speed cost? (issue 10)

On some hosts PyTorch's CPU convolution is less accurate with a bias than without one (an AVX2 host's oneDNN
direct kernel accumulates onto the bias: ``bench/bias_precision.py``), and folding gives every BN-followed conv a
bias. This script folds a model, then builds the same folded model with every conv's bias taken out and added
after the conv (``conv(x, W) + b``, one extra elementwise op per conv), and measures, side by side in one process:
the rel-L2 error vs a float64 reference over several seeds (median), and eager latency (median of interleaved
rounds, one thread).

    .venv/bin/python bench/bias_layout.py                               # this host's kernels
    ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python bench/bias_layout.py       # the kernels an AVX2-only host runs
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.fx
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import randomize_bn

import bnfold


def bias_after(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` where every ``nn.Conv*`` with a bias runs without it and the bias is added after."""
    gm = copy.deepcopy(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(str(node.target))
        if not isinstance(mod, nn.modules.conv._ConvNd) or mod.bias is None:
            continue
        shape = (1, -1) + (1,) * (mod.weight.dim() - 2)
        name = str(node.target).replace(".", "_") + "_bias_after"
        gm.register_buffer(name, mod.bias.detach().reshape(shape).clone())
        mod.bias = None
        with gm.graph.inserting_after(node):
            bias = gm.graph.get_attr(name)
        with gm.graph.inserting_after(bias):
            add = gm.graph.call_function(torch.add, (node, bias))
        node.replace_all_uses_with(add, delete_user_cb=lambda user, add=add: user is not add)
    gm.graph.lint()
    gm.recompile()
    return gm


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def latency_ms(fns: dict[str, nn.Module], x: torch.Tensor, rounds: int, calls: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn(x)
        for _ in range(rounds):
            for k, fn in fns.items():
                start = time.perf_counter()
                for _ in range(calls):
                    fn(x)
                times[k].append((time.perf_counter() - start) / calls * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(),
    "googlenet": lambda: torchvision.models.googlenet(aux_logits=False, init_weights=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, oneDNN {torch.backends.mkldnn.is_available()}")
    print(f"{'model':14s} {'err original':>12s} {'err bias in':>12s} {'err bias after':>14s} "
          f"{'ms original':>11s} {'ms bias in':>10s} {'ms bias after':>13s}")
    for name in args.models.split(","):
        errs: list[tuple[float, float, float]] = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = randomize_bn(MODELS[name](), seed)
            x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
            folded = bnfold.fold(model, (x,), capture="symbolic", check=False).module
            after = bias_after(folded)
            with torch.no_grad():
                ref = copy.deepcopy(model).double()(x.double())
                errs.append((rel(model(x), ref), rel(folded(x), ref), rel(after(x), ref)))
        med = [statistics.median(e[i] for e in errs) for i in range(3)]
        x = torch.randn(1, 3, args.size, args.size)
        ms = latency_ms({"original": model, "in": folded, "after": after}, x, args.rounds, args.calls)
        print(f"{name:14s} {med[0]:12.3g} {med[1]:12.3g} {med[2]:14.3g} "
              f"{ms['original']:11.2f} {ms['in']:10.2f} {ms['after']:13.2f}")


if __name__ == "__main__":
    main()
