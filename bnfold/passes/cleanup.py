"""Final, run-once passes: lower leftover affines to one fused multiply-add and drop dead state.

``channel_affine(x, a, b)`` that no rule could fold becomes the cheapest exact aten op, with ``a``/``b``
cast once to ``x``'s dtype and shaped to broadcast along the axis::

    a ≡ 1 → x + b        b ≡ 0 → x * a        otherwise → addcmul(b, x, a)  (= b + x·a, one op)

never the BatchNorm formula. Unused parameters, buffers and submodules are then removed so saved models
do not carry the pre-fold weights.
"""

from __future__ import annotations

import torch
import torch.fx

from bnfold.graph import add_constant, node_dtype
from bnfold.passes.affine_view import affine_view
from bnfold.passes.base import Change, PassResult
from bnfold.passes.fold import erase_affine
from bnfold.passes.ops import is_channel_affine
from bnfold.passes.split_norms import merge_back

__all__ = ["DropDeadState", "LowerAffines"]

aten = torch.ops.aten


class LowerAffines:
    """``channel_affine`` → ``add`` / ``mul`` / ``addcmul`` with constants in the tensor's dtype."""

    name = "lower_affines"

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        result = PassResult(False)
        for node in list(gm.graph.nodes):
            if not is_channel_affine(node):
                continue
            sources = tuple(node.meta.get("bnfold_sources", ()))
            whole = merge_back(gm, node)
            if whole is not None:
                result.changes.append(Change(self.name, node.name, "left unfolded; merged back into its norm",
                                             sources, into=whole.name))
                continue
            view = affine_view(gm, node)
            if view is None:
                continue
            dtype = node_dtype(view.x) or torch.float32
            shape = [1] * view.rank
            shape[view.axis] = view.channels
            a = view.a.to(dtype).reshape(shape)
            b = view.b.to(dtype).reshape(shape)
            device_hint = node  # constants are inserted right before the affine
            if bool((view.a == 1).all()):
                args, target, form = (view.x, add_constant(gm, b, f"{node.name}_b", before=device_hint)), \
                    aten.add.Tensor, "x + b"
            elif bool((view.b == 0).all()):
                args, target, form = (view.x, add_constant(gm, a, f"{node.name}_a", before=device_hint)), \
                    aten.mul.Tensor, "x * a"
            else:
                args = (add_constant(gm, b, f"{node.name}_b", before=node), view.x,
                        add_constant(gm, a, f"{node.name}_a", before=node))
                target, form = aten.addcmul.default, "addcmul(b, x, a)"
            with gm.graph.inserting_before(node):
                lowered = gm.graph.call_function(target, args)
            lowered.meta.update({k: v for k, v in node.meta.items() if k != "bnfold_sources"})
            lowered.meta["bnfold_sources"] = view.sources
            erase_affine(gm, view, lowered)
            result.changes.append(Change(self.name, node.name, f"left unfolded; lowered to {form}",
                                         view.sources, into=lowered.name))
        result.modified = bool(result.changes)
        return result


class DropDeadState:
    """Delete dead nodes, then parameters/buffers/submodules that nothing in the graph references."""

    name = "drop_dead_state"

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        gm.graph.eliminate_dead_code()
        used_attrs = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        used_modules = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}

        def in_used_module(name: str) -> bool:
            return any(name == m or name.startswith(m + ".") for m in used_modules)

        dropped: list[str] = []
        named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
        for name, _ in named:
            if name in used_attrs or in_used_module(name):
                continue
            owner_name, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            if attr in owner._parameters:
                del owner._parameters[attr]
            elif attr in owner._buffers:
                del owner._buffers[attr]
            dropped.append(name)
        gm.delete_all_unused_submodules()
        # constants that passes created and abandoned in this run are temporaries, not a change to report
        user_state = [d for d in dropped if not d.startswith("_bnfold_")]
        changes = [Change(self.name, "-", f"dropped {len(user_state)} unused parameters/buffers: "
                          + ", ".join(user_state[:5]) + (" …" if len(user_state) > 5 else ""))] if user_state else []
        return PassResult(bool(changes), changes)
