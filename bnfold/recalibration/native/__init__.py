"""bnfold's native kernels, compiled from ``channel_sums.cpp`` on first use: three ops in ``torch.ops.bnfold``.

    channel_sums(x, shift) = [Σ_{n,l} (x[n, c, l] − shift[c]) ; Σ_{n,l} (x[n, c, l] − shift[c])²]   (float64, (2, C))

for a CPU tensor ``x`` of shape ``(N, C, *)``, every value converted to float64 before it is shifted, squared and
added; :func:`channel_moments_` adds those sums to an accumulator and writes the batch mean and biased variance
into two tensors in the same call; :func:`batch_norm_measured` is training-mode BatchNorm that does the same while
it normalizes, each block of channels normalized while it is still in cache (the C++ source states layouts,
blocking and threading). Torch has no CPU kernel for this: its sums accumulate in the input dtype, and
``var_mean`` or training-mode BatchNorm are several times slower than the eval-mode BatchNorm they replace here.

They are built with ``torch.utils.cpp_extension`` (a C++ compiler and ninja; 5–20 s once) into torch's extension
cache (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), at install time by the README's commands
(``python -m bnfold.recalibration.native``) or else on first use. The build's name carries a hash of everything
that makes a build incompatible or makes ninja redo it (:func:`build_key`): the source and its path (two checkouts
of bnfold, e.g. git worktrees, each get their own), the torch build (version, git
revision, CUDA version, install folder — its headers are on the command line), the Python interpreter, the
compiler (``$CXX`` and its ``--version``), the flags and the CPU instruction set; so two environments sharing one
cache each find their own build and never rebuild for each other, and a second process reuses the first's.
The functions here fall back to the same sums in torch (float64 copy of ``x``, ~3×
slower, same result to rounding) when the kernels cannot be built (one warning says why; ``BNFOLD_NATIVE_VERBOSE=1``
shows the compiler's output), for non-CPU tensors, and when ``BNFOLD_NATIVE=0``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["batch_norm_measured", "build_key", "build_name", "built_library", "channel_moments_", "channel_sums",
           "channel_sums_reference", "native_ops"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("channel_sums.cpp")

# Code generation per CPU capability torch detected (the build is cached under a name that includes it, so a
# cache shared by different machines never runs code their CPU lacks).
_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma",
               "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2", "-mfma"],
}


def _build_flags() -> tuple[str, list[str]]:
    capability = torch.backends.cpu.get_cpu_capability() if platform.machine().lower() in ("x86_64", "amd64") \
        else "DEFAULT"
    # -fopenmp: at::parallel_for is OpenMP inlined from ATen's headers; the extension links libgomp.so.1, which
    # resolves to the one torch already loaded, so torch.set_num_threads governs these kernels too.
    flags = ["-O3", "-fopenmp", *_ARCH_FLAGS.get(capability, [])]
    return capability, flags


def _find_ninja() -> None:
    """torch runs ``ninja`` from ``PATH``; the ``ninja`` package installs it next to the interpreter, which is
    not on ``PATH`` when a venv's python is run directly."""
    if shutil.which("ninja") is None:
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def _compiler_identity() -> str:
    """``$CXX`` (torch's choice: ``c++`` when unset) and the first line of its ``--version``."""
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        out = "unavailable"
    return f"{cxx}: {out.splitlines()[0] if out else ''}"


def built_library(name: str) -> Path | None:
    """Where torch's extension cache keeps the library of build ``name`` (``None`` if torch cannot say)."""
    try:
        from torch.utils import cpp_extension

        return Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
    except Exception:  # a private helper of torch's: if it moves, only this log line and a test notice
        return None


def build_key(flags: list[str]) -> str:
    """A hash of everything a build depends on (module docstring): two builds with the same key are
    interchangeable, and anything that would make ninja rebuild changes the key instead."""
    parts = [
        _SOURCE.read_bytes().hex(), str(_SOURCE.resolve()),  # ninja rebuilds when the source path changes
        torch.__version__, str(torch.version.git_version), str(torch.version.cuda),
        str(Path(torch.__file__).resolve().parent), sys.version, str(Path(sys.executable).resolve()),
        str(Path(sys.prefix).resolve()), _compiler_identity(), " ".join(flags),
        *(f"{k}={os.environ.get(k, '')}" for k in ("CFLAGS", "CXXFLAGS", "LDFLAGS", "CPPFLAGS")),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def build_name(capability: str | None = None, flags: list[str] | None = None) -> str:
    """The name of this environment's build in torch's extension cache (``capability``/``flags`` as
    ``_build_flags()`` gives them, computed when not passed)."""
    if capability is None or flags is None:
        capability, flags = _build_flags()
    return f"bnfold_native_{capability.lower()}_{build_key(flags)}"


@functools.lru_cache(maxsize=1)
def native_ops() -> Any | None:
    """The compiled ops, ``torch.ops.bnfold`` (built on the first call), or ``None`` — with one warning saying
    why — when they cannot be built or ``BNFOLD_NATIVE=0``."""
    if os.environ.get("BNFOLD_NATIVE", "1") == "0":
        log.info("BNFOLD_NATIVE=0: BatchNorm statistics are summed by torch (float64 copy of each input)")
        return None
    _find_ninja()
    capability, flags = _build_flags()
    name = build_name(capability, flags)
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)  # "No CUDA runtime is found": irrelevant for a CPU-only source
    try:
        from torch.utils import cpp_extension

        built = built_library(name)
        if built is None or not built.exists():
            log.info("building bnfold's native statistics kernel %s (once; cached by torch)", name)
        cpp_extension.load(name, [str(_SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"], is_python_module=False,
                           verbose=os.environ.get("BNFOLD_NATIVE_VERBOSE") == "1")
    except Exception as exc:  # no compiler, no ninja, read-only cache, ...: the torch path gives the same sums
        log.warning("bnfold's native statistics kernel could not be built (%s: %s); BatchNorm statistics are "
                    "summed by torch instead (same result, ~3x slower). It needs a C++ compiler and ninja; "
                    "BNFOLD_NATIVE_VERBOSE=1 shows the compiler's output",
                    type(exc).__name__, str(exc).strip().splitlines()[-1] if str(exc).strip() else "")
        return None
    finally:
        cpp_log.setLevel(level)
    return torch.ops.bnfold


def channel_sums_reference(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The same sums in torch: ``x`` copied to float64, viewed as ``(N, C, L)``, shifted, summed per channel."""
    d = x.reshape(x.shape[0], x.shape[1], -1).to(torch.float64) - shift.to(x.device).view(1, -1, 1)
    return torch.stack((d.sum((0, 2)), d.square().sum((0, 2))))


def channel_sums(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``[Σ(x − shift); Σ(x − shift)²]`` per channel of an ``(N, C, *)`` tensor, float64, shape ``(2, C)``, on
    ``shift``'s device (``shift``: float64, one value per channel)."""
    ops = _native_for(x, shift)
    if ops is not None:
        return ops.channel_sums(x.detach(), shift)
    return channel_sums_reference(x, shift).to(shift.device)


def channel_moments_(x: torch.Tensor, shift: torch.Tensor, total: torch.Tensor, mean: torch.Tensor | None = None,
                     var: torch.Tensor | None = None) -> float:
    """Add :func:`channel_sums` of ``x`` to ``total`` (float64, ``(2, C)``, in place); if ``mean`` and ``var`` are
    given and ``x`` holds ``m ≥ 2`` values per channel, write the batch's ``shift + S/m`` and biased variance
    ``max(Q/m − (S/m)², 0)`` into them (cast to their dtype). Returns the largest ``(S/m)² / var`` over channels
    (how many variances the shift is from the batch mean, squared; ``inf`` for a constant channel off its
    shift). Call it under ``torch.no_grad()``."""
    ops = _native_for(x, shift)
    if ops is not None:
        return ops.channel_moments_(x, shift, total, mean, var)
    sums = channel_sums_reference(x, shift).to(shift.device)
    total.add_(sums)
    m = x.numel() // max(1, x.shape[1])
    if m == 0:
        return 0.0
    d, sq = sums / m
    batch_var = torch.addcmul(sq, d, d, value=-1.0).clamp_min_(0.0)
    if mean is not None and var is not None and m >= 2:
        mean.copy_(shift + d)
        var.copy_(batch_var)
    ratio = (d * d / batch_var).nan_to_num_(0.0, float("inf"))
    return float(ratio.max()) if ratio.numel() else 0.0


def batch_norm_measured(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, shift: torch.Tensor,
                        total: torch.Tensor, eps: float) -> tuple[torch.Tensor, float]:
    """Training-mode BatchNorm of ``x`` that also measures it: ``(y, farthest)`` with ``y`` normalized by the
    batch mean and biased variance, the sums added to ``total`` and ``farthest`` as in :func:`channel_moments_`.
    The native kernel sums and normalizes in one call (one thread: blocks of channels, each normalized while it
    is still in cache; several threads, or channels too large for blocks: in memory order, split over threads by
    samples as torch's kernels are); the fallback is :func:`channel_moments_` followed by ``F.batch_norm``.
    ``weight``/``bias`` may be of any float dtype (read as float64, exactly). ``x`` needs ≥ 2 values per channel."""
    ops = _native_for(x, shift)
    if ops is not None:
        return ops.batch_norm_measured(x, weight, bias, shift, total, eps)
    mean = torch.empty(x.shape[1], dtype=torch.float64, device=x.device)
    var = torch.empty_like(mean)
    far = channel_moments_(x, shift, total, mean, var)
    return torch.nn.functional.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), weight, bias, False, 0.0, eps), far


def _native_for(x: torch.Tensor, shift: torch.Tensor) -> Any | None:
    return native_ops() if x.is_cpu and shift.is_cpu else None
