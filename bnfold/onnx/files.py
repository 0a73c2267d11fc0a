"""ONNX files in and out of the fold: load them safely, check and write them.

* :func:`load_onnx` — a readable, complete ONNX file (a truncated or malformed one is an
  :class:`~bnfold.errors.InputError`), its external data read only from the model's own folder;
* :func:`save_onnx` / :func:`staged_onnx` — ``onnx.checker.check_model(full_check=True)`` (which also runs strict
  shape inference), then an atomic write: a model that kept its weights in external data is written with external
  data too (``OUT.onnx`` + ``OUT.onnx.data``: the initializers at least as large as the smallest one the input kept
  outside, and at least :data:`MIN_EXTERNAL_BYTES`), the two files published together, the model referencing exactly
  its own data file (:mod:`bnfold.io.outputs`: never an input's, never a file bnfold did not write).
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import external_data_helper, numpy_helper

from bnfold.errors import InputError
from bnfold.io.outputs import atomic_files, protected_files, same_file

__all__ = ["MIN_EXTERNAL_BYTES", "LoadedOnnx", "check_folded", "data_file", "file_size", "load_onnx",
           "needs_data_file", "op_counts", "save_onnx", "staged_onnx"]

_MAX_PROTO = 2**31 - 1
DEFAULT_THRESHOLD = 1024
MIN_EXTERNAL_BYTES = 1024
"""Initializers smaller than this stay inline in a model written with external data, whatever the input did: ONNX
Runtime reads small shape-giving inputs (``Pad`` pads, ``Reshape`` shapes, ``Resize`` scales, ``ReduceMean`` axes)
while it loads a model and cannot take them from external data ("Cannot parse data from external tensors"; found by
the ONNX fuzzer on inputs that kept every tensor outside)."""


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


def check_folded(model: onnx.ModelProto) -> None:
    """``onnx.checker`` with ``full_check`` (strict shape inference included); a failure is bnfold's bug."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        from bnfold.errors import InternalError

        raise InternalError(f"the folded ONNX model fails onnx.checker: {type(exc).__name__}: {exc}",
                            hint="please report this with the model", pass_name="onnx.checker", node=None,
                            passes_before=()) from exc


def data_file(dest: str | os.PathLike[str]) -> Path:
    """Where the external data of an ONNX file written to ``dest`` goes: ``DEST.data`` beside it (named after the
    output, so an input's data file is never this one unless the output plan refuses it)."""
    d = Path(dest)
    return d.with_name(f"{d.name}.data")


def needs_data_file(model: onnx.ModelProto, *, external: bool, threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Whether :func:`save_onnx` writes ``model`` with a data file: asked for (``external``) or too large for one
    protobuf, and some initializer is large enough to go there (:func:`_outside`)."""
    return (external or model.ByteSize() >= _MAX_PROTO) and bool(_outside(model, threshold))


def _nbytes(t: onnx.TensorProto) -> int:
    return len(t.raw_data) if t.HasField("raw_data") else int(numpy_helper.to_array(t).nbytes)


def _outside(model: onnx.ModelProto, threshold: int) -> list[onnx.TensorProto]:
    """The initializers (of every graph) a data file holds: those of at least ``threshold`` and
    :data:`MIN_EXTERNAL_BYTES` bytes. Constants in node attributes stay inline, as ``onnx.save_model`` keeps them."""
    least = max(threshold, MIN_EXTERNAL_BYTES)
    return [t for t in external_data_helper._get_initializer_tensors(model) if _nbytes(t) >= least]


def save_onnx(model: onnx.ModelProto, dest: str | os.PathLike[str], *, external: bool = False,
              threshold: int = DEFAULT_THRESHOLD, protect: Sequence[str | os.PathLike[str]] = ()
              ) -> list[Path]:
    """Check ``model`` and write it to ``dest`` atomically (with its initializers of ``threshold`` bytes or more in
    ``DEST.data`` when ``external``, or when it is too large for one protobuf: :func:`needs_data_file`). Returns
    the files written."""
    with staged_onnx(model, dest, external=external, threshold=threshold, protect=protect) as staged:
        pass
    return [Path(dest), *([data_file(dest)] if len(staged) > 1 else [])]


@contextlib.contextmanager
def staged_onnx(model: onnx.ModelProto, dest: str | os.PathLike[str], *, external: bool = False,
                threshold: int = DEFAULT_THRESHOLD, protect: Sequence[str | os.PathLike[str]] = ()
                ) -> Iterator[list[Path]]:
    """:func:`save_onnx` as a block: the checked model (and its data file) is written under its final names in a
    staging folder beside ``dest`` and yielded there (``[model, data]``; the model's relative reference to its data
    resolves in that folder, so it can be run — ONNX Runtime parity — before it is published), then published
    together when the block ends normally (:func:`~bnfold.io.outputs.atomic_files`); after an exception nothing is
    left. The written model references exactly ``DEST.data`` and nothing else. Replacing an earlier bnfold model
    that kept its data in ``DEST.data`` with one that needs none removes that data file too."""
    d = Path(dest)
    elsewhere = [t.name for t in external_data_helper._get_all_tensors(model)
                 if t.data_location == onnx.TensorProto.EXTERNAL]
    if elsewhere:  # it would reference another file's data (an input's): load the data first
        raise InputError(f"cannot write {d}: tensor {elsewhere[0]!r} still refers to the external data it was loaded "
                         "from", hint="load the model with its external data (bnfold.onnx.load_onnx)")
    small = model.ByteSize() < _MAX_PROTO
    if small:
        check_folded(model)
    with_data = needs_data_file(model, external=external, threshold=threshold)
    stale = None
    if not with_data:
        from bnfold.targets.onnx import is_bnfold_onnx_data

        old = data_file(d)
        protected = protected_files(protect)
        if is_bnfold_onnx_data(old) and not any(old.exists() and same_file(old, q.path) for q in protected):
            stale = old
    with atomic_files([d, data_file(d)] if with_data else [d], protect=protect) as staged:
        if with_data:
            _write_with_data(model, staged[0], staged[1], threshold)
        else:
            staged[0].write_bytes(model.SerializeToString())
        if not small:  # too large to check in memory: check the file (its data is beside it)
            onnx.checker.check_model(str(staged[0]), full_check=True)
        yield staged
    if stale is not None and not with_data:
        with contextlib.suppress(OSError):
            stale.unlink()


def _write_with_data(model: onnx.ModelProto, path: Path, data: Path, threshold: int) -> None:
    """Write ``model`` to ``path`` with its initializers of ``threshold`` bytes or more (:func:`_outside`) in ``data``
    (same folder; page aligned, as onnx writes them); every external tensor references ``data.name``."""
    location = data.name
    out = onnx.ModelProto()
    out.CopyFrom(model)
    with open(data, "wb") as f:
        for t in _outside(out, threshold):
            raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
            pad = (-f.tell()) % 4096
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
    with open(path, "wb") as f:
        f.write(out.SerializeToString())
        f.flush()
        os.fsync(f.fileno())

