"""The models compared: the same two text columns, plain, under sqlalchemy-cmk, under a minimal
hand-written AES-GCM type (the floor) and under sqlalchemy-utils' ``StringEncryptedType`` with
``AesGcmEngine`` (the peer); and, for the search
scenarios, a user table three ways: a plain indexed ``email``, an encrypted one, and an encrypted
one with an exact unique blind index."""

from __future__ import annotations

import os
import random
import string
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Dialect, Index, Integer, LargeBinary, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator
from sqlalchemy_utils import StringEncryptedType  # type: ignore[import-untyped]
from sqlalchemy_utils.types.encrypted.encrypted_type import (  # type: ignore[import-untyped]
    AesGcmEngine,
)

from sqlalchemy_cmk import EncryptedMixin, EncryptedType, current_context, tenant_column
from sqlalchemy_cmk.search import BlindIndex, search_tables

# The peer's application-wide key (sqlalchemy-utils hashes it with SHA-256 into an AES-256 key).
PEER_KEY = "benchmark-only-peer-key"
BODY_LEN = 200
TITLE_LEN = 50


class Base(DeclarativeBase):
    pass


class PlainNote(Base):
    __tablename__ = "bench_plain"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(50))
    title: Mapped[str] = mapped_column(String(100))
    body: Mapped[str] = mapped_column(String(400))


class CmkNote(EncryptedMixin, Base):
    __tablename__ = "bench_cmk"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(50))
    title: Mapped[str] = mapped_column(EncryptedType(String))
    body: Mapped[str] = mapped_column(EncryptedType(String))


# The floor's keys: one AESGCM object per tenant, built once and held in memory for the process.
FLOOR_KEYS: dict[str, AESGCM] = {}
_FLOOR_VERSION = b"\x01"


def floor_key(tenant: str) -> AESGCM:
    key = FLOOR_KEYS.get(tenant)
    if key is None:
        key = FLOOR_KEYS[tenant] = AESGCM(AESGCM.generate_key(bit_length=256))
    return key


class FloorText(TypeDecorator[str]):
    """The least an honest per-tenant AES-GCM column type does, as an application would write it
    by hand: the cost floor our ``EncryptedType`` is measured against.

    Stored: ``0x01 | tenant length (1 B) | tenant | nonce (12 B) | ciphertext + tag``; AAD: format
    byte + table + column + tenant. The tenant comes from the context on write and from the header
    on read, where it must equal the context's. No row binding, no key hierarchy, no audit.
    """

    impl = LargeBinary
    cache_ok = True

    def __init__(self, table: str, column: str) -> None:
        super().__init__()
        self.table = table
        self.column = column
        self._aad = _FLOOR_VERSION + f"{table}\0{column}\0".encode()

    def process_bind_param(self, value: str | None, dialect: Dialect) -> bytes | None:
        if value is None:
            return None
        ctx = current_context()
        if ctx is None or ctx.tenant_id is None:
            raise RuntimeError("floor: no tenant in context")
        tenant = ctx.tenant_id.encode()
        nonce = os.urandom(12)
        sealed = floor_key(ctx.tenant_id).encrypt(nonce, value.encode(), self._aad + tenant)
        return _FLOOR_VERSION + bytes((len(tenant),)) + tenant + nonce + sealed

    def process_result_value(self, value: bytes | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        value = bytes(value)  # psycopg returns bytes; other drivers may return memoryview
        if value[:1] != _FLOOR_VERSION:
            raise ValueError("floor: unknown format")
        end = 2 + value[1]
        tenant = value[2:end]
        ctx = current_context()
        if ctx is None or ctx.tenant_id is None or ctx.tenant_id.encode() != tenant:
            raise PermissionError("floor: row of another tenant")
        aead = FLOOR_KEYS[ctx.tenant_id]
        return aead.decrypt(value[end : end + 12], value[end + 12 :], self._aad + tenant).decode()


class FloorNote(Base):
    __tablename__ = "bench_floor"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(50))
    title: Mapped[str] = mapped_column(FloorText("bench_floor", "title"))
    body: Mapped[str] = mapped_column(FloorText("bench_floor", "body"))


class PeerNote(Base):
    __tablename__ = "bench_peer"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(50))
    title: Mapped[str] = mapped_column(StringEncryptedType(String, PEER_KEY, AesGcmEngine))
    body: Mapped[str] = mapped_column(StringEncryptedType(String, PEER_KEY, AesGcmEngine))


class PlainUser(Base):
    """The baseline of a lookup: ``email`` in clear, unique per tenant like the searchable one."""

    __tablename__ = "bench_search_plain"
    __table_args__ = (Index("ix_bench_search_plain_email", "tenant_id", "email", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(50))
    email: Mapped[str] = mapped_column(String(255))


class CmkUser(EncryptedMixin, Base):
    """``email`` encrypted, not searchable: the baseline of the index's cost on insert."""

    __tablename__ = "bench_search_cmk"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[str] = tenant_column(String(50))
    email: Mapped[str] = mapped_column(EncryptedType(String(255)))


class SearchUser(EncryptedMixin, Base):
    """``email`` encrypted with an exact (128-bit) unique blind index: ``email_bidx`` and
    ``email_bidx_alt`` columns, each in a unique index over (tenant_id, slot)."""

    __tablename__ = "bench_search_bidx"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[str] = tenant_column(String(50))
    email: Mapped[str] = mapped_column(
        EncryptedType(String(255), search=BlindIndex(normalize="email", unique=True))
    )


# cmk_tenant_keys (the tenants' wrapped root keys) and cmk_search_indexes (the index states).
search_tables(Base.metadata)


def make_users(n: int, tenants: list[str], start: int = 0) -> list[dict[str, Any]]:
    """``n`` users (distinct e-mail addresses of ~30 B), tenants round-robin from ``start``."""
    return [
        {
            "tenant_id": tenants[i % len(tenants)],
            "email": f"user{i:07d}.{i * 7919 % 100_003:05d}@example{i % 97}.com",
        }
        for i in range(start, start + n)
    ]


def make_rows(n: int, tenants: list[str], seed: int = 20260101) -> list[dict[str, Any]]:
    """``n`` distinct rows (title ~50 B, body ~200 B of ASCII text), tenants round-robin."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + "      "
    return [
        {
            "tenant_id": tenants[i % len(tenants)],
            "title": "".join(rng.choices(alphabet, k=TITLE_LEN)),
            "body": "".join(rng.choices(alphabet, k=BODY_LEN)),
        }
        for i in range(n)
    ]
