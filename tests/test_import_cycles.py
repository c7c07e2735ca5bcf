"""No import cycles between the modules of ``moe_core``, ``trainer_hooks``, ``service`` or
``dashboards``.

The graph is read from the source with ``ast``, not by importing: every ``import`` and
``from ... import`` statement counts, at module level, inside functions and under
``if TYPE_CHECKING:`` alike (a cycle hidden behind a lazy import is still a cycle of design).
An edge ``a -> b`` means module ``a`` names module ``b``; ``from pkg import name`` points at
``pkg.name`` when that is a module, else at ``pkg``. Importing a submodule is not counted as
importing its parent package's ``__init__``, or every package with re-exports would be a cycle;
for the same reason a plain ``import pkg`` inside ``pkg.sub`` is no edge either (the package is
loaded before any of its modules runs: the statement only binds its name). ``from pkg import x``
inside ``pkg.sub`` does count: it reads names the package's ``__init__`` must already define.

The layers of ``service`` (which may import which) are import-linter's contracts in
pyproject.toml, run by ``make lint``; this test also sees cycles inside one layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WALKED = ("service", "trainer_hooks", "moe_core", "dashboards")
CHECKED = ("moe_core", "trainer_hooks", "service", "dashboards")


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the walked packages."""
    modules: dict[str, Path] = {}
    for package in WALKED:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The walked modules that ``module`` imports anywhere in its source."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            # A plain import of an enclosing package only binds a name already loaded.
            targets = [
                alias.name for alias in node.names if not module.startswith(f"{alias.name}.")
            ]
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                source = _resolve_relative(module, is_package, node.level, node.module)
            # `from pkg import sub` imports the submodule when there is one, else pkg itself.
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                for alias in node.names
            ]
        else:
            continue
        found.update(target for target in targets if target in known and target != module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _module_files()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]], nodes: set[str]) -> list[str] | None:
    """One cycle among ``nodes`` (edges leaving them ignored), as a closed path, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node] & nodes):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle is not None:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(nodes):
        if start not in state:
            cycle = visit(start)
            if cycle is not None:
                return cycle
    return None


def test_the_walk_sees_the_imports() -> None:
    """Guards the test itself: a walk that found no edges would pass vacuously."""
    graph = import_graph()
    assert "moe_core.dispatch" in graph["moe_core.moe"]
    assert "moe_core.config" in graph["moe_core.model"]
    assert "trainer_hooks.parts" in graph["trainer_hooks.recorder"]  # a function-level import
    assert "trainer_hooks.recorder" in graph["trainer_hooks"]  # under TYPE_CHECKING
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}, {"a", "b", "c"}) == [
        "a",
        "b",
        "c",
        "a",
    ]
    assert find_cycle({"a": {"b"}, "b": set()}, {"a", "b"}) is None


@pytest.mark.parametrize("package", CHECKED)
def test_no_import_cycle(package: str) -> None:
    graph = import_graph()
    nodes = {name for name in graph if name == package or name.startswith(f"{package}.")}
    assert nodes, f"no modules found for {package}"
    cycle = find_cycle(graph, nodes)
    assert cycle is None, f"import cycle in {package}: {' -> '.join(cycle or [])}"
