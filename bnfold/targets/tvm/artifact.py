"""A compiled TVM model on disk and in memory: ``model.so`` + ``params.pt`` + ``manifest.json``.

The manifest says how the library was built (bnfold/TVM/torch versions, target, CPU ISA, tuning summary,
input signature). :meth:`TvmArtifact.load` reads it *before* touching the shared library, so an artifact
built for another CPU (say AVX-512 code on an AVX2 machine) fails with a sentence instead of killing the
process with an illegal instruction, and a CUDA artifact on a machine without a GPU loads (for inspection)
but refuses to run.

Calls convert torch tensors with DLPack: CPU inputs that are contiguous and 64-byte aligned (TVM's
requirement) are passed without a copy, and outputs come back as torch tensors sharing TVM's memory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import tvm
from torch.utils import _pytree as pytree
from tvm import relax

from bnfold.errors import BnfoldError, InputError
from bnfold.targets.tvm.isa import IsaMismatchError, check_host_supports

__all__ = ["FATBIN", "FORMAT", "LIBRARY", "MANIFEST", "PARAMS", "TvmArtifact", "check_cuda_arch"]

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
            manifest = json.loads((d / MANIFEST).read_text())
        except ValueError as exc:
            raise InputError(f"{d / MANIFEST} is not valid JSON: {exc}") from exc
        if manifest.get("format") != FORMAT:
            raise InputError(f"{d / MANIFEST} is not a bnfold TVM manifest (format={manifest.get('format')!r})")
        if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
            raise InputError(f"{d} was written by a newer bnfold (artifact format {manifest['format_version']})",
                             hint="upgrade bnfold to load it")
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
        lib = tvm.runtime.load_module(str(self._dir / LIBRARY))
        self._vm = relax.VirtualMachine(lib, dev)
        self._main = self._vm["main"]
        raw = torch.load(self._dir / PARAMS, map_location="cpu", weights_only=True)
        raw = [t.to(self._device).contiguous() for t in raw]
        self._keepalive = raw
        params = [self._to_tvm(t) for t in raw]
        if m["entry"].get("transform_params"):
            out = self._vm[m["entry"]["transform_params"]](params)
            params = list(out)
        self._params = params

    # ------------------------------------------------------------------ running
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
