"""The package layout's two rules, checked on the source with ``ast`` (nothing is imported):

* no import circles between bnfold's modules (issue 11: parity↔localize, tvm_cache↔tvm_tuning and demo/run↔its
  stages were such circles);
* no private name (``_foo``) imported from another module: what a module shares is public (in its ``__all__``).

Every ``import bnfold...`` / ``from bnfold... import`` counts, wherever it stands: at module level, under
``if TYPE_CHECKING:`` (a circle for the type checker is still a circle in the design) and inside functions (a
lazy import only postpones the circle). One exception: ``bnfold/__init__.py`` is the lazy facade of the public
API (PEP 562); its imports exist for type checkers only, and every module may import ``bnfold`` itself (for
``__version__``), so its outgoing edges are not part of the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bnfold"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    """The module ``name`` lives in: itself when it is a module, else its longest module prefix."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str) -> list[tuple[str, str, int]]:
    """``(imported module, imported name or "", line)`` for every bnfold import in ``module``."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(_resolve(a.name), "", node.lineno) for a in node.names if a.name.split(".")[0] == "bnfold"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != "bnfold":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in MODULES:  # `from bnfold.pkg import submodule`
                    out.append((full, "", node.lineno))
                else:
                    out.append((_resolve(base), alias.name, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        if module == "bnfold":
            continue
        graph[module] = {target for target, _, _ in _imports(module) if target != module}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (as a path that ends where it starts), or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*stack[stack.index(n):], n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_graph_is_read() -> None:
    """The checker sees the package: a known edge is in the graph (so an empty graph cannot pass silently)."""
    graph = _graph()
    assert "bnfold.ir.graph" in graph["bnfold.capture"]
    assert "bnfold.ir.linear_ops" in graph["bnfold.capture.tracer"]  # capture asks ir, not passes, what a conv is
    assert len(graph) > 50


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles() -> None:
    cycle = _find_cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_private_names_imported_across_modules() -> None:
    found = [f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}: {name} from {target}"
             for m in MODULES for target, name, line in _imports(m)
             if name.startswith("_") and not (name.startswith("__") and name.endswith("__")) and target != m]
    assert not found, "private names imported from another module:\n" + "\n".join(found)


def test_lower_layers_do_not_import_upper_ones() -> None:
    """``bnfold.ir`` is the bottom: it imports only itself and ``bnfold.errors``; passes never import the
    subsystems that use them (recalibrate, parity, targets, io, cli)."""
    graph = _graph()
    upper = ("bnfold.passes", "bnfold.recalibration", "bnfold.parity", "bnfold.targets", "bnfold.io", "bnfold.cli",
             "bnfold.api", "bnfold.deploy", "bnfold.capture", "bnfold.demo")
    bad = [f"{m} -> {t}" for m, targets in graph.items() if m.startswith("bnfold.ir")
           for t in targets if t.startswith(upper)]
    bad += [f"{m} -> {t}" for m, targets in graph.items() if m.startswith("bnfold.passes")
            for t in targets if t.startswith(upper[1:])]
    assert not bad, "\n".join(bad)
