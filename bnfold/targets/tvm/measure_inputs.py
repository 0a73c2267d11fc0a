"""The arguments MetaSchedule's runner measures a candidate kernel on: random floats, and integer (and boolean)
arguments that are *valid*.

MetaSchedule's default (``default_alloc_argument``) fills every argument with random bits. A kernel that reads
an integer argument as an index — a gather (``take``: an embedding lookup, a position table, a causal mask's
``cumsum`` positions) — then reads far outside its table: the measuring subprocess segfaults ("LocalRunner: An
exception occurred … Subprocess terminated"), the trial is lost, and the worker is restarted for the next one —
on every trial of that kernel. Filled with zeros, integer arguments index the first element of whatever they
index (always in bounds: a tensor an index points into has at least one element along that axis, or the model
itself could not run), and boolean arguments are ``False``; floating-point arguments keep MetaSchedule's random
fill, so the arithmetic kernels are measured as before. A kernel's time does not depend on which in-bounds
elements it gathers at these sizes (every row of an embedding table is one contiguous load).

This module is imported by the runner's worker process (the function is pickled by reference): it imports TVM
only.
"""

from __future__ import annotations

from typing import Any

__all__ = ["valid_alloc_argument"]


def valid_alloc_argument(device: Any, args_info: Any, alloc_repeat: int) -> list[list[Any]]:
    """``f_alloc_argument`` of ``ms.runner.LocalRunner``: ``alloc_repeat`` argument lists, each tensor argument
    allocated on ``device`` — floating point randomly filled (MetaSchedule's ``random_fill_for_measure``),
    integer and boolean zero-filled (module docstring)."""
    import numpy as np
    import tvm
    from tvm.s_tir.meta_schedule.utils import get_global_func_with_default_on_worker

    random_fill = get_global_func_with_default_on_worker(name="tvm.contrib.random.random_fill_for_measure",
                                                         default=None)
    repeated: list[list[Any]] = []
    for _ in range(alloc_repeat):
        args: list[Any] = []
        for info in args_info:
            kind, dtype, shape = info[0], str(info[1]), [int(d) for d in info[2]]
            if kind != "TENSOR":
                raise NotImplementedError(f"argument kind {kind!r} (only tensors are measured)")
            if dtype.startswith(("int", "uint", "bool")):
                arg = tvm.runtime.tensor(np.zeros(shape, dtype=dtype), device=device)
            else:
                arg = tvm.runtime.empty(shape=shape, dtype=dtype, device=device)
                random_fill(arg)
            args.append(arg)
        repeated.append(args)
    return repeated
