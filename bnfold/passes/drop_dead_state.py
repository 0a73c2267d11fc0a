"""Pass ``drop_dead_state`` (run once, last): delete dead nodes, then the parameters, buffers and submodules that
nothing in the graph references, so saved models do not carry the pre-fold weights.

Linear in the graph and the state: a parameter ``a.b.w`` is in use when ``get_attr`` reads it or when one of its
owners (``a.b``, ``a``) is called; each of the few prefixes is a set lookup.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx

from bnfold.passes.context import PassContext
from bnfold.passes.engine import Category, Change, PassResult

__all__ = ["DropDeadState"]


class DropDeadState:
    name = "drop_dead_state"
    revisit_rejected = False

    def run(self, ctx: PassContext, worklist: Sequence[torch.fx.Node]) -> PassResult:
        gm = ctx.gm
        _eliminate_dead_code(ctx)
        used_attrs = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        used_modules = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}

        def in_used_module(name: str) -> bool:
            parts = name.split(".")
            return any(".".join(parts[:k]) in used_modules for k in range(1, len(parts)))

        dropped: list[str] = []
        for prefix, owner in gm.named_modules(remove_duplicate=False):
            for table in (owner._parameters, owner._buffers):
                for attr in [k for k in table if table[k] is not None]:
                    name = f"{prefix}.{attr}" if prefix else attr
                    if name in used_attrs or in_used_module(name):
                        continue
                    del table[attr]
                    dropped.append(name)
        gm.delete_all_unused_submodules()
        # constants that passes created and abandoned in this run are temporaries, not a change to report
        user_state = [d for d in dropped if not d.startswith("_bnfold_")]
        if not user_state:
            return PassResult()
        detail = (f"dropped {len(user_state)} unused parameters/buffers: " + ", ".join(user_state[:5])
                  + (" …" if len(user_state) > 5 else ""))
        return PassResult([Change(self.name, "-", detail, Category.CLEANUP)])


def _eliminate_dead_code(ctx: PassContext) -> None:
    """``Graph.eliminate_dead_code`` without its lint and with the cheap test first: only a node without users is
    asked whether it is impure. Graphs with nested GraphModules (control flow) use fx's own version."""
    gm = ctx.gm
    if any(isinstance(m, torch.fx.GraphModule) for m in gm.children()):
        gm.graph.eliminate_dead_code()
        return
    for node in reversed(list(gm.graph.nodes)):
        if ctx.is_live(node) and not node.users and node.op not in ("placeholder", "output") \
                and not node.is_impure():
            ctx.erase(node)
