"""Deep copies of ``nn.Module`` trees: what ``copy.deepcopy`` makes, at a fraction of its cost.

``copy.deepcopy(model)`` spends most of its time not on the tensors but on every module's bookkeeping: about a
dozen hook ``OrderedDict``s per module (nearly always empty), each rebuilt through ``__reduce_ex__`` and
``copyreg``. :func:`copy_module` walks the tree itself and makes the same copy:

* a module whose class pickles as ``nn.Module`` does (no ``__deepcopy__``, ``__reduce__``/``__reduce_ex__`` or
  ``__getstate__`` of its own; its own ``__setstate__`` is called as ``copy.deepcopy`` calls it) is rebuilt as
  ``copy.deepcopy`` rebuilds it — ``cls.__new__(cls)``, then ``__setstate__`` with a deep copy of
  ``__getstate__()`` — with empty dicts, plain dicts/lists/tuples/sets and atoms (numbers, strings, dtypes, …)
  copied directly;
* a plain ``nn.Parameter`` is copied as its ``__deepcopy__`` does (a clone of its data, its ``requires_grad``); a
  plain tensor (a buffer) that is the only user of its storage, dense from offset 0 and without autograd state or
  attributes, is cloned — what ``Tensor.__deepcopy__`` makes of it (a new storage holding the same bytes) without
  its storage bookkeeping, which only matters for tensors sharing storage; every other tensor goes through its own
  ``__deepcopy__``;
* anything else (a module class with its own copying, a config object, a function) goes to ``copy.deepcopy`` with
  the same memo, so objects shared anywhere in the tree stay shared in the copy (tied weights, a module used twice).

``dtype`` makes the float64 (say) copy a parity reference needs in one step: every floating-point parameter and
buffer is copied straight into ``dtype`` — as ``copy.deepcopy(model).to(dtype)`` would leave it, without the
intermediate copy in the original dtype.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["copy_module"]

M = TypeVar("M", bound=nn.Module)

_ATOMIC = {cls for cls, fn in copy._deepcopy_dispatch.items()  # type: ignore[attr-defined]
           if fn is copy._deepcopy_atomic}  # type: ignore[attr-defined]
_ATOMIC |= {torch.dtype, torch.device, torch.memory_format, torch.layout}


def copy_module(module: M, *, dtype: torch.dtype | None = None) -> M:
    """A deep copy of ``module`` (equal to ``copy.deepcopy(module)``; with ``dtype``, to
    ``copy.deepcopy(module).to(dtype)``: floating-point parameters and buffers in ``dtype``)."""
    memo: dict[int, Any] = {}
    if dtype is not None:
        if not dtype.is_floating_point:
            raise TypeError(f"copy_module casts floating-point tensors only, not to {dtype}")
        for m in module.modules():
            for slots in (m._parameters, m._buffers):
                for t in slots.values():
                    if t is not None and t.is_floating_point() and id(t) not in memo:
                        memo[id(t)] = _cast(t, dtype)
    return _Copier(memo).module(module)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    data = t.detach().to(dtype, copy=True)
    if isinstance(t, nn.Parameter):
        return nn.Parameter(data, requires_grad=t.requires_grad)
    return data


def _plain(cls: type) -> bool:
    """``cls`` is copied by ``copy.deepcopy`` the way ``nn.Module`` is: nothing of its own in the protocol but,
    possibly, ``__setstate__`` — which ``copy.deepcopy`` calls with the copied state as :meth:`_Copier.module` does
    (``_ConvNd``'s sets a missing ``padding_mode``: every conv would otherwise go through ``copy.deepcopy``)."""
    return (getattr(cls, "__deepcopy__", None) is None and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__ and cls.__getstate__ is nn.Module.__getstate__
            and cls.__new__ is object.__new__
            and not hasattr(cls, "__getnewargs_ex__") and not hasattr(cls, "__getnewargs__"))


class _Copier:
    def __init__(self, memo: dict[int, Any]) -> None:
        self.memo = memo
        self.plain: dict[type, bool] = {}

    def module(self, m: Any) -> Any:
        memo = self.memo
        if id(m) in memo:
            return memo[id(m)]
        cls = type(m)
        plain = self.plain.get(cls)
        if plain is None:
            plain = self.plain[cls] = _plain(cls)
        if not plain:
            return copy.deepcopy(m, memo)
        new = cls.__new__(cls)
        memo[id(m)] = new
        new.__setstate__({k: self.value(v) for k, v in m.__getstate__().items()})
        return new

    def value(self, v: Any) -> Any:
        cls = type(v)
        if cls in _ATOMIC:
            return v
        memo = self.memo
        if id(v) in memo:
            return memo[id(v)]
        if cls is OrderedDict or cls is dict:
            out = cls()
            memo[id(v)] = out
            for k, item in v.items():
                out[self.value(k)] = self.value(item)
            return out
        if cls is list:
            out_list: list[Any] = []
            memo[id(v)] = out_list
            out_list.extend(self.value(item) for item in v)
            return out_list
        if cls is set:
            out_set = {self.value(item) for item in v}
            memo[id(v)] = out_set
            return out_set
        if cls is tuple:  # as copy.deepcopy: the tuple itself when no element changes
            items = tuple(self.value(item) for item in v)
            if id(v) in memo:  # a reference cycle through the tuple
                return memo[id(v)]
            out_tuple = v if all(a is b for a, b in zip(items, v, strict=True)) else items
            memo[id(v)] = out_tuple
            return out_tuple
        if isinstance(v, nn.Module):
            return self.module(v)
        if cls is nn.Parameter:
            out_param = nn.Parameter(v.data.clone(memory_format=torch.preserve_format), v.requires_grad)
            memo[id(v)] = out_param
            return out_param
        if cls is torch.Tensor and _exclusive(v):
            out_tensor = v.clone()
            memo[id(v)] = out_tensor
            return out_tensor
        return copy.deepcopy(v, memo)


def _use_count(t: torch.Tensor) -> int | None:
    try:
        return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))
    except Exception:  # another torch: no fast path
        return None


_ALONE = _use_count(torch.empty(1))
"""The storage use count of a tensor nothing else shares storage with (a view of it adds one)."""


def _exclusive(t: torch.Tensor) -> bool:
    """A dense CPU/CUDA leaf tensor from offset 0 of a storage no other tensor uses, without gradient or
    attributes: cloning it is what ``Tensor.__deepcopy__`` makes of it."""
    return (t.device.type in ("cpu", "cuda") and t.layout is torch.strided and not t.is_quantized
            and t.is_leaf and not t.requires_grad and t.grad is None and t._base is None and not t.__dict__
            and t.storage_offset() == 0 and t.is_contiguous()
            and t.untyped_storage().nbytes() == t.numel() * t.element_size()
            and _ALONE is not None and _use_count(t) == _ALONE)
