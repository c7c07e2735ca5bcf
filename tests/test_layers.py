"""Where SQL may be written and sessions opened, read from the source with ``ast``.

import-linter (pyproject.toml, run by ``make lint``) holds the layers: which package may
import which. It cannot see *what* a module takes from SQLAlchemy, so this test does: outside
``service/store`` a module may name a session's type, an engine's type or a database error,
never a statement builder (``select``, ``text``, ``insert``...), and only ``store/`` and
``services/`` open units of work (``session_scope``, ``Session(...)``, ``sessionmaker(...)``);
``api/deps.py`` hands the store's unit of work to a route and is the one exception.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICE = ROOT / "service"
# What code outside store/ may take from sqlalchemy: types to annotate with, errors to word.
TYPES_AND_ERRORS = {
    "Session",
    "sessionmaker",
    "Engine",
    "DBAPIError",
    "IntegrityError",
    "OperationalError",
    "TimeoutError",
    "ArgumentError",
    "SQLAlchemyError",
    "make_url",  # the CLI shows a database URL without its password
}
SESSION_OPENERS = {"session_scope", "Session", "sessionmaker", "make_sessionmaker"}
MAY_OPEN = ("service/store/", "service/services/", "service/api/deps.py", "service/app.py")


def _outside_store() -> list[Path]:
    return [p for p in sorted(SERVICE.rglob("*.py")) if "store" not in p.relative_to(SERVICE).parts]


def sqlalchemy_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every name imported from sqlalchemy or one of its modules; a bare
    ``import sqlalchemy`` is the name ``*`` (everything)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlalchemy":
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, "*") for a in node.names if a.name.split(".")[0] == "sqlalchemy"
            ]
    return found


def session_openings(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every call of a session opener, by its name or as an attribute."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = (
                f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            )
            if name in SESSION_OPENERS:
                found.append((node.lineno, name))
    return found


@pytest.mark.parametrize("path", _outside_store(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_sql_outside_the_store(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    wrong = [(line, n) for line, n in sqlalchemy_names(tree) if n not in TYPES_AND_ERRORS]
    assert not wrong, (
        f"{path.relative_to(ROOT)} takes SQL from sqlalchemy (move it to store/): {wrong}"
    )


@pytest.mark.parametrize(
    "path", sorted(SERVICE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_units_of_work_opened_by_the_store_and_the_services(path: Path) -> None:
    rel = str(path.relative_to(ROOT))
    if rel.startswith(MAY_OPEN):
        return
    opened = session_openings(ast.parse(path.read_text(), rel))
    assert not opened, f"{rel} opens a session (a service should): {opened}"


def test_the_checks_see_what_they_look_for() -> None:
    """Each check finds its case in a made-up module, so a pass above means something."""
    bad = ast.parse(
        "from sqlalchemy import select, Engine\n"
        "import sqlalchemy.orm\n"
        "def f(factory):\n"
        "    with session_scope(factory) as s:\n"
        "        return orm.Session(bind=None)\n"
    )
    names = sqlalchemy_names(bad)
    assert [n for _, n in names if n not in TYPES_AND_ERRORS] == ["select", "*"]
    assert session_openings(bad) == [(4, "session_scope"), (5, "Session")]
