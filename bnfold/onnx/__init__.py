"""The ONNX front end: fold the normalizations inside ``.onnx`` files.

:func:`load_onnx` → :func:`fold_model` → :func:`save_onnx` (:mod:`bnfold.onnx.files`: safe loading, external data,
atomic checked writes; :mod:`bnfold.onnx.fold`: the pipeline and the report). The rules are
:mod:`bnfold.passes.onnx`; the ONNX graph they read and edit is :mod:`bnfold.ir.onnx`.
"""

from __future__ import annotations

from bnfold.onnx.files import (
    MIN_EXTERNAL_BYTES,
    LoadedOnnx,
    check_folded,
    data_file,
    file_size,
    load_onnx,
    needs_data_file,
    op_counts,
    save_onnx,
    staged_onnx,
)
from bnfold.onnx.fold import fold_model
from bnfold.onnx.report import OnnxFoldReport

__all__ = ["MIN_EXTERNAL_BYTES", "LoadedOnnx", "OnnxFoldReport", "check_folded", "data_file", "file_size",
           "fold_model", "load_onnx", "needs_data_file", "op_counts", "save_onnx", "staged_onnx"]
