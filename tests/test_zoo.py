"""Issue 3 acceptance: the torchvision zoo, both capture modes, random weights and randomized BN stats.

Every BN that can be folded without duplicating compute is folded; bnfold never leaves more BNs than
``torch.fx.experimental.optimization.fuse``; the folded model passes bnfold's float64 parity rule
(``bnfold.parity.Tolerance``: within 2x the unfolded fp32 model's own relative L2 error plus a floor of
``(16 · u + u_s) · √D`` that absorbs which fp32 kernels the host runs — ``docs/parity.md`` derives it). The error ratio
itself is one sample of rounding noise: ``bench/zoo.py`` reports its median and worst over the zoo.

Default run: ``zoo.FAST`` (googlenet and FrozenBN detection: the two that broke the old single-sample bound on
an AVX2 host); the rest with
``BNFOLD_SLOW=1`` (``make test-all``).
"""

from __future__ import annotations

import pytest
from zoo import FAST, ZOO, ZooRow, format_rows, run_model

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _check(name: str) -> None:
    sym = run_model(name, "symbolic")
    exp = run_model(name, "export")
    for row in (sym, exp):
        assert row.passed, f"{name} ({row.capture}): fails the float64 parity rule (error ratio {row.ratio:.3f})"
        if sym.left_by_fx_fuse is not None:
            assert row.left_by_bnfold <= sym.left_by_fx_fuse
    assert sym.left_by_bnfold == exp.left_by_bnfold
    if name.startswith("densenet"):
        # norm1 of every dense layer follows a concat of multi-user features: folding would duplicate compute
        assert sym.left_by_bnfold == 58 + 4 and "cat" in sym.why
    else:
        assert sym.left_by_bnfold == 0, sym.why


@pytest.mark.parametrize("name", FAST)
def test_zoo_model(name: str) -> None:
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ZOO if n not in FAST])
def test_zoo_model_slow(name: str) -> None:
    _check(name)


def test_zoo_table_lists_every_column() -> None:
    """The table bench/zoo.py prints (self-contained: no state shared with other tests)."""
    rows = [ZooRow("resnet18", "symbolic", 20, 0, 0, "", 0.97, True, 1.0),
            ZooRow("densenet121", "export", 121, None, 62, "cat", 1.3, False, 2.0)]
    text = format_rows(rows)
    for column in ("left by fx.fuse", "left by bnfold", "rel-L2 ratio", "parity", "why left"):
        assert column in text
    assert "resnet18" in text and "pass" in text and "FAIL" in text and "n/a" in text
