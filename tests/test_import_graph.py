"""The package's import graph, read with ``ast`` (every import statement, at module level or inside
a function): dependencies between the subpackages point one way, along the table ``ALLOWED``, and
no module imports itself through others."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "alphafuse_dist"
PACKAGE = "alphafuse_dist"

# subpackage (or top-level module) -> what it may import; "__init__" is the package root
# (``__version__``). Lower layers first: every entry names only entries above it in this table.
ALLOWED: dict[str, set[str]] = {
    "__init__": set(),
    "errors": set(),
    "presets": set(),
    "config": {"errors"},
    "configref": {"config"},
    "runtime": {"__init__", "errors", "config"},
    "embed": {"errors", "config", "runtime"},
    "data": {"errors", "config", "runtime", "embed"},
    "decompose": {"errors", "config", "runtime"},
    "model": {"errors", "config", "runtime", "decompose"},
    "evaluate": {"errors", "config", "runtime", "data", "model"},
    "train": {"errors", "config", "runtime", "data", "decompose", "model", "evaluate"},
    "serve": {"__init__", "errors", "config", "runtime", "data", "embed", "decompose", "model", "evaluate",
              "train"},
    "pipeline": {"__init__", "errors", "config", "runtime", "data", "embed", "decompose", "model",
                 "evaluate", "train", "serve"},
    "retrain": {"__init__", "errors", "config", "runtime", "data", "embed", "decompose", "model",
                "evaluate", "train", "serve", "pipeline"},
    "tune": {"errors", "config", "runtime", "train", "pipeline"},
    "cli": {"__init__", "errors", "config", "configref", "runtime", "data", "embed", "decompose",
            "model", "evaluate", "train", "serve", "pipeline", "retrain", "tune"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports (a ``from X import y`` names X.y where that is a
    module, else X)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        else:
            continue
        out |= {t for t in targets if t == PACKAGE or t.startswith(PACKAGE + ".")}
    return out - {name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _unit(module: str) -> str:
    """The ``ALLOWED`` entry of a module: its subpackage or top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _package_edges() -> set[tuple[str, str]]:
    return {(_unit(a), _unit(b)) for a, targets in _graph().items() for b in targets if _unit(a) != _unit(b)}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_allowed_table_is_layered():
    """Every entry of ALLOWED names only entries listed before it, so the table has no cycle."""
    order = list(ALLOWED)
    for unit, deps in ALLOWED.items():
        assert all(order.index(d) < order.index(unit) for d in deps), unit


def test_every_module_belongs_to_a_listed_unit():
    assert {_unit(m) for m in _modules()} <= set(ALLOWED)


def test_package_dependencies_follow_the_table():
    wrong = sorted((a, b) for a, b in _package_edges() if b not in ALLOWED[a])
    assert not wrong, f"imports against the layering: {wrong}"


def test_modules_have_no_import_cycle():
    graph = _graph()
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"
