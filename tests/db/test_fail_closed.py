"""Fail closed: no tenant, a KMS outage, a denial or a revocation never writes or reveals data.

Each failure is checked the way a user would: the typed error, the number of KMS calls, the raw
row count (or the raw bytes) in the database, and the plaintext still in the Python objects.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, String, func, insert, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_cmk import (
    CMK,
    EncryptedMixin,
    EncryptedType,
    KeyAccessDeniedError,
    KMSUnavailableError,
    NoTenantError,
    cross_tenant_context,
    tenant_context,
)
from sqlalchemy_cmk.providers.local import LocalKeyProvider
from sqlalchemy_cmk.testing import FakeKeyProvider, MemoryAuditSink


class Base(DeclarativeBase):
    pass


class Account(EncryptedMixin, Base):
    __tablename__ = "fc_accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(50))
    handle: Mapped[str] = mapped_column(String(50), unique=True)
    email: Mapped[str] = mapped_column(EncryptedType(String))


ACME, GLOBEX = "acme", "globex"
ACME_KEY, GLOBEX_KEY = "fake://acme", "fake://globex"
RETRIES = 5


@dataclass
class Env:
    engine: Engine
    session: sessionmaker[Session]
    cmk: CMK
    kms: Any  # FakeKeyProvider or LocalKeyProvider
    audit: MemoryAuditSink

    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(Account.__table__)).scalar_one()

    def raw(self) -> list[tuple[Any, ...]]:
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT id, email, cmk_edek FROM fc_accounts ORDER BY id"))
            return [(i, bytes(e), bytes(k)) for i, e, k in rows]

    def write(self, tenant: str, *emails: str) -> None:
        with tenant_context(tenant), self.session() as s:
            s.add_all(Account(tenant_id=tenant, handle=f"{tenant}-{e}", email=e) for e in emails)
            s.commit()

    def read(self, tenant: str) -> dict[str, str]:
        with tenant_context(tenant), self.session() as s:
            rows = s.scalars(select(Account).where(Account.tenant_id == tenant)).all()
            return {a.handle: a.email for a in rows}


@pytest.fixture
def make_env(engine: Engine) -> Iterator[Callable[..., Env]]:
    Base.metadata.create_all(engine)
    installed: list[tuple[CMK, sessionmaker[Session]]] = []

    def make(kms: Any = None, **options: Any) -> Env:
        kms = kms if kms is not None else FakeKeyProvider()
        scheme = kms.scheme
        audit = MemoryAuditSink()
        options.setdefault("retry_attempts", RETRIES)
        options.setdefault("retry_backoff", 0.001)
        cmk = CMK(
            kms,
            tenant_keys={ACME: f"{scheme}://acme", GLOBEX: f"{scheme}://globex"},
            audit_sinks=[audit],
            **options,
        )
        factory = sessionmaker(engine)
        cmk.install(factory)
        installed.append((cmk, factory))
        return Env(engine, factory, cmk, kms, audit)

    yield make
    for cmk, factory in installed:
        cmk.uninstall(factory)


@pytest.fixture
def env(make_env: Callable[..., Env]) -> Env:
    return make_env()


def accounts(tenant: str, *emails: str) -> list[Account]:
    return [Account(tenant_id=tenant, handle=f"{tenant}-{e}", email=e) for e in emails]


def assert_plaintext_kept(objs: list[Account], emails: tuple[str, ...]) -> None:
    """The objects still hold their plaintext: not a sealed placeholder, not ciphertext."""
    for obj, email in zip(objs, emails, strict=True):
        assert type(inspect(obj).dict["email"]) is str
        assert obj.email == email


# -- no tenant -----------------------------------------------------------------------------------


def test_flush_without_tenant_raises_and_writes_nothing(env: Env) -> None:
    emails = ("pt:n1", "pt:n2", "pt:n3")
    with env.session() as s:
        objs = accounts(ACME, *emails)
        s.add_all(objs)
        with pytest.raises(NoTenantError):
            s.flush()
        with pytest.raises(NoTenantError):
            s.commit()
        assert_plaintext_kept(objs, emails)
        assert env.count() == 0
        s.rollback()
        with pytest.raises(NoTenantError):
            s.execute(insert(Account), [{"tenant_id": ACME, "handle": "h", "email": "pt:n4"}])
        s.rollback()
    assert env.count() == 0
    assert env.kms.calls == []


def test_flush_without_tenant_then_with_one_in_the_same_session(env: Env) -> None:
    with env.session() as s:
        objs = accounts(ACME, "pt:n1")
        s.add_all(objs)
        with pytest.raises(NoTenantError):
            s.commit()
        with tenant_context(ACME):
            s.commit()
    assert env.count() == 1
    assert env.read(ACME) == {"acme-pt:n1": "pt:n1"}


def test_writing_in_cross_tenant_context_raises_no_tenant(env: Env) -> None:
    env.write(ACME, "pt:a1")
    with cross_tenant_context(actor="job"), env.session() as s:
        # Reading works here; writing has no tenant to encrypt for.
        assert [a.email for a in s.scalars(select(Account))] == ["pt:a1"]
        objs = accounts(ACME, "pt:x1")
        s.add_all(objs)
        with pytest.raises(NoTenantError):
            s.commit()
        assert_plaintext_kept(objs, ("pt:x1",))
        s.rollback()
        with pytest.raises(NoTenantError):
            s.execute(insert(Account), [{"tenant_id": ACME, "handle": "h", "email": "pt:x2"}])
        s.rollback()
        existing = s.scalars(select(Account)).one()
        existing.email = "pt:changed"
        with pytest.raises(NoTenantError):
            s.commit()
        s.rollback()
    assert env.count() == 1
    assert env.read(ACME) == {"acme-pt:a1": "pt:a1"}


# -- KMS outage and denial on write --------------------------------------------------------------


def test_kms_outage_during_flush_retries_then_fails_and_writes_nothing(env: Env) -> None:
    emails = ("pt:o1", "pt:o2", "pt:o3")
    env.kms.fail_next(10)
    with tenant_context(ACME), env.session() as s:
        objs = accounts(ACME, *emails)
        s.add_all(objs)
        with pytest.raises(KMSUnavailableError) as info:
            s.commit()
        assert info.value.tenant == ACME
        assert (env.kms.wrap_count, env.kms.unwrap_count) == (RETRIES, 0)  # bounded retries
        assert env.count() == 0
        assert_plaintext_kept(objs, emails)
        s.rollback()

        # The outage goes on (5 injected failures left): the same bounded attempt, still nothing.
        s.add_all(objs)
        with pytest.raises(KMSUnavailableError):
            s.commit()
        assert env.kms.wrap_count == 2 * RETRIES
        assert env.count() == 0
        assert_plaintext_kept(objs, emails)
        s.rollback()

        # The KMS is back: the same session and the same objects commit.
        s.add_all(objs)
        s.add_all(accounts(ACME, "pt:o4"))
        s.commit()
    assert env.kms.wrap_count == 2 * RETRIES + 1
    assert env.count() == 4
    assert sorted(env.read(ACME).values()) == [*emails, "pt:o4"]
    assert [e.outcome for e in env.audit.of("wrap")] == ["unavailable", "unavailable", "ok"]


def test_denied_key_on_write_raises_without_retry_and_writes_nothing(env: Env) -> None:
    env.kms.deny(ACME_KEY)
    with tenant_context(ACME), env.session() as s:
        objs = accounts(ACME, "pt:d1", "pt:d2")
        s.add_all(objs)
        with pytest.raises(KeyAccessDeniedError) as info:
            s.commit()
        assert (info.value.tenant, info.value.key_ref) == (ACME, ACME_KEY)
        assert env.kms.wrap_count == 1  # a refusal is an answer, not a fault: no retry
        assert env.count() == 0
        assert_plaintext_kept(objs, ("pt:d1", "pt:d2"))
        s.rollback()
    env.write(GLOBEX, "pt:g1")  # another tenant is not affected
    env.kms.allow(ACME_KEY)
    env.write(ACME, "pt:d3")
    assert env.read(ACME) == {"acme-pt:d3": "pt:d3"}
    assert env.read(GLOBEX) == {"globex-pt:g1": "pt:g1"}


def test_update_flush_failure_on_kms_outage_leaves_stored_row_intact(env: Env) -> None:
    env.write(ACME, "pt:u1")
    before = env.raw()
    with tenant_context(ACME), env.session() as s:
        obj = s.scalars(select(Account)).one()
        env.cmk.forget_tenant(ACME)  # the update must now unwrap the row's key
        env.kms.reset_counts()
        env.kms.fail_next(RETRIES)
        obj.email = "pt:u2"
        with pytest.raises(KMSUnavailableError):
            s.commit()
        assert (env.kms.wrap_count, env.kms.unwrap_count) == (0, RETRIES)
        assert_plaintext_kept([obj], ("pt:u2",))
        assert env.raw() == before
        s.rollback()
        assert obj.email == "pt:u1"  # reloaded and decrypted: the KMS is back
    assert env.raw() == before
    assert env.read(ACME) == {"acme-pt:u1": "pt:u1"}


def test_update_flush_failure_on_denial_leaves_stored_row_intact(env: Env) -> None:
    env.write(ACME, "pt:u1")
    before = env.raw()
    with tenant_context(ACME), env.session() as s:
        obj = s.scalars(select(Account)).one()
        env.cmk.forget_tenant(ACME)
        env.kms.reset_counts()
        env.kms.deny(ACME_KEY)
        obj.email = "pt:u2"
        with pytest.raises(KeyAccessDeniedError):
            s.commit()
        assert env.kms.unwrap_count == 1
        assert_plaintext_kept([obj], ("pt:u2",))
        s.rollback()
    assert env.raw() == before
    env.kms.allow(ACME_KEY)
    assert env.read(ACME) == {"acme-pt:u1": "pt:u1"}


def test_database_error_after_sealing_restores_plaintext_and_keeps_stored_rows(env: Env) -> None:
    env.write(ACME, "pt:r1", "pt:r2")
    before = env.raw()
    with tenant_context(ACME), env.session() as s:
        first, second = s.scalars(select(Account).order_by(Account.id)).all()
        first.email = "pt:r1-new"  # sealed and sent first...
        second.handle = first.handle  # ...then the flush dies on the unique constraint
        with pytest.raises(IntegrityError):
            s.commit()
        # SQLAlchemy expires the persistent objects of a failed flush; what must not be left
        # behind is the sealed value the hooks put in their place.
        for obj in (first, second):
            state = inspect(obj).dict
            assert "email" not in state or type(state["email"]) is str
        s.rollback()
        assert (first.email, second.email) == ("pt:r1", "pt:r2")
    assert env.raw() == before
    assert sorted(env.read(ACME).values()) == ["pt:r1", "pt:r2"]


def test_insert_that_fails_in_the_database_can_be_retried_with_the_same_object(env: Env) -> None:
    env.write(ACME, "pt:i1")
    with tenant_context(ACME), env.session() as s:
        (obj,) = accounts(ACME, "pt:i2")
        obj.handle = "acme-pt:i1"  # taken
        s.add(obj)
        with pytest.raises(IntegrityError):
            s.commit()
        assert_plaintext_kept([obj], ("pt:i2",))
        s.rollback()
        obj.handle = "acme-pt:i2"
        s.add(obj)
        s.commit()
    assert env.count() == 2
    assert sorted(env.read(ACME).values()) == ["pt:i1", "pt:i2"]


# -- revocation ----------------------------------------------------------------------------------


def unwraps_of(kms: FakeKeyProvider, key_ref: str) -> int:
    return sum(1 for c in kms.calls if c.operation == "unwrap" and c.key_ref == key_ref)


def test_revocation_bites_at_once_without_cache(make_env: Callable[..., Env]) -> None:
    env = make_env(cache_ttl=0)
    env.write(ACME, "pt:a1", "pt:a2")
    env.write(GLOBEX, "pt:g1")
    before_a, before_b = env.read(ACME), env.read(GLOBEX)
    assert sorted(before_a.values()) == ["pt:a1", "pt:a2"]

    env.kms.deny(ACME_KEY)
    env.kms.reset_counts()
    with pytest.raises(KeyAccessDeniedError) as info:
        env.read(ACME)
    assert (info.value.tenant, info.value.key_ref) == (ACME, ACME_KEY)
    assert unwraps_of(env.kms, ACME_KEY) == 1  # asked once, not retried
    with pytest.raises(KeyAccessDeniedError):
        env.write(ACME, "pt:a3")
    assert env.read(GLOBEX) == before_b
    env.write(GLOBEX, "pt:g2")
    assert [e.outcome for e in env.audit.of("unwrap") if e.tenant == ACME][-1] == "denied"

    env.kms.allow(ACME_KEY)
    assert env.read(ACME) == before_a  # nothing lost
    assert sorted(env.read(GLOBEX).values()) == ["pt:g1", "pt:g2"]


def test_revocation_with_cache_bites_after_forget_tenant(make_env: Callable[..., Env]) -> None:
    env = make_env(cache_ttl=60)
    env.write(ACME, "pt:a1", "pt:a2")
    env.write(GLOBEX, "pt:g1")
    before_a, before_b = env.read(ACME), env.read(GLOBEX)

    env.kms.deny(ACME_KEY)
    env.kms.reset_counts()
    # Within the cache bound, the cached keys keep working, for reads and for writes.
    assert env.read(ACME) == before_a
    env.write(ACME, "pt:a3")
    assert env.kms.calls == []

    assert env.cmk.forget_tenant(ACME) >= 1
    with pytest.raises(KeyAccessDeniedError):
        env.read(ACME)
    with pytest.raises(KeyAccessDeniedError):
        env.write(ACME, "pt:a4")
    assert env.read(GLOBEX) == before_b
    env.write(GLOBEX, "pt:g2")
    assert unwraps_of(env.kms, GLOBEX_KEY) == 0  # B's keys were not forgotten

    env.kms.allow(ACME_KEY)
    assert env.read(ACME) == {**before_a, "acme-pt:a3": "pt:a3"}
    assert sorted(env.read(GLOBEX).values()) == ["pt:g1", "pt:g2"]


def test_revocation_with_local_provider(make_env: Callable[..., Env]) -> None:
    local = LocalKeyProvider({ACME: os.urandom(32), GLOBEX: os.urandom(32)})
    env = make_env(local, cache_ttl=60)
    env.write(ACME, "pt:a1", "pt:a2")
    env.write(GLOBEX, "pt:g1")
    before_a, before_b = env.read(ACME), env.read(GLOBEX)

    local.revoke(ACME)
    assert env.read(ACME) == before_a  # cached
    env.cmk.forget_tenant(ACME)
    with pytest.raises(KeyAccessDeniedError) as info:
        env.read(ACME)
    assert (info.value.tenant, info.value.key_ref) == (ACME, "local://acme")
    with pytest.raises(KeyAccessDeniedError):
        env.write(ACME, "pt:a3")
    assert env.read(GLOBEX) == before_b
    env.cmk.forget_tenant()  # even cold, B's key is still served
    assert env.read(GLOBEX) == before_b

    local.restore(ACME)
    assert env.read(ACME) == before_a


def test_revocation_bites_when_the_cache_ttl_expires(make_env: Callable[..., Env]) -> None:
    ttl = 0.2
    env = make_env(cache_ttl=ttl)
    env.write(ACME, "pt:a1")
    env.write(GLOBEX, "pt:g1")
    before_a, before_b = env.read(ACME), env.read(GLOBEX)

    env.kms.deny(ACME_KEY)
    time.sleep(ttl + 0.1)  # no forget_tenant(): the TTL alone must end access
    with pytest.raises(KeyAccessDeniedError):
        env.read(ACME)
    with pytest.raises(KeyAccessDeniedError):
        env.write(ACME, "pt:a2")  # the write key's window ended with the TTL too
    assert env.read(GLOBEX) == before_b
    env.write(GLOBEX, "pt:g2")

    env.kms.allow(ACME_KEY)
    assert env.read(ACME) == before_a
