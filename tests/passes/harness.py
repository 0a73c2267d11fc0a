"""Run passes directly on a captured graph and describe graphs by their ops (for Before / Expected tests).

    gm, results = run_passes(model, (x,), capture_mode, Canonicalize(), FoldIntoProducer())
    assert ops(gm) == ["conv2d"]

Each pass runs once over every node, as in the first round of the pipeline, through a fresh
:class:`~bnfold.passes.context.PassContext`. After each pass the graph must lint and its recorded shapes must match
a fresh run (the rewrites keep ``node.meta`` up to date themselves).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.fx
from torch import nn

from bnfold.capture import capture
from bnfold.ir.ops import materialize_affines
from bnfold.passes import Pass, PassContext, PassResult, Verify

__all__ = ["apply", "ops", "reasons", "run_passes"]

_MODULE_KIND = {
    "Conv1d": "conv1d", "Conv2d": "conv2d", "Conv3d": "conv3d", "ConvTranspose2d": "conv_transpose2d",
    "Linear": "linear", "BatchNorm1d": "batch_norm", "BatchNorm2d": "batch_norm", "ReLU": "relu",
    "Embedding": "embedding", "LayerNorm": "layer_norm", "GroupNorm": "group_norm", "Flatten": "flatten",
    "MaxPool2d": "max_pool2d", "AvgPool2d": "avg_pool2d", "Identity": "identity",
}


def _kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    if node.op == "call_module":
        cls = type(gm.get_submodule(str(node.target))).__name__
        if cls == "GuardsFn":  # torch.export's input guards: not a computation
            return None
        return _MODULE_KIND.get(cls, cls.lower())
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function" or node.target is operator.getitem:
        return None
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    if "batch_norm" in name:
        return "batch_norm"
    return {"_adaptive_avg_pool2d": "adaptive_avg_pool2d", "linear": "linear", "addmm": "linear"}.get(name, name)


def ops(gm: torch.fx.GraphModule) -> list[str]:
    """The computing ops of ``gm`` in graph order, named alike in both capture modes (``conv2d``, ``batch_norm``,
    ``channel_affine``, ``relu``, ``add`` …); placeholders, constants, ``getitem`` and the output are left out."""
    return [k for k in (_kind(gm, n) for n in gm.graph.nodes) if k is not None]


def apply(gm: torch.fx.GraphModule, *passes: Pass, example_inputs: Sequence[torch.Tensor] = ()) -> list[PassResult]:
    """Run each of ``passes`` once over every node of ``gm`` (in place); verify bookkeeping after each."""
    results = []
    verify = Verify(example_inputs) if example_inputs else None
    for p in passes:
        ctx = PassContext(gm)
        result = p.run(ctx, list(gm.graph.nodes))
        gm.graph.lint()
        materialize_affines(gm)
        gm.recompile()
        if verify is not None:
            verify.after_pass(p.name, ctx, result)
        results.append(result)
    return results


def run_passes(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], mode: str, *passes: Pass
               ) -> tuple[torch.fx.GraphModule, list[PassResult]]:
    """Capture ``model`` (``mode``) and :func:`apply` ``passes``; the rewritten graph must compute what ``model``
    computes (float32 tolerance; the folds are exact in float64)."""
    gm = capture(model, example_inputs, mode).module
    results = apply(gm, *passes, example_inputs=example_inputs)
    with torch.no_grad():
        torch.testing.assert_close(gm(*example_inputs), model(*example_inputs), rtol=1e-4, atol=1e-5)
    return gm, results


def reasons(result: PassResult) -> list[str]:
    return [r.reason for _, r in result.rejections]
