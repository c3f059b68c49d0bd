"""The database key registry on SQLite and PostgreSQL: lookups, changes, CMK end to end, rows
tampered with by someone who can write to the database but lacks the secret, optimistic
concurrency, and the lookup cache."""

from __future__ import annotations

import base64
import datetime
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import HealthCheck, assume, given, reject, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, MetaData, String, create_engine, event, insert, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_cmk import (
    CMK,
    ConfigurationError,
    EncryptedMixin,
    EncryptedType,
    TenantNotConfiguredError,
    TenantRevokedError,
    tenant_context,
)
from sqlalchemy_cmk._format import parse_envelope, split_companion
from sqlalchemy_cmk.registry import KeyRegistry, TenantKeys
from sqlalchemy_cmk.registry_db import (
    DatabaseKeyRegistry,
    RegistryConflictError,
    RegistryIntegrityError,
    TenantRecord,
)
from sqlalchemy_cmk.testing import FakeKeyProvider

SECRET = os.urandom(32)
ROLE = "arn:aws:iam::111122223333:role/acme-cmk"


@pytest.fixture
def registry(engine: Engine) -> DatabaseKeyRegistry:
    reg = DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu")
    reg.create_table()
    return reg


def raw(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.begin() as conn:
        result = conn.execute(text(sql), params)
        return list(result) if result.returns_rows else []


def raw_row(engine: Engine, tenant: str) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(
            text("select * from cmk_tenants where tenant_id = :t"), {"t": tenant}
        ).one()
    return dict(row._mapping)


def put_row(engine: Engine, tenant: str, values: dict[str, Any]) -> None:
    """What an attacker with write access does: overwrite a row's columns directly."""
    cols = [c for c in values if c != "tenant_id"]
    sets = ", ".join(f"{c} = :{c}" for c in cols)
    raw(
        engine,
        f"update cmk_tenants set {sets} where tenant_id = :tid",
        tid=tenant,
        **{c: values[c] for c in cols},
    )


INSERT = "insert into cmk_tenants ({cols}) values ({binds})"


def binds(row: dict[str, Any]) -> str:
    return ", ".join(":" + c for c in row)


def count_queries(engine: Engine) -> list[str]:
    seen: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _record(*args: Any) -> None:
        seen.append(args[2])

    return seen


# -- lookups and changes ---------------------------------------------------------------------


def test_round_trip(registry: DatabaseKeyRegistry) -> None:
    assert isinstance(registry, KeyRegistry)
    rec = registry.add_tenant(
        "acme",
        "fake://acme-2",
        accepted=["fake://acme-1"],
        credentials={"role_arn": ROLE, "secret_name": "prod/acme/kms"},
    )
    assert rec.version == 1 and not rec.disabled
    keys = registry.tenant_keys("acme")
    assert keys == TenantKeys(
        "fake://acme-2",
        frozenset({"fake://acme-1", "fake://acme-2"}),
        {"role_arn": ROLE, "secret_name": "prod/acme/kms"},
    )
    got = registry.get("acme")
    assert got == rec
    assert got.accepted == ("fake://acme-1", "fake://acme-2")
    with pytest.raises(TypeError):  # cached records are shared: read-only
        got.credentials["role_arn"] = "arn:aws:iam::999999999999:role/x"  # type: ignore[index]
    registry.add_tenant("globex", "fake://globex")
    assert [r.tenant for r in registry.list_tenants()] == ["acme", "globex"]
    assert json.loads(json.dumps(got.to_dict()))["credentials"]["role_arn"] == ROLE
    assert registry.verify() == []


def test_unknown_and_disabled_tenants_are_refused_with_what_to_do(
    registry: DatabaseKeyRegistry,
) -> None:
    with pytest.raises(TenantNotConfiguredError, match=r"not in the key registry.*tenants add"):
        registry.tenant_keys("nobody")
    registry.add_tenant("acme", "fake://acme")
    rec = registry.disable("acme")
    assert rec.disabled and rec.version == 2
    with pytest.raises(TenantRevokedError, match=r"disabled.*tenants enable acme") as info:
        registry.tenant_keys("acme")
    assert info.value.tenant == "acme"
    assert registry.get("acme").disabled  # get() still shows it
    assert registry.disable("acme").version == 2  # already disabled: no change, no new version
    registry.enable("acme")
    assert registry.tenant_keys("acme").primary == "fake://acme"


def test_key_changes(registry: DatabaseKeyRegistry) -> None:
    registry.add_tenant("acme", "fake://k1")
    rec = registry.set_primary("acme", "fake://k2")
    assert (rec.primary, rec.accepted, rec.version) == ("fake://k2", ("fake://k1", "fake://k2"), 2)
    assert registry.set_primary("acme", "fake://k2").version == 2  # no-op
    rec = registry.add_key("acme", "fake://k3")
    assert rec.accepted == ("fake://k1", "fake://k2", "fake://k3") and rec.primary == "fake://k2"
    rec = registry.remove_key("acme", "fake://k1")
    assert rec.accepted == ("fake://k2", "fake://k3") and rec.version == 4
    with pytest.raises(ConfigurationError, match=r"primary key.*set another primary first"):
        registry.remove_key("acme", "fake://k2")
    with pytest.raises(ConfigurationError, match="not one of tenant 'acme'"):
        registry.remove_key("acme", "fake://k1")
    assert registry.get("acme").version == 4
    assert registry.tenant_keys("acme").accepted == {"fake://k2", "fake://k3"}
    with pytest.raises(TenantNotConfiguredError):
        registry.set_primary("nobody", "fake://x")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda r: r.add_tenant("acme", "not-a-uri"), "not a URI"),
        (lambda r: r.add_tenant("acme", "fake://a", accepted=["nope"]), "not a URI"),
        (lambda r: r.add_tenant("acme", "fake://a", accepted="fake://b"), "not a str"),
        (lambda r: r.add_tenant("", "fake://a"), "non-empty"),
        (lambda r: r.add_tenant("x" * 256, "fake://a"), "at most 255"),
        (lambda r: r.add_tenant("acme", "fake://a", credentials={"client_secret": "s3"}), "secret"),
        (lambda r: r.add_tenant("acme", "fake://a", credentials={"Password": "hunter2"}), "secret"),
        (
            lambda r: r.add_tenant("acme", "fake://a", credentials={"aws-secret-access-key": "x"}),
            "looks like a secret",
        ),
        (
            lambda r: r.add_tenant(
                "acme", "fake://a", credentials={"cert": "-----BEGIN PRIVATE KEY-----\n..."}
            ),
            "looks like a secret",
        ),
        (lambda r: r.add_tenant("acme", "fake://a", credentials={"role_arn": ""}), "non-empty"),
    ],
)
def test_invalid_changes_are_refused(
    registry: DatabaseKeyRegistry, call: Callable[[DatabaseKeyRegistry], Any], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        call(registry)
    assert registry.list_tenants() == []


def test_adding_an_existing_tenant_is_refused(registry: DatabaseKeyRegistry) -> None:
    registry.add_tenant("acme", "fake://acme")
    with pytest.raises(ConfigurationError, match="already exists"):
        registry.add_tenant("acme", "fake://attacker")
    assert registry.tenant_keys("acme").primary == "fake://acme"


@pytest.mark.parametrize(
    ("secret", "match"),
    [
        (b"x" * 31, "at least 32"),
        (b"\x00" * 64, "not random"),
        ("a" * 44, "must be bytes"),
    ],
)
def test_weak_secrets_are_refused(engine: Engine, secret: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        DatabaseKeyRegistry(engine, secret, registry_id="test-eu")


def test_repr_holds_no_secret(registry: DatabaseKeyRegistry) -> None:
    assert SECRET.hex() not in repr(registry) and "cmk_tenants" in repr(registry)


def test_table_goes_into_the_given_metadata_for_alembic(engine: Engine) -> None:
    metadata = MetaData()
    reg = DatabaseKeyRegistry(
        engine, SECRET, registry_id="test-eu", table_name="tenant_keys", metadata=metadata
    )
    assert metadata.tables["tenant_keys"] is reg.table
    metadata.create_all(engine)
    reg.add_tenant("acme", "fake://acme")
    assert reg.tenant_keys("acme").primary == "fake://acme"


# -- CMK end to end --------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Note(EncryptedMixin, Base):
    __tablename__ = "registry_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(50))
    body: Mapped[str] = mapped_column(EncryptedType(String(200)))


def test_cmk_reads_and_writes_through_the_registry(
    engine: Engine, registry: DatabaseKeyRegistry
) -> None:
    Base.metadata.create_all(engine)
    kms = FakeKeyProvider()
    cmk = CMK(kms, registry=registry, audit_sinks=[])
    maker = sessionmaker(engine)
    cmk.install(maker)
    registry.add_tenant("acme", "fake://acme-1")
    registry.add_tenant("globex", "fake://globex")

    def write(tenant: str, body: str) -> int:
        with tenant_context(tenant), maker() as s:
            note = Note(tenant_id=tenant, body=body)
            s.add(note)
            s.commit()
            return note.id

    def read(tenant: str, note_id: int) -> str:
        with tenant_context(tenant), maker() as s:
            note = s.get(Note, note_id)
            assert note is not None
            return note.body

    def key_ref_of(note_id: int) -> str:
        with engine.connect() as conn:
            edek = conn.execute(select(Note.cmk_edek).where(Note.id == note_id)).scalar_one()
        return parse_envelope(split_companion(bytes(edek))[1]).key_ref

    old = write("acme", "written under key 1")
    other = write("globex", "globex's")
    assert key_ref_of(old) == "fake://acme-1"

    registry.set_primary("acme", "fake://acme-2")
    cmk.forget_tenant("acme")  # drop CMK's write key wrapped under the old primary
    new = write("acme", "written under key 2")
    assert key_ref_of(new) == "fake://acme-2"
    assert key_ref_of(write("globex", "still globex")) == "fake://globex"
    cmk.forget_tenant()
    assert read("acme", old) == "written under key 1"  # the old primary is still accepted
    assert read("acme", new) == "written under key 2"
    assert read("globex", other) == "globex's"

    # Once the old key is removed, rows still under it no longer read; the rest do.
    registry.remove_key("acme", "fake://acme-1")
    cmk.forget_tenant()
    with pytest.raises(TenantNotConfiguredError, match="not one of the tenant's configured keys"):
        read("acme", old)
    assert read("acme", new) == "written under key 2"

    # A disabled tenant can neither write nor read.
    registry.disable("acme")
    cmk.forget_tenant()
    with pytest.raises(TenantNotConfiguredError, match="disabled"):
        read("acme", new)
    with pytest.raises(TenantNotConfiguredError, match="disabled"):
        write("acme", "refused")
    assert cmk.check_tenant("acme").ok is False
    assert cmk.check_tenant("globex").ok is True


# -- tampering -------------------------------------------------------------------------------


def _primary(engine: Engine) -> None:
    raw(
        engine,
        "update cmk_tenants set primary_key_ref = 'fake://attacker' where tenant_id = 'acme'",
    )


def _primary_to_old_key(engine: Engine) -> None:
    # Back to a key that is still accepted (say, one the tenant is retiring because it leaked).
    raw(
        engine,
        "update cmk_tenants set primary_key_ref = 'fake://acme-old' where tenant_id = 'acme'",
    )


def _attacker_key_everywhere(engine: Engine) -> None:
    refs = json.dumps(["fake://acme", "fake://acme-old", "fake://attacker"])
    raw(
        engine,
        "update cmk_tenants set primary_key_ref = 'fake://attacker', accepted_key_refs = :r "
        "where tenant_id = 'acme'",
        r=refs,
    )


def _accepted(engine: Engine) -> None:
    refs = json.dumps(["fake://acme", "fake://acme-old", "fake://attacker"])
    raw(engine, "update cmk_tenants set accepted_key_refs = :r where tenant_id = 'acme'", r=refs)


def _credentials(engine: Engine) -> None:
    creds = json.dumps({"role_arn": "arn:aws:iam::999999999999:role/attacker"})
    raw(engine, "update cmk_tenants set credentials = :c where tenant_id = 'acme'", c=creds)


def _swap(engine: Engine) -> None:
    # Every column but the id moves, MAC and version included: each row stays self-consistent.
    acme, globex = raw_row(engine, "acme"), raw_row(engine, "globex")
    put_row(engine, "acme", globex)
    put_row(engine, "globex", acme)


def _enable(engine: Engine) -> None:
    raw(engine, "update cmk_tenants set disabled = :f where tenant_id = 'disabled'", f=False)


def _version(engine: Engine) -> None:
    raw(engine, "update cmk_tenants set version = version + 1 where tenant_id = 'acme'")


def _updated_at(engine: Engine) -> None:
    value = raw_row(engine, "acme")["updated_at"]  # a str on SQLite, a datetime on PostgreSQL
    older = "2001" + value[4:] if isinstance(value, str) else value.replace(year=2001)
    put_row(engine, "acme", {"updated_at": older})


def _json_garbage(engine: Engine) -> None:
    raw(engine, "update cmk_tenants set accepted_key_refs = '{not json' where tenant_id = 'acme'")


def _forged_tenant(engine: Engine) -> None:
    row = raw_row(engine, "acme")
    row.update(tenant_id="forged", mac="00" * 32)
    cols = ", ".join(row)
    raw(
        engine,
        f"insert into cmk_tenants ({cols}) values ({', '.join(':' + c for c in row)})",
        **row,
    )


def _renamed(engine: Engine) -> None:
    # globex's row re-labelled as a new tenant "acme2": its MAC binds "globex".
    raw(engine, "update cmk_tenants set tenant_id = 'acme2' where tenant_id = 'globex'")


TAMPERING: dict[str, tuple[Callable[[Engine], None], str]] = {
    "primary key ref": (_primary, "acme"),
    "primary to an old accepted key": (_primary_to_old_key, "acme"),
    "attacker key as primary and accepted": (_attacker_key_everywhere, "acme"),
    "accepted list": (_accepted, "acme"),
    "credential references": (_credentials, "acme"),
    "swapped rows": (_swap, "acme"),
    "re-enabled": (_enable, "disabled"),
    "version": (_version, "acme"),
    "updated_at": (_updated_at, "acme"),
    "unparsable": (_json_garbage, "acme"),
    "forged tenant": (_forged_tenant, "forged"),
    "renamed tenant": (_renamed, "acme2"),
}


@pytest.fixture
def three_tenants(registry: DatabaseKeyRegistry) -> DatabaseKeyRegistry:
    registry.add_tenant(
        "acme", "fake://acme", accepted=["fake://acme-old"], credentials={"role_arn": ROLE}
    )
    registry.add_tenant("globex", "fake://globex")
    registry.add_tenant("disabled", "fake://disabled")
    registry.disable("disabled")
    return registry


@pytest.mark.parametrize("kind", list(TAMPERING))
def test_tampered_rows_are_refused(
    engine: Engine, three_tenants: DatabaseKeyRegistry, kind: str
) -> None:
    registry = three_tenants
    tamper, victim = TAMPERING[kind]
    tamper(engine)
    registry.invalidate()
    with pytest.raises(RegistryIntegrityError, match="failed its integrity check") as info:
        registry.tenant_keys(victim)
    assert info.value.tenant == victim
    assert isinstance(info.value, ConfigurationError)
    # A fresh process with the secret refuses it too, and so do writes and listings.
    fresh = DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu")
    with pytest.raises(RegistryIntegrityError):
        fresh.tenant_keys(victim)
    with pytest.raises(RegistryIntegrityError):
        fresh.set_primary(victim, "fake://new")
    with pytest.raises(RegistryIntegrityError):
        fresh.list_tenants()
    assert victim in {p.tenant for p in fresh.verify()}


def test_untampered_tenants_keep_working_next_to_a_tampered_one(
    engine: Engine, three_tenants: DatabaseKeyRegistry
) -> None:
    _primary(engine)
    three_tenants.invalidate()
    assert three_tenants.tenant_keys("globex").primary == "fake://globex"
    assert [p.tenant for p in three_tenants.verify()] == ["acme"]


def test_replayed_old_row_is_refused_by_a_process_that_saw_the_newer_one(
    engine: Engine, registry: DatabaseKeyRegistry
) -> None:
    registry.add_tenant("acme", "fake://acme-1")
    old = raw_row(engine, "acme")  # a genuine row with a valid MAC, at version 1
    registry.set_primary("acme", "fake://acme-2")
    registry.remove_key("acme", "fake://acme-1")  # e.g. key 1 was compromised
    put_row(engine, "acme", old)
    registry.invalidate()
    with pytest.raises(RegistryIntegrityError, match=r"version 1, older than version 3.*replayed"):
        registry.tenant_keys("acme")
    with pytest.raises(RegistryIntegrityError, match="replayed"):
        registry.add_key("acme", "fake://x")


def test_replay_is_caught_across_processes_only_with_a_version_snapshot(
    engine: Engine, registry: DatabaseKeyRegistry
) -> None:
    # The documented limit: the MAC alone cannot tell an old genuine row from the current one.
    registry.add_tenant("acme", "fake://acme-1")
    old = raw_row(engine, "acme")
    registry.set_primary("acme", "fake://acme-2")
    snapshot = {r.tenant: r.version for r in registry.list_tenants()}
    put_row(engine, "acme", old)
    fresh = DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu")
    assert fresh.tenant_keys("acme").primary == "fake://acme-1"  # not detectable by the MAC
    problems = DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu").verify(
        expected_versions=snapshot
    )
    assert [p.tenant for p in problems] == ["acme"]
    assert "the snapshot expects" in str(problems[0])
    # A tenant deleted from the table is reported as well.
    raw(engine, "delete from cmk_tenants where tenant_id = 'acme'")
    problems = DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu").verify(
        expected_versions=snapshot
    )
    assert "missing" in str(problems[0])


def test_a_different_secret_refuses_every_row(
    engine: Engine, registry: DatabaseKeyRegistry
) -> None:
    registry.add_tenant("acme", "fake://acme")
    other = DatabaseKeyRegistry(engine, os.urandom(32), registry_id="test-eu")
    with pytest.raises(RegistryIntegrityError, match="different registry secret"):
        other.tenant_keys("acme")
    assert len(other.verify()) == 1


def test_reseal_rotates_the_secret(engine: Engine, registry: DatabaseKeyRegistry) -> None:
    registry.add_tenant("acme", "fake://acme")
    registry.add_tenant("globex", "fake://globex")
    registry.tenant_keys("acme")  # cached under the old secret: reseal drops the cache
    new_secret = os.urandom(32)
    assert registry.reseal(new_secret) == 2
    assert registry.tenant_keys("acme").primary == "fake://acme"
    assert registry.get("acme").version == 2
    assert DatabaseKeyRegistry(engine, new_secret, registry_id="test-eu").verify() == []
    old = DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu")
    assert len(old.verify()) == 2  # processes still on the old secret fail closed
    with pytest.raises(ConfigurationError, match="at least 32"):
        registry.reseal(b"short")


def test_reseal_writes_nothing_when_a_row_is_tampered(
    engine: Engine, registry: DatabaseKeyRegistry
) -> None:
    registry.add_tenant("acme", "fake://acme")
    registry.add_tenant("globex", "fake://globex")
    raw(engine, "update cmk_tenants set primary_key_ref = 'fake://x' where tenant_id = 'globex'")
    with pytest.raises(RegistryIntegrityError, match="'globex'"):
        registry.reseal(os.urandom(32))
    assert (
        DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu").get("acme").version == 1
    )  # rolled back


def test_rows_copied_to_another_registry_table_are_refused(
    engine: Engine, registry: DatabaseKeyRegistry
) -> None:
    registry.add_tenant("acme", "fake://acme")
    other = DatabaseKeyRegistry(
        engine, SECRET, registry_id="test-eu", table_name="cmk_tenants_staging"
    )
    other.create_table()
    row = raw_row(engine, "acme")
    cols = ", ".join(row)
    raw(
        engine,
        f"insert into cmk_tenants_staging ({cols}) values ({', '.join(':' + c for c in row)})",
        **row,
    )
    with pytest.raises(RegistryIntegrityError):
        other.tenant_keys("acme")


# -- concurrency -----------------------------------------------------------------------------


def test_expected_version_guards_a_change(registry: DatabaseKeyRegistry) -> None:
    registry.add_tenant("acme", "fake://k1")
    seen = registry.get("acme").version
    registry.add_key("acme", "fake://k2")
    with pytest.raises(RegistryConflictError, match=r"version 2, not 1.*nothing was written"):
        registry.set_primary("acme", "fake://k3", expected_version=seen)
    assert registry.get("acme").primary == "fake://k1"
    assert registry.set_primary("acme", "fake://k3", expected_version=2).version == 3


def test_concurrent_set_primary_one_wins_the_other_fails(
    engine: Engine, registry: DatabaseKeyRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.add_tenant("acme", "fake://k1")
    other = DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu")
    real_load = DatabaseKeyRegistry._load
    interleaved: list[TenantRecord] = []

    def load_then_let_the_other_writer_in(self: Any, conn: Any, tenant: str) -> Any:
        found = real_load(self, conn, tenant)
        if not interleaved:  # between this writer's read and its write
            interleaved.append(other.set_primary("acme", "fake://k-other"))
        return found

    monkeypatch.setattr(registry, "_load", load_then_let_the_other_writer_in.__get__(registry))
    with pytest.raises(RegistryConflictError, match="changed after version 1 was read"):
        registry.set_primary("acme", "fake://k-mine")
    monkeypatch.undo()
    rec = registry.get("acme")
    assert rec.primary == "fake://k-other" and rec.version == 2
    assert "fake://k-mine" not in rec.accepted


def test_racing_writers_lose_no_update(engine: Engine, registry: DatabaseKeyRegistry) -> None:
    registry.add_tenant("acme", "fake://k0")
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def writer(i: int) -> None:
        reg = DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu")
        barrier.wait()
        for j in range(5):
            try:
                reg.add_key("acme", f"fake://k{i}-{j}")
                outcomes.append(f"fake://k{i}-{j}")
            except RegistryConflictError:
                outcomes.append("conflict")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [o for o in outcomes if o != "conflict"]
    rec = registry.get("acme")
    # Every change that reported success is in the row, and nothing else: no lost update.
    assert rec.version == 1 + len(won)
    assert set(rec.accepted) == {"fake://k0", *won}
    assert len(outcomes) == 20


# -- the lookup cache ------------------------------------------------------------------------


def test_lookups_are_cached_for_the_ttl(engine: Engine, registry: DatabaseKeyRegistry) -> None:
    now = [1000.0]
    reader = DatabaseKeyRegistry(
        engine, SECRET, registry_id="test-eu", cache_ttl=30, clock=lambda: now[0]
    )
    registry.add_tenant("acme", "fake://k1")
    queries = count_queries(engine)
    assert reader.tenant_keys("acme").primary == "fake://k1"
    assert len(queries) == 1
    for _ in range(10):
        reader.tenant_keys("acme")
    assert len(queries) == 1  # served from the cache
    registry.set_primary("acme", "fake://k2")  # another process's change
    now[0] += 29
    assert reader.tenant_keys("acme").primary == "fake://k1"  # not seen yet: within the TTL
    now[0] += 2
    assert reader.tenant_keys("acme").primary == "fake://k2"  # the TTL is the bound
    registry.set_primary("acme", "fake://k3")
    reader.invalidate("acme")
    assert reader.tenant_keys("acme").primary == "fake://k3"  # at once after invalidate
    registry.disable("acme")
    reader.invalidate()
    with pytest.raises(TenantNotConfiguredError, match="disabled"):
        reader.tenant_keys("acme")


def test_unknown_tenants_are_cached_too_and_own_writes_invalidate(
    engine: Engine, registry: DatabaseKeyRegistry
) -> None:
    queries = count_queries(engine)
    for _ in range(3):
        with pytest.raises(TenantNotConfiguredError):
            registry.tenant_keys("acme")
    assert len(queries) == 1
    registry.add_tenant("acme", "fake://k1")
    assert registry.tenant_keys("acme").primary == "fake://k1"
    registry.set_primary("acme", "fake://k2")
    assert registry.tenant_keys("acme").primary == "fake://k2"


def test_the_cache_is_bounded(engine: Engine, registry: DatabaseKeyRegistry) -> None:
    for t in "abc":
        registry.add_tenant(t, f"fake://{t}")
    reader = DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu", cache_max_entries=2)
    queries = count_queries(engine)
    for t in "abcc":
        reader.tenant_keys(t)
    assert len(queries) == 3  # c was cached
    reader.tenant_keys("a")  # evicted by c (least recently used)
    assert len(queries) == 4
    with pytest.raises(ConfigurationError):
        DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu", cache_max_entries=0)


def test_cache_ttl_zero_reads_every_time(engine: Engine, registry: DatabaseKeyRegistry) -> None:
    registry.add_tenant("acme", "fake://k1")
    reader = DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu", cache_ttl=0)
    queries = count_queries(engine)
    reader.tenant_keys("acme")
    reader.tenant_keys("acme")
    assert len(queries) == 2


def test_a_lookup_racing_an_invalidation_is_not_cached(
    engine: Engine, registry: DatabaseKeyRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup reads the row, then (before it caches it) the tenant is disabled elsewhere and
    a revocation watcher invalidates: what the lookup read must not be served for cache_ttl."""
    registry.add_tenant("acme", "fake://k1")
    reader = DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu")
    load = DatabaseKeyRegistry._load

    def load_then_disable(self: Any, conn: Any, tenant: str) -> Any:
        found = load(self, conn, tenant)
        monkeypatch.setattr(DatabaseKeyRegistry, "_load", load)
        registry.disable("acme")
        reader.invalidate("acme")  # what the watcher does on the notification
        return found

    monkeypatch.setattr(DatabaseKeyRegistry, "_load", load_then_disable)
    assert reader.tenant_keys("acme").primary == "fake://k1"  # it started before the disable
    with pytest.raises(TenantNotConfiguredError, match="disabled"):
        reader.tenant_keys("acme")


# -- registry identity: rows from another deployment ------------------------------------------

GOLDEN_SECRET = bytes(range(32))
GOLDEN_RECORD = {
    "tenant_id": "acme",
    "primary_key_ref": "fake://acme-2",
    "accepted_key_refs": '["fake://acme-1","fake://acme-2"]',
    "credentials": '{"role_arn":"arn:aws:iam::111122223333:role/acme-cmk"}',
    "disabled": False,
    "version": 3,
    "updated_at": datetime.datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=datetime.timezone.utc),
}
# Computed by ec93feb (the release before registry_id) for GOLDEN_RECORD in table cmk_tenants:
# such rows must keep verifying (with allow_v1_macs) and upgrade.
GOLDEN_V1_MAC = "36206c910a23900ef4efe18422b9840a2c353ad4fb9e03da052db284e6090c39"
# The same record under MAC version 2 with registry_id="prod-eu", default schema.
GOLDEN_V2_MAC = "v2:rW8miSFlarmiSX8QwYkp-HgsXc3NFgHcGbtRwlH3Pok"


@pytest.fixture
def elsewhere(engine: Engine, tmp_path: Path) -> Iterator[Engine]:
    """Another deployment's database: same table names, reached by another engine."""
    if engine.dialect.name == "sqlite":
        other = create_engine(f"sqlite:///{tmp_path}/staging.db")
    elif engine.dialect.name == "mysql":  # a schema is a database: one of its own, dropped after
        name = f"s_{uuid.uuid4().hex[:10]}"
        with engine.begin() as conn:
            conn.execute(text(f"CREATE DATABASE `{name}`"))
        other = create_engine(engine.url.set(database=name))
        yield other
        other.dispose()
        with engine.begin() as conn:
            conn.execute(text(f"DROP DATABASE `{name}`"))
        return
    else:
        schema = f"s_{uuid.uuid4().hex[:10]}"
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        other = create_engine(engine.url, connect_args={"options": f"-csearch_path={schema}"})
    yield other
    other.dispose()


def copy_rows(source: Engine, target: Engine, table: str = "cmk_tenants") -> None:
    """What an attacker does: every column of every row, MAC included, into the other table."""
    with source.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(text(f"select * from {table}"))]
    with target.begin() as conn:
        for row in rows:
            conn.execute(text(f"delete from {table} where tenant_id = :t"), {"t": row["tenant_id"]})
            cols = ", ".join(row)
            conn.execute(
                text(f"insert into {table} ({cols}) values ({', '.join(':' + c for c in row)})"),
                row,
            )


def test_a_row_from_another_deployment_sharing_the_secret_is_refused(
    engine: Engine, elsewhere: Engine, registry: DatabaseKeyRegistry
) -> None:
    # Staging and production share the secret and the table name: the mistake the docs warn of.
    registry.add_tenant("acme", "fake://acme-prod")
    registry.add_tenant("globex", "fake://globex")
    staging = DatabaseKeyRegistry(elsewhere, SECRET, registry_id="staging-eu")
    staging.create_table()
    staging.add_tenant("acme", "fake://attacker")  # whoever runs staging chose this key
    copy_rows(elsewhere, engine)

    fresh = DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu")
    with pytest.raises(RegistryIntegrityError, match="MAC does not match") as info:
        fresh.tenant_keys("acme")
    assert info.value.tenant == "acme"
    assert fresh.tenant_keys("globex").primary == "fake://globex"
    assert [p.tenant for p in fresh.verify()] == ["acme"]

    # The application's data keys are never wrapped under the attacker's key.
    kms = FakeKeyProvider()
    cmk = CMK(kms, registry=fresh, audit_sinks=[])
    assert cmk.check_tenant("acme").ok is False
    assert not any(call.key_ref == "fake://attacker" for call in kms.calls)


def test_a_whole_registry_copied_from_another_deployment_is_refused(
    engine: Engine, elsewhere: Engine
) -> None:
    # The table is created in production, then replaced wholesale by staging's rows: the
    # identity lives in the application's configuration, not in the copied table.
    prod = DatabaseKeyRegistry(engine, SECRET, registry_id="prod-eu")
    prod.create_table()
    staging = DatabaseKeyRegistry(elsewhere, SECRET, registry_id="staging-eu")
    staging.create_table()
    for tenant in ("acme", "globex"):
        staging.add_tenant(tenant, f"fake://staging-{tenant}")
    copy_rows(elsewhere, engine)
    assert sorted(p.tenant for p in prod.verify()) == ["acme", "globex"]
    for tenant in ("acme", "globex"):
        with pytest.raises(RegistryIntegrityError):
            prod.tenant_keys(tenant)
    with pytest.raises(RegistryIntegrityError):
        prod.list_tenants()
    # The same configuration as staging reads them: only the identity differs.
    same = DatabaseKeyRegistry(engine, SECRET, registry_id="staging-eu")
    assert [r.tenant for r in same.list_tenants()] == ["acme", "globex"]


def test_the_mac_binds_the_schema(engine: Engine) -> None:
    # The same registry_id, secret and table name, another schema: still another registry.
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has no schemas but attached databases; covered by PostgreSQL")
    schemas = [f"r_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    q = engine.dialect.identifier_preparer.quote_identifier
    with engine.begin() as conn:
        for schema in schemas:
            conn.execute(text(f"CREATE SCHEMA {q(schema)}"))
    try:
        regs = [DatabaseKeyRegistry(engine, SECRET, registry_id="prod", schema=s) for s in schemas]
        for reg in regs:
            reg.create_table()
        regs[0].add_tenant("acme", "fake://acme")
        with engine.begin() as conn:
            conn.execute(
                text(
                    f"insert into {q(schemas[1])}.cmk_tenants "
                    f"select * from {q(schemas[0])}.cmk_tenants"
                )
            )
        assert regs[0].tenant_keys("acme").primary == "fake://acme"
        with pytest.raises(RegistryIntegrityError):
            regs[1].tenant_keys("acme")
    finally:
        if engine.dialect.name == "mysql":  # schemas are databases, outside the test's own
            with engine.begin() as conn:
                for schema in schemas:
                    conn.execute(text(f"DROP SCHEMA {q(schema)}"))


@pytest.mark.parametrize(
    ("registry_id", "match"),
    [
        ("", "non-empty"),
        ("prod\neu", "not printable"),
        ("prod\u202eue", "not printable"),
        (" prod", "space"),
        ("x" * 256, "at most 255"),
        (None, "non-empty string"),
    ],
)
def test_registry_id_is_checked(engine: Engine, registry_id: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        DatabaseKeyRegistry(engine, SECRET, registry_id=registry_id)


def test_repr_names_the_registry_id(registry: DatabaseKeyRegistry) -> None:
    assert "registry_id='test-eu'" in repr(registry)


# -- MAC versions: rows written before registry_id ----------------------------------------------


def insert_row(engine: Engine, registry: DatabaseKeyRegistry, **values: Any) -> None:
    with engine.begin() as conn:
        conn.execute(insert(registry.table).values(**values))


def test_golden_v2_mac(engine: Engine) -> None:
    reg = DatabaseKeyRegistry(engine, GOLDEN_SECRET, registry_id="prod-eu")
    reg.create_table()
    insert_row(engine, reg, **GOLDEN_RECORD, mac=GOLDEN_V2_MAC)
    rec = reg.get("acme")
    assert (rec.primary, rec.version) == ("fake://acme-2", 3)
    assert reg.verify() == []
    reg.set_primary("acme", "fake://acme-3")
    assert raw_row(engine, "acme")["mac"].startswith("v2:")  # every write is version 2
    assert len(raw_row(engine, "acme")["mac"]) == 46


def test_v1_rows_verify_only_while_allowed_and_upgrade_to_v2(engine: Engine) -> None:
    legacy = DatabaseKeyRegistry(engine, GOLDEN_SECRET, registry_id="prod-eu")
    legacy.create_table()
    insert_row(engine, legacy, **GOLDEN_RECORD, mac=GOLDEN_V1_MAC)

    # Default: refused, with what to do.
    with pytest.raises(RegistryIntegrityError, match=r"version 1.*tenants upgrade-mac"):
        legacy.tenant_keys("acme")
    [problem] = legacy.verify()
    assert problem.tenant == "acme" and "allow_v1_macs is off" in str(problem)

    # During the transition the row reads as before.
    transition = DatabaseKeyRegistry(
        engine, GOLDEN_SECRET, registry_id="prod-eu", allow_v1_macs=True
    )
    assert transition.tenant_keys("acme").primary == "fake://acme-2"
    assert transition.verify() == []
    # A v1 row is checked, not waved through: tampering is still caught.
    put_row(engine, "acme", {"primary_key_ref": "fake://acme-1"})
    with pytest.raises(RegistryIntegrityError, match="MAC does not match"):
        DatabaseKeyRegistry(
            engine, GOLDEN_SECRET, registry_id="prod-eu", allow_v1_macs=True
        ).tenant_keys("acme")
    with pytest.raises(RegistryIntegrityError):
        legacy.upgrade_macs()  # a bad row stops the upgrade
    put_row(engine, "acme", {"primary_key_ref": "fake://acme-2"})

    # The upgrade step: every v1 row verified, then re-MACed under v2 at a new version.
    assert legacy.upgrade_macs() == 1
    row = raw_row(engine, "acme")
    assert row["mac"].startswith("v2:") and row["version"] == 4
    assert legacy.tenant_keys("acme").primary == "fake://acme-2"
    assert DatabaseKeyRegistry(engine, GOLDEN_SECRET, registry_id="prod-eu").verify() == []
    assert legacy.upgrade_macs() == 0  # idempotent
    # Bound to its registry id now: the same table read as another deployment fails.
    with pytest.raises(RegistryIntegrityError):
        DatabaseKeyRegistry(engine, GOLDEN_SECRET, registry_id="staging-eu").tenant_keys("acme")


def test_a_v1_row_put_back_after_the_upgrade_is_refused(engine: Engine) -> None:
    # The downgrade: after upgrade-mac, an attacker restores a genuine v1 row (from a backup,
    # or from a staging registry that shares the secret).
    reg = DatabaseKeyRegistry(engine, GOLDEN_SECRET, registry_id="prod-eu", allow_v1_macs=True)
    reg.create_table()
    insert_row(engine, reg, **GOLDEN_RECORD, mac=GOLDEN_V1_MAC)
    reg.upgrade_macs()
    reg.set_primary("acme", "fake://acme-3")
    put_row(engine, "acme", {**GOLDEN_RECORD, "mac": GOLDEN_V1_MAC})
    reg.invalidate()
    # Once allow_v1_macs is removed (the documented last step), every process refuses it.
    after = DatabaseKeyRegistry(engine, GOLDEN_SECRET, registry_id="prod-eu")
    with pytest.raises(RegistryIntegrityError, match="version 1"):
        after.tenant_keys("acme")
    # Even while it is still set, a process that has seen the v2 row refuses the v1 one.
    with pytest.raises(RegistryIntegrityError, match="version-1 row was put back"):
        reg.tenant_keys("acme")
    with pytest.raises(RegistryIntegrityError):
        reg.upgrade_macs()  # and the upgrade does not bless it


def test_v1_macs_are_not_accepted_as_v2_or_the_reverse(engine: Engine) -> None:
    reg = DatabaseKeyRegistry(engine, GOLDEN_SECRET, registry_id="prod-eu", allow_v1_macs=True)
    reg.create_table()
    tag = base64.urlsafe_b64encode(bytes.fromhex(GOLDEN_V1_MAC)).decode().rstrip("=")
    insert_row(engine, reg, **GOLDEN_RECORD, mac="v2:" + tag)  # the v1 tag labelled v2
    with pytest.raises(RegistryIntegrityError, match="MAC does not match"):
        reg.tenant_keys("acme")
    v2_hex = base64.urlsafe_b64decode(GOLDEN_V2_MAC[3:] + "=").hex()
    put_row(engine, "acme", {"mac": v2_hex})  # the v2 tag labelled v1
    reg.invalidate()
    with pytest.raises(RegistryIntegrityError, match="MAC does not match"):
        reg.tenant_keys("acme")


# -- malformed rows: reported and refused, never another exception ------------------------------


def _mutate_sql(sql: str, **params: Any) -> Callable[[Engine], None]:
    def run(engine: Engine) -> None:
        raw(engine, sql, **params)

    return run


DEEP = "[" * 100_000 + "]" * 100_000
MALFORMED: dict[str, tuple[Callable[[Engine], None], set[str]]] = {
    # name: (mutation, dialects it can be stored on)
    "negative version": (
        _mutate_sql("update cmk_tenants set version = -1 where tenant_id = 'acme'"),
        {"sqlite", "postgresql", "mysql"},
    ),
    "version 0": (
        _mutate_sql("update cmk_tenants set version = 0 where tenant_id = 'acme'"),
        {"sqlite", "postgresql", "mysql"},
    ),
    "deeply nested accepted_key_refs": (
        _mutate_sql(
            "update cmk_tenants set accepted_key_refs = :v where tenant_id = 'acme'", v=DEEP
        ),
        {"sqlite", "postgresql", "mysql"},
    ),
    "deeply nested credentials": (
        _mutate_sql(
            "update cmk_tenants set credentials = :v where tenant_id = 'acme'",
            v='{"a":' * 50_000 + "1" + "}" * 50_000,
        ),
        {"sqlite", "postgresql", "mysql"},
    ),
    "oversized accepted_key_refs": (
        _mutate_sql(
            "update cmk_tenants set accepted_key_refs = :v where tenant_id = 'acme'",
            v=json.dumps(["fake://acme"] + [f"fake://k{i}" for i in range(20_000)]),
        ),
        {"sqlite", "postgresql", "mysql"},
    ),
    "lone surrogate in JSON": (
        _mutate_sql(
            "update cmk_tenants set accepted_key_refs = :v where tenant_id = 'acme'",
            v='["fake://acme","fake://\\ud800"]',
        ),
        {"sqlite", "postgresql", "mysql"},
    ),
    "duplicate credential name": (
        _mutate_sql(
            "update cmk_tenants set credentials = :v where tenant_id = 'acme'",
            v=json.dumps({"role_arn": ROLE})[:-1] + ',"role_arn":"x"}',
        ),
        {"sqlite", "postgresql", "mysql"},
    ),
    "non-ASCII MAC": (
        _mutate_sql("update cmk_tenants set mac = :v where tenant_id = 'acme'", v="é" * 64),
        {"sqlite", "postgresql", "mysql"},
    ),
    "empty MAC": (
        _mutate_sql("update cmk_tenants set mac = '' where tenant_id = 'acme'"),
        {"sqlite", "postgresql", "mysql"},
    ),
    "JSON that is not a list": (
        _mutate_sql("update cmk_tenants set accepted_key_refs = '7' where tenant_id = 'acme'"),
        {"sqlite", "postgresql", "mysql"},
    ),
    "huge integer in JSON": (
        _mutate_sql(
            "update cmk_tenants set accepted_key_refs = :v where tenant_id = 'acme'",
            v="[" + "9" * 5000 + "]",
        ),
        {"sqlite", "postgresql", "mysql"},
    ),
    # SQLite keeps whatever type it is given, whatever the column's type.
    "version as text": (
        _mutate_sql("update cmk_tenants set version = 'one' where tenant_id = 'acme'"),
        {"sqlite"},
    ),
    "version beyond 64 bits": (
        _mutate_sql("update cmk_tenants set version = 1e30 where tenant_id = 'acme'"),
        {"sqlite"},
    ),
    "disabled is 2": (
        _mutate_sql("update cmk_tenants set disabled = 2 where tenant_id = 'acme'"),
        {"sqlite"},
    ),
    "updated_at garbage": (
        _mutate_sql("update cmk_tenants set updated_at = 'yesterday' where tenant_id = 'acme'"),
        {"sqlite"},
    ),
    "updated_at a number": (
        _mutate_sql("update cmk_tenants set updated_at = 12 where tenant_id = 'acme'"),
        {"sqlite"},
    ),
    "MAC as a blob": (
        _mutate_sql("update cmk_tenants set mac = x'00ff' where tenant_id = 'acme'"),
        {"sqlite"},
    ),
    "primary not UTF-8": (
        _mutate_sql(
            "update cmk_tenants set primary_key_ref = CAST(x'ff' AS TEXT) where tenant_id = 'acme'"
        ),
        {"sqlite"},
    ),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_rows_are_reported_and_refused(
    engine: Engine, three_tenants: DatabaseKeyRegistry, kind: str
) -> None:
    mutate, dialects = MALFORMED[kind]
    if engine.dialect.name not in dialects:
        pytest.skip(f"{engine.dialect.name} cannot store this")
    mutate(engine)
    fresh = DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu")
    problems = fresh.verify()  # lists the bad row, and only it
    assert [p.tenant for p in problems] == ["acme"]
    assert all(isinstance(p, RegistryIntegrityError) for p in problems)
    assert "failed its integrity check" in str(problems[0])
    assert str(problems[0]).isprintable() and len(str(problems[0])) < 1000
    for call in (
        lambda: fresh.tenant_keys("acme"),
        lambda: fresh.get("acme"),
        lambda: fresh.add_key("acme", "fake://x"),
        fresh.list_tenants,
        lambda: fresh.upgrade_macs(),
        lambda: fresh.reseal(os.urandom(32)),
    ):
        with pytest.raises(RegistryIntegrityError) as info:
            call()
        # No parser or driver error rides along (nor the row's values in one).
        err = info.value
        assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    assert fresh.tenant_keys("globex").primary == "fake://globex"


def test_a_legacy_row_with_a_bad_tenant_id_is_reported_escaped(
    engine: Engine, registry: DatabaseKeyRegistry
) -> None:
    # Written before ids were checked (or by hand): a newline and a bidi override in the id.
    registry.add_tenant("acme", "fake://acme")
    for bad in ("evil\nglobex", "evil\u202etxt.exe"):
        row = raw_row(engine, "acme")
        row["tenant_id"] = bad
        cols = ", ".join(row)
        raw(
            engine,
            f"insert into cmk_tenants ({cols}) values ({', '.join(':' + c for c in row)})",
            **row,
        )
    problems = DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu").verify()
    assert sorted(p.tenant for p in problems) == ["evil\nglobex", "evil\u202etxt.exe"]
    for p in problems:
        assert "not canonical" in str(p) and str(p).isprintable()
    with pytest.raises(RegistryIntegrityError):
        registry.list_tenants()
    with pytest.raises(TenantNotConfiguredError):  # not reachable by a lookup
        registry.tenant_keys("evil\nglobex")


# -- tenant ids ----------------------------------------------------------------------------------

BAD_TENANT_IDS = {
    "NUL": "acme\x00",
    "newline": "acme\nglobex  enabled  1  fake://evil",
    "tab": "ac\tme",
    "DEL": "acme\x7f",
    "C1 (NEL)": "acme\x85",
    "bidi override": "acme\u202e",
    "zero-width space": "ac\u200bme",
    "byte order mark": "\ufeffacme",
    "line separator": "acme\u2028",
    "no-break space": "ac\u00a0me",
    "lone surrogate": "acme\ud800",
    "leading space": " acme",
    "trailing space": "acme ",
    "not NFC": "cafe\u0301",
}


@pytest.mark.parametrize("kind", list(BAD_TENANT_IDS))
def test_bad_tenant_ids_are_refused_when_added_and_unknown_when_looked_up(
    registry: DatabaseKeyRegistry, kind: str
) -> None:
    tenant = BAD_TENANT_IDS[kind]
    with pytest.raises(ConfigurationError, match="is refused") as info:
        registry.add_tenant(tenant, "fake://acme")
    assert not isinstance(info.value, RegistryIntegrityError)
    assert str(info.value).isprintable()  # the message escapes the id
    # Lookups and changes: "unknown tenant", never an integrity failure nor a driver error
    # (PostgreSQL refuses NUL with DataError).
    for call in (
        lambda: registry.tenant_keys(tenant),
        lambda: registry.get(tenant),
        lambda: registry.set_primary(tenant, "fake://x"),
        lambda: registry.disable(tenant),
    ):
        with pytest.raises(TenantNotConfiguredError, match="not a valid tenant id") as info:
            call()
        assert not isinstance(info.value, RegistryIntegrityError)
        assert str(info.value).isprintable()
    assert registry.list_tenants() == []


def test_a_non_nfc_id_is_refused_with_its_nfc_form(registry: DatabaseKeyRegistry) -> None:
    with pytest.raises(ConfigurationError, match="its NFC form is 'café'"):
        registry.add_tenant("cafe\u0301", "fake://cafe")
    registry.add_tenant("café", "fake://cafe")
    assert registry.tenant_keys("café").primary == "fake://cafe"
    with pytest.raises(TenantNotConfiguredError, match="NFC"):
        registry.tenant_keys("cafe\u0301")


def test_tenant_ids_are_case_sensitive_and_may_be_non_ascii(
    registry: DatabaseKeyRegistry,
) -> None:
    for tenant in ("acme", "Acme", "ACME", "acme corp", "株式会社", "ünïcode-ß"):
        registry.add_tenant(tenant, f"fake://{len(tenant)}-{tenant.encode().hex()}")
    assert registry.tenant_keys("Acme").primary != registry.tenant_keys("acme").primary
    assert len(registry.list_tenants()) == 6
    assert registry.verify() == []


def test_a_collation_match_of_another_spelling_is_an_unknown_tenant(engine: Engine) -> None:
    # A case-insensitive collation on tenant_id (a DBA's choice, or MariaDB's default) matches
    # "ACME" to "acme": the registry compares code points itself, so that is another tenant.
    if engine.dialect.name == "sqlite":
        collation = "NOCASE"
    elif engine.dialect.name == "mysql":
        collation = "utf8mb4_general_ci"  # MariaDB's default: folds case and accents, pads
    else:
        try:
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', "
                        "deterministic = false)"
                    )
                )
        except DBAPIError:
            pytest.skip("this PostgreSQL has no ICU collations")
        collation = "ci"
    metadata = MetaData()
    reg = DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu", metadata=metadata)
    reg.table.c.tenant_id.type = String(255, collation=collation)
    reg.create_table()
    reg.add_tenant("acme", "fake://acme")
    with pytest.raises(TenantNotConfiguredError):
        reg.tenant_keys("ACME")
    with pytest.raises(TenantNotConfiguredError):
        reg.set_primary("ACME", "fake://x")
    if engine.dialect.name == "mysql":
        for other in ("acmé", "Acmé"):  # accent-insensitive too
            with pytest.raises(TenantNotConfiguredError):
                reg.tenant_keys(other)
    assert reg.tenant_keys("acme").primary == "fake://acme"
    assert reg.verify() == []


def test_ids_compare_bytewise_whatever_the_servers_collation(engine: Engine) -> None:
    # The registry's own table, as create_table makes it, on a server whose default collation
    # folds case and accents and ignores trailing spaces (MariaDB's utf8mb4_general_ci).
    reg = DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu")
    reg.create_table()
    reg.add_tenant("acme", "fake://acme")
    for other in ("ACME", "acmé", "Acme"):
        with pytest.raises(TenantNotConfiguredError) as info:
            reg.tenant_keys(other)
        assert not isinstance(info.value, RegistryIntegrityError)
    with pytest.raises(TenantNotConfiguredError, match="not a valid tenant id"):
        reg.tenant_keys("acme ")
    # The other spellings are other tenants, with keys of their own.
    reg.add_tenant("ACME", "fake://ACME")
    reg.add_tenant("acmé", "fake://acme-e")
    assert reg.tenant_keys("ACME").primary == "fake://ACME"
    assert reg.tenant_keys("acmé").primary == "fake://acme-e"
    assert reg.tenant_keys("acme").primary == "fake://acme"
    assert sorted(r.tenant for r in reg.list_tenants()) == ["ACME", "acme", "acmé"]
    assert reg.verify() == []


def test_updated_at_keeps_its_microseconds(engine: Engine) -> None:
    # A column that drops them (MySQL's DATETIME) would fail every row's MAC on its next read.
    reg = DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu")
    reg.create_table()
    for _ in range(3):  # one write landing on a whole second would hide the loss
        reg.add_tenant(f"t{_}", "fake://t")
    records = DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu").list_tenants()
    assert any(r.updated_at.microsecond for r in records)
    assert all(r.updated_at.tzinfo is not None for r in records)
    assert reg.verify() == []


def test_written_values_are_bounded_and_printable(registry: DatabaseKeyRegistry) -> None:
    with pytest.raises(ConfigurationError, match="printable"):
        registry.add_tenant("acme", "fake://acme\nfake://evil")
    with pytest.raises(ConfigurationError, match="printable"):
        registry.add_tenant("acme", "fake://acme", credentials={"role_arn": "arn\x00"})
    with pytest.raises(ConfigurationError, match="at most 2048"):
        registry.add_tenant("acme", "fake://" + "a" * 3000)
    many = [f"fake://acme-{i:05d}-{'x' * 20}" for i in range(3000)]  # more than a read accepts
    with pytest.raises(ConfigurationError, match="too many"):
        registry.add_tenant("acme", "fake://acme", accepted=many)
    registry.add_tenant("acme", "fake://acme", accepted=many[:100])
    assert registry.verify() == []


# -- property: any change to a stored row means the same or is refused --------------------------

FUZZ_EXAMPLES = int(os.environ.get("SQLALCHEMY_CMK_REGISTRY_FUZZ_EXAMPLES", "150"))
TEXT_COLUMNS = ["tenant_id", "primary_key_ref", "accepted_key_refs", "credentials", "mac"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


def _bytes_mutation(data: st.DataObject, value: bytes) -> bytes:
    """One byte-level change: a bit flipped, a byte deleted, inserted or replaced, a cut."""
    raw = bytearray(value)
    kind = data.draw(st.sampled_from(["flip", "delete", "insert", "replace", "truncate"]))
    if not raw:
        kind = "insert"
    at = data.draw(st.integers(0, max(len(raw) - 1, 0)))
    if kind == "flip":
        raw[at] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "delete":
        del raw[at]
    elif kind == "insert":
        raw.insert(at, data.draw(st.integers(0, 255)))
    elif kind == "replace":
        raw[at] = data.draw(st.integers(0, 255))
    else:
        del raw[at:]
    return bytes(raw)


def _mutation(
    data: st.DataObject, dialect: str, row: dict[str, Any], other: dict[str, Any]
) -> tuple[str, Any, bool]:
    """A column, its new value, and whether the value is bytes to store as (invalid) TEXT."""
    column = data.draw(st.sampled_from([*TEXT_COLUMNS, "disabled", "version", "updated_at"]))
    value = row[column]
    how = data.draw(st.sampled_from(["bytes", "other row", "field"]))
    if how == "other row":
        return column, other[column], False
    if isinstance(value, str) and how == "bytes":
        mutated = _bytes_mutation(data, value.encode())
        try:
            return column, mutated.decode(), False
        except UnicodeDecodeError:
            if dialect == "sqlite":
                return column, mutated, True
            return column, mutated.decode(errors="replace"), False
    if column in ("accepted_key_refs", "credentials"):
        choice = data.draw(st.sampled_from(["json", "reformatted", "text"]))
        if choice == "json":
            return column, json.dumps(data.draw(JSON_VALUES)), False
        if choice == "reformatted":  # the same meaning, spelled differently
            parsed = json.loads(value)
            if isinstance(parsed, list):
                parsed = list(reversed(parsed)) + parsed[:1]
            return column, json.dumps(parsed, indent=data.draw(st.integers(0, 2))), False
        return column, data.draw(st.text(max_size=40)), False
    if column in TEXT_COLUMNS:
        return column, data.draw(st.text(max_size=80)), False
    if column == "version":
        bound = 2**31 - 1 if dialect == "postgresql" else 2**63 - 1
        return column, data.draw(st.integers(-bound - 1, bound)), False
    if column == "disabled":
        if dialect == "postgresql":
            return column, data.draw(st.booleans()), False
        return (
            column,
            data.draw(st.integers(-2, 3) | st.text(max_size=3) | st.binary(max_size=3)),
            False,
        )
    # updated_at: a datetime on PostgreSQL; SQLite keeps text (byte mutations above) or anything
    if dialect == "postgresql" or data.draw(st.booleans()):
        stamp = GOLDEN_RECORD["updated_at"] if isinstance(value, str) else value
        delta = datetime.timedelta(microseconds=data.draw(st.integers(-(10**12), 10**12)))
        return column, stamp + delta, False
    return (
        column,
        data.draw(st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)),
        False,
    )


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_every_mutation_of_a_stored_row_means_the_same_or_is_refused(
    engine: Engine, three_tenants: DatabaseKeyRegistry, data: st.DataObject
) -> None:
    dialect = engine.dialect.name
    before = {r.tenant: r for r in three_tenants.list_tenants()}
    with engine.connect() as conn:
        stored = [dict(r._mapping) for r in conn.execute(text("select * from cmk_tenants"))]
    by_id = {row["tenant_id"]: row for row in stored}
    victim = data.draw(st.sampled_from(sorted(by_id)), label="victim")
    other = by_id[data.draw(st.sampled_from(sorted(set(by_id) - {victim})), label="other")]
    column, value, as_text = _mutation(data, dialect, by_id[victim], other)
    if dialect == "postgresql" and isinstance(value, str):
        assume("\x00" not in value)  # PostgreSQL text cannot hold NUL: not a storable attack
    target = "CAST(:v AS TEXT)" if as_text else ":v"
    try:
        raw(
            engine,
            f"update cmk_tenants set {column} = {target} where tenant_id = :t",
            v=value,
            t=victim,
        )
    except (DBAPIError, OverflowError):
        # The database refused the attacker's write (a type or key clash), or its driver did
        # (sqlite3 takes no integer past 64 bits).
        reject()
    try:
        reg = DatabaseKeyRegistry(engine, SECRET, registry_id="test-eu")
        problems = reg.verify()
        assert all(isinstance(p, RegistryIntegrityError) for p in problems)
        bad = {p.tenant for p in problems}
        new_id = value if column == "tenant_id" and isinstance(value, str) else victim
        for tenant in {*before, new_id}:
            try:
                rec = reg.get(tenant)
            except (RegistryIntegrityError, TenantNotConfiguredError):
                continue
            # Accepted: then it is the genuine row, unchanged in meaning, and verify agrees.
            assert rec == before[tenant], (column, value)
            assert tenant not in bad
        try:
            assert reg.list_tenants() == sorted(before.values(), key=lambda r: r.tenant)
            assert problems == []
            hypothesis.event("the same meaning: accepted")
        except RegistryIntegrityError:
            assert problems
            hypothesis.event(f"refused: {column}")
        try:
            assert reg.upgrade_macs() == 0
        except RegistryIntegrityError:
            assert problems
    finally:
        with engine.begin() as conn:  # the next example starts from the genuine rows
            conn.execute(text("delete from cmk_tenants"))
            for row in stored:
                conn.execute(text(INSERT.format(cols=", ".join(row), binds=binds(row))), row)
