"""The three models compared: the same two text columns, plain, under sqlalchemy-cmk, and under
sqlalchemy-utils' ``StringEncryptedType`` with ``AesGcmEngine`` (the peer)."""

from __future__ import annotations

import random
import string
from typing import Any

from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy_utils import StringEncryptedType  # type: ignore[import-untyped]
from sqlalchemy_utils.types.encrypted.encrypted_type import (  # type: ignore[import-untyped]
    AesGcmEngine,
)

from sqlalchemy_cmk import EncryptedMixin, EncryptedType

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
