"""Check a compiled library before ``dlopen`` touches it: a truncated or foreign ``model.so`` must be a sentence,
not a crash.

``dlopen`` maps a shared library's segments from the file; a segment that reaches past the end of a truncated file
is mapped anyway, and the first read of it kills the process with SIGBUS — no Python ``except`` can catch that. So
before anything loads ``model.so``, :func:`check_shared_library` reads its ELF headers (the ELF-64/32 layout of the
System V ABI, ``<elf.h>``) and refuses it unless

* it is an ELF shared object (``ET_DYN``) of this machine's word size, byte order and architecture (``e_machine``);
* its program header table, every segment it maps (``PT_LOAD``, ``PT_DYNAMIC``), its section header table and every
  section with file contents lie inside the file;
* when the manifest records them (its ``integrity`` section), its size and SHA-256 are the ones the build wrote — a
  library from another build, or any edit, is refused before it can run.
"""

from __future__ import annotations

import hashlib
import platform
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bnfold.errors import InputError

__all__ = ["ELF_MACHINES", "check_recorded", "check_shared_library", "file_digest", "host_machine"]

_ET_DYN = 3
_PT_LOAD, _PT_DYNAMIC = 1, 2
_SHT_NOBITS = 8
ELF_MACHINES = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183, "i386": 3, "i686": 3, "armv7l": 40,
                "ppc64le": 21, "ppc64": 21, "s390x": 22, "riscv64": 243}
"""``platform.machine()`` → the ELF ``e_machine`` code of its code."""
_NAMES = {62: "x86-64", 183: "AArch64", 3: "i386", 40: "ARM", 21: "PowerPC64", 22: "s390x", 243: "RISC-V"}
_HINT = "recompile the model (bnfold compile MODEL -o DIR), or copy the whole artifact folder again"


def host_machine() -> int | None:
    """This host's ELF ``e_machine`` code (None when bnfold does not know the architecture)."""
    return ELF_MACHINES.get(platform.machine().lower())


def file_digest(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of ``path`` (what a manifest records to check the file later)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def check_recorded(path: Path, recorded: Mapping[str, Any] | None, what: str) -> None:
    """Refuse ``path`` when its size or SHA-256 differs from ``recorded`` (``{"bytes", "sha256"}``; nothing to
    compare when None)."""
    if not recorded:
        return
    size = path.stat().st_size
    if "bytes" in recorded and size != int(recorded["bytes"]):
        raise InputError(f"{path} is {size} bytes but the manifest records {int(recorded['bytes'])}: it is not "
                         f"{what} this artifact was built with (truncated, replaced or edited)", hint=_HINT)
    if "sha256" in recorded and file_digest(path)["sha256"] != str(recorded["sha256"]):
        raise InputError(f"{path} does not match the SHA-256 its manifest records: it is not {what} this artifact "
                         "was built with (edited, or from another build)", hint=_HINT)


def check_shared_library(path: Path, *, recorded: Mapping[str, Any] | None = None) -> None:
    """Refuse (``InputError`` naming ``path``) anything ``dlopen`` could not map safely on this host — the checks
    in the module docstring; ``recorded``: the manifest's ``{"bytes", "sha256"}`` for the file, if any."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise InputError(f"{path} cannot be read: {exc.strerror or exc}") from exc
    if len(head) < 16 or head[:4] != b"\x7fELF":
        raise InputError(f"{path} is not a shared library (not an ELF file)", hint=_HINT)
    bits = {1: 32, 2: 64}.get(head[4])
    order = {1: "<", 2: ">"}.get(head[5])
    if bits is None or order is None:
        raise InputError(f"{path} has a malformed ELF header", hint=_HINT)
    if bits != struct.calcsize("P") * 8:
        raise InputError(f"{path} is a {bits}-bit library; this Python is {struct.calcsize('P') * 8}-bit", hint=_HINT)
    if order != ("<" if sys.byteorder == "little" else ">"):
        raise InputError(f"{path} is built for the other byte order than this host's", hint=_HINT)
    if bits == 64:
        fmt, ph_fmt, sh_fmt = "HHIQQQIHHHHHH", "IIQQQQQQ", "IIQQQQIIQQ"
    else:
        fmt, ph_fmt, sh_fmt = "HHIIIIIHHHHHH", "IIIIIIII", "IIIIIIIIII"
    header = struct.calcsize(order + fmt) + 16
    if size < header or len(head) < header:
        raise InputError(f"{path} is truncated: {size} bytes, shorter than an ELF header", hint=_HINT)
    (e_type, e_machine, _, _, e_phoff, e_shoff, _, _, e_phentsize, e_phnum, e_shentsize, e_shnum,
     _) = struct.unpack_from(order + fmt, head, 16)
    if e_type != _ET_DYN:
        raise InputError(f"{path} is an ELF file but not a shared library (e_type {e_type})", hint=_HINT)
    host = host_machine()
    if host is not None and e_machine != host:
        raise InputError(f"{path} holds {_NAMES.get(e_machine, f'machine {e_machine}')} code; this host is "
                         f"{platform.machine()}", hint=_HINT)
    _check_table(path, size, "program header table", e_phoff, e_phnum, e_phentsize, struct.calcsize(order + ph_fmt))
    _check_table(path, size, "section header table", e_shoff, e_shnum, e_shentsize, struct.calcsize(order + sh_fmt))
    with open(path, "rb") as f:
        f.seek(e_phoff)
        phdrs = f.read(e_phnum * e_phentsize)
        f.seek(e_shoff)
        shdrs = f.read(e_shnum * e_shentsize)
    dynamic = False
    for k in range(e_phnum):
        p = struct.unpack_from(order + ph_fmt, phdrs, k * e_phentsize)
        p_type, p_offset, p_filesz = (p[0], p[2], p[5]) if bits == 64 else (p[0], p[1], p[4])
        dynamic = dynamic or p_type == _PT_DYNAMIC
        if p_type in (_PT_LOAD, _PT_DYNAMIC) and p_offset + p_filesz > size:
            raise InputError(f"{path} is truncated: segment {k} it maps ends at byte {p_offset + p_filesz} but the "
                             f"file has {size} bytes (loading it would crash the process)", hint=_HINT)
    if not dynamic:
        raise InputError(f"{path} is not a dynamically loadable library (no PT_DYNAMIC segment)", hint=_HINT)
    for k in range(e_shnum):
        s = struct.unpack_from(order + sh_fmt, shdrs, k * e_shentsize)
        sh_type, sh_offset, sh_size = (s[1], s[4], s[5])
        if sh_type != _SHT_NOBITS and sh_offset + sh_size > size:
            raise InputError(f"{path} is truncated: section {k} ends at byte {sh_offset + sh_size} but the file has "
                             f"{size} bytes", hint=_HINT)
    check_recorded(path, recorded, "the library")


def _check_table(path: Path, size: int, what: str, offset: int, count: int, entsize: int, expected: int) -> None:
    if count and entsize < expected:
        raise InputError(f"{path} has a malformed ELF {what} (entries of {entsize} bytes)", hint=_HINT)
    if offset + count * entsize > size:
        raise InputError(f"{path} is truncated: its {what} ends at byte {offset + count * entsize} but the file has "
                         f"{size} bytes (loading it would crash the process)", hint=_HINT)
