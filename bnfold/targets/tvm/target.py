"""TVM compile targets for this machine: the host's real CPU, its usable cores, and CUDA with a CPU host.

Facts this module encodes (measured on TVM 0.27 / LLVM 22):

* ``{"kind": "llvm"}`` alone compiles for ``mcpu=generic``: SSE2 only, no AVX.
* ``mcpu="native"`` is *not* understood by TVM's LLVM (it logs an error and silently falls back to
  ``generic``), so the host CPU name comes from ``tvm.target.codegen.llvm_get_system_cpu()``.
* ``num-cores`` is what MetaSchedule tunes parallel loops for: the cores this process may actually run on
  (CPU affinity), not the machine's total.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

import tvm
import tvm.target.codegen as codegen

from bnfold.errors import InputError
from bnfold.targets.tvm.isa import LLVM_TO_CPUINFO, host_cpu_flags, required_features

__all__ = ["TargetKind", "TargetSpec", "cpu_target", "cuda_target", "make_target", "usable_cores"]

log = logging.getLogger(__name__)

TargetKind = Literal["llvm", "cuda"]


def usable_cores() -> int:
    """Physical cores this process may run on (affinity ∩ physical), at least 1."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or allowed
    except ImportError:
        physical = allowed
    return max(1, min(allowed, physical))


@dataclass(frozen=True)
class TargetSpec:
    """A TVM target plus what the manifest and the tuning cache need to know about it."""

    target: tvm.target.Target
    kind: TargetKind
    mcpu: str
    num_cores: int
    arch: str | None = None  # CUDA architecture, e.g. "sm_90a"

    @property
    def description(self) -> str:
        return str(self.target)

    def isa(self) -> dict[str, Any]:
        """The ``isa`` section of the manifest: what the *CPU* code (host code for CUDA) requires."""
        host = self.target.host if self.kind == "cuda" and self.target.host is not None else self.target
        triple = str(host.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())
        return {
            "arch": triple.split("-", 1)[0],
            "triple": triple,
            "mcpu": self.mcpu,
            "features": required_features(codegen.llvm_get_cpu_features(host)),
        }

    def cache_key(self) -> str:
        """Directory name for this target's tuning database: one per target, TVM version and version of bnfold's
        CPU lowering (:data:`~bnfold.targets.tvm.schedules.LOWERING_VERSION`: a database tuned against older
        kernels or hand schedules would otherwise override better new defaults)."""
        from bnfold.targets.tvm.schedules import LOWERING_VERSION

        name = self.arch if self.kind == "cuda" else self.mcpu
        return f"{self.kind}-{name}-{self.num_cores}c-tvm{tvm.__version__}-l{LOWERING_VERSION}".replace("/", "_")


def cpu_target(mcpu: str | None = None, num_cores: int | None = None) -> TargetSpec:
    """An LLVM target for this host's CPU (or ``mcpu``), tuned for ``num_cores`` threads."""
    triple = codegen.llvm_get_system_triple()
    cpu = mcpu or codegen.llvm_get_system_cpu()
    if cpu == "native":
        cpu = codegen.llvm_get_system_cpu()
    if not codegen.llvm_is_valid_cpu(cpu, triple):
        raise InputError(f"LLVM does not know the CPU {cpu!r} (triple {triple})",
                         hint="leave mcpu unset to use this host's CPU, or use e.g. 'x86-64-v3' / 'znver4'")
    cores = num_cores or usable_cores()
    if cores < 1:
        raise InputError(f"num_cores must be positive, got {cores}")
    config: dict[str, Any] = {"kind": "llvm", "mcpu": cpu, "num-cores": cores}
    if mcpu is None:
        hidden = _hidden_host_features(config)
        if hidden:  # e.g. a VM that hides AVX-512 from a CPU model that has it
            log.info("host CPU %s lacks %s here: compiling without them", cpu, ", ".join(hidden))
            config["mattr"] = [f"-{f}" for f in hidden]
    return TargetSpec(tvm.target.Target(config), "llvm", cpu, cores)


def _hidden_host_features(config: dict[str, Any], flags: set[str] | None = None) -> list[str]:
    """Extensions LLVM assumes for the host's CPU model that this host (``flags``: its cpuinfo) does not report."""
    flags = host_cpu_flags() if flags is None else flags
    if flags is None:
        return []
    features = required_features(codegen.llvm_get_cpu_features(tvm.target.Target(config)))
    return [f for f in features if LLVM_TO_CPUINFO[f] not in flags]


def cuda_target(arch: str | None, *, num_cores: int | None = None) -> TargetSpec:
    """A CUDA target for ``arch`` (``"sm_90a"``…) with this host's CPU as the host target.

    Without ``arch`` the first visible GPU's compute capability is used; with no GPU that is an error,
    since there is nothing to detect.
    """
    if arch is None:
        arch = _detect_cuda_arch()
    if not arch.startswith("sm_") or not arch[3:].rstrip("af").isdigit():
        raise InputError(f"{arch!r} is not a CUDA architecture", hint="write it like sm_80, sm_89 or sm_90a")
    host = cpu_target(num_cores=num_cores)
    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host=host.target)
    return TargetSpec(target, "cuda", host.mcpu, host.num_cores, arch)


def make_target(kind: str, *, arch: str | None = None, mcpu: str | None = None,
                num_cores: int | None = None) -> TargetSpec:
    """``"llvm"`` / ``"cpu"`` → :func:`cpu_target`; ``"cuda"`` → :func:`cuda_target`."""
    if kind in ("llvm", "cpu"):
        if arch is not None:
            raise InputError("arch is a CUDA option", hint="use mcpu=... to pick a CPU for target 'llvm'")
        return cpu_target(mcpu, num_cores)
    if kind == "cuda":
        return cuda_target(arch, num_cores=num_cores)
    raise InputError(f"unknown TVM target {kind!r}", hint="use 'llvm' (CPU) or 'cuda'")


def _detect_cuda_arch() -> str:
    dev = tvm.cuda(0)
    if not dev.exist:
        raise InputError("target 'cuda' needs an architecture: no CUDA GPU is visible here to detect it from",
                         hint="pass arch='sm_90a' (CLI: --arch sm_90a); CUDA code compiles without a GPU")
    major, minor = (int(v) for v in str(dev.compute_version).split("."))
    return f"sm_{major}{minor}"
