"""What differs between databases, one module per dialect.

The rest of the library asks :func:`select_dialect` for the :class:`DialectSupport` of an engine
or connection and calls it, rather than testing ``dialect.name`` itself (GeoAlchemy2's
``select_dialect``): adding a database means adding a module here, not finding every branch.
The base class holds the portable behaviour; each module overrides only what its database does
differently.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, DateTime, LargeBinary, String, Text, func, type_coerce
from sqlalchemy import types as sqltypes
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import NullType


class DialectSupport:
    """The portable behaviour; subclasses override what their database does differently."""

    #: Whether ``SELECT ... FOR UPDATE`` locks rows (SQLite has no row locks: a writer locks
    #: the whole database, so callers take that lock with a no-op write instead).
    row_locks: bool = True

    #: Whether migrations update a batch with one set-based statement (PostgreSQL's
    #: ``UPDATE ... FROM json_to_recordset``) rather than an executemany of compare-and-swaps.
    set_based_update: bool = False

    def skip_locked(self, dialect: Dialect) -> bool:
        """Whether the connected server takes ``FOR UPDATE SKIP LOCKED``.

        Parallel migration workers use it to partition a table: each skips the rows another
        holds. Read after the engine's first connection (the server version is known then).
        """
        return False

    def can_listen(self, dialect: Dialect) -> bool:
        """Whether revocation changes can be pushed (``LISTEN``/``NOTIFY``) instead of polled."""
        return False

    def notify(self, conn: Connection, channel: str, payload: str) -> None:
        """Announce a change at the transaction's commit, where the database can; else nothing."""

    def encrypted_storage(self, storage: str, max_bytes: int | None) -> sqltypes.TypeEngine[Any]:
        """The column type storing an encrypted value.

        Args:
            storage: ``"binary"`` or ``"text"`` (``EncryptedType``'s ``storage``).
            max_bytes: The most bytes a stored value of the column can take (ciphertext, or its
                ``cmk:`` + base64 text), or None when the declared type is unbounded.
        """
        # Text(), not dialect.type_descriptor(Text()): PostgreSQL's would render VARCHAR.
        return Text() if storage == "text" else LargeBinary()

    def index_storage(self, max_bytes: int) -> sqltypes.TypeEngine[Any]:
        """The column type of a blind index: short binary that a B-tree index can hold whole."""
        return LargeBinary(max_bytes)

    def long_text(self) -> sqltypes.TypeEngine[Any]:
        """Text without a practical length limit (the registry's JSON lists)."""
        return Text()

    def timestamp(self) -> sqltypes.TypeEngine[Any]:
        """A timezone-aware timestamp keeping microseconds (the registry MACs them)."""
        return DateTime(timezone=True)

    def exact_string(self, length: int) -> sqltypes.TypeEngine[Any]:
        """A string column compared code point by code point (bytewise in UTF-8).

        No case folding, no accent folding, no trailing-space padding, whatever the server's
        default collation: ``ACME``, ``acme `` and ``acmé`` are three ids other than ``acme``.
        """
        return String(length)

    def raw_column(self, col: ColumnElement[Any]) -> ColumnElement[Any]:
        """``col`` read as the driver returns it, without SQLAlchemy's result processing."""
        return type_coerce(col, NullType()).label(col.name)

    def same(self, col: ColumnElement[Any], value: ColumnElement[Any]) -> ColumnElement[bool]:
        """SQL: ``col`` holds exactly ``value``, NULL matching NULL: a compare-and-swap's test.

        Exact means what Python's ``==`` says of the stored value: a collation that folds case,
        accents or trailing spaces would let a concurrent write that changed only those pass
        for the value read, and the swap would overwrite it.
        """
        return col.is_not_distinct_from(value)

    def equals_exactly(self, col: ColumnElement[Any], value: Any) -> ColumnElement[bool]:
        """SQL: ``col`` (a tenant column) holds exactly ``value``, as Python's ``==`` says,
        still answered by an index on ``col``: a search's own tenant filter.

        A collation that folds case or accents would let tenant ``acme``'s search match the
        rows of ``ACME`` and ``acmé``. PostgreSQL's and SQLite's default collations are
        exact; the plain comparison is the one an index serves.
        """
        same: ColumnElement[bool] = col == value
        return same

    def has_prefix(self, col: ColumnElement[Any], prefix: str) -> ColumnElement[bool]:
        """SQL: ``col`` (text) begins with exactly ``prefix``, case and accents included.

        ``substr``, not ``LIKE``: SQLite's ``LIKE`` ignores case, and ``CMK:...`` is not
        ``cmk:...``.
        """
        return func.substr(col, 1, len(prefix)) == prefix

    def random_below(self, fraction: float) -> ColumnElement[bool]:
        """A condition true for about ``fraction`` of the rows, drawn per row."""
        return func.random() < fraction

    @contextlib.contextmanager
    def fast_commits(self, conn: Connection) -> Iterator[None]:
        """Let a walk's batches commit without waiting for durability, where the database can,
        and make them all durable at the end; by default every commit waits."""
        yield


class ExactString(sqltypes.TypeDecorator[str]):
    """A string compared code point by code point on every dialect (``exact_string``)."""

    impl = String
    cache_ok = True

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.length = length

    def load_dialect_impl(self, dialect: Dialect) -> sqltypes.TypeEngine[Any]:
        return select_dialect(dialect).exact_string(self.length)

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if isinstance(value, str) and _is_binary(self.load_dialect_impl(dialect)):
            return value.encode("utf-8")
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value).decode("utf-8")
        return value


class LongText(sqltypes.TypeDecorator[str]):
    """Text without a practical length limit on every dialect (``long_text``)."""

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sqltypes.TypeEngine[Any]:
        return select_dialect(dialect).long_text()


class Timestamp(sqltypes.TypeDecorator[datetime.datetime]):
    """A timezone-aware timestamp with microseconds on every dialect (``timestamp``).

    Aware values are written in UTC: a column without a time zone (MySQL's DATETIME) keeps
    their UTC wall time, which readers take as UTC.
    """

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sqltypes.TypeEngine[Any]:
        return select_dialect(dialect).timestamp()

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if isinstance(value, datetime.datetime) and value.tzinfo is not None:
            return value.astimezone(datetime.timezone.utc)
        return value


def _is_binary(typ: sqltypes.TypeEngine[Any]) -> bool:
    return isinstance(typ, sqltypes._Binary)


def select_dialect(dialect: Dialect) -> DialectSupport:
    """The :class:`DialectSupport` of a SQLAlchemy dialect (``engine.dialect``)."""
    name = dialect.name
    if name == "postgresql":
        from .postgresql import POSTGRESQL

        return POSTGRESQL
    if name in ("mysql", "mariadb"):
        from .mysql import MYSQL

        return MYSQL
    if name == "sqlite":
        from .sqlite import SQLITE

        return SQLITE
    return DEFAULT


DEFAULT = DialectSupport()
