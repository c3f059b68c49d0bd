"""Blind index format v1 pinned (issue 10): index keys, messages and stored index values are
golden vectors, also recomputed here from the documented construction with the standard library,
so a change that would stop stored indexes from matching fails. Also the planner, and the
declaration errors."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import math
import struct
import warnings
from typing import Any

import pytest
from sqlalchemy import Date, Integer, LargeBinary, String
from sqlalchemy.orm import DeclarativeBase, Mapped, configure_mappers, mapped_column

from sqlalchemy_cmk import EncryptedMixin, EncryptedType, tenant_column
from sqlalchemy_cmk._codecs import codec_for
from sqlalchemy_cmk.errors import ConfigurationError, InvalidValueError
from sqlalchemy_cmk.search import (
    EXACT_BITS,
    BlindIndex,
    SearchLeakageWarning,
    check_plan,
    coincidences,
    email_domain,
    index_key,
    index_value,
    last_digits,
    message,
    plan_bits,
    year,
)

ROOT = bytes(range(32))
ROOT2 = b"\xff" * 32

KEYS = [
    (
        ROOT,
        "users.email_bidx",
        1,
        "560fa1ac7a1e7e25c77b01650033e68a3e3cac45be7f28573493717ed53b14dc",
    ),
    (
        ROOT,
        "users.email_bidx",
        2,
        "003228225f843d33b177882927436dad297afdc9955ac31b4bb9bff59e6bf264",
    ),
    (ROOT, "srch.email", 1, "7c8864cc23aba1db196ff56e321cecf6c49d9459e3b4b7300e48b47a3bd2bf00"),
    (
        ROOT2,
        "users.email_bidx",
        1,
        "f189d44f4b0d40656f2155430314da3150212a2fea70ab12b4403f0aedfc764f",
    ),
    (ROOT, "", 1, "6392d0ef9cfbc9416a57ebe0a30a8d37c48f57ce0dffeed01f54f26036420e60"),
    (ROOT, "d\u00e9", 7, "ed2abb9cb8e1cff9a29b9592a945ceb9e6a33f41e2bf6492c88202e155b39666"),
]


def hkdf_sha256(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 with no salt (a zero-filled one), written out."""
    prk = hmac.new(b"\0" * 32, ikm, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


@pytest.mark.parametrize(("root", "domain", "version", "expected"), KEYS)
def test_index_key_golden(root: bytes, domain: str, version: int, expected: str) -> None:
    assert index_key(root, domain, version).hex() == expected
    d = domain.encode()
    info = b"sqlalchemy-cmk/bidx/v1" + struct.pack(">H", len(d)) + d + struct.pack(">I", version)
    assert hkdf_sha256(root, info).hex() == expected
    assert index_key(bytearray(root), domain, version).hex() == expected


def test_index_keys_differ_by_every_input() -> None:
    assert len({e for *_, e in KEYS}) == len(KEYS)
    # The length prefix keeps (domain, version) unambiguous.
    assert index_key(ROOT, "a\x00\x00\x00\x01", 1) != index_key(ROOT, "a", 1)


MESSAGES: list[tuple[Any, Any, str]] = [
    ("ann@example.com", String(), "01616e6e406578616d706c652e636f6d"),
    ("", String(), "01"),
    ("\u00e9", String(), "01c3a9"),
    (6789, Integer(), "0336373839"),
    (0, Integer(), "0330"),
    (-1, Integer(), "032d31"),
    (b"\x00\x01", LargeBinary(), "020001"),
    (datetime.date(2024, 2, 29), Date(), "06323032342d30322d3239"),
    # A derived index's output is encoded by its Python type.
    ("6789", None, "0136373839"),
    (2024, None, "0332303234"),
    (b"ab", None, "026162"),
]


@pytest.mark.parametrize(("value", "type_", "expected"), MESSAGES)
def test_message_golden(value: Any, type_: Any, expected: str) -> None:
    codec = None if type_ is None else codec_for(type_)
    assert message(value, codec, table="t", column="c").hex() == expected


def test_message_refuses_what_the_columns_codec_cannot_encode() -> None:
    # A term of the wrong type would otherwise be encoded another way and never match.
    with pytest.raises(InvalidValueError, match=r"t\.c"):
        message("2024", codec_for(Integer()), table="t", column="c")
    # A derived index's output (year() of a date column) is passed without the column's codec.
    assert message(2024, None, table="t", column="c").hex() == "0332303234"


KEY = bytes.fromhex(KEYS[0][3])
# Any fixed message: these vectors pin the MAC and its truncation, not the encoding.
MSG = bytes.fromhex("0101616e6e406578616d706c652e636f6d")
VALUES = [
    (1, "010000000100"),
    (2, "010000000140"),
    (7, "010000000170"),
    (8, "010000000171"),
    (9, "01000000017100"),
    (13, "01000000017118"),
    (16, "0100000001711d"),
    (32, "0100000001711da041"),
    (127, "0100000001711da041c85eb286118c4925a12cd944"),
    (128, "0100000001711da041c85eb286118c4925a12cd944"),
    (256, "0100000001711da041c85eb286118c4925a12cd9448cb029ced97601d1b18e7c977adf6cb5"),
]


@pytest.mark.parametrize(("bits", "expected"), VALUES)
def test_index_value_golden(bits: int, expected: str) -> None:
    got = index_value(KEY, 1, bits, MSG)
    assert got.hex() == expected
    # From the documented layout: 0x01 | u32 version | HMAC[:ceil(bits/8)], spare bits zeroed.
    n = math.ceil(bits / 8)
    mac = int.from_bytes(hmac.new(KEY, MSG, hashlib.sha256).digest()[:n], "big")
    mac &= ~((1 << (n * 8 - bits)) - 1)
    assert got == b"\x01" + struct.pack(">I", 1) + mac.to_bytes(n, "big")


def test_index_value_carries_its_version() -> None:
    assert index_value(KEY, 258, 16, MSG).hex() == "0100000102711d"


# -- the planner ------------------------------------------------------------------------------


def test_plan_bits() -> None:
    assert plan_bits(1_000_000) == 18
    assert plan_bits(1000) == 8
    assert plan_bits(1000, others=[4]) == 4
    assert plan_bits(10**9, input_bits=13.29) == 13
    assert plan_bits(1) == 1
    assert plan_bits(2**300) == 256
    for rows in (10, 1000, 10**6, 10**9):
        c = coincidences(rows, [plan_bits(rows)])
        assert 2 <= c <= math.sqrt(rows) or rows < 16
    with pytest.raises(ConfigurationError):
        plan_bits(0)


def test_coincidences() -> None:
    assert coincidences(1024, [8]) == 4.0
    assert coincidences(1024, [4, 4]) == 4.0
    assert coincidences(1024, []) == 1024


def test_check_plan_warns_too_many_bits() -> None:
    with pytest.warns(SearchLeakageWarning, match="below 2"):
        check_plan("t.c", [BlindIndex(expected_rows=10_000, bits=32)])


def test_check_plan_warns_too_few_bits() -> None:
    with pytest.warns(SearchLeakageWarning, match="above sqrt") as record:
        check_plan("t.c", [BlindIndex(expected_rows=10_000, bits=1)])
    assert record[0].filename == __file__


def test_check_plan_warns_too_many_derived_indexes() -> None:
    with pytest.warns(SearchLeakageWarning, match="below 2"):
        check_plan(
            "t.c",
            [
                BlindIndex(expected_rows=10_000),
                BlindIndex(name="l4", transform=last_digits(4), bits=8),
            ],
        )


def test_check_plan_quiet() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_plan("t.c", [BlindIndex(expected_rows=10_000)])  # the planner's own choice
        check_plan("t.c", [BlindIndex(expected_rows=10_000, unique=True)])
        check_plan("t.c", [BlindIndex(bits=64)])  # nothing planned: nothing to check
        check_plan(
            "t.c",
            [BlindIndex(unique=True, expected_rows=10_000), BlindIndex(name="y", transform=year)],
        )


def test_widths() -> None:
    assert BlindIndex().width == 32
    assert BlindIndex(unique=True).width == EXACT_BITS
    assert BlindIndex(expected_rows=1000).width == 8
    assert BlindIndex(name="l4", transform=last_digits(4), expected_rows=10**9).width == 13


def test_prepare() -> None:
    assert BlindIndex(normalize="email").prepare(" \uff21nn@Example.COM ") == "ann@example.com"
    assert BlindIndex(normalize="digits").prepare("123-45-6789") == "123456789"
    assert BlindIndex(transform=last_digits(4)).prepare("123-45-6789") == "6789"
    assert BlindIndex(transform=last_digits(4)).prepare("12") is None
    assert BlindIndex(transform=email_domain).prepare("Ann@Example.COM") == "example.com"
    assert BlindIndex(transform=email_domain).prepare("nobody") is None
    assert BlindIndex(transform=year).prepare(datetime.date(1999, 1, 2)) == 1999
    assert BlindIndex(normalize=["trim", "lower"]).prepare(" AB ") == "ab"


def test_fingerprint_names_the_normalizers() -> None:
    assert BlindIndex(normalize="email").fingerprint == "normalize=email;transform="
    ix = BlindIndex(normalize=("trim", "lower"), transform=last_digits(4))
    assert ix.fingerprint == "normalize=trim,lower;transform=last_digits(4)"


# -- declaration errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 0},
        {"bits": 257},
        {"bits": "8"},
        {"bits": 8.0},
        {"bits": True},  # a bool is an int to Python, not a width
        {"expected_rows": True},
        {"unique": True, "bits": 64},
        {"unique": True, "bits": 127},
        {"normalize": "nope"},
        {"normalize": ["trim", "nope"]},
        {"name": "1abc"},
        {"name": "a b"},
        {"name": "x" * 52},
        {"domain": ""},
        {"transform": "year"},
        {"expected_rows": 0},
    ],
)
def test_bad_declarations(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        BlindIndex(**kwargs)


def test_unique_exact_is_fine() -> None:
    assert BlindIndex(unique=True, bits=128).width == 128
    assert BlindIndex(unique=True, bits=256).width == 256


class _Base(DeclarativeBase):
    pass


def _model(name: str, col: Any, *, tenant: bool = True) -> Any:
    ns: dict[str, Any] = {
        "__tablename__": name,
        "__annotations__": {"id": Mapped[int], "v": Mapped[str]},
        "id": mapped_column(primary_key=True),
        "v": mapped_column(col),
    }
    if tenant:
        ns["__annotations__"]["tenant_id"] = Mapped[str]
        ns["tenant_id"] = tenant_column()
    return type(name, (EncryptedMixin, _Base), ns)


def test_two_unnamed_indexes() -> None:
    with pytest.raises(ConfigurationError, match="two blind indexes"):
        _model("srchu_two", EncryptedType(String(20), search=[BlindIndex(), BlindIndex()]))


def test_two_indexes_of_the_value_itself() -> None:
    with pytest.raises(ConfigurationError, match="only one"):
        _model(
            "srchu_two_plain",
            EncryptedType(String(20), search=[BlindIndex(), BlindIndex(name="other")]),
        )


def test_slot_columns_and_db_indexes() -> None:
    m = _model(
        "srchu_ok",
        EncryptedType(
            String(20),
            search=[
                BlindIndex(unique=True),
                BlindIndex(name="v_last4", transform=last_digits(4), bits=8),
            ],
        ),
    )
    t = m.__table__
    assert {"v_bidx", "v_bidx_alt", "v_last4", "v_last4_alt"} <= set(t.c.keys())
    found = {ix.name: ([c.name for c in ix.columns], ix.unique) for ix in t.indexes}
    assert found["ix_srchu_ok_v_bidx"] == (["tenant_id", "v_bidx"], True)
    assert found["ix_srchu_ok_v_bidx_alt"] == (["tenant_id", "v_bidx_alt"], True)
    assert found["ix_srchu_ok_v_last4"] == (["tenant_id", "v_last4"], False)


def test_missing_tenant_column_refused_when_mapped() -> None:
    from sqlalchemy_cmk._mapping import mapper_spec

    m = _model("srchu_no_tenant", EncryptedType(String(20), search=BlindIndex()), tenant=False)
    with pytest.raises(ConfigurationError, match="tenant column"):
        configure_mappers()
        mapper_spec(m.__mapper__)


def test_leakage_warning_when_declared() -> None:
    """The warning points at the model's declaration, not into SQLAlchemy's event code."""
    with pytest.warns(SearchLeakageWarning) as record:
        _model(
            "srchu_leaky",
            EncryptedType(String(20), search=BlindIndex(expected_rows=10_000, bits=40)),
        )
    assert record[0].filename == __file__


def test_root_check_golden() -> None:
    from sqlalchemy_cmk.search import root_check

    expected = "96b4abc0f214b07051dd063a75ec0e21b85c485a986771820309e22e9cd474da"
    assert root_check(ROOT).hex() == expected
    assert root_check(bytearray(ROOT)).hex() == expected
    label = b"sqlalchemy-cmk/root-check/v1"
    assert root_check(ROOT) == hmac.new(ROOT, label, hashlib.sha256).digest()
