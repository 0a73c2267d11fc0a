"""The properties every ONNX fold must keep, checked on one generated model (see :mod:`onnxgen`) through the command
line itself: ``bnfold fold model.onnx -o folded.onnx --data inputs.npz`` (``bnfold.cli.main``, in process).

:func:`check_onnx_fold` returns ``None`` when all hold, else a one-line failure:

* the command exits 0 — 1 is a parity failure, 2 means bnfold refused a valid model ONNX Runtime runs (its inputs
  come from the model's own declared inputs), 3 a crash;
* parity: ONNX Runtime on the folded file vs the original, on the 32-sample inputs, judged by the float64 rule
  (:func:`bnfold.parity.ort.onnx_parity`: a float64 copy of the graph as the reference) — a verdict without a float64
  reference (the elementwise fallback) counts as a failure;
* the inputs are unchanged: every file in the input folder (the model and its external data) byte-identical;
* the outputs are exactly ``folded.onnx`` and, when it keeps tensors outside (only if the input did),
  ``folded.onnx.data``: every external tensor of ``folded.onnx`` is in ``folded.onnx.data``, never in the input's
  data file; nothing else is left in the output folder (no staging folder, no orphan data file);
* no BatchNormalization more than before; and the fold is idempotent: folding ``folded.onnx`` again changes
  nothing (a dry run reports no change).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tempfile
import traceback
from pathlib import Path

import numpy as np
import onnx
from onnxgen import OnnxCase, save_case

__all__ = ["check_onnx_fold"]


def _sums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _bn_count(path: Path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path), load_external_data=False).graph.node)


def check_onnx_fold(case: OnnxCase, workdir: Path | None = None) -> str | None:
    """``None`` when the fold of ``case`` keeps every property above, else what broke (``workdir``: where to write
    the files; a temporary folder by default)."""
    with contextlib.ExitStack() as stack:
        root = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        try:
            return _check(case, root)
        except KeyboardInterrupt:
            raise
        except Exception:
            return "checker crashed: " + traceback.format_exc(limit=-3).replace("\n", " | ")


def _check(case: OnnxCase, root: Path) -> str | None:
    from bnfold.cli import main
    from bnfold.io.references import onnx_external_files
    from bnfold.onnx import fold_model, load_onnx

    src_dir, out_dir = root / "in", root / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = save_case(case, src_dir)
    data = src_dir / "inputs.npz"
    np.savez(data, x=case.check_inputs[0].numpy())
    before = _sums(src_dir)
    out = out_dir / "folded.onnx"
    argv = ["fold", str(src), "-o", str(out), "--data", str(data), "--json"]
    if case.fixed_batch is not None:
        argv += ["--batch-size", str(case.fixed_batch)]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    err = stderr.getvalue().strip().replace("\n", " | ")
    if code == 130:  # the CLI took a Ctrl-C/SIGTERM meant for the fuzzing run: stop it, do not count a failure
        raise KeyboardInterrupt
    if code != 0:
        if code == 1:
            try:
                parity = json.loads(stdout.getvalue())["parity"]
            except (ValueError, KeyError):
                parity = stdout.getvalue()[-400:]
            return f"parity: {parity}"
        return f"exit {code}: {err[:600]}"
    report = json.loads(stdout.getvalue())
    parity = report.get("parity") or {}
    if not parity.get("passed") or parity.get("inputs") != "user":
        return f"parity not judged on the user's data: {parity}"
    if "rmse_vs_fp64" not in parity:  # judged without the float64 rule
        return f"no float64 reference: {[n for n in report.get('notes', []) if 'float64' in n]}"
    if _sums(src_dir) != before:
        changed = sorted(k for k in set(before) | set(_sums(src_dir)) if before.get(k) != _sums(src_dir).get(k))
        return f"input files changed: {changed}"
    written = sorted(p.name for p in out_dir.iterdir())
    refs = onnx_external_files(out)
    if refs not in ([], [out_dir / "folded.onnx.data"]):
        return f"folded.onnx references {refs}, not (only) its own data file"
    if refs and not onnx_external_files(src):
        return "folded.onnx has external data though the input had none"
    expected = ["folded.onnx", *(["folded.onnx.data"] if refs else [])]
    if written != expected:
        return f"output folder holds {written}, expected {expected}"
    if _bn_count(out) > _bn_count(src):
        return f"more BatchNormalization after the fold ({_bn_count(src)} -> {_bn_count(out)})"
    again = fold_model(load_onnx(out).model, base_dir=str(out_dir), dry_run=True)
    if again.changes:
        return f"not idempotent: a second fold would change {[c.detail for c in again.changes][:3]}"
    return None
