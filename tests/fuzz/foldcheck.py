"""The properties every fold must keep, checked on one generated model (see :mod:`modelgen`).

For a model and a capture mode, :func:`check_fold` returns ``None`` when all hold, else a one-line failure:

* no crash: ``bnfold.fold`` returns, or rejects the model with a ``BnfoldError`` (a clean rejection, allowed);
* parity: :func:`bnfold.parity.compare` (the float64-oracle rule) passes on the model's own input;
* the input module is not mutated (its ``state_dict`` is bit-identical before and after);
* idempotence: folding the folded module again folds nothing and leaves its output bit-identical.
"""

from __future__ import annotations

import traceback

import torch
from torch import nn

import bnfold
from bnfold.errors import BnfoldError
from bnfold.parity import compare

__all__ = ["check_fold"]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _batches(check_inputs: tuple[torch.Tensor, ...] | None, inputs: tuple[torch.Tensor, ...]
             ) -> list[tuple[torch.Tensor, ...]]:
    """``check_inputs`` cut into batches of the example's batch size (an exported graph fixes it)."""
    if not check_inputs:
        return [inputs]
    n = int(inputs[0].shape[0])
    total = int(check_inputs[0].shape[0]) // n * n
    return [tuple(t[i:i + n] for t in check_inputs) for i in range(0, total, n)] or [inputs]


def check_fold(model: nn.Module, inputs: tuple[torch.Tensor, ...], capture: str,
               check_inputs: tuple[torch.Tensor, ...] | None = None) -> str | None:
    """``None`` when the fold of ``model`` keeps every property above, else what broke. ``inputs`` are folded
    with; parity is judged on ``check_inputs`` too when given (more samples: see ``modelgen.Case``)."""
    before = _snapshot(model)
    training = [m.training for m in model.modules()]
    try:
        result = bnfold.fold(model, inputs, capture=capture, check=False)  # type: ignore[arg-type]
    except BnfoldError:
        return None  # a clean, explained rejection
    except Exception:
        return "crash: " + traceback.format_exc(limit=-3).replace("\n", " | ")
    after = _snapshot(model)
    changed = [k for k in before if k not in after or not torch.equal(before[k], after[k])]
    if changed or [m.training for m in model.modules()] != training:
        return f"input module mutated: {changed or 'training flags'}"
    try:
        report = compare(model, result.module, _batches(check_inputs, inputs), batch_independence=False,
                         localize=False)
    except Exception:
        return "compare crashed: " + traceback.format_exc(limit=-3).replace("\n", " | ")
    if not report.passed:
        return f"parity: {report.summary()}"
    try:
        again = bnfold.fold(result.module, inputs, capture=capture, check=False)  # type: ignore[arg-type]
    except BnfoldError as err:
        return f"second fold rejected the folded module: {err}"
    except Exception:
        return "second fold crashed: " + traceback.format_exc(limit=-3).replace("\n", " | ")
    if again.report.folded:
        return f"second fold folded again: {[e.id for e in again.report.folded]}"
    with torch.no_grad():
        first, second = result.module(*inputs), again.module(*inputs)
    if not torch.equal(first, second):
        return f"second fold changed the output (max diff {float((first - second).abs().max()):.3g})"
    return None
