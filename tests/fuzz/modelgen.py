"""Random valid models for fuzzing the folds — independent of bnfold (imports only torch).

:func:`make_case` turns a seed into a small ``nn.Module`` in eval mode plus an input batch. The model is an
interpreter over a *plan* (a list of ops on a value stack), so symbolic tracing and ``torch.export`` both
unroll it into a plain graph. What it can contain:

* conv 1/2/3-D (grouped, depthwise, dilated, strided, every ``padding_mode``), conv-transpose (grouped,
  output padding), linear, an embedding with a tied ``lm_head``;
* BatchNorm before and after them: modules (1/2/3-D, SyncBatchNorm, a plain subclass, a subclass adding an
  activation, ``affine=False``, ``track_running_stats=False``), functional ``F.batch_norm``, a frozen
  ``x * scale + shift``; randomized statistics and eps;
* LayerNorm, RMSNorm, GroupNorm; residual adds, concats, flatten/permute, max/avg/adaptive pools, upsampling,
  activations; a conv module called at two sites (shared) and two convs sharing one weight (tied);
* dtypes float32, float16, bfloat16.

Every op is tried on a real tensor while the plan is built (an op that does not fit the current shape is
skipped), so every generated model runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Case", "FuzzNet", "make_case"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_ACTS = ["relu", "relu6", "gelu", "silu", "tanh", "leaky_relu", "hardswish", "identity"]


class PlainBN2d(nn.BatchNorm2d):
    """A BN subclass that changes nothing (must fold like BatchNorm2d)."""


class BNReLU2d(nn.BatchNorm2d):
    """A BN subclass that also applies ReLU (the ReLU must survive a fold)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class FunctionalBN(nn.Module):
    """``F.batch_norm`` in eval mode on buffers of this module."""

    def __init__(self, c: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        for name in ("running_mean", "running_var", "weight", "bias"):
            self.register_buffer(name, torch.zeros(c) if "mean" in name or name == "bias" else torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)


class FrozenBN(nn.Module):
    """A frozen BN written as ``x * scale + shift`` with per-channel buffers."""

    def __init__(self, c: int, dims: int) -> None:
        super().__init__()
        shape = (c,) + (1,) * dims
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("shift", torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "identity":
        return x
    if name == "leaky_relu":
        return F.leaky_relu(x, 0.1)
    return getattr(F, name)(x)


def apply_step(step: tuple[Any, ...], vals: list[torch.Tensor], mods: nn.ModuleDict | dict[str, nn.Module]
               ) -> torch.Tensor:
    """Run one plan step: read ``vals[step[1]]`` (and another value for add/cat), return the result."""
    op, v = step[0], vals[step[1]]
    if op == "mod":
        return mods[step[2]](v)
    if op == "act":
        return _act(step[2], v)
    if op == "add":
        return v + vals[step[2]]
    if op == "cat":
        return torch.cat([v, vals[step[2]]], dim=1)
    if op == "maxpool":
        return [F.max_pool1d, F.max_pool2d, F.max_pool3d][step[2] - 1](v, 2)
    if op == "avgpool":
        return [F.avg_pool1d, F.avg_pool2d, F.avg_pool3d][step[2] - 1](v, 2)
    if op == "gap":  # step[2]: the rank, static (a traced tensor's dim() is not an int)
        return v.mean(dim=tuple(range(2, step[2])))
    if op == "flatten":
        return torch.flatten(v, 1)
    if op == "upsample":
        return F.interpolate(v, scale_factor=2.0, mode="nearest")
    if op == "to_seq":  # (N, C, L) -> (N, L, C)
        return v.transpose(1, 2)
    if op == "permute_roundtrip":  # channels last and back: commutes with a per-channel affine
        d = step[2]
        return v.permute(0, *range(2, d), 1).contiguous().permute(0, d - 1, *range(1, d - 1))
    raise ValueError(op)


class FuzzNet(nn.Module):
    """Runs ``plan``: each step reads values from the stack by index and pushes one result. After the steps in
    ``shape_reads`` the result's *metadata* is read too, as timm and transformer code does (``torch._assert`` on
    ``x.ndim`` and ``x.shape[1]``): a fold must not treat those reads as a second consumer, nor break them."""

    def __init__(self, plan: list[tuple[Any, ...]], mods: dict[str, nn.Module],
                 shape_reads: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.plan = plan
        self.mods = nn.ModuleDict(mods)
        self.shape_reads = shape_reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals = [x]
        for i, step in enumerate(self.plan):
            out = apply_step(step, vals, self.mods)
            if i in self.shape_reads:
                torch._assert(out.ndim >= 2, "a batch of at least one feature axis")
                torch._assert(out.shape[1] > 0, "channels present")
            vals.append(out)
        return vals[-1]


@dataclass
class Case:
    """One generated model: ``model`` (eval mode, ``dtype``), a small input batch to capture and fold with,
    a larger one (``check_inputs``, 32 samples) to judge parity on, and a one-line description.

    Parity is judged on more samples than the fold sees because the float64 rule compares error *estimates*:
    on a dozen fp16 outputs the reference's error can be ten times below its typical value by luck (seed
    100924: ratio 15 on 3 samples, 1.35 on 256), which fails a correct fold."""

    seed: int
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    dtype: torch.dtype
    description: str
    check_inputs: tuple[torch.Tensor, ...] = ()


class _Builder:
    def __init__(self, rng: random.Random, x: torch.Tensor) -> None:
        self.rng = rng
        self.plan: list[tuple[Any, ...]] = []
        self.mods: dict[str, nn.Module] = {}
        self.vals = [x]
        self.convs: list[str] = []
        self.log: list[str] = []

    @property
    def cur(self) -> torch.Tensor:
        return self.vals[-1]

    def _try(self, step: tuple[Any, ...], mods: dict[str, nn.Module], label: str) -> bool:
        try:
            with torch.no_grad():
                out = apply_step(step, self.vals, {**self.mods, **mods})
        except (RuntimeError, ValueError):
            return False
        if out.numel() == 0 or out.numel() > 20_000 or min(out.shape) == 0:
            return False
        self.plan.append(step)
        self.mods.update(mods)
        self.vals.append(out)
        self.log.append(label)
        return True

    def name(self, kind: str) -> str:
        return f"{kind}{len(self.mods)}"

    # -- conv-domain ops -------------------------------------------------------------------------------------
    def conv(self, src: int = -1, cout: int | None = None, same: bool = False) -> bool:
        rng, x = self.rng, self.vals[src]
        d, c = x.dim() - 2, x.shape[1]
        cout = cout or rng.choice([c, 2, 3, 4, 6, 8])
        groups = rng.choice([g for g in (1, 2, 3, 4, c) if c % g == 0 and cout % g == 0])
        k = 3 if same else rng.choice([1, 2, 3])
        stride = 1 if same else rng.choice([1, 1, 2])
        dilation = 1 if same or k == 1 else rng.choice([1, 1, 2])
        mode = rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
        padding: Any = 1 if same else rng.choice([0, k // 2, "same"] if stride == 1 else [0, k // 2])
        conv = _CONV[d](c, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                        bias=rng.random() < 0.6, padding_mode=mode)
        name = self.name("conv")
        src_i = src % len(self.vals)
        ok = self._try(("mod", src_i, name), {name: conv},
                       f"conv{d}d({c}->{cout},k{k},s{stride},p{padding},d{dilation},g{groups},{mode})")
        if ok:
            self.convs.append(name)
        return ok

    def conv_transpose(self) -> bool:
        rng, x = self.rng, self.cur
        d, c = x.dim() - 2, x.shape[1]
        cout = rng.choice([c, 2, 4, 6])
        groups = rng.choice([g for g in (1, 2, 3, c) if c % g == 0 and cout % g == 0])
        k, stride = rng.choice([1, 2, 3]), rng.choice([1, 2])
        padding = rng.choice([0, k // 2])
        output_padding = rng.choice([0, stride - 1])
        conv = _CONVT[d](c, cout, k, stride=stride, padding=padding, output_padding=output_padding,
                         groups=groups, bias=rng.random() < 0.6)
        name = self.name("convT")
        return self._try(("mod", len(self.vals) - 1, name), {name: conv},
                         f"convT{d}d({c}->{cout},k{k},s{stride},p{padding},op{output_padding},g{groups})")

    def shared_conv(self) -> bool:
        """Call an existing conv module again (a second site)."""
        fits = [n for n in self.convs if self.mods[n].in_channels == self.cur.shape[1]
                and isinstance(self.mods[n], _CONV[self.cur.dim() - 2])]
        if not fits:
            return False
        name = self.rng.choice(fits)
        return self._try(("mod", len(self.vals) - 1, name), {}, f"shared({name})")

    def tied_conv(self) -> bool:
        """A new conv whose weight is the same Parameter as an existing conv's."""
        fits = [n for n in self.convs if self.mods[n].in_channels == self.cur.shape[1]
                and isinstance(self.mods[n], _CONV[self.cur.dim() - 2])]
        if not fits:
            return False
        base = self.mods[self.rng.choice(fits)]
        conv = _CONV[base.weight.dim() - 2](base.in_channels, base.out_channels, base.kernel_size,
                                            stride=base.stride, padding=base.padding, dilation=base.dilation,
                                            groups=base.groups, bias=True, padding_mode=base.padding_mode)
        conv.weight = base.weight
        name = self.name("tied")
        return self._try(("mod", len(self.vals) - 1, name), {name: conv}, "tied_conv")

    def bn(self, src: int = -1) -> bool:
        rng, x = self.rng, self.vals[src]
        d, c = x.dim() - 2, x.shape[1]
        eps = rng.choice([1e-5, 1e-3, 1e-1])
        kinds = ["bn", "bn", "bn", "functional", "frozen", "noaffine", "nostats", "sync"]
        if d == 2:
            kinds += ["plain_sub", "bnrelu"]
        kind = rng.choice(kinds)
        if kind == "functional":
            m: nn.Module = FunctionalBN(c, eps)
        elif kind == "frozen":
            m = FrozenBN(c, d)
        elif kind == "plain_sub":
            m = PlainBN2d(c, eps=eps)
        elif kind == "bnrelu":
            m = BNReLU2d(c, eps=eps)
        elif kind == "sync":
            m = nn.SyncBatchNorm(c, eps=eps)
        else:
            m = _BN[max(d, 1)](c, eps=eps, affine=kind != "noaffine", track_running_stats=kind != "nostats")
        _randomize(m, rng)
        name = self.name("bn")
        return self._try(("mod", src % len(self.vals), name), {name: m.eval()}, f"{kind}")

    def group_norm(self) -> bool:
        c = self.cur.shape[1]
        g = self.rng.choice([g for g in (1, 2, c) if c % g == 0])
        m = nn.GroupNorm(g, c)
        _randomize(m, self.rng)
        name = self.name("gn")
        return self._try(("mod", len(self.vals) - 1, name), {name: m}, f"groupnorm({g})")

    def act(self) -> bool:
        a = self.rng.choice(_ACTS)
        return self._try(("act", len(self.vals) - 1, a), {}, a)

    def pool(self) -> bool:
        d = self.cur.dim() - 2
        op = self.rng.choice(["maxpool", "avgpool"])
        return self._try((op, len(self.vals) - 1, d), {}, op)

    def residual(self) -> bool:
        start = len(self.vals) - 1
        if not self.conv(same=True, cout=self.cur.shape[1]):
            return False
        if self.rng.random() < 0.7:
            self.bn()
        if self.rng.random() < 0.3:
            self.act()
        return self._try(("add", len(self.vals) - 1, start), {}, "add")

    def concat(self) -> bool:
        start = len(self.vals) - 1
        if not self.conv(src=start, same=True):
            return False
        if self.rng.random() < 0.6:
            self.bn()
        left = len(self.vals) - 1
        if not self.conv(src=start, same=True):
            return False
        if self.rng.random() < 0.6:
            self.bn()
        return self._try(("cat", len(self.vals) - 1, left), {}, "cat")

    # -- feature-domain ops (N, F) or (N, T, F) ---------------------------------------------------------------
    def linear(self, fout: int | None = None) -> bool:
        f = self.cur.shape[-1]
        fout = fout or self.rng.choice([2, 4, 6, 8, 10])
        m = nn.Linear(f, fout, bias=self.rng.random() < 0.7)
        name = self.name("fc")
        return self._try(("mod", len(self.vals) - 1, name), {name: m}, f"linear({f}->{fout})")

    def feature_norm(self) -> bool:
        f, rng = self.cur.shape[-1], self.rng
        kind = rng.choice(["ln", "rms", "bn1d"] if self.cur.dim() == 2 else ["ln", "rms"])
        m: nn.Module
        if kind == "ln":
            m = nn.LayerNorm(f, elementwise_affine=True, bias=rng.random() < 0.8)
        elif kind == "rms":
            m = nn.RMSNorm(f, eps=rng.choice([None, 1e-6, 1e-3]))
        else:
            m = nn.BatchNorm1d(f)
        _randomize(m, rng)
        name = self.name(kind)
        return self._try(("mod", len(self.vals) - 1, name), {name: m.eval()}, kind)


def _randomize(m: nn.Module, rng: random.Random) -> None:
    """Random statistics and affine parameters (default ones make a fold almost an identity and hide bugs)."""
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if t is None or not t.is_floating_point():
                continue
            if "var" in name:
                t.copy_(torch.rand(t.shape, generator=g) * 2.0 + 0.05)
            elif name in ("weight", "scale"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.8 + rng.choice([0.0, 1.0]))
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)


def make_case(seed: int) -> Case:
    """A random valid model and input for ``seed`` (deterministic)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    family = rng.choices(["conv", "mlp", "lm"], weights=[0.75, 0.15, 0.10])[0]
    dtype = rng.choices([torch.float32, torch.float16, torch.bfloat16], weights=[0.7, 0.15, 0.15])[0]
    n = rng.choice([2, 3])
    if family == "lm":
        model, x, desc = _lm(rng, n)
    else:
        if family == "conv":
            d = rng.choices([1, 2, 3], weights=[0.3, 0.5, 0.2])[0]
            size = {1: rng.choice([6, 8, 12]), 2: rng.choice([5, 6, 8]), 3: rng.choice([4, 5])}[d]
            x = torch.randn(n, rng.choice([1, 2, 3, 4]), *([size] * d))
        else:
            x = torch.randn(n, rng.choice([3, 4, 8]))
        b = _Builder(rng, x)
        if family == "conv":
            _conv_body(b)
            _head(b)
        else:
            for _ in range(rng.randint(2, 5)):
                rng.choice([b.linear, b.linear, b.feature_norm, b.act])()
        # which results also get their shape read: a separate stream, so the seed → model mapping is unchanged
        reads = random.Random(seed + 7_777_777)
        shape_reads = frozenset(i for i in range(len(b.plan)) if reads.random() < 0.3)
        model, desc = FuzzNet(b.plan, b.mods, shape_reads), " ".join(b.log)
        desc += f" (shape reads after {sorted(shape_reads)})" if shape_reads else ""
    model = model.eval()
    if dtype != torch.float32:
        model = model.to(dtype)
        x = x.to(dtype) if x.is_floating_point() else x
        try:  # CPU kernels do not cover every op in half precision (e.g. avg_pool3d in bf16)
            with torch.no_grad():
                model(x)
        except (RuntimeError, NotImplementedError):
            dtype, model = torch.float32, model.float()
            x = x.float() if x.is_floating_point() else x
    g = torch.Generator().manual_seed(seed)
    if x.is_floating_point():
        big = torch.randn(32, *x.shape[1:], generator=g).to(dtype)
    else:
        big = torch.randint(0, int(x.max()) + 1, (32, *x.shape[1:]), generator=g)
    return Case(seed, model, (x,), dtype, f"seed {seed} {family} {str(dtype).removeprefix('torch.')}: {desc}",
                (big,))


def _conv_body(b: _Builder) -> None:
    rng = b.rng
    for _ in range(rng.randint(2, 7)):
        op = rng.choices(
            [b.conv, b.bn, b.act, b.pool, b.residual, b.concat, b.conv_transpose, b.shared_conv, b.tied_conv,
             b.group_norm, lambda: b._try(("upsample", len(b.vals) - 1), {}, "upsample"),
             lambda: b._try(("permute_roundtrip", len(b.vals) - 1, b.cur.dim()), {}, "permute")],
            weights=[5, 4, 2, 1, 2, 1, 1.5, 1, 0.7, 0.5, 0.4, 0.4])[0]
        op()
        if rng.random() < 0.4 and b.plan and b.plan[-1][0] == "mod" and b.log[-1].startswith("conv"):
            b.bn()  # conv → BN is the common case: make it common here too


def _head(b: _Builder) -> None:
    rng = b.rng
    head = rng.choice(["none", "gap", "flatten", "seq"])
    if head == "seq" and b.cur.dim() == 3:
        b._try(("to_seq", len(b.vals) - 1), {}, "to_seq")
    elif head == "gap":
        b._try(("gap", len(b.vals) - 1, b.cur.dim()), {}, "gap")
    elif head == "flatten" and b.cur[0].numel() <= 512:
        b._try(("flatten", len(b.vals) - 1), {}, "flatten")
    else:
        return
    for _ in range(rng.randint(1, 3)):
        rng.choice([b.linear, b.feature_norm, b.feature_norm, b.act])()


class TiedLM(nn.Module):
    """Embedding → [norm → linear → act]* → final norm → lm_head tied to the embedding (QuaRot PR#17)."""

    def __init__(self, vocab: int, dim: int, layers: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(m for _, m in layers)
        self.kinds = [k for k, _ in layers]
        self.norm = nn.RMSNorm(dim) if len(layers) % 2 else nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for kind, block in zip(self.kinds, self.blocks, strict=True):
            h = h + block(h) if kind == "residual" else block(h)
        return self.lm_head(self.norm(h))


def _lm(rng: random.Random, n: int) -> tuple[nn.Module, torch.Tensor, str]:
    vocab, dim = rng.choice([11, 17]), rng.choice([4, 8])
    layers: list[tuple[str, nn.Module]] = []
    for _ in range(rng.randint(0, 2)):
        norm = nn.LayerNorm(dim) if rng.random() < 0.5 else nn.RMSNorm(dim)
        layers.append(("residual", nn.Sequential(norm, nn.Linear(dim, dim), nn.GELU())))
    model = TiedLM(vocab, dim, layers)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm | nn.RMSNorm):
            _randomize(m, rng)
    tokens = torch.randint(0, vocab, (n, rng.choice([3, 5])))
    return model, tokens, f"tied-lm(vocab {vocab}, dim {dim}, {len(layers)} blocks)"
