"""The ONNX graph back end of the fold rules: fold normalizations inside ``.onnx`` files.

:func:`~bnfold.passes.onnx.pipeline.load_onnx` → :func:`~bnfold.passes.onnx.pipeline.fold_model` →
:func:`~bnfold.passes.onnx.pipeline.save_onnx`; the rules live in :mod:`bnfold.passes.onnx.rules` and share their
math (:mod:`bnfold.passes.affine_math`) and reasons (:mod:`bnfold.passes.reasons`) with the torch back end.
"""

from __future__ import annotations

__all__: list[str] = []
