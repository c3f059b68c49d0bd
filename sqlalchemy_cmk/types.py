"""Column types: ``EncryptedType`` for encrypted values, ``EDEKType`` for their companion column.

The types do no cryptography themselves: a value is encrypted by the session hooks that
:meth:`sqlalchemy_cmk.CMK.install` attaches, because encryption needs the whole row (its tenant
and row id) and a type only ever sees one value. What the types do is guard the boundary:

* on write, ``EncryptedType`` accepts only values the hooks sealed (or ``None``); anything else
  raises :class:`~sqlalchemy_cmk.errors.PlaintextWriteError` before the statement is sent, so no
  path (Core ``insert()``, ``update()``, bulk operations) can store plaintext;
* on read, it returns an :class:`EncryptedValue`, an opaque holder whose repr never shows data,
  which the hooks then decrypt;
* in expressions, ``EncryptedType`` refuses comparisons, ``LIKE``, ``IN``, ordering and every
  other operator with :class:`~sqlalchemy_cmk.errors.UnsupportedQueryError` when the expression
  is built (they would run on randomized ciphertext); ``IS NULL`` / ``IS NOT NULL``
  (``col == None``, ``col.is_(None)``) work. The statement guard (``_guard``) refuses what no
  operator builds (``func.lower(col)``, ``cast(col, ...)``, ``order_by(col)``) when executed;
* at declaration, a column option it cannot honour (server or Python default, ``unique``,
  ``index``, primary or foreign key, ``Computed``, ``Identity``, ``Mutable`` tracking) raises
  :class:`~sqlalchemy_cmk.errors.ConfigurationError` when the column is attached to its table.

NULL: ``None`` is stored as SQL NULL, not encrypted, so ``IS NULL`` works and nullability is
visible to whoever reads the database. Declare the column ``nullable=False`` if that matters.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from sqlalchemy import Column, event
from sqlalchemy import types as sqltypes
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql import operators
from sqlalchemy.sql.base import SchemaEventTarget
from sqlalchemy.sql.elements import ClauseElement, Null

from . import _format
from ._codecs import Codec, codec_for
from ._dialects import select_dialect
from .errors import ConfigurationError, DecryptionError, PlaintextWriteError, UnsupportedQueryError

__all__ = ["TEXT_MARKER", "EDEKType", "EncryptedMixin", "EncryptedType", "EncryptedValue"]


class Sealed(bytes):
    """A value the hooks encrypted, on its way to the database. Internal.

    A bytes subclass with empty ``__slots__``: no per-value ``__dict__``. (CPython still tracks
    every instance of a class defined in Python with the garbage collector, this one included.)
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<sealed {len(self)} bytes>"


class EncryptedValue(bytes):
    """Ciphertext as read from the database, not (yet) decrypted: the stored bytes, as is.

    Seen when an encrypted column is read other than as part of an ORM entity: Core
    ``select()``, a column-only ORM query such as ``select(Patient.ssn)``, a session without
    the hooks. Select the companion column too and decrypt with
    :meth:`sqlalchemy_cmk.CMK.decrypt_row`. Its repr shows only the length.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<EncryptedValue: {len(self)} bytes, decrypt with CMK.decrypt_row()>"

    __str__ = __repr__


#: Prefix of an encrypted value stored as text (``storage="text"``): ``cmk:`` + base64(value).
TEXT_MARKER = "cmk:"

_NULL_TESTS = frozenset(
    {
        operators.eq,
        operators.ne,
        operators.is_,
        operators.is_not,
        operators.is_distinct_from,
        operators.is_not_distinct_from,
    }
)


class _Comparator(sqltypes.TypeDecorator.Comparator[Any]):
    """Operators on an encrypted column: only tests for NULL, since the values are randomized.

    ``col == other_column`` is still built (SQLAlchemy compares columns with ``==`` internally,
    in sets and lookups); executing it is refused by the statement guard.
    """

    __slots__ = ()

    def operate(self, op: Any, *other: Any, **kwargs: Any) -> Any:
        if op in _NULL_TESTS and len(other) == 1:
            arg = other[0]
            if arg is None or isinstance(arg, Null):
                return super().operate(op, *other, **kwargs)
        if self.type.search and len(other) == 1:  # type: ignore[attr-defined]
            from ._search import make_term

            term = make_term(self.expr, op, other[0])
            if term is not None:
                return term
        if op in _NULL_TESTS and len(other) == 1:
            arg = other[0]
            if op in (operators.eq, operators.ne) and (
                isinstance(arg, ClauseElement) or hasattr(arg, "__clause_element__")
            ):
                return super().operate(op, *other, **kwargs)
        raise _refuse_operator(self.expr, op)

    def reverse_operate(self, op: Any, other: Any, **kwargs: Any) -> Any:
        raise _refuse_operator(self.expr, op)

    def blind(self, name: str) -> _DerivedSearch:
        """Search a derived blind index: ``Model.ssn.blind("ssn_last4") == "6789"``."""
        return _DerivedSearch(self.expr, name)


class _DerivedSearch:
    """The operators of one derived blind index of a column: ``==``, ``!=``, ``in_``."""

    __slots__ = ("expr", "name")

    def __init__(self, expr: Any, name: str) -> None:
        self.expr = expr
        self.name = name

    def _term(self, op: Any, other: Any) -> Any:
        from ._search import make_term

        term = make_term(self.expr, op, other, self.name)
        if term is None:
            raise _refuse_operator(self.expr, op)
        return term

    def __eq__(self, other: Any) -> Any:
        return self._term(operators.eq, other)

    def __ne__(self, other: Any) -> Any:
        return self._term(operators.ne, other)

    def in_(self, values: Any) -> Any:
        return self._term(operators.in_op, values)

    def not_in(self, values: Any) -> Any:
        return self._term(operators.not_in_op, values)

    __hash__ = None  # type: ignore[assignment]


def _refuse_operator(expr: Any, op: Any) -> UnsupportedQueryError:
    from ._guard import SUPPORTED_READS, _construct_op, _locate, _name

    table, column = _locate(expr)
    return UnsupportedQueryError(
        f"{_name(expr)} is encrypted: {_construct_op(op)} on it would run on randomized "
        f"ciphertext and cannot give the plaintext's answer. {SUPPORTED_READS}",
        table=table,
        column=column,
    )


def _watch_column(column: Any) -> None:
    """Check the column's options when it joins its table, i.e. when the model is declared."""
    if not isinstance(column, Column):
        return
    if getattr(column, "table", None) is not None:
        _on_attach(column, column.table)
    elif not event.contains(column, "after_parent_attach", _on_attach):
        event.listen(column, "after_parent_attach", _on_attach)


def _on_attach(column: Column[Any], table: Any) -> None:
    from ._guard import check_column

    check_column(column)
    if isinstance(column.type, EncryptedType) and column.type.search:
        from ._search import add_index_columns

        add_index_columns(column, table)
    # Constraints and indexes are attached after the columns: check them when the table is
    # created (and the guard checks each table the first time a statement uses it).
    if not event.contains(table, "before_create", _before_create):
        event.listen(table, "before_create", _before_create)


def _before_create(table: Any, *args: Any, **kwargs: Any) -> None:
    from ._guard import check_table

    check_table(table)


# Version byte, nonce, codec tag and GCM tag around the encoded value.
_VALUE_OVERHEAD = _format.MIN_VALUE
# The longest encoding of a bounded value that is neither text nor bytes: an integer (Python
# converts at most 4300 digits to text), a Numeric (at most 1000 digits of precision and
# scale, or an exponent), a date, a UUID. Far more than any of them takes.
_SMALL_VALUE = 1 << 16


class EncryptedType(sqltypes.TypeDecorator[Any]):
    """A column encrypted per tenant; stored as binary (BYTEA, BLOB), or as text.

    Args:
        underlying: The type of the plaintext (``String``, ``JSON``, ``DateTime(timezone=True)``
            ...), as a class or an instance. Values round-trip as that type's Python type.
        storage: ``"binary"`` (default): the stored value as bytes. ``"text"``: the stored
            value as ``cmk:`` + base64 in a text column, a third longer; this is how an
            existing text column is encrypted in place, online (``migrations_helpers``).
        allow_plaintext: Dual-read mode for a text column being encrypted in place: a stored
            value without the ``cmk:`` prefix is plaintext from before the migration and is
            returned as is (writes are always encrypted). Only with ``storage="text"`` and a
            String/Text underlying type. Turn it off once ``verify`` reports no plaintext left:
            from then on an unencrypted value raises ``DecryptionError`` on load.

    Example::

        ssn: Mapped[str] = mapped_column(EncryptedType(String))
    """

    impl = sqltypes.LargeBinary
    cache_ok = True
    comparator_factory = _Comparator

    def __init__(
        self,
        underlying: type[sqltypes.TypeEngine[Any]] | sqltypes.TypeEngine[Any],
        *,
        storage: str = "binary",
        allow_plaintext: bool = False,
        search: Any = None,
    ) -> None:
        super().__init__()
        self.underlying: sqltypes.TypeEngine[Any] = (
            underlying() if isinstance(underlying, type) else underlying
        )
        self.codec: Codec = codec_for(self.underlying)
        if storage not in ("binary", "text"):
            raise ConfigurationError(f'storage must be "binary" or "text", not {storage!r}')
        if allow_plaintext and (storage != "text" or self.codec.name != "str"):
            raise ConfigurationError(
                "allow_plaintext needs storage='text' and a String/Text underlying type: only "
                "there can plaintext be told apart from ciphertext"
            )
        self.storage = storage
        self.allow_plaintext = allow_plaintext
        from .search import BlindIndex

        found = () if search is None else (search,) if isinstance(search, BlindIndex) else search
        self.search: tuple[BlindIndex, ...] = tuple(found)
        if not all(isinstance(ix, BlindIndex) for ix in self.search):
            raise ConfigurationError("search= takes a BlindIndex or a sequence of them")

    def __repr__(self) -> str:
        extra = "" if self.storage == "binary" else f", storage={self.storage!r}"
        if self.allow_plaintext:
            extra += ", allow_plaintext=True"
        if self.search:
            extra += f", search={self.search[0] if len(self.search) == 1 else self.search!r}"
        return f"EncryptedType({self.underlying!r}{extra})"

    def load_dialect_impl(self, dialect: Dialect) -> sqltypes.TypeEngine[Any]:
        # Sized from the declared type: MySQL's BLOB and TEXT would stop at 64 KiB.
        impl = select_dialect(dialect).encrypted_storage(self.storage, self.max_stored_size)
        if self.storage == "text":
            # Not dialect.type_descriptor(Text()): PostgreSQL's would render VARCHAR.
            return impl
        return dialect.type_descriptor(impl)

    @property
    def max_stored_size(self) -> int | None:
        """The most bytes a stored value of this column can take, or None if unbounded.

        From the declared type: ``String(n)`` takes at most 4 bytes per character in UTF-8,
        ``LargeBinary(n)`` n bytes; ``Text``, ``JSON`` and types without a length are
        unbounded; numbers, dates, UUIDs and booleans encode to a few bytes (at most
        :data:`_SMALL_VALUE`). Then the ciphertext's overhead, and for ``storage="text"``
        the ``cmk:`` prefix and base64.
        """
        t = self.underlying
        plain: int | None
        if isinstance(t, sqltypes._Binary):
            plain = t.length
        elif isinstance(t, sqltypes.String):
            plain = None if t.length is None else 4 * t.length
        elif isinstance(t, sqltypes.JSON):
            plain = None
        else:
            plain = _SMALL_VALUE
        if plain is None:
            return None
        sealed = plain + _VALUE_OVERHEAD
        if self.storage == "text":
            return len(TEXT_MARKER) + 4 * -(-sealed // 3)
        return sealed

    @property
    def python_type(self) -> type[Any]:
        return self.underlying.python_type

    def _set_parent(self, parent: SchemaEventTarget, outer: bool = False, **kw: Any) -> None:
        super()._set_parent(parent, outer=outer, **kw)
        _watch_column(parent)

    def process_bind_param(self, value: Any, dialect: Dialect) -> bytes | str | None:
        if value is None:
            return None
        if type(value) is Sealed:
            if self.storage == "text":
                return TEXT_MARKER + base64.b64encode(value).decode("ascii")
            return bytes(value)
        raise PlaintextWriteError(
            "refusing to send an unencrypted value for an encrypted column. To write, go "
            "through an installed session (session.add / attribute changes / "
            "session.execute(insert(Model), rows)); update() statements and Core inserts cannot "
            "encrypt, since a value is bound to its row's key. To filter: encrypted values are "
            "randomized, so WHERE col = value cannot match; filter on a plaintext column"
        )

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if self.storage == "binary":
            return _binary(value)
        return _from_text(value, self.allow_plaintext)

    def bind_processor(self, dialect: Dialect) -> Any:
        if self.storage == "text":
            return super().bind_processor(dialect)
        return _flat_bind_processor(self, dialect)

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        if self.storage == "text":
            return super().result_processor(dialect, coltype)
        # One flat function instead of TypeDecorator's chain: this runs for every loaded value.
        impl = self.impl_instance.result_processor(dialect, coltype)
        wrap = EncryptedValue
        if impl is None:

            def process(value: Any) -> EncryptedValue | None:
                if type(value) is bytes:
                    return wrap(value)
                return None if value is None else _binary(value)

        else:

            def process(value: Any) -> EncryptedValue | None:
                if value is None:
                    return None
                if not isinstance(value, bytes | bytearray | memoryview):
                    raise _not_binary()
                return _binary(impl(value))

        return process

    def compare_values(self, x: Any, y: Any) -> bool:
        return bool(x == y)


def _binary(value: Any) -> EncryptedValue:
    # SQLite stores whatever it is given in any column: TEXT or a number in a BLOB column is
    # not ciphertext. (bytes(5) would even make five zero bytes, bytes(10**9) a gigabyte.)
    if isinstance(value, bytes | bytearray | memoryview):
        return EncryptedValue(value)
    raise _not_binary()


def _not_binary() -> DecryptionError:
    return DecryptionError(
        "an encrypted column holds a value that is not binary, so it cannot be ciphertext "
        "(it was written without sqlalchemy-cmk)"
    )


def _from_text(value: Any, allow_plaintext: bool) -> Any:
    if not isinstance(value, str):
        raise DecryptionError(
            "an encrypted text column holds a value that is not text, so it cannot be "
            "ciphertext (it was written without sqlalchemy-cmk)"
        )
    if value.startswith(TEXT_MARKER):
        try:
            return EncryptedValue(base64.b64decode(value[len(TEXT_MARKER) :], validate=True))
        except (binascii.Error, ValueError):
            raise DecryptionError("stored value is malformed") from None
    if allow_plaintext:
        return value
    raise DecryptionError(
        "an encrypted column holds an unencrypted value: if the column is being encrypted in "
        "place, declare it with allow_plaintext=True until the backfill's verify reports none"
    )


class EDEKType(sqltypes.TypeDecorator[bytes]):
    """The companion column: the row's wrapped data key (EDEK) and row id, written by the hooks.

    One per table that has ``EncryptedType`` columns; nullable, since a row whose encrypted
    columns are all NULL needs no key.
    """

    impl = sqltypes.LargeBinary
    cache_ok = True

    def _set_parent(self, parent: SchemaEventTarget, outer: bool = False, **kw: Any) -> None:
        super()._set_parent(parent, outer=outer, **kw)
        _watch_column(parent)

    def process_bind_param(self, value: Any, dialect: Dialect) -> bytes | None:
        # Only what the hooks produced for the row: a companion from anywhere else (another
        # row, an older version of this one) would strand the row's values. NULL is bound by
        # every ORM INSERT of a row without values; an UPDATE to NULL is refused by the guard.
        if type(value) is Sealed:
            return bytes(value)
        if value is None:
            return None
        raise PlaintextWriteError(
            "EDEK (companion) columns are written by sqlalchemy-cmk's session hooks only: write "
            "the encrypted columns through an installed session, never the companion"
        )

    def process_result_value(self, value: Any, dialect: Dialect) -> bytes | None:
        if value is None or type(value) is bytes:
            return value
        if isinstance(value, bytearray | memoryview):
            return bytes(value)
        raise _not_binary()

    def bind_processor(self, dialect: Dialect) -> Any:
        return _flat_bind_processor(self, dialect)


# Drivers known to take plain bytes for binary columns; others keep the impl's DBAPI wrapper.
_BYTES_NATIVE = frozenset({"sqlite", "postgresql", "mysql", "mariadb"})


def _flat_bind_processor(typ: sqltypes.TypeDecorator[Any], dialect: Dialect) -> Any:
    """One flat function instead of TypeDecorator's chain: this runs for every written value."""
    if dialect.name not in _BYTES_NATIVE:
        return sqltypes.TypeDecorator.bind_processor(typ, dialect)
    guard = typ.process_bind_param

    def process(value: Any) -> Any:
        return bytes(value) if type(value) is Sealed else guard(value, dialect)

    return process


class EncryptedMixin:
    """Adds the companion column ``cmk_edek`` to a declarative model with encrypted columns."""

    cmk_edek: Mapped[bytes | None] = mapped_column(EDEKType(), nullable=True, deferred=False)
