"""Migrations that cannot lose data (issue 8), on SQLite and PostgreSQL.

What a user would check after each operation: the raw rows (nothing overwritten, nothing
stranded), that the application reads every row back, and the error it gets when something is
refused: its type, what it names, and that no plaintext travels with it.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from migrations_helpers import backfill
from sqlalchemy_cmk import (
    CMK,
    DecryptionError,
    EncryptedMixin,
    EncryptedType,
    KMSUnavailableError,
    tenant_context,
)
from sqlalchemy_cmk._format import parse_envelope
from sqlalchemy_cmk.testing import FakeKeyProvider

TENANTS = ("acme", "globex")


def make_cmk(provider: FakeKeyProvider, **kw: Any) -> CMK:
    kw.setdefault("tenant_keys", {t: f"fake://{t}" for t in TENANTS})
    return CMK(provider, audit_sinks=[], **kw)


# -- the binary-storage table, as the application declares it ----------------------------------


class Base(DeclarativeBase):
    pass


class Doc(EncryptedMixin, Base):
    """Default (binary) storage: ``a`` and ``b`` share the companion."""

    __tablename__ = "it_docs"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(String(20))
    a: Mapped[str | None] = mapped_column(EncryptedType(String))
    b: Mapped[str | None] = mapped_column(EncryptedType(Text))


def seed_docs(engine: Engine, cmk: CMK, n: int) -> dict[int, tuple[str, str | None, str | None]]:
    Base.metadata.create_all(engine)
    rows = {
        i: (TENANTS[i % 2], f"a-{i}" if i % 5 else None, f"b-{i} ünï" if i % 3 else None)
        for i in range(n)
    }
    maker = sessionmaker(engine)
    cmk.install(maker)
    for t in TENANTS:
        with tenant_context(t), maker.begin() as s:
            for i, (tt, a, b) in rows.items():
                if tt == t:
                    s.add(Doc(id=i, tenant_id=t, a=a, b=b))
    return rows


def read_docs(engine: Engine, cmk: CMK) -> dict[int, tuple[str, str | None, str | None]]:
    maker = sessionmaker(engine)
    cmk.install(maker)
    out = {}
    for t in TENANTS:
        with tenant_context(t), maker() as s:
            for d in s.scalars(select(Doc).where(Doc.tenant_id == t)):
                out[d.id] = (d.tenant_id, d.a, d.b)
    return out


def raw_docs(engine: Engine) -> dict[int, tuple[Any, ...]]:
    t = Table(
        "it_docs",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("a", LargeBinary),
        Column("b", LargeBinary),
        Column("cmk_edek", LargeBinary),
    )
    with engine.connect() as conn:
        return {
            r[0]: tuple(None if v is None else bytes(v) for v in r[1:])
            for r in conn.execute(select(t).order_by(t.c.id))
        }


# -- 4. rewrap owns its key material -----------------------------------------------------------


class ThrottledWrap(FakeKeyProvider):
    """Every other wrap is throttled, as a KMS at its quota does: the key manager retries it
    after a backoff, the window in which another thread wipes a cached key."""

    def __init__(self) -> None:
        super().__init__()
        self.wraps = 0

    def wrap_key(self, key_ref: str, data_key: bytes, context: Any) -> bytes:
        self.wraps += 1
        if self.wraps % 2:
            raise KMSUnavailableError("throttled (injected)", provider=self.scheme)
        return super().wrap_key(key_ref, data_key, context)


class GarbageWrap(FakeKeyProvider):
    """A wrap that answers an unusable blob once ``broken`` is set."""

    broken = False

    def wrap_key(self, key_ref: str, data_key: bytes, context: Any) -> bytes:
        wrapped = super().wrap_key(key_ref, data_key, context)
        return bytes(len(wrapped)) if self.broken else wrapped


def test_rewrap_racing_forget_tenant_wraps_only_the_right_keys(engine: Engine) -> None:
    provider = ThrottledWrap()
    old = make_cmk(
        provider, tenant_keys={t: f"fake://{t}-v1" for t in TENANTS}, write_key_max_uses=2
    )
    rows = seed_docs(engine, old, 160)
    before = raw_docs(engine)
    envelopes = {r[2][17:] for r in before.values() if r[2] is not None}
    assert len(envelopes) > 40
    new = make_cmk(
        provider,
        tenant_keys={t: [f"fake://{t}-v2", f"fake://{t}-v1"] for t in TENANTS},
        retry_backoff=0.01,
    )
    read_docs(engine, new)  # the application process has every key cached
    stop = threading.Event()

    def forget() -> None:
        while not stop.is_set():
            new.forget_tenant()
            read_docs(engine, new)  # and loads them again, evicting and wiping meanwhile

    threads = [threading.Thread(target=forget) for _ in range(2)]
    for th in threads:
        th.start()
    try:
        report = backfill.rewrap_keys(engine, new, "it_docs", batch_size=16)
    finally:
        stop.set()
        for th in threads:
            th.join()
    after = raw_docs(engine)
    assert report.rows == sum(1 for r in after.values() if r[2] is not None)
    for r in after.values():
        if r[2] is not None:
            assert parse_envelope(r[2][17:]).key_ref.endswith("-v2")
    # Every envelope unwraps to the right key: the new key alone reads every row.
    only_v2 = make_cmk(provider, tenant_keys={t: f"fake://{t}-v2" for t in TENANTS})
    assert read_docs(engine, only_v2) == rows


def test_rewrap_with_a_wrap_that_returns_garbage_replaces_nothing(engine: Engine) -> None:
    provider = GarbageWrap()
    old = make_cmk(provider, tenant_keys={t: f"fake://{t}-v1" for t in TENANTS})
    rows = seed_docs(engine, old, 30)
    before = raw_docs(engine)
    new = make_cmk(provider, tenant_keys={t: [f"fake://{t}-v2", f"fake://{t}-v1"] for t in TENANTS})
    provider.broken = True
    with pytest.raises(DecryptionError):
        backfill.rewrap_keys(engine, new, "it_docs")
    provider.broken = False
    assert raw_docs(engine) == before
    assert read_docs(engine, old) == rows
