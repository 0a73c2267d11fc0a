"""Fold coverage on timm and Hugging Face models (issue 12), as tests: parity passes everywhere, symbolic and export
fold the same set of norms wherever both capture, ``auto`` folds as many as the better capture, and every norm left
is in a category docs/architecture.md lists as unfoldable without duplicating compute. A representative few run by
default (``zoo_timm.FAST``); the rest with ``BNFOLD_SLOW=1``. The table: ``bench/zoo_timm.py``."""

from __future__ import annotations

import pytest
from zoo_timm import FAST, TIMM, fold_row, hf_models, timm_model

pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SLOW = [n for n in TIMM if n not in FAST]


def _check(name: str, model, inputs, *, auto: bool, both: bool = False) -> None:  # type: ignore[no-untyped-def]
    """``both``: both captures must capture the model (else one is enough)."""
    rows = {c: fold_row(name, model, inputs, c) for c in ("symbolic", "export")}
    ok = [r for r in rows.values() if not r.error]
    assert len(ok) == 2 if both else ok, {c: r.error for c, r in rows.items()}
    for r in ok:
        assert r.parity, (name, r.capture)
        assert not [c for c in r.left if c.startswith("other")], (name, r.capture, r.left)
    if len(ok) == 2:
        assert ok[0].folded_paths == ok[1].folded_paths, (name, ok[0].folded_paths ^ ok[1].folded_paths)
    if auto:
        best = max(r.folded for r in ok)
        a = fold_row(name, model, inputs, "auto")
        assert a.folded == best and a.parity, (name, a.folded, best)


@pytest.mark.parametrize("name", FAST)
def test_timm_fast(name: str) -> None:
    model, inputs = timm_model(name)
    _check(name, model, inputs, auto=name in ("mixnet_s", "levit_128s"))


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_timm_slow(name: str) -> None:
    model, inputs = timm_model(name)
    _check(name, model, inputs, auto=False)


@pytest.mark.parametrize("name", ["hf_llama", "hf_qwen2", "hf_gemma", "hf_bert", "hf_vit", "hf_gpt2"])
def test_transformers_models(name: str) -> None:
    """Both captures trace every transformers model (symbolic: guided by the example inputs) and fold the same
    norms."""
    pytest.importorskip("transformers")
    model, inputs = hf_models()[name]()
    _check(name, model, inputs, auto=name == "hf_llama", both=True)
