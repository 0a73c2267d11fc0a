"""Pass ``drop_dead_state`` (run once, last): delete dead nodes, then the parameters, buffers and submodules that
nothing in the graph references, so saved models do not carry the pre-fold weights.

Linear in the graph and the state: one walk over the nodes collects what is called and read, one pre-order walk
over the modules decides for each module (from its parent's status and a set lookup) and each of its tensors.
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
        dropped = _drop_unused_state(gm)
        # constants that passes created and abandoned in this run are temporaries, not a change to report
        user_state = [d for d in dropped if not d.startswith("_bnfold_")]
        if not user_state:
            return PassResult()
        detail = (f"dropped {len(user_state)} unused parameters/buffers: " + ", ".join(user_state[:5])
                  + (" …" if len(user_state) > 5 else ""))
        return PassResult([Change(self.name, "-", detail, Category.CLEANUP)])


def _drop_unused_state(gm: torch.fx.GraphModule) -> list[str]:
    """Delete submodules nothing calls or reads through, and parameters/buffers nothing reads; return the names of
    the parameters/buffers that went. One pre-order walk: a module inherits "called" (its forward uses all of it)
    or "deleted" from its parent; otherwise it is kept when it owns something the graph uses, else deleted."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    attrs = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    owners: set[str] = set()  # modules on the path to something used
    for target in called | attrs:
        parts = target.split(".")
        owners.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    status: dict[str, str] = {"": "kept"}
    dropped: list[str] = []
    doomed: list[tuple[torch.nn.Module, str]] = []
    modules = dict(gm.named_modules(remove_duplicate=False))
    for prefix, module in modules.items():
        if prefix:
            parent, _, leaf = prefix.rpartition(".")
            inherited = status[parent]
            if inherited in ("called", "deleted"):
                status[prefix] = inherited
            else:
                status[prefix] = "called" if prefix in called else "kept" if prefix in owners else "deleted"
                if status[prefix] == "deleted":
                    doomed.append((modules[parent], leaf))
        if status[prefix] == "called":
            continue
        for table in (module._parameters, module._buffers):
            for attr in [k for k, v in table.items() if v is not None]:
                name = f"{prefix}.{attr}" if prefix else attr
                if status[prefix] == "deleted":
                    dropped.append(name)
                elif name not in attrs:
                    del table[attr]
                    dropped.append(name)
    for parent_module, leaf in doomed:
        delattr(parent_module, leaf)
    return dropped


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
