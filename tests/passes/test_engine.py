"""The pass engine: worklists, rejections that stand, categories, candidates in results, instruments, errors."""

from __future__ import annotations

import io
from collections.abc import Sequence

import pytest
import torch
import torchvision
from helpers import randomize_bn
from torch import nn

import bnfold
from bnfold.capture import capture
from bnfold.errors import InternalError
from bnfold.passes import (
    FINALIZE,
    FIXED_POINT,
    Category,
    PassContext,
    PassResult,
    Pipeline,
    Verify,
    default_pipeline,
)


def chain(blocks: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    return randomize_bn(nn.Sequential(*layers))


def test_later_rounds_see_only_touched_nodes() -> None:
    """Round 2 looks at what round 1 touched, not at the whole graph again."""
    gm = capture(chain(30), (torch.randn(1, 4, 6, 6),), "symbolic").module
    n = len(gm.graph.nodes)
    result = default_pipeline().run(gm)
    assert result.converged and result.rounds == 2
    timing = {t.name: t for t in result.timings}
    produce = timing["fold_into_producer"]
    assert produce.runs == 2 and produce.changes == 30
    first = n + 3 * 30  # the graph after canonicalize added an affine and two constants per BN
    assert produce.nodes - first < first / 2, (produce.nodes, first)


def test_every_change_has_a_category_and_the_report_reads_it(capture_mode: str) -> None:
    model = torchvision.models.resnet18()
    x = torch.randn(1, 3, 32, 32)
    report = bnfold.fold(randomize_bn(model), (x,), capture=capture_mode, check=False).report
    cats = {c["category"] for c in report.changes}
    assert cats <= {str(c) for c in Category} and {"fold", "canonicalize"} <= cats
    assert len(report.folded) == 20 and all(e.rule == "fold_into_producer" for e in report.folded)


def test_shapes_are_kept_by_the_rewrites_not_rerun(capture_mode: str) -> None:
    """After every modifying pass the locally updated node.meta equals a fresh shape propagation."""
    model = randomize_bn(torchvision.models.mobilenet_v3_small())
    x = torch.randn(2, 3, 32, 32)
    verify = Verify((x,))
    result = bnfold.fold(model, (x,), capture=capture_mode, check=False, instruments=[verify])
    assert verify.checked >= 3 and len(result.report.folded) == 34


class Boom:
    name = "boom"
    revisit_rejected = False

    def run(self, ctx: PassContext, worklist: Sequence[torch.fx.Node]) -> PassResult:
        for node in worklist:
            ctx.current = node
            if node.op == "call_module":
                raise RuntimeError("exploded")
        return PassResult()


def test_exception_in_a_pass_names_the_pass_the_node_and_the_history() -> None:
    gm = capture(chain(2), (torch.randn(1, 4, 6, 6),), "symbolic").module
    pipeline = Pipeline([FIXED_POINT[0](), FIXED_POINT[1](), Boom()])
    with pytest.raises(InternalError) as err:
        pipeline.run(gm)
    e = err.value
    assert e.pass_name == "boom" and e.node == "_0" and e.passes_before == ("constant_fold", "canonicalize")
    assert "pass 'boom'" in str(e) and "_0" in str(e) and "canonicalize" in str(e)


def test_until_and_dump_ir_are_instruments() -> None:
    model = chain(2)
    x = torch.randn(1, 4, 6, 6)
    out = io.StringIO()
    result = bnfold.fold(model, (x,), capture="symbolic", until="canonicalize", dump_ir=out, check=False)
    assert [p["name"] for p in result.report.passes] == ["constant_fold", "canonicalize"]
    text = out.getvalue()
    assert "# --- before canonicalize ---" in text and "# --- after canonicalize (2 changes) ---" in text
    assert "channel_affine" in text.split("# --- after canonicalize")[1]
    with pytest.raises(ValueError, match="names no pass"):
        bnfold.fold(model, (x,), until="nonsense", check=False)


def test_pipeline_order_is_one_list() -> None:
    names = default_pipeline().names
    assert names == [p.name for p in FIXED_POINT + FINALIZE]
    assert names.index("canonicalize") < names.index("fold_into_producer") < names.index("lower_affines")


def test_candidates_travel_in_pass_results() -> None:
    gm = capture(chain(3), (torch.randn(1, 4, 6, 6),), "symbolic").module
    result = default_pipeline().run(gm)
    assert [c.id for c in result.candidates] == ["_1", "_4", "_7"]


def test_reasons_are_reported_in_pipeline_order(capture_mode: str) -> None:
    """However often a pass looked at a node again, a candidate's reasons read in pipeline order."""
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU(),
                                       nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)))
    report = bnfold.fold(model, (torch.randn(1, 3, 8, 8),), capture=capture_mode, check=False).report
    (skipped,) = report.skipped
    rules = [part.split(":")[0].strip() for part in skipped.reason.split("; ") if ":" in part]
    order = [p.name for p in FIXED_POINT + FINALIZE]
    known = [r for r in rules if r in order]
    assert known == sorted(known, key=order.index) and known[0] == "fold_into_producer", skipped.reason


def test_a_run_cut_short_by_the_round_limit_is_reported_as_not_converged() -> None:
    """Round 1 folds three BNs, so one round cannot know it reached the fixed point: the result, the report's dict and
    its text all say so (a run that converged says nothing)."""
    from bnfold.api import build_report

    gm = capture(chain(3), (torch.randn(1, 4, 6, 6),), "symbolic").module
    full = default_pipeline()
    run = Pipeline(full.passes, finalize=full.finalize, max_rounds=1).run(gm)
    assert run.rounds == 1 and not run.converged and run.stopped_after is None
    report = build_report("symbolic", run)
    assert report.to_dict()["converged"] is False
    assert "without reaching a fixed point" in report.render()
    done = build_report("symbolic", default_pipeline().run(gm))
    assert done.converged and "fixed point" not in done.render()
