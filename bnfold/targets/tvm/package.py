"""Write a build to an artifact folder: the shared library, the weights, the CUDA fatbin and the manifest."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import tvm

import bnfold
from bnfold.targets.tvm.artifact import FATBIN, FORMAT, FORMAT_VERSION, LIBRARY, MANIFEST, PARAMS
from bnfold.targets.tvm.build import TRANSFORM_PARAMS, Built, nvcc_fatbin
from bnfold.targets.tvm.importer import Imported
from bnfold.targets.tvm.library import file_digest
from bnfold.targets.tvm.target import TargetSpec

__all__ = ["package", "write_manifest"]

log = logging.getLogger(__name__)


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def package(built: Built, imported: Imported, spec: TargetSpec, dest: Path, *,
            options: dict[str, Any]) -> dict[str, Any]:
    """Fill the (empty, existing) folder ``dest``; return the manifest written to it."""
    built.executable.export_library(str(dest / LIBRARY))  # type: ignore[attr-defined]
    torch.save([p.contiguous() for p in imported.params], dest / PARAMS)
    files = {"library": LIBRARY, "params": PARAMS}
    cuda: dict[str, Any] | None = None
    if spec.kind == "cuda":
        assert spec.arch is not None and built.cuda_source is not None
        fatbin = nvcc_fatbin(built.cuda_source, spec.arch, dest / FATBIN)
        files["cuda_fatbin"] = FATBIN
        cuda = {"arch": spec.arch, "fatbin_bytes": fatbin.stat().st_size,
                "kernels": built.cuda_source.count("__global__"),
                "note": "model.so holds the CUDA source, compiled for the GPU when loaded; kernels.fatbin is the "
                        "same source compiled ahead of time by nvcc for this arch"}
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"bnfold": bnfold.__version__, "tvm": tvm.__version__, "torch": torch.__version__,
                     "python": sys.version.split()[0]},
        "target": {"kind": spec.kind, "description": spec.description, "mcpu": spec.mcpu,
                   "num_cores": spec.num_cores, "arch": spec.arch},
        "isa": spec.isa(),
        "build_host": {"cpu": _cpu_model(), "machine": platform.machine()},
        "signature": {"inputs": [s.to_dict() for s in imported.inputs],
                      "batch_range": list(imported.batch_range) if imported.batch_range else None,
                      "num_outputs": imported.num_outputs, "out_spec": imported.out_spec},
        "entry": {"main": "main", "transform_params": TRANSFORM_PARAMS if built.has_transform_params else None,
                  "num_params": len(imported.params)},
        "options": options,
        "tuning": built.summary.to_dict(),
        "cuda": cuda,
        "files": files,
        "integrity": {name: file_digest(dest / name) for name in files.values()},  # checked before loading
    }
    write_manifest(dest, manifest)
    return manifest


def write_manifest(dest: Path, manifest: dict[str, Any]) -> None:
    """(Re)write ``dest/manifest.json``."""
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
