"""``check_shared_library``: a library ``dlopen`` could not map safely is refused, by reading its ELF headers only.

The library under test is a real shared object of this host: the ``_ctypes`` extension module of this Python (no
TVM needed). Issue 28: a truncated ``model.so`` killed ``bnfold check`` with SIGBUS inside ``dlopen`` (whether a
truncated library crashes depends on which pages the loader and the first calls touch: a signal, no exception, so
the file is checked before it is loaded)."""

from __future__ import annotations

import _ctypes
import shutil
import struct
from pathlib import Path

import pytest

from bnfold.errors import InputError
from bnfold.targets.tvm.library import check_recorded, check_shared_library, file_digest, host_machine

LIBRARY = Path(_ctypes.__file__)


@pytest.fixture
def lib(tmp_path: Path) -> Path:
    if LIBRARY.suffix != ".so" or LIBRARY.read_bytes()[:4] != b"\x7fELF":
        pytest.skip("this Python's extension modules are not ELF shared objects")
    return Path(shutil.copy(LIBRARY, tmp_path / "model.so"))


def test_a_real_library_passes_with_and_without_its_record(lib: Path) -> None:
    check_shared_library(lib)
    check_shared_library(lib, recorded=file_digest(lib))


@pytest.mark.parametrize("fraction", [0.002, 0.05, 0.2, 0.5, 0.8, 0.95, 0.999])
def test_every_truncation_is_refused_before_loading(lib: Path, fraction: float) -> None:
    data = lib.read_bytes()
    lib.write_bytes(data[: max(1, int(len(data) * fraction))])
    with pytest.raises(InputError, match=r"truncated|not a shared library|malformed") as err:
        check_shared_library(lib)
    assert str(lib) in str(err.value) and "recompile" in str(err.value)


def test_foreign_and_malformed_headers_are_named(lib: Path) -> None:
    data = bytearray(lib.read_bytes())
    cases = {
        "not a shared library": b"MZ" + bytes(data[2:]),
        "-bit library": bytes(data[:4]) + bytes([1 if data[4] == 2 else 2]) + bytes(data[5:]),
        "not a shared library (e_type": bytes(data[:16]) + struct.pack("<H", 2) + bytes(data[18:]),
        "code; this host is": bytes(data[:18]) + struct.pack("<H", 40 if host_machine() != 40 else 62)
        + bytes(data[20:]),
    }
    for fragment, content in cases.items():
        lib.write_bytes(content)
        with pytest.raises(InputError, match=fragment.replace("(", r"\(")):
            check_shared_library(lib)


def test_a_library_that_is_not_the_recorded_one_is_refused(lib: Path, tmp_path: Path) -> None:
    record = file_digest(lib)
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    lib.write_bytes(bytes(data))
    with pytest.raises(InputError, match="SHA-256"):
        check_shared_library(lib, recorded=record)
    other = tmp_path / "params.pt"
    other.write_bytes(b"12345")
    with pytest.raises(InputError, match="is 5 bytes but the manifest records 7"):
        check_recorded(other, {"bytes": 7, "sha256": "0" * 64}, "the parameter file")
