"""Which columns of a table or mapped class are encrypted, and where their companion is."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table
from sqlalchemy.orm import Mapper
from sqlalchemy.sql import FromClause

from ._codecs import Codec
from .errors import ConfigurationError
from .types import EDEKType, EncryptedType


@dataclass(frozen=True, eq=False)  # identity hash: specs are cached singletons
class ColumnSpec:
    key: str  # attribute key on the mapped class (the column name for Core tables)
    name: str  # column name in the database; bound into the associated data
    codec: Codec
    max_length: int | None = None  # String(n): enforced here, since the stored column is binary


@dataclass(frozen=True, eq=False)
class TableSpec:
    table: str  # table name (without schema); bound into the associated data
    companion_key: str
    companion_name: str
    columns: tuple[ColumnSpec, ...]

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


@dataclass(frozen=True)
class MapperSpec:
    tables: tuple[TableSpec, ...]


_NO_SPEC = MapperSpec(())
_mapper_specs: weakref.WeakKeyDictionary[Mapper[Any], MapperSpec] = weakref.WeakKeyDictionary()
_table_specs: weakref.WeakKeyDictionary[FromClause, TableSpec | None] = weakref.WeakKeyDictionary()


def _table_spec(table: FromClause, keys: dict[str, str] | None, owner: str) -> TableSpec | None:
    encrypted = [c for c in table.columns if isinstance(c.type, EncryptedType)]
    if not encrypted:
        return None
    companions = [c for c in table.columns if isinstance(c.type, EDEKType)]
    name = getattr(table, "name", str(table))
    if len(companions) != 1:
        what = "no" if not companions else "more than one"
        raise ConfigurationError(
            f"{owner} has encrypted columns in table {name!r} but {what} companion EDEK "
            "column: give the table exactly one, e.g. inherit sqlalchemy_cmk.EncryptedMixin or "
            "declare `cmk_edek: Mapped[bytes | None] = mapped_column(EDEKType())`",
            table=name,
        )
    comp = companions[0]
    mapped = keys if keys is not None else {c.name: c.name for c in table.columns}
    if comp.name not in mapped or any(c.name not in mapped for c in encrypted):
        raise ConfigurationError(
            f"{owner}: the companion and encrypted columns of {name!r} must all be mapped",
            table=name,
        )
    cols = tuple(
        ColumnSpec(
            mapped[c.name],
            c.name,
            c.type.codec,  # type: ignore[attr-defined]
            getattr(c.type.underlying, "length", None),  # type: ignore[attr-defined]
        )
        for c in encrypted
    )
    return TableSpec(name, mapped[comp.name], comp.name, cols)


def table_spec(table: Table) -> TableSpec | None:
    """The spec of a Core table; ConfigurationError if encrypted columns lack a companion."""
    try:
        return _table_specs[table]
    except KeyError:
        spec = _table_spec(table, None, f"table {table.name!r}")
        _table_specs[table] = spec
        return spec


def mapper_spec(mapper: Mapper[Any]) -> MapperSpec:
    """The spec of a mapped class (every table of an inheritance chain); cached."""
    spec = _mapper_specs.get(mapper)
    if spec is not None:
        return spec
    keys: dict[Any, dict[str, str]] = {}
    for prop in mapper.column_attrs:
        for col in prop.columns:
            if col.table is not None:
                keys.setdefault(col.table, {})[col.name] = prop.key
    tables = []
    for table in mapper.tables:
        t = _table_spec(table, keys.get(table, {}), f"model {mapper.class_.__name__}")
        if t is not None:
            tables.append(t)
    spec = MapperSpec(tuple(tables)) if tables else _NO_SPEC
    _mapper_specs[mapper] = spec
    return spec
