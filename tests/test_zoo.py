"""Issue 3 acceptance: the torchvision zoo, both capture modes, random weights and randomized BN stats.

Every BN that can be folded without duplicating compute is folded; bnfold never leaves more BNs than
``torch.fx.experimental.optimization.fuse``; parity vs the float64 reference within 1.25x the unfolded fp32
model's own relative L2 error (+ fp32 unit roundoff). The table is printed (``pytest -s`` shows it).
"""

from __future__ import annotations

import statistics

import pytest
from zoo import ZOO, format_rows, run_model

ROWS = []


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model(name: str) -> None:
    sym = run_model(name, "symbolic")
    exp = run_model(name, "export")
    ROWS.extend([sym, exp])
    for row in (sym, exp):
        assert row.passed, f"{name} ({row.capture}): folded error ratio {row.ratio:.3f} > 1.25"
        if sym.left_by_fx_fuse is not None:
            assert row.left_by_bnfold <= sym.left_by_fx_fuse
    assert sym.left_by_bnfold == exp.left_by_bnfold
    if name.startswith("densenet"):
        # norm1 of every dense layer follows a concat of multi-user features: folding would duplicate compute
        assert sym.left_by_bnfold == 58 + 4 and "cat" in sym.why
    else:
        assert sym.left_by_bnfold == 0, sym.why


def test_zoo_table() -> None:
    if not ROWS:
        pytest.skip("zoo models did not run")
    print("\n" + format_rows(ROWS))
    ratios = [r.ratio for r in ROWS]
    print(f"median rel-L2 ratio (folded/original vs fp64): {statistics.median(ratios):.3f}")
    assert len({r.model for r in ROWS}) >= 12
