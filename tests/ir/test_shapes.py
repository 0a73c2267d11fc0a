"""Shape propagation by rules (:mod:`bnfold.ir.shapes`) against ``torch.fx``'s ``FakeTensorProp``, node by node.

Every node's recorded value must have the shape, dtype, device and strides (of every axis longer than 1) the fake
kernels give, and its ``tensor_meta`` the same shape and dtype — on real architectures and on small modules that
exercise each rule and the cases it must decline.
"""

from __future__ import annotations

import copy
import math
import operator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize_bn
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from bnfold.capture.tracer import symbolic_trace
from bnfold.ir.graph import node_dtype, node_shape
from bnfold.ir.shapes import _Propagator, propagate_shapes
from bnfold.ir.shapes.layout import memory_format, view_strides


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, torch.Tensor):
        return (isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(want.shape) and got.dtype == want.dtype
                and got.device == want.device
                and all(a == b for a, b, n in zip(got.stride(), want.stride(), want.shape, strict=True) if n > 1))
    if isinstance(want, (tuple, list)):
        return isinstance(got, (tuple, list)) and len(got) == len(want) and all(map(_same, got, want))
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    return type(got) is type(want) and got == want


def check_against_fake_tensor_prop(gm: torch.fx.GraphModule, inputs: tuple[Any, ...]) -> _Propagator:
    """Propagate ``gm`` by rules and a copy by ``FakeTensorProp``; every node must agree. Returns the propagator
    (its counts say how many nodes rules handled)."""
    ref = copy.deepcopy(gm)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(ref, mode).propagate_dont_convert_inputs(
        *[mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs])
    propagator = _Propagator(gm)
    propagator.run(inputs)
    want = {n.name: n for n in ref.graph.nodes}
    for node in gm.graph.nodes:
        w = want[node.name]
        assert _same(node.meta.get("val"), w.meta.get("val")), (node.format_node(), node.meta.get("val"),
                                                               w.meta.get("val"))
        if isinstance(w.meta.get("val"), torch.Tensor) and node.op != "output":
            assert (node_shape(node), node_dtype(node)) == (tuple(w.meta["val"].shape), w.meta["val"].dtype)
    return propagator


def _trace(model: nn.Module, *inputs: Any) -> torch.fx.GraphModule:
    return symbolic_trace(model.eval(), inputs).module


ARCHITECTURES = {
    "resnet18": (lambda: torchvision.models.resnet18(), (2, 3, 32, 32)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(), (2, 3, 32, 32)),
    "shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(), (2, 3, 32, 32)),  # chunk, transpose
    "googlenet": (lambda: torchvision.models.googlenet(aux_logits=False, init_weights=True), (1, 3, 32, 32)),
    "r2plus1d_18": (lambda: torchvision.models.video.r2plus1d_18(), (1, 3, 4, 16, 16)),
    "lraspp": (lambda: torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None),
               (1, 3, 32, 32)),  # dict output, interpolate
    "vit_b_16": (lambda: torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10), (2, 3, 32, 32)),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architectures_match_fake_tensor_prop(name: str) -> None:
    build, shape = ARCHITECTURES[name]
    torch.manual_seed(0)
    gm = _trace(randomize_bn(build()), torch.randn(shape))
    propagator = check_against_fake_tensor_prop(gm, (torch.randn(shape),))
    assert propagator.rules > 3 * propagator.fake  # the rules carry the propagation


def _zoo_cases() -> list[Any]:
    """Every model of the torchvision, timm and transformers zoos (``tests/zoo.py``, ``tests/zoo_timm.py``): the
    transformers models and each zoo's default few by default, the rest with ``BNFOLD_SLOW=1``."""
    import zoo
    import zoo_timm

    cases = [pytest.param("hf", name, id=name) for name in zoo_timm.HF]
    cases += [pytest.param("torchvision", name, id=name, marks=() if name in zoo.FAST else pytest.mark.slow)
              for name in zoo.ZOO]
    cases += [pytest.param("timm", name, id=name, marks=() if name in zoo_timm.FAST else pytest.mark.slow)
              for name in zoo_timm.TIMM]
    return cases


@pytest.mark.parametrize(("family", "name"), _zoo_cases())
def test_zoos_match_fake_tensor_prop(family: str, name: str) -> None:
    """The graphs symbolic capture gives the zoo models (transformers' modules inlined from outside the model,
    Gemma's casts, timm's attention) propagate by rules to what ``FakeTensorProp`` records, node by node."""
    import zoo
    import zoo_timm

    if family == "hf":
        pytest.importorskip("transformers")
        model, inputs = zoo_timm.hf_models()[name]()
    elif family == "timm":
        pytest.importorskip("timm")
        model, inputs = zoo_timm.timm_model(name)
    else:
        build, shape = zoo.ZOO[name]
        torch.manual_seed(0)
        model, inputs = randomize_bn(build()), (torch.randn(shape),)
    gm = symbolic_trace(model.eval(), inputs).module
    check_against_fake_tensor_prop(gm, inputs)


def test_batchnorm_never_runs_its_fake_kernel() -> None:
    """The regression of issue 25: ``batch_norm``'s fake kernel decomposes the op, most of the propagation's time."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8))
    gm = _trace(model, torch.randn(2, 3, 8, 8))
    propagator = check_against_fake_tensor_prop(gm, (torch.randn(2, 3, 8, 8),))
    assert propagator.fake == 0


class Layouts(nn.Module):
    """Ops on channels-last, permuted, sliced and strided values: each rule either knows the output layout or
    declines."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.ln = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(2, 8)
        self.lin = nn.Linear(8, 6)
        self.rms = nn.RMSNorm(6)

    def forward(self, x: torch.Tensor) -> Any:
        y = self.bn(self.conv(x))  # channels-last in, channels-last out
        z = y + y.relu()
        p = z.permute(0, 2, 3, 1)  # NHWC view: dense, not contiguous
        q = self.ln(p)
        r = self.lin(p) + self.lin(q)
        s = r.reshape(r.shape[0], -1, 6)  # a copy (no view of a permutation)
        t = s.transpose(1, 2).flatten(1)
        u = self.gn(z.contiguous())
        v = torch.cat([u[:, :4], u[:, 4:]], dim=1)  # slices along channels: non-contiguous
        w = v[..., 1:, ::2] * 2.0
        a, b = torch.chunk(w, 2, dim=1)
        c = F.batch_norm(self.conv(x), self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias)
        return self.rms(r), t, a - b, x[:, None, 0], c.mean((2, 3), keepdim=True), torch.unbind(s, 1)


@pytest.mark.parametrize("channels_last", [False, True])
def test_layouts_match_fake_tensor_prop(channels_last: bool) -> None:
    x = torch.randn(2, 4, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    model = randomize_bn(Layouts())
    check_against_fake_tensor_prop(_trace(model, x), (x,))


class Shapes(nn.Module):
    """Conv/pool output sizes, views with -1, reductions, matmul broadcasting, sizes used as Python numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([
            nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.Conv2d(6, 6, 3, padding="same", dilation=2, groups=3),
            nn.Conv2d(6, 6, (1, 3), padding="valid"), nn.Conv2d(6, 6, 3, padding=2, padding_mode="reflect")])
        self.pools = nn.ModuleList([nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(3, 2, 1),
                                    nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False),
                                    nn.AdaptiveAvgPool2d((None, 2))])
        self.conv1d = nn.Conv1d(6, 4, 3)
        self.register_buffer("proj", torch.randn(88, 5))  # the spatial size after the convs: 11 x 8

    def forward(self, x: torch.Tensor) -> Any:
        for conv in self.convs:
            x = conv(x)
        outs = [pool(x) for pool in self.pools]
        n, c, h, w = x.shape
        flat = x.view(n, c, -1)
        outs.append(self.conv1d(flat))
        outs.append(self.conv1d(flat[0]))  # unbatched
        outs.append(flat @ flat.transpose(1, 2))
        outs.append(torch.matmul(flat, self.proj))
        outs.append(flat.sum(-1) / math.sqrt(h * w))
        outs.append(F.adaptive_avg_pool2d(x, 1).flatten(1))
        outs.append(F.avg_pool2d(x, 2))
        outs.append(x.reshape(-1, w).split([1, w - 1], dim=1))
        outs.append(operator.floordiv(h, 2) + c)
        return outs


def test_shapes_match_fake_tensor_prop() -> None:
    x = torch.randn(2, 3, 17, 15)
    check_against_fake_tensor_prop(_trace(Shapes(), x), (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_match_fake_tensor_prop(dtype: torch.dtype) -> None:
    model = randomize_bn(Layouts()).to(dtype)
    x = torch.randn(2, 4, 6, 6, dtype=dtype)
    check_against_fake_tensor_prop(_trace(model, x), (x,))


class Mixed(nn.Module):
    """Cases the rules must decline: integer tensors, mixed dtypes, a dtype argument, advanced indexing."""

    def forward(self, x: torch.Tensor) -> Any:
        i = torch.arange(x.shape[1])
        h = x.half()
        return (x + h, x * 2, i * 2, i / 2, torch.softmax(x, -1, dtype=torch.float64), x[:, i[:2]],
                x.sum(-1, dtype=torch.float64), x.mean(0), torch.relu(i))


def test_declined_cases_fall_back_to_fake_kernels() -> None:
    x = torch.randn(3, 4)
    propagator = check_against_fake_tensor_prop(_trace(Mixed(), x), (x,))
    assert propagator.fake >= 6


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[x > 0].relu()


def test_data_dependent_shapes_run_for_real() -> None:
    """A shape that depends on the values: no fake kernel can give it, so the graph runs on the example inputs."""
    x = torch.tensor([[1.0, -1.0, 2.0]])
    gm = _trace(DataDependent(), x)
    propagate_shapes(gm, (x,))
    assert [node_shape(n) for n in gm.graph.nodes if n.op == "call_method"] == [(2,)]


class MutatesShape(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        y.unsqueeze_(0)
        return y + 1


def test_in_place_shape_change_is_recorded_before_and_after() -> None:
    """``unsqueeze_`` changes its input's shape in place: the value before keeps the old shape."""
    x = torch.randn(2, 3)
    gm = _trace(MutatesShape(), x)
    propagate_shapes(gm, (x,))
    assert [node_shape(n) for n in gm.graph.nodes if n.op != "output"] == [(2, 3), (2, 3), (1, 2, 3), (1, 2, 3)]


def test_view_strides_follow_compute_stride() -> None:
    for shape, perm, new in [((2, 3, 4), (0, 2, 1), (2, 12)), ((2, 3, 4), (1, 0, 2), (3, 8)),
                             ((4, 6), (1, 0), (2, 3, 4)), ((2, 3, 4), (0, 1, 2), (6, 1, 4))]:
        x = torch.randn(shape).permute(perm)
        try:
            want: tuple[int, ...] | None = x.view(new).stride()
        except RuntimeError:
            want = None
        assert view_strides(x.shape, x.stride(), new) == want, (shape, perm, new)


def test_memory_format_as_is_contiguous() -> None:
    for t in [torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
              torch.randn(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d),
              torch.randn(2, 3, 4, 5).permute(0, 2, 1, 3), torch.randn(1, 3, 1, 1), torch.randn(0, 3)]:
        formats = [f for f in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)
                   if t.is_contiguous(memory_format=f)] if t.dim() in (4, 5) else \
            [torch.contiguous_format] if t.is_contiguous() else []
        assert memory_format(t.shape, t.stride()) == (formats[0] if formats else None), t.stride()
