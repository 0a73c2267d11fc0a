"""Int8 accuracy of quantization-ready folding (issue 27): the table behind BENCHMARKS.md, "Int8".

    nice -n 10 .venv/bin/python bench/bench_int8.py                      # torchvision models + digits
    nice -n 10 .venv/bin/python bench/bench_int8.py --models resnet18 --no-digits --json out.json

**torchvision** (mobilenet_v2, mobilenet_v3_large, efficientnet_b0, resnet18; random weights, seed 0): every
BatchNorm gets running variances ``10^u``, ``u ~ U(-2, 2)`` per channel (spread over four orders of magnitude), running
means ``N(0, 0.1²)``, ``γ ~ U(0.5, 1.5)``, ``β ~ N(0, 0.25²)`` — statistics that do not describe the data, the
legacy-export situation of the issue (so the data-free statistics are off too). Inputs: N(0, 1) images at 96x96; 64
calibration images (batches of 16), 32 other images to measure on. Output SQNR of the int8 model (ONNX Runtime, QDQ,
int8 weights, uint8 activations) against the float model for

* (a) plain fold; (b) fold + cross-layer equalization; (c) fold + CLE + bias absorption + bias correction, with the
  statistics from the BatchNorms (data-free) and (c') from the calibration data,

per tensor and per channel.

**digits** (scikit-learn's 8x8 digits, shipped in ``bnfold/demo/digits.npz``): a depthwise-separable net (conv 3x3 →
3 × (depthwise 3x3 + BN + ReLU6, pointwise 1x1 + BN + ReLU6) → average pool → linear) trained here (deterministic,
about a minute on 2 cores); top-1 accuracy on the 450 test images of the float model and of the int8 model for (a)-(c').

(c'') is (c') with ``move_clamps=False`` (``--keep-clamps``): no ReLU6 becomes a per-channel clamp, so pairs across
one are left. Latency: ONNX Runtime, batch 1, each int8 file timed interleaved with the fp32 file (median ms; the
fp32 column is the median over those runs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bnfold
from bnfold.quantization.stage import Int8Options, Int8Result, int8_stage
from bnfold.speed import measure_latency
from bnfold.targets import get_target
from bnfold.targets.onnx import OnnxRuntimeModel

MODELS = ("mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "resnet18")
VARIANTS = {  # name: (equalize, absorb, bias_correction, move_clamps)
    "a fold": (False, False, "none", True),
    "b +CLE": (True, False, "none", True),
    "c +CLE+BA+BC (BN stats)": (True, True, "bn", True),
    "c' +CLE+BA+BC (data)": (True, True, "data", True),
    "c'' as c', clamps kept": (True, True, "data", False),
}


def randomize_statistics(model: nn.Module, seed: int, spread: float = 2.0) -> None:
    """Every BatchNorm: running variance ``10^u``, ``u ~ U(-spread, spread)`` per channel (four orders of magnitude
    for ``spread = 2``), running mean ``N(0, 0.1²)``, ``γ ~ U(0.5, 1.5)``, ``β ~ N(0, 0.25²)``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_var.copy_(10.0 ** ((torch.rand(c, generator=g) * 2 - 1) * spread))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.25 * torch.randn(c, generator=g))
    model.eval()


SETTINGS = {"variants": list(VARIANTS), "ort_threads": None, "rounds": 15}


def run_variants(folded: torch.fx.GraphModule, example: tuple[torch.Tensor, ...], calib: list[tuple[torch.Tensor]],
                 val: list[tuple[torch.Tensor]], score=None) -> dict[str, dict[str, dict]]:
    """Every variant per tensor and per channel; ORT latency of each int8 file and of the fp32 one at batch 1."""
    out: dict[str, dict[str, dict]] = {}
    one = tuple(t[:1] for t in example)
    fp32_dir = tempfile.TemporaryDirectory()
    get_target("onnx").lower(folded, example, {"path": Path(fp32_dir.name) / "fp32.onnx"})
    fp32 = OnnxRuntimeModel(Path(fp32_dir.name) / "fp32.onnx", threads=SETTINGS["ort_threads"])
    fp32_ms: list[float] = []
    fp32_min: list[float] = []
    for per_channel in (False, True):
        mode = "per-channel" if per_channel else "per-tensor"
        out[mode] = {}
        for name, (eq, ab, bc, move) in VARIANTS.items():
            if name not in SETTINGS["variants"]:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                r: Int8Result = int8_stage(folded, folded, example, calib, val, Path(tmp), options=Int8Options(
                    per_channel=per_channel, equalize=eq, absorb=ab, bias_correction=bc,  # type: ignore[arg-type]
                    move_clamps=move))
                row = {"sqnr_db": None if r.verdict is None else r.verdict.sqnr_db,
                       "top1_agreement": None if r.verdict is None else r.verdict.top1_agreement,
                       "passed": r.passed, "errors": r.errors, "seconds": round(time.perf_counter() - t0, 1),
                       "weights_match": r.weights}
                if r.prepare is not None:
                    row["spread"] = r.prepare.spread_summary()
                    row["absorb_sqnr_db"] = r.prepare.absorb_sqnr_db
                    row["steps"] = {s.name: {"changed": len(s.changed), "left": len(s.left),
                                             "unchanged": len(s.unchanged), "rounds": s.rounds,
                                             "converged": s.converged} for s in r.prepare.steps}
                if r.path is not None:
                    runtime = OnnxRuntimeModel(Path(tmp) / r.path, threads=SETTINGS["ort_threads"])
                    lat = measure_latency({"fp32": fp32, "int8": runtime}, one, rounds=SETTINGS["rounds"])
                    row["latency_ms"], row["fp32_latency_ms"] = lat["int8"], lat["fp32"]
                    fp32_ms.append(lat["fp32"]["median_ms"])
                    fp32_min.append(lat["fp32"]["min_ms"])
                    if score is not None:
                        row["score"] = score(runtime)
                out[mode][name] = row
                print(f"  {mode:11s} {name:26s} SQNR {row['sqnr_db']:.1f} dB, "
                      f"{row.get('latency_ms', {}).get('median_ms', float('nan')):.2f} ms"
                      + (f", score {row['score']:.4f}" if "score" in row else "")
                      + (f"  errors: {r.errors}" if r.errors else ""), flush=True)
    fp32_ms.sort()
    out["fp32"] = {"latency_ms": {"median_ms": fp32_ms[len(fp32_ms) // 2] if fp32_ms else float("nan")},
                   "min_ms": min(fp32_min) if fp32_min else float("nan")}
    fp32_dir.cleanup()
    return out


def torchvision_model(name: str, size: int, n_calib: int, n_val: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(num_classes=1000).eval()
    g = torch.Generator().manual_seed(seed + 1)
    calib = [torch.randn(16, 3, size, size, generator=g) for _ in range(n_calib // 16)]
    val = [torch.randn(16, 3, size, size, generator=g) for _ in range(n_val // 16)]
    randomize_statistics(model, seed)
    variances = torch.cat([m.running_var for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
    t0 = time.perf_counter()
    fr = bnfold.fold(model, (calib[0],), capture="symbolic", check=False)
    print(f"{name}: folded {len(fr.report.folded)}/{len(fr.report.folded) + len(fr.report.skipped)} in "
          f"{time.perf_counter() - t0:.1f} s; running_var spans {float(variances.min()):.3g}..."
          f"{float(variances.max()):.3g}", flush=True)
    rows = run_variants(fr.module, (calib[0],), [(c,) for c in calib], [(v,) for v in val])
    return {"model": name, "size": size, "calibration": n_calib, "validation": n_val, "variants": rows}


class DSNet(nn.Module):
    """conv 3x3 → 3 × (depthwise 3x3-BN-ReLU6, pointwise 1x1-BN-ReLU6) → avg pool → linear (8x8 digits)."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
                                   nn.ReLU6()]
        for cin, cout, stride in zip(widths[:-1], widths[1:], (1, 2, 1), strict=True):
            layers += [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
                       nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_dsnet(epochs: int = 40, seed: int = 0) -> tuple[DSNet, object]:
    from bnfold.demo.data import load_digits
    from bnfold.demo.train import train

    return train(epochs, seed, make_model=DSNet), load_digits()


def digits() -> dict:
    t0 = time.perf_counter()
    model, data = train_dsnet()
    x_test, y_test = data.x_test, data.y_test

    def accuracy(fn) -> float:
        with torch.no_grad():
            return float((fn(x_test).argmax(1) == y_test).float().mean())

    float_acc = accuracy(model)
    print(f"digits DSNet: trained in {time.perf_counter() - t0:.0f} s, float top-1 {float_acc:.4f} on "
          f"{len(y_test)} test images", flush=True)
    calib = [(c,) for c in data.x_train[:256].split(32)]
    val = [(v,) for v in x_test.split(60)]
    fr = bnfold.fold(model, (calib[0][0],), capture="symbolic", check=False)
    rows = run_variants(fr.module, (calib[0][0],), calib, val, score=accuracy)
    return {"model": "digits DSNet", "float_top1": float_acc, "test_images": len(y_test), "variants": rows}


def table(results: list[dict]) -> str:
    lines = ["| model | weights | " + " | ".join(VARIANTS) + " |", "|---|---|" + "---|" * len(VARIANTS)]
    for res in results:
        for mode, rows in res["variants"].items():
            if mode == "fp32":
                continue
            cells = []
            for name in VARIANTS:
                if name not in rows:
                    cells.append("-")
                    continue
                row = rows[name]
                if "score" in row:
                    cells.append(f"{100 * row['score']:.1f} % ({row['sqnr_db']:.1f} dB)")
                else:
                    v = row["sqnr_db"]
                    cells.append("error" if v is None or not math.isfinite(v) else f"{v:.1f} dB")
            label = res["model"] + (f" (float {100 * res['float_top1']:.1f} %)" if "float_top1" in res else "")
            lines.append(f"| {label} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latency_table(results: list[dict]) -> str:
    """Median / minimum ms per file (the minimum is what a busy shared host distorts least)."""
    names = [v for v in VARIANTS if v in SETTINGS["variants"]]
    lines = ["| model | fp32 | " + " | ".join(f"int8 {m} {v.split()[0]}" for m in ("per-tensor", "per-channel")
                                             for v in names) + " |",
             "|---|---|" + "---|" * (2 * len(names))]
    for res in results:
        rows = res["variants"]
        cells = [f"{rows['fp32']['latency_ms']['median_ms']:.2f} / {rows['fp32']['min_ms']:.2f}"]
        for mode in ("per-tensor", "per-channel"):
            for name in names:
                lat = rows[mode][name].get("latency_ms")
                cells.append("-" if lat is None else f"{lat['median_ms']:.2f} / {lat['min_ms']:.2f}")
        lines.append(f"| {res['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--val", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-digits", action="store_true")
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--variants", help="comma-separated subset of the variant letters: " + ", ".join(
        v.split()[0] for v in VARIANTS))
    ap.add_argument("--ort-threads", type=int, help="ONNX Runtime intra-op threads (default: ORT's)")
    ap.add_argument("--rounds", type=int, default=15, help="latency rounds (each calls both files 3 times)")
    args = ap.parse_args()
    if args.variants:
        wanted = set(args.variants.split(","))
        SETTINGS["variants"] = [v for v in VARIANTS if v.split()[0] in wanted]
    SETTINGS["ort_threads"], SETTINGS["rounds"] = args.ort_threads, args.rounds
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = [torchvision_model(n, args.size, args.calib, args.val, args.seed) for n in args.models.split(",") if n]
    if not args.no_digits:
        results.append(digits())
    print()
    print(table(results))
    print()
    print("ONNX Runtime latency, batch 1, median / min ms:")
    print(latency_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
