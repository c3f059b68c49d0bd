"""The three models compared: the same two text columns, plain, under sqlalchemy-cmk, and under
sqlalchemy-utils' ``StringEncryptedType`` with ``AesGcmEngine`` (the peer); and, for the search
scenarios, a user table three ways: a plain indexed ``email``, an encrypted one, and an encrypted
one with an exact unique blind index."""

from __future__ import annotations

import random
import string
from typing import Any

from sqlalchemy import Index, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy_utils import StringEncryptedType  # type: ignore[import-untyped]
from sqlalchemy_utils.types.encrypted.encrypted_type import (  # type: ignore[import-untyped]
    AesGcmEngine,
)

from sqlalchemy_cmk import EncryptedMixin, EncryptedType, tenant_column
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
