"""Column types: ``EncryptedType`` for encrypted values, ``EDEKType`` for their companion column.

The types do no cryptography themselves: a value is encrypted by the session hooks that
:meth:`sqlalchemy_cmk.CMK.install` attaches, because encryption needs the whole row (its tenant
and row id) and a type only ever sees one value. What the types do is guard the boundary:

* on write, ``EncryptedType`` accepts only values the hooks sealed (or ``None``); anything else
  raises :class:`~sqlalchemy_cmk.errors.PlaintextWriteError` before the statement is sent, so no
  path (Core ``insert()``, ``update()``, bulk operations) can store plaintext;
* on read, it returns an :class:`EncryptedValue`, an opaque holder whose repr never shows data,
  which the hooks then decrypt.

NULL: ``None`` is stored as SQL NULL, not encrypted, so ``IS NULL`` works and nullability is
visible to whoever reads the database. Declare the column ``nullable=False`` if that matters.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import types as sqltypes
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapped, mapped_column

from ._codecs import Codec, codec_for
from .errors import PlaintextWriteError

__all__ = ["EDEKType", "EncryptedMixin", "EncryptedType", "EncryptedValue"]


class Sealed:
    """A value the hooks encrypted, on its way to the database. Internal."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"<sealed {len(self.data)} bytes>"


class EncryptedValue:
    """Ciphertext as read from the database, not (yet) decrypted.

    Seen when an encrypted column is read outside an installed session (Core ``select()``, a
    session without hooks); decrypt such rows with :meth:`sqlalchemy_cmk.CMK.decrypt_row`.
    """

    __slots__ = ("ciphertext",)

    def __init__(self, ciphertext: bytes) -> None:
        self.ciphertext = ciphertext

    def __repr__(self) -> str:
        return f"<EncryptedValue: {len(self.ciphertext)} bytes, decrypt with CMK.decrypt_row()>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EncryptedValue) and other.ciphertext == self.ciphertext

    def __hash__(self) -> int:
        return hash(self.ciphertext)


class EncryptedType(sqltypes.TypeDecorator[Any]):
    """A column encrypted per tenant; stored as binary (BYTEA, BLOB).

    Args:
        underlying: The type of the plaintext (``String``, ``JSON``, ``DateTime(timezone=True)``
            ...), as a class or an instance. Values round-trip as that type's Python type.

    Example::

        ssn: Mapped[str] = mapped_column(EncryptedType(String))
    """

    impl = sqltypes.LargeBinary
    cache_ok = True

    def __init__(
        self, underlying: type[sqltypes.TypeEngine[Any]] | sqltypes.TypeEngine[Any]
    ) -> None:
        super().__init__()
        self.underlying: sqltypes.TypeEngine[Any] = (
            underlying() if isinstance(underlying, type) else underlying
        )
        self.codec: Codec = codec_for(self.underlying)

    def __repr__(self) -> str:
        return f"EncryptedType({self.underlying!r})"

    @property
    def python_type(self) -> type[Any]:
        return self.underlying.python_type

    def process_bind_param(self, value: Any, dialect: Dialect) -> bytes | None:
        if value is None:
            return None
        if type(value) is Sealed:
            return value.data
        raise PlaintextWriteError(
            "refusing to write an unencrypted value into an encrypted column: write through an "
            "installed session (session.add / attribute changes / session.execute(insert(Model), "
            "rows)); update() statements and Core inserts cannot encrypt, since a value is bound "
            "to its row's key"
        )

    def process_result_value(self, value: Any, dialect: Dialect) -> EncryptedValue | None:
        if value is None:
            return None
        return EncryptedValue(bytes(value))

    def compare_values(self, x: Any, y: Any) -> bool:
        return bool(x == y)


class EDEKType(sqltypes.TypeDecorator[bytes]):
    """The companion column: the row's wrapped data key (EDEK) and row id, written by the hooks.

    One per table that has ``EncryptedType`` columns; nullable, since a row whose encrypted
    columns are all NULL needs no key.
    """

    impl = sqltypes.LargeBinary
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> bytes | None:
        if value is None or type(value) is bytes:
            return value
        if type(value) is Sealed:
            return value.data
        raise PlaintextWriteError("EDEK columns are written by sqlalchemy-cmk only")

    def process_result_value(self, value: Any, dialect: Dialect) -> bytes | None:
        return value if value is None or type(value) is bytes else bytes(value)


class EncryptedMixin:
    """Adds the companion column ``cmk_edek`` to a declarative model with encrypted columns."""

    cmk_edek: Mapped[bytes | None] = mapped_column(EDEKType(), nullable=True, deferred=False)
