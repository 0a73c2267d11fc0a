"""bnfold + TVM (untuned, optionally tuned) beside PyTorch eager, torch.compile (inductor), ONNX Runtime and OpenVINO
over a zoo of CNNs and transformers: batch 1, fp32, all engines side by side in one process (issue 23).

    flock /tmp/bnfold-timing.lock .venv/bin/python bench/bench_tvm_zoo.py --json bench/tvm_zoo.json

Models (random weights, randomized norm statistics and affines, seeded): torchvision resnet18, resnet50,
mobilenet_v2, mobilenet_v3_large, efficientnet_b0, regnet_y_400mf (224×224); timm convnext_nano,
vit_tiny_patch16_224, deit_small_patch16_224, swin_tiny_patch4_window7_224 (224×224); transformers BERT-base
(12 layers, 768 wide, sequence length 128, the encoder's last hidden state) and a Llama-style decoder (8 layers, 512
wide, vocabulary 32000, 128 tokens, the logits).

For each model: fold it (:func:`bnfold.fold`); export the folded model to ONNX (``bnfold.targets.onnx``) for ONNX
Runtime and OpenVINO (``INFERENCE_PRECISION_HINT=f32``: its default on a bf16/AMX host is bf16); ``torch.compile``
the folded model (inductor, CPU); ``bnfold.compile(folded, x)`` with no tuning database (what ``optimize`` and
``compile`` build by default) and, with ``--trials-per-kernel N``, tuned with ``N`` × kernels trials in a fresh
database (``--db-dir``: kept, and reused by a later run with the same budget; ``--tune-only A,B``: only those
models; the others' tuned column is their untuned build, budget 0, from
the same run); check each TVM artifact's parity against the folded model (the float64 rule); then time every engine in
interleaved rounds (``--rounds`` × ``--per-round`` calls after a warm-up, one untimed call at the start of each
engine's turn) and report the medians. Every engine gets the usable cores as threads. An engine that fails
(export, compile) is reported as such, the others still run. OpenVINO is optional (``pip install openvino``).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_tvm.py: PyTorch's OpenMP must not spin

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import bnfold
from bnfold.targets.tvm import UntunedKernelsWarning, configure_threads, tuning_tasks
from bnfold.targets.tvm.target import cpu_target, usable_cores

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_tvm import _time_interleaved  # one timing method for both TVM benchmarks (interleaved rounds)
from helpers import randomize_bn
from zoo_timm import Out, randomize_norms

log = logging.getLogger("bench_tvm_zoo")

TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf"]
TIMM = ["convnext_nano", "vit_tiny_patch16_224", "deit_small_patch16_224", "swin_tiny_patch4_window7_224"]
HF = ["bert_base", "llama_tiny"]
ZOO = TORCHVISION + TIMM + HF


def build_model(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A zoo model (eval mode) and its example input."""
    torch.manual_seed(0)
    image = (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)),)
    if name in TORCHVISION:
        import torchvision

        return randomize_norms(randomize_bn(getattr(torchvision.models, name)())).eval(), image
    if name in TIMM:
        import timm

        return randomize_norms(timm.create_model(name, pretrained=False)).eval(), image
    import transformers

    ids = (torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(1)),)
    if name == "bert_base":
        model = transformers.BertModel(transformers.BertConfig(), add_pooling_layer=False)
        return Out(randomize_norms(model), "last_hidden_state").eval(), ids
    if name == "llama_tiny":
        cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                                       num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                                       max_position_embeddings=512, use_cache=False)
        return Out(randomize_norms(transformers.LlamaForCausalLM(cfg)), "logits").eval(), ids
    raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")


def _ort(path: Path, x: tuple[torch.Tensor, ...], threads: int) -> Callable[[], Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), x, strict=True)}
    return lambda: sess.run(None, feed)


def _openvino(path: Path, x: tuple[torch.Tensor, ...], threads: int) -> Callable[[], Any]:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                     "INFERENCE_NUM_THREADS": threads,
                                                     "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    feed = [t.numpy() for t in x]
    return lambda: request.infer(feed)


def _try(what: str, errors: dict[str, str], fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as e:  # an engine that cannot take this model: reported, the others still run
        log.warning("%s failed: %s", what, e)
        log.debug("%s", traceback.format_exc())
        errors[what] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        return None


def bench_model(name: str, args: argparse.Namespace, threads: int, workdir: Path) -> dict[str, Any]:
    model, x = build_model(name)
    folded = bnfold.fold(model, x).module
    errors: dict[str, str] = {}
    engines: dict[str, Callable[[], Any]] = {"eager": lambda: folded(*x)}
    onnx_path = workdir / f"{name}.onnx"

    def export() -> Path:
        from bnfold.targets.onnx import export_onnx

        export_onnx(folded, x, onnx_path, dynamic_batch=False)
        return onnx_path

    exported = _try("onnx export", errors, export)
    if "inductor" in args.engines:
        compiled = torch.compile(folded)

        def warm() -> Callable[[], Any]:
            with torch.inference_mode():
                compiled(*x)
            return lambda: compiled(*x)

        t0 = time.perf_counter()
        run = _try("inductor", errors, warm)
        if run is not None:
            engines["inductor"] = run
            log.info("%s: torch.compile %.0f s", name, time.perf_counter() - t0)
    if exported is not None:
        run = _try("ort", errors, lambda: _ort(onnx_path, x, threads))
        if run is not None:
            engines["ort"] = run
        if "openvino" in args.engines:
            run = _try("openvino", errors, lambda: _openvino(onnx_path, x, threads))
            if run is not None:
                engines["openvino"] = run
    info: dict[str, Any] = {"model": name, "errors": errors}
    db_root = Path(args.db_dir) if args.db_dir else workdir
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UntunedKernelsWarning)
        t0 = time.perf_counter()
        art = _try("tvm untuned", errors, lambda: bnfold.compile(folded, x, target="llvm",
                                                                 cache_dir=workdir / "empty-cache"))
        info["compile_s"] = round(time.perf_counter() - t0, 1)
        tuned = None
        if art is not None and args.trials_per_kernel and args.tune_only and name not in args.tune_only.split(","):
            info["kernels"], info["trials"] = None, 0  # budget 0: the tuned build is the untuned one
            info["tuning"] = {"trials_run": 0, "seconds": 0.0, "failed_runs": 0, "failed_builds": 0}
        elif art is not None and args.trials_per_kernel:
            kernels = len(tuning_tasks(folded, x))
            info["kernels"], info["trials"] = kernels, kernels * args.trials_per_kernel
            tuned = _try("tvm tuned", errors, lambda: bnfold.compile(
                folded, x, target="llvm", tune_trials=info["trials"], cache_dir=db_root / f"{name}-db",
                progress=False))
    info["warnings"] = [str(w.message)[:300] for w in caught if issubclass(w.category, UntunedKernelsWarning)]
    for label, a in (("tvm", art), ("tvm tuned", tuned)):
        if a is None:
            continue
        parity = bnfold.compare(folded, a, x).summary()
        info[f"{label} parity"] = {"passed": bool(parity["passed"]), "max_abs": float(parity["max_abs"])}
        engines[label] = (lambda a=a: a(*x))
        if label == "tvm tuned":
            info["tuning"] = _tuning_record(a.build_info["tuning"], db_root / f"{name}-tuning.json")
    info["timings"] = _time_interleaved(engines, args.rounds, args.per_round, args.warmup)
    if info.get("trials") == 0 and "tvm" in info["timings"]:  # budget 0: the same artifact, measured once
        info["timings"]["tvm tuned"] = info["timings"]["tvm"]
        info["tvm tuned parity"] = info.get("tvm parity")
    return info


def _tuning_record(t: dict[str, Any], record: Path) -> dict[str, Any]:
    """What the tuning of this model cost: this run's figures when it tuned, else (``--db-dir``, a database tuned
    by an earlier run with this budget and reused as is) those of the run that tuned it, marked ``reused``."""
    if t["trials_run"] == 0 and record.exists():
        return {**json.loads(record.read_text()), "reused": True}
    info = {"trials_run": t["trials_run"], "seconds": t["seconds"], "failed_runs": t.get("failed_runs"),
            "failed_builds": t.get("failed_builds"), "tuned_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average": os.getloadavg()}
    if t["trials_run"] > 0:
        record.write_text(json.dumps(info, indent=2))
    return info


def table(results: list[dict[str, Any]], engines: list[str]) -> str:
    """Medians (ms) per engine and TVM's ratios to eager and ORT (untuned, and tuned when it ran); the summary
    lines give the medians, the worst model and, for tuning, its budget, time and lost trials."""
    cols = [e for e in ["eager", "inductor", "ort", "openvino", "tvm", "tvm tuned"] if e in engines]
    tuned = "tvm tuned" in cols
    head = ("| model | " + " | ".join(f"{c} ms" for c in cols) + " | TVM / eager | TVM / ORT |"
            + (" tuned / ORT |" if tuned else "") + " parity |")
    lines = [head, "|---|" + "---:|" * (len(cols) + 2 + tuned) + "---|"]
    for r in results:
        t = {k: v["median_ms"] for k, v in r.get("timings", {}).items()}
        cells = [f"{t[c]:.2f}" if c in t else "—" for c in cols]
        eager, ort = t.get("eager"), t.get("ort")
        ratios = [f"{t['tvm'] / eager:.2f}" if t.get("tvm") and eager else "—",
                  f"{t['tvm'] / ort:.2f}" if t.get("tvm") and ort else "—"]
        if tuned:
            ratios.append(f"{t['tvm tuned'] / ort:.2f}" if t.get("tvm tuned") and ort else "—")
        verdicts = [r.get(k) for k in ("tvm parity", "tvm tuned parity") if r.get(k)]
        par = "—" if not verdicts else "PASS" if all(v["passed"] for v in verdicts) else "FAIL"
        lines.append(f"| {r['model']} | " + " | ".join(cells + ratios) + f" | {par} |")
    for engine, label in (("tvm", "TVM untuned"), ("tvm tuned", "TVM tuned")):
        ratios_ = [r["timings"][engine]["median_ms"] / r["timings"]["ort"]["median_ms"] for r in results
                   if engine in r.get("timings", {}) and "ort" in r.get("timings", {})]
        slower = [r["model"] for r in results if engine in r.get("timings", {})
                  and r["timings"][engine]["median_ms"] >= r["timings"]["eager"]["median_ms"]]
        if ratios_:
            lines.append("")
            lines.append(f"{label} / ORT: median {statistics.median(ratios_):.2f}, worst {max(ratios_):.2f}; "
                         f"slower than eager: {', '.join(slower) or 'none'}")
    runs = [r["tuning"] for r in results if r.get("tuning")]
    if runs:
        budgets = ", ".join(f"{r['model']} {r.get('trials')}" for r in results if r.get("tuning"))
        lines.append(f"tuning: {sum(t['trials_run'] for t in runs)} trials in {sum(t['seconds'] for t in runs):.0f} s "
                     f"over {len(runs)} models (budget per model: {budgets}; 0 = the untuned build); runner "
                     f"workers lost: {sum(t.get('failed_runs') or 0 for t in runs)}, candidates that did not build: "
                     f"{sum(t.get('failed_builds') or 0 for t in runs)}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(ZOO))
    ap.add_argument("--engines", default="inductor,openvino", help="optional engines to add (default: both)")
    ap.add_argument("--trials-per-kernel", type=int, default=0, help="also tune, with this many trials × kernels")
    ap.add_argument("--tune-only", default="", help="with --trials-per-kernel: tune only these models (comma-"
                    "separated); the others' tuned column is their untuned build (budget 0), from the same run")
    ap.add_argument("--db-dir", help="keep each model's tuning database here (DIR/<model>-db) instead of a fresh "
                    "one per run: a later run with the same budget reuses it and reports the tuning run's figures")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", help="write results as JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = usable_cores()
    torch.set_num_threads(threads)
    configure_threads(threads)
    spec = cpu_target()
    meta = {"cpu": platform.processor(), "mcpu": spec.mcpu, "isa": spec.isa()["features"], "threads": threads,
            "torch": torch.__version__, "load_average_start": os.getloadavg()}
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-tvm-zoo-") as tmp:
        for name in args.models.split(","):
            log.info("%s ...", name)
            results.append(bench_model(name.strip(), args, threads, Path(tmp)))
            log.info("%s done:\n%s", name, table(results[-1:], list(results[-1]["timings"])))
            if args.json:
                Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    meta["load_average_end"] = os.getloadavg()
    engines = sorted({e for r in results for e in r.get("timings", {})})
    print(f"host: mcpu {meta['mcpu']} ({', '.join(meta['isa'])}), {threads} threads, "
          f"load {meta['load_average_start']} → {meta['load_average_end']}")
    print(table(results, engines))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
