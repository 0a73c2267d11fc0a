"""bnfold's intermediate representation: what every layer above (capture, passes, recalibration, parity) agrees on.

* :mod:`~bnfold.ir.graph`       — torch.fx helpers: attributes, constants, shapes/dtypes as node metadata;
* :mod:`~bnfold.ir.shapes`      — that metadata for a whole graph, by rules (fake kernels only where needed);
* :mod:`~bnfold.ir.ops`         — the canonical op ``channel_affine(x, a, b, axis)`` and its lowering;
* :mod:`~bnfold.ir.affine_math` — the fold arithmetic as pure float64 functions (no graph);
* :mod:`~bnfold.ir.affine_view` — read any per-channel affine node (canonical or ``x * s + b``) as ``(x, a, b, axis)``;
* :mod:`~bnfold.ir.batchnorm`   — what a BatchNorm is (module, functional, aten), with its statistics checked;
* :mod:`~bnfold.ir.linear_ops`  — what a conv / conv-transpose / linear is, and its parameters;
* :mod:`~bnfold.ir.norms`       — what a LayerNorm / GroupNorm / InstanceNorm / RMSNorm is, split into norm + affine.

Matching is by what an op *is* (module type with the stock ``forward``, aten overload, function identity), never
by node names. Nothing here imports from the layers above; graph rewrites live in :mod:`bnfold.passes`.
"""
