"""Plaintext encodings: a Python value <-> the bytes that get encrypted.

Each encoding starts with a one-byte tag, so a column whose declared type changed is caught as
a configuration error instead of decoding into a wrong value. The encodings are independent of
the database dialect: a row copied from SQLite to PostgreSQL still decrypts.

Values are made to round-trip as the plain column would on PostgreSQL, whatever the dialect:
``Numeric(p, s)`` rounds to its scale (ties away from zero, as PostgreSQL's numeric does) and
refuses values with more than ``p - s`` integer digits; ``DateTime(timezone=True)`` refuses naive
datetimes and ``DateTime()`` refuses aware ones (PostgreSQL would silently shift or drop the
offset); a ``str`` subclass is length-checked like a ``str`` (in ``CMK.seal``).

No error raised here chains an exception that may hold the value: Python's own (a
``UnicodeEncodeError`` keeps the whole string, a ``JSONDecodeError`` the whole document) are
caught and our error is raised outside the handler, so ``__context__`` stays empty.
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import types as sqltypes

from .errors import ConfigurationError, InvalidValueError


class Refused(ValueError):
    """An encoder's refusal, with a reason that names no part of the value."""


@dataclass(frozen=True, eq=False)
class Codec:
    name: str
    tag: int
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]
    accepts: tuple[type, ...]


def _bytes_dec(b: bytes) -> bytes:
    return b


def _int_enc(v: int) -> bytes:
    return str(int(v)).encode()


def _dec_enc(v: decimal.Decimal | int | float) -> bytes:
    return str(
        decimal.Decimal(v) if not isinstance(v, float) else decimal.Decimal(repr(v))
    ).encode()


_PG_NUMERIC_DIGITS = 131072  # PostgreSQL's numeric: at most this many digits before the point


def _numeric_enc(precision: int | None, scale: int) -> Callable[[Any], bytes]:
    """Round to ``scale`` places as PostgreSQL's ``numeric(p, s)`` does (half away from zero)
    and refuse what would overflow it ("numeric field overflow" there)."""
    quantum = decimal.Decimal(1).scaleb(-scale)
    context = decimal.Context(
        prec=decimal.MAX_PREC,
        Emax=decimal.MAX_EMAX,
        Emin=decimal.MIN_EMIN,
        rounding=decimal.ROUND_HALF_UP,
    )

    def encode(v: decimal.Decimal | int | float) -> bytes:
        d = decimal.Decimal(v) if not isinstance(v, float) else decimal.Decimal(repr(v))
        if d.is_nan():
            return b"NaN"  # PostgreSQL's numeric(p, s) stores NaN
        if d.is_infinite():
            raise Refused(f"infinity does not fit Numeric({precision}, {scale})")
        q = None
        if d.adjusted() < _PG_NUMERIC_DIGITS:  # else quantize would write out every digit
            try:
                q = d.quantize(quantum, context=context)
            except decimal.InvalidOperation:  # absurd exponents only, with this context
                q = None
        if q is None or (precision is not None and q and q.adjusted() >= precision - scale):
            digits = _PG_NUMERIC_DIGITS if precision is None else precision - scale
            raise Refused(
                f"the value has more than {digits} integer digits (Numeric({precision}, {scale}))"
            )
        return str(q).encode()

    return encode


def _datetime_enc(aware: bool) -> Callable[[datetime.datetime], bytes]:
    def encode(v: datetime.datetime) -> bytes:
        if (v.utcoffset() is not None) != aware:
            raise Refused(
                "DateTime(timezone=True) needs an aware datetime (give it a tzinfo)"
                if aware
                else "DateTime() takes naive datetimes: convert to naive UTC, or declare "
                "DateTime(timezone=True) to keep the offset"
            )
        return v.isoformat().encode()

    return encode


def _bool_enc(v: bool) -> bytes:
    return b"\x01" if v else b"\x00"


def _bool_dec(b: bytes) -> bool:
    if b not in (b"\x00", b"\x01"):
        raise ValueError("not a boolean")
    return b == b"\x01"


def _iso_enc(v: datetime.date | datetime.time) -> bytes:
    return v.isoformat().encode()


def _json_enc(v: Any) -> bytes:
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _uuid_enc(v: uuid.UUID | str) -> bytes:
    return (v if isinstance(v, uuid.UUID) else uuid.UUID(v)).bytes


STR = Codec("str", 1, str.encode, bytes.decode, (str,))
_BYTES = Codec("bytes", 2, bytes, _bytes_dec, (bytes, bytearray, memoryview))
_INT = Codec("int", 3, _int_enc, lambda b: int(b.decode()), (int,))
_DECIMAL = Codec(
    "decimal", 4, _dec_enc, lambda b: decimal.Decimal(b.decode()), (decimal.Decimal, int, float)
)


def _float_enc(v: decimal.Decimal | int | float) -> bytes:
    # Read back as a float: a finite value beyond the float range would come back as infinity
    # (PostgreSQL refuses it: "out of range for type double precision"), so refuse it here.
    if not isinstance(v, float) and not (isinstance(v, decimal.Decimal) and not v.is_finite()):
        try:
            f = float(v)
        except OverflowError:  # an int too large for a float
            f = math.inf
        if math.isinf(f):
            raise Refused("the value is out of range for a float column")
    return _dec_enc(v)


_FLOAT_DECIMAL = Codec(
    "decimal", 4, _float_enc, lambda b: float(b.decode()), (decimal.Decimal, int, float)
)
_BOOL = Codec("bool", 5, _bool_enc, _bool_dec, (bool,))
_DATE = Codec(
    "date", 6, _iso_enc, lambda b: datetime.date.fromisoformat(b.decode()), (datetime.date,)
)


def _datetime_dec(b: bytes) -> datetime.datetime:
    return datetime.datetime.fromisoformat(b.decode())


_DATETIME = Codec("datetime", 7, _datetime_enc(False), _datetime_dec, (datetime.datetime,))
_DATETIME_TZ = Codec("datetime", 7, _datetime_enc(True), _datetime_dec, (datetime.datetime,))
_TIME = Codec(
    "time", 8, _iso_enc, lambda b: datetime.time.fromisoformat(b.decode()), (datetime.time,)
)
_JSON = Codec("json", 9, _json_enc, json.loads, (object,))
_UUID = Codec("uuid", 10, _uuid_enc, lambda b: uuid.UUID(bytes=b), (uuid.UUID,))
_UUID_STR = Codec("uuid", 10, _uuid_enc, lambda b: str(uuid.UUID(bytes=b)), (uuid.UUID, str))

SUPPORTED = (
    "String, Text, Unicode, LargeBinary, Integer, BigInteger, Numeric, Float, Boolean, "
    "Date, DateTime, Time, JSON, Uuid"
)


def codec_for(underlying: sqltypes.TypeEngine[Any]) -> Codec:
    """Pick the codec for an underlying SQLAlchemy type; ConfigurationError for others."""
    t = underlying
    # Order matters: Enum is a String. Float is not a Numeric in SQLAlchemy 2.1 (both derive
    # from NumericCommon) but was in 2.0, so both are named.
    if isinstance(t, (sqltypes.Enum, sqltypes.ARRAY, sqltypes.Interval)):
        pass
    elif isinstance(t, sqltypes.Boolean):
        return _BOOL
    elif isinstance(t, sqltypes.Integer):
        return _INT
    elif isinstance(t, (sqltypes.Numeric, sqltypes.Float)):
        base = _DECIMAL if t.asdecimal else _FLOAT_DECIMAL
        precision, scale = getattr(t, "precision", None), getattr(t, "scale", None)
        if isinstance(t, sqltypes.Float) or (precision is None and scale is None):
            return base
        if scale is None:
            scale = 0  # NUMERIC(p) is NUMERIC(p, 0) on PostgreSQL
        if not (isinstance(scale, int) and 0 <= scale <= 1000) or not (
            precision is None or (isinstance(precision, int) and 0 < precision <= 1000)
        ):
            raise ConfigurationError(
                f"EncryptedType(Numeric({precision}, {scale})): precision must be 1..1000 and "
                "scale 0..1000, as PostgreSQL's numeric takes"
            )
        if precision is not None and scale > precision:
            raise ConfigurationError(
                f"EncryptedType(Numeric({precision}, {scale})): the scale exceeds the precision"
            )
        return Codec(
            base.name,
            base.tag,
            _numeric_enc(precision, scale),
            base.decode,
            base.accepts,
        )
    elif isinstance(t, sqltypes.DateTime):
        return _DATETIME_TZ if t.timezone else _DATETIME
    elif isinstance(t, sqltypes.Date):
        return _DATE
    elif isinstance(t, sqltypes.Time):
        return _TIME
    elif isinstance(t, sqltypes.JSON):
        return _JSON
    elif isinstance(t, sqltypes.Uuid):
        return _UUID if t.as_uuid else _UUID_STR
    elif isinstance(t, sqltypes._Binary):
        return _BYTES
    elif isinstance(t, sqltypes.String):
        return STR
    raise ConfigurationError(
        f"EncryptedType cannot encrypt {type(t).__name__} columns; supported: {SUPPORTED}"
    )


def encode(codec: Codec, value: Any, *, table: str, column: str) -> bytes:
    # bool is an int and datetime is a date: an Integer column given True, or a Date column
    # given a datetime (whose time would not decode as a date), is almost surely a bug.
    if (
        not isinstance(value, codec.accepts)
        or (isinstance(value, bool) and codec.tag in (_INT.tag, _DECIMAL.tag))
        or (isinstance(value, datetime.datetime) and codec.tag == _DATE.tag)
    ):
        raise InvalidValueError(
            f"{table}.{column} is encrypted as {codec.name} and cannot store a "
            f"{type(value).__name__}",
            table=table,
            column=column,
        )
    try:
        return bytes([codec.tag]) + codec.encode(value)
    except Refused as exc:
        why = str(exc)
    except Exception as exc:  # whatever a value's own methods raise
        # Only the exception's type: its args may hold the value (UnicodeEncodeError does).
        why = f"value of type {type(value).__name__} cannot be encoded as {codec.name} " + (
            f"({type(exc).__name__})"
        )
    # Raised outside the handler, so the exception above is not kept as __context__.
    raise InvalidValueError(f"{table}.{column}: {why}", table=table, column=column)


def decode(codec: Codec, data: bytes, *, table: str, column: str) -> Any:
    if not data or data[0] != codec.tag:
        raise ConfigurationError(
            f"{table}.{column} holds a value that was not written as {codec.name}: was the "
            "column's underlying type changed? Migrate the data before changing the type.",
            table=table,
            column=column,
        )
    try:
        return codec.decode(data[1:])
    except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:
        error = type(exc).__name__  # decimal.InvalidOperation is an ArithmeticError
    # Outside the handler: a JSONDecodeError or UnicodeDecodeError holds the plaintext.
    raise ConfigurationError(
        f"{table}.{column}: authenticated value does not decode as {codec.name} ({error})",
        table=table,
        column=column,
    )
