"""ONNX fold vs onnxsim: BatchNormalization nodes before, after ``bnfold fold``, after ``onnxsim.simplify`` (same file),
ORT parity of the folded file (float64 rule where a float64 reference runs), and a run at another batch size.

    .venv/bin/python bench/onnx_fold.py [--only NAME ...] [--out DIR]

Prints a Markdown table (the one in BENCHMARKS.md). Models: tests/onnxfold/onnx_cases.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "onnxfold"))

from onnx_cases import ARCHS, BUILT, export, shared_weight_model

from bnfold.onnx_fold import fold_model, load_onnx, save_onnx
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


def measure(name: str, src: Path, out_dir: Path) -> dict[str, object]:
    loaded = load_onnx(src)
    before = bn_count(loaded.model)
    original = onnx.ModelProto()
    original.CopyFrom(loaded.model)
    t0 = time.perf_counter()
    report = fold_model(loaded.model, base_dir=str(src.parent))
    fold_s = time.perf_counter() - t0
    dest = out_dir / f"{name}.folded.onnx"
    written = save_onnx(loaded.model, dest, external=loaded.external, threshold=loaded.threshold)
    parity = onnx_parity(original, dest)
    fp64 = "fp64" if parity.reference_fp64 else "elementwise"
    return {"model": name, "bn_before": before, "bn_bnfold": bn_count(loaded.model), "bn_onnxsim": onnxsim_bns(src),
            "nodes": f"{len(original.graph.node)} → {len(loaded.model.graph.node)}",
            "parity": f"{'PASS' if parity.passed else 'FAIL'} ({fp64}, max abs {parity.summary()['max_abs']:.1e})",
            "batch5": other_batch(dest, loaded.model), "external": "yes" if len(written) > 1 else "",
            "fold_ms": f"{fold_s * 1000:.0f}",
            "left": "; ".join(f"{e.id}: {e.reason[:60]}" for e in report.skipped[:2])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out or tempfile.mkdtemp(prefix="bnfold-onnx-bench-"))
    out.mkdir(parents=True, exist_ok=True)
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
