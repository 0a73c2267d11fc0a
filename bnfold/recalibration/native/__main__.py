"""``python -m bnfold.recalibration.native``: build (or find) the native statistics kernel now, as the README's install
commands do, so that no user call pays the build. Exit 0 when the kernel is ready, 1 when it cannot be built
here (bnfold then uses the torch fallback: same statistics, slower)."""

from __future__ import annotations

import logging
import sys
import time


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from bnfold.recalibration.native import native_ops

    start = time.perf_counter()
    ok = native_ops() is not None
    seconds = time.perf_counter() - start
    print(f"bnfold native kernel: {'ready' if ok else 'not built (torch fallback)'} ({seconds:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
