"""``copy_module`` makes what ``copy.deepcopy`` makes (and, with ``dtype``, what ``.to(dtype)`` of that makes)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from bnfold.copying import _plain, copy_module


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return m.state_dict(keep_vars=True)


def assert_like_deepcopy(model: nn.Module, copied: nn.Module) -> None:
    """``copied`` equals ``copy.deepcopy(model)``: the same classes and attributes, equal tensors in new storage,
    the same sharing between slots, ``requires_grad`` and ``training`` kept."""
    ref = copy.deepcopy(model)
    assert [(n, type(m).__name__) for n, m in copied.named_modules(remove_duplicate=False)] == \
        [(n, type(m).__name__) for n, m in ref.named_modules(remove_duplicate=False)]  # a GraphModule: own class
    got, want, orig = _state(copied), _state(ref), _state(model)
    assert got.keys() == want.keys()
    for k in want:
        assert type(got[k]) is type(want[k]) and got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
        assert got[k].requires_grad == want[k].requires_grad, k
        assert got[k].untyped_storage().data_ptr() != orig[k].untyped_storage().data_ptr(), k
    for (_, a), (_, b) in zip(copied.named_modules(remove_duplicate=False), ref.named_modules(remove_duplicate=False),
                              strict=True):
        assert a.__dict__.keys() == b.__dict__.keys() and a.training == b.training
    # which slots share a tensor (tied weights) is the same
    def sharing(m: nn.Module) -> list[list[str]]:
        groups: dict[int, list[str]] = {}
        for name, t in _state(m).items():
            groups.setdefault(id(t), []).append(name)
        return sorted(groups.values())
    assert sharing(copied) == sharing(ref)


class Odd(nn.Module):
    """Tied weights, a module at two paths, plain tensor attributes, containers of tensors and modules, a buffer
    that views another, a hook, a non-floating buffer, a parameter that needs no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # tied
        self.shared = self.a  # one module, two paths
        self.register_buffer("base", torch.arange(8.0))
        self.register_buffer("view", self.base[2:6])  # shares storage with `base`
        self.register_buffer("steps", torch.tensor(3))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.table = {"scale": torch.tensor(2.0), "mods": [nn.ReLU()]}
        self.pair = (torch.zeros(1), 3)
        self.a.register_forward_hook(lambda *args: None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) * self.table["scale"]


CASES: dict[str, tuple[Any, tuple[int, ...]]] = {
    "odd": (Odd, (2, 4)),
    "resnet18": (lambda: torchvision.models.resnet18(), (2, 3, 32, 32)),
    "lstm": (lambda: nn.LSTM(3, 4), (2, 5, 3)),  # its own __setstate__: copied by copy.deepcopy
    "graph_module": (lambda: torch.fx.symbolic_trace(torchvision.models.resnet18()), (2, 3, 32, 32)),  # __deepcopy__
}


@pytest.mark.parametrize("name", list(CASES))
def test_copy_equals_deepcopy(name: str) -> None:
    build, shape = CASES[name]
    model = build()
    copied = copy_module(model)
    assert_like_deepcopy(model, copied)
    x = torch.randn(shape)
    torch.testing.assert_close(copied.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_odd_structure_survives() -> None:
    model = Odd()
    copied = copy_module(model)
    assert copied.b.weight is copied.a.weight and copied.shared is copied.a
    assert copied.view.untyped_storage().data_ptr() == copied.base.untyped_storage().data_ptr()  # still a view
    copied.base.zero_()
    assert not copied.view.any() and model.view.any()
    assert copied.table["mods"][0] is not model.table["mods"][0] and copied.pair[1] == 3
    assert len(copied.a._forward_hooks) == 1


def test_cast_equals_deepcopy_then_to() -> None:
    model = Odd()
    copied = copy_module(model, dtype=torch.float64)
    ref = copy.deepcopy(model).to(torch.float64)
    got, want = _state(copied), _state(ref)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert isinstance(copied.frozen, nn.Parameter) and not copied.frozen.requires_grad
    assert copied.b.weight is copied.a.weight and model.a.weight.dtype == torch.float32


def test_cast_refuses_a_non_floating_dtype() -> None:
    with pytest.raises(TypeError):
        copy_module(nn.Linear(2, 2), dtype=torch.int32)


class Restoring(nn.Conv2d):
    """A module whose own ``__setstate__`` (like ``_ConvNd``'s, which sets a missing ``padding_mode``) sets an
    attribute: ``copy.deepcopy`` calls it with the copied state, and so must :func:`copy_module`."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state.pop("restored", None)
        super().__setstate__(state)
        self.restored = True


def test_own_setstate_is_called_as_deepcopy_calls_it() -> None:
    model = nn.Sequential(Restoring(3, 4, 3), nn.Conv2d(4, 4, 1))
    copied = copy_module(model)
    assert_like_deepcopy(model, copied)
    assert copied[0].restored and copy.deepcopy(model)[0].restored
    assert _plain(Restoring) and _plain(nn.Conv2d)  # rebuilt by copy_module itself, not handed to copy.deepcopy
