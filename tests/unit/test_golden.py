"""Golden vectors of stored format v1 (golden_v1.json, generated once by make_golden.py).

These bytes were written by sqlalchemy-cmk 0.1.0. If a test here fails, a change has broken the
reading of data that users already have in their databases: fix the change, never the vectors.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import struct
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Time,
    Unicode,
    Uuid,
)

from sqlalchemy_cmk import (
    CMK,
    DecryptionError,
    EDEKType,
    EncryptedDocument,
    EncryptedType,
    EncryptedValue,
    TenantMismatchError,
    _codecs,
    cross_tenant_context,
    tenant_context,
)
from sqlalchemy_cmk import _format as fmt
from sqlalchemy_cmk.providers.local import LocalKeyProvider

GOLDEN = json.loads(Path(__file__).with_name("golden_v1.json").read_text(encoding="utf-8"))
F = GOLDEN["format"]
S = GOLDEN["stack"]

TYPES = {
    "String": String(),
    "Unicode": Unicode(),
    "Integer": Integer(),
    "BigInteger": BigInteger(),
    "Numeric": Numeric(asdecimal=True),
    "NumericFloat": Numeric(asdecimal=False),
    "Boolean": Boolean(),
    "Date": Date(),
    "DateTime": DateTime(timezone=True),
    "DateTimeNaive": DateTime(),
    "Time": Time(),
    "JSON": JSON(),
    "LargeBinary": LargeBinary(),
    "Uuid": Uuid(),
    "UuidStr": Uuid(as_uuid=False),
}


def b64(text: str) -> bytes:
    return base64.b64decode(text)


def expected(kind: str, value: Any) -> Any:
    """The committed plaintext as the Python value a user reads back."""
    return {
        "str": lambda v: v,
        "int": lambda v: v,
        "bool": lambda v: v,
        "float": lambda v: v,
        "json": lambda v: v,
        "uuid_str": lambda v: v,
        "bytes": b64,
        "decimal": decimal.Decimal,
        "uuid": uuid.UUID,
        "date": datetime.date.fromisoformat,
        "datetime": datetime.datetime.fromisoformat,
        "time": datetime.time.fromisoformat,
    }[kind](value)


def golden_cmk(**kwargs: Any) -> CMK:
    keys = {name: b64(k) for name, k in S["master_keys"].items()}
    return CMK(
        LocalKeyProvider(keys), tenant_keys={S["tenant"]: S["key_ref"]}, audit_sinks=[], **kwargs
    )


def golden_table(name: str = S["table"]) -> Table:
    return Table(
        name,
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("cmk_edek", EDEKType()),
        *[Column(c["name"], EncryptedType(TYPES[c["type"]])) for c in S["columns"]],
    )


def golden_row(**override: bytes) -> dict[str, Any]:
    row: dict[str, Any] = {"id": 1, "cmk_edek": b64(S["companion"])}
    for c in S["columns"]:
        row[c["name"]] = EncryptedValue(override.get(c["name"], b64(c["ciphertext"])))
    return row


def golden_documents() -> list[EncryptedDocument]:
    return [
        EncryptedDocument(b64(d["edek"]), {k: b64(v) for k, v in d["fields"].items()})
        for d in S["documents"]
    ]


def test_vectors_cover_every_codec():
    assert {c["kind"] for c in S["columns"]} >= {
        "str",
        "int",
        "json",
        "datetime",
        "bytes",
        "uuid",
        "decimal",
        "float",
        "bool",
        "date",
        "time",
        "uuid_str",
    }
    assert {c["type"] for c in S["columns"]} == set(TYPES)


# -- format level: fixed key, nonce and row id ----------------------------------------------------


def test_seal_gives_the_committed_bytes():
    aad = fmt.aad_prefix(F["tenant"], F["table"], F["column"]) + bytes.fromhex(F["row_id"])
    assert aad.hex() == F["aad"]
    aead = AESGCM(bytes.fromhex(F["dek"]))
    sealed = fmt.seal(aead, bytes.fromhex(F["nonce"]), aad, bytes.fromhex(F["plaintext"]))
    assert sealed.hex() == F["sealed"]
    assert fmt.open_(aead, aad, bytes.fromhex(F["sealed"])).hex() == F["plaintext"]


def test_plaintext_encoding_is_the_committed_one():
    codec = _codecs.codec_for(String())
    encoded = _codecs.encode(codec, "123-45-6789", table=F["table"], column=F["column"])
    assert encoded.hex() == F["plaintext"]


def test_envelope_and_companion_give_the_committed_bytes():
    e = F["envelope"]
    wrapped = bytes.fromhex(e["wrapped"])
    envelope = fmt.encode_envelope(F["tenant"], e["provider"], e["key_ref"], wrapped)
    assert envelope.hex() == e["encoded"]
    companion = fmt.encode_companion(bytes.fromhex(F["row_id"]), envelope)
    assert companion.hex() == e["companion"]
    row_id, env = fmt.split_companion(bytes.fromhex(e["companion"]))
    assert row_id.hex() == F["row_id"]
    assert fmt.parse_envelope(env) == fmt.Envelope(
        F["tenant"], e["provider"], e["key_ref"], wrapped
    )


# -- full stack: data written through the ORM by 0.1.0 ------------------------------------------


def test_committed_row_decrypts_to_the_committed_plaintexts():
    cmk = golden_cmk()
    with tenant_context(S["tenant"], actor="golden-test"):
        out = cmk.decrypt_row(golden_table(), golden_row())
    assert out["id"] == 1
    for c in S["columns"]:
        want = expected(c["kind"], c["plaintext"])
        got = out[c["name"]]
        assert got == want, c["name"]
        assert type(got) is type(want), c["name"]
        if isinstance(want, datetime.datetime):
            assert got.utcoffset() == want.utcoffset(), c["name"]


def test_committed_row_decrypts_without_a_cache():
    cmk = golden_cmk(cache_ttl=0)
    with cross_tenant_context(actor="golden-test"):
        out = cmk.decrypt_row(golden_table(), golden_row())
    assert out["ssn"] == "123-45-6789"


def test_committed_documents_decrypt():
    cmk = golden_cmk()
    docs = golden_documents()
    with tenant_context(S["tenant"]):
        for d, doc in zip(S["documents"], docs, strict=True):
            got = cmk.decrypt_documents([doc], namespace=d["namespace"])
            assert got == [{k: b64(v) for k, v in d["plaintext"].items()}]


def test_committed_plaintext_encodings_decode_and_are_still_written():
    for c in S["columns"]:
        codec = _codecs.codec_for(TYPES[c["type"]])
        want = expected(c["kind"], c["plaintext"])
        encoded = bytes.fromhex(c["encoded"])
        assert _codecs.decode(codec, encoded, table="t", column=c["name"]) == want
        assert _codecs.encode(codec, want, table="t", column=c["name"]) == encoded, c["name"]


def test_committed_bytes_follow_the_documented_layout():
    """Decrypt the committed row with nothing but the format docstrings and AES-GCM."""
    companion = b64(S["companion"])
    assert companion[0] == 1
    row_id = companion[1:17]
    assert row_id.hex() == S["row_id"]
    pos = 17
    fields = []
    for size in (2, 1, 2, 2):
        (n,) = struct.unpack_from(">H" if size == 2 else ">B", companion, pos)
        pos += size
        fields.append(companion[pos : pos + n])
        pos += n
    assert pos == len(companion)
    tenant, provider, key_ref, wrapped = fields
    assert (tenant.decode(), provider.decode(), key_ref.decode()) == (
        S["tenant"],
        S["provider"],
        S["key_ref"],
    )
    # The local provider's wrap: 0x01 | nonce12 | AES-GCM(master, dek), AAD binds name + context.
    assert wrapped[0] == 1 and len(wrapped) == 61
    master = b64(S["master_keys"]["golden"])
    wrap_aad = (
        b"sqlalchemy-cmk/local-wrap/v1" + json.dumps(["golden", [["tenant", "acme"]]]).encode()
    )
    dek = AESGCM(master).decrypt(wrapped[1:13], wrapped[13:], wrap_aad)
    for c in S["columns"]:
        value = b64(c["ciphertext"])
        assert value[0] == 1
        name = c["name"].encode()
        aad = (
            b"sqlalchemy-cmk\x01"
            + struct.pack(">H", len(tenant))
            + tenant
            + struct.pack(">H", len(S["table"]))
            + S["table"].encode()
            + struct.pack(">H", len(name))
            + name
            + row_id
        )
        assert AESGCM(dek).decrypt(value[1:13], value[13:], aad).hex() == c["encoded"]


# -- and the committed bytes are not accepted elsewhere --------------------------------------


def test_committed_row_under_another_tenant_is_a_mismatch():
    cmk = CMK(
        LocalKeyProvider({n: b64(k) for n, k in S["master_keys"].items()}),
        tenant_keys={S["tenant"]: S["key_ref"], "globex": S["key_ref"]},
        audit_sinks=[],
    )
    with tenant_context("globex"), pytest.raises(TenantMismatchError):
        cmk.decrypt_row(golden_table(), golden_row())


def test_committed_row_in_another_table_fails():
    cmk = golden_cmk()
    with tenant_context(S["tenant"]), pytest.raises(DecryptionError):
        cmk.decrypt_row(golden_table("doctors"), golden_row())


def test_committed_value_moved_to_another_column_fails():
    cmk = golden_cmk()
    ssn = next(c for c in S["columns"] if c["name"] == "ssn")
    with tenant_context(S["tenant"]), pytest.raises(DecryptionError):
        cmk.decrypt_row(golden_table(), golden_row(full_name=b64(ssn["ciphertext"])))


def test_committed_row_under_another_master_key_fails():
    cmk = CMK(
        LocalKeyProvider({"golden": bytes(range(32))}),
        tenant_keys={S["tenant"]: S["key_ref"]},
        audit_sinks=[],
    )
    with tenant_context(S["tenant"]), pytest.raises(DecryptionError):
        cmk.decrypt_row(golden_table(), golden_row())


def test_committed_document_field_moved_to_another_document_fails():
    cmk = golden_cmk()
    first, second = golden_documents()[:2]
    moved = EncryptedDocument(second.edek, {"title": first.fields["title"]})
    with tenant_context(S["tenant"]), pytest.raises(DecryptionError):
        cmk.decrypt_document(moved)
