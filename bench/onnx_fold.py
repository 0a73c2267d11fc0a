"""ONNX fold vs onnxsim: BatchNormalization nodes before, after ``bnfold fold``, after ``onnxsim.simplify`` (same file),
ORT parity of the folded file (float64 rule where a float64 reference runs), and a run at another batch size.

    .venv/bin/python bench/onnx_fold.py [--only NAME ...] [--out DIR]
    .venv/bin/python bench/onnx_fold.py --zoo [--only NAME ...] [--exporters legacy,dynamo_noopt,dynamo] [--out DIR]

Prints a Markdown table (the one in BENCHMARKS.md). Models: tests/onnxfold/onnx_cases.py.

``--zoo``: the exporter zoo (issue 24) — every architecture of :data:`ZOO` (timm and torchvision, random weights,
randomized BatchNorm statistics) exported three ways: ``legacy`` (``dynamo=False``, no constant folding, BN kept),
``dynamo_noopt`` (``torch.onnx.export(..., dynamo=True, optimize=False)``) and ``dynamo`` (the exporter's default,
which runs onnxscript's optimizer itself); each file folded by bnfold (the library call ``bnfold fold`` makes: load,
fold, write, ONNX Runtime parity by the float64 rule on random inputs) beside onnxsim (``onnxsim.simplify``) and the
onnxscript optimizer with its BatchNorm fusion rules (``onnxscript.optimizer.optimize`` then
``fuse_batchnorm_into_conv/conv_transpose/gemm``), in one run: BatchNormalization nodes left by each, bnfold's
parity verdict and the seconds each tool took on the file. Exported files are kept in ``--out`` and reused.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "onnxfold"))

from onnx_cases import ARCHS, BUILT, export, randomize_bn, shared_weight_model

from bnfold.onnx import fold_model, load_onnx, save_onnx
from bnfold.parity.ort import onnx_parity


def bn_count(m: onnx.ModelProto) -> int:
    return sum(1 for n in m.graph.node if n.op_type == "BatchNormalization")


def onnxsim_bns(path: Path) -> int | str:
    import onnxsim

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            simplified, ok = onnxsim.simplify(onnx.load(str(path)))
    except Exception as exc:
        return f"error ({type(exc).__name__})"
    return bn_count(simplified) if ok else "check failed"


def other_batch(path: Path, model: onnx.ModelProto) -> str:
    vi = model.graph.input[0].type.tensor_type
    if vi.shape.dim[0].HasField("dim_value"):
        return "fixed"
    shape = [5] + [d.dim_value for d in vi.shape.dim[1:]]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sess.run(None, {model.graph.input[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)})
    return "ok (5)"


@dataclass
class Folded:
    """One file folded as ``bnfold fold`` does it: BatchNormalization before, the models, the report, the seconds
    ``fold_model`` took, the files written and the parity verdict."""

    before: int
    original: onnx.ModelProto
    model: onnx.ModelProto
    report: Any
    seconds: float
    written: list[Path]
    parity: Any


def fold_file(src: Path, dest: Path) -> Folded:
    loaded = load_onnx(src)
    before = bn_count(loaded.model)
    original = onnx.ModelProto()
    original.CopyFrom(loaded.model)
    t0 = time.perf_counter()
    report = fold_model(loaded.model, base_dir=str(src.parent))
    seconds = time.perf_counter() - t0
    written = save_onnx(loaded.model, dest, external=loaded.external, threshold=loaded.threshold)
    return Folded(before, original, loaded.model, report, seconds, written, onnx_parity(original, dest))


def measure(name: str, src: Path, out_dir: Path) -> dict[str, object]:
    dest = out_dir / f"{name}.folded.onnx"
    f = fold_file(src, dest)
    before, original, report, fold_s, written, parity = f.before, f.original, f.report, f.seconds, f.written, f.parity
    loaded_model = f.model
    fp64 = "fp64" if parity.reference_fp64 else "elementwise"
    return {"model": name, "bn_before": before, "bn_bnfold": bn_count(loaded_model), "bn_onnxsim": onnxsim_bns(src),
            "nodes": f"{len(original.graph.node)} → {len(loaded_model.graph.node)}",
            "parity": f"{'PASS' if parity.passed else 'FAIL'} ({fp64}, max abs {parity.summary()['max_abs']:.1e})",
            "batch5": other_batch(dest, loaded_model), "external": "yes" if len(written) > 1 else "",
            "fold_ms": f"{fold_s * 1000:.0f}",
            "left": "; ".join(f"{e.id}: {e.reason[:60]}" for e in report.skipped[:2])}


# -- the exporter zoo (issue 24) ------------------------------------------------------------------------------------

def _timm_zoo(name: str, **kw: object) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        import timm

        torch.manual_seed(0)
        return randomize_bn(timm.create_model(name, pretrained=False, num_classes=10, **kw))
    return make


ZOO: dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, ...]]] = {
    **{k: ARCHS[k] for k in ("resnet18", "mobilenet_v2", "efficientnet_b0", "densenet121", "regnet_y_400mf",
                             "shufflenet_v2_x0_5", "mnasnet0_5", "googlenet")},
    "timm_resnet50": (_timm_zoo("resnet50"), (1, 3, 32, 32)),
    "timm_mobilenetv3_small_100": (_timm_zoo("mobilenetv3_small_100"), (1, 3, 32, 32)),
    "timm_dla34": (_timm_zoo("dla34"), (1, 3, 32, 32)),
    "timm_cspresnet50": (_timm_zoo("cspresnet50"), (1, 3, 32, 32)),
    "timm_repvgg_a0": (_timm_zoo("repvgg_a0"), (1, 3, 32, 32)),
    "timm_levit_128s": ARCHS["timm_levit_128s"],
}
EXPORTERS = ("legacy", "dynamo_noopt", "dynamo")


def export_zoo(model: torch.nn.Module, x: torch.Tensor, path: Path, exporter: str) -> tuple[Path, str]:
    """Export ``model`` with ``exporter`` (module docstring) to ``path`` (reused when it exists); dynamic batch axis,
    or a fixed one where the exporter cannot make it dynamic (said in the second value)."""
    if path.exists():
        return path, ""
    if exporter == "legacy":
        return export(model, x, path), ""
    from torch.export import Dim

    note = ""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=exporter == "dynamo",
                              input_names=["x"], output_names=["y"], dynamic_shapes=({0: Dim("batch")},))
        except Exception as exc:
            note = f"fixed batch ({type(exc).__name__})"
            torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=exporter == "dynamo",
                              input_names=["x"], output_names=["y"])
    return path, note


def onnxscript_bns(path: Path) -> tuple[int | str, float]:
    """BatchNormalization left by ``onnxscript.optimizer.optimize`` + its BN fusion rules, and the seconds."""
    import onnxscript.optimizer
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
    )

    model = onnx.load(str(path))
    t0 = time.perf_counter()
    try:
        model = onnxscript.optimizer.optimize(model)
        model = rewriter.rewrite(model, pattern_rewrite_rules=[
            fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule])
    except Exception as exc:
        return f"error ({type(exc).__name__})", time.perf_counter() - t0
    return bn_count(model), time.perf_counter() - t0


def measure_zoo(name: str, exporter: str, src: Path, out_dir: Path, note: str) -> dict[str, object]:
    f = fold_file(src, out_dir / f"{name}.{exporter}.folded.onnx")
    before, report, fold_s, parity = f.before, f.report, f.seconds, f.parity
    t0 = time.perf_counter()
    sim = onnxsim_bns(src)
    sim_s = time.perf_counter() - t0
    script, script_s = onnxscript_bns(src)
    peers = [v for v in (sim, script) if isinstance(v, int)]
    left = bn_count(f.model)
    verdict = "ok" if peers and left <= min(peers) else "WORSE"
    return {"model": name, "exporter": exporter + (f" ({note})" if note else ""), "key": exporter, "bn_before": before,
            "bnfold": left, "onnxsim": sim, "onnxscript": script, "vs_best_peer": verdict,
            "parity": f"{'PASS' if parity.passed else 'FAIL'} ({'fp64' if parity.reference_fp64 else 'elementwise'})",
            "bnfold_s": f"{fold_s:.2f}", "onnxsim_s": f"{sim_s:.2f}", "onnxscript_s": f"{script_s:.2f}",
            "left_reason": "; ".join(f"{e.reason[:70]}" for e in report.skipped[:1])}


def main_zoo(args: argparse.Namespace, out: Path) -> None:
    exporters = args.exporters.split(",")
    rows = []
    for name, (make, shape) in ZOO.items():
        if args.only and name not in args.only:
            continue
        model = make()
        x = torch.randn(shape)
        for exporter in exporters:
            src, note = export_zoo(model, x, out / f"{name}.{exporter}.onnx", exporter)
            r = measure_zoo(name, exporter, src, out, note)
            rows.append(r)
            print(r, file=sys.stderr, flush=True)
    cols = ["model", "exporter", "bn_before", "bnfold", "onnxsim", "onnxscript", "vs_best_peer", "parity",
            "bnfold_s", "onnxsim_s", "onnxscript_s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    for exporter in exporters:
        mine = [r for r in rows if r["key"] == exporter]
        total = {k: sum(int(r[k]) for r in mine if isinstance(r[k], int)) for k in ("bn_before", "bnfold", "onnxsim",
                                                                                  "onnxscript")}
        secs = sum(float(str(r["bnfold_s"])) for r in mine)
        print(f"\n{exporter}: {len(mine)} files, BatchNormalization {total['bn_before']} before; left: bnfold "
              f"{total['bnfold']}, onnxsim {total['onnxsim']}, onnxscript {total['onnxscript']}; bnfold "
              f"{secs:.1f} s in all; worse than the best peer on "
              f"{sum(r['vs_best_peer'] != 'ok' for r in mine)} files; parity PASS (fp64) on "
              f"{sum(str(r['parity']) == 'PASS (fp64)' for r in mine)} of {len(mine)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--out")
    ap.add_argument("--zoo", action="store_true", help="the exporter zoo (module docstring)")
    ap.add_argument("--exporters", default=",".join(EXPORTERS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out or tempfile.mkdtemp(prefix="bnfold-onnx-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.zoo:
        main_zoo(args, out)
        return
    cases: list[tuple[str, Path]] = []
    for name, (make, shape) in ARCHS.items():
        if args.only and name not in args.only:
            continue
        try:
            model = make()
        except ImportError as exc:
            print(f"skip {name}: {exc}", file=sys.stderr)
            continue
        cases.append((name, export(model, torch.randn(shape), out / f"{name}.onnx")))
    for name, make in BUILT.items():
        if args.only and name not in args.only:
            continue
        model, shape = make()
        cases.append((name, export(model, torch.randn(shape), out / f"{name}.onnx")))
    if not args.only or "shared_initializer" in args.only:
        cases.append(("shared_initializer", shared_weight_model(out / "shared_initializer.onnx")))
    if not args.only or "external_data" in args.only:
        make, shape = ARCHS["resnet18"]
        ext = out / "ext"
        ext.mkdir(exist_ok=True)
        cases.append(("resnet18_external_data", export(make(), torch.randn(shape), ext / "resnet18.onnx",
                                                       external=True)))
    rows = []
    for name, path in cases:
        r = measure(name, path, out)
        rows.append(r)
        print(r, file=sys.stderr, flush=True)
    cols = ["model", "bn_before", "bn_bnfold", "bn_onnxsim", "nodes", "parity", "batch5", "external", "fold_ms"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
