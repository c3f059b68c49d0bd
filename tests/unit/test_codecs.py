"""Plaintext codecs (_codecs.py): round trips, tags, and refusal of values a column cannot hold."""

from __future__ import annotations

import datetime
import decimal
import math
import pickle
import uuid
import zoneinfo
from typing import Any

import pytest
from sqlalchemy import (
    ARRAY,
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Double,
    Enum,
    Float,
    Integer,
    Interval,
    LargeBinary,
    Numeric,
    PickleType,
    SmallInteger,
    String,
    Text,
    Time,
    Unicode,
    UnicodeText,
    Uuid,
)
from sqlalchemy import types as sqltypes

from sqlalchemy_cmk import ConfigurationError, InvalidValueError, _codecs

UTC = datetime.timezone.utc
IST = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
U = uuid.UUID("6f1c2b9e-8a4d-4c3e-9b7a-0d5e4f3a2b1c")


def enc(t: sqltypes.TypeEngine[Any], value: Any) -> bytes:
    return _codecs.encode(_codecs.codec_for(t), value, table="patients", column="c")


def dec(t: sqltypes.TypeEngine[Any], data: bytes) -> Any:
    return _codecs.decode(_codecs.codec_for(t), data, table="patients", column="c")


# (underlying type, value written, value read back)
ROUND_TRIPS: list[tuple[sqltypes.TypeEngine[Any], Any, Any]] = [
    (String(), "", ""),
    (String(50), "123-45-6789", "123-45-6789"),
    (Text(), "Zoë 🔑\x00\n", "Zoë 🔑\x00\n"),
    (Unicode(), "Ångström", "Ångström"),
    (UnicodeText(), "x" * 10_000, "x" * 10_000),
    (LargeBinary(), b"", b""),
    (LargeBinary(), b"\x00\xff\x01", b"\x00\xff\x01"),
    (LargeBinary(), bytearray(b"ab"), b"ab"),
    (LargeBinary(), memoryview(b"cd"), b"cd"),
    (Integer(), 0, 0),
    (Integer(), -42, -42),
    (SmallInteger(), 7, 7),
    (BigInteger(), 2**63 - 1, 2**63 - 1),
    (BigInteger(), -(2**200), -(2**200)),
    (Numeric(), decimal.Decimal("12345.6700"), decimal.Decimal("12345.6700")),
    (Numeric(), decimal.Decimal("-0"), decimal.Decimal("-0")),
    (Numeric(), decimal.Decimal("1E+30"), decimal.Decimal("1E+30")),
    (Numeric(), 5, decimal.Decimal(5)),
    (Numeric(), 0.1, decimal.Decimal("0.1")),  # the float's repr, not its binary expansion
    (Numeric(asdecimal=False), 0.1, 0.1),
    (Numeric(asdecimal=False), 1e308, 1e308),
    (Numeric(asdecimal=False), decimal.Decimal("2.5"), 2.5),
    (Boolean(), True, True),
    (Boolean(), False, False),
    (Date(), datetime.date(2024, 2, 29), datetime.date(2024, 2, 29)),
    (Date(), datetime.date(1, 1, 1), datetime.date(1, 1, 1)),
    (DateTime(), datetime.datetime(2024, 1, 2, 3, 4, 5), datetime.datetime(2024, 1, 2, 3, 4, 5)),
    (
        DateTime(timezone=True),
        datetime.datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=IST),
        datetime.datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=IST),
    ),
    (Time(), datetime.time(7, 30, 0, 1), datetime.time(7, 30, 0, 1)),
    (Time(), datetime.time(23, 0, tzinfo=UTC), datetime.time(23, 0, tzinfo=UTC)),
    (JSON(), {"a": [1, 2.5, None, True], "ü": "ß"}, {"a": [1, 2.5, None, True], "ü": "ß"}),
    (JSON(), [1, "two"], [1, "two"]),
    (JSON(), (1, 2), [1, 2]),  # as any JSON column
    (JSON(), "plain", "plain"),
    (JSON(), 3, 3),
    (JSON(), False, False),
    (JSON(), None, None),  # JSON null (a NULL column never reaches the codec)
    (Uuid(), U, U),
    (Uuid(as_uuid=False), str(U), str(U)),
    (Uuid(as_uuid=False), U, str(U)),
    (Uuid(as_uuid=False), str(U).upper(), str(U)),
]


def _id(x: object) -> str:
    # Stable across processes (pytest-xdist compares the collected ids): no memory addresses.
    return "memoryview" if isinstance(x, memoryview) else repr(x)[:30]


@pytest.mark.parametrize(("t", "value", "expected"), ROUND_TRIPS, ids=_id)
def test_round_trip(t: sqltypes.TypeEngine[Any], value: Any, expected: Any):
    data = enc(t, value)
    assert data[0] == _codecs.codec_for(t).tag
    out = dec(t, data)
    assert out == expected
    assert type(out) is type(expected)


def test_aware_datetime_keeps_its_offset():
    value = datetime.datetime(2024, 7, 1, 12, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))
    out = dec(DateTime(timezone=True), enc(DateTime(timezone=True), value))
    assert out == value
    assert out.utcoffset() == datetime.timedelta(hours=2)


def test_float_special_values_round_trip_for_floats():
    t = Numeric(asdecimal=False)
    assert dec(t, enc(t, math.inf)) == math.inf
    assert math.isnan(dec(t, enc(t, math.nan)))
    out = dec(t, enc(t, -0.0))
    assert out == 0.0 and math.copysign(1, out) == -1


@pytest.mark.parametrize("t", [Float(), Double()], ids=["Float", "Double"])
def test_float_columns_are_supported(t: sqltypes.TypeEngine[Any]):
    assert dec(t, enc(t, 0.1)) == 0.1


# -- tags -----------------------------------------------------------------------------------------

DISTINCT = {
    "str": (String(), "abc"),
    "bytes": (LargeBinary(), b"abc"),
    "int": (Integer(), 123),
    "decimal": (Numeric(), decimal.Decimal("1.5")),
    "bool": (Boolean(), True),
    "date": (Date(), datetime.date(2024, 1, 1)),
    "datetime": (DateTime(), datetime.datetime(2024, 1, 1)),
    "time": (Time(), datetime.time(1, 2)),
    "json": (JSON(), {"a": 1}),
    "uuid": (Uuid(), U),
}


@pytest.mark.parametrize("writer", sorted(DISTINCT))
@pytest.mark.parametrize("reader", sorted(DISTINCT))
def test_tag_is_checked(writer: str, reader: str):
    if writer == reader:
        return
    wt, value = DISTINCT[writer]
    rt, _ = DISTINCT[reader]
    with pytest.raises(ConfigurationError, match="underlying type changed") as info:
        dec(rt, enc(wt, value))
    assert (info.value.table, info.value.column) == ("patients", "c")


def test_str_value_read_as_int_is_a_configuration_error():
    with pytest.raises(ConfigurationError):
        dec(Integer(), enc(String(), "123"))  # even though "123" would parse as an int


def test_compatible_readers_share_a_tag():
    # Numeric <-> float Numeric and Uuid <-> Uuid(as_uuid=False) read each other's values.
    assert dec(Numeric(asdecimal=False), enc(Numeric(), decimal.Decimal("2.5"))) == 2.5
    assert dec(Uuid(as_uuid=False), enc(Uuid(), U)) == str(U)


def test_empty_plaintext_is_a_configuration_error():
    with pytest.raises(ConfigurationError):
        dec(String(), b"")


@pytest.mark.parametrize(
    ("t", "data"),
    [
        (Integer(), b"\x03abc"),
        (Integer(), b"\x03\xff"),
        (Boolean(), b"\x05\x02"),
        (Boolean(), b"\x05"),
        (Date(), b"\x06yesterday"),
        (DateTime(), b"\x07now"),
        (Time(), b"\x08noon"),
        (JSON(), b"\x09{"),
        (Uuid(), b"\x0a\x00\x01"),
        (String(), b"\x01\xff\xfe"),
    ],
)
def test_authenticated_garbage_is_a_configuration_error(t, data: bytes):
    with pytest.raises(ConfigurationError, match="does not decode"):
        dec(t, data)


def test_authenticated_garbage_numeric_is_a_configuration_error():
    with pytest.raises(ConfigurationError):
        dec(Numeric(), b"\x04abc")


# -- values the column cannot hold ------------------------------------------------------------


@pytest.mark.parametrize(
    "t", [Integer(), BigInteger(), SmallInteger(), Numeric(), Numeric(asdecimal=False)]
)
@pytest.mark.parametrize("value", [True, False])
def test_bool_refused_for_numbers(t: sqltypes.TypeEngine[Any], value: bool):
    with pytest.raises(InvalidValueError, match="bool"):
        enc(t, value)


@pytest.mark.parametrize(
    ("t", "value"),
    [
        (String(), 5),
        (String(), b"bytes"),
        (String(), None),
        (LargeBinary(), "text"),
        (Integer(), "5"),
        (Integer(), 5.0),
        (Integer(), decimal.Decimal(5)),
        (Numeric(), "1.5"),
        (Boolean(), 1),
        (Boolean(), "true"),
        (Date(), "2024-01-01"),
        (DateTime(), datetime.date(2024, 1, 1)),
        (DateTime(), "2024-01-01T00:00:00"),
        (Time(), datetime.datetime(2024, 1, 1)),
        (Uuid(), str(U)),
        (Uuid(), U.bytes),
        (Uuid(as_uuid=False), 42),
    ],
    ids=lambda x: repr(x)[:30],
)
def test_wrong_python_type_is_refused(t: sqltypes.TypeEngine[Any], value: Any):
    with pytest.raises(InvalidValueError) as info:
        enc(t, value)
    assert (info.value.table, info.value.column) == ("patients", "c")
    assert type(value).__name__ in str(info.value)


@pytest.mark.parametrize(
    ("t", "value"),
    [
        (Uuid(as_uuid=False), "not-a-uuid"),
        (String(), "\ud800"),  # a lone surrogate cannot be UTF-8
        (Integer(), 10**5000),  # beyond Python's int/str conversion limit
    ],
    ids=["uuid", "surrogate", "huge-int"],
)
def test_unencodable_value_is_refused(t: sqltypes.TypeEngine[Any], value: Any):
    with pytest.raises(InvalidValueError):
        enc(t, value)


def test_refusal_does_not_echo_the_value():
    with pytest.raises(InvalidValueError) as info:
        enc(Integer(), "hunter2-secret")
    assert "hunter2" not in str(info.value)
    with pytest.raises(InvalidValueError) as info:
        enc(Uuid(as_uuid=False), "secret-not-a-uuid")
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    "value",
    [
        math.nan,
        math.inf,
        -math.inf,
        {"a": [1, math.nan]},
        {"a": {"b": math.inf}},
        {1, 2},
        b"bytes",
        object(),
        {"when": datetime.date(2024, 1, 1)},
        {("tuple", "key"): 1},
    ],
    ids=lambda x: repr(x)[:20],
)
def test_json_refuses_nan_and_unserializable(value: Any):
    with pytest.raises(InvalidValueError):
        enc(JSON(), value)


def test_json_refuses_circular_structures():
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(InvalidValueError):
        enc(JSON(), loop)


def test_datetime_into_date_column_is_truncated_or_refused():
    try:
        data = enc(Date(), datetime.datetime(2024, 1, 2, 3, 4))
    except InvalidValueError:
        return
    assert dec(Date(), data) == datetime.date(2024, 1, 2)


# -- which codec for which type ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "name"),
    [
        (String(), "str"),
        (Text(), "str"),
        (Unicode(), "str"),
        (LargeBinary(), "bytes"),
        (Integer(), "int"),
        (BigInteger(), "int"),
        (Numeric(), "decimal"),
        (Boolean(), "bool"),
        (Date(), "date"),
        (DateTime(timezone=True), "datetime"),
        (Time(), "time"),
        (JSON(), "json"),
        (Uuid(), "uuid"),
    ],
    ids=lambda x: type(x).__name__ if not isinstance(x, str) else x,
)
def test_codec_for(t: sqltypes.TypeEngine[Any], name: str):
    assert _codecs.codec_for(t).name == name


@pytest.mark.parametrize(
    "t",
    [Enum("a", "b"), ARRAY(Integer()), Interval(), PickleType()],
    ids=lambda t: type(t).__name__,
)
def test_unsupported_types_are_refused(t: sqltypes.TypeEngine[Any]):
    with pytest.raises(ConfigurationError, match="supported: String"):
        _codecs.codec_for(t)


# -- values round-trip as the plain column would on PostgreSQL (issue 7) -----------------------


@pytest.mark.parametrize(
    ("t", "value", "expected"),
    [
        (Numeric(12, 2), decimal.Decimal("1.23456"), decimal.Decimal("1.23")),
        (Numeric(12, 2), decimal.Decimal("0.125"), decimal.Decimal("0.13")),  # ties away from 0
        (Numeric(12, 2), decimal.Decimal("-0.125"), decimal.Decimal("-0.13")),
        (Numeric(12, 2), decimal.Decimal("1.2"), decimal.Decimal("1.20")),
        (Numeric(12, 2), 7, decimal.Decimal("7.00")),
        (Numeric(12, 2), 1.005, decimal.Decimal("1.01")),  # the float's repr, as PostgreSQL
        (Numeric(12, 2), decimal.Decimal("9999999999.994"), decimal.Decimal("9999999999.99")),
        (Numeric(3), decimal.Decimal("12.5"), decimal.Decimal("13")),  # NUMERIC(p) = (p, 0)
        (Numeric(12, 2, asdecimal=False), 1.23456, 1.23),
        (Numeric(scale=2), decimal.Decimal("12345678901.678"), decimal.Decimal("12345678901.68")),
        (Numeric(), decimal.Decimal("1.23456"), decimal.Decimal("1.23456")),  # no scale: as is
    ],
    ids=lambda x: repr(x)[:30],
)
def test_numeric_is_rounded_to_its_scale(t: sqltypes.TypeEngine[Any], value: Any, expected: Any):
    out = dec(t, enc(t, value))
    assert out == expected and type(out) is type(expected)
    if isinstance(expected, decimal.Decimal):
        assert str(out) == str(expected)  # the scale too, as PostgreSQL returns it


def test_numeric_nan_is_kept_as_postgresql_does():
    assert dec(Numeric(12, 2), enc(Numeric(12, 2), decimal.Decimal("NaN"))).is_nan()


@pytest.mark.parametrize(
    ("t", "value"),
    [
        (Numeric(12, 2), decimal.Decimal("1e10")),
        (Numeric(12, 2), decimal.Decimal("9999999999.995")),  # rounds up into an 11th digit
        (Numeric(12, 2), decimal.Decimal("Infinity")),
        (Numeric(12, 2), -math.inf),
        (Numeric(3), 1000),
    ],
    ids=lambda x: repr(x)[:30],
)
def test_numeric_overflow_is_refused(t: sqltypes.TypeEngine[Any], value: Any):
    with pytest.raises(InvalidValueError) as info:
        enc(t, value)
    assert str(value) not in str(info.value)


@pytest.mark.parametrize("t", [Numeric(2, 3), Numeric(0, 0), Numeric(12, -1)], ids=repr)
def test_numeric_the_database_would_refuse_is_refused_at_declaration(t: sqltypes.TypeEngine[Any]):
    with pytest.raises(ConfigurationError, match="Numeric"):
        _codecs.codec_for(t)


def test_naive_datetime_is_refused_for_a_timezone_column():
    with pytest.raises(InvalidValueError, match="aware") as info:
        enc(DateTime(timezone=True), datetime.datetime(2024, 1, 2, 3, 4))
    assert "2024" not in str(info.value)


def test_aware_datetime_is_refused_for_a_naive_column():
    # PostgreSQL would shift it to the session's time zone and drop the offset; SQLite would
    # keep it: neither round-trips the same, so the value is refused.
    with pytest.raises(InvalidValueError, match="naive"):
        enc(DateTime(), datetime.datetime(2024, 1, 2, 3, 4, tzinfo=UTC))


# -- no plaintext in errors, in any part of the chain (issue 7) ---------------------------------

PLAINTEXT = "s3cret-plaintext"


def chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None:
        out.append(seen)
        seen = seen.__cause__ or seen.__context__
    return out


@pytest.mark.parametrize(
    ("t", "value"),
    [
        (String(), "abc\ud800" + PLAINTEXT),
        (Text(), PLAINTEXT + "\udc80"),
        (JSON(), {"k": PLAINTEXT + "\ud800"}),
        (JSON(), {"k": PLAINTEXT, "n": math.nan}),
        (JSON(), {"k": PLAINTEXT, "o": object()}),
        (JSON(), {PLAINTEXT: {1, 2}}),
        (Uuid(as_uuid=False), PLAINTEXT),
        (Numeric(12, 2), decimal.Decimal("1" * 20)),
    ],
    ids=lambda x: repr(x)[:25],
)
def test_refusals_hold_no_plaintext(t: sqltypes.TypeEngine[Any], value: Any):
    with pytest.raises(InvalidValueError) as info:
        enc(t, value)
    err = info.value
    assert chain(err) == [err], "nothing chained: a UnicodeEncodeError would hold the value"
    assert err.__context__ is None and err.__cause__ is None
    text = str(err) + repr(err) + repr(err.args) + repr(pickle.dumps(err))
    assert PLAINTEXT not in text and "1" * 20 not in text


def test_deeply_nested_json_is_refused_typed():
    deep: Any = PLAINTEXT
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(InvalidValueError):
        enc(JSON(), deep)


@pytest.mark.parametrize(
    ("t", "data"),
    [
        (JSON(), b"\x09{" + PLAINTEXT.encode()),  # a JSONDecodeError keeps the document
        (String(), b"\x01\xff" + PLAINTEXT.encode()),  # a UnicodeDecodeError keeps the bytes
        (JSON(), b"\x09" + b"[" * 100_000 + b"]" * 100_000),  # RecursionError
    ],
    ids=["json", "utf8", "deep-json"],
)
def test_decode_errors_hold_no_plaintext(t: sqltypes.TypeEngine[Any], data: bytes):
    with pytest.raises(ConfigurationError) as info:
        dec(t, data)
    assert chain(info.value) == [info.value]
    assert PLAINTEXT not in repr(pickle.dumps(info.value))


@pytest.mark.parametrize("t", [Float(), Numeric(asdecimal=False)], ids=repr)
@pytest.mark.parametrize("value", [10**400, decimal.Decimal("1e400")], ids=repr)
def test_a_finite_value_beyond_the_float_range_is_refused(t: sqltypes.TypeEngine[Any], value: Any):
    # It would come back as infinity; PostgreSQL refuses it ("out of range for type double").
    with pytest.raises(InvalidValueError, match="out of range"):
        enc(t, value)


def test_infinity_given_as_decimal_is_still_a_float_infinity():
    assert dec(Float(), enc(Float(), decimal.Decimal("-Infinity"))) == -math.inf


def test_a_huge_exponent_is_refused_without_writing_out_its_digits():
    with pytest.raises(InvalidValueError, match="integer digits"):
        enc(Numeric(scale=2), decimal.Decimal("1e999999999"))
