"""Quantization preparation of a folded graph: cross-layer equalization, bias absorption, bias correction.

::

    folded ─► equalize (fixed point) ─► parity: float64 rule vs folded ─► [moments from data] ─► absorb_bias
           ─► correct_bias (ΔW of the int8 weights ONNX Runtime will write) ─► prepared float graph

Each step is a rule of :data:`bnfold.passes.QUANTIZE_PREP`, run through the pass engine like every fold (changes with
a category, rejections with a reason, in :class:`PrepareReport`). Equalization is exact, so its result must pass the
float64-reference parity rule against the folded graph before anything is quantized (:class:`~bnfold.errors.
InternalError` otherwise: a bug). Absorption and correction change the float model on purpose; the report says by
how much (SQNR of the float model after absorption against before).

Statistics. ``bias_correction="bn"`` (data-free): the BatchNorm statistics that preceded the fold
(:mod:`bnfold.ir.moments`), for both the absorbed offsets and the expected inputs. ``"data"``: the moments of every
conv/linear output measured on the calibration batches replace them (absorption), and each layer's output shift
``E[ΔW x]`` is measured directly: the mean over the batches of the layer computed with weight ``ΔW`` and no bias,
on the float model's inputs to that layer (zero-padded borders included).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F

from bnfold.errors import InputError, InternalError
from bnfold.ir.graph import module_path, normalized_kwargs
from bnfold.ir.linear_ops import LinearOp, match_linear_op
from bnfold.ir.moments import Moments, set_moments
from bnfold.ir.quant_math import output_ranges, range_spread
from bnfold.parity import compare, judge
from bnfold.parity.inputs import Batch, run_batches
from bnfold.passes import (
    AbsorbBias,
    CorrectBias,
    DropDeadState,
    Equalize,
    Pass,
    PassContext,
    Pipeline,
    PipelineResult,
)
from bnfold.passes.correct_bias import weight_error
from bnfold.passes.equalize import DEFAULT_TOLERANCE
from bnfold.report import format_table, json_safe

__all__ = ["BiasMode", "PrepareReport", "PrepareResult", "StepReport", "measure_moments", "measure_shifts",
           "prepare", "resolve_bias_mode"]

log = logging.getLogger(__name__)

f64 = torch.float64

BiasMode = Literal["auto", "data", "bn", "none"]


@dataclass
class StepReport:
    """One preparation rule's run: candidates ``changed`` (with how many changes and the last detail), ``unchanged``
    (nothing to do: balanced, no offset) and ``left`` (with the reason)."""

    name: str
    rounds: int
    converged: bool
    seconds: float
    changed: list[dict[str, Any]] = field(default_factory=list)
    unchanged: list[dict[str, Any]] = field(default_factory=list)
    left: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_run(cls, name: str, run: PipelineResult, seconds: float) -> StepReport:
        report = cls(name, run.rounds, run.converged, round(seconds, 3))
        by_source: dict[str, list[Any]] = {}
        for c in run.changes:
            for s in c.sources:
                by_source.setdefault(s, []).append(c)
        reasons = {s: r.reason for r in run.rejections for s in r.sources}
        for cand in run.candidates:
            entry: dict[str, Any] = {"id": cand.id, "path": cand.path}
            if cand.id in by_source:
                changes = by_source[cand.id]
                report.changed.append({**entry, "changes": len(changes), "detail": changes[-1].detail})
            elif cand.id in reasons:
                report.left.append({**entry, "reason": reasons[cand.id]})
            else:
                report.unchanged.append(entry)
        return report

    def summary(self) -> str:
        return (f"{self.name}: {len(self.changed)} changed, {len(self.unchanged)} unchanged, {len(self.left)} left "
                f"({self.rounds} rounds{'' if self.converged else ', NOT converged'}, {self.seconds:.1f} s)")


@dataclass
class PrepareReport:
    """What preparation did. ``spreads``: per conv/linear whose weights changed, the spread ``max r / min r`` of its
    output-channel weight ranges (what one per-tensor int8 scale has to cover) before and after."""

    per_channel: bool
    bias_correction: str
    statistics: str
    steps: list[StepReport] = field(default_factory=list)
    spreads: list[dict[str, Any]] = field(default_factory=list)
    equalize_parity: dict[str, Any] | None = None
    absorb_sqnr_db: float | None = None
    clamps_moved: int = 0  # per-channel minimum/maximum bounds the preparation created (moved ReLU6 clamps)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return json_safe({**asdict(self), "steps": [asdict(s) for s in self.steps]})

    def spread_summary(self) -> dict[str, float] | None:
        if not self.spreads:
            return None
        before = sorted(s["before"] for s in self.spreads)
        after = sorted(s["after"] for s in self.spreads)
        return {"layers": len(before), "median_before": before[len(before) // 2],
                "median_after": after[len(after) // 2], "max_before": before[-1], "max_after": after[-1]}

    def render(self, *, explain: bool = False) -> str:
        lines = [f"quantization preparation ({'per-channel' if self.per_channel else 'per-tensor'} int8 weights; "
                 f"bias correction: {self.bias_correction}; statistics: {self.statistics})"]
        lines += [f"  {s.summary()}" for s in self.steps]
        if self.equalize_parity is not None:
            p = self.equalize_parity
            lines.append(f"  equalization vs folded (float64 rule): {'PASS' if p.get('passed') else 'FAIL'}, rmse vs "
                         f"fp64 {p.get('rmse_vs_fp64', float('nan')):.3g} ≤ {p.get('bound', float('nan')):.3g}")
        if self.absorb_sqnr_db is not None:
            lines.append(f"  float model after bias absorption vs before: SQNR {self.absorb_sqnr_db:.1f} dB")
        if self.clamps_moved:
            lines.append(f"  {self.clamps_moved} clamps (ReLU6) became per-channel: they moved with the scales, "
                         "exactly (--keep-clamps leaves those pairs instead)")
        s = self.spread_summary()
        if s is not None:
            lines.append(f"  weight-range spread (max/min channel range) over {s['layers']} changed layers: median "
                         f"{s['median_before']:.3g} → {s['median_after']:.3g}, max {s['max_before']:.3g} → "
                         f"{s['max_after']:.3g}")
        if explain:
            for step in self.steps:
                if step.left:
                    lines.append("")
                    lines.append(format_table([f"{step.name}: left", "why"],
                                              [[e["path"], e["reason"]] for e in step.left]))
            if self.spreads:
                lines.append("")
                lines.append(format_table(["layer", "spread before", "after"],
                                          [[e["path"], f"{e['before']:.3g}", f"{e['after']:.3g}"]
                                           for e in self.spreads]))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class PrepareResult:
    module: torch.fx.GraphModule
    report: PrepareReport


def resolve_bias_mode(mode: str, have_data: bool) -> str:
    """``auto`` → ``data`` with calibration batches, ``bn`` without; ``data`` without batches is an error."""
    if mode not in ("auto", "data", "bn", "none"):
        raise InputError(f"bias correction {mode!r} is not one of auto, data, bn, none")
    if mode == "auto":
        return "data" if have_data else "bn"
    if mode == "data" and not have_data:
        raise InputError("bias correction from data needs calibration batches", hint="give calibration data, or use "
                                                                                      "'bn' (data-free)")
    return mode


def _linear_ops(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, LinearOp]:
    out = {}
    for n in gm.graph.nodes:
        op = match_linear_op(gm, n)
        if isinstance(op, LinearOp) and op.kind in ("conv", "linear"):
            out[n] = op
    return out


def _ranges(gm: torch.fx.GraphModule) -> dict[str, tuple[str, torch.Tensor]]:
    return {n.name: (module_path(n), output_ranges(op.weight, op.kind)) for n, op in _linear_ops(gm).items()}


def _bounds(gm: torch.fx.GraphModule) -> int:
    """Per-channel ``minimum``/``maximum`` bounds in ``gm`` (what a moved clamp becomes)."""
    return sum(n.op == "call_function" and n.target in (torch.ops.aten.minimum.default, torch.ops.aten.maximum.default)
               for n in gm.graph.nodes)


def _run(gm: torch.fx.GraphModule, passes: Sequence[Pass], name: str, max_rounds: int = 20) -> StepReport:
    start = time.perf_counter()
    ctx = PassContext(gm, owns_state=True)
    run = Pipeline(list(passes), finalize=[DropDeadState()], max_rounds=max_rounds).run(gm, ctx)
    gm.recompile()
    return StepReport.from_run(name, run, time.perf_counter() - start)


class _Recorder(torch.fx.Interpreter):
    """Runs a graph and hands every conv/linear's input and output to ``hook(op, x, y)``."""

    def __init__(self, gm: torch.fx.GraphModule, ops: dict[torch.fx.Node, LinearOp],
                 hook: Callable[[LinearOp, torch.Tensor, torch.Tensor], None]) -> None:
        super().__init__(gm)
        self.ops, self.hook = ops, hook

    def run_node(self, n: torch.fx.Node) -> Any:
        op = self.ops.get(n)
        x = self.env.get(op.input) if op is not None else None  # read before the interpreter frees it
        out = super().run_node(n)
        if op is not None and isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
            self.hook(op, x, out)
        return out


def _channel_sums(y: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    flat = y.detach().movedim(axis, 0).reshape(y.shape[axis], -1).to(f64)
    return flat.sum(1), (flat * flat).sum(1), flat.shape[1]


def _record(gm: torch.fx.GraphModule, batches: Sequence[Batch],
            hook: Callable[[LinearOp, torch.Tensor, torch.Tensor], None]) -> None:
    ops = _linear_ops(gm)
    with torch.no_grad():
        for batch in batches:
            _Recorder(gm, ops, hook).run(*batch)


def measure_moments(gm: torch.fx.GraphModule, batches: Sequence[Batch]) -> int:
    """Set every conv/linear's output :class:`~bnfold.ir.moments.Moments` to those measured on ``batches`` (mean and
    population std per output channel, float64 sums); returns how many layers got them."""
    sums: dict[torch.fx.Node, list[Any]] = {}

    def hook(op: LinearOp, x: torch.Tensor, y: torch.Tensor) -> None:
        s, sq, n = _channel_sums(y, op.channel_axis % y.dim())
        acc = sums.setdefault(op.node, [torch.zeros_like(s), torch.zeros_like(sq), 0])
        acc[0] += s
        acc[1] += sq
        acc[2] += n

    _record(gm, batches, hook)
    for node, (s, sq, n) in sums.items():
        if n:
            mean = s / n
            set_moments(node, Moments(mean, (sq / n - mean * mean).clamp_min(0.0).sqrt()))
    return len(sums)


def _with_weight(gm: torch.fx.GraphModule, op: LinearOp, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``op`` applied to ``x`` with weight ``w`` and no bias (same stride, padding, groups …)."""
    w = w.to(x.dtype)
    if op.kind == "linear":
        return F.linear(x, w)
    if op.module is not None:
        return op.module._conv_forward(x, w, None)  # type: ignore[operator, union-attr]
    kwargs = dict(normalized_kwargs(gm, op.node) or {})
    if not kwargs:
        raise ValueError(f"cannot normalize the arguments of {op.node.format_node()}")
    kwargs.update(input=x, weight=w, bias=None)
    return op.node.target(**kwargs)  # type: ignore[operator]


def measure_shifts(gm: torch.fx.GraphModule, batches: Sequence[Batch], *, per_channel: bool
                   ) -> dict[str, torch.Tensor]:
    """``{node name: E[ΔW x]}`` per output channel over ``batches``: each conv/linear's output computed with its int8
    weight error ``ΔW`` (:func:`~bnfold.passes.correct_bias.weight_error`) and no bias, averaged over samples and
    positions, on the inputs the float graph gives it."""
    errors = {n: weight_error(op, per_channel=per_channel) for n, op in _linear_ops(gm).items()}
    sums: dict[str, list[Any]] = {}

    def hook(op: LinearOp, x: torch.Tensor, y: torch.Tensor) -> None:
        delta = _with_weight(gm, op, x, errors[op.node])
        s, _, n = _channel_sums(delta, op.channel_axis % delta.dim())
        acc = sums.setdefault(op.node.name, [torch.zeros_like(s), 0])
        acc[0] += s
        acc[1] += n

    _record(gm, batches, hook)
    return {name: s / n for name, (s, n) in sums.items() if n}


def _outputs(gm: torch.fx.GraphModule, batches: Sequence[Batch]) -> list[list[torch.Tensor]]:
    with torch.no_grad():
        return run_batches(gm, batches)


def prepare(gm: torch.fx.GraphModule, calibration: Sequence[Batch] | None = None, *, per_channel: bool = True,
            equalize: bool = True, absorb: bool = True, bias_correction: BiasMode = "auto",
            check_batches: Sequence[Batch] | None = None, tolerance: float = DEFAULT_TOLERANCE,
            max_rounds: int = 100, move_clamps: bool = True) -> PrepareResult:
    """Prepare a folded graph for int8 (module docstring); ``gm`` itself is not changed.

    ``calibration``: batches for the data-driven statistics (``bias_correction="data"``, or ``"auto"`` with data);
    ``check_batches``: inputs of the parity check of the equalized graph (default: the first calibration batches).
    ``tolerance``/``max_rounds``: equalization stops when every pair's scales are within ``e^±tolerance`` of 1.
    ``move_clamps=False``: leave pairs across a ReLU6/clamp whose bounds would become per channel (speed in ONNX
    Runtime, which runs a per-channel ``Min`` in float, over range)."""
    calibration = list(calibration or [])
    mode = resolve_bias_mode(bias_correction, bool(calibration))
    checks = list(check_batches or calibration[:4])
    work = copy.deepcopy(gm)
    statistics = "calibration data" if mode == "data" else "BatchNorm statistics (data-free)"
    report = PrepareReport(per_channel, mode, statistics if (absorb or mode != "none") else "none")
    before = _ranges(work)
    if equalize:
        report.steps.append(_run(work, [Equalize(tolerance, move_clamps=move_clamps)], "equalize", max_rounds))
        if checks:
            parity = compare(gm, work, checks, batch_independence=False)
            report.equalize_parity = parity.summary()
            if not parity.passed:
                raise InternalError(
                    f"cross-layer equalization changed the model beyond rounding (float64 rule failed: "
                    f"{parity.worst.reason if parity.worst else parity.errors}); nothing was quantized",
                    hint="please report this with the model", pass_name="equalize", node=None, passes_before=())
        else:
            report.notes.append("no batches to check equalization with (parity not measured)")
    if mode == "data":
        measure_moments(work, calibration)
    if absorb:
        reference = _outputs(work, checks) if checks else None
        report.steps.append(_run(work, [AbsorbBias(move_clamps=move_clamps)], "absorb_bias"))
        if reference is not None:
            verdict, _ = judge(reference, _outputs(work, checks), None)
            report.absorb_sqnr_db = min((o.sqnr_db for o in verdict.outputs), default=None)
    if mode != "none":
        shifts = measure_shifts(work, calibration, per_channel=per_channel) if mode == "data" else None
        report.steps.append(_run(work, [CorrectBias(per_channel=per_channel, shifts=shifts)], "correct_bias"))
    report.clamps_moved = _bounds(work) - _bounds(gm)
    after = _ranges(work)
    for name, (path, r0) in before.items():
        if name in after and not torch.equal(after[name][1], r0):
            report.spreads.append({"path": path, "before": range_spread(r0), "after": range_spread(after[name][1])})
    return PrepareResult(work, report)
