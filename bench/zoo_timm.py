"""Fold coverage on the models people deploy: timm architectures and Hugging Face transformers (issue 12).

    .venv/bin/python bench/zoo_timm.py [--models mixnet_s,levit_128s,hf_llama] [--auto]

For each model (random weights, randomized norm statistics, ``tests/zoo_timm.py``): norms in the model, BNs
``torch.fx.experimental.optimization.fuse`` leaves, then per capture (symbolic, export) norms found / folded / left,
whether both captures fold the same set of norms (by module path), what ``capture="auto"`` folds (it folds with both
captures and keeps the better one, so its row follows from the two: with ``--auto`` it is run for real), the float64
parity verdict, and the norms left by reason category (``tests/zoo_timm.py: CATEGORIES``; docs/architecture.md).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch
from zoo_timm import TIMM, Row, fold_row, hf_models, left_by_fx_fuse, n_norms, timm_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated subset (timm names and hf_llama, hf_qwen2, hf_gemma, hf_bert, "
                                     "hf_vit, hf_gpt2)")
    ap.add_argument("--auto", action="store_true", help="also run capture='auto' (else derived from the two)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    hf = hf_models()
    names = args.models.split(",") if args.models else [*TIMM, *hf]
    print("| model | norms | BNs left by fx.fuse | symbolic found / folded / left | export found / folded / left | "
          "same set | auto folds | parity | left by category | seconds |")
    print("|---|---:|---:|---|---|---|---|---|---|---:|")
    totals: Counter[str] = Counter()
    for name in names:
        start = time.perf_counter()
        model, inputs = hf[name]() if name in hf else timm_model(name)
        fx_left = left_by_fx_fuse(model)
        rows = {c: fold_row(name, model, inputs, c) for c in ("symbolic", "export")}
        ok = [r for r in rows.values() if not r.error]
        best = max(ok, key=lambda r: (r.folded, -(r.found - r.folded), r.capture == "symbolic")) if ok else None
        auto = fold_row(name, model, inputs, "auto") if args.auto else best
        same = "n/a (one capture)" if len(ok) < 2 else ("yes" if ok[0].folded_paths == ok[1].folded_paths else
                                                         f"no ({_diff(ok[0], ok[1])})")
        parity = all(r.parity for r in ok) and (auto is None or auto.parity is not False)
        left = auto.left if auto is not None else Counter()
        totals.update(left)
        cats = "; ".join(f"{n} {c}" for c, n in left.most_common()) or "-"
        auto_txt = "-" if auto is None else f"{auto.folded} ({auto.used or auto.capture})"
        print(f"| {name} | {n_norms(model)} | {'n/a' if fx_left is None else fx_left} | {_cell(rows['symbolic'])} | "
              f"{_cell(rows['export'])} | {same} | {auto_txt} | {'pass' if parity else 'FAIL'} | {cats} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)
    print("\nnorms left, all models (auto): " + ("; ".join(f"{n} {c}" for c, n in totals.most_common()) or "none"))
    return 0


def _cell(r: Row) -> str:
    if r.error:
        return f"cannot capture ({r.error.split('(', 1)[-1][:70]})"
    return f"{r.found} / {r.folded} / {r.found - r.folded}"


def _diff(a: Row, b: Row) -> str:
    only_a, only_b = sorted(a.folded_paths - b.folded_paths), sorted(b.folded_paths - a.folded_paths)
    return f"{a.capture} only: {', '.join(only_a[:3]) or '-'}; {b.capture} only: {', '.join(only_b[:3]) or '-'}"


if __name__ == "__main__":
    raise SystemExit(main())
