"""CLI subcommands: one module per group of subcommands, each with ``register(subparsers)``.

:data:`SUMMARY` names every subcommand, the module that implements it and its one-line help, in help order. The
CLI builds ``bnfold --help`` from it alone and imports a command's module (and with it torch, ONNX or TVM) only
when that command runs: ``bnfold --help`` and ``--version`` start in a fraction of a second.
"""

from __future__ import annotations

__all__ = ["SUMMARY"]

SUMMARY: dict[str, tuple[str, str]] = {
    "inspect": ("fold_cmd", "show which normalizations would fold, and why the others would not"),
    "fold": ("fold_cmd", "fold normalizations and save the result as .pt2"),
    "check": ("check_cmd", "compare a candidate model with a reference on your data (parity)"),
    "export-onnx": ("check_cmd", "export a model to ONNX (onnxsim-simplified) and check it with ONNX Runtime"),
    "demo": ("demo", "run the whole pipeline on the embedded digits CNN"),
    "recalibrate": ("recalibrate_cmd", "re-estimate BatchNorm statistics exactly on calibration data, save .pt2"),
    "diagnose": ("recalibrate_cmd", "compare stored BatchNorm statistics with what the layers see on data"),
    "compile": ("compile_cmd", "fold, then compile with TVM (llvm CPU or cuda) into a deployable folder"),
    "optimize": ("optimize_cmd", "recalibrate, fold, export ONNX, compile with TVM and verify, in one step"),
    "quantize": ("quantize_cmd", "fold, equalize, correct biases and quantize to int8 ONNX (ONNX Runtime), verified"),
}
