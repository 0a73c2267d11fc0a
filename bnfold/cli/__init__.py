"""The ``bnfold`` command line. Library code never prints; this package owns the terminal.

:func:`main` parses the arguments and runs one subcommand of :mod:`bnfold.cli.commands` (each imported only when
it runs, so ``bnfold --help`` and ``--version`` never import torch).

Exit codes: 0 success, 1 a check failed (parity), 2 bad input or usage, 3 internal error, 130 interrupted.

An error is one message for people; what caused it (the library exception bnfold wrapped, chained with
``raise ... from``) is shown with ``-v`` (the chain, a line each) and with ``-vv`` or ``BNFOLD_DEBUG=1`` (the full
traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any

from bnfold import __version__
from bnfold.errors import BnfoldError, InternalError

__all__ = ["build_parser", "main"]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser. With ``command`` (a name in :data:`bnfold.cli.commands.SUMMARY`), that command's module is imported
    and registers its full arguments; without, every command is listed from the summary alone (no torch)."""
    import importlib

    from bnfold.cli.commands import SUMMARY

    parser = argparse.ArgumentParser(prog="bnfold", description="Fold normalization layers into conv/linear "
                                     "ops exactly, recalibrate, compile and verify.")
    parser.add_argument("--version", action="version", version=f"bnfold {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if command in SUMMARY:
        importlib.import_module(f"bnfold.cli.commands.{SUMMARY[command][0]}").register(sub)
    else:
        for name, (_, summary) in SUMMARY.items():
            sub.add_parser(name, help=summary)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def _debug() -> bool:
    """``BNFOLD_DEBUG`` set to anything but empty or 0: show full tracebacks."""
    return os.environ.get("BNFOLD_DEBUG", "") not in ("", "0")


def causes(err: BaseException) -> list[str]:
    """What led to ``err``, outermost first: ``Type: first line`` of each exception in its ``__cause__`` chain
    (or, failing that, the ``__context__`` it was raised in), without repeats."""
    out: list[str] = []
    seen = {id(err)}
    cause = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        out.append(f"{type(cause).__module__}.{type(cause).__qualname__}: {first}".replace("builtins.", ""))
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    return out


def _explain(err: BaseException, verbose: int) -> None:
    """Print what caused ``err`` as much as ``-v`` / ``-vv`` / ``BNFOLD_DEBUG`` ask."""
    if verbose >= 2 or _debug():
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    elif verbose >= 1:
        for line in causes(err):
            print(f"  caused by: {line}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); the exit code. Ctrl-C at any point — also while a
    command's modules (torch, ONNX, TVM) are still being imported — is exit 130 with one line, never a traceback."""
    with _SigintWatch() as watch:
        try:
            return _main(argv, watch)
        except BaseException as exc:
            if not isinstance(exc, KeyboardInterrupt) and not watch.seen:
                raise
            print("bnfold: interrupted", file=sys.stderr)
            return 130


class _SigintWatch:
    """While the CLI runs, Ctrl-C raises ``KeyboardInterrupt`` as usual and is also remembered (``seen``): an
    interrupted import can surface as another exception (numpy, cut short in its ``__getattr__``, raises
    ``RecursionError``), which must end as an interrupt too, not as a traceback or an internal error."""

    def __init__(self) -> None:
        self.seen = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.seen = True
        if _importing(frame):  # an exception raised into a C++ extension's initialization aborts the process
            sys.stderr.write("bnfold: interrupted\n")  # (pybind11: SIGABRT): leave at once, nothing is written yet
            sys.stderr.flush()
            os._exit(130)
        raise KeyboardInterrupt

    def __enter__(self) -> _SigintWatch:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _importing(frame: Any) -> bool:
    """Whether ``frame`` (where a signal arrived) runs inside an import: a module's top level, torch's or an
    extension's initialization, below ``importlib``'s frames."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _main(argv: Sequence[str] | None, watch: _SigintWatch) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except InternalError as err:  # a pass raised: our bug, named with the pass and node (exit 3, not 2)
        logging.getLogger("bnfold").debug("internal error", exc_info=True)
        print(f"bnfold {args.command}: internal error: {err}\n"
              "  this is a bnfold bug; rerun with -vv for the traceback and report it", file=sys.stderr)
        if args.verbose < 2:  # -vv logged the traceback above
            _explain(err, args.verbose)
        return 3
    except BnfoldError as err:
        print(f"bnfold {args.command}: error: {err}", file=sys.stderr)
        _explain(err, args.verbose)
        return 2
    except (OSError, MemoryError) as err:
        print(f"bnfold {args.command}: error: {err}", file=sys.stderr)
        _explain(err, args.verbose)
        return 2
    except Exception as err:  # a bug in bnfold, not the user's fault: say so, keep the trace for -v
        if watch.seen:  # not a bug: what an interrupted import left behind
            raise
        logging.getLogger("bnfold").debug("internal error", exc_info=True)
        print(f"bnfold {args.command}: internal error: {type(err).__name__}: {err}\n"
              "  this is a bnfold bug; rerun with -vv for the traceback and report it", file=sys.stderr)
        if args.verbose < 2:  # -vv logged the traceback above
            _explain(err, args.verbose)
        return 3
