"""Instruction-set checks for compiled CPU code: never run a library built for a CPU this host is not.

A TVM CPU library compiled for ``mcpu=znver5`` uses AVX-512 freely; loaded on a CPU without it, the first
kernel dies with ``SIGILL`` (illegal instruction), taking the Python process with it. So the manifest records
the vector/bit-manipulation extensions the compile target enabled (LLVM feature names), and
:func:`check_host_supports` compares them with what *this* host's CPU advertises before the shared library is
ever loaded.

Host features come from ``/proc/cpuinfo`` (the kernel's view: a hypervisor that hides AVX-512 hides it there
too). Only the extensions in :data:`LLVM_TO_CPUINFO` are checked: they are the ones a compiler emits for
numeric code; the rest of LLVM's feature list (tuning hints such as ``fast-scalar-fsqrt``) does not make
instructions.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Mapping
from pathlib import Path

from bnfold.errors import BnfoldError

__all__ = ["LLVM_TO_CPUINFO", "IsaMismatchError", "check_host_supports", "host_cpu_flags", "required_features"]

#: LLVM target feature → ``/proc/cpuinfo`` flag, for the extensions compiled numeric code may use.
LLVM_TO_CPUINFO: Mapping[str, str] = {
    # x86
    "sse": "sse", "sse2": "sse2", "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2",
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
    "popcnt": "popcnt", "lzcnt": "abm", "movbe": "movbe",
    "avx512f": "avx512f", "avx512cd": "avx512cd", "avx512bw": "avx512bw", "avx512dq": "avx512dq",
    "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16", "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2", "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq",
    "avxvnni": "avx_vnni", "amx-tile": "amx_tile", "amx-int8": "amx_int8", "amx-bf16": "amx_bf16",
    "amx-fp16": "amx_fp16", "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq",
    # aarch64
    "neon": "asimd", "fullfp16": "asimdhp", "dotprod": "asimddp", "sve": "sve", "sve2": "sve2",
    "i8mm": "i8mm", "bf16": "bf16", "sme": "sme",
}

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


class IsaMismatchError(BnfoldError):
    """A compiled artifact needs CPU instructions this host does not have."""


def _norm_arch(arch: str) -> str:
    a = arch.lower()
    return _ARCH_ALIASES.get(a, a)


def required_features(llvm_features: Iterable[str]) -> list[str]:
    """The subset of a target's LLVM features that :func:`check_host_supports` checks, sorted."""
    return sorted(f for f in set(llvm_features) if f in LLVM_TO_CPUINFO)


def host_cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The CPU flags of this host (from ``/proc/cpuinfo``, or the text given), or ``None`` if unknown."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if not path.exists():
            return None
        cpuinfo = path.read_text(errors="replace")
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / aarch64 spelling
            flags.update(value.split())
    return flags or None


def check_host_supports(isa: Mapping[str, object], *, what: str = "this artifact",
                        host_flags: set[str] | None = None, host_arch: str | None = None) -> None:
    """Raise :class:`IsaMismatchError` unless this host can execute code built for ``isa``.

    ``isa`` is the manifest's ``isa`` section: ``{"arch": "x86_64", "mcpu": "znver5", "features": [...]}``.
    ``host_flags``/``host_arch`` default to this machine (they are parameters so the rule can be tested).
    """
    built_arch = _norm_arch(str(isa.get("arch", "")))
    arch = _norm_arch(host_arch or platform.machine())
    mcpu = isa.get("mcpu") or "generic"
    if built_arch and built_arch != arch:
        raise IsaMismatchError(
            f"{what} was compiled for {built_arch} ({mcpu}); this host is {arch}",
            hint="recompile it on (or for) this machine: bnfold compile MODEL --target llvm -o OUT")
    flags = host_flags if host_flags is not None else host_cpu_flags()
    if flags is None:
        return  # no way to tell (not Linux); loading proceeds as TVM itself would
    features = [str(f) for f in isa.get("features", [])]  # type: ignore[union-attr]
    missing = [f for f in features if f in LLVM_TO_CPUINFO and LLVM_TO_CPUINFO[f] not in flags]
    if missing:
        raise IsaMismatchError(
            f"{what} was compiled for CPU {mcpu!r} and uses instructions this CPU lacks: "
            f"{', '.join(missing)}; running it would crash with an illegal instruction",
            hint="recompile it on this machine (bnfold picks the host CPU by default), or build for a common "
                 "baseline with mcpu='x86-64-v3' (AVX2) / 'x86-64-v2' on the build machine")
