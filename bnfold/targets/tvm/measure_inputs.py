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
    """``f_alloc_argument`` of ``ms.runner.LocalRunner``: MetaSchedule's own allocation
    (``alloc_argument_common``) with a fill that leaves floating point to its ``random_fill_for_measure`` and
    zero-fills integer and boolean tensors (module docstring)."""
    import numpy as np
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common
    from tvm.s_tir.meta_schedule.utils import get_global_func_with_default_on_worker

    random_fill = get_global_func_with_default_on_worker(name="tvm.contrib.random.random_fill_for_measure",
                                                         default=None)

    def fill(arg: Any) -> None:
        dtype = str(arg.dtype)
        if dtype.startswith(("int", "uint", "bool")):
            arg.copyfrom(np.zeros(tuple(arg.shape), dtype=dtype))
        else:
            random_fill(arg)

    return alloc_argument_common(fill, device, args_info, alloc_repeat)
