"""LayerNorm over the channels of a blocked ``NCHW[b]c`` map as one kernel (timm's ``LayerNorm2d``: ConvNeXt's
stem, downsampling and block norms).

``LayerNorm2d`` is ``permute(0, 2, 3, 1) → layer_norm(last axis) → permute(0, 3, 1, 2)``. In the blocked layout
(:mod:`bnfold.targets.tvm.layout`) ``ConvertLayout`` leaves it as five kernels — unblock, transpose, LayerNorm,
transpose, block — each a full pass over the feature map. It cannot carry the norm blocked itself: its
layer_norm rule has no sub-indexed channel axis, and a mean over a blocked channel axis fails to infer ("Cannot
broadcast from 5 to 4"). :func:`fuse_channel_norms` therefore runs after ``ConvertLayout`` and replaces the whole
chain by one kernel on the blocked tensor, :func:`channel_layer_norm`. With ``x[n, K, h, w, c]`` the channel
``K·b + c`` of ``C = (C/b)·b`` channels, per pixel ``(n, h, w)``:

    μ       = (1/C) Σ_c Σ_K x[n, K, h, w, c]                     (Σ_K first: ``b`` vector lanes of partial sums)
    σ²      = (1/C) Σ_c Σ_K (x[n, K, h, w, c] − μ)²              (two passes, as TOPI's layer_norm)
    y[n, K, h, w, c] = (x[n, K, h, w, c] − μ) · (σ² + ε)^(−1/2) · γ[K·b + c] + β[K·b + c]

The same values as the NCHW chain up to float32 summation order. A consumer that wants the blocked layout back (the
next conv, a residual add) reads ``y`` directly; one that wants NCHW (a flatten) gets one layout transform.

The schedule (:func:`schedule_channel_norm`): one row ``(n, h)`` per core iteration, start to end in cache — the
``b``-lane partial sums accumulated as vectors over the channel blocks, reduced once per pixel, the output
computed as vectors along the lanes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import tvm
from tvm import relax, te, tirx

from bnfold.targets.tvm.bindings import Bindings, is_op, rewrite_functions

if TYPE_CHECKING:
    from tvm import s_tir

__all__ = ["CHANNEL_NORM", "channel_layer_norm", "fuse_channel_norms", "schedule_channel_norm"]

CHANNEL_NORM = "bnfold.channel_norm"
"""Block annotation of :func:`channel_layer_norm`'s output block (its value: the channel block ``b``)."""

_NHWC, _NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def channel_layer_norm(data: te.Tensor, gamma: te.Tensor, beta: te.Tensor, epsilon: float) -> te.Tensor:
    """LayerNorm over the channels of ``data`` (``N, C/b, H, W, b``) with per-channel ``gamma``, ``beta`` (``C,``):
    the module docstring's formula."""
    n, chunks, h, w, b = data.shape
    channels = tirx.const(int(chunks) * int(b), data.dtype)
    k = te.reduce_axis((0, chunks), name="k")
    lane_sum = te.compute((n, h, w, b), lambda i, y, x, c: te.sum(data[i, k, y, x, c], axis=k), name="cn_lane_sum")
    lane = te.reduce_axis((0, b), name="lane")
    total = te.compute((n, h, w), lambda i, y, x: te.sum(lane_sum[i, y, x, lane], axis=lane), name="cn_sum")
    mean = te.compute((n, h, w), lambda i, y, x: total[i, y, x] / channels, name="cn_mean")
    k2 = te.reduce_axis((0, chunks), name="k2")

    def centered(i: object, kk: object, y: object, x: object, c: object) -> object:
        return data[i, kk, y, x, c] - mean[i, y, x]

    lane_sq = te.compute((n, h, w, b), lambda i, y, x, c: te.sum(centered(i, k2, y, x, c) * centered(i, k2, y, x, c),
                                                                 axis=k2), name="cn_lane_sqsum")
    lane2 = te.reduce_axis((0, b), name="lane2")
    sq = te.compute((n, h, w), lambda i, y, x: te.sum(lane_sq[i, y, x, lane2], axis=lane2), name="cn_sqsum")
    eps = tirx.const(epsilon, data.dtype)
    rstd = te.compute((n, h, w), lambda i, y, x: tirx.rsqrt(sq[i, y, x] / channels + eps), name="cn_rstd")
    return te.compute(
        data.shape,
        lambda i, kk, y, x, c: centered(i, kk, y, x, c) * rstd[i, y, x] * gamma[kk * b + c] + beta[kk * b + c],
        name="channel_layer_norm", attrs={CHANNEL_NORM: int(b)})


def _static_shape(expr: relax.Expr) -> list[int] | None:
    shape = getattr(expr.ty, "shape", None)
    try:
        return [int(d) for d in shape] if shape is not None else None
    except (TypeError, ValueError):  # a symbolic dimension
        return None


def _maps(index_map: object, point: list[int], expected: list[int]) -> bool:
    """``index_map`` sends ``point`` to ``expected``."""
    got = index_map.map_indices([tirx.IntImm("int64", v) for v in point])  # type: ignore[attr-defined]
    try:  # constant indices map to constants (map_indices simplifies)
        return [int(g) for g in got] == expected
    except TypeError:
        return False


def _unblocks(call: relax.Call, block: int) -> bool:
    """``call`` is ``layout_transform`` ``NCHW[block]c → NCHW`` (``(n, K, h, w, c) → (n, K·block + c, h, w)``)."""
    im = call.attrs.index_map
    return all(_maps(im, [0, kk, 3, 4, c], [0, kk * block + c, 3, 4]) for kk, c in ((2, block - 1), (1, 0)))


def _blocks(call: relax.Call, block: int) -> bool:
    """``call`` is ``layout_transform`` ``NCHW → NCHW[block]c``."""
    im = call.attrs.index_map
    return all(_maps(im, [0, kk * block + c, 3, 4], [0, kk, 3, 4, c]) for kk, c in ((2, block - 1), (1, 0)))


def _axes(call: relax.Call) -> list[int]:
    return [int(a) for a in call.attrs.axes]


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):  # type: ignore[misc]
    """Replaces ``layout_transform(NCHW[b]c → NCHW) → permute → layer_norm(channels) → permute`` by
    :func:`channel_layer_norm` on the blocked tensor, and a ``layout_transform`` of the result back to
    ``NCHW[b]c`` by that kernel's output."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod_ = mod
        self.b = Bindings({}, {})
        self.blocked: dict[relax.Var, tuple[relax.Var, int]] = {}
        self.fused = 0

    def _match(self, value: relax.Expr) -> tuple[relax.Expr, relax.Expr, relax.Expr, float, int] | None:
        """``(blocked source, gamma, beta, epsilon, block)`` of a channel LayerNorm chain ending in ``value``."""
        if not is_op(value, "relax.permute_dims") or [int(a) for a in value.attrs.axes] != _NCHW:
            return None
        norm = self.b.value(value.args[0])
        if not self.b.single_use(value.args[0]) or not is_op(norm, "relax.nn.layer_norm") \
                or _axes(norm) not in ([3], [-1]):
            return None
        permute = self.b.value(norm.args[0])
        if not self.b.single_use(norm.args[0]) or not is_op(permute, "relax.permute_dims") \
                or [int(a) for a in permute.attrs.axes] != _NHWC:
            return None
        unblock = self.b.value(permute.args[0])
        if not is_op(unblock, "relax.layout_transform"):
            return None
        src = unblock.args[0]
        shape = _static_shape(src)
        if shape is None or len(shape) != 5 or shape[4] < 4 or str(src.ty.dtype) != "float32" \
                or not _unblocks(unblock, shape[4]):
            return None
        return src, norm.args[1], norm.args[2], float(norm.attrs.epsilon), shape[4]

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        match = self._match(value) if isinstance(binding.var, relax.DataflowVar) else None
        if match is not None:
            src, gamma, beta, eps, block = match
            out = self.builder_.emit(self.builder_.call_te(
                channel_layer_norm, self.visit_expr(src), self.visit_expr(gamma), self.visit_expr(beta), eps,
                primfunc_name_hint="channel_layer_norm"))
            nchw = self.builder_.emit(relax.op.layout_transform(
                out, tvm.tirx.IndexMap.from_func(lambda n, k, h, w, c: (n, k * block + c, h, w))))
            self.set_var_remap(binding.var, nchw)
            self.blocked[binding.var] = (out, block)
            self.fused += 1
            return
        if is_op(value, "relax.layout_transform") and value.args[0] in self.blocked:
            out, block = self.blocked[value.args[0]]
            if _blocks(value, block):
                self.set_var_remap(binding.var, out)
                return
        super().visit_var_binding_(binding)

    def _use(self, bindings: Bindings) -> None:
        self.b = bindings

    def transform(self) -> tvm.IRModule:
        return rewrite_functions(self.mod_, self, self._use, lambda: self.fused)


@tvm.transform.module_pass(opt_level=0, name="FuseChannelNorms")
def fuse_channel_norms(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Each channel LayerNorm chain of a blocked map → one :func:`channel_layer_norm` kernel (module docstring).
    Run after ``ConvertLayout`` (it matches the transforms that pass inserts), before ``LegalizeOps``."""
    return _Rewriter(mod).transform()


def schedule_channel_norm(sch: s_tir.Schedule, lanes: int) -> bool:
    """Schedule a kernel holding a :func:`channel_layer_norm` (False: it holds none): elementwise producers fused
    into it inlined, rows ``(n, h)`` parallel with every stage computed inside its row, the lane partial sums
    accumulated as vectors over the channel blocks (lanes innermost), the output vectorized along the lanes."""
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    out = [b for b in blocks if CHANNEL_NORM in sch.get(b).annotations]
    if len(out) != 1:
        return False
    out = out[0]
    block = int(sch.get(out).annotations[CHANNEL_NORM])
    for b in blocks:  # a producer fused in front (a bias or residual add): recomputed per read, no buffer
        if not sch.get(b).same_as(sch.get(out)) and not sch.get(b).name_hint.startswith("cn_"):
            sch.compute_inline(b)
    for b in sch.get_consumers(out):  # an elementwise consumer fused behind it
        sch.reverse_compute_inline(b)
    i, kk, y, x, c = sch.get_loops(out)
    sch.reorder(i, y, kk, x, c)
    row = sch.fuse(i, y)
    sch.parallel(row)
    if block <= lanes:
        sch.vectorize(c)
    for b in reversed(sch.get_child_blocks(root)):
        if sch.get(b).same_as(sch.get(out)):
            continue
        sch.compute_at(b, row, preserve_unit_loops=True)
    for b in sch.get_child_blocks(root):
        name = sch.get(b).name_hint
        if name.startswith(("cn_lane_sum", "cn_lane_sqsum")):
            loops = sch.get_loops(b)  # row, x, c, k after compute_at
            x_l, c_l, k_l = loops[-3:]
            sch.reorder(x_l, k_l, c_l)
            if block <= lanes:
                sch.vectorize(c_l)
    return True
