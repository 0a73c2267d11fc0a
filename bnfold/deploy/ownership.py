"""The manifest bnfold writes last into every output folder it builds (``optimize``, ``quantize``, an ``.onnx``
model's ``optimize``): it lists what bnfold put there, so ``--force`` can tell bnfold's own earlier output (replaced)
from a folder holding anything else (refused)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["OWNERSHIP", "owned_entries", "write_ownership"]

OWNERSHIP = ".bnfold-output.json"
"""The manifest's file name, inside the output folder."""


def owned_entries(out: Path) -> set[str] | None:
    """The entries (relative paths) bnfold's manifest in ``out`` lists, or None when ``out`` is not ours."""
    try:
        doc = json.loads((out / OWNERSHIP).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("writer") != "bnfold" or not isinstance(doc.get("entries"), list):
        return None
    return {str(e) for e in doc["entries"]} | {OWNERSHIP}


def write_ownership(staging: Path, command: str = "optimize") -> None:
    """Write the manifest listing everything in ``staging`` (call it last); ``command`` names the writer."""
    entries = sorted(str(p.relative_to(staging)) for p in staging.rglob("*"))
    (staging / OWNERSHIP).write_text(json.dumps({"writer": "bnfold", "command": command, "entries": entries},
                                                indent=1) + "\n")
