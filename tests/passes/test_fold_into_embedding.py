"""Rule ``fold_into_embedding`` (added as one file): A(embedding(i)) → embedding'(i), W'[r, c] = a[c]·W[r, c] + b[c]."""

from __future__ import annotations

import torch
from harness import ops, reasons, run_passes
from helpers import fold_and_check, randomize_bn
from torch import nn

from bnfold.passes import Canonicalize, Category, FoldIntoEmbedding
from bnfold.passes.fold_into_embedding import fold_affine_into_embedding

IDS = torch.tensor([0, 3, 9, 3, 1])


def before() -> nn.Module:
    return randomize_bn(nn.Sequential(nn.Embedding(10, 6), nn.BatchNorm1d(6)))


def test_affine_folds_into_embedding(capture_mode: str) -> None:
    gm, (_, fold) = run_passes(before(), (IDS,), capture_mode, Canonicalize(), FoldIntoEmbedding())
    assert ops(gm) == ["embedding"]
    assert fold.changes[0].category is Category.FOLD


def test_through_fold_counts_as_folded(capture_mode: str) -> None:
    result = fold_and_check(before(), (IDS,), capture_mode, folded=1)
    assert result.report.folded[0].rule == "fold_into_embedding"


def test_table_math_is_exact_in_float64() -> None:
    w, a, b = torch.randn(5, 3), torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    got = fold_affine_into_embedding(w, a, b)
    assert got.dtype == torch.float64
    assert torch.equal(got[2], w[2].double() * a + b)


def test_negative_max_norm_is_left_with_reason() -> None:
    """Symbolic capture only: an exported max_norm embedding renormalizes its table in place while it runs."""
    model = randomize_bn(nn.Sequential(nn.Embedding(10, 6, max_norm=1.0), nn.BatchNorm1d(6)))
    gm, (_, fold) = run_passes(model, (IDS,), "symbolic", Canonicalize(), FoldIntoEmbedding())
    assert "channel_affine" in ops(gm)
    assert "max_norm" in reasons(fold)[0]


class TwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.bn = nn.Embedding(10, 6), nn.BatchNorm1d(6)

    def forward(self, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.emb(i)
        return self.bn(e), e


def test_negative_embedding_with_other_users_is_left(capture_mode: str) -> None:
    gm, (_, fold) = run_passes(randomize_bn(TwoUsers()), (IDS,), capture_mode, Canonicalize(), FoldIntoEmbedding())
    assert ops(gm) == ["embedding", "channel_affine"]
    assert "also feeds" in reasons(fold)[0]
