"""TVM's CPU thread pool, configured through its environment variables before the pool starts."""

from __future__ import annotations

import os

__all__ = ["THREAD_ENV_DEFAULTS", "configure_threads"]

#: TVM thread-pool settings bnfold applies unless the user set them (see :func:`configure_threads`).
THREAD_ENV_DEFAULTS = {"TVM_BIND_THREADS": "0", "TVM_THREAD_POOL_SPIN_COUNT": "1000"}


def configure_threads(num_cores: int | None = None) -> int:
    """Give TVM's thread pool ``num_cores`` threads (default: the usable physical cores), unpinned, spinning
    briefly.

    TVM otherwise takes ``hardware_concurrency / 2`` threads on x86 (1 on a 2-vCPU machine), or
    ``OMP_NUM_THREADS`` if set; pins them *and the calling thread* to cores (which later confines PyTorch's
    threads to one core); and lets idle workers spin 300000 times after every kernel (each spin a
    ``sched_yield``: a few hundred milliseconds). Long spinning fights PyTorch's (and everyone else's) threads
    for the cores: measured here under load, a tuned 3x3 conv took 8.0 ms with it and 1.6 ms without. Not
    spinning at all costs a sleeping worker's wake-up at every kernel: resnet18 14.0 → 12.0 ms and mobilenet_v2
    (60 kernels) 5.5 → 3.9 ms with 1000 spins (~1 ms of yielding after the last kernel), medians of 3 alternated
    processes each. An explicit ``TVM_NUM_THREADS`` / ``TVM_BIND_THREADS`` / ``TVM_THREAD_POOL_SPIN_COUNT`` wins.
    Takes effect for pools created afterwards (TVM creates its pool at the first parallel kernel).
    """
    from bnfold.targets.tvm.target import usable_cores

    n = num_cores or usable_cores()
    os.environ.setdefault("TVM_NUM_THREADS", str(n))
    for k, v in THREAD_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    return int(os.environ["TVM_NUM_THREADS"])
