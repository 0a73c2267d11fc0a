"""Hand-written norms on Hugging Face ``transformers`` models (tiny configs, random init, norm weights randomized so
that no affine is an identity): every norm is a candidate, reported as the norm it computes and named by its module;
LayerNorm/RMSNorm weights fold into q/k/v, gate/up and the head; tied input/output embeddings are never corrupted.

Every test runs in both captures: symbolic capture traces these models guided by the example inputs (their mask
and input-check code branches on shapes and dtypes; ``bnfold.capture.tracer.GuidedTracer``), export as usual.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from zoo_timm import bert, gemma, llama, qwen2, vit

import bnfold
from bnfold.parity import compare

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _fold(model: nn.Module, x: torch.Tensor, mode: str) -> bnfold.FoldResult:
    result = bnfold.fold(model, (x,), capture=mode)
    assert result.report.capture == mode
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=1e-4, atol=1e-5)
    parity = compare(model, result.module, [x])  # vs the unfolded model and float64
    assert parity.passed, parity.to_dict()
    return result


# (model, norm kind (a module in symbolic capture, an aten op in export), found, folded): the left ones are post-LN
# norms that feed a residual add as well as the next linear (folding would need a second copy), and ViT's final norm
# (it feeds the output)
CASES = {
    "llama": (llama, "RMSNorm", 5, 5),
    "qwen2": (qwen2, "RMSNorm", 5, 5),
    "gemma": (gemma, "RMSNorm", 5, 5),
    "bert": (bert, "LayerNorm|layer_norm", 5, 0),
    "vit": (vit, "LayerNorm|layer_norm", 5, 4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_norms_found_folded_left(name: str, capture_mode: str) -> None:
    build, kind, found, folded = CASES[name]
    model, x = build()
    report = _fold(model, x, capture_mode).report
    assert len(report.folded) + len(report.skipped) == found, report
    assert len(report.folded) == folded, report
    assert all(re.search(kind, e.kind) for e in report.folded + report.skipped), report
    for e in report.skipped:
        assert "stays in the norm" in e.reason


def test_llama_rmsnorm_candidates_are_named_by_module(capture_mode: str) -> None:
    model, x = llama()
    report = _fold(model, x, capture_mode).report
    paths = {e.path for e in report.folded}
    assert {"m.model.layers.0.input_layernorm", "m.model.layers.1.post_attention_layernorm", "m.model.norm"} <= paths
    assert all(e.kind.startswith("RMSNorm (LlamaRMSNorm") for e in report.folded)


def test_tied_embeddings_are_never_corrupted(capture_mode: str) -> None:
    """The final norm folds into the head, whose weight is the input embedding's: the head is untied (its own
    folded copy, reported), the embedding table and its output stay bit-identical."""
    model, x = llama()
    lm = model.m
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    table = lm.model.embed_tokens.weight.detach().clone()
    result = _fold(model, x, capture_mode)
    assert torch.equal(lm.model.embed_tokens.weight, table)  # the caller's model: untouched
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    gm = result.module
    embeddings = [n for n in gm.graph.nodes if "embedding" in str(n.target) or (
        n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.Embedding))]
    (emb,) = embeddings
    weight_node = emb.args[0] if emb.op == "call_function" else None
    got = gm.get_parameter(str(weight_node.target)) if weight_node is not None else gm.get_submodule(
        str(emb.target)).weight
    assert torch.equal(got, table)
    with torch.no_grad():
        assert torch.equal(nn.functional.embedding(x, got), nn.functional.embedding(x, table))
    (head,) = [c for c in result.report.changes if c["sources"] == ["m.model.norm"] and c["category"] == "fold"]
    assert "untied" in head["detail"]


class HandNorm(nn.Module):
    """A LayerNorm written out (centred, then scaled by the inverse RMS), as some model code does."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(dim, generator=g))
        self.bias = nn.Parameter(torch.randn(dim, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x - x.mean(-1, keepdim=True)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        return self.weight * h.to(x.dtype) + self.bias


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = HandNorm(16), nn.Linear(16, 8)
        self.scale = nn.Parameter(torch.randn(8, generator=torch.Generator().manual_seed(2)))  # a LayerScale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(self.norm(x))) * self.scale


def test_handwritten_layernorm_and_layerscale_are_candidates(capture_mode: str) -> None:
    """The norm's weight and bias are one candidate ("norm"), folded into fc; the LayerScale after a ReLU has
    nothing to fold into and is left (lowered back to one multiply) with its reason."""
    model, x = Block().eval(), torch.randn(2, 5, 16)
    report = _fold(model, x, capture_mode).report
    (norm,) = report.folded
    assert norm.path == "norm" and norm.kind.startswith("LayerNorm (HandNorm, hand-written")
    (scale,) = report.skipped
    assert scale.path == "scale" and "per-channel scale by 'scale'" in scale.kind and scale.reason


def test_unwrapped_model_returns_its_model_output(capture_mode: str) -> None:
    """The model itself, not wrapped: its optional inputs stay at their defaults (``attention_mask=None``, …),
    and the folded graph returns the same ``ModelOutput`` class (fx alone would return a plain dict)."""
    model, x = llama()
    lm = model.m
    result = bnfold.fold(lm, (x,), capture=capture_mode)
    out, ref = result.module(x), lm(x)
    assert type(out) is type(ref) and list(out.keys()) == list(ref.keys()) == ["logits"]
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    assert {e.path for e in result.report.folded} == {"model.layers.0.input_layernorm",
                                                      "model.layers.0.post_attention_layernorm",
                                                      "model.layers.1.input_layernorm",
                                                      "model.layers.1.post_attention_layernorm", "model.norm"}
