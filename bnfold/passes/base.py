"""Pass infrastructure: a pass is a small class whose ``run(gm)`` rewrites a GraphModule in place and
returns a :class:`PassResult` saying what it changed and, for each candidate it left alone, why.

A :class:`Pipeline` runs passes in order, repeatedly, until a whole round changes nothing (a fixed point),
timing each pass. ``modified`` must never lie: the fixed-point loop stops on it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.fx

__all__ = ["Change", "Pass", "PassResult", "PassTiming", "Pipeline", "PipelineResult", "Rejection"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    """One rewrite: ``rule`` applied at ``node``; ``sources`` are the candidate ids it consumed."""

    rule: str
    node: str
    detail: str
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
    modified: bool
    changes: list[Change] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)


class Pass(Protocol):
    """A graph pass. ``name`` identifies it in reports and in ``--until``."""

    name: str

    def run(self, gm: torch.fx.GraphModule) -> PassResult: ...


@dataclass
class PassTiming:
    name: str
    runs: int = 0
    seconds: float = 0.0
    changes: int = 0


@dataclass
class PipelineResult:
    rounds: int
    changes: list[Change]
    rejections: list[Rejection]
    timings: list[PassTiming]
    converged: bool

    @property
    def modified(self) -> bool:
        return bool(self.changes)


class Pipeline:
    """Run ``passes`` to a fixed point.

    ``after_modify`` (e.g. shape re-propagation) runs after every pass that reported a change.
    ``until`` stops after the named pass in the first round. Rejections are those of the final round:
    a candidate rejected early and folded later does not show a stale reason.
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        max_rounds: int = 20,
        after_modify: Callable[[torch.fx.GraphModule], None] | None = None,
        until: str | None = None,
    ) -> None:
        names = [p.name for p in passes]
        if until is not None and until not in names:
            raise ValueError(f"--until {until!r} names no pass; passes are: {', '.join(names)}")
        self.passes = list(passes)
        self.max_rounds = max_rounds
        self.after_modify = after_modify
        self.until = until

    def run(self, gm: torch.fx.GraphModule) -> PipelineResult:
        timings = {p.name: PassTiming(p.name) for p in self.passes}
        changes: list[Change] = []
        rejections: dict[tuple[str, str, str], Rejection] = {}
        rounds = 0
        converged = False
        while rounds < self.max_rounds:
            rounds += 1
            round_modified = False
            round_rejections: dict[tuple[str, str, str], Rejection] = {}
            for p in self.passes:
                start = time.perf_counter()
                result = p.run(gm)
                if result.modified:
                    gm.graph.lint()
                    gm.recompile()
                    if self.after_modify is not None:
                        self.after_modify(gm)
                t = timings[p.name]
                t.runs += 1
                t.seconds += time.perf_counter() - start
                t.changes += len(result.changes)
                changes.extend(result.changes)
                for r in result.rejections:
                    round_rejections[(r.rule, r.node, r.reason)] = r
                round_modified |= result.modified
                log.debug("round %d pass %s: %d changes", rounds, p.name, len(result.changes))
                if self.until == p.name:
                    return PipelineResult(rounds, changes, list(round_rejections.values()),
                                          list(timings.values()), converged=False)
            rejections = round_rejections
            if not round_modified:
                converged = True
                break
        return PipelineResult(rounds, changes, list(rejections.values()), list(timings.values()), converged)


def sources_of(node: Any) -> tuple[str, ...]:
    """Candidate ids carried by ``node`` (set by detection, merged by folds)."""
    if isinstance(node, torch.fx.Node):
        return tuple(node.meta.get("bnfold_sources", ()))
    return ()
