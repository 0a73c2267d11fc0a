"""Fold an ONNX model: load it safely, run the rules (:mod:`bnfold.passes.onnx.rules`), check and write it.

* :func:`load_onnx` — a readable, complete ONNX file (a truncated or malformed one is an
  :class:`~bnfold.errors.InputError`), its external data read only from the model's own folder;
* :func:`fold_model` — the rules on a ``ModelProto`` (edited in place), and the report, built like the torch
  fold's (:func:`bnfold.api.build_report`: same rules, reasons, categories), plus op counts;
* :func:`save_onnx` — ``onnx.checker.check_model(full_check=True)`` (which also runs strict shape inference), then
  an atomic write: a model that kept its weights in external data is written with external data too
  (``OUT.onnx`` + ``OUT.onnx.data``, the same tensors outside the protobuf: those at least as large as the
  smallest one the input kept outside).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import external_data_helper, numpy_helper

from bnfold.errors import InputError
from bnfold.io.outputs import atomic_output
from bnfold.passes.engine import PipelineResult
from bnfold.passes.onnx.graph import OnnxGraph
from bnfold.passes.onnx.moves import SYMBOL_SIZES
from bnfold.passes.onnx.report import OnnxFoldReport
from bnfold.passes.onnx.rules import RULES, run_rules
from bnfold.passes.onnx.shapes import concrete_shapes, infer_shapes

__all__ = ["LoadedOnnx", "fold_model", "load_onnx", "op_counts", "save_onnx"]

_MAX_PROTO = 2**31 - 1
DEFAULT_THRESHOLD = 1024


@dataclass
class LoadedOnnx:
    """A loaded model; ``external``: it kept tensors in external data (``threshold``: the smallest, in bytes)."""

    model: onnx.ModelProto
    path: Path
    external: bool = False
    threshold: int = DEFAULT_THRESHOLD
    data_files: list[Path] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Bytes on disk: the model file and its external data files."""
        return file_size(self.path) + sum(file_size(p) for p in self.data_files)


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def load_onnx(path: str | os.PathLike[str]) -> LoadedOnnx:
    """Read ``path`` as an ONNX model with its external data (refused when it lives outside the model's folder).
    Anything that is not a complete ONNX model is an :class:`InputError`."""
    from bnfold.targets.onnx import check_external_data

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p} is a folder, not an ONNX file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        raise InputError(f"{p} is not a readable ONNX model (malformed or truncated?): {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}",
                         hint="re-export it; `python -m onnx.checker` (onnx.checker.check_model) says more") from exc
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{p} holds no ONNX graph (empty or not an ONNX file)")
    check_external_data(p)
    external = [t for t in external_data_helper._get_all_tensors(model)
                if t.data_location == onnx.TensorProto.EXTERNAL]
    files = sorted({p.parent / next((e.value for e in t.external_data if e.key == "location"), "")
                    for t in external})
    threshold = DEFAULT_THRESHOLD
    if external:
        lengths = [int(next((e.value for e in t.external_data if e.key == "length"), 0)) for t in external]
        threshold = max(1, min((n for n in lengths if n), default=DEFAULT_THRESHOLD))
        try:
            external_data_helper.load_external_data_for_model(model, str(p.parent))
        except Exception as exc:
            raise InputError(f"{p}: its external data could not be read: {type(exc).__name__}: {exc}",
                             hint="keep the data files next to the model, complete") from exc
    try:
        onnx.checker.check_model(model if model.ByteSize() < _MAX_PROTO else str(p))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(f"{p} is not a valid ONNX model: {type(exc).__name__}: {first}") from exc
    return LoadedOnnx(model, p, bool(external), threshold, files)


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    """Nodes per op type in the top-level graph (``domain::Op`` outside the default domain)."""
    return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.graph.node)


def fold_model(model: onnx.ModelProto, *, base_dir: str = "", dry_run: bool = False) -> OnnxFoldReport:
    """Fold every normalization of ``model`` that folds exactly (``model`` is edited in place; with ``dry_run``
    a copy is folded to report what would happen) and report."""
    from bnfold.api import build_report

    if dry_run:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    before = op_counts(model)
    g = OnnxGraph(model, base_dir=base_dir)
    g.shapes = infer_shapes(model)
    g.shapes_at = concrete_shapes(model, SYMBOL_SIZES)
    run = run_rules(g)
    result = PipelineResult(run.rounds, run.changes, [r for rs in run.rejections.values() for r in rs],
                            list(run.candidates.values()), list(run.timings.values()), converged=True)
    base = build_report("onnx", result)
    report = OnnxFoldReport(**{f: getattr(base, f) for f in ("capture", "folded", "skipped", "changes", "passes",
                                                             "rounds", "parity", "dry_run")})
    report.dry_run = dry_run
    after = op_counts(model)
    report.op_counts = {op: (before.get(op, 0), after.get(op, 0)) for op in sorted(set(before) | set(after))}
    report.opset = g.opset()
    return report


def check_folded(model: onnx.ModelProto) -> None:
    """``onnx.checker`` with ``full_check`` (strict shape inference included); a failure is bnfold's bug."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        from bnfold.errors import InternalError

        raise InternalError(f"the folded ONNX model fails onnx.checker: {type(exc).__name__}: {exc}",
                            hint="please report this with the model", pass_name="onnx.checker", node=None,
                            passes_before=RULES) from exc


def save_onnx(model: onnx.ModelProto, dest: str | os.PathLike[str], *, external: bool = False,
              threshold: int = DEFAULT_THRESHOLD, protect: list[str | os.PathLike[str]] | tuple = ()) -> list[Path]:
    """Check ``model`` and write it to ``dest`` atomically (with its tensors of ``threshold`` bytes or more in
    ``DEST.data`` when ``external``, or when it is too large for one protobuf). Returns the files written."""
    d = Path(dest)
    small = model.ByteSize() < _MAX_PROTO
    if small:
        check_folded(model)
    if not external and small:
        with atomic_output(d, protect=protect) as tmp:
            tmp.write_bytes(model.SerializeToString())
        return [d]
    location = f"{d.name}.data"
    data_dest = d.parent / location
    for q in protect:
        if Path(q).exists() and data_dest.exists() and os.path.samefile(q, data_dest):
            raise InputError(f"refusing to overwrite the input's external data {data_dest}",
                             hint="write the output to another folder or name")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    with atomic_output(data_dest, protect=protect) as tmp_data, open(tmp_data, "wb") as f:
        for t in external_data_helper._get_all_tensors(out):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                continue
            raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
            if len(raw) < threshold:
                continue
            pad = (-f.tell()) % 4096  # page-aligned offsets, as onnx writes them
            f.write(b"\0" * pad)
            offset = f.tell()
            f.write(raw)
            kept = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, doc_string=t.doc_string)
            kept.raw_data = raw
            t.CopyFrom(kept)
            external_data_helper.set_external_data(t, location, offset, len(raw))
            t.data_location = onnx.TensorProto.EXTERNAL
            t.ClearField("raw_data")
        f.flush()
        os.fsync(f.fileno())
    try:
        with atomic_output(d, protect=protect) as tmp:
            tmp.write_bytes(out.SerializeToString())
            if not small:  # too large to check in memory: check the file (its data is already in place)
                onnx.checker.check_model(str(tmp), full_check=True)
    except BaseException:
        data_dest.unlink(missing_ok=True)
        raise
    return [d, data_dest]


__all__ += ["RULES", "check_folded", "file_size"]
