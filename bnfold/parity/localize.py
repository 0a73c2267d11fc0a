"""Localization: name the first node of a GraphModule candidate whose output diverges from the reference.

How nodes correspond
--------------------
Folding deletes nodes (the BatchNorms), adds a few (a leftover shift, a lowered multiply-add) and gives
conv/linear nodes new parameters, but it never renames a node that survives: the candidate is the reference's
graph, edited. So a candidate node *corresponds* to the reference node **of the same name, op and target**
(for ``call_module``, the same module class); a reference captured the same way (``symbolic`` or ``export``)
has the same names. Nodes without a counterpart (new ones) are not compared.

Both graphs run under ``torch.fx.Interpreter`` on one batch (a float64 copy of the reference too), with
``torch.export``'s ``_guards_fn`` skipped so a shorter batch runs. Every corresponding tensor is judged, in
topological order of the candidate, with the float64-reference rule of :mod:`bnfold.parity` per node
(``rmse(c, t) ≤ m·rmse(r, t) + f·rms(t)``; ``m`` twice the output multiplier, because a single node sees less
averaging). A node's status is:

``exact``
    ``c`` equals the reference value ``r`` — or the value of a reference node that follows ``r`` through a
    chain of single-input ops with constant operands (a BatchNorm, ``x·s + t``): a conv that absorbed the
    BatchNorm after it equals that BatchNorm's output.
``affine``
    ``c = a ⊙ r + b`` for some per-channel ``a``, ``b`` (least squares along axis 1 or the last axis; the
    residual divided by ``|a|`` obeys the same rule). Allowed only where a fold can legitimately leave such a
    difference: the node's own parameters changed (a conv that absorbed a normalization), or one of its
    inputs is not ``exact`` (an affine moved across it by propagation).
``diverged``
    neither. A node whose op, parameters and inputs all equal the reference's must compute the same value,
    so a training-mode BatchNorm or a corrupted weight is named right where it acts.

The report names the first diverged node, its metrics, and the ``suspects``: the uncompared or only
``affine``-equal nodes between it and the last ``exact`` values feeding it. The ``culprit`` is the node itself
when there are none (its inputs agree, its computation does not), or the single suspect when there is one (a
conv whose filter was scaled agrees "up to an affine", and the ReLU after it is where that shows).
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from bnfold.ir.graph import fetch_attr, module_path
from bnfold.ir.linear_ops import match_linear_op
from bnfold.parity.inputs import Batch
from bnfold.parity.tolerance import Tolerance
from bnfold.report import json_safe

__all__ = ["Localization", "NodeParity", "localize", "reference_graph"]

log = logging.getLogger(__name__)

_CHAIN_LIMIT = 6
_SKIPPED_MODULES = {"_guards_fn"}


@dataclass
class NodeParity:
    """One compared node. ``matched`` is the reference node it was found equal to (itself or a successor)."""

    node: str
    reference_node: str
    op: str
    module_path: str
    shape: list[int]
    status: str
    matched: str | None
    params_changed: bool
    training_mode: bool
    max_abs: float
    cosine: float
    sqnr_db: float
    rel_rmse: float
    rmse_vs_fp64: float | None
    reference_rmse_vs_fp64: float | None
    bound: float | None


@dataclass
class Localization:
    """Where a failing candidate first diverges. ``node`` is ``None`` when no compared node diverged."""

    node: str | None = None
    reference_node: str | None = None
    op: str | None = None
    module_path: str | None = None
    metrics: NodeParity | None = None
    suspects: list[str] = field(default_factory=list)
    culprit: str | None = None
    culprit_module_path: str | None = None
    candidate_nodes: int = 0
    compared: int = 0
    exact: int = 0
    affine: int = 0
    diverged: int = 0
    samples: int = 0
    reference_capture: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return json_safe(d)

    def render(self) -> str:
        counts = (f"compared {self.compared} of {self.candidate_nodes} candidate nodes: {self.exact} exact, "
                  f"{self.affine} equal up to a per-channel affine, {self.diverged} diverged")
        if self.node is None or self.metrics is None:
            return "\n".join([f"localization: no compared node diverges ({counts})"]
                             + [f"  note: {n}" for n in self.notes])
        m = self.metrics
        where = f"'{self.node}' ({self.op}" + (f" at {self.module_path}" if self.module_path else "") + ")"
        rule = (f"rmse vs fp64 {m.rmse_vs_fp64:.3g} > bound {m.bound:.3g}" if m.bound is not None
                else f"rel rmse {m.rel_rmse:.3g}")
        lines = [f"first divergence: node {where}: max abs {m.max_abs:.3g}, cosine {m.cosine:.6f}, "
                 f"SQNR {m.sqnr_db:.1f} dB, {rule}"]
        if self.suspects:
            lines.append(f"  computed from nodes that could not be checked exactly: {', '.join(self.suspects)}")
            if self.culprit is not None:
                lines.append(f"  likely cause: '{self.culprit}' (at {self.culprit_module_path}), the only one of them")
        else:
            why = (" (its module is in training mode, the reference's is not)" if m.training_mode
                   else " (its parameters differ from the reference's)" if m.params_changed else "")
            lines.append(f"  its inputs agree with the reference: this node itself computes differently{why}")
        lines.append(f"  {counts}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# running a graph and keeping some values


class _Recorder(torch.fx.Interpreter):
    """Runs a GraphModule node by node; keeps (clones of) the tensors of ``keep``; calls ``visit`` on every
    node's value as it is produced (before any later in-place op can change it)."""

    def __init__(self, gm: torch.fx.GraphModule, keep: set[str] | None = None, visit: Any = None) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.keep = keep or set()
        self.visit = visit
        self.values: dict[str, torch.Tensor] = {}

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in _SKIPPED_MODULES:
            return None
        return super().call_module(target, args, kwargs)

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            if n.name in self.keep:
                self.values[n.name] = out.detach().clone()
            if self.visit is not None:
                self.visit(n, out.detach())
        return out


def _run(gm: torch.fx.GraphModule, batch: Batch, keep: set[str] | None = None, visit: Any = None
         ) -> dict[str, torch.Tensor]:
    rec = _Recorder(gm, keep, visit)
    with torch.no_grad():
        rec.run(*batch)
    return rec.values


# ---------------------------------------------------------------------------------------------------------------
# correspondence


def _same_kind(gc: torch.fx.GraphModule, c: torch.fx.Node, gr: torch.fx.GraphModule, r: torch.fx.Node) -> bool:
    if c.op != r.op:
        return False
    if c.op == "call_module":
        try:
            return type(fetch_attr(gc, str(c.target))) is type(fetch_attr(gr, str(r.target)))
        except AttributeError:
            return False
    return c.op == "placeholder" or c.target == r.target


def _constants(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[torch.Tensor]:
    """The parameters a node computes with: its module's own tensors, or the constants among its inputs."""
    if node.op == "call_module":
        m = fetch_attr(gm, str(node.target))
        return [t for _, t in sorted(m.state_dict().items())] if isinstance(m, nn.Module) else []
    out = []
    for a in node.all_input_nodes:
        if a.op == "get_attr":
            v = fetch_attr(gm, str(a.target))
            if isinstance(v, torch.Tensor):
                out.append(v)
    return out


def _params_changed(gc: torch.fx.GraphModule, c: torch.fx.Node, gr: torch.fx.GraphModule,
                    r: torch.fx.Node) -> bool:
    pc, pr = _constants(gc, c), _constants(gr, r)
    if len(pc) != len(pr):
        return True
    return any(a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a.detach().cpu(), b.detach().cpu())
               for a, b in zip(pc, pr, strict=True))


def _training_mismatch(gc: torch.fx.GraphModule, c: torch.fx.Node, gr: torch.fx.GraphModule,
                       r: torch.fx.Node) -> bool:
    if c.op != "call_module":
        return False
    mc, mr = fetch_attr(gc, str(c.target)), fetch_attr(gr, str(r.target))
    return bool(getattr(mc, "training", False)) and not bool(getattr(mr, "training", False))


def _exact(a: torch.fx.Node, pairs: dict[str, torch.fx.Node], status: dict[str, str], gc: torch.fx.GraphModule,
           gr: torch.fx.GraphModule, depth: int = 0) -> bool:
    """Is input ``a`` known to equal the reference? Non-tensor nodes (an aten batch norm's tuple) count as
    exact when they correspond, compute with the same parameters and mode, and their own inputs are exact."""
    if a.op == "get_attr":
        return True
    if a.name in status:
        return status[a.name] == "exact"
    r = pairs.get(a.name)
    if r is None or depth > _CHAIN_LIMIT or _params_changed(gc, a, gr, r) or _training_mismatch(gc, a, gr, r):
        return False
    return all(_exact(x, pairs, status, gc, gr, depth + 1) for x in a.all_input_nodes)


def _chain(r: torch.fx.Node) -> Iterator[torch.fx.Node]:
    """Reference nodes that follow ``r`` through single-input ops with constant operands (BN, ``x·s + t``):
    the values a candidate node may equal once it absorbed them. Tuple-valued ops continue at ``[0]``."""
    cur = r
    for _ in range(_CHAIN_LIMIT):
        users = list(cur.users)
        if len(users) != 1:
            return
        u = users[0]
        if u.op not in ("call_module", "call_function", "call_method"):
            return
        if [a for a in u.all_input_nodes if a.op != "get_attr"] != [cur]:
            return
        first = next((g for g in u.users if g.target is operator.getitem and g.args[1] == 0), None)
        if first is not None:  # aten batch norm returns (out, mean, rstd)
            u = first
        yield u
        cur = u


def _capture(model: nn.Module, batch: Batch, mode: str) -> torch.fx.GraphModule:
    """Capture as :func:`bnfold.capture.capture` does (same tracer, same export call, so the same node names),
    without its shape propagation, which localization does not need."""
    model = copy.deepcopy(model)
    if mode == "symbolic":
        from bnfold.capture import symbolic_trace

        return symbolic_trace(model, tuple(batch)).module
    gm = torch.export.export(model, tuple(batch), strict=False).module()
    assert isinstance(gm, torch.fx.GraphModule)
    return gm


def reference_graph(reference: nn.Module, candidate: torch.fx.GraphModule, batch: Batch
                    ) -> tuple[torch.fx.GraphModule, str]:
    """``reference`` as a GraphModule whose node names line up with ``candidate``'s: itself when it is one,
    else captured like the candidate was (``call_module`` nodes → symbolic tracing, else ``torch.export``);
    the capture that matches more candidate nodes wins."""
    if isinstance(reference, torch.fx.GraphModule):
        return reference, "given"
    symbolic = any(n.op == "call_module" and n.target not in _SKIPPED_MODULES for n in candidate.graph.nodes)
    order = ["symbolic", "export"] if symbolic else ["export", "symbolic"]
    best: tuple[int, torch.fx.GraphModule, str] | None = None
    names = {n.name for n in candidate.graph.nodes}
    for mode in order:
        try:
            gm = _capture(reference, batch, mode)
        except Exception as exc:
            log.debug("capturing the reference by %s failed: %s", mode, exc)
            continue
        score = sum(n.name in names for n in gm.graph.nodes if n.op not in ("get_attr", "output"))
        if best is None or score > best[0]:
            best = (score, gm, mode)
        if score >= 0.5 * len(names):
            break
    if best is None:
        raise RuntimeError("the reference could not be captured as a graph to compare node by node")
    return best[1], best[2]


# ---------------------------------------------------------------------------------------------------------------
# judging one node


@dataclass
class _Rule:
    multiplier: float
    floor: float
    rel: float


def _fit_affine(c: torch.Tensor, r: torch.Tensor, axis: int) -> torch.Tensor | None:
    """Per-channel least-squares ``c ≈ a·r + b`` along ``axis``; returns the residual divided by ``|a|``
    (in reference units), or ``None`` when the axis has too few elements per channel to tell."""
    cm = c.movedim(axis, 0).reshape(c.shape[axis], -1)
    rm = r.movedim(axis, 0).reshape(r.shape[axis], -1)
    if cm.shape[1] < 3:
        return None
    rc, cc = rm - rm.mean(1, keepdim=True), cm - cm.mean(1, keepdim=True)
    var = (rc * rc).mean(1, keepdim=True)
    a = torch.where(var > 0, (rc * cc).mean(1, keepdim=True) / var.clamp_min(1e-300), torch.zeros_like(var))
    resid = cc - a * rc
    scale = torch.where(a.abs() > 1e-12, a.abs(), torch.ones_like(a))
    return resid / scale


def _rms(x: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean(x * x))) if x.numel() else 0.0


def _within(err_rms: float, ref_rms_err: float | None, t_rms: float, rel_base: float,
            rule: _Rule) -> tuple[bool, float | None]:
    if ref_rms_err is None:
        return err_rms <= rule.rel * max(rel_base, 1e-30), None
    bound = rule.multiplier * ref_rms_err + rule.floor * t_rms
    return err_rms <= bound, bound


def _judge_node(c: torch.Tensor, r: torch.Tensor, t: torch.Tensor | None, rule: _Rule, allow_affine: bool
                ) -> tuple[str, dict[str, Any]]:
    c, r = c.double().cpu(), r.double().cpu()
    d = c - r
    finite = bool(torch.isfinite(c).all() and torch.isfinite(r).all())
    info: dict[str, Any] = {
        "max_abs": float(d.abs().max()) if d.numel() else 0.0,
        "cosine": float(torch.nn.functional.cosine_similarity(r.flatten(), c.flatten(), dim=0, eps=1e-30)),
        "rel_rmse": _rms(d) / max(_rms(r), 1e-30),
        "rmse_vs_fp64": None, "reference_rmse_vs_fp64": None, "bound": None,
    }
    noise = _rms(d)
    info["sqnr_db"] = math.inf if noise == 0 else 10 * math.log10(max(_rms(r) ** 2, 1e-300) / noise**2)
    if not finite:
        nan_c, nan_r = torch.isnan(c), torch.isnan(r)
        same = bool(torch.equal(nan_c, nan_r) and torch.equal(c[~nan_c], r[~nan_r]))
        return ("exact" if same else "diverged"), info
    tt = None if t is None else t.double().cpu()
    ref_err = None if tt is None else _rms(r - tt)
    cand_err = noise if tt is None else _rms(c - tt)
    t_rms = 0.0 if tt is None else _rms(tt)
    ok, bound = _within(cand_err, ref_err, t_rms, _rms(r), rule)
    info.update(rmse_vs_fp64=None if tt is None else cand_err, reference_rmse_vs_fp64=ref_err, bound=bound)
    if ok:
        return "exact", info
    if allow_affine and c.dim() >= 2:
        for axis in dict.fromkeys((1, c.dim() - 1)):
            resid = _fit_affine(c, r if tt is None else tt, axis)
            if resid is None:
                continue
            err = _rms(resid)
            if tt is None:
                ok, _ = _within(err, None, 0.0, _rms(r), rule)
            else:
                ok, _ = _within(err, ref_err, t_rms, 0.0, rule)
            if ok:
                return "affine", info
    return "diverged", info


# ---------------------------------------------------------------------------------------------------------------
# the walk


def _describe(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        m = fetch_attr(gm, str(node.target))
        return f"{type(m).__name__} module"
    if node.op == "placeholder":
        return "input"
    t = node.target
    return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))


def localize(reference: nn.Module, candidate: torch.fx.GraphModule, batch: Batch, *,
             tolerance: Tolerance | None = None, max_samples: int | None = 8) -> Localization:
    """Compare ``candidate`` with ``reference`` node by node on ``batch`` (its first ``max_samples`` samples
    when the graphs accept a shorter batch) and name the first node whose output diverges (module docstring)."""
    ref_gm, how = reference_graph(reference, candidate, batch)
    short = _shorten(batch, max_samples)
    if short is not batch:
        try:
            return _localize(ref_gm, candidate, short, tolerance, how)
        except Exception as exc:
            log.debug("localizing on %d samples failed (%s); using the whole batch", max_samples, exc)
    return _localize(ref_gm, candidate, batch, tolerance, how)


def _shorten(batch: Batch, max_samples: int | None) -> Batch:
    if max_samples is None:
        return batch
    n = next((t.shape[0] for t in batch if t.dim() > 0), None)
    if n is None or n <= max_samples:
        return batch
    return tuple(t[:max_samples] if t.dim() > 0 and t.shape[0] == n else t for t in batch)


def _localize(ref_gm: torch.fx.GraphModule, cand_gm: torch.fx.GraphModule, batch: Batch,
              tolerance: Tolerance | None, how: str) -> Localization:
    ref_nodes = {n.name: n for n in ref_gm.graph.nodes}
    pairs: dict[str, torch.fx.Node] = {}
    for c in cand_gm.graph.nodes:
        if c.op in ("get_attr", "output"):
            continue
        r = ref_nodes.get(c.name)
        if r is not None and _same_kind(cand_gm, c, ref_gm, r):
            pairs[c.name] = r
    chains = {name: [r.name, *(u.name for u in _chain(r))] for name, r in pairs.items()}
    keep = {n for names in chains.values() for n in names}
    ref_vals = _run(ref_gm, batch, keep)
    notes: list[str] = []
    ref64_vals: dict[str, torch.Tensor] = {}
    try:
        ref64 = copy.deepcopy(ref_gm).to(torch.float64)
        ref64_vals = _run(ref64, tuple(t.double() if t.is_floating_point() else t for t in batch), keep)
    except Exception as exc:
        notes.append(f"no float64 reference per node ({type(exc).__name__}); nodes judged by relative rmse")
    loc = Localization(candidate_nodes=sum(n.op not in ("get_attr", "output") for n in cand_gm.graph.nodes),
                       samples=next((int(t.shape[0]) for t in batch if t.dim() > 0), 0), reference_capture=how)
    status: dict[str, str] = {}
    # a value the graph returns must equal the reference's: no affine may be left to undo after it
    returned = {a for n in cand_gm.graph.nodes if n.op == "output" for a in n.all_input_nodes}

    def visit(node: torch.fx.Node, value: torch.Tensor) -> None:
        r = pairs.get(node.name)
        ins = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if r is None or r.name not in ref_vals:
            status[node.name] = "unknown"
            return
        dtype = ref_vals[r.name].dtype
        tol = tolerance or Tolerance.for_dtype(dtype)
        rule = _Rule(2 * tol.multiplier, tol.relative_floor, 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2)
        changed = _params_changed(cand_gm, node, ref_gm, r)
        allow_affine = node not in returned and (
            (changed and match_linear_op(cand_gm, node) is not None)
            or not all(_exact(a, pairs, status, cand_gm, ref_gm) for a in ins))
        best: tuple[str, dict[str, Any], str] | None = None
        for name in chains[node.name]:
            ref_v = ref_vals.get(name)
            if ref_v is None or tuple(ref_v.shape) != tuple(value.shape):
                continue
            st, info = _judge_node(value, ref_v, ref64_vals.get(name), rule, allow_affine)
            if best is None or (_rank(st), info["rel_rmse"]) < (_rank(best[0]), best[1]["rel_rmse"]):
                best = (st, info, name)  # for a diverged node: the closest of the values it could equal
            if st == "exact":
                break
        if best is None:
            status[node.name] = "unknown"
            return
        st, info, matched = best
        status[node.name] = st
        loc.compared += 1
        setattr(loc, st, getattr(loc, st) + 1)
        if st == "diverged" and loc.node is None:
            loc.node, loc.reference_node = node.name, r.name
            loc.op, loc.module_path = _describe(cand_gm, node), module_path(node)
            loc.metrics = NodeParity(node.name, r.name, loc.op, loc.module_path, list(value.shape), st,
                                     matched, changed, _training_mismatch(cand_gm, node, ref_gm, r), **info)
            suspects = _suspects(node, status)
            loc.suspects = [n.name for n in suspects]
            culprit = node if not suspects else suspects[0] if len(suspects) == 1 else None
            if culprit is not None:
                loc.culprit, loc.culprit_module_path = culprit.name, module_path(culprit)

    _run(cand_gm, batch, visit=visit)
    if loc.node is None:
        notes.append("no compared node diverges: the difference arises in nodes without a counterpart in the "
                     "reference, or only in samples outside the localized batch")
    loc.notes = notes
    return loc


def _rank(status: str) -> int:
    return {"exact": 0, "affine": 1, "diverged": 2}[status]


def _suspects(node: torch.fx.Node, status: dict[str, str]) -> list[torch.fx.Node]:
    """Computing nodes feeding ``node`` back to the nearest ``exact`` values, in graph order."""
    seen: set[str] = set()
    order: list[torch.fx.Node] = []
    stack = [a for a in node.all_input_nodes]
    while stack:
        n = stack.pop()
        if n.name in seen or n.op in ("get_attr", "placeholder") or status.get(n.name) == "exact":
            continue
        seen.add(n.name)
        if n.op.startswith("call_"):
            order.append(n)
        stack.extend(n.all_input_nodes)
    pos = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(order, key=lambda n: pos[n])
