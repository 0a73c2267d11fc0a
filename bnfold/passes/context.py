"""The graph a pipeline rewrites, and what the engine keeps up to date about it while rules edit it.

Every rule edits the graph through a :class:`PassContext`, never through ``torch.fx`` directly, so that:

* every edit records the nodes it touched (the node, its inputs and its users: what a local rule reads), and the
  pipeline builds each pass's next worklist from those records instead of sweeping the whole graph again;
* shapes stay valid without re-running the model: an edit that creates a node gives it the ``tensor_meta`` /
  ``val`` of the value it computes (an affine, a folded conv or a re-targeted op computes a tensor of the same
  shape and dtype as the one it replaces), so ``node.meta`` is updated locally, edit by edit;
* which nodes call each submodule is counted once and maintained (``call_sites``), so clone-on-fold does not
  scan the graph at every fold.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.fx

from bnfold.ir.affine_view import AffineView, affine_view
from bnfold.ir.graph import add_constant, cached_lookups
from bnfold.ir.ops import channel_affine

__all__ = ["PassContext"]

f64 = torch.float64

_SHAPE_KEYS = ("tensor_meta", "val")
_ORIGIN_KEYS = ("nn_module_stack", "stack_trace")


class PassContext:
    """``gm`` plus the touched-node log, module call-site counts and the node a pass is working on."""

    def __init__(self, gm: torch.fx.GraphModule, *, owns_state: bool = False) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.owns_state = owns_state
        self._storages: Counter[int] | None = None  # storage -> parameter/buffer slots using it (on first need)
        self._memo: dict[torch.fx.Node, dict[str, Any]] = {}  # per-node analyses, dropped when an edit touches it
        self.current: torch.fx.Node | None = None  # for error messages: the node a pass is looking at
        self._log: list[torch.fx.Node] = []
        self._erased: set[torch.fx.Node] = set()
        self._sites: Counter[str] = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")

    # -- what the engine asks of every graph kind (passes.engine.GraphContext) --------------------------------------
    def nodes(self) -> list[torch.fx.Node]:
        return list(self.graph.nodes)

    def node_name(self, node: torch.fx.Node) -> str:
        return node.name

    def format_node(self, node: torch.fx.Node) -> str:
        return node.format_node()

    def render(self) -> str:
        return str(self.graph)

    def session(self) -> AbstractContextManager[Any]:
        return cached_lookups(self.gm)

    def verify(self, pass_name: str, example_inputs: Sequence[Any]) -> None:
        """The graph lints, and the shape metadata the rewrites maintained locally equals what re-running the model on
        ``example_inputs`` records (on a copy, for real: independent of :mod:`bnfold.ir.shapes`' rules)."""
        import copy

        from bnfold.ir.graph import node_dtype, node_shape
        from bnfold.ir.ops import materialize_affines
        from bnfold.ir.shapes import propagate_shapes

        self.graph.lint()
        fresh = copy.deepcopy(self.gm)
        materialize_affines(fresh)
        fresh.recompile()
        propagate_shapes(fresh, tuple(example_inputs), real=True)  # independent of ir.shapes' rules
        by_name = {n.name: n for n in fresh.graph.nodes}  # the copy may have extra constants (materialized)
        for kept in self.graph.nodes:
            ref = by_name[kept.name]
            if kept.op == "output" or node_shape(ref) is None:  # ShapeProp also records what the graph returns
                continue
            got = (node_shape(kept), node_dtype(kept))
            want = (node_shape(ref), node_dtype(ref))
            assert got == want, (f"after pass {pass_name}: node {kept.format_node()} has shape meta {got}, runs as "
                                 f"{want}")

    # -- worklists ------------------------------------------------------------------------------------------------
    def touch(self, *nodes: torch.fx.Node) -> None:
        """Record ``nodes`` and their neighbours (inputs and users) as changed."""
        log, memo = self._log, self._memo
        start = len(log)
        for n in nodes:
            log.append(n)
            log.extend(n.all_input_nodes)
            log.extend(n.users)
        if memo:
            for n in log[start:]:
                memo.pop(n, None)

    def cursor(self) -> int:
        return len(self._log)

    def touched_since(self, cursor: int) -> list[torch.fx.Node]:
        """Live nodes touched since ``cursor``, each once, in the order they were first touched."""
        return [n for n in dict.fromkeys(self._log[cursor:]) if n not in self._erased]

    def is_live(self, node: torch.fx.Node) -> bool:
        return node not in self._erased

    # -- per-node analyses ---------------------------------------------------------------------------------------------
    def memo(self, node: torch.fx.Node, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` for ``node``, remembered until an edit touches ``node`` or a neighbour. For analyses that
        read only the node and its inputs (which ops a node is, its affine view)."""
        per = self._memo.get(node)
        if per is None:
            per = self._memo[node] = {}
        if key not in per:
            per[key] = compute()
        return per[key]

    def remember(self, node: torch.fx.Node, key: str, value: Any) -> None:
        """Store an analysis of ``node`` computed ahead (for a batch of nodes at once), as :meth:`memo` would."""
        per = self._memo.get(node)
        if per is None:
            per = self._memo[node] = {}
        per[key] = value

    def recall(self, node: torch.fx.Node, key: str) -> Any:
        """What :meth:`remember` or :meth:`memo` stored for ``node``, unless an edit has touched it since; else
        None."""
        per = self._memo.get(node)
        return None if per is None else per.get(key)

    def affine(self, node: torch.fx.Node) -> AffineView | None:
        """:func:`~bnfold.ir.affine_view.affine_view` of ``node``, remembered (see :meth:`memo`)."""
        return self.memo(node, "affine", lambda: affine_view(self.gm, node))

    # -- module call sites ----------------------------------------------------------------------------------------
    def call_sites(self, target: str) -> int:
        """How many ``call_module`` nodes call submodule ``target`` (kept up to date by :meth:`retarget`)."""
        return self._sites[target]

    def retarget(self, node: torch.fx.Node, target: str) -> None:
        """Point a ``call_module`` node at another submodule."""
        self._sites[str(node.target)] -= 1
        self._sites[target] += 1
        node.target = target
        self.touch(node)

    # -- state that may be overwritten in place ----------------------------------------------------------------------
    def writable(self, tensor: torch.Tensor) -> bool:
        """May a fold overwrite ``tensor`` in place? Only when the graph owns its state (the model was copied at
        capture) and ``tensor`` is the sole user of its whole storage among all parameters and buffers (counted
        once, by storage, so tied and aliased weights are never written). The caller ensures one call site."""
        if not self.owns_state or not tensor.is_contiguous() or tensor.storage_offset() != 0:
            return False
        storage = tensor.untyped_storage()
        if storage.nbytes() != tensor.numel() * tensor.element_size():
            return False
        return self._slots(tensor) == 1

    def tied(self, tensor: torch.Tensor) -> bool:
        """Is ``tensor``'s storage also held by another parameter/buffer slot (tied input/output embeddings)?"""
        return self._slots(tensor) > 1

    def _slots(self, tensor: torch.Tensor) -> int:
        if self._storages is None:
            self._storages = Counter(
                t.untyped_storage().data_ptr()
                for _, t in (*self.gm.named_parameters(remove_duplicate=False),
                             *self.gm.named_buffers(remove_duplicate=False)))
        return self._storages[tensor.untyped_storage().data_ptr()]

    # -- edits ----------------------------------------------------------------------------------------------------
    def constant(self, value: torch.Tensor, hint: str, *, before: torch.fx.Node, parameter: bool = False,
                 copy: bool = True) -> torch.fx.Node:
        """A fresh ``get_attr`` constant (shape metadata included) placed before ``before``; ``copy=False`` for
        a tensor just computed that nothing else holds."""
        return add_constant(self.gm, value, hint, before=before, parameter=parameter, copy=copy)

    def call(self, target: Callable[..., Any], args: tuple[Any, ...], *, before: torch.fx.Node,
             like: torch.fx.Node | None = None, origin: torch.fx.Node | None = None) -> torch.fx.Node:
        """Insert ``target(*args)`` before ``before``. Its shape metadata is that of ``like`` (the value it
        computes has the same shape and dtype); its origin (module stack) is that of ``origin``."""
        with self.graph.inserting_before(before):
            node = self.graph.create_node("call_function", target, args, name=_name_of(target))
        if like is not None:
            node.meta.update({k: like.meta[k] for k in _SHAPE_KEYS if k in like.meta})
        if origin is not None:
            node.meta.update({k: origin.meta[k] for k in _ORIGIN_KEYS if k in origin.meta})
        self.touch(node)
        return node

    def insert_affine(self, x: torch.fx.Node, a: torch.Tensor, b: torch.Tensor, axis: int, *,
                      before: torch.fx.Node, sources: tuple[str, ...]) -> torch.fx.Node:
        """Insert ``channel_affine(x, a, b, axis)`` before ``before``; ``a``, ``b`` are held in float64 in the node's
        arguments (see :mod:`bnfold.ir.ops`; no pass writes them in place, so they need not be copies)."""
        scale = a.detach().to(f64)
        shift = b.detach().to(f64)
        node = self.call(channel_affine, (x, scale, shift, axis), before=before, like=x, origin=before)
        node.meta["bnfold_sources"] = tuple(sources)
        return node

    def set_call(self, node: torch.fx.Node, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Change what ``node`` calls (same output value and shape: new parameters, another overload)."""
        old = node.all_input_nodes
        node.target, node.args, node.kwargs = target, args, kwargs
        self.touch(node, *old)
        self.erase_unused(old)

    def replace_all_uses(self, old: torch.fx.Node, new: torch.fx.Node) -> None:
        users = list(old.users)
        old.replace_all_uses_with(new)
        self.touch(new, *users)

    def replace_input(self, user: torch.fx.Node, old: torch.fx.Node, new: torch.fx.Node) -> None:
        user.replace_input_with(old, new)
        self.touch(user, old, new)

    def erase(self, node: torch.fx.Node) -> None:
        """Erase ``node`` (it must have no users), then any constant it alone read."""
        inputs = node.all_input_nodes
        if node.op == "call_module":
            self._sites[str(node.target)] -= 1
        self.graph.erase_node(node)
        self._erased.add(node)
        self._memo.pop(node, None)
        self.touch(*inputs)
        self.erase_unused(inputs)

    def erase_unused(self, nodes: Iterable[torch.fx.Node]) -> None:
        """Erase the ``get_attr`` nodes among ``nodes`` that nothing reads any more."""
        for n in nodes:
            if n.op == "get_attr" and not n.users and n not in self._erased:
                self.graph.erase_node(n)
                self._erased.add(n)

    def bypass(self, node: torch.fx.Node, replacement: torch.fx.Node) -> None:
        """Route ``node``'s users to ``replacement`` and erase ``node`` (and constants only it read)."""
        self.replace_all_uses(node, replacement)
        self.erase(node)


def _name_of(target: Callable[..., Any]) -> str:
    """A node name for ``target`` (what fx would derive, without its regular-expression pass per node)."""
    name = getattr(target, "__name__", "op")
    return name.split(".")[0] if isinstance(target, torch._ops.OpOverload) else name
