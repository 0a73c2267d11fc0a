"""Data movement transfers (:mod:`bnfold.passes.commute`): mapping the affine's axis directly gives what moving a
coefficient per element gives — the same axis, the same coefficients, bit for bit."""

from __future__ import annotations

import math
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.ir.reasons import Fail
from bnfold.passes.commute import Affine, index_transfer, permute_axes, reshape_axes

f64 = torch.float64


def _same(x: Affine | Fail, y: Affine | Fail) -> bool:
    if isinstance(x, Fail) or isinstance(y, Fail):
        return isinstance(x, Fail) and isinstance(y, Fail) and x.reason == y.reason
    return x.axis == y.axis and x.shape == y.shape and torch.equal(x.a, y.a) and torch.equal(x.b, y.b)


def _affine(shape: tuple[int, ...], axis: int, seed: int, constant: bool) -> Affine:
    g = torch.Generator().manual_seed(seed)
    n = shape[axis]
    a = torch.full((n,), 0.5, dtype=f64) if constant else torch.randn(n, generator=g, dtype=f64)
    b = torch.full((n,), -2.0, dtype=f64) if constant else torch.randn(n, generator=g, dtype=f64)
    return Affine(a, b, axis, shape)


shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


def _check_axes_map(shape: tuple[int, ...], out_shape: tuple[int, ...], move: Any, axes: Any, data: st.DataObject,
                    seed: int, constant: bool) -> None:
    """The transfer with ``axes`` (the direct map) and without (the index map) move an affine on any axis alike,
    forward and back."""
    fast = index_transfer(shape, out_shape, move, axes)
    slow = index_transfer(shape, out_shape, move)
    axis = data.draw(st.integers(0, len(shape) - 1))
    assert _same(fast[0](_affine(shape, axis, seed, constant)), slow[0](_affine(shape, axis, seed, constant)))
    back = data.draw(st.integers(0, len(out_shape) - 1))
    assert _same(fast[1](_affine(out_shape, back, seed, constant)), slow[1](_affine(out_shape, back, seed, constant)))


@settings(max_examples=200, deadline=None)
@given(shapes, st.data(), st.integers(0, 2**16), st.booleans())
def test_permutations_map_axes_as_the_index_map_does(shape: tuple[int, ...], data: st.DataObject, seed: int,
                                                     constant: bool) -> None:
    perm = data.draw(st.permutations(range(len(shape))))
    out_shape = tuple(shape[p] for p in perm)

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.permute(perm)

    _check_axes_map(shape, out_shape, move, permute_axes(shape, move), data, seed, constant)


@settings(max_examples=200, deadline=None)
@given(shapes, st.data(), st.integers(0, 2**16), st.booleans())
def test_reshapes_map_axes_as_the_index_map_does(shape: tuple[int, ...], data: st.DataObject, seed: int,
                                                 constant: bool) -> None:
    """Splits, merges, size-1 axes added or dropped: an axis kept whole maps directly, any other takes the index
    map, and both give the index map's answer."""
    n = math.prod(shape)
    factors = [d for d in range(1, n + 1) if n % d == 0]
    out: list[int] = []
    rest = n
    while rest > 1 and len(out) < 4:
        d = data.draw(st.sampled_from([f for f in factors if rest % f == 0]))
        out.append(d)
        rest //= d
    out_shape = (*out, rest) if rest > 1 or not out else tuple(out)
    if data.draw(st.booleans()):
        out_shape = (1, *out_shape)

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(out_shape)

    _check_axes_map(shape, out_shape, move, reshape_axes(shape, out_shape), data, seed, constant)


def test_transpose_and_t_are_permutations() -> None:
    maps = permute_axes((2, 3, 4), lambda t: t.transpose(0, 2))
    assert maps is not None and [maps[0](c) for c in range(3)] == [2, 1, 0]
    maps = permute_axes((2, 3), lambda t: t.t())
    assert maps is not None and maps[0](0) == 1 and maps[1](0) == 1
    assert permute_axes((2, 3), lambda t: t[:, :1]) is None  # a selection is not a permutation
