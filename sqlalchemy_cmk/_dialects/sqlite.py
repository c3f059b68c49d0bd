"""SQLite: no row locks, a random() over 64-bit integers, and columns that hold any type."""

from __future__ import annotations

from typing import Any

from sqlalchemy import DateTime, LargeBinary, String, TypeDecorator, cast, func
from sqlalchemy.sql.elements import ColumnElement

from . import DialectSupport


class SQLiteSupport(DialectSupport):
    """SQLite."""

    row_locks = False

    def raw_column(self, col: ColumnElement[Any]) -> ColumnElement[Any]:
        # A column may hold any type, and the driver raises on TEXT that is not UTF-8, failing
        # the whole result: text is read as a BLOB and decoded by the caller.
        typ = col.type
        if isinstance(typ, TypeDecorator):  # ExactString, Timestamp
            typ = typ.impl_instance
        if isinstance(typ, String | DateTime):
            return cast(col, LargeBinary).label(col.name)
        return super().raw_column(col)

    def same(self, col: ColumnElement[Any], value: ColumnElement[Any]) -> ColumnElement[bool]:
        # A column declared COLLATE NOCASE (or RTRIM) compares folded; BINARY is exact. SQLite
        # walks without row locks, so a write can land between a batch's read and its swap.
        if isinstance(col.type, String):
            return col.collate("BINARY").is_not_distinct_from(value)
        return col.is_not_distinct_from(value)

    def random_below(self, fraction: float) -> ColumnElement[bool]:
        # random() is a signed 64-bit integer here, not a fraction.
        return func.abs(func.random()) % 1_000_000 < int(fraction * 1_000_000)


SQLITE = SQLiteSupport()
