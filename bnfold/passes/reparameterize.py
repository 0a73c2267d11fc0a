"""Rule ``reparameterize``: branches that are linear in the same input and summed become one conv (structural
re-parameterization, as in RepVGG, MobileOne, FastViT, ACNet)::

    conv_K(x) + conv_k(x) + A(x) + x  =  conv'(x)

with, in float64 and cast once into the kept conv's dtype (``t`` = where each kernel sits inside ``K``)::

    W'[:, :, t : t + k] += W_k        (every other conv, zero-padded into the kept kernel)
    W'[o, o mod I_g, t] += a[o]        (an identity branch A(x) = a ⊙ x + b, after a BatchNorm was canonicalized;
                                        a plain ``x`` has a = 1, b = 0)
    b' = Σ conv biases + Σ identity shifts

The kept conv is the one whose kernel contains every other kernel. Exact when, per spatial dim ``d``:

* every conv reads the same input node, with the same stride, groups, channel counts and padding mode;
* a smaller kernel sits at offset ``t = (P_K − P_k) / D_K`` inside the kept one, which must be an integer with
  ``0 ≤ t ≤ K − k``; a kernel wider than 1 needs ``D_k = D_K`` (a 1-wide kernel reads one position whatever its
  dilation). Then it reads exactly the positions the kept conv reads at its taps ``t … t + k − 1`` (both read
  zeros outside the input). With stride 1 and equal output shapes this is the centre, ``t = (K − k) / 2``;
* an identity branch needs stride 1, as many input as output channels, and the identity's tap
  ``t = P_K / D_K`` an integer in ``[0, K)`` (for a 3×3 conv with padding 1: the centre);
* every operand of the sum has the sum's shape (no broadcasting).

Made only when it does not duplicate compute: every branch (conv, affine, and the pass-through ``Identity`` /
eval ``Dropout`` modules after it) feeds only the sum, so every branch disappears. A sum may mix such branches
with others (a residual from elsewhere): those stay, added to the merged conv.

This changes the module structure the user sees (one conv replaces several), so it is optional:
``Reparameterize(enabled=False)`` still finds every merge it would make and leaves it with a reason that names
the option, so the report says what turning it on would fold.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from bnfold.ir.affine_view import ADD_TARGETS, sources_of
from bnfold.ir.graph import fetch_attr, node_shape, normalized_kwargs
from bnfold.ir.linear_ops import LinearOp
from bnfold.ir.uses import value_users
from bnfold.passes.context import PassContext
from bnfold.passes.engine import FOLDED_KEY, Category, Change, PassResult
from bnfold.passes.fold_targets import linear_op, replace_params
from bnfold.passes.rule import Fail, Rule

__all__ = ["Reparameterize", "embed_branches"]

aten = torch.ops.aten
f64 = torch.float64

# -- the arithmetic (pure) -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Embedded:
    """One branch, in float64: a conv kernel (``weight``) at ``offset`` inside the kept kernel, or an identity
    (``weight`` None) scaled by ``a`` at tap ``offset``; ``bias`` its per-channel shift (or None)."""

    weight: torch.Tensor | None
    offset: tuple[int, ...]
    bias: torch.Tensor | None
    a: torch.Tensor | None = None


def embed_branches(shape: tuple[int, ...], branches: list[Embedded]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` of the single conv (weight ``shape`` = (out, in/groups, K…)) equal to the sum of ``branches``
    (float64; see the module docstring for the math)."""
    out, in_g = shape[0], shape[1]
    w = torch.zeros(shape, dtype=f64)
    b = torch.zeros(out, dtype=f64)
    for br in branches:
        if br.weight is not None:
            window = (slice(None), slice(None), *(slice(t, t + k) for t, k in zip(br.offset, br.weight.shape[2:],
                                                                                  strict=True)))
            w[window] += br.weight.detach().to(f64)
        else:
            assert br.a is not None
            o = torch.arange(out)
            w[(o, o % in_g, *(torch.full_like(o, t) for t in br.offset))] += br.a.to(f64)
        if br.bias is not None:
            b += br.bias.detach().to(f64)
    return w, b


# -- the graph side --------------------------------------------------------------------------------------------------

_ADD_INPLACE = {aten.add_.Tensor}


def _is_add(node: torch.fx.Node) -> bool:
    """``u + v`` (alpha 1). ``aten.add_`` (an in-place ``+=`` kept by ``torch.export``) counts when nothing else reads
    the tensor it overwrites, so its result is all the mutation is seen through."""
    if node.op not in ("call_function", "call_method") or len(node.args) != 2:
        return False
    if node.target in _ADD_INPLACE:
        lhs = node.args[0]
        if not isinstance(lhs, torch.fx.Node) or value_users(lhs) != [node]:
            return False
    elif node.target not in ADD_TARGETS:
        return False
    return set(node.kwargs) <= {"alpha"} and node.kwargs.get("alpha", 1) == 1


def _is_pass_through(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """A single-input op that returns its input's values: ``nn.Identity``, ``nn.Dropout*`` in eval."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return False
    m = fetch_attr(gm, str(node.target))
    if type(m) is nn.Identity:
        return True
    return isinstance(m, nn.modules.dropout._DropoutNd) and not m.training


def _sole_user(node: torch.fx.Node) -> torch.fx.Node | None:
    """The one node that reads ``node``'s values (metadata uses, such as timm's ``x.ndim`` asserts, aside)."""
    users = value_users(node)
    return users[0] if len(users) == 1 else None


def _is_sum(ctx: PassContext, node: torch.fx.Node) -> bool:
    """An add of two graph values (``x + c`` with a constant ``c`` is an affine, not a sum of branches)."""
    return _is_add(node) and ctx.affine(node) is None


def _root(ctx: PassContext, node: torch.fx.Node) -> torch.fx.Node | None:
    """The outermost add of the sum ``node`` takes part in (following sole users through adds and pass-throughs)."""
    root, cur = None, node
    for _ in range(64):
        if _is_sum(ctx, cur):
            root = cur
        user = _sole_user(cur)
        if user is None or not (_is_sum(ctx, user) or _is_pass_through(ctx.gm, user)):
            break
        cur = user
    return root


@dataclass
class Branch:
    """An operand of the sum: ``core`` (a conv, an affine, or the input itself) reached through ``chain``
    (pass-through nodes from ``core`` to the add)."""

    arg: torch.fx.Node
    core: torch.fx.Node
    chain: list[torch.fx.Node]
    x: torch.fx.Node
    op: LinearOp | None = None  # a conv branch
    a: torch.Tensor | None = None  # an identity branch: a ⊙ x + b
    b: torch.Tensor | None = None
    why_shared: str | None = None  # the branch feeds something else too

    def describe(self) -> str:
        if self.op is not None:
            return self.op.describe()
        return f"identity '{self.core.name}'" if self.core is not self.x else f"identity '{self.x.name}'"

    @property
    def sources(self) -> tuple[str, ...]:
        if self.op is not None:
            return tuple(self.op.node.meta.get(FOLDED_KEY, ()))
        return sources_of(self.core) if self.core is not self.x else ()


@dataclass
class Sum:
    """A tree of adds rooted at ``node``: its ``adds`` (and the pass-throughs between them) and its operands."""

    node: torch.fx.Node
    inner: list[torch.fx.Node] = field(default_factory=list)  # adds and pass-throughs, root first
    branches: list[Branch] = field(default_factory=list)
    others: list[Any] = field(default_factory=list)  # operands that are not tensors of the graph (scalars)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(s for br in self.branches if br.op is None for s in br.sources)


@dataclass(frozen=True)
class Plan:
    main: Branch
    group: list[Branch]
    embedded: list[Embedded]


def _strip(gm: torch.fx.GraphModule, arg: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    chain: list[torch.fx.Node] = []
    core = arg
    while _is_pass_through(gm, core) and isinstance(core.args[0], torch.fx.Node):
        chain.append(core)
        core = core.args[0]
        if _sole_user(core) is None:
            break
    return core, chain


def _collect(ctx: PassContext, root: torch.fx.Node) -> Sum:
    gm = ctx.gm
    s = Sum(root, inner=[root])
    stack = [root]
    while stack:
        add = stack.pop()
        for arg in add.args:
            if not isinstance(arg, torch.fx.Node):
                if not (isinstance(arg, (int, float)) and arg == 0):
                    s.others.append(arg)
                continue
            core, chain = _strip(gm, arg)
            if all(_sole_user(n) is not None for n in (core, *chain)) and _is_sum(ctx, core):
                s.inner.extend((*chain, core))
                stack.append(core)
                continue
            s.branches.append(_branch(ctx, arg, core, chain))
    return s


def _branch(ctx: PassContext, arg: torch.fx.Node, core: torch.fx.Node, chain: list[torch.fx.Node]) -> Branch:
    shared = next((n for n in (core, *chain) if _sole_user(n) is None), None)
    op = linear_op(ctx, core)
    if shared is not None:  # it stays for its other users: as an operand of the sum it is an identity of itself
        mergeable = (isinstance(op, LinearOp) and op.kind == "conv") or ctx.affine(core) is not None
        users = ", ".join(repr(u.name) for u in value_users(shared) if u not in chain and u is not arg)
        why = f"'{shared.name}' also feeds {users}" if mergeable else None
        return Branch(arg, core, chain, core, why_shared=why)
    if isinstance(op, LinearOp) and op.kind == "conv":
        return Branch(arg, core, chain, op.input, op=op)
    view = ctx.affine(core)
    if view is not None and view.axis == 1:
        return Branch(arg, core, chain, view.x, a=view.a, b=view.b)
    # the input itself (a plain residual): identity, nothing to remove, so it never duplicates compute
    return Branch(arg, core, chain, core, a=None, b=None)


def _padding(op: LinearOp, dilation: tuple[int, ...]) -> tuple[int, ...] | Fail:
    if not isinstance(op.padding, str):
        return tuple(op.padding)
    if op.padding == "valid":
        return (0,) * len(op.kernel)
    pads = []
    for k, d in zip(op.kernel, dilation, strict=True):
        if d * (k - 1) % 2:
            return Fail(f"{op.describe()} pads 'same' unevenly (more on one side)")
        pads.append(d * (k - 1) // 2)
    return tuple(pads)


def _geometry(ctx: PassContext, op: LinearOp) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | Fail:
    """``(stride, padding, dilation)`` of a conv, or why they cannot be read."""
    n = len(op.kernel)

    def tup(v: Any) -> tuple[int, ...]:
        return (int(v),) * n if isinstance(v, int) else tuple(int(x) for x in v) if len(v) == n else \
            (int(v[0]),) * n

    if op.module is not None:
        stride, dilation = tup(op.module.stride), tup(op.module.dilation)
    else:
        kw = normalized_kwargs(ctx.gm, op.node) or {}
        stride, dilation = tup(kw.get("stride", 1)), tup(kw.get("dilation", 1))
    pad = _padding(op, dilation)
    if isinstance(pad, Fail):
        return pad
    return stride, pad, dilation


def _conv_offset(main: LinearOp, gm_main: tuple[tuple[int, ...], ...], op: LinearOp,
                 g: tuple[tuple[int, ...], ...]) -> tuple[int, ...] | Fail:
    (s_m, p_m, d_m), (s, p, d) = gm_main, g
    if s != s_m:
        return Fail(f"{op.describe()} has stride {s}, {main.describe()} stride {s_m}")
    offsets = []
    for k_m, k, pm, pk, dm, dk in zip(main.kernel, op.kernel, p_m, p, d_m, d, strict=True):
        if k > 1 and dk != dm:
            return Fail(f"{op.describe()} has dilation {d}, {main.describe()} dilation {d_m}")
        t, r = divmod(pm - pk, dm)
        if r or not 0 <= t <= k_m - k:
            return (Fail(f"{op.describe()} (kernel {op.kernel}, padding {p}) does not line up inside "
                    f"{main.describe()} (kernel {main.kernel}, padding {p_m}): its taps would not read the same "
                    f"input positions"))
        offsets.append(t)
    return tuple(offsets)


def _reroute_metadata_uses(ctx: PassContext, dead: list[torch.fx.Node], conv: torch.fx.Node) -> None:
    """Nodes of the merged branches may still have users that read only their shape (``x.ndim`` asserts); every
    one of them has the sum's shape, so they read ``conv`` instead. ``conv`` (and the constants only it reads) moves
    up before the first such user when it came later in the graph."""
    gone = set(dead)
    readers = {u for n in dead for u in n.users if u not in gone}
    if not readers:
        return
    first, cur = None, conv.prev
    stop = set(conv.all_input_nodes) - {n for n in conv.all_input_nodes if n.op == "get_attr"}
    while cur.op != "root" and cur not in stop:
        if cur in readers:
            first = cur
        cur = cur.prev
    if first is not None:
        for n in [*(n for n in conv.all_input_nodes if n.op == "get_attr" and len(n.users) == 1), conv]:
            first.prepend(n)
        ctx.touch(conv)
    for n in dead:
        if n.users:
            ctx.replace_all_uses(n, conv)


class Reparameterize(Rule[Sum, Plan]):
    name = "reparameterize"
    category = Category.FOLD

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def run(self, ctx: PassContext, worklist: Sequence[torch.fx.Node]) -> PassResult:
        # a branch touched anywhere below a sum (a BN folded into its conv) brings that sum's outermost add here
        roots = (_root(ctx, n) for n in worklist if ctx.is_live(n))
        return super().run(ctx, list(dict.fromkeys(r for r in roots if r is not None)))

    def match(self, ctx: PassContext, node: torch.fx.Node) -> Sum | None:
        if not _is_sum(ctx, node) or _root(ctx, node) is not node:
            return None
        s = _collect(ctx, node)
        convs = any(br.op is not None or br.why_shared is not None for br in s.branches)
        return s if convs and len(s.branches) >= 2 else None

    def check(self, ctx: PassContext, m: Sum) -> Plan | Fail:
        groups: dict[torch.fx.Node, list[Branch]] = {}
        for br in m.branches:
            groups.setdefault(br.x, []).append(br)
        candidates = [g for g in groups.values() if len(g) >= 2 and any(br.op is not None for br in g)]
        shared = next((br.why_shared for br in m.branches if br.why_shared is not None), None)
        if not candidates and shared is not None:
            return Fail(f"re-parameterization: {shared}; merging that branch would duplicate its compute")
        if not candidates:
            return Fail("re-parameterization: its branches read different inputs "
                        f"({', '.join(repr(x.name) for x in groups)}), so they cannot become one conv")
        group = max(candidates, key=len)
        plan = self._plan(ctx, m, group)
        if isinstance(plan, Fail):
            return Fail(f"re-parameterization: {plan.reason}")
        if not self.enabled:
            return Fail(f"it would merge into {plan.main.describe()} by structural re-parameterization, which is "
                        f"off: fold(..., reparameterize=True) or --reparameterize")
        return plan

    def _plan(self, ctx: PassContext, m: Sum, group: list[Branch]) -> Plan | Fail:
        shape = node_shape(m.node)
        for br in group:
            if shape is None or node_shape(br.arg) != shape:
                return Fail(f"'{br.arg.name}' has shape {node_shape(br.arg)}, the sum {shape} (broadcast)")
        convs = [br for br in group if br.op is not None]
        main = max(convs, key=lambda br: (sum(br.op.kernel), br.op is not None))  # type: ignore[union-attr]
        mop = main.op
        assert mop is not None
        gm_main = _geometry(ctx, mop)
        if isinstance(gm_main, Fail):
            return gm_main
        embedded: list[Embedded] = []
        for br in group:
            if br.op is not None:
                op = br.op
                if (op.groups, op.out_channels, op.in_channels, op.weight.dtype, op.weight.device, op.padding_mode) \
                        != (mop.groups, mop.out_channels, mop.in_channels, mop.weight.dtype, mop.weight.device,
                            mop.padding_mode) or len(op.kernel) != len(mop.kernel):
                    return Fail(f"{op.describe()} and {mop.describe()} differ in groups, channels, dtype or "
                                f"padding mode")
                if op is mop:
                    embedded.append(Embedded(op.weight, (0,) * len(op.kernel), op.bias))
                    continue
                if any(k > km for k, km in zip(op.kernel, mop.kernel, strict=True)):
                    return Fail(f"no kernel contains the others ({op.describe()} {op.kernel}, "
                                f"{mop.describe()} {mop.kernel})")
                g = _geometry(ctx, op)
                if isinstance(g, Fail):
                    return g
                off = _conv_offset(mop, gm_main, op, g)
                if isinstance(off, Fail):
                    return off
                embedded.append(Embedded(op.weight, off, op.bias))
                continue
            stride, pad, dil = gm_main
            if any(s != 1 for s in stride):
                return Fail(f"{mop.describe()} has stride {stride}; an identity branch needs stride 1")
            if mop.in_channels != mop.out_channels:
                return Fail(f"{mop.describe()} maps {mop.in_channels} to {mop.out_channels} channels; an identity "
                            f"branch needs as many in as out")
            offs = []
            for k, p, d in zip(mop.kernel, pad, dil, strict=True):
                t, r = divmod(p, d)
                if r or not 0 <= t < k:
                    return Fail(f"{mop.describe()} (kernel {mop.kernel}, padding {pad}, dilation {dil}) has no tap "
                                f"that reads the input position of its output: an identity cannot be merged")
                offs.append(t)
            c = mop.out_channels
            a = torch.ones(c, dtype=f64) if br.a is None else br.a
            b = None if br.b is None else br.b
            if a.numel() != c:
                return Fail(f"'{br.core.name}' has {a.numel()} channels, {mop.describe()} {c}")
            embedded.append(Embedded(None, tuple(offs), b, a))
        return Plan(main, group, embedded)

    def rewrite(self, ctx: PassContext, m: Sum, plan: Plan) -> list[Change]:
        mop = plan.main.op
        assert mop is not None
        w, b = embed_branches(tuple(mop.weight.shape), plan.embedded)
        sources = tuple(s for br in plan.group if br is not plan.main for s in br.sources)
        folded = tuple(mop.node.meta.get(FOLDED_KEY, ())) + sources
        where = replace_params(ctx, mop, w, b)
        mop.node.meta[FOLDED_KEY] = folded
        # the sum's value: the kept conv, plus whatever operands were not merged
        value: torch.fx.Node = mop.node
        add = aten.add.Tensor if isinstance(m.node.target, torch._ops.OpOverload) else operator.add
        for other in [br.arg for br in m.branches if br not in plan.group] + m.others:
            value = ctx.call(add, (value, other), before=m.node, like=m.node, origin=m.node)
        ctx.replace_all_uses(m.node, value)
        dead = [*m.inner, *(n for br in plan.group if br is not plan.main
                            for n in (*br.chain, *([br.core] if br.core is not br.x else [])))]
        dead += plan.main.chain
        _reroute_metadata_uses(ctx, dead, mop.node)
        while dead:  # users before what they read, whatever order the tree was walked in
            left = [n for n in dead if ctx.is_live(n) and n.users]
            for n in dead:
                if ctx.is_live(n) and not n.users:
                    ctx.erase(n)
            if len(left) == len(dead):
                break
            dead = left
        what = ", ".join(br.describe() for br in plan.group if br is not plan.main)
        return [self.change(m.node, f"merged {what} into {mop.describe()} (structural re-parameterization: one "
                                    f"conv instead of {len(plan.group)} branches)", sources, into=where)]
