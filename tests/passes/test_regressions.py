"""Regression tests named after upstream bugs this project must not repeat."""

from __future__ import annotations

import torch
from helpers import count_batchnorm, fold_and_check, randomize_bn
from torch import nn

import bnfold
from bnfold.parity import Tolerance, rounding_depth


class SharedConvModule(nn.Module):
    """pytorch#104593 / #197539: a conv module reused at two call sites, only one followed by BN.
    fx fusion wrote the fused weights into the shared module, corrupting the other call site."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x.flip(-1))


def test_pytorch_104593_reused_conv_module_is_not_overwritten(capture_mode: str) -> None:
    model = randomize_bn(SharedConvModule())
    result = fold_and_check(model, (torch.randn(2, 3, 6, 6),), capture_mode, folded=1)
    assert count_batchnorm(result.module) == 0


def test_pytorch_197539_shared_module_other_site_unchanged() -> None:
    model = randomize_bn(SharedConvModule())
    x = torch.randn(2, 3, 6, 6)
    folded = bnfold.fold(model, (x,), capture="symbolic").module
    sites = [n for n in folded.graph.nodes if n.op == "call_module"]
    assert len({n.target for n in sites}) == 2  # the folded site got its own clone
    plain = next(n for n in sites if n.target == "conv")
    assert torch.equal(folded.get_submodule(str(plain.target)).weight, model.conv.weight)


def test_pytorch_180995_grouped_conv_transpose_bn_fold(capture_mode: str) -> None:
    """pytorch#180995: fusing BN into a grouped ConvTranspose crashed (weight layout (in, out/groups, k…))."""
    model = randomize_bn(nn.Sequential(nn.ConvTranspose2d(6, 9, 3, stride=2, groups=3, output_padding=1),
                                       nn.BatchNorm2d(9)))
    fold_and_check(model, (torch.randn(2, 6, 4, 4),), capture_mode, folded=1)


def test_onnxruntime_14270_bn_after_conv_transpose_is_fused(capture_mode: str) -> None:
    """onnxruntime#14270: BN after ConvTranspose was not fused."""
    model = randomize_bn(nn.Sequential(nn.ConvTranspose2d(4, 4, 2, stride=2), nn.BatchNorm2d(4)))
    result = fold_and_check(model, (torch.randn(1, 4, 5, 5),), capture_mode, folded=1)
    assert result.report.folded[0].rule == "fold_into_producer"


def test_pytorch_120545_half_precision_fold_does_not_grow_error(capture_mode: str) -> None:
    """pytorch#120545: fp16/bf16 conv-BN folding drifted ~10x; folding in float64 and casting once must not: the
    folded model passes the float64 parity rule for its dtype (3x the unfolded model's own error + floor), which a
    10x drift fails whichever half-precision kernels the host has (AMX, AVX-512 bf16, AVX2 emulation)."""
    import torchvision

    for dtype in (torch.float16, torch.bfloat16):
        model = randomize_bn(torchvision.models.resnet18()).to(dtype)
        x = torch.randn(2, 3, 32, 32).to(dtype)
        result = bnfold.fold(model, (x,), capture=capture_mode)
        assert result.report.skipped == []
        assert all(p.dtype == dtype for p in result.module.parameters())
        with torch.no_grad():
            ref64 = model.double()(x.double())
            model.to(dtype)
            e_orig = float((model(x).double() - ref64).norm() / ref64.norm())
            e_fold = float((result.module(x).double() - ref64).norm() / ref64.norm())
        tol = Tolerance.for_dtype(dtype, rounding_depth(model))
        assert e_fold <= tol.bound(e_orig, 1.0), (dtype, e_fold, e_orig)


class ConvFeedsBNAndMore(nn.Module):
    """executorch PR#20601: the fusion checked the *BN's* users instead of the *conv's*; the conv output also
    feeds another branch, which then saw the BN-scaled weights (max error 76.2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.cat([self.bn(y), y * 2.0], dim=1)


def test_executorch_20601_conv_with_other_users_is_not_fused(capture_mode: str) -> None:
    model = randomize_bn(ConvFeedsBNAndMore())
    x = torch.randn(2, 3, 8, 8)
    result = bnfold.fold(model, (x,), capture=capture_mode)
    assert result.report.parity["passed"], result.report.parity
    with torch.no_grad():
        torch.testing.assert_close(result.module(x)[:, 6:], model(x)[:, 6:], rtol=1e-5, atol=1e-5)


class SharedConvTwoBNs(nn.Module):
    """pytorch/ao PR#2795: a conv shared by two call sites, each followed by its own BN, got both BNs folded
    into the one weight (the second fold applied on top of the first)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x.flip(-1)))


def test_ao_2795_bn_not_folded_repeatedly_into_shared_conv_weights(capture_mode: str) -> None:
    model = randomize_bn(SharedConvTwoBNs())
    weight = model.conv.weight.detach().clone()
    fold_and_check(model, (torch.randn(2, 4, 6, 6),), capture_mode, folded=2)
    assert torch.equal(model.conv.weight, weight)


class SamePairTwice(nn.Module):
    """pytorch#124286: one Conv-BN pair called twice in forward was fused once per trace but applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(torch.relu(self.bn(self.conv(x)))))


def test_pytorch_124286_same_conv_bn_pair_called_twice(capture_mode: str) -> None:
    model = randomize_bn(SamePairTwice())
    result = fold_and_check(model, (torch.randn(2, 4, 6, 6),), capture_mode, folded=2)  # one per call site
    assert count_batchnorm(result.module) == 0


def test_pytorch_144888_bf16_fold_error_stays_within_the_rule(capture_mode: str) -> None:
    """pytorch#144888: bf16 conv-BN folding had 7.5x the unfolded model's error against float64. Folding in
    float64 and casting once must stay within the parity rule (≤ 3x the reference's bf16 error + floor)."""
    from bnfold.parity import compare

    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                       nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))).to(torch.bfloat16)
    x = torch.randn(4, 8, 12, 12).to(torch.bfloat16)
    folded = bnfold.fold(model, (x,), capture=capture_mode, check=False).module
    assert count_batchnorm(folded) == 0
    report = compare(model, folded, [(x,)], batch_independence=False)
    assert report.passed, report.summary()
    out = report.outputs[0]
    assert out.rmse_vs_fp64 <= 2.0 * out.reference_rmse_vs_fp64, out  # nowhere near 7.5x


def test_pytorch_184076_grouped_conv_transpose_1d_3d_and_bn_before(capture_mode: str) -> None:
    """pytorch PR#184076 / #180995: grouped ConvTranspose weight layout (in, out/groups, k…), in 1-D and 3-D,
    with BN after (producer fold) and before (consumer fold, scale only)."""
    m1 = randomize_bn(nn.Sequential(nn.ConvTranspose1d(6, 4, 3, stride=2, groups=2), nn.BatchNorm1d(4)))
    fold_and_check(m1, (torch.randn(2, 6, 5),), capture_mode, folded=1)
    m3 = randomize_bn(nn.Sequential(nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2), nn.BatchNorm3d(6)))
    fold_and_check(m3, (torch.randn(2, 4, 3, 3, 3),), capture_mode, folded=1)
    before = randomize_bn(nn.Sequential(nn.BatchNorm2d(6), nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2)))
    result = bnfold.fold(before, (torch.randn(2, 6, 4, 4),), capture=capture_mode)
    assert result.report.parity["passed"], result.report.parity


class TiedLMHead(nn.Module):
    """QuaRot PR#17 / GPTQModel PR#1550: folding the final norm's weight into an lm_head whose weight is tied to
    the embedding scaled the embedding too, corrupting every token's input."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Embedding(13, 8)
        self.norm = norm
        self.lm_head = nn.Linear(8, 13, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.embed(tokens)))


def test_quarot_17_gptqmodel_1550_norm_not_folded_into_tied_lm_head(capture_mode: str) -> None:
    for norm in (nn.LayerNorm(8), nn.RMSNorm(8)):
        torch.manual_seed(0)
        model = TiedLMHead(norm).eval()
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0)
        embedding = model.embed.weight.detach().clone()
        tokens = torch.randint(0, 13, (2, 5))
        result = bnfold.fold(model, (tokens,), capture=capture_mode)
        assert result.report.parity["passed"], result.report.parity
        assert torch.equal(model.embed.weight, embedding)
        with torch.no_grad():
            torch.testing.assert_close(result.module(tokens), model(tokens), rtol=1e-5, atol=1e-5)
        # the folded model's embedding lookup still returns the original vectors
        folded_embed = [t for name, t in result.module.state_dict().items() if t.shape == embedding.shape]
        assert any(torch.equal(t, embedding) for t in folded_embed)


class _StdConvResidual(torch.nn.Module):
    """timm's StdConv2d (ResNetV2/BiT, NFNet): ``F.conv2d`` on a standardized weight with integer padding — a call
    whose schema torch.fx cannot pick from the values alone (``padding`` is ints or a string)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 4, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)) * 0.5
        return x + torch.nn.functional.conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1)


def test_functional_conv_with_ambiguous_schema_is_read_not_a_crash(capture_mode: str) -> None:
    """Found on timm resnetv2_50x1_bit: normalizing the arguments of ``F.conv2d`` raised "the schema match was
    ambiguous" inside the reparameterize rule (an internal error, exit 3). Arguments are now matched with their
    types; the model folds (nothing to fold here) with parity."""
    import bnfold

    model, x = _StdConvResidual().eval(), torch.randn(2, 4, 6, 6)
    result = bnfold.fold(model, (x,), capture=capture_mode, check=True)
    assert result.report.parity["passed"]


class OnePlusWeightNorm(nn.Module):
    """Gemma's RMSNorm (transformers ``GemmaRMSNorm``): the scale is ``1 + weight``, computed in float32 and cast
    back with ``type_as`` after the multiply. Before: 0 candidates (the folded constant ``1 + w`` was taken for
    one of bnfold's own), and then 'type_as does not commute'."""

    def __init__(self, dim: int = 8, cast_to: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.5 * torch.randn(dim, generator=torch.Generator().manual_seed(3)))
        self.fc = nn.Linear(dim, 4)
        self.cast_to = cast_to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = (h * (1.0 + self.weight.float())).type_as(x)
        if self.cast_to is not None:  # a round trip through integers: no affine crosses it
            h = h.to(self.cast_to).to(x.dtype)
        return self.fc(h)


def test_transformers_gemma_rmsnorm_one_plus_weight_folds_through_its_cast(capture_mode: str) -> None:
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(4))
    result = fold_and_check(OnePlusWeightNorm().eval(), (x,), capture_mode, folded=1)
    (entry,) = result.report.folded
    assert entry.path == "weight" and entry.kind.startswith("RMSNorm"), entry  # named by the parameter it comes from


def test_an_integer_cast_blocks_the_fold_with_its_reason(capture_mode: str) -> None:
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(4))
    result = fold_and_check(OnePlusWeightNorm(cast_to=torch.int32).eval(), (x,), capture_mode, folded=0, left=1)
    assert "torch.float32 to torch.int32" in result.report.skipped[0].reason, result.report


class LayerNormIntoConv1D(nn.Module):
    """GPT-2's ``ln_1`` → ``c_attn`` (transformers ``Conv1D``): the weight stored (in, out), applied as
    ``addmm(bias, x.view(-1, x.size(-1)), weight)``."""

    def __init__(self, dim: int = 8, out: int = 6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.ln = nn.LayerNorm(dim)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 2.0, generator=g)
            self.ln.bias.normal_(generator=g)
        self.weight = nn.Parameter(torch.randn(dim, out, generator=g))
        self.bias = nn.Parameter(torch.randn(out, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        size_out = h.size()[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, h.view(-1, h.size(-1)), self.weight).view(size_out)


def test_transformers_conv1d_layernorm_folds_through_the_view_by_its_own_size(capture_mode: str) -> None:
    """Found with torch 2.9 (make test-lowest): torch < 2.13's fake-tensor propagation recorded no value for
    ``h.size(-1)``, so ``view(h, -1, size)`` counted as reading two tensors and GPT-2's LayerNorms stayed
    unfolded in the symbolic capture (export folded them). Shape propagation now records such plain values."""
    from bnfold.ir.graph import propagate_shapes

    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(6))
    gm = torch.fx.symbolic_trace(LayerNormIntoConv1D())
    propagate_shapes(gm, [x])
    sizes = {n.name: n.meta.get("val") for n in gm.graph.nodes if n.target == "size"}
    assert sizes == {"size": (2, 5, 8), "size_1": 8}, sizes
    fold_and_check(LayerNormIntoConv1D().eval(), (x,), capture_mode, folded=1)
