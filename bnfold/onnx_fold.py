"""Kept for imports written before the ONNX front end became the package :mod:`bnfold.onnx` (issue 24)."""

from __future__ import annotations

from bnfold.onnx import (
    MIN_EXTERNAL_BYTES,
    LoadedOnnx,
    check_folded,
    data_file,
    file_size,
    fold_model,
    load_onnx,
    needs_data_file,
    op_counts,
    save_onnx,
    staged_onnx,
)

__all__ = ["MIN_EXTERNAL_BYTES", "LoadedOnnx", "check_folded", "data_file", "file_size", "fold_model", "load_onnx",
           "needs_data_file", "op_counts", "save_onnx", "staged_onnx"]
