"""Upserts written as each dialect spells them, for the tests that check the hooks refuse them.

PostgreSQL and SQLite: ``INSERT ... ON CONFLICT (id) DO UPDATE SET ...`` (``excluded``);
MySQL and MariaDB: ``INSERT ... ON DUPLICATE KEY UPDATE ...`` (``inserted``), and ``INSERT
IGNORE`` for ``ON CONFLICT DO NOTHING``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.dialects import mysql, postgresql, sqlite


def upsert(engine: Engine, target: Any, set_: Callable[[Any], dict[str, Any]]) -> Any:
    """An insert into ``target`` that updates ``set_(proposed)`` on a primary key conflict.

    ``proposed`` is the row the INSERT proposed (``excluded`` or ``inserted``).
    """
    if engine.dialect.name == "mysql":
        stmt = mysql.insert(target)
        return stmt.on_duplicate_key_update(set_(stmt.inserted))
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(target)
    return stmt.on_conflict_do_update(index_elements=["id"], set_=set_(stmt.excluded))


def insert_or_ignore(engine: Engine, target: Any) -> Any:
    """An insert into ``target`` that skips the rows whose key exists."""
    if engine.dialect.name == "mysql":
        return mysql.insert(target).prefix_with("IGNORE")
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    return dialect.insert(target).on_conflict_do_nothing()
