"""A rewrite rule is one file: what it *matches*, what it *checks* (a plan, or a :class:`Fail` with the reason),
and how it *rewrites* (through the :class:`~bnfold.passes.context.PassContext`, returning its changes).

:class:`Rule` turns those three methods into a pass: it matches every node of its worklist, reports a
:class:`~bnfold.passes.engine.Rejection` for every candidate whose check fails, and collects the changes and the
candidates. Rules never call each other; what two rules both need to know lives in a shared predicate module
(:mod:`bnfold.passes.fold_targets`, :mod:`bnfold.passes.commute`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Generic, TypeVar

import torch
import torch.fx

from bnfold.ir.reasons import Fail
from bnfold.passes.context import PassContext
from bnfold.passes.engine import Candidate, Category, Change, GraphContext, PassResult

__all__ = ["Fail", "GraphRule", "Rule"]

C = TypeVar("C")  # the graph context (torch.fx: PassContext; ONNX: passes.onnx.context.OnnxContext)
M = TypeVar("M")  # what match() found
P = TypeVar("P")  # what check() planned


class GraphRule(Generic[C, M, P]):
    """A rule over any graph kind ``C``. Subclass and set ``name`` and ``category``; implement ``match``, ``check``
    and ``rewrite``. torch.fx rules subclass :class:`Rule`, ONNX rules
    :class:`~bnfold.passes.onnx.context.OnnxRule`: the same class with the graph kind's context."""

    name: ClassVar[str]
    category: ClassVar[Category]
    revisit_rejected: ClassVar[bool] = False

    def match(self, ctx: C, node: Any) -> M | None:
        """The structure this rule applies to at ``node``, or None (cheap; no reason needed)."""
        raise NotImplementedError

    def check(self, ctx: C, m: M) -> P | Fail:
        """A plan for the rewrite, or why it cannot be made."""
        raise NotImplementedError

    def rewrite(self, ctx: C, m: M, plan: P) -> list[Change]:
        """Apply ``plan``; return what changed."""
        raise NotImplementedError

    def sources(self, m: M) -> tuple[str, ...]:
        """The report candidates ``m`` carries; a failed check is reported only for those."""
        return tuple(getattr(m, "sources", ()))

    def candidate(self, ctx: C, m: M) -> Candidate | None:
        """A new report candidate found at ``m`` (normalizations the user will want accounted for)."""
        return None

    def change(self, node: Any, detail: str, sources: tuple[str, ...] = (), into: str | None = None) -> Change:
        name = node if isinstance(node, str) else node.name
        return Change(self.name, name, detail, self.category, tuple(sources), into)

    def run(self, ctx: C, worklist: Sequence[Any]) -> PassResult:
        result = PassResult()
        graph: GraphContext = ctx  # type: ignore[assignment]
        for node in worklist:
            if not graph.is_live(node):  # erased by an earlier rewrite of this run
                continue
            graph.current = node
            m = self.match(ctx, node)
            if m is None:
                continue
            found = self.candidate(ctx, m)
            if found is not None:
                result.candidates.append(found)
            plan = self.check(ctx, m)
            if isinstance(plan, Fail):
                sources = self.sources(m)
                if sources:
                    result.reject(node, self.name, plan.reason, sources, name=graph.node_name(node))
                continue
            result.changes.extend(self.rewrite(ctx, m, plan))
        return result


class Rule(GraphRule[PassContext, M, P]):
    """A rule over a torch.fx graph (its context: :class:`~bnfold.passes.context.PassContext`)."""

    def match(self, ctx: PassContext, node: torch.fx.Node) -> M | None:
        """The structure this rule applies to at ``node``, or None (cheap; no reason needed)."""
        raise NotImplementedError
