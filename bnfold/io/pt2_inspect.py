"""Inspect a ``torch.export`` ``.pt2`` archive before loading it: a model file is data, not code.

``torch.export.load`` (torch 2.14, ``torch/export/pt2_archive/_package.py`` and ``torch/_export/serde``) reads
these members of the zip (``<root>/`` prefix omitted):

=======================================  ==========================================================================
member                                   how torch reads it
=======================================  ==========================================================================
``archive_format``, ``archive_version``,  plain text
``byteorder``, ``.data/*``
``models/<name>.json``                   JSON, but: its ``guards_code`` strings are ``exec``-ed by
                                         ``ep.module()``, every ``expr_str`` goes through ``sympy.sympify``
                                         (``eval``), and node ``target`` strings are resolved by ``getattr`` from
                                         ``torch`` / ``_operator`` / ``math`` (torch's verifier refuses
                                         non-operators in the main graph; bnfold refuses them before loading)
``data/weights/<name>_weights_config.json``, JSON: for each tensor, ``path_name`` and ``use_pickle``
``data/constants/<name>_constants_config.json``
``data/weights/weight_N``,               raw tensor bytes when ``use_pickle`` is false; with ``use_pickle`` (tensor
``data/constants/tensor_N``              subclasses) ``torch.load(weights_only=False)`` — a full unpickle
``data/constants/custom_obj_N``          TorchScript object, ``torch._C._pickle_load_obj`` (unpickle)
``data/constants/opaque_obj_N``          ``pickle.loads`` (unpickle)
``data/weights/<name>.pt``,              legacy weights / constants: unpickled by the legacy path
``data/constants/<name>.pt``
``data/sample_inputs/<name>.pt``         ``torch.load(weights_only=True)``, and when that fails, **again with
                                         weights_only=False** (``serialize.deserialize_torch_artifact``)
``data/aotinductor/**``                  compiled shared libraries, loaded (native code runs)
``extra/*``                              read as text
=======================================  ==========================================================================

:func:`inspect_archive` classifies every member; :func:`load_exported` loads the archive from the bytes it
inspected (no second read of the file), refusing anything that would unpickle or run code unless
``trusted``. Example inputs stored as plain tensors load with ``weights_only=True`` here first — when that
succeeds, torch's own first attempt on the same bytes succeeds too, so its unsafe fallback never runs. When
they need more than that, the archive is refused, or (``drop_example_inputs``, i.e. the user gave
``--input-shape``) loaded with that member emptied.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bnfold.errors import InputError

__all__ = ["ArchiveFinding", "ArchiveInspection", "inspect_archive", "load_exported"]

_SAFE_TEXT = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_OPERATOR_OK = {"getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq",
                "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift",
                "matmul", "truth"}
_TORCH_SYM_OK = re.compile(r"torch\.(sym_[a-z_]+|_sym_sqrt)")
_OP_TARGET = re.compile(r"torch\.ops\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan)")  # sympy Float('3.0')
_GUARD_ATTRS = {"size", "stride", "storage_offset", "dim", "numel"}


@dataclass(frozen=True)
class ArchiveFinding:
    """A member that would run code or unpickle when loaded. ``example_inputs``: it is the stored example
    inputs (which ``--input-shape`` can replace)."""

    member: str
    reason: str
    example_inputs: bool = False


@dataclass
class ArchiveInspection:
    """What :func:`inspect_archive` found: members that would run code or unpickle (``findings``), the stored
    example inputs, and members torch would look for but the archive lacks (``missing``: member → what it holds)."""

    root: str
    findings: list[ArchiveFinding] = field(default_factory=list)
    sample_inputs: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)


def _sympy_names() -> set[str]:
    import sympy
    import torch.utils._sympy.functions as fns

    names = {n for n in dir(sympy) if not n.startswith("_") and isinstance(getattr(sympy, n), type)
             and issubclass(getattr(sympy, n), sympy.Basic)}
    names |= {n for n in dir(fns) if not n.startswith("_") and isinstance(getattr(fns, n), type)}
    return names | {"True", "False", "oo", "zoo", "nan", "pi", "E", "I"}


def _safe_sympy(expr: str, names: set[str]) -> bool:
    """``expr`` is a sympy ``srepr``/str made only of calls to sympy classes, identifiers-as-strings and
    numbers (what torch writes) — nothing ``sympify`` could turn into other code."""
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in names:
                return False
        elif isinstance(node, ast.Name):
            if node.id not in names and not re.fullmatch(r"[su]\d+|[a-z]\d*", node.id):
                return False
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str) and not (_IDENT.fullmatch(node.value) or _NUMBER.fullmatch(node.value)):
                return False
        elif not isinstance(node, ast.Expression | ast.keyword | ast.BinOp | ast.UnaryOp | ast.Compare
                            | ast.BoolOp | ast.operator | ast.unaryop | ast.cmpop | ast.boolop | ast.Load):
            return False
    return True


def _safe_guard(code: str) -> bool:
    """A guard like ``L['x'].size()[0] == 3`` or ``2 <= L['x'].size()[0]`` — checks on input sizes only."""
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    try:
        tree = ast.parse(code, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            base = node.value
            if not (node.attr in _GUARD_ATTRS or (isinstance(base, ast.Name) and base.id == "math"
                                                  and not node.attr.startswith("_"))):
                return False
        elif isinstance(node, ast.Name):
            if node.id not in ("L", "math") and node.id not in SYMPY_INTERP:
                return False
        elif isinstance(node, ast.Call):
            if node.keywords or not isinstance(node.func, ast.Attribute | ast.Name):
                return False
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, int | float | str | bool) or (
                    isinstance(node.value, str) and not _IDENT.fullmatch(node.value)):
                return False
        elif not isinstance(node, ast.Expression | ast.Subscript | ast.BinOp | ast.UnaryOp | ast.Compare
                            | ast.BoolOp | ast.operator | ast.unaryop | ast.cmpop | ast.boolop | ast.Load):
            return False
    return True


def _safe_target(target: str) -> bool:
    if _OP_TARGET.fullmatch(target) or _TORCH_SYM_OK.fullmatch(target):
        return True
    module, _, name = target.partition(".")
    if module == "_operator":
        return name in _OPERATOR_OK
    if module == "math":
        return bool(_IDENT.fullmatch(name)) and not name.startswith("_")
    return False


def _check_model_json(member: str, raw: bytes, names: set[str]) -> list[ArchiveFinding]:
    try:
        doc = json.loads(raw)
    except ValueError:
        return []  # torch rejects it as a corrupt archive; nothing runs
    found: list[ArchiveFinding] = []
    for guard in doc.get("guards_code") or []:
        if not isinstance(guard, str) or not _safe_guard(guard):
            found.append(ArchiveFinding(member, f"holds guard code that is not a shape check ({str(guard)[:60]!r}); "
                                                "torch executes it as Python"))
            break
    stack: list[Any] = [doc]
    while stack and len(found) < 3:
        obj = stack.pop()
        if isinstance(obj, dict):
            expr = obj.get("expr_str")
            if isinstance(expr, str) and not _safe_sympy(expr, names):
                found.append(ArchiveFinding(member, f"holds a symbolic expression that is not plain sympy "
                                                    f"({expr[:60]!r}); sympify would evaluate it as Python"))
            target = obj.get("target")
            if isinstance(target, str) and "inputs" in obj and "outputs" in obj and not _safe_target(target):
                found.append(ArchiveFinding(member, f"calls {target!r}, which is not a torch operator; running "
                                                    "the graph would call it"))
            stack.extend(obj.values())
        elif isinstance(obj, list):
            stack.extend(obj)
    return found


def _payload_findings(zf: zipfile.ZipFile, root: str, directory: str, config_member: str) -> list[ArchiveFinding]:
    try:
        config = json.loads(zf.read(root + config_member)).get("config", {})
    except (KeyError, ValueError, AttributeError):
        return []
    found = []
    for fqn, meta in config.items():
        if not isinstance(meta, dict):
            continue
        path_name = str(meta.get("path_name", ""))
        member = f"{directory}{path_name}"
        if path_name.startswith(("custom_obj", "opaque_obj")):
            found.append(ArchiveFinding(member, f"is a custom object ({fqn}) that is unpickled when loaded"))
        elif meta.get("use_pickle"):
            found.append(ArchiveFinding(member, f"is a pickled tensor ({fqn}) that is unpickled when loaded"))
    return found


def _missing_members(zf: zipfile.ZipFile, root: str, rel: list[str]) -> dict[str, str]:
    """Members torch's reader needs that the archive lacks: for every ``models/<name>.json`` its weights and
    constants configs, and every tensor file a config names (torch would fail on them with "check the warnings
    above", its warnings being a traceback)."""
    present = set(rel)
    missing: dict[str, str] = {}
    names = [r[len("models/"):-len(".json")] for r in rel if r.startswith("models/") and r.endswith(".json")]
    if not names:
        missing["models/<name>.json"] = "the program"
    for name in names:
        for directory, kind in (("data/weights/", "weights"), ("data/constants/", "constants")):
            config_member = f"{directory}{name}_{kind}_config.json"
            if config_member not in present:
                missing[config_member] = f"the index of the {kind}"
                continue
            try:
                config = json.loads(zf.read(root + config_member)).get("config", {})
            except (KeyError, ValueError, AttributeError):
                continue  # unreadable: torch says so in one line
            for fqn, meta in config.items() if isinstance(config, dict) else ():
                member = f"{directory}{meta.get('path_name', '')}" if isinstance(meta, dict) else ""
                if member and member != directory and member not in present:
                    missing[member] = str(fqn)
    return missing


def inspect_archive(data: bytes, path: Path) -> ArchiveInspection:
    """Classify the members of the ``.pt2`` in ``data`` (see the module docstring)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"{path} is not a torch.export archive (not a readable zip file: {exc})",
                         hint="re-save it with torch.export.save(torch.export.export(model, inputs), path)") from exc
    names = [i.filename for i in infos]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:  # two readers could pick different copies: what we inspect must be what torch loads
        return ArchiveInspection("", [ArchiveFinding(duplicates[0], "appears more than once in the archive")])
    # torch's reader takes the first record's folder as the archive root and sees only records under it
    root = names[0].split("/", 1)[0] + "/" if names and "/" in names[0] else ""
    rel = [n[len(root):] for n in names if n.startswith(root)]
    out = ArchiveInspection(root)
    if "archive_format" not in rel:
        if any(r in ("version", "serialized_exported_program.json") or r.endswith(".pt") for r in rel):
            out.findings.append(ArchiveFinding(rel[0] if rel else "(empty)", "is part of a pre-2.8 torch.export "
                                               "archive, whose weights and constants are pickles"))
        return out
    out.missing = _missing_members(zf, root, rel)
    sympy_names = _sympy_names()
    for r in rel:
        if r.startswith("data/aotinductor/"):
            out.findings.append(ArchiveFinding(r, "is AOTInductor-compiled native code, loaded (and run) by "
                                               "torch.export.load"))
        elif re.fullmatch(r"data/(weights|constants)/[^/]+\.pt", r):
            out.findings.append(ArchiveFinding(r, "is a legacy pickled weights/constants file"))
        elif r.startswith("data/sample_inputs/"):
            out.sample_inputs.append(r)
            if not _loads_weights_only(zf.read(root + r)):
                out.findings.append(ArchiveFinding(r, "holds example inputs that torch.load(weights_only=True) "
                                                   "refuses; torch would unpickle them fully", example_inputs=True))
        elif r.startswith("models/") and r.endswith(".json"):
            out.findings.extend(_check_model_json(r, zf.read(root + r), sympy_names))
        elif r.endswith("_weights_config.json") and r.startswith("data/weights/"):
            out.findings.extend(_payload_findings(zf, root, "data/weights/", r))
        elif r.endswith("_constants_config.json") and r.startswith("data/constants/"):
            out.findings.extend(_payload_findings(zf, root, "data/constants/", r))
    return out


def _loads_weights_only(raw: bytes) -> bool:
    if not raw:
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4": not the user's business
            torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception:
        return False
    return True


def _without(data: bytes, root: str, members: list[str]) -> bytes:
    """A copy of the archive with ``members`` emptied (torch reads empty example inputs as none)."""
    src = zipfile.ZipFile(io.BytesIO(data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, b"" if info.filename[len(root):] in members else src.read(info.filename))
    return buf.getvalue()


@contextlib.contextmanager
def _quiet_torch_export() -> Iterator[None]:
    """torch.export.load logs a full traceback (as a warning) before raising on a bad archive; the error we
    raise says it in one line."""
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_exported(path: Path, *, trusted: bool = False, drop_example_inputs: bool = False
                  ) -> torch.export.ExportedProgram:
    """Load the ``.pt2`` at ``path``, refusing (``InputError``, naming the member) anything that would unpickle
    or run code unless ``trusted``. ``drop_example_inputs``: stored example inputs that need unpickling are
    skipped instead of refused (the caller has its own)."""
    data = path.read_bytes()
    source: Any = io.BytesIO(data)
    found = inspect_archive(data, path)
    if found.missing:
        member, what = next(iter(found.missing.items()))
        more = f" (and {len(found.missing) - 1} more)" if len(found.missing) > 1 else ""
        raise InputError(f"{path} is incomplete: member {member} ({what}) is missing{more}",
                         hint="the archive lost members (a partial copy or an edited file?); re-save it with "
                              "torch.export.save")
    if not trusted:
        blocking = [f for f in found.findings if not (f.example_inputs and drop_example_inputs)]
        if blocking:
            first = blocking[0]
            more = f" (and {len(blocking) - 1} more)" if len(blocking) > 1 else ""
            hint = "pass --trust-pickle only if you trust where the file comes from"
            if all(f.example_inputs for f in blocking):
                hint = ("pass --input-shape to use random example inputs instead of the stored ones, or "
                        "--trust-pickle if you trust the file")
            raise InputError(f"{path}: member {first.member} {first.reason}{more}; loading it could run code "
                             "from the file", hint=hint)
        if any(f.example_inputs for f in found.findings):
            source = io.BytesIO(_without(data, found.root, [f.member for f in found.findings if f.example_inputs]))
    with _quiet_torch_export():
        return torch.export.load(source)
