"""MariaDB and MySQL: sized BLOBs, DATETIME(6), binary tenant ids, SKIP LOCKED by version.

Supported: MariaDB 10.6+ and MySQL 8.0+, the first releases with ``SKIP LOCKED`` (parallel
migration workers partition tables with it); older servers work single-worker.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import LargeBinary, and_, cast, func, literal
from sqlalchemy import types as sqltypes
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import ColumnElement

from . import DialectSupport

# MySQL's BLOB and TEXT stop at 64 KiB, MEDIUMBLOB/MEDIUMTEXT at 16 MiB, LONG* at 4 GiB.
_MEDIUM_MAX = 2**24 - 1


class MySQLSupport(DialectSupport):
    """MariaDB 10.6+ and MySQL 8.0+ (through ``mysql+pymysql://`` or another MySQL driver)."""

    def skip_locked(self, dialect: Dialect) -> bool:
        version = dialect.server_version_info or ()
        if getattr(dialect, "is_mariadb", False):
            return tuple(version[:2]) >= (10, 6)
        return tuple(version[:3]) >= (8, 0, 1)

    def encrypted_storage(self, storage: str, max_bytes: int | None) -> sqltypes.TypeEngine[Any]:
        # BLOB/TEXT would hold 64 KiB: a longer value is refused in strict mode and silently
        # truncated (then undecryptable) otherwise. MEDIUM* costs one byte more per value.
        medium = max_bytes is not None and max_bytes <= _MEDIUM_MAX
        if storage == "text":
            return mysql.MEDIUMTEXT() if medium else mysql.LONGTEXT()
        return mysql.MEDIUMBLOB() if medium else mysql.LONGBLOB()

    def index_storage(self, max_bytes: int) -> sqltypes.TypeEngine[Any]:
        # A BLOB cannot be indexed without a prefix length; VARBINARY can, whole.
        return mysql.VARBINARY(max_bytes)

    def long_text(self) -> sqltypes.TypeEngine[Any]:
        # TEXT stops at 64 KiB; a tenant with many accepted keys can outgrow it.
        return mysql.MEDIUMTEXT()

    def timestamp(self) -> sqltypes.TypeEngine[Any]:
        # DATETIME alone drops the microseconds, and the registry's MAC covers them. No
        # TIMESTAMP: it ends in 2038 and converts with the session's time zone.
        return mysql.DATETIME(fsp=6)

    def exact_string(self, length: int) -> sqltypes.TypeEngine[Any]:
        # Binary strings compare bytewise on every server: no collation folds case or
        # accents, and VARBINARY (unlike the PAD SPACE _bin collations) keeps trailing spaces.
        # Four bytes per character: UTF-8's longest.
        return mysql.VARBINARY(4 * length)

    def same(self, col: ColumnElement[Any], value: ColumnElement[Any]) -> ColumnElement[bool]:
        # The usual collations fold case and accents, and pad trailing spaces ('abc' = 'ABC '):
        # strings are compared as their UTF-8 bytes instead, converted alike on both sides
        # whatever the column's and the connection's character sets.
        if not isinstance(col.type, sqltypes.String):
            return col.is_not_distinct_from(value)
        return _utf8(col).is_not_distinct_from(_utf8(value))

    def equals_exactly(self, col: ColumnElement[Any], value: Any) -> ColumnElement[bool]:
        # The collation's comparison first, which the (tenant, index) B-tree answers, then the
        # UTF-8 bytes, which drop what the collation folded together ('ACME', 'acmé' for 'acme').
        indexed: ColumnElement[bool] = col == value
        if not isinstance(col.type, sqltypes.String):
            return indexed
        return and_(indexed, _utf8(col) == _utf8(literal(value, col.type)))

    def has_prefix(self, col: ColumnElement[Any], prefix: str) -> ColumnElement[bool]:
        # Compared as bytes: under the usual case-insensitive collations "CMK:" = "cmk:", and a
        # plaintext value beginning with "CMK:" would pass for an encrypted one.
        head = cast(func.substr(col, 1, len(prefix)), LargeBinary)
        return head == literal(prefix.encode("utf-8"), LargeBinary)


def _utf8(expr: ColumnElement[Any]) -> ColumnElement[Any]:
    return cast(cast(expr, mysql.CHAR(charset="utf8mb4")), LargeBinary)


MYSQL = MySQLSupport()
