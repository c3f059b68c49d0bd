"""Shared models and a per-test setup for the database tests.

Each test module turns :func:`make_env` into an ``env`` fixture on top of the dialect-parametrized
``engine`` fixture of ``tests/conftest.py``.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    LargeBinary,
    Numeric,
    String,
    Text,
    Time,
    Uuid,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from sqlalchemy_cmk import CMK, EncryptedMixin, EncryptedType
from sqlalchemy_cmk.audit import AuditEvent
from sqlalchemy_cmk.testing import FakeKeyProvider, MemoryAuditSink

TENANT_KEYS = {"acme": "fake://acme", "globex": "fake://globex"}


class Base(DeclarativeBase):
    pass


class Patient(EncryptedMixin, Base):
    """A typical model: a plain tenant column and a few encrypted ones."""

    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(50))
    ssn: Mapped[str | None] = mapped_column(EncryptedType(String))
    notes: Mapped[dict[str, Any] | None] = mapped_column(EncryptedType(JSON))
    age: Mapped[int | None] = mapped_column(EncryptedType(Integer))


class AllTypes(EncryptedMixin, Base):
    """One encrypted column per supported underlying type, all nullable."""

    __tablename__ = "all_types"

    id: Mapped[int] = mapped_column(primary_key=True)
    s: Mapped[str | None] = mapped_column(EncryptedType(String(200)))
    txt: Mapped[str | None] = mapped_column(EncryptedType(Text))
    blob: Mapped[bytes | None] = mapped_column(EncryptedType(LargeBinary))
    i: Mapped[int | None] = mapped_column(EncryptedType(Integer))
    bi: Mapped[int | None] = mapped_column(EncryptedType(BigInteger))
    num: Mapped[decimal.Decimal | None] = mapped_column(EncryptedType(Numeric(20, 6)))
    flag: Mapped[bool | None] = mapped_column(EncryptedType(Boolean))
    day: Mapped[datetime.date | None] = mapped_column(EncryptedType(Date))
    naive: Mapped[datetime.datetime | None] = mapped_column(EncryptedType(DateTime))
    aware: Mapped[datetime.datetime | None] = mapped_column(EncryptedType(DateTime(timezone=True)))
    clock: Mapped[datetime.time | None] = mapped_column(EncryptedType(Time))
    doc: Mapped[Any] = mapped_column(EncryptedType(JSON), nullable=True)
    uid: Mapped[uuid.UUID | None] = mapped_column(EncryptedType(Uuid))


ALL_TYPES_VALUES: dict[str, Any] = {
    "s": "Grüße, 世界 \u2603 'quoted' \"double\"",
    "txt": "line one\nline two\t" + "x" * 5000,
    "blob": bytes(range(256)) * 3,
    "i": -2_147_483_647,
    "bi": 2**62 + 12345,
    "num": decimal.Decimal("-12345678901234.123456"),
    "flag": True,
    "day": datetime.date(1969, 7, 20),
    "naive": datetime.datetime(2024, 2, 29, 23, 59, 58, 123456),
    "aware": datetime.datetime(
        2024, 3, 1, 8, 30, 0, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30))
    ),
    "clock": datetime.time(13, 14, 15, 987654),
    "doc": {
        "name": "Ada",
        "tags": ["a", "b", {"deep": [1, 2.5, None, True, False, {"x": "ü"}]}],
        "empty": {},
        "n": None,
    },
    "uid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
}

# Values that are easy to confuse with NULL or with each other: they must come back as they went in.
FALSY_VALUES: dict[str, Any] = {
    "s": "",
    "txt": "",
    "blob": b"",
    "i": 0,
    "bi": 0,
    "num": decimal.Decimal("0"),
    "flag": False,
    "doc": [],
}


class Owner(EncryptedMixin, Base):
    __tablename__ = "owners"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(EncryptedType(String))
    pets: Mapped[list[Pet]] = relationship(back_populates="owner", order_by="Pet.id")


class Pet(EncryptedMixin, Base):
    __tablename__ = "pets"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("owners.id"))
    species: Mapped[str] = mapped_column(String(20))
    chip: Mapped[str] = mapped_column(EncryptedType(String))
    owner: Mapped[Owner] = relationship(back_populates="pets")


class RecordingKeyProvider(FakeKeyProvider):
    """The fake KMS, also keeping every data key it wrapped or unwrapped and every wrapped key.

    Lets the tests search stored bytes, audit events and logs for key material.
    """

    def __init__(self) -> None:
        super().__init__()
        self.data_keys: list[bytes] = []
        self.wrapped_keys: list[bytes] = []

    def wrap_key(self, key_ref: str, data_key: bytes, context: Any) -> bytes:
        wrapped = super().wrap_key(key_ref, data_key, context)
        self.data_keys.append(bytes(data_key))
        self.wrapped_keys.append(wrapped)
        return wrapped

    def unwrap_key(self, key_ref: str, wrapped: bytes, context: Any) -> bytes:
        data_key = super().unwrap_key(key_ref, wrapped, context)
        self.data_keys.append(bytes(data_key))
        return data_key


@dataclass
class Env:
    engine: Engine
    Session: sessionmaker[Any]
    cmk: CMK
    kms: RecordingKeyProvider
    audit: MemoryAuditSink

    def raw(self, sql: str, **params: Any) -> list[Any]:
        """Rows read through a plain connection: what the database really holds."""
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params))

    def raw_bytes(self, table: str, column: str, row_id: int) -> bytes | None:
        q = self.engine.dialect.identifier_preparer.quote  # "blob" is a MySQL keyword
        (value,) = self.raw(f"select {q(column)} from {q(table)} where id = :id", id=row_id)[0]
        return None if value is None else bytes(value)


def make_env(engine: Engine, **cmk_kwargs: Any) -> Env:
    """Create the shared tables on ``engine`` and a CMK installed on a fresh sessionmaker."""
    Base.metadata.create_all(engine)
    kms = RecordingKeyProvider()
    audit = MemoryAuditSink()
    cmk_kwargs.setdefault("audit_sinks", [audit])
    cmk = CMK(kms, tenant_keys=TENANT_KEYS, **cmk_kwargs)
    maker = sessionmaker(engine)
    cmk.install(maker)
    return Env(engine, maker, cmk, kms, audit)


def forms_of(secret: str | bytes) -> list[bytes]:
    """Encodings in which a secret could leak into stored bytes."""
    raw = secret.encode() if isinstance(secret, str) else secret
    forms = [raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw)]
    if isinstance(secret, str):
        forms.append(secret.encode("utf-16-le"))
    return [f for f in forms if f]


def text_forms_of(secret: str | bytes) -> list[str]:
    """Encodings in which a secret could leak into a log line or a JSON document."""
    raw = secret.encode() if isinstance(secret, str) else secret
    forms = [raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode(), repr(raw)[2:-1]]
    if isinstance(secret, str):
        forms.append(secret)
    return [f for f in forms if f]


def assert_absent(haystack: str | bytes, secrets: Sequence[str | bytes]) -> None:
    for secret in secrets:
        forms = forms_of(secret) if isinstance(haystack, bytes) else text_forms_of(secret)
        for form in forms:
            assert form not in haystack, f"secret leaked (as {form[:40]!r})"


def event_json(events: Sequence[AuditEvent]) -> list[str]:
    return [json.dumps(e.to_dict(), sort_keys=True) for e in events]
