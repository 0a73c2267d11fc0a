"""How many MetaSchedule trials each tuning task gets.

MetaSchedule's task scheduler takes one ``max_trials_per_task`` for all tasks, and silently skips tasks when
``total_trials < max_trials_per_task * number_of_tasks``. bnfold instead splits the user's total budget
*per task* and runs one scheduler pass per distinct per-task budget, so that

* every task gets at least a floor of trials (an untuned CPU kernel is ~40x slower than a tuned one: no
  task may be left out), and
* the rest of the budget goes to the tasks that dominate latency, in proportion to their cost: their share
  of the model's time (occurrences × best measured time, once the database has measured them; FLOPs ×
  occurrences before that, see :func:`bnfold.targets.tvm.tuning.latency_costs`).

Budgets snap to a short ladder (1, 2, 3, 4, 6, 8, 12, 16, 24, ...) so a model needs only a few scheduler
passes; the snapped total never exceeds the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["LADDER", "allocate_trials", "group_by_budget", "min_trials"]


def _ladder(limit: int = 1 << 16) -> tuple[int, ...]:
    steps = [1, 2, 3]
    p = 4
    while p <= limit:
        steps += [p, p * 3 // 2]
        p *= 2
    return tuple(steps)


#: Allowed per-task budgets.
LADDER: tuple[int, ...] = _ladder()


def min_trials(num_tasks: int) -> int:
    """The smallest total budget that tunes every task at least once."""
    return num_tasks


def _snap_down(x: float) -> int:
    best = 1
    for s in LADDER:
        if s <= x + 1e-9:
            best = s
        else:
            break
    return best


def _next_step(x: int) -> int | None:
    for s in LADDER:
        if s > x:
            return s
    return None


def allocate_trials(costs: Sequence[float], total: int, *, floor_fraction: float = 0.25,
                    max_floor: int = 8) -> list[int]:
    """Per-task trial budgets for tasks of the given ``costs`` (``flops × occurrences``), summing to ≤ ``total``.

    Each task first gets a floor of ``min(max_floor, floor_fraction × total / n)`` trials (at least 1); the
    remaining budget is split in proportion to cost; each budget snaps down to :data:`LADDER`; then the
    costliest tasks are bumped up the ladder while the budget allows. Raises ``ValueError`` if ``total`` is
    smaller than the number of tasks.
    """
    n = len(costs)
    if n == 0:
        return []
    if total < n:
        raise ValueError(f"a budget of {total} trials cannot tune {n} tasks (need at least {n})")
    weights = [max(0.0, float(c)) if math.isfinite(c) else 0.0 for c in costs]
    floor = max(1, min(max_floor, int(floor_fraction * total / n)))
    spare = total - floor * n
    csum = sum(weights)
    raw = [floor + (spare * w / csum if csum > 0 else spare / n) for w in weights]
    alloc = [_snap_down(r) for r in raw]
    remaining = total - sum(alloc)
    order = sorted(range(n), key=lambda i: (-weights[i], i))
    bumped = True
    while bumped and remaining > 0:
        bumped = False
        for i in order:
            nxt = _next_step(alloc[i])
            if nxt is not None and nxt - alloc[i] <= remaining and nxt <= max(raw[i] * 1.5, alloc[i] + 1):
                remaining -= nxt - alloc[i]
                alloc[i] = nxt
                bumped = True
    return alloc


def group_by_budget(alloc: Sequence[int]) -> list[tuple[int, list[int]]]:
    """``[(budget, [task indices])]``, largest budget first (one MetaSchedule pass each); zeros dropped."""
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(alloc):
        if b > 0:
            groups.setdefault(b, []).append(i)
    return sorted(groups.items(), key=lambda kv: -kv[0])
