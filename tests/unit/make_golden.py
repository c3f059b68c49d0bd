"""Generate tests/unit/golden_v1.json, the stored-format vectors of format version 1. Run ONCE.

The vectors are committed; tests only read them. Regenerating them would defeat their purpose
(proving that data written by an earlier release still decrypts), so this script refuses to
overwrite the file unless given ``--force``, which should only ever be used before the first
release of a format version.

    .venv/bin/python tests/unit/make_golden.py
"""

from __future__ import annotations

import base64
import datetime
import decimal
import hashlib
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Integer,
    LargeBinary,
    Numeric,
    String,
    Time,
    Unicode,
    Uuid,
    create_engine,
    text,
)
from sqlalchemy.orm import DeclarativeBase, mapped_column, sessionmaker

from sqlalchemy_cmk import CMK, EncryptedMixin, EncryptedType, _codecs, _format, tenant_context
from sqlalchemy_cmk.providers.local import LocalKeyProvider

OUT = Path(__file__).with_name("golden_v1.json")

# Type names used in the JSON; tests/unit/test_golden.py maps them to the same SQLAlchemy types.
TYPES = {
    "String": String(),
    "Unicode": Unicode(),
    "Integer": Integer(),
    "BigInteger": BigInteger(),
    "Numeric": Numeric(asdecimal=True),
    # Float would pick the same codec, but is refused under SQLAlchemy 2.1 (see test_codecs).
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

# (column name, type name, plaintext kind, Python value)
COLUMNS: list[tuple[str, str, str, Any]] = [
    ("ssn", "String", "str", "123-45-6789"),
    ("full_name", "Unicode", "str", "Zoë Ångström 🔑"),
    ("visits", "Integer", "int", -42),
    ("big", "BigInteger", "int", 2**62 + 7),
    ("balance", "Numeric", "decimal", decimal.Decimal("12345.6700")),
    ("ratio", "NumericFloat", "float", 0.1),
    ("active", "Boolean", "bool", True),
    ("born_on", "Date", "date", datetime.date(1990, 2, 28)),
    (
        "seen_at",
        "DateTime",
        "datetime",
        datetime.datetime(
            2024, 2, 29, 23, 59, 59, 123456, datetime.timezone(datetime.timedelta(hours=5.5))
        ),
    ),
    ("naive_at", "DateTimeNaive", "datetime", datetime.datetime(2024, 1, 1, 0, 0, 0)),
    ("wakes", "Time", "time", datetime.time(7, 30, 0, 1)),
    (
        "notes",
        "JSON",
        "json",
        {"allergies": ["penicillin"], "score": 9.5, "ok": True, "none": None, "ü": "ß"},
    ),
    ("scan", "LargeBinary", "bytes", b"\x00\x01\xfe\xff\x89PNG"),
    ("external_id", "Uuid", "uuid", uuid.UUID("6f1c2b9e-8a4d-4c3e-9b7a-0d5e4f3a2b1c")),
    ("external_ref", "UuidStr", "uuid_str", "0b8e5f6a-1c2d-4e3f-a4b5-c6d7e8f90a1b"),
]

DOCUMENTS = [
    ("document", {"title": b"Q3 report", "body": b"\x00binary\xffbody"}),
    ("document", {"title": b"second"}),
    ("invoices", {"total": b"1200.00 EUR"}),
]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def to_json(kind: str, value: Any) -> Any:
    if kind in ("str", "int", "bool", "float", "json", "uuid_str"):
        return value
    if kind == "bytes":
        return b64(value)
    return str(value) if kind in ("decimal", "uuid") else value.isoformat()


def deterministic_rng() -> Any:
    counter = 0

    def rng(n: int) -> bytes:
        nonlocal counter
        counter += 1
        return hashlib.shake_256(b"sqlalchemy-cmk golden v1 %d" % counter).digest(n)

    return rng


def format_vector() -> dict[str, Any]:
    dek, nonce, row_id = bytes(range(32)), bytes(range(100, 112)), bytes(range(200, 216))
    codec = _codecs.codec_for(String())
    plaintext = _codecs.encode(codec, "123-45-6789", table="patients", column="ssn")
    aad = _format.aad_prefix("acme", "patients", "ssn") + row_id
    sealed = _format.seal(AESGCM(dek), nonce, aad, plaintext)
    wrapped = bytes(range(61))
    envelope = _format.encode_envelope("acme", "local", "local://acme", wrapped)
    return {
        "dek": dek.hex(),
        "nonce": nonce.hex(),
        "row_id": row_id.hex(),
        "tenant": "acme",
        "table": "patients",
        "column": "ssn",
        "plaintext": plaintext.hex(),
        "aad": aad.hex(),
        "sealed": sealed.hex(),
        "envelope": {
            "provider": "local",
            "key_ref": "local://acme",
            "wrapped": wrapped.hex(),
            "encoded": envelope.hex(),
            "companion": _format.encode_companion(row_id, envelope).hex(),
        },
    }


def stack_vector() -> dict[str, Any]:
    """Write one row through the public ORM path (SQLite in memory) and read its raw bytes."""
    master = os.urandom(32)
    provider = LocalKeyProvider({"golden": master})
    cmk = CMK(provider, tenant_keys={"acme": "local://golden"}, audit_sinks=[])
    cmk._keys.rng = deterministic_rng()  # the rng seam: reproducible DEK, row ids and nonces

    class Base(DeclarativeBase):
        pass

    attrs: dict[str, Any] = {
        "__tablename__": "patients",
        "id": mapped_column(Integer, primary_key=True),
    }
    attrs.update({name: mapped_column(EncryptedType(TYPES[t])) for name, t, _, _ in COLUMNS})
    patient = type("Patient", (EncryptedMixin, Base), attrs)
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    sessions = sessionmaker(engine)
    cmk.install(sessions)
    with tenant_context("acme", actor="golden-generator"):
        with sessions() as s:
            s.add(patient(id=1, **{name: value for name, _, _, value in COLUMNS}))
            s.commit()
        docs = []
        for namespace, fields in DOCUMENTS:
            enc = cmk.encrypt_document(fields, namespace=namespace)
            docs.append(
                {
                    "namespace": namespace,
                    "edek": b64(enc.edek),
                    "fields": {k: b64(v) for k, v in enc.fields.items()},
                    "plaintext": {k: b64(v) for k, v in fields.items()},
                }
            )
    names = ["cmk_edek"] + [name for name, _, _, _ in COLUMNS]
    with engine.connect() as conn:
        raw = conn.execute(text(f"SELECT {', '.join(names)} FROM patients")).one()
    companion, cts = bytes(raw[0]), [bytes(v) for v in raw[1:]]
    row_id, _ = _format.split_companion(companion)
    return {
        "master_keys": {"golden": b64(master)},
        "tenant": "acme",
        "key_ref": "local://golden",
        "provider": "local",
        "table": "patients",
        "companion": b64(companion),
        "row_id": row_id.hex(),
        "columns": [
            {
                "name": name,
                "type": type_name,
                "kind": kind,
                "plaintext": to_json(kind, value),
                "encoded": _codecs.encode(
                    _codecs.codec_for(TYPES[type_name]), value, table="patients", column=name
                ).hex(),
                "ciphertext": b64(ct),
            }
            for (name, type_name, kind, value), ct in zip(COLUMNS, cts, strict=True)
        ],
        "documents": docs,
    }


def main() -> None:
    if OUT.exists() and "--force" not in sys.argv:
        sys.exit(f"{OUT} exists; golden vectors are never regenerated (see module docstring)")
    doc = {
        "comment": (
            "sqlalchemy-cmk stored format v1 vectors, generated once by make_golden.py. Never "
            "regenerate: tests prove that data written in this format still decrypts."
        ),
        "format": format_vector(),
        "stack": stack_vector(),
    }
    OUT.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
