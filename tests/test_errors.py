"""Errors keep their cause: every exception bnfold raises while handling another is chained to it (``raise ...
from exc``), so ``-v``, ``BNFOLD_DEBUG=1`` and a debugger show what a library really said. Checked on the source,
so a new ``from None`` or an unchained wrap fails here, with the file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import bnfold

PACKAGE = Path(bnfold.__file__).parent


def unchained_raises(source: str) -> list[tuple[int, str]]:
    """``(line, why)`` of each ``raise X`` inside an ``except`` handler (not in a nested function) that neither
    re-raises the handled exception nor chains it: no ``from``, or ``from None``."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, handler: ast.ExceptHandler | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child if isinstance(child, ast.ExceptHandler) else handler
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
                inner = None
            if isinstance(child, ast.Raise) and handler is not None and child.exc is not None:
                reraise = isinstance(child.exc, ast.Name) and child.exc.id == handler.name
                if not reraise and child.cause is None:
                    found.append((child.lineno, "no 'from'"))
                elif isinstance(child.cause, ast.Constant) and child.cause.value is None:
                    found.append((child.lineno, "'from None' drops the cause"))
            visit(child, inner)

    visit(ast.parse(source), None)
    return found


def test_the_audit_sees_both_ways_of_losing_a_cause() -> None:
    source = ("try:\n    f()\nexcept ValueError as exc:\n    raise KeyError('a') from None\n"
              "try:\n    f()\nexcept ValueError:\n    raise KeyError('b')\n"
              "try:\n    f()\nexcept ValueError as exc:\n    raise KeyError('c') from exc\n"
              "try:\n    f()\nexcept ValueError as exc:\n    raise exc\n")
    assert unchained_raises(source) == [(4, "'from None' drops the cause"), (8, "no 'from'")]


def test_every_wrapped_exception_keeps_its_cause() -> None:
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line}: {why}"
           for path in sorted(PACKAGE.rglob("*.py")) for line, why in unchained_raises(path.read_text())]
    assert not bad, "raise ... from exc (keep the cause):\n" + "\n".join(bad)
