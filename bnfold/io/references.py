"""The files an input file reads besides itself — today, an ONNX model's external data.

The output rules (:mod:`bnfold.io.outputs`) protect these as they protect the inputs themselves: an exporter
writes ``model.onnx`` + ``model.onnx.data``, the user renames the model to ``orig.onnx`` (its tensors still name
``model.onnx.data``), and ``bnfold fold orig.onnx -o model.onnx`` must not write its own external data over the
file ``orig.onnx`` reads.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

__all__ = ["onnx_external_files", "referenced_files"]


def referenced_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files ``path`` reads when it is loaded (resolved in its folder, whether or not they exist): an ``.onnx``
    model's external data files; nothing for other files. A file that cannot be parsed references nothing here
    (its loader says what is wrong with it)."""
    p = Path(path)
    if p.suffix.lower() != ".onnx" or not p.is_file():
        return []
    st = p.stat()
    return [p.parent / loc for loc in _onnx_locations(str(p.absolute()), st.st_mtime_ns, st.st_size)]


def onnx_external_files(path: str | os.PathLike[str]) -> list[Path]:
    """The external data files the ONNX model at ``path`` names (``location`` of its external tensors, joined to
    the model's folder; sorted, no duplicates). Raises what ``onnx.load`` raises on an unreadable file."""
    p = Path(path)
    return [p.parent / loc for loc in _locations(p)]


def _locations(path: Path) -> list[str]:
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    model = onnx.load(str(path), load_external_data=False)
    found = set()
    for tensor in _get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location:
                found.add(location)
    return sorted(found)


@functools.lru_cache(maxsize=64)
def _onnx_locations(path: str, _mtime_ns: int, _size: int) -> tuple[str, ...]:
    """The external data locations of the ONNX file ``path``, remembered per file version (the output checks ask
    more than once); none when it is not a readable ONNX model (its loader refuses it with the reason)."""
    try:
        return tuple(_locations(Path(path)))
    except Exception:
        return ()
