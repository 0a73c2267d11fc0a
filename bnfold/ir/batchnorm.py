"""Detect BatchNorm at every level it appears and describe it as a :class:`BatchNormSite`.

Recognised forms (by what they are, never by node names):

* modules: any ``torch.nn`` ``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, subclasses) whose ``forward``
  is the stock one; a subclass that overrides ``forward`` (e.g. BN + activation) is traced *through* by
  :class:`bnfold.capture.BnfoldTracer`, so its BN part shows up as a functional call and the rest survives;
* functional: ``F.batch_norm``, ``torch.batch_norm``;
* aten (after ``torch.export``): ``batch_norm``, ``native_batch_norm``, ``_native_batch_norm_legit``,
  ``_native_batch_norm_legit_no_training``, ``_native_batch_norm_legit_functional``.

A site is *foldable* when it uses constant running statistics in inference mode; otherwise
:attr:`BatchNormSite.problem` says why not, in words a user can act on.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from bnfold.ir import reasons
from bnfold.ir.graph import fetch_attr, get_constant, module_class, module_path, node_shape, normalized_kwargs

__all__ = ["BatchNormSite", "batchnorm_site", "batchnorm_sites", "find_batchnorm_sites", "is_stock_batchnorm"]

aten = torch.ops.aten

# aten overload -> (returns a tuple, training flag when fixed by the overload)
_ATEN_BN: dict[Any, tuple[bool, bool | None]] = {
    aten.batch_norm.default: (False, None),
    aten.native_batch_norm.default: (True, None),
    aten._native_batch_norm_legit.default: (True, None),
    aten._native_batch_norm_legit_no_training.default: (True, False),
    aten._native_batch_norm_legit_functional.default: (True, None),
}
_FUNCTIONAL_BN = {F.batch_norm, torch.batch_norm}

_STOCK_BN_FORWARDS = {nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward}


def is_stock_batchnorm(m: nn.Module) -> bool:
    """A BatchNorm module whose forward is torch's own (so it can be treated as a leaf)."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m).forward in _STOCK_BN_FORWARDS


@dataclass
class BatchNormSite:
    """One BatchNorm occurrence in a graph.

    ``output`` is the node whose value is the normalized tensor (for tuple-returning aten ops, the
    ``getitem(…, 0)`` user). ``problem`` is ``None`` for a foldable site.
    """

    node: torch.fx.Node
    output: torch.fx.Node | None
    input: Any
    kind: str
    path: str
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    problem: str | None = None
    affine: tuple[torch.Tensor, torch.Tensor] | None = None  # (a, b) in float64, once the statistics checked out

    @property
    def id(self) -> str:
        return self.node.name

    @property
    def channels(self) -> int | None:
        if self.running_mean is not None:
            return self.running_mean.numel()
        return None


def _module_site(gm: torch.fx.GraphModule, node: torch.fx.Node) -> BatchNormSite | None:
    m = fetch_attr(gm, str(node.target))
    if not is_stock_batchnorm(m):
        return None
    site = BatchNormSite(
        node=node, output=node, input=node.args[0] if node.args else None, kind=type(m).__name__,
        path=str(node.target), running_mean=m.running_mean, running_var=m.running_var,
        weight=m.weight, bias=m.bias, eps=float(m.eps),
    )
    if m.training:
        site.problem = (f"{type(m).__name__} '{node.target}' is in training mode (uses batch statistics); "
                        "call model.eval() before folding")
    elif not m.track_running_stats or m.running_mean is None:
        site.problem = (f"{type(m).__name__} '{node.target}' has track_running_stats=False, so it normalizes "
                        "with batch statistics even in eval mode; it is not an affine map and cannot be folded")
    return site


def _functional_site(gm: torch.fx.GraphModule, node: torch.fx.Node) -> BatchNormSite | None:
    if node.op != "call_function":
        return None
    if node.target in _FUNCTIONAL_BN:
        returns_tuple, fixed_training = False, None
        kind = "F.batch_norm"
    elif node.target in _ATEN_BN:
        returns_tuple, fixed_training = _ATEN_BN[node.target]
        kind = f"aten.{node.target.__name__}"  # type: ignore[union-attr]
    else:
        return None
    kw = normalized_kwargs(gm, node)
    if kw is None:
        return None
    training = kw.get("training", fixed_training) if fixed_training is None else fixed_training
    if node.target is aten._native_batch_norm_legit_functional.default:
        training = True
    output: torch.fx.Node | None = node
    problem: str | None = None
    if returns_tuple:
        firsts = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        others = [u for u in node.users if u not in firsts and (u.users or u.target is not operator.getitem)]
        output = firsts[0] if len(firsts) == 1 else None
        if others or len(firsts) > 1:
            problem = "its saved mean/invstd outputs are used by other nodes"
    cls = module_class(node)
    label = f"{kind} ({cls})" if cls and cls not in kind else kind
    site = BatchNormSite(
        node=node, output=output, input=kw.get("input"), kind=label, path=module_path(node),
        running_mean=get_constant(gm, kw.get("running_mean")),
        running_var=get_constant(gm, kw.get("running_var")),
        weight=get_constant(gm, kw.get("weight")), bias=get_constant(gm, kw.get("bias")),
        eps=float(kw.get("eps", 1e-5)), problem=problem,
    )
    if site.problem is None:
        if kw.get("running_mean") is None or kw.get("running_var") is None:
            site.problem = (f"batch norm at '{site.path}' has no running statistics (track_running_stats=False), "
                            "so it always normalizes with batch statistics and cannot be folded")
        elif training:
            site.problem = (f"batch norm at '{site.path}' runs in training mode (batch statistics); "
                            "call model.eval() before capture")
        elif site.running_mean is None or site.running_var is None:
            site.problem = (f"batch norm at '{site.path}' reads running statistics computed in the graph, "
                            "not constant buffers")
        for name in ("weight", "bias"):
            if kw.get(name) is not None and getattr(site, name) is None:
                site.problem = f"batch norm at '{site.path}' has a {name} computed in the graph, not a constant"
    return site


def _check_stats(site: BatchNormSite) -> None:
    """Set ``site.problem`` for unusable statistics, else ``site.affine``
    (:func:`~bnfold.ir.reasons.batchnorm_problem`, shared with the ONNX back end)."""
    if site.problem is not None or site.running_var is None or site.running_mean is None:
        return
    found = reasons.batchnorm_problem(site.path, site.running_mean, site.running_var, site.weight, site.bias,
                                      site.eps)
    if isinstance(found, reasons.Fail):
        site.problem = found.reason
    else:
        site.affine = found


def batchnorm_site(gm: torch.fx.GraphModule, node: torch.fx.Node) -> BatchNormSite | None:
    """The BatchNorm at ``node`` (foldable, or with a ``problem``), or None when ``node`` is not one."""
    site = _site(gm, node)
    if site is not None:
        _check_stats(site)
        _check_input(site)
    return site


def batchnorm_sites(gm: torch.fx.GraphModule, nodes: Iterable[torch.fx.Node]) -> dict[torch.fx.Node, BatchNormSite]:
    """:func:`batchnorm_site` of every BatchNorm among ``nodes``, their statistics checked (and their affines
    computed) together: :func:`~bnfold.ir.reasons.batchnorm_affines`, the same result as one by one."""
    sites = {node: site for node in nodes if (site := _site(gm, node)) is not None}
    pending = [s for s in sites.values()
               if s.problem is None and s.running_mean is not None and s.running_var is not None]
    found = reasons.batchnorm_affines([(s.running_mean, s.running_var, s.weight, s.bias, s.eps)  # type: ignore[misc]
                                       for s in pending])
    for site, affine in zip(pending, found, strict=True):
        if affine is None:
            _check_stats(site)  # not plainly fine: examined alone, which names the reason
        else:
            site.affine = affine
    for site in sites.values():
        _check_input(site)
    return sites


def _site(gm: torch.fx.GraphModule, node: torch.fx.Node) -> BatchNormSite | None:
    if node.op == "call_module":
        return _module_site(gm, node)
    if node.op == "call_function":
        return _functional_site(gm, node)
    return None


def _check_input(site: BatchNormSite) -> None:
    """Set ``site.problem`` when the input is not a graph tensor of known shape and rank ≥ 2."""
    if site.problem is None and not isinstance(site.input, torch.fx.Node):
        site.problem = f"'{site.path}' normalizes a value that is not a graph tensor"
    if site.problem is None:
        shape = node_shape(site.input)
        if shape is None or len(shape) < 2:
            site.problem = f"'{site.path}': input shape unknown or rank < 2; run with example inputs"


def find_batchnorm_sites(gm: torch.fx.GraphModule) -> list[BatchNormSite]:
    """Every BatchNorm in ``gm``, in graph order, each either foldable or with a ``problem``."""
    return list(batchnorm_sites(gm, gm.graph.nodes).values())
