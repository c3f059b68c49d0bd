"""The migration commands of the CLI use only public APIs: of ``migrations_helpers`` the names in
its ``__all__``, of the core the names in ``sqlalchemy_cmk.__all__`` (never ``_keys``,
``_format``, ``_mapping`` or any other private module). Checked on the source with ``ast``, for
``sqlalchemy_cmk/cli/migrate.py`` and every module of the CLI package it imports, so that a
private name cannot come in through a helper module either."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import migrations_helpers
import sqlalchemy_cmk

CLI = Path(sqlalchemy_cmk.__file__).parent / "cli"
PUBLIC = {
    "migrations_helpers": set(migrations_helpers.__all__),
    "sqlalchemy_cmk": set(sqlalchemy_cmk.__all__),
}


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` in ``sqlalchemy_cmk.cli.<module>`` names."""
    if node.level == 0:
        return node.module or ""
    parts = ["sqlalchemy_cmk", "cli"][: 2 - (node.level - 1)]
    return ".".join([*parts, *([node.module] if node.module else [])])


def violations(module: str, source: str) -> tuple[list[str], set[str]]:
    """What ``sqlalchemy_cmk.cli.<module>`` imports against the rule, and the CLI modules it
    imports (to be checked in turn)."""
    bad: list[str] = []
    siblings: set[str] = set()
    aliases: dict[str, str] = {}  # a name bound by `import migrations_helpers [as x]`
    tree = ast.parse(source)
    for node in ast.walk(tree):  # function-level (lazy) imports too
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in PUBLIC:
                    if alias.name != top:
                        bad.append(f"import {alias.name}")
                    aliases[alias.asname or top] = top
        elif isinstance(node, ast.ImportFrom):
            where = _absolute(module, node)
            top = where.split(".")[0]
            if where.startswith("sqlalchemy_cmk.cli."):
                siblings.add(where.removeprefix("sqlalchemy_cmk.cli."))
                continue
            if where == "sqlalchemy_cmk.cli":  # `from . import x`: sibling modules
                siblings.update(a.name for a in node.names)
                continue
            if top not in PUBLIC:
                continue  # the standard library, SQLAlchemy
            if where != top:
                bad.append(f"from {where} import ...")
                continue
            bad.extend(
                f"from {where} import {a.name}" for a in node.names if a.name not in PUBLIC[top]
            )
    for node in ast.walk(tree):  # migrations_helpers.backfill.x through a module alias
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr not in PUBLIC[aliases[node.value.id]]
        ):
            bad.append(f"{node.value.id}.{node.attr}")
    return bad, siblings


def checked_modules() -> dict[str, list[str]]:
    """Every module the rule covers (migrate and what it imports of the CLI), with its
    violations."""
    found: dict[str, list[str]] = {}
    todo = ["migrate"]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        bad, siblings = violations(name, (CLI / f"{name}.py").read_text())
        found[name] = bad
        todo.extend(siblings)
    return found


def test_the_migration_commands_import_only_public_names() -> None:
    found = checked_modules()
    assert {"migrate", "_common", "_progress"} <= set(found)
    assert {name: bad for name, bad in found.items() if bad} == {}


def test_every_public_name_of_migrations_helpers_resolves() -> None:
    """``__all__`` promises names: each loads (lazily) and is what its home module defines."""
    from migrations_helpers import backfill

    for name in migrations_helpers.__all__:  # the Alembic operations need the test extra's Alembic
        value = getattr(migrations_helpers, name)
        if name in backfill.__all__:
            assert value is getattr(backfill, name), name
    with pytest.raises(sqlalchemy_cmk.ConfigurationError, match="cannot import"):
        migrations_helpers.load_cmk("nope_xyz:cmk")


@pytest.mark.parametrize(
    "source",
    [
        "from migrations_helpers.backfill import encrypt_columns",
        "from migrations_helpers import _HOMES",
        "import migrations_helpers.backfill",
        "import migrations_helpers as mh\nmh.backfill.verify",
        "from sqlalchemy_cmk._keys import DataKey",
        "from .._mapping import is_tenant_column",
        "from ..errors import ConfigurationError",
        "def f():\n    from sqlalchemy_cmk import _format",
    ],
)
def test_the_check_catches_a_private_import(source: str) -> None:
    """The rule can fail: each of these is one violation."""
    bad, _ = violations("migrate", source)
    assert len(bad) == 1, (source, bad)


def test_the_check_follows_sibling_modules() -> None:
    _, siblings = violations("migrate", "from ._common import _fail\nfrom . import _progress")
    assert siblings == {"_common", "_progress"}


def test_python_dash_m_runs_the_command() -> None:
    """``python -m sqlalchemy_cmk.cli`` (the package's ``__main__``) is the console script."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    outputs = {}
    for argv, status in ((("--help",), 0), (("rotate", "--table"), 2)):
        done = subprocess.run(
            [sys.executable, "-m", "sqlalchemy_cmk.cli", *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == status, done.stderr
        assert "Traceback" not in done.stderr
        outputs[argv] = done
    assert "encrypt-column" in outputs[("--help",)].stdout
    assert outputs[("rotate", "--table")].stderr.startswith("sqlalchemy-cmk: error: ")
