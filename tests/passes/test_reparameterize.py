"""Rule ``reparameterize``: conv_K(x) + conv_k(x) + A(x) → conv'(x) (structural re-parameterization), exact in
float64; negative twins for each condition; the option through ``bnfold.fold`` and the CLI."""

from __future__ import annotations

import pytest
import torch
from harness import ops, reasons, run_passes
from helpers import randomize_bn
from torch import nn

import bnfold
from bnfold.parity import compare
from bnfold.passes import Canonicalize, Category, Fail, FoldIntoProducer, PassContext, Reparameterize
from bnfold.passes.reparameterize import Embedded, embed_branches

f64 = torch.float64


class RepBlock(nn.Module):
    """RepVGG-style: a kxk conv+BN, a 1x1 conv+BN and an identity BN, summed (then ReLU)."""

    def __init__(self, c: int = 8, groups: int = 1, stride: int = 1, pad_1x1: int = 0, dilation: int = 1,
                 identity: bool = True) -> None:
        super().__init__()
        self.kxk = nn.Sequential(nn.Conv2d(c, c, 3, stride, padding=dilation, dilation=dilation, groups=groups,
                                           bias=False), nn.BatchNorm2d(c))
        self.pw = nn.Sequential(nn.Conv2d(c, c, 1, stride, padding=pad_1x1, groups=groups, bias=False),
                                nn.BatchNorm2d(c))
        self.identity = nn.BatchNorm2d(c) if identity else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kxk(x) + self.pw(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


X = torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(0))
FOLD = (Canonicalize(), FoldIntoProducer(), Reparameterize())


def block(**kw: object) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(RepBlock(**kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("groups", [1, 4, 8])
def test_three_branches_become_one_conv(capture_mode: str, groups: int) -> None:
    gm, (_, _, rep) = run_passes(block(groups=groups), (X,), capture_mode, *FOLD)
    assert ops(gm) == ["conv2d", "relu"]
    (change,) = rep.changes
    assert change.category is Category.FOLD
    assert len(change.sources) == 2  # the 1x1 branch's BN (folded into its conv before) and the identity BN


def test_two_convs_without_identity(capture_mode: str) -> None:
    """MobileOne's stride-2 blocks: kxk + 1x1, no identity."""
    gm, _ = run_passes(block(stride=2, identity=False), (X,), capture_mode, *FOLD)
    assert ops(gm) == ["conv2d", "relu"]


class Acnet(nn.Module):
    """ACNet: 3x3 + 1x3 + 3x1 (each with its own padding), all centred in the 3x3."""

    def __init__(self) -> None:
        super().__init__()
        self.sq = nn.Conv2d(8, 8, 3, padding=1)
        self.hor = nn.Conv2d(8, 8, (1, 3), padding=(0, 1))
        self.ver = nn.Conv2d(8, 8, (3, 1), padding=(1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sq(x) + self.hor(x) + self.ver(x) + x


def test_asymmetric_kernels_and_plain_residual(capture_mode: str) -> None:
    gm, _ = run_passes(Acnet().eval(), (X,), capture_mode, Reparameterize())
    assert ops(gm) == ["conv2d"]


def test_merge_is_exact_in_float64() -> None:
    """Against the three branches evaluated in float64."""
    g = torch.Generator().manual_seed(3)
    w3, w1 = torch.randn(6, 3, 3, 3, generator=g, dtype=f64), torch.randn(6, 3, 1, 1, generator=g, dtype=f64)
    b3, b1 = torch.randn(6, generator=g, dtype=f64), torch.randn(6, generator=g, dtype=f64)
    a, t = torch.randn(6, generator=g, dtype=f64), torch.randn(6, generator=g, dtype=f64)
    w, b = embed_branches((6, 3, 3, 3), [Embedded(w3, (0, 0), b3), Embedded(w1, (1, 1), b1),
                                         Embedded(None, (1, 1), t, a)])
    x = torch.randn(2, 6, 7, 7, generator=g, dtype=f64)
    want = (nn.functional.conv2d(x, w3, b3, padding=1, groups=2) + nn.functional.conv2d(x, w1, b1, groups=2)
            + a.reshape(1, -1, 1, 1) * x + t.reshape(1, -1, 1, 1))
    got = nn.functional.conv2d(x, w, b, padding=1, groups=2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# -- negative twins: nothing merged, with the reason ------------------------------------------------------------------

def _why(model: nn.Module, x: torch.Tensor, mode: str) -> str:
    """Run the rule on ``model`` and return its reason for the (one) sum it declined; nothing may change."""
    gm, (rep,) = run_passes(model, (x,), mode, Reparameterize())
    assert not rep.changes
    rule = Reparameterize()
    ctx = PassContext(gm)
    (m,) = [m for m in (rule.match(ctx, n) for n in gm.graph.nodes) if m is not None]
    plan = rule.check(ctx, m)
    assert isinstance(plan, Fail)
    return plan.reason


class Two(nn.Module):
    def __init__(self, big: nn.Conv2d, small: nn.Conv2d) -> None:
        super().__init__()
        self.big, self.small = big, small

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.big(x) + self.small(x)


def test_negative_stride_mismatch(capture_mode: str) -> None:
    """3x3 stride 1 and 1x1 stride 2 both map 4x4 to 2x2, but read different positions."""
    x = torch.randn(1, 8, 4, 4)
    model = Two(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1, stride=2)).eval()
    assert "stride" in _why(model, x, capture_mode)


def test_negative_padding_breaks_alignment(capture_mode: str) -> None:
    """3x3 (padding 0) and 1x1 (padding 1), stride 5, both map 13x13 to 3x3 — but the 1x1 would sit at tap −1 of
    the 3x3 (it reads x[5y − 1], the 3x3 reads x[5y … 5y + 2]): not mergeable. The aligned twin (1x1 at padding
    0, tap 0: not the centre, still exact) merges."""
    x = torch.randn(1, 8, 13, 13)
    model = Two(nn.Conv2d(8, 8, 3, stride=5), nn.Conv2d(8, 8, 1, stride=5, padding=1)).eval()
    assert "does not line up" in _why(model, x, capture_mode)
    aligned = Two(nn.Conv2d(8, 8, 3, stride=5), nn.Conv2d(8, 8, 1, stride=5)).eval()
    gm, _ = run_passes(aligned, (x,), capture_mode, Reparameterize())
    assert ops(gm) == ["conv2d"]


def test_negative_branch_with_another_user(capture_mode: str) -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kxk, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            k = self.kxk(x)
            return k + self.bn(x), k

    gm, (_, _, rep) = run_passes(randomize_bn(Shared()), (X,), capture_mode, *FOLD)
    assert ops(gm) == ["conv2d", "channel_affine", "add"]
    (why,) = reasons(rep)
    assert "also feeds" in why and "duplicate" in why


def test_shared_branch_stays_the_rest_merges(capture_mode: str) -> None:
    """The 1x1 also feeds an output: it stays and is added to the merged kxk + identity."""
    class Shared(RepBlock):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
            p = self.pw(x)
            assert self.identity is not None
            return self.act(self.kxk(x) + p + self.identity(x)), p

    gm, _ = run_passes(randomize_bn(Shared()), (X,), capture_mode, *FOLD)
    assert ops(gm) == ["conv2d", "conv2d", "add", "relu"]


def test_off_reports_what_it_would_merge(capture_mode: str) -> None:
    gm, (_, _, rep) = run_passes(block(), (X,), capture_mode, Canonicalize(), FoldIntoProducer(),
                                 Reparameterize(enabled=False))
    assert ops(gm).count("conv2d") == 2
    (why,) = reasons(rep)
    assert "reparameterize=True" in why and "--reparameterize" in why


# -- through bnfold.fold and the CLI ---------------------------------------------------------------------------------

def _fold(model: nn.Module, x: torch.Tensor, mode: str, reparameterize: bool, close: bool = True
          ) -> bnfold.FoldResult:
    result = bnfold.fold(model, (x,), capture=mode, reparameterize=reparameterize)
    if close:  # a deep model with random BN statistics has large outputs: there, only the float64 rule is meaningful
        with torch.no_grad():
            torch.testing.assert_close(result.module(x), model(x), rtol=1e-4, atol=1e-5)
    parity = compare(model, result.module, [x])
    assert parity.passed, parity.to_dict()
    return result


def test_fold_option_counts_every_merged_bn(capture_mode: str) -> None:
    model = block(groups=2)
    off = _fold(model, X, capture_mode, False).report
    assert [e.path for e in off.skipped] == ["identity"] and len(off.folded) == 2
    on = _fold(model, X, capture_mode, True)
    assert not on.report.skipped
    assert {e.path: e.rule for e in on.report.folded} == {"kxk.1": "fold_into_producer", "pw.1": "reparameterize",
                                                          "identity": "reparameterize"}
    assert len({e.into for e in on.report.folded}) == 1  # all three in the one conv left
    assert sum(isinstance(m, nn.Conv2d) for m in on.module.modules()) == (1 if capture_mode == "symbolic" else 0)


def test_cli_flag(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from bnfold.cli import main

    path = tmp_path / "rep.pt2"
    torch.export.save(torch.export.export(block(), (X[:1],)), str(path))
    for flags, left in (((), 1), (("--no-reparameterize",), 1), (("--reparameterize",), 0)):
        out = tmp_path / f"out{len(flags)}{left}.pt2"
        assert main(["fold", str(path), "-o", str(out), "--json", *flags]) == 0
        assert len(json.loads(capsys.readouterr().out)["skipped"]) == left


# -- timm models with re-parameterizable blocks (64x64, randomized BN statistics) -------------------------------------

def _bns(entries: list) -> list:
    """The BatchNorm entries (LayerScales and other per-channel parameter affines are candidates too)."""
    return [e for e in entries if "batch" in e.kind.lower()]


def _identity_bns_left(report: bnfold.FoldReport) -> int:
    return sum(e.path.endswith("identity") for e in _bns(report.skipped))


# (BNs found, identity BNs left without re-parameterization, BNs left with it). fastvit_t8's 10 left are the
# `norm.identity` BNs of its RepMixer blocks (`x + layer_scale · (mixer(x) − norm(x))`: a difference scaled after
# the fact, not a sum of branches; timm re-parameterizes that block by its own formula)
TIMM = {"repvgg_a0": (61, 17, 0), "mobileone_s0": (226, 35, 0), "fastvit_t8": (70, 24, 10)}


def _timm(name: str, mode: str) -> None:
    timm = pytest.importorskip("timm")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, num_classes=10))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    found, identities, left = TIMM[name]
    off = _fold(model, x, mode, False, close=False).report
    assert len(_bns(off.folded + off.skipped)) == found
    assert _identity_bns_left(off) == identities
    on = _fold(model, x, mode, True, close=False).report
    assert len(_bns(on.folded + on.skipped)) == found
    assert _identity_bns_left(on) == len(_bns(on.skipped)) == left, on
    assert any(e.rule == "reparameterize" for e in on.folded)


def test_timm_repvgg_a0(capture_mode: str) -> None:
    _timm("repvgg_a0", capture_mode)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobileone_s0", "fastvit_t8"])
def test_timm_slow(name: str, capture_mode: str) -> None:
    _timm(name, capture_mode)
