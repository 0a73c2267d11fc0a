"""A compiled TVM model on disk and in memory: ``model.so`` + ``params.pt`` + ``manifest.json``.

The manifest says how the library was built (bnfold/TVM/torch versions, target, CPU ISA, tuning summary,
input signature, each file's size and SHA-256). :meth:`TvmArtifact.load` reads it *before* touching the shared
library and checks every file against it, so a broken folder is an :class:`~bnfold.errors.InputError` naming the
file (exit 2) instead of a crash:

* the manifest has the schema this module writes (:func:`check_manifest`: a missing ``signature`` is named, not a
  ``KeyError``);
* ``model.so`` is an ELF shared object for this machine whose segments lie inside the file, of the size and SHA-256
  the manifest records (:mod:`~bnfold.targets.tvm.library`): a truncated library would SIGBUS inside ``dlopen``,
  which no ``except`` catches;
* ``params.pt`` matches its recorded size and SHA-256 and is read with ``torch.load(weights_only=True)`` as the list
  of tensors the entry point takes;
* an artifact built for another CPU (say AVX-512 code on an AVX2 machine) fails with a sentence instead of killing
  the process with an illegal instruction; a CUDA artifact on a machine without a GPU loads (for inspection) but
  refuses to run;
* anything TVM or torch still raises while loading becomes an ``InputError`` naming the file.

Calls convert torch tensors with DLPack: CPU inputs that are contiguous and 64-byte aligned (TVM's
requirement) are passed without a copy, and outputs come back as torch tensors sharing TVM's memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import tvm
from torch.utils import _pytree as pytree
from tvm import relax

from bnfold.errors import BnfoldError, InputError
from bnfold.targets.tvm.isa import IsaMismatchError, check_host_supports
from bnfold.targets.tvm.library import check_recorded, check_shared_library

__all__ = ["FATBIN", "FORMAT", "LIBRARY", "MANIFEST", "PARAMS", "TvmArtifact", "check_cuda_arch", "check_manifest"]

log = logging.getLogger(__name__)

FORMAT = "bnfold-tvm-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"
PARAMS = "params.pt"
FATBIN = "kernels.fatbin"
_ALIGN = 64


def check_cuda_arch(arch: str, capability: tuple[int, int]) -> str | None:
    """Why code for ``arch`` (``"sm_90a"``) cannot run on a GPU of compute ``capability``, or ``None``.

    Arch-specific targets (``a``/``f`` suffix) run only on that exact major.minor; plain ``sm_XY`` code
    runs on the same major with an equal or newer minor.
    """
    digits = arch[3:].rstrip("af")
    major, minor = int(digits[:-1]), int(digits[-1])
    have = f"sm_{capability[0]}{capability[1]}"
    if arch[3:] != digits:
        if capability != (major, minor):
            return f"{arch} code runs only on compute capability {major}.{minor} GPUs; this GPU is {have}"
        return None
    if capability[0] != major or capability[1] < minor:
        return f"{arch} code does not run on this {have} GPU"
    return None


_DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"}


def check_manifest(manifest: object, where: Path) -> dict[str, Any]:
    """``manifest`` (read from ``where``) as a dict with every field :class:`TvmArtifact` reads, of the right type;
    else an :class:`InputError` naming the field."""

    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise InputError(f"{where} is not a valid bnfold TVM manifest: {field} must be {what}",
                             hint="recompile the model (bnfold compile MODEL -o DIR); do not edit manifest.json")

    def section(m: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        need(isinstance(m.get(key), dict), key, "an object")
        return m[key]  # type: ignore[no-any-return]

    need(isinstance(manifest, dict), "the document", "a JSON object")
    assert isinstance(manifest, dict)
    if manifest.get("format") != FORMAT:
        raise InputError(f"{where} is not a bnfold TVM manifest (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    need(isinstance(version, int) and not isinstance(version, bool), "format_version", "an integer")
    if version > FORMAT_VERSION:
        raise InputError(f"{where.parent} was written by a newer bnfold (artifact format {version})",
                         hint="upgrade bnfold to load it")
    need(isinstance(section(manifest, "versions").get("tvm"), str), "versions.tvm", "a version string")
    isa = section(manifest, "isa")
    need(isinstance(isa.get("arch", ""), str), "isa.arch", "a string")
    need(isinstance(isa.get("features", []), list) and all(isinstance(f, str) for f in isa.get("features", [])),
         "isa.features", "a list of strings")
    target = section(manifest, "target")
    need(target.get("kind") in ("llvm", "cuda"), "target.kind", '"llvm" or "cuda"')
    if target["kind"] == "cuda":
        arch = target.get("arch")
        need(isinstance(arch, str) and arch.startswith("sm_") and arch[3:].rstrip("af").isdigit()
             and len(arch[3:].rstrip("af")) >= 2, "target.arch", "a CUDA architecture such as sm_90a")
    sig = section(manifest, "signature")
    inputs = sig.get("inputs")
    need(isinstance(inputs, list) and bool(inputs) and all(
        isinstance(i, dict) and isinstance(i.get("shape"), list) and i.get("dtype") in _DTYPES
        and all((isinstance(d, int) and not isinstance(d, bool) and d >= 0) or isinstance(d, str) for d in i["shape"])
        for i in inputs), "signature.inputs", "a non-empty list of {shape: [sizes], dtype}")
    lo_hi = sig.get("batch_range")
    need(lo_hi is None or (isinstance(lo_hi, list) and len(lo_hi) == 2 and all(isinstance(v, int) for v in lo_hi)
                           and 1 <= lo_hi[0] <= lo_hi[1]), "signature.batch_range", "null or [min, max]")
    need(sig.get("out_spec") is None or isinstance(sig.get("out_spec"), str), "signature.out_spec",
         "null or a string")
    entry = section(manifest, "entry")
    need(isinstance(entry.get("main"), str), "entry.main", "a function name")
    need(entry.get("transform_params") is None or isinstance(entry.get("transform_params"), str),
         "entry.transform_params", "null or a function name")
    n = entry.get("num_params")
    need(isinstance(n, int) and not isinstance(n, bool) and n >= 0, "entry.num_params", "a count")
    files = section(manifest, "files")
    need(files.get("library") == LIBRARY and files.get("params") == PARAMS, "files",
         f'{{"library": "{LIBRARY}", "params": "{PARAMS}", ...}}')
    integrity = manifest.get("integrity")
    need(integrity is None or (isinstance(integrity, dict) and all(
        isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
        for v in integrity.values())), "integrity", "null or {file: {bytes, sha256}}")
    return manifest


def _tvm_major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


class TvmArtifact:
    """A compiled model: ``artifact(*tensors)`` runs it; ``save(dir)``/``TvmArtifact.load(dir)`` persist it."""

    def __init__(self, directory: Path, manifest: dict[str, Any], *, temporary: bool = False,
                 strict_isa: bool = True) -> None:
        """Open the artifact in ``directory``. ``temporary``: delete the folder with this object.
        ``strict_isa=False`` (fresh cross-compiles): a CPU mismatch makes the artifact unrunnable instead of
        raising, so it can still be saved."""
        self._dir = Path(directory)
        self.build_info: dict[str, Any] = manifest
        self._lock = threading.Lock()
        self._vm: Any = None
        self._main: Any = None
        self._params: list[Any] = []
        self._keepalive: list[torch.Tensor] = []
        self._device = torch.device("cpu")
        self._unrunnable: BnfoldError | None = None
        if temporary:
            weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        try:
            self._open()
        except IsaMismatchError as err:
            if strict_isa:
                raise
            self._unrunnable = err

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TvmArtifact:
        """Load an artifact folder written by :meth:`save` (or ``bnfold compile``)."""
        d = Path(path)
        if not (d / MANIFEST).is_file():
            raise InputError(f"{d} is not a bnfold TVM artifact (no {MANIFEST})",
                             hint="point at the folder written by `bnfold compile ... -o DIR`")
        try:
            raw = json.loads((d / MANIFEST).read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"{d / MANIFEST} is not valid JSON: {exc}") from exc
        manifest = check_manifest(raw, d / MANIFEST)
        for name in (LIBRARY, PARAMS):
            if not (d / name).is_file():
                raise InputError(f"{d} is missing {name}; the artifact folder is incomplete")
        return cls(d, manifest)

    def _open(self) -> None:
        m = self.build_info
        built_tvm = str(m.get("versions", {}).get("tvm", ""))
        if _tvm_major_minor(built_tvm) != _tvm_major_minor(tvm.__version__):
            raise BnfoldError(f"{self._dir} was compiled with TVM {built_tvm}; this is TVM {tvm.__version__}",
                              hint="recompile the model with this TVM (the runtime ABI is not stable)")
        check_host_supports(m["isa"], what=f"the artifact {self._dir}")
        target = m["target"]
        if target["kind"] == "cuda":
            dev = tvm.cuda(0)
            if not dev.exist:
                self._unrunnable = BnfoldError(
                    f"this artifact is CUDA code for {target['arch']} and no CUDA GPU is visible here (it can be "
                    "inspected and saved, not run)", hint="run it on a machine with a matching GPU")
                return
            major, minor = (int(v) for v in str(dev.compute_version).split("."))
            why = check_cuda_arch(target["arch"], (major, minor))
            if why:
                raise BnfoldError(why, hint=f"recompile with arch='sm_{major}{minor}'")
            self._device = torch.device("cuda", 0)
        else:
            dev = tvm.cpu(0)
        library, weights = self._dir / LIBRARY, self._dir / PARAMS
        integrity = m.get("integrity") or {}
        check_shared_library(library, recorded=integrity.get(LIBRARY))  # before dlopen can touch it
        check_recorded(weights, integrity.get(PARAMS), "the parameter file")
        with _names(library, "TVM cannot load it as a compiled model"):
            lib = tvm.runtime.load_module(str(library))
            self._vm = relax.VirtualMachine(lib, dev)
            self._main = self._vm[m["entry"]["main"]]
        with _names(weights, "torch.load(weights_only=True) cannot read it as a list of tensors"), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4": not the user's business
            raw = torch.load(weights, map_location="cpu", weights_only=True)
        count = m["entry"]["num_params"]
        if not isinstance(raw, (list, tuple)) or len(raw) != count or not all(isinstance(t, torch.Tensor)
                                                                            for t in raw):
            raise InputError(f"{weights} does not hold the {count} tensors {library.name} takes (it holds "
                             f"{type(raw).__name__}{f' of {len(raw)}' if isinstance(raw, (list, tuple)) else ''})",
                             hint="recompile the model; params.pt belongs to the model.so it was built with")
        raw = [t.to(self._device).contiguous() for t in raw]
        self._keepalive = raw
        params = [self._to_tvm(t) for t in raw]
        if m["entry"].get("transform_params"):
            with _names(weights, f"{library.name} cannot prepare these parameters"):
                out = self._vm[m["entry"]["transform_params"]](params)
            params = list(out)
        self._params = params

    # ------------------------------------------------------------------ running
    @property
    def directory(self) -> Path:
        """The folder holding the library, the weights and the manifest."""
        return self._dir

    @property
    def runnable(self) -> bool:
        """False for a CUDA artifact without a GPU here, or a cross-compiled CPU artifact."""
        return self._unrunnable is None

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def signature(self) -> dict[str, Any]:
        return dict(self.build_info["signature"])

    def _to_tvm(self, t: torch.Tensor) -> Any:
        t = t.detach()
        if t.device != self._device:
            t = t.to(self._device)
        if not t.is_contiguous() or t.data_ptr() % _ALIGN:
            t = t.clone(memory_format=torch.contiguous_format)
            if t.data_ptr() % _ALIGN:  # tiny tensors can still land unaligned: copy through TVM
                return tvm.runtime.tensor(t.cpu().numpy(), tvm.cuda(0) if t.is_cuda else tvm.cpu(0))
        return tvm.runtime.from_dlpack(t)

    def check_inputs(self, inputs: tuple[torch.Tensor, ...]) -> None:
        """Raise :class:`InputError` unless ``inputs`` match the compiled signature."""
        sig = self.build_info["signature"]
        specs = sig["inputs"]
        if len(inputs) != len(specs):
            raise InputError(f"this artifact takes {len(specs)} input(s), got {len(inputs)}")
        batch: int | None = None
        lo_hi = sig.get("batch_range")
        for i, (t, spec) in enumerate(zip(inputs, specs, strict=True)):
            if not isinstance(t, torch.Tensor):
                raise InputError(f"input {i} is a {type(t).__name__}, not a torch.Tensor")
            want_dtype = spec["dtype"]
            if str(t.dtype).replace("torch.", "") != want_dtype:
                raise InputError(f"input {i} has dtype {str(t.dtype).replace('torch.', '')}; the artifact was "
                                 f"compiled for {want_dtype}", hint=f"convert it with .to(torch.{want_dtype})")
            shape = spec["shape"]
            if t.dim() != len(shape) or any(isinstance(s, int) and s != d for s, d in zip(shape, t.shape, strict=True)):
                raise InputError(f"input {i} has shape {tuple(t.shape)}; the artifact was compiled for "
                                 f"{tuple(shape)}", hint="recompile for this shape (dynamic batch: dim 0 only)")
            if lo_hi:
                b = int(t.shape[0])
                if batch is not None and b != batch:
                    raise InputError(f"inputs disagree on the batch size ({batch} vs {b})")
                batch = b
        if lo_hi and batch is not None and not lo_hi[0] <= batch <= lo_hi[1]:
            raise InputError(f"batch size {batch} is outside the compiled range {lo_hi[0]}..{lo_hi[1]} "
                             "(TVM planned its memory for that upper bound)",
                             hint=f"split the batch, or recompile with dynamic_batch=({lo_hi[0]}, {max(batch, 2)})")

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if self._unrunnable is not None:
            err = self._unrunnable
            raise type(err)(err.message, hint=err.hint)
        self.check_inputs(inputs)
        args = [self._to_tvm(t) for t in inputs]
        with self._lock:
            out = self._main(*args, *self._params)
        flat = [torch.from_dlpack(o) for o in (out if isinstance(out, (list, tuple, tvm.ir.Array)) else [out])]
        spec = self.build_info["signature"].get("out_spec")
        if spec:
            return pytree.tree_unflatten(flat, pytree.treespec_loads(spec))
        return flat[0] if len(flat) == 1 else tuple(flat)

    # ------------------------------------------------------------------ saving
    def files(self) -> list[Path]:
        return [p for p in sorted(self._dir.iterdir()) if p.is_file()]

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False,
             protect: Sequence[str | os.PathLike[str]] = ()) -> Path:
        """Copy the artifact to folder ``path`` atomically (built in a sibling temp folder, then renamed).

        The manifest written is :attr:`build_info` as it is now (annotations such as parity results persist).

        An existing folder is replaced only if ``overwrite`` and it is itself an artifact holding nothing but
        the files its manifest lists; a folder containing a path in ``protect`` (the user's inputs) never is.
        """
        from bnfold.io.outputs import check_output_dir, staged_output

        dest = Path(path)
        if dest.exists() and dest.resolve() == self._dir.resolve():
            return dest
        check_output_dir(dest, protect, force=overwrite, owned=artifact_entries)
        with staged_output(dest) as tmp:
            for f in self.files():
                if f.name != MANIFEST:
                    shutil.copy2(f, tmp / f.name)
            (tmp / MANIFEST).write_text(json.dumps(self.build_info, indent=2, default=str) + "\n")
        return dest

    def __repr__(self) -> str:
        t = self.build_info.get("target", {})
        tuning = self.build_info.get("tuning", {})
        return (f"TvmArtifact({t.get('kind')}:{t.get('arch') or t.get('mcpu')}, "
                f"untuned={len(tuning.get('untuned', []))}, dir={str(self._dir)!r})")


@contextlib.contextmanager
def _names(path: Path, what: str) -> Iterator[None]:
    """Anything but a :class:`BnfoldError` raised in the block (TVM's ``TVMError``, torch's ``UnpicklingError``, …)
    becomes an :class:`InputError` naming ``path``."""
    try:
        yield
    except BnfoldError:
        raise
    except Exception as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch's messages carry terminal colours
        first = text.splitlines()[0] if text else ""
        raise InputError(f"{path}: {what}: {type(exc).__name__}: {first[:300]}",
                         hint="recompile the model (bnfold compile MODEL -o DIR), or copy the whole artifact folder "
                              "again") from exc


def artifact_entries(path: Path) -> set[str] | None:
    """The files a bnfold artifact folder's manifest accounts for, or None when ``path`` is not an artifact."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    files = manifest.get("files") or {}
    return {MANIFEST, *(str(v) for v in (files.values() if isinstance(files, dict) else files))}


def read_manifest(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """Just the manifest of an artifact folder (no library loaded)."""
    return json.loads((Path(path) / MANIFEST).read_text())
