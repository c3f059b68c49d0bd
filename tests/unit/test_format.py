"""The stored formats (_format.py): layout, bounds, and one opaque error for every malformation."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sqlalchemy_cmk import ConfigurationError, DecryptionError
from sqlalchemy_cmk import _format as fmt

ROW_ID = bytes(range(16))
WRAPPED = bytes(range(61))
ENVELOPE = fmt.encode_envelope("acme", "local", "local://acme", WRAPPED)
COMPANION = fmt.encode_companion(ROW_ID, ENVELOPE)
AEAD = AESGCM(bytes(range(32)))
AAD = fmt.aad_prefix("acme", "patients", "ssn") + ROW_ID
VALUE = fmt.seal(AEAD, bytes(12), AAD, b"\x01123-45-6789")


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def envelope_bytes(tenant: bytes, provider: bytes, key_ref: bytes, wrapped: bytes) -> bytes:
    """An envelope built by hand from the layout in _format's docstring."""
    return (
        u16(len(tenant))
        + tenant
        + bytes([len(provider)])
        + provider
        + u16(len(key_ref))
        + key_ref
        + u16(len(wrapped))
        + wrapped
    )


def assert_opaque(fn, data: bytes) -> str:
    """Check that ``fn(data)`` raises exactly DecryptionError; return its message."""
    with pytest.raises(DecryptionError) as info:
        fn(data)
    assert type(info.value) is DecryptionError
    return str(info.value)


def parse_companion(data: bytes) -> fmt.Envelope:
    _, env = fmt.split_companion(data)
    return fmt.parse_envelope(env)


# -- layout and round trips ---------------------------------------------------------------------


def test_envelope_layout_matches_the_documented_format():
    assert envelope_bytes(b"acme", b"local", b"local://acme", WRAPPED) == ENVELOPE
    assert COMPANION == b"\x01" + ROW_ID + ENVELOPE


@pytest.mark.parametrize(
    ("tenant", "provider", "key_ref", "wrapped"),
    [
        ("acme", "local", "local://acme", WRAPPED),
        ("Zoë-🔑", "aws-kms", "aws-kms://arn:aws:kms:eu-west-1:1:key/ü", b"\x00"),
        ("t" * 1024, "p" * 64, "p" * 64 + "://" + "k" * 1981, b"w" * 8192),  # every maximum
        ("t", "p", "p://", b"w"),  # and the minimum (a key reference is at least "scheme://")
        ("ä" * 512, "p", "p://" + "é" * 1022, b"w"),  # limits count UTF-8 bytes
    ],
)
def test_envelope_round_trip(tenant: str, provider: str, key_ref: str, wrapped: bytes):
    encoded = fmt.encode_envelope(tenant, provider, key_ref, wrapped)
    assert fmt.parse_envelope(encoded) == fmt.Envelope(tenant, provider, key_ref, wrapped)
    companion = fmt.encode_companion(ROW_ID, encoded)
    assert fmt.split_companion(companion) == (ROW_ID, encoded)


@pytest.mark.parametrize(
    ("tenant", "provider", "key_ref", "wrapped"),
    [
        ("", "local", "local://acme", WRAPPED),
        ("t" * 1025, "local", "local://acme", WRAPPED),
        ("ä" * 513, "local", "local://acme", WRAPPED),
        ("acme", "", "local://acme", WRAPPED),
        ("acme", "p" * 65, "local://acme", WRAPPED),
        ("acme", "local", "", WRAPPED),
        ("acme", "local", "k" * 2049, WRAPPED),
        ("acme", "local", "local://acme", b""),
        ("acme", "local", "local://acme", b"w" * 8193),
    ],
)
def test_encode_envelope_rejects_fields_out_of_bounds(tenant, provider, key_ref, wrapped):
    with pytest.raises(ConfigurationError):
        fmt.encode_envelope(tenant, provider, key_ref, wrapped)


def test_value_round_trip_and_layout():
    assert VALUE[0] == 1
    assert VALUE[1:13] == bytes(12)
    assert len(VALUE) == 1 + 12 + len(b"\x01123-45-6789") + 16
    assert fmt.open_(AEAD, AAD, VALUE) == b"\x01123-45-6789"


# -- every malformation, one opaque error -------------------------------------------------------


def test_parse_envelope_rejects_every_truncation():
    messages = {assert_opaque(fmt.parse_envelope, ENVELOPE[:i]) for i in range(len(ENVELOPE))}
    assert len(messages) == 1  # the same error whichever check failed


@pytest.mark.parametrize("suffix", [b"\x00", b"x", b"\x00" * 40, ENVELOPE])
def test_parse_envelope_rejects_every_extension(suffix: bytes):
    assert_opaque(fmt.parse_envelope, ENVELOPE + suffix)


def test_companion_rejects_every_truncation():
    for i in range(len(COMPANION)):
        assert_opaque(parse_companion, COMPANION[:i])


@pytest.mark.parametrize("suffix", [b"\x00", b"x", COMPANION])
def test_companion_rejects_every_extension(suffix: bytes):
    assert_opaque(parse_companion, COMPANION + suffix)


@pytest.mark.parametrize("version", [0, 2, 0x7F, 0xFF])
def test_companion_rejects_other_versions(version: int):
    assert_opaque(fmt.split_companion, bytes([version]) + COMPANION[1:])


@pytest.mark.parametrize("bad", [None, "text", 42])
def test_companion_rejects_non_bytes(bad: object):
    assert_opaque(fmt.split_companion, bad)  # type: ignore[arg-type]


T, P, K, W = b"acme", b"local", b"local://acme", WRAPPED


@pytest.mark.parametrize(
    "data",
    [
        envelope_bytes(b"", P, K, W),  # each length field at 0 ...
        envelope_bytes(T, b"", K, W),
        envelope_bytes(T, P, b"", W),
        envelope_bytes(T, P, K, b""),
        envelope_bytes(b"t" * 1025, P, K, W),  # ... and one past its maximum, data present
        envelope_bytes(T, b"p" * 65, K, W),
        envelope_bytes(T, b"p" * 255, K, W),
        envelope_bytes(T, P, b"k" * 2049, W),
        envelope_bytes(T, P, K, b"w" * 8193),
        u16(0xFFFF) + T + bytes([len(P)]) + P + u16(len(K)) + K + u16(len(W)) + W,  # overlong
        envelope_bytes(T, P, K, W)[:-1],  # wrapped shorter than its length
        envelope_bytes(b"\xff\xfe", P, K, W),  # tenant not UTF-8
        envelope_bytes(T, "lócal".encode(), K, W),  # provider not ASCII
        envelope_bytes(T, P, b"local://\xc3", W),  # key reference not UTF-8
    ],
    ids=lambda d: d[:12].hex(),
)
def test_parse_envelope_rejects_fields_out_of_bounds(data: bytes):
    assert_opaque(fmt.parse_envelope, data)
    assert_opaque(parse_companion, b"\x01" + ROW_ID + data)


def test_open_rejects_every_truncation():
    for i in range(len(VALUE)):
        assert_opaque(lambda v: fmt.open_(AEAD, AAD, v), VALUE[:i])


@pytest.mark.parametrize("suffix", [b"\x00", b"x" * 16, VALUE])
def test_open_rejects_every_extension(suffix: bytes):
    assert_opaque(lambda v: fmt.open_(AEAD, AAD, v), VALUE + suffix)


@pytest.mark.parametrize("version", [0, 2, 0xFF])
def test_open_rejects_other_versions(version: int):
    assert_opaque(lambda v: fmt.open_(AEAD, AAD, v), bytes([version]) + VALUE[1:])


def test_open_rejects_every_bit_flip():
    for i in range(len(VALUE)):
        for bit in range(8):
            flipped = bytearray(VALUE)
            flipped[i] ^= 1 << bit
            assert_opaque(lambda v: fmt.open_(AEAD, AAD, v), bytes(flipped))


@pytest.mark.parametrize(
    "aad",
    [
        fmt.aad_prefix("globex", "patients", "ssn") + ROW_ID,  # another tenant
        fmt.aad_prefix("acme", "doctors", "ssn") + ROW_ID,  # another table
        fmt.aad_prefix("acme", "patients", "notes") + ROW_ID,  # another column
        fmt.aad_prefix("acme", "patients", "ssn") + bytes(16),  # another row
    ],
)
def test_open_rejects_a_value_moved_elsewhere(aad: bytes):
    assert_opaque(lambda v: fmt.open_(AEAD, aad, v), VALUE)


def test_open_rejects_a_value_under_another_key():
    assert_opaque(lambda v: fmt.open_(AESGCM(bytes(32)), AAD, v), VALUE)


# -- associated data ----------------------------------------------------------------------------


def test_aad_prefix_layout():
    assert fmt.aad_prefix("acme", "patients", "ssn") == (
        b"sqlalchemy-cmk\x01" + u16(4) + b"acme" + u16(8) + b"patients" + u16(3) + b"ssn"
    )


def test_aad_prefix_differs_by_tenant_table_and_column():
    prefixes = {
        fmt.aad_prefix(t, tb, c)
        for t in ("acme", "globex")
        for tb in ("patients", "doctors")
        for c in ("ssn", "notes")
    }
    assert len(prefixes) == 8


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (("ab", "c", "x"), ("a", "bc", "x")),  # tenant | table boundary
        (("t", "ab", "c"), ("t", "a", "bc")),  # table | column boundary
        (("abc", "", "x"), ("", "abc", "x")),
        (("a", "b", "c"), ("a\x00", "b", "c")),
    ],
)
def test_aad_prefix_is_unambiguous(one: tuple[str, str, str], other: tuple[str, str, str]):
    assert fmt.aad_prefix(*one) != fmt.aad_prefix(*other)
    assert fmt.aad_prefix(*one) + ROW_ID != fmt.aad_prefix(*other) + ROW_ID
