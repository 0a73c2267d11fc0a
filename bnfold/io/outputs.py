"""Where outputs go: never over an input, never over a file bnfold did not write, atomically, honouring umask.

Rules every file bnfold writes follows — the main output and every file written with it (an ONNX model's external
data) alike. A command declares all of them up front in one :class:`OutputPlan` (its inputs: model, data, validation
set), which checks them before any work:

* an output is never an input, nor a file an input references (an ONNX model's external data:
  :func:`~bnfold.io.references.referenced_files`), compared by identity (``os.path.samefile``: symlinks and hard
  links included);
* an output folder never contains an input or a file an input references (a ``--force`` replace would delete it);
* an existing output is replaced only with ``force`` and only when bnfold wrote it: a file it recognizes
  (``is_ours``; an external data file is bnfold's when the bnfold model beside it references it), a folder whose
  manifest lists every entry in it — anything else is named and left alone;
* files are written to a temporary name beside the destination and renamed into place; files that belong
  together (a model and its external data, :func:`atomic_files`) are written under their final names in a staging
  folder beside them and moved into place together, so a model never stands next to a data file it was not written
  with. Temporary names carry bnfold's pid (``.NAME.bnfold-PID-XXXX.partial…`` / ``….staging``), so a later run
  into the same folder removes the leftovers of a killed run (and only those: the pattern is bnfold's, the pid is
  dead);
* permissions follow the umask (``tempfile`` would make them 0600/0700);
* a write that fails for lack of space or permission raises :class:`~bnfold.errors.OutputError` saying
  what was not written; nothing half-written is left.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bnfold.errors import InputError, OutputError
from bnfold.io.references import referenced_files

__all__ = ["OutputPlan", "Protected", "atomic_files", "atomic_output", "check_output_dir", "check_output_file",
           "clean_stale", "output_error", "protected_files", "publish_dir", "same_file", "staged_output",
           "staging_dir", "write_bytes_atomic"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
_STALE = re.compile(r"^\..*\.bnfold-(\d+)-[A-Za-z0-9_]+\.(partial|staging|old)(\.[A-Za-z0-9]+)?$")


def same_file(a: PathLike, b: PathLike) -> bool:
    """``a`` and ``b`` are the same file or folder (symlinks resolved, hard links detected)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


@dataclass(frozen=True)
class Protected:
    """A file no output may be: an input, or a file an input reads (``what`` says which, for the message). A path-like
    (``os.fspath``), so the writers' ``protect=`` parameters take a plan's list as they take plain paths."""

    path: Path
    what: str

    def __fspath__(self) -> str:
        return os.fspath(self.path)


def protected_files(inputs: Iterable[PathLike | Protected | None]) -> list[Protected]:
    """The inputs and every file they reference (:func:`~bnfold.io.references.referenced_files`): what no output
    may be or contain. Already expanded entries (:class:`Protected`) pass through."""
    out: list[Protected] = []
    for q in inputs:
        if q is None:
            continue
        if isinstance(q, Protected):
            out.append(q)
            continue
        out.append(Protected(Path(q), f"the input file {q}"))
        out += [Protected(r, f"{r}, the external data of the input {q}") for r in referenced_files(q)]
    return out


def _is_protected(dest: Path, protected: Sequence[Protected]) -> Protected | None:
    """The protected file ``dest`` is (by identity, or by path when it does not exist yet), if any."""
    for q in protected:
        if (q.path.exists() and (dest.exists() or dest.is_symlink()) and same_file(dest, q.path)) \
                or os.path.realpath(dest) == os.path.realpath(q.path):
            return q
    return None


def _inside(path: PathLike, folder: PathLike) -> bool:
    p, d = os.path.realpath(path), os.path.realpath(folder)
    return p == d or p.startswith(d.rstrip(os.sep) + os.sep)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(folder: PathLike) -> list[Path]:
    """Remove temporary files/folders a killed bnfold run left in ``folder``; return what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in Path(folder).iterdir():
            m = _STALE.match(entry.name)
            if not m or _pid_alive(int(m.group(1))):
                continue
            with contextlib.suppress(OSError):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed.append(entry)
                log.warning("removed %s, left by an interrupted bnfold run (pid %s)", entry, m.group(1))
    return removed


def _temp_name(dest: Path, kind: str) -> str:
    return f".{dest.stem if kind == 'partial' else dest.name}.bnfold-{os.getpid()}-"


def check_output_file(dest: PathLike, inputs: Iterable[PathLike | Protected | None] = (), *, force: bool = False,
                      is_ours: Callable[[Path], bool] | None = None, role: str | None = None) -> Path:
    """Validate a file output before any work: not an input nor a file an input references, its folder exists, and
    an existing file there is replaced only with ``force`` when ``is_ours`` recognizes it as bnfold's own.
    ``role``: what the file is when it is not the ``-o`` path itself (``"the external data of -o out.onnx"``)."""
    d = Path(dest)
    what = f"{d} ({role})" if role else str(d)
    hit = _is_protected(d, protected_files(inputs))
    if hit is not None:
        raise InputError(f"refusing to overwrite {hit.what}" + (f": bnfold would write {role} there" if role else
                                                                 f" (-o {d} is the same file)"),
                         hint="choose another -o path" + (" (the external data is named after it)" if role else ""))
    if d.is_dir():
        raise InputError(f"{what} is a folder", hint="give a file name such as model_folded.pt2")
    parent = d.parent if str(d.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output folder {parent} does not exist")
    if d.exists() or d.is_symlink():
        if not force:
            raise InputError(f"{what} already exists", hint="choose another -o path, or pass --force to replace an "
                                                            "earlier bnfold output")
        if d.is_symlink() or is_ours is None or not is_ours(d):
            raise InputError(f"refusing to replace {what}: bnfold did not write it",
                             hint="--force replaces only bnfold's own earlier outputs; choose another -o path")
    return d


@contextlib.contextmanager
def atomic_output(dest: PathLike, *, protect: Sequence[PathLike | Protected] = ()) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success rename it to ``dest``, on failure delete it.

    Refuses to write over any path in ``protect`` (the user's inputs) or a file they reference. The file gets the
    umask's permissions.
    """
    d = Path(dest)
    _check_writable(d, protected_files(protect))
    parent = d.parent if str(d.parent) else Path(".")
    clean_stale(parent)
    # keep the real suffix last: some writers (torch.export.save) check it
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_name(d, "partial"), suffix=f".partial{d.suffix}", dir=parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
    except OSError as exc:
        raise output_error(d, exc) from exc
    try:
        yield Path(tmp)
        os.replace(tmp, d)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, InputError):
            raise output_error(d, exc) from exc
        raise


def _check_writable(d: Path, protected: Sequence[Protected]) -> None:
    """The last check of a writer (the plan checked before any work; files may have moved since)."""
    hit = _is_protected(d, protected)
    if hit is not None:
        raise InputError(f"refusing to overwrite {hit.what}", hint="choose another -o path")
    if d.is_dir():
        raise InputError(f"{d} is a folder", hint="give a file name such as model_folded.pt2")
    parent = d.parent if str(d.parent) else Path(".")
    if not parent.exists():
        raise InputError(f"output folder {parent} does not exist")


@contextlib.contextmanager
def atomic_files(dests: Sequence[PathLike], *, protect: Sequence[PathLike | Protected] = ()) -> Iterator[list[Path]]:
    """Files that belong together — ``dests[0]`` the main one (a model), the others what it references (its external
    data), all in one folder — written under their final names in a staging folder beside them (yielded: the paths to
    write, in ``dests`` order; a model there finds its data by the same relative name, so it can be run before it is
    published) and moved into place together when the block ends normally.

    Publishing moves an existing main file aside first, then the others into place, then the main one: at no moment
    does a main file stand next to companions it was not written with. On any exception — in the block or while
    publishing (Ctrl-C included) — nothing new stays and the files that were there are put back; a disk or permission
    error is an :class:`~bnfold.errors.OutputError`. Refuses any destination in ``protect`` (inputs and the files
    they reference). Only the files the block actually wrote are published."""
    ds = [Path(d) for d in dests]
    if not ds or len({os.path.realpath(d.parent if str(d.parent) else ".") for d in ds}) != 1:
        raise ValueError(f"atomic_files needs files of one folder, got {[str(d) for d in ds]}")
    protected = protected_files(protect)
    for d in ds:
        _check_writable(d, protected)
    staging = staging_dir(ds[0])
    try:
        yield [staging / d.name for d in ds]
        _publish_files(staging, ds)
    except OSError as exc:
        raise output_error(ds[0], exc) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish_files(staging: Path, dests: list[Path]) -> None:
    """Move the staged files into place (order and guarantees: :func:`atomic_files`)."""
    aside: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    old = staging / ".old"
    try:
        old.mkdir()
        for d in dests:
            if (staging / d.name).exists() and (d.exists() or d.is_symlink()):
                os.replace(d, old / d.name)
                aside.append((old / d.name, d))
        for d in [*dests[1:], dests[0]]:
            if (staging / d.name).exists():
                os.replace(staging / d.name, d)
                placed.append(d)
    except BaseException:
        for d in placed:
            with contextlib.suppress(OSError):
                d.unlink()
        for src, d in aside:
            with contextlib.suppress(OSError):
                os.replace(src, d)
        raise


def write_bytes_atomic(dest: PathLike, data: bytes, *, protect: Sequence[PathLike | Protected] = ()) -> Path:
    """Write ``data`` to ``dest`` atomically (a disk-full error is an :class:`OutputError`, not a crash)."""
    with atomic_output(dest, protect=protect) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(dest)


def output_error(dest: Path, exc: OSError) -> OutputError:
    what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.EROFS: "the file system is read-only"}.get(exc.errno or 0, exc.strerror or str(exc))
    return OutputError(f"could not write {dest}: {what}; nothing was written there",
                       hint="free some space or choose another output location" if exc.errno in
                       (errno.ENOSPC, errno.EDQUOT) else "choose an output location you can write to")


def check_output_dir(out: PathLike, inputs: Iterable[PathLike | Protected | None] = (), *, force: bool = False,
                     owned: Callable[[Path], set[str] | None] | None = None) -> Path:
    """Validate an output folder before any work: it contains no input and no file an input references.
    ``owned(out)`` returns the entries bnfold wrote there (from its manifest, relative paths, files and folders) or
    ``None`` when it is not bnfold's."""
    o = Path(out)
    for q in protected_files(inputs):
        if not q.path.exists():
            continue
        if same_file(o, q.path) or _inside(q.path, o):
            raise InputError(f"the output folder {o} contains {q.what}; bnfold never writes over or deletes its "
                             "inputs", hint="choose a new output folder")
    if o.exists() and not o.is_dir():
        raise InputError(f"{o} exists and is not a folder", hint="choose a new output folder")
    parent = o.parent if str(o.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output folder's parent {parent} does not exist")
    if o.is_symlink():
        raise InputError(f"{o} is a symbolic link", hint="choose a new output folder")
    if o.is_dir() and any(o.iterdir()):
        if not force:
            raise InputError(f"{o} already exists and is not empty",
                             hint="choose a new output folder, or pass --force to replace an earlier bnfold output")
        listed = owned(o) if owned is not None else None
        if listed is None:
            raise InputError(f"refusing to replace {o}: it is not a bnfold artifact or output folder (no bnfold "
                             "manifest)",
                             hint="--force replaces only bnfold's own earlier outputs; choose a new folder")
        foreign = sorted(str(p.relative_to(o)) for p in o.rglob("*")
                         if str(p.relative_to(o)) not in listed and not _STALE.match(p.name))
        if foreign:
            raise InputError(f"refusing to replace {o}: it holds files bnfold did not write "
                             f"({', '.join(foreign[:5])}{', …' if len(foreign) > 5 else ''})",
                             hint="move them out, or choose a new output folder")
    return o


def staging_dir(out: PathLike) -> Path:
    """A fresh folder beside ``out`` to build it in (umask permissions; stale ones of killed runs removed)."""
    o = Path(out)
    parent = o.parent if str(o.parent) else Path(".")
    clean_stale(parent)
    if o.is_dir():
        clean_stale(o)
    try:
        d = Path(tempfile.mkdtemp(prefix=_temp_name(o, "staging"), suffix=".staging", dir=parent))
        os.chmod(d, 0o777 & ~_umask())
    except OSError as exc:
        raise output_error(o, exc) from exc
    return d


@contextlib.contextmanager
def staged_output(out: PathLike) -> Iterator[Path]:
    """Build the folder ``out`` in a staging folder beside it (:func:`staging_dir`) and publish it
    (:func:`publish_dir`) when the block ends normally; on any exception the staging folder is removed — a disk or
    permission error becomes an :class:`~bnfold.errors.OutputError` saying what was not written — and ``out`` is
    left as it was."""
    o = Path(out)
    staging = staging_dir(o)
    try:
        yield staging
        publish_dir(staging, o)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise output_error(o, exc) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish_dir(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` folder to ``out``, replacing an old ``out`` only at the very end."""
    old = None
    try:
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_name(out, "old"), suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(staging, out)
    except OSError as exc:
        if old is not None and not out.exists():
            with contextlib.suppress(OSError):
                os.replace(old / out.name, out)
        raise output_error(out, exc) from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class OutputPlan:
    """Every file and folder one command writes, checked against its inputs before any work: the one gate every
    output goes through (the rules: module docstring).

    ::

        plan = OutputPlan([args.model, args.data], force=args.force)
        plan.file(args.output, is_ours=is_bnfold_onnx)                 # -o OUT.onnx
        plan.file(data_file, is_ours=..., role="the external data of -o OUT.onnx")
        ...work...
        write(..., protect=plan.protect)                               # the writers check again when they write

    ``inputs``: the user's files (``None`` entries are skipped); the files they reference are protected too.
    """

    def __init__(self, inputs: Iterable[PathLike | None], *, force: bool = False) -> None:
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.force = force
        self.protect: list[Protected] = protected_files(self.inputs)
        self.outputs: list[Path] = []

    def file(self, dest: PathLike, *, is_ours: Callable[[Path], bool] | None = None, role: str | None = None
             ) -> Path:
        """Plan the file ``dest`` (:func:`check_output_file`); ``role`` names a file written with the ``-o`` one."""
        d = check_output_file(dest, self.protect, force=self.force, is_ours=is_ours, role=role)
        self.outputs.append(d)
        return d

    def folder(self, dest: PathLike, *, owned: Callable[[Path], set[str] | None] | None = None) -> Path:
        """Plan the folder ``dest`` (:func:`check_output_dir`)."""
        d = check_output_dir(dest, self.protect, force=self.force, owned=owned)
        self.outputs.append(d)
        return d
