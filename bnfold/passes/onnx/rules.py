"""The fold rules on an ONNX graph — the rule table of :mod:`bnfold.passes` (same names, same reasons, same
float64 math from :mod:`bnfold.ir.affine_math`), with :class:`~bnfold.passes.onnx.graph.OnnxGraph` as the back
end. Each rule is ``check`` (a plan, or the reason it cannot apply) then ``rewrite``.

``fold_into_producer``  ``A(op(x)) → op'(x)``: a BatchNormalization whose input is the only output reader of a Conv /
    ConvTranspose (grouped: weight ``(I, O/g, k…)``) / Gemm / MatMul(+Add)::

        W'[o] = a[o] · W[o],   b'[o] = a[o] · b[o] + b_A[o]     (conv-transpose: W'[i, j] = a[g(i)·O_g + j] · W[i, j])

    The BatchNormalization disappears; the producer takes over its output name (graph outputs keep their names).

``fold_into_consumer``  ``op(A(x)) → op'(x)``: every reader of the affine's output is a Conv / Gemm / MatMul
    reading it as its input, on its input-channel axis::

        linear:  W'[:, i] = W[:, i] · a[i],   b' = b + W · b_A
        conv:    W'[o, i] = W[o, i] · a[g(o)·I_g + i],   b'[o] = b[o] + Σ_{i,k} W[o, i, k] · b_A[g(o)·I_g + i]

    A conv that reads zero padding (or a conv-transpose) takes only the scale; the BatchNormalization becomes the
    pure shift ``a ⊙ x + b = a ⊙ (x + b/a)``: one ``Add`` in front of it (reported as such).

``propagate``  neither fits where it is: move the affine exactly — the torch back end's mechanism
    (:mod:`bnfold.passes.onnx.moves` → :mod:`bnfold.passes.commute`), in its words —

    * back (:func:`pull_back`): through Flatten / Reshape / Transpose / Squeeze / Unsqueeze / Slice / Gather /
      pools / Relu / Identity / Dropout, and channel Concats (``(a, b)`` split per input), into every conv/linear
      producer it reaches, each branch read only along that path (``Shape`` readers aside);
    * forward (:func:`forward_targets`): along a single-reader chain of the same ops and channel Concats (identity
      coefficients for the other inputs) to conv/linear consumers, folded as above.

``split_norm_affine``  the affine part ``(γ, β)`` of a LayerNormalization / RMSNormalization / GroupNormalization
    folds into its consumers as above when it folds completely (no consumer blocks the shift); the norm stays with
    ``γ = 1`` and no ``β``. Otherwise the norm is left whole and the report says why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from bnfold.ir import reasons
from bnfold.ir.affine_math import fold_into_consumer, fold_into_producer
from bnfold.passes.commute import Affine
from bnfold.passes.engine import Candidate, Category, Change, PassTiming, Rejection
from bnfold.passes.onnx.graph import OnnxGraph
from bnfold.passes.onnx.moves import SYMBOL_SIZES, concat_backward, concat_forward_onnx, concrete_shape, crossing
from bnfold.passes.onnx.ops import NotFoldable, OnnxLinearOp, match_linear_op, write_linear_op
from bnfold.passes.onnx.shapes import rank, shape
from bnfold.passes.onnx.sites import Site, find_site

__all__ = ["RULES", "OnnxFoldRun", "run_rules"]

PRODUCER, CONSUMER, SPLIT, CANONICALIZE = "fold_into_producer", "fold_into_consumer", "split_norm_affine", \
    "canonicalize"
PROPAGATE = "propagate"
RULES = (CANONICALIZE, SPLIT, PRODUCER, CONSUMER, PROPAGATE)
MAX_MOVE = 16


@dataclass
class OnnxFoldRun:
    """What :func:`run_rules` did, in the engine's types (the report is built from it as for torch)."""

    rounds: int = 0
    changes: list[Change] = field(default_factory=list)
    rejections: dict[str, list[Rejection]] = field(default_factory=dict)
    candidates: dict[str, Candidate] = field(default_factory=dict)
    timings: dict[str, PassTiming] = field(default_factory=dict)

    def time(self, rule: str, seconds: float, changed: bool) -> None:
        t = self.timings.setdefault(rule, PassTiming(rule))
        t.runs += 1
        t.seconds += seconds
        t.nodes += 1
        t.changes += int(changed)


# -- where an affine can fold --------------------------------------------------------------------------------------

def _linear(g: OnnxGraph, node: onnx.NodeProto) -> OnnxLinearOp | NotFoldable | None:
    op = match_linear_op(g, node)
    if op is None and node.op_type == "Add":  # the Add of a MatMul(+Add) pair
        for v in node.input:
            p = g.producer(v)
            if p is not None and p.op_type == "MatMul":
                mm = match_linear_op(g, p)
                if isinstance(mm, OnnxLinearOp) and mm.add is node:
                    return mm
    return op


def _norm_axis(axis: int, r: int | None) -> int | None:
    return axis if axis >= 0 else (None if r is None else axis + r)


def _axis_fits(op_axis: int, axis: int, r: int | None) -> bool | None:
    """Does an affine on ``axis`` of a rank-``r`` value sit on the op's channel axis ``op_axis`` (1 or −1)?
    None when it depends on an unknown rank."""
    if op_axis == -1:
        if axis == -1:
            return True
        return None if r is None else axis == r - 1
    if op_axis == 0:
        return axis == 0 or (r is not None and axis == -r)
    if axis == 1:
        return True
    return None if r is None else _norm_axis(axis, r) == 1


def producer_target(g: OnnxGraph, site: Site) -> OnnxLinearOp | str:
    """The conv/linear ``site`` folds into as its producer, or why there is none."""
    assert site.a is not None
    p = g.producer(site.x)
    if p is None:
        return reasons.not_a_linear_output("a graph input" if site.x in g.inputs else f"the constant '{site.x}'")
    op = _linear(g, p)
    if op is None:
        return reasons.not_a_linear_output(f"'{p.name or p.output[0]}' ({p.op_type})")
    if isinstance(op, NotFoldable):
        return reasons.unusable("producer", op.node.name or op.node.output[0], op.reason)
    if op.output != site.x:
        return reasons.not_a_linear_output(f"'{p.name}' ({p.op_type})")
    if g.readers(site.x) > 1:
        others = [u.name or u.output[0] for u in g.users(site.x) if u is not site.node]
        if site.x in g.outputs:
            others.append("a graph output")
        return reasons.producer_shared(op.describe(), ", ".join(f"'{o}'" for o in others))
    fits = _axis_fits(op.out_axis, site.axis, rank(g, site.x))
    if fits is None:
        return f"the rank of its input is unknown, so its axis cannot be matched with {op.describe()}"
    if not fits:
        return reasons.producer_axis(site.axis, op.describe())
    if site.a.numel() != op.out_channels:
        return reasons.producer_channels(site.a.numel(), op.describe(), op.out_channels)
    return op


@dataclass
class Moved:
    """The affine ``(a, b)`` on ``axis`` of ``value`` after a forward move (``through``: the ops moved through,
    empty when the consumers read the site's output directly), and the consumers ``ops`` that take it."""

    value: str
    a: torch.Tensor
    b: torch.Tensor
    axis: int
    rank: int | None
    through: list[str] = field(default_factory=list)
    ops: list[OnnxLinearOp] = field(default_factory=list)


def consumer_targets(g: OnnxGraph, value: str, axis: int, r: int | None, channels: int
                     ) -> list[OnnxLinearOp] | str:
    """The conv/linear readers of ``value``, reading it as their input on their input-channel axis, or why not all
    of its readers are."""
    users = g.users(value)
    if not users and value not in g.outputs:
        return "its output is unused"
    if value in g.outputs:
        return f"its output '{value}' is a graph output"
    if g.sub_reads[value]:
        return f"its output '{value}' is read inside a sub-graph"
    ops: list[OnnxLinearOp] = []
    for u in users:
        op = match_linear_op(g, u)
        if op is None:
            return reasons.consumer_not_linear(u.name or u.output[0], u.op_type)
        if isinstance(op, NotFoldable):
            return reasons.unusable("consumer", u.name or u.output[0], op.reason)
        if op.input != value or sum(1 for i in u.input if i == value) != 1:
            return reasons.consumer_other_argument(op.describe())
        fits = _axis_fits(op.in_axis, axis, r)
        if fits is None:
            return f"its rank is unknown, so its axis cannot be matched with {op.describe()}"
        if not fits:
            return reasons.consumer_axis(axis, op.describe())
        if channels != op.in_channels:
            return reasons.consumer_channels(channels, op.describe(), op.in_channels)
        ops.append(op)
    return ops


def shift_blocked(ops: list[OnnxLinearOp], shift: torch.Tensor) -> list[OnnxLinearOp]:
    """Consumers that cannot absorb ``shift`` exactly: a conv reading zero padding, or a conv-transpose."""
    if not bool((shift != 0).any()):
        return []
    return [op for op in ops if op.reads_padding_zeros()]


def start_affine(g: OnnxGraph, value: str, a: torch.Tensor, b: torch.Tensor, axis: int) -> Affine | str:
    """``(a, b)`` on ``axis`` of ``value`` as an :class:`~bnfold.passes.commute.Affine` on its shape (symbols set
    as :mod:`~bnfold.passes.onnx.moves` does), or why its shape is not known well enough to move it."""
    s, s3 = (concrete_shape(g, value, v) for v in SYMBOL_SIZES)
    if s is None or s3 is None:
        return "the shape of its input is unknown"
    ax = _norm_axis(axis, len(s))
    if ax is None or not 0 <= ax < len(s) or s[ax] != a.numel() or s3[ax] != a.numel():
        return "its channel axis has a size known only at run time"
    return Affine(a, b, ax, s)


def _label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def forward_targets(g: OnnxGraph, site: Site, a: torch.Tensor, b: torch.Tensor, *, moves: bool
                    ) -> Moved | str:
    """Consumers of ``site``'s affine: its readers, or (``moves``) the readers at the end of a single-reader
    chain of ops it moves through exactly (:func:`~bnfold.passes.onnx.moves.crossing`, channel concats)."""
    r = rank(g, site.x)
    direct = consumer_targets(g, site.y, site.axis, r, a.numel())
    if not isinstance(direct, str):
        return Moved(site.y, a, b, site.axis, r, ops=direct)
    if not moves:
        return direct
    aff = start_affine(g, site.x, a, b, site.axis)
    if isinstance(aff, str):
        return aff
    value, through = site.y, []
    for _ in range(MAX_MOVE):
        users = g.value_users(value)
        if len(users) != 1 or g.value_readers(value) != 1:
            p = g.producer(value)
            return f"'{value if p is None else _label(p)}' has {g.value_readers(value)} users"
        user = users[0]
        if user.op_type == "Concat" and user.domain in ("", "ai.onnx"):
            nxt: Affine | str = concat_forward_onnx(g, user, value, aff)
        else:
            c = crossing(g, user)
            if isinstance(c, str):
                return c
            nxt = c.forward(aff)
        if isinstance(nxt, str):
            return f"through '{_label(user)}': {nxt}"
        value, aff = user.output[0], nxt
        through.append(f"{user.op_type} '{_label(user)}'")
        ops = consumer_targets(g, value, aff.axis, len(aff.shape), aff.a.numel())
        if not isinstance(ops, str):
            return Moved(value, aff.a, aff.b, aff.axis, len(aff.shape), through, ops)
    return "no conv/linear consumer within reach"


@dataclass
class Pulled:
    """Where an affine lands after a backward move: one ``(producer, affine on its output)`` per branch."""

    targets: list[tuple[OnnxLinearOp, Affine]]
    through: list[str]


def pull_back(g: OnnxGraph, value: str, aff: Affine, depth: int = 0) -> Pulled | str:
    """Move ``aff`` (on ``value``) back through commuting ops (:func:`~bnfold.passes.onnx.moves.crossing`) and
    channel concats (split per input) until every branch ends at a conv/linear whose output only that path reads
    (the torch back end's ``propagate`` pull, in the same words), or say why not."""
    p = g.producer(value)
    if p is None:
        return f"'{value}' is not a foldable conv/linear"
    name = _label(p)
    op = _linear(g, p)
    if isinstance(op, OnnxLinearOp) and op.output == value:
        if g.value_readers(value) > 1:
            return f"{op.describe()} has other users"
        if not _axis_fits(op.out_axis, aff.axis, len(aff.shape)) or aff.a.numel() != op.out_channels:
            return f"{op.describe()} has its channels on another axis"
        return Pulled([(op, aff)], [])
    if isinstance(op, NotFoldable):
        return reasons.unusable("producer", name, op.reason)
    if g.value_readers(value) > 1:
        return f"'{name}' has other users"
    if depth >= MAX_MOVE:
        return "no conv/linear producer within reach"
    if p.op_type == "Concat" and p.domain in ("", "ai.onnx"):
        if len(set(p.input)) != len(p.input):
            return f"'{name}' concatenates the same tensor twice"
        parts = concat_backward(g, p, aff)
        if isinstance(parts, str):
            return parts
        pulled = Pulled([], [f"Concat '{name}'"])
        for i, part in zip(p.input, parts, strict=True):
            got = pull_back(g, i, part, depth + 1)
            if isinstance(got, str):
                return got
            pulled.targets += got.targets
            pulled.through += got.through
        return pulled
    c = crossing(g, p)
    if isinstance(c, str):
        return c
    inner = c.backward(aff)
    if isinstance(inner, str):
        return f"through '{name}': {inner}"
    got = pull_back(g, c.x, inner, depth + 1)
    if isinstance(got, str):
        return got
    return Pulled(got.targets, [f"{p.op_type} '{name}'", *got.through])


# -- rewrites ------------------------------------------------------------------------------------------------------

def _fold_consumers(g: OnnxGraph, moved: Moved, scale_only: bool) -> list[str]:
    where = []
    for op in moved.ops:
        w, b = fold_into_consumer(op.weight, op.bias, moved.a, None if scale_only else moved.b, kind=op.kind,
                                  groups=op.groups)
        where.append(write_linear_op(g, op, w, b))
    return where


def _bypass(g: OnnxGraph, site: Site, moved: Moved) -> None:
    """Remove the BatchNormalization: whatever read its output reads its input."""
    for u in list(g.users(site.y)):
        g.replace_input(u, site.y, site.x)
    g.orphans.update(i for i in site.node.input[1:] if i)
    g.remove_node(site.node)


def _to_shift(g: OnnxGraph, site: Site, shift: torch.Tensor, r: int, dtype: np.dtype) -> None:
    """Turn the BatchNormalization into ``Add(x, shift)`` with ``shift`` shaped ``(C, 1, …)`` (same node name and
    output)."""
    node = site.node
    g.orphans.update(i for i in node.input[1:] if i)
    for i in node.input[1:]:
        if i:
            g.consumers[i] = [u for u in g.consumers.get(i, []) if u is not node]
    value = shift.reshape(-1, *([1] * (r - 2))).numpy().astype(dtype)
    name = g.fresh(f"{node.name or node.output[0]}_shift")
    g.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    g.initializers[name] = g.graph.initializer[-1]
    del node.input[1:]
    node.input.append(name)
    g.consumers.setdefault(name, []).append(node)
    del node.attribute[:]
    node.op_type = "Add"


def _reset_norm(g: OnnxGraph, site: Site) -> None:
    """``γ = 1``, ``β = 0``: the norm keeps only its parameter-free part. ``β`` is dropped where the op allows it
    (LayerNormalization, RMSNormalization) and written as zeros where it is a required input
    (GroupNormalization)."""
    node = site.node
    old = g.constant(node.input[1])
    assert old is not None and site.dtype is not None
    g.orphans.update(i for i in node.input[1:] if i)
    g.write_input(node, 1, np.ones(old.shape, dtype=site.dtype))
    if len(node.input) > 2 and node.input[2]:
        if node.op_type == "GroupNormalization":
            beta = g.constant(node.input[2])
            assert beta is not None
            g.write_input(node, 2, np.zeros(beta.shape, dtype=site.dtype))
        else:
            g.consumers[node.input[2]] = [u for u in g.consumers.get(node.input[2], []) if u is not node]
            del node.input[2:]


def _try_producer(g: OnnxGraph, site: Site, run: OnnxFoldRun) -> str | None:
    assert site.a is not None and site.b is not None
    op = producer_target(g, site)
    if isinstance(op, str):
        return op
    w, b = fold_into_producer(op.weight, op.bias, site.a, site.b, kind=op.kind, groups=op.groups)
    where = write_linear_op(g, op, w, b)
    g.orphans.update(i for i in site.node.input[1:] if i)
    g.remove_node(site.node, keep_value_info=True)
    producer = g.producer(site.x)
    assert producer is not None
    g.rename_output(producer, site.x, site.y)  # the producer takes over the BatchNorm's output name
    run.changes.append(Change(PRODUCER, site.id, f"folded into {where}", Category.FOLD, site.sources, where))
    return None


def _try_back(g: OnnxGraph, site: Site, run: OnnxFoldRun) -> str | None:
    """Move the BatchNormalization back (:func:`pull_back`) into the conv/linear producers it reaches; the op
    that wrote its input takes over its output name."""
    assert site.a is not None and site.b is not None
    aff = start_affine(g, site.x, site.a, site.b, site.axis)
    if isinstance(aff, str):
        return aff
    pulled = pull_back(g, site.x, aff)
    if isinstance(pulled, str):
        return pulled
    where = []
    for op, part in pulled.targets:
        w, b = fold_into_producer(op.weight, op.bias, part.a, part.b, kind=op.kind, groups=op.groups)
        where.append(write_linear_op(g, op, w, b))
    g.orphans.update(i for i in site.node.input[1:] if i)
    g.remove_node(site.node, keep_value_info=True)
    last = g.producer(site.x)
    assert last is not None
    g.rename_output(last, site.x, site.y)
    for u in list(g.users(site.x)):  # shape-only readers of the input (Shape, Size) read the same shape
        g.replace_input(u, site.x, site.y)
    run.changes.append(Change(PROPAGATE, site.id, f"moved back through {', '.join(pulled.through)} onto "
                              f"{', '.join(where)}", Category.MOVE, site.sources))
    for w in where:
        run.changes.append(Change(PRODUCER, site.id, f"folded into {w} (moved back through "
                                  f"{', '.join(pulled.through)})", Category.FOLD, site.sources, w))
    return None


def _direct_consumers(g: OnnxGraph, site: Site) -> bool:
    assert site.a is not None
    return not isinstance(consumer_targets(g, site.y, site.axis, rank(g, site.x), site.a.numel()), str)


def _try_consumer(g: OnnxGraph, site: Site, run: OnnxFoldRun, *, moves: bool = True) -> str | None:
    assert site.a is not None and site.b is not None
    if site.groups:  # a per-group GroupNorm affine: its channel count comes from the consumer / the shape
        s = shape(g, site.x)
        c = s[1] if s is not None and len(s) > 1 and isinstance(s[1], int) else None
        if c is None:
            users = [match_linear_op(g, u) for u in g.users(site.y)]
            c = next((u.in_channels for u in users if isinstance(u, OnnxLinearOp)), None)
        if c is None:
            return "its channel count is unknown"
        per = site.per_channel(c)
        if isinstance(per, str):
            return per
        a, b = per
    else:
        a, b = site.a, site.b
    moved = forward_targets(g, site, a, b, moves=moves)
    if isinstance(moved, str):
        return moved
    blocked = shift_blocked(moved.ops, moved.b)
    if blocked and site.norm:
        return "its affine stays in the norm: a consumer conv pads with zeros, so the shift could not fold"
    if blocked and (bool((a == 1).all()) or bool((a == 0).any())):
        return reasons.shift_blocked(blocked[0].describe(), a)
    r = rank(g, site.x)
    if blocked and r is None:
        r = next((op.weight.dim() for op in moved.ops if op.kind != "linear"), None)
        if r is None:
            return "its input shape is unknown"
    dtype = _storage_dtype(g, site)
    if site.norm:
        run.changes.append(Change(SPLIT, site.id, f"{site.kind.split(' ')[0]} split into norm + affine",
                                  Category.CANONICALIZE, site.sources))
        _reset_norm(g, site)
    elif blocked:
        assert r is not None
        _to_shift(g, site, b / a, r, dtype)
    else:
        _bypass(g, site, moved)
    where = _fold_consumers(g, moved, scale_only=bool(blocked))
    via = f" (moved through {', '.join(moved.through)})" if moved.through else ""
    if moved.through:
        run.changes.append(Change(PROPAGATE, site.id, f"moved forward through {', '.join(moved.through)} to its "
                                  "conv/linear consumers", Category.MOVE, site.sources))
    for w in where:
        detail = f"folded into consumer {w}{via}"
        if blocked:
            detail += " (scale only: it pads with zeros, so the shift stays as one add before it)"
        run.changes.append(Change(CONSUMER, site.id, detail, Category.FOLD, site.sources, w))
    return None


def _storage_dtype(g: OnnxGraph, site: Site) -> np.dtype:
    v = g.constant(site.node.input[1]) if len(site.node.input) > 1 and site.node.input[1] else None
    return v.dtype if v is not None else np.dtype(np.float32)


# -- the driver ----------------------------------------------------------------------------------------------------

def run_rules(g: OnnxGraph, *, max_rounds: int = 20) -> OnnxFoldRun:
    """Apply the rules to every normalization until a round changes nothing; candidates that stay are reported
    with the reason of every rule that declined them."""
    run = OnnxFoldRun()
    for _ in range(max_rounds):
        run.rounds += 1
        changed = False
        for node in list(g.graph.node):
            if not any(n is node for n in g.graph.node):  # removed earlier in this round
                continue
            t0 = time.process_time()
            site = find_site(g, node)
            if site is None:
                continue
            run.time(CANONICALIZE, time.process_time() - t0, False)
            if site.norm and site.problem is None and site.a is not None and site.b is not None \
                    and bool((site.a == 1).all()) and not bool(site.b.any()):
                continue  # no affine part (left so, or folded in an earlier round)
            run.candidates.setdefault(site.id, Candidate(site.id, site.kind, site.id))
            if site.problem is not None:
                run.rejections[site.id] = [Rejection(CANONICALIZE, site.id, site.problem, site.sources)]
                continue
            if not site.norm and (site.a is None or site.a.numel() == 0):
                continue
            declined: list[Rejection] = []
            if not site.norm:
                t0 = time.process_time()
                why = _try_producer(g, site, run)
                run.time(PRODUCER, time.process_time() - t0, why is None)
                if why is None:
                    run.rejections.pop(site.id, None)
                    changed = True
                    continue
                declined.append(Rejection(PRODUCER, site.id, why, site.sources))
            t0 = time.process_time()
            rule = SPLIT if site.norm else CONSUMER
            why = _try_consumer(g, site, run, moves=site.norm)
            run.time(rule, time.process_time() - t0, why is None)
            if why is None:
                run.rejections.pop(site.id, None)
                changed = True
                continue
            if site.norm and not why.startswith("its affine stays"):
                why = f"its affine stays in the norm: {why}"
            declined.append(Rejection(rule, site.id, why, site.sources))
            if not site.norm and not _direct_consumers(g, site):
                t0 = time.process_time()
                back = _try_back(g, site, run)
                fwd = _try_consumer(g, site, run) if back is not None else None
                run.time(PROPAGATE, time.process_time() - t0, back is None or fwd is None)
                if back is None or fwd is None:
                    run.rejections.pop(site.id, None)
                    changed = True
                    continue
                declined.append(Rejection(PROPAGATE, site.id,
                                          f"cannot move it to a conv/linear: backward, {back}; forward, {fwd}",
                                          site.sources))
            run.rejections[site.id] = declined
        if not changed:
            break
    g.drop_unread_initializers(g.orphans)
    return run
