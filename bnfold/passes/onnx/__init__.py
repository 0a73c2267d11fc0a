"""The ONNX graph back end of the fold rules: fold normalizations inside ``.onnx`` files.

:func:`~bnfold.onnx_fold.load_onnx` → :func:`~bnfold.onnx_fold.fold_model` →
:func:`~bnfold.onnx_fold.save_onnx`; the rules live in :mod:`bnfold.passes.onnx.rules` and share their
math (:mod:`bnfold.ir.affine_math`) and reasons (:mod:`bnfold.ir.reasons`) with the torch back end.
"""

from __future__ import annotations

__all__: list[str] = []
