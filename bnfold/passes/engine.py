"""The pass engine: results, the worklist-driven :class:`Pipeline`, instruments and internal errors.

A pass is a small object with a ``name`` and ``run(ctx, worklist) -> PassResult``: it looks only at the nodes in
``worklist`` and rewrites the graph only through ``ctx``, which records every node an edit touched. The engine
knows graphs only through :class:`GraphContext`: a torch.fx graph (:class:`~bnfold.passes.context.PassContext`) and
an ONNX graph (:class:`~bnfold.passes.onnx.context.OnnxContext`) run through the same pipeline, rules, categories
and instruments. The pipeline runs its passes in list order, round after round, until a whole
round changes nothing (a fixed point); but only the first round hands a pass every node. Afterwards a pass gets
the nodes touched since it last ran, so a round costs in proportion to what changed, not to the graph.

Every :class:`Change` carries a :class:`Category` that the report reads; every candidate a pass finds travels in
its :class:`PassResult`; a :class:`Rejection` says why a candidate was left alone. Rejections are kept per
``(pass, node)`` and replaced whenever that pass looks at that node again, so the report shows each candidate's
current reasons, never a stale one. Instruments (timing, IR dumps, ``until``) observe every pass the same way;
an exception inside a pass is re-raised as :class:`~bnfold.errors.InternalError` naming the pass, the node and
the passes that ran before it.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import torch
import torch.fx

from bnfold.errors import BnfoldError, InternalError
from bnfold.passes.context import PassContext

__all__ = [
    "FOLDED_KEY",
    "Candidate",
    "Category",
    "Change",
    "DumpIR",
    "GraphContext",
    "Instrument",
    "Pass",
    "PassResult",
    "PassTiming",
    "Pipeline",
    "PipelineResult",
    "Rejection",
    "Timing",
    "Until",
    "Verify",
]

log = logging.getLogger(__name__)


FOLDED_KEY = "bnfold_folded"
"""``node.meta`` key of a conv/linear: the report candidates folded into it so far (set by the fold rules), so that
a rule that later merges that op into another (``reparameterize``) can report them as folded there."""


class Category(enum.StrEnum):
    """What a change did to a candidate. The report counts a candidate as folded when a ``FOLD`` change
    consumed it and no later ``LOWER`` change had to keep it as an explicit op."""

    FOLD = "fold"  # the affine disappeared into a conv/linear/embedding's parameters
    MOVE = "move"  # the affine moved to another place in the graph (exactly)
    LOWER = "lower"  # an affine no rule could fold became a plain op again
    CANONICALIZE = "canonicalize"  # a graph rewritten into the canonical form, same meaning
    CLEANUP = "cleanup"  # dead nodes and state removed
    # quantization preparation (passes.QUANTIZE_PREP); none of these counts a candidate as folded:
    EQUALIZE = "equalize"  # cross-layer equalization: channel scales moved between two layers, same function
    ABSORB = "absorb"  # a bias moved across an activation into the next layer (exact where the activation is linear)
    CORRECT = "correct"  # a bias corrected for the expected output shift of int8 weights (changes the float model)


@dataclass(frozen=True)
class Candidate:
    """A normalization the user will want accounted for in the report."""

    id: str
    kind: str
    path: str


@dataclass(frozen=True)
class Change:
    """One rewrite: ``rule`` applied at ``node``; ``sources`` are the candidate ids it consumed."""

    rule: str
    node: str
    detail: str
    category: Category
    sources: tuple[str, ...] = ()
    into: str | None = None


@dataclass(frozen=True)
class Rejection:
    """A candidate left alone: which ``rule`` declined at ``node`` and a ``reason`` a user can act on."""

    rule: str
    node: str
    reason: str
    sources: tuple[str, ...] = ()


@dataclass
class PassResult:
    """What one run of a pass did. ``modified`` must never lie: the fixed-point loop stops on it."""

    changes: list[Change] = field(default_factory=list)
    rejections: list[tuple[Any, Rejection]] = field(default_factory=list)  # (node of the graph, why)
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return bool(self.changes)

    def reject(self, node: Any, rule: str, reason: str, sources: tuple[str, ...], *, name: str | None = None
               ) -> None:
        self.rejections.append((node, Rejection(rule, node.name if name is None else name, reason, sources)))


class GraphContext(Protocol):
    """What the engine needs of the graph a pipeline rewrites (the graph kind's adapter). Nodes are whatever the
    graph kind uses; the engine compares them by identity only."""

    current: Any  # the node a pass is working on (error messages)

    def nodes(self) -> list[Any]:
        """Every node, in graph order."""
        ...

    def cursor(self) -> int:
        """A position in the log of touched nodes."""
        ...

    def touched_since(self, cursor: int) -> list[Any]:
        """Live nodes an edit touched since ``cursor``, each once."""
        ...

    def is_live(self, node: Any) -> bool: ...

    def node_name(self, node: Any) -> str:
        """How a report names ``node``."""
        ...

    def format_node(self, node: Any) -> str:
        """``node`` in full, for an error message."""
        ...

    def render(self) -> str:
        """The whole graph as text (``--dump-ir``)."""
        ...

    def session(self) -> AbstractContextManager[Any]:
        """Held for the length of a pipeline run (lookup caches)."""
        ...

    def verify(self, pass_name: str, example_inputs: Sequence[Any]) -> None:
        """Check the engine's bookkeeping after ``pass_name`` changed the graph; raise AssertionError naming the pass
        and the node."""
        ...


class Pass(Protocol):
    """A graph pass. ``name`` identifies it in reports, ``--until`` and errors.

    ``revisit_rejected``: besides the touched nodes, look again at the nodes this pass rejected (for passes
    whose decision depends on more than a node's neighbours, such as a move with look-ahead).
    """

    name: str
    revisit_rejected: bool

    def run(self, ctx: Any, worklist: Sequence[Any]) -> PassResult: ...


@dataclass
class PassTiming:
    name: str
    runs: int = 0
    seconds: float = 0.0
    changes: int = 0
    nodes: int = 0  # worklist nodes looked at, over all runs


@dataclass
class PipelineResult:
    rounds: int
    changes: list[Change]
    rejections: list[Rejection]
    candidates: list[Candidate]
    timings: list[PassTiming]
    converged: bool
    stopped_after: str | None = None

    @property
    def modified(self) -> bool:
        return bool(self.changes)


# -- instruments ---------------------------------------------------------------------------------------------------

class Instrument(Protocol):
    """Observes every pass run. ``after_pass`` returns True to stop the pipeline there."""

    def before_pass(self, name: str, ctx: GraphContext, worklist: Sequence[Any]) -> None: ...

    def after_pass(self, name: str, ctx: GraphContext, result: PassResult) -> bool: ...


class Timing:
    """CPU-clock time, runs, worklist sizes and changes per pass (always installed by :class:`Pipeline`)."""

    def __init__(self) -> None:
        self.timings: dict[str, PassTiming] = {}
        self._start = 0.0
        self._nodes = 0

    def before_pass(self, name: str, ctx: GraphContext, worklist: Sequence[Any]) -> None:
        self._nodes = len(worklist)
        self._start = time.process_time()

    def after_pass(self, name: str, ctx: GraphContext, result: PassResult) -> bool:
        t = self.timings.setdefault(name, PassTiming(name))
        t.runs += 1
        t.seconds += time.process_time() - self._start
        t.changes += len(result.changes)
        t.nodes += self._nodes
        return False


class Until:
    """Stop the pipeline after the first run of the pass named ``name`` (``--until``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stopped = False

    def before_pass(self, name: str, ctx: GraphContext, worklist: Sequence[Any]) -> None:
        pass

    def after_pass(self, name: str, ctx: GraphContext, result: PassResult) -> bool:
        self.stopped = name == self.name
        return self.stopped


class DumpIR:
    """Write the graph before and after every pass that changed it (``--dump-ir``): to ``stream``, or with ``folder``
    one file per such pass run into that folder (``001-fold_into_producer.txt``, in the order they ran)."""

    def __init__(self, stream: IO[str] | None = None, *, folder: str | Path | None = None) -> None:
        if (stream is None) == (folder is None):
            raise ValueError("DumpIR writes to a stream or to a folder")
        self.stream = stream
        self.folder = None if folder is None else Path(folder)
        self.written: list[Path] = []
        self._before = ""

    def before_pass(self, name: str, ctx: GraphContext, worklist: Sequence[Any]) -> None:
        self._before = ctx.render()

    def after_pass(self, name: str, ctx: GraphContext, result: PassResult) -> bool:
        if not result.modified:
            return False
        text = (f"# --- before {name} ---\n{self._before}\n# --- after {name} "
                f"({len(result.changes)} changes) ---\n{ctx.render()}\n")
        if self.folder is None:
            assert self.stream is not None
            self.stream.write(text)
        else:
            path = self.folder / f"{len(self.written) + 1:03d}-{name}.txt"
            path.write_text(text)
            self.written.append(path)
        return False


class Verify:
    """Check the engine's bookkeeping after every pass that changed the graph (tests, debugging), as the graph kind
    defines it (:meth:`GraphContext.verify`; torch.fx: the graph lints, and the shape metadata the rewrites
    maintained locally equals what re-running the model on ``example_inputs`` records). Raises
    :class:`AssertionError` naming the pass and the node."""

    def __init__(self, example_inputs: Sequence[Any] = ()) -> None:
        self.example_inputs = tuple(example_inputs)
        self.checked = 0

    def before_pass(self, name: str, ctx: GraphContext, worklist: Sequence[Any]) -> None:
        pass

    def after_pass(self, name: str, ctx: GraphContext, result: PassResult) -> bool:
        if not result.modified:
            return False
        ctx.verify(name, self.example_inputs)
        self.checked += 1
        return False


# -- the pipeline --------------------------------------------------------------------------------------------------

class Pipeline:
    """Run ``passes`` to a fixed point from worklists, then ``finalize`` once (over every node).

    ``max_rounds`` bounds the fixed-point loop (each round runs every pass with a non-empty worklist).
    """

    def __init__(self, passes: Sequence[Pass], *, finalize: Sequence[Pass] = (), max_rounds: int = 20,
                 instruments: Sequence[Instrument] = ()) -> None:
        self.passes = list(passes)
        self.finalize = list(finalize)
        self.max_rounds = max_rounds
        self.instruments = list(instruments)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes + self.finalize]

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> PipelineResult:
        """Run on a torch.fx graph (a :class:`~bnfold.passes.context.PassContext` over ``gm``, or ``ctx``)."""
        return self.run_on(ctx or PassContext(gm))

    def run_on(self, ctx: GraphContext) -> PipelineResult:
        """Run on the graph ``ctx`` adapts (any graph kind)."""
        with ctx.session():
            return self._run(ctx)

    def _run(self, ctx: GraphContext) -> PipelineResult:
        timing = Timing()
        instruments: list[Instrument] = [timing, *self.instruments]
        changes: list[Change] = []
        candidates: dict[str, Candidate] = {}
        rejected: dict[tuple[str, int], tuple[Any, Rejection]] = {}  # (pass, id(node)) → (node, why)
        cursors = {p.name: 0 for p in self.passes}
        history: list[str] = []
        rounds, converged, stopped = 0, False, None

        def run_one(p: Pass, worklist: Sequence[Any]) -> bool:
            for node in worklist:
                rejected.pop((p.name, id(node)), None)
            for ins in instruments:
                ins.before_pass(p.name, ctx, worklist)
            result = _guarded(p, ctx, worklist, history)
            history.append(p.name)
            changes.extend(result.changes)
            for c in result.candidates:
                candidates.setdefault(c.id, c)
            for node, r in result.rejections:
                rejected[(p.name, id(node))] = (node, r)
            stop = False
            for ins in instruments:
                stop |= ins.after_pass(p.name, ctx, result)
            return stop

        while rounds < self.max_rounds and stopped is None:
            rounds += 1
            before = len(changes)
            for p in self.passes:
                if rounds == 1:
                    worklist = ctx.nodes()
                else:
                    worklist = ctx.touched_since(cursors[p.name])
                    if p.revisit_rejected and worklist:
                        worklist += [n for (name, _), (n, _) in rejected.items() if name == p.name and ctx.is_live(n)]
                        worklist = list({id(n): n for n in worklist}.values())
                cursors[p.name] = ctx.cursor()
                if not worklist:
                    continue
                if run_one(p, worklist):
                    stopped = p.name
                    break
            if len(changes) == before:
                converged = True
                break
        if not converged and stopped is None:
            log.warning("the fold pipeline stopped after %d rounds without reaching a fixed point", rounds)
        # the reasons that stand: those of nodes still in the graph at the fixed point (finalize only lowers), in
        # pipeline order (a pass that looked at a node again re-inserted its reason at the end of the dict)
        rank = {name: i for i, name in enumerate(self.names)}
        live = sorted((r for n, r in rejected.values() if ctx.is_live(n)), key=lambda r: rank[r.rule])
        if stopped is None:
            for p in self.finalize:
                if run_one(p, ctx.nodes()):
                    stopped = p.name
                    break
        return PipelineResult(rounds, changes, live, list(candidates.values()),
                              list(timing.timings.values()), converged, stopped)


def _guarded(p: Pass, ctx: GraphContext, worklist: Sequence[Any], history: list[str]) -> PassResult:
    """Run ``p``; any exception that is not a deliberate :class:`BnfoldError` becomes an :class:`InternalError`."""
    ctx.current = None
    try:
        return p.run(ctx, worklist)
    except BnfoldError:
        raise
    except Exception as exc:
        node = ctx.current
        where = "no particular node" if node is None else f"node {ctx.format_node(node)}"
        before = ", ".join(history[-12:]) or "none"
        raise InternalError(
            f"bnfold internal error in pass '{p.name}' at {where}: {type(exc).__name__}: {exc} "
            f"(passes run before it: {before})",
            hint="please report this with the model; bnfold.fold(..., until=<an earlier pass>) narrows it down",
            pass_name=p.name, node=None if node is None else ctx.node_name(node), passes_before=tuple(history),
        ) from exc
