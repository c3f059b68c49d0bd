"""Which columns of a table or mapped class are encrypted, and where their companion is."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
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
    search: tuple[Any, ...] = ()  # its blind indexes (_search.SearchSpec)


@dataclass(frozen=True, eq=False)
class TableSpec:
    table: str  # table name (without schema); bound into the associated data
    companion_key: str
    companion_name: str
    columns: tuple[ColumnSpec, ...]
    tenant_column: str | None = None  # name of the declared plaintext tenant column, if any

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


#: ``Column.info`` marker of a model's tenant column: see :func:`tenant_column`.
TENANT_INFO = ("sqlalchemy_cmk", "tenant")


def tenant_column(type_: Any = None, **kwargs: Any) -> Any:
    """Declare a model's plaintext tenant column, so that every write and load is checked.

    A ``mapped_column`` marked as the row's tenant. On every flush, a new row whose tenant is
    ``None`` gets the context tenant, and a row whose tenant differs from the context tenant
    (or whose tenant changes) is refused with :class:`~sqlalchemy_cmk.TenantMismatchError`; on
    every load, the tenant the row's key is bound to must equal this column. The migration
    tools take it as the default ``tenant_column``.

    Args:
        type_: The column type; default ``String(255)``.
        **kwargs: Passed to ``mapped_column`` (``nullable`` defaults to ``False``).

    Example::

        tenant_id: Mapped[str] = tenant_column()
    """
    from sqlalchemy import String
    from sqlalchemy.orm import mapped_column

    from ._search import listen_tenant_columns

    kwargs.setdefault("nullable", False)
    info = dict(kwargs.pop("info", None) or {})
    info[TENANT_INFO[0]] = TENANT_INFO[1]
    made = mapped_column(String(255) if type_ is None else type_, info=info, **kwargs)
    # A searchable column declared before the tenant column gets its indexes when this joins.
    listen_tenant_columns(made.column)
    return made


def is_tenant_column(column: Any) -> bool:
    info: dict[Any, Any] | None = getattr(column, "info", None)
    return info is not None and info.get(TENANT_INFO[0]) == TENANT_INFO[1]


@dataclass(frozen=True, eq=False)
class RowLookup:
    """How to address one table's row of a mapped instance: by that table's own primary key.

    In joined inheritance the identity is the base table's key; a subclass table's key columns
    hold the same values, so ``ident_index`` maps each of its columns to a place in the identity.
    """

    pk: tuple[Any, ...]  # the table's own primary key columns
    ident_index: tuple[int, ...]
    companion: Any  # the table's companion column


@dataclass(frozen=True)
class MapperSpec:
    tables: tuple[TableSpec, ...]
    lookups: tuple[RowLookup, ...] = ()  # parallel to ``tables``
    tenant_key: str | None = None  # attribute key of the declared tenant column
    # Derived, as plain fields: the flush reads them for every row.
    active: bool = field(init=False)  # any work for the hooks: encrypted or tenant columns
    pairs: tuple[tuple[TableSpec, RowLookup], ...] = field(init=False)
    slot_keys: tuple[str, ...] = field(init=False)  # attribute keys of blind index slots

    def __post_init__(self) -> None:
        object.__setattr__(self, "active", bool(self.tables) or self.tenant_key is not None)
        object.__setattr__(self, "pairs", tuple(zip(self.tables, self.lookups, strict=True)))
        slots = [k for t in self.tables for c in t.columns for s in c.search for k in s.keys]
        object.__setattr__(self, "slot_keys", tuple(slots))


_NO_SPEC = MapperSpec(())
_mapper_specs: weakref.WeakKeyDictionary[Mapper[Any], MapperSpec] = weakref.WeakKeyDictionary()
_table_specs: weakref.WeakKeyDictionary[FromClause, TableSpec | None] = weakref.WeakKeyDictionary()


def has_encrypted_columns(mapper: Mapper[Any]) -> bool:
    return any(isinstance(c.type, EncryptedType) for t in mapper.tables for c in t.columns)


def _table_spec(table: FromClause, keys: dict[str, str] | None, owner: str) -> TableSpec | None:
    mapped = keys if keys is not None else {c.name: c.name for c in table.columns}
    # Only the columns this mapper maps: in single-table inheritance the base class does not
    # map a subclass's encrypted column, and must not need to.
    encrypted = [c for c in table.columns if isinstance(c.type, EncryptedType) and c.name in mapped]
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
    if comp.name not in mapped:
        raise ConfigurationError(
            f"{owner}: the companion column of {name!r} must be mapped with its encrypted columns",
            table=name,
        )
    from ._search import specs_for

    cols = tuple(
        ColumnSpec(
            mapped[c.name],
            c.name,
            c.type.codec,  # type: ignore[attr-defined]
            getattr(c.type.underlying, "length", None),  # type: ignore[attr-defined]
            specs_for(table, c, mapped),  # type: ignore[arg-type]
        )
        for c in encrypted
    )
    tenant = next((c.name for c in table.columns if is_tenant_column(c)), None)
    if tenant is None and any(c.search for c in cols):
        raise ConfigurationError(
            f"{owner}: {name!r} has a searchable (blind-indexed) column, so it needs a tenant "
            "column: declare `tenant_id: Mapped[str] = tenant_column()`; searches and unique "
            "indexes are per tenant",
            table=name,
        )
    return TableSpec(name, mapped[comp.name], comp.name, cols, tenant)


def table_spec(table: Table) -> TableSpec | None:
    """The spec of a Core table; ConfigurationError if encrypted columns lack a companion."""
    try:
        return _table_specs[table]
    except KeyError:
        spec = _table_spec(table, None, f"table {table.name!r}")
        _table_specs[table] = spec
        return spec


def _lookup(mapper: Mapper[Any], table: FromClause, companion_key: str) -> RowLookup:
    ident_props = [mapper.get_property_by_column(c) for c in mapper.primary_key]
    pk: tuple[Any, ...] = tuple(table.primary_key)
    index = []
    for col in pk:
        prop = mapper.get_property_by_column(col)
        if prop not in ident_props:
            pk = ()
            break
        index.append(ident_props.index(prop))
    if not pk:
        name = getattr(table, "name", str(table))
        raise ConfigurationError(
            f"model {mapper.class_.__name__}: table {name!r} has encrypted columns, so its "
            "primary key must be part of the model's identity (each row's key is found by it)",
            table=name,
        )
    return RowLookup(pk, tuple(index), mapper.columns[companion_key])


def mapper_spec(mapper: Mapper[Any]) -> MapperSpec:
    """The spec of a mapped class (every table of an inheritance chain); cached."""
    spec = _mapper_specs.get(mapper)
    if spec is not None:
        return spec
    keys: dict[Any, dict[str, str]] = {}
    tenant_key = None
    for prop in mapper.column_attrs:
        for col in prop.columns:
            if col.table is not None:
                keys.setdefault(col.table, {})[col.name] = prop.key
            if is_tenant_column(col):
                tenant_key = prop.key
    tables = []
    lookups = []
    for table in mapper.tables:
        t = _table_spec(table, keys.get(table, {}), f"model {mapper.class_.__name__}")
        if t is not None:
            tables.append(t)
            lookups.append(_lookup(mapper, table, t.companion_key))
    spec = (
        MapperSpec(tuple(tables), tuple(lookups), tenant_key)
        if tables or tenant_key is not None
        else _NO_SPEC
    )
    _mapper_specs[mapper] = spec
    return spec
