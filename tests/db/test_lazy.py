"""Lazy decryption (``CMK(lazy_decrypt=True)`` / ``execution_options(cmk_lazy=True)``).

Loaded values stay pending (unloaded, like deferred columns) until first accessed; then the
column is decrypted for every object of the load. The write-path matrix over pending values:
access, flushes of other columns and of the pending one, expire/refresh, merge, expunge,
pickle, delete, populate_existing, identity map, streaming, relationships, get, joined
inheritance; and the integrity bounds: tenant and format checks at load, tampering at access
(nothing exposed, raises again), the revocation bound through the cache at access time.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from sqlalchemy import Engine, ForeignKey, String, select, text
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    joinedload,
    mapped_column,
    selectinload,
    sessionmaker,
)
from sqlalchemy.orm.exc import DetachedInstanceError

from sqlalchemy_cmk import (
    CMK,
    DecryptionError,
    EDEKType,
    EncryptedMixin,
    EncryptedType,
    KeyAccessDeniedError,
    NoTenantError,
    TenantMismatchError,
    TenantRevokedError,
    tenant_context,
)
from sqlalchemy_cmk.types import EncryptedValue

from .models import TENANT_KEYS, Env, Owner, Patient, Pet, make_env

SSN = {1: "LAZY-SSN-001", 2: "LAZY-SSN-002", 3: "LAZY-SSN-003"}


class LazyBase(DeclarativeBase):
    pass


class Person(EncryptedMixin, LazyBase):
    __tablename__ = "lazy_people"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    a: Mapped[str | None] = mapped_column(EncryptedType(String))
    __mapper_args__: ClassVar[dict[str, Any]] = {
        "polymorphic_on": "kind",
        "polymorphic_identity": "person",
    }


class Employee(Person):
    __tablename__ = "lazy_employees"
    id: Mapped[int] = mapped_column(ForeignKey("lazy_people.id"), primary_key=True)
    b: Mapped[str | None] = mapped_column(EncryptedType(String))
    emp_edek: Mapped[bytes | None] = mapped_column(EDEKType(), nullable=True)
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "employee"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def env(engine: Engine) -> Iterator[Env]:
    e = make_env(engine, lazy_decrypt=True)
    with tenant_context("acme"), e.Session() as s:
        for i, ssn in SSN.items():
            s.add(Patient(id=i, tenant_id="acme", ssn=ssn, age=40 + i, notes={"n": i}))
        s.add(Owner(id=1, name="OWNER-NAME", pets=[Pet(id=1, species="cat", chip="CHIP-1")]))
        s.commit()
    yield e


def assert_pending(obj: Any, *keys: str) -> None:
    """Pending: not in the instance at all (so no ciphertext there either)."""
    for key in keys:
        assert key not in obj.__dict__
    assert not any(type(v) is EncryptedValue for v in obj.__dict__.values())


def decrypts(env: Env) -> list[Any]:
    return [e for e in env.audit.events if e.operation == "decrypt" and e.outcome == "ok"]


def load_all(env: Env, s: Any) -> list[Patient]:
    return list(s.scalars(select(Patient).order_by(Patient.id)))


def test_values_decrypted_on_first_access_for_the_whole_load(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        before = len(decrypts(env))
        rows = load_all(env, s)
        for p in rows:
            assert_pending(p, "ssn", "age", "notes")
        assert len(decrypts(env)) == before  # nothing decrypted at load
        assert rows[1].ssn == SSN[2]
        assert len(decrypts(env)) == before + 1  # one event for the batch
        for p in rows:
            assert p.__dict__["ssn"] == SSN[p.id]  # the whole load, this column only
            assert_pending(p, "age", "notes")
        assert [p.age for p in rows] == [41, 42, 43]
        assert rows[2].notes == {"n": 3}
        assert not s.dirty  # set as loaded, no change recorded


def test_option_per_statement(engine: Engine) -> None:
    e = make_env(engine)  # eager by default
    with tenant_context("acme"), e.Session() as s:
        s.add(Patient(id=1, tenant_id="acme", ssn="X"))
        s.commit()
    with tenant_context("acme"), e.Session() as s:
        p = s.scalars(select(Patient).execution_options(cmk_lazy=True)).one()
        assert_pending(p, "ssn")
        assert p.ssn == "X"
    lazy = CMK(e.kms, tenant_keys=TENANT_KEYS, lazy_decrypt=True)
    maker = sessionmaker(engine)
    lazy.install(maker)
    with tenant_context("acme"), maker() as s:
        p = s.scalars(select(Patient).execution_options(cmk_lazy=False)).one()
        assert p.__dict__["ssn"] == "X"


def test_update_other_column_then_access(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        p = s.get(Patient, 1)
        assert p is not None
        assert_pending(p, "ssn")
        p.age = 99
        s.flush()
        assert p.ssn == SSN[1]
        s.commit()
    with tenant_context("acme"), env.Session() as s:
        p = s.get(Patient, 1)
        assert p is not None and (p.ssn, p.age) == (SSN[1], 99)
    with tenant_context("acme"), env.Session() as s:
        pet = s.get(Pet, 1)
        assert pet is not None
        pet.species = "dog"  # a plaintext column
        s.commit()
        assert pet.chip == "CHIP-1"


def test_update_pending_column_without_access(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        rows = load_all(env, s)
        rows[0].ssn = "NEW-SSN"
        s.flush()
        assert rows[0].ssn == "NEW-SSN"
        assert rows[1].ssn == SSN[2]  # the batch still decrypts the others
        assert rows[0].ssn == "NEW-SSN"  # and never overwrote the new value
        s.commit()
    raw = env.raw_bytes("patients", "ssn", 1)
    assert raw is not None and b"NEW-SSN" not in raw
    with tenant_context("acme"), env.Session() as s:
        assert [p.ssn for p in load_all(env, s)] == ["NEW-SSN", SSN[2], SSN[3]]


def test_expire_and_refresh_then_access(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        rows = load_all(env, s)
        s.expire(rows[0], ["ssn"])
        assert rows[0].ssn == SSN[1]
        s.refresh(rows[1])
        assert rows[1].__dict__["ssn"] == SSN[2]  # a refresh decrypts at once
        s.expire_all()
        assert rows[2].ssn == SSN[3]


def test_commit_expires_then_access(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        rows = load_all(env, s)
        s.commit()
        assert [p.ssn for p in rows] == [SSN[1], SSN[2], SSN[3]]


@pytest.mark.parametrize("load", [True, False])
def test_merge_into_another_session(env: Env, load: bool) -> None:
    with tenant_context("acme"), env.Session() as s1, env.Session() as s2:
        p = s1.get(Patient, 1)
        assert p is not None
        if not load:
            s1.expunge(p)
        merged = s2.merge(p, load=load)
        assert merged.ssn == SSN[1]
        assert p.ssn == SSN[1]
        merged.age = 7
        s2.commit()
    with tenant_context("acme"), env.Session() as s:
        q = s.get(Patient, 1)
        assert q is not None and (q.ssn, q.age) == (SSN[1], 7)


def test_detached_decrypts_under_the_row_tenant_only(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        rows = load_all(env, s)
        s.expunge(rows[0])
    # Session closed: the batch still decrypts, under the row's tenant.
    with pytest.raises(NoTenantError):
        rows[1].ssn  # noqa: B018
    assert_pending(rows[1], "ssn")
    with tenant_context("globex"), pytest.raises(TenantMismatchError):
        rows[1].ssn  # noqa: B018
    assert_pending(rows[1], "ssn")
    with tenant_context("acme"):
        assert [p.ssn for p in rows] == [SSN[1], SSN[2], SSN[3]]


def test_pickle_keeps_no_ciphertext(env: Env) -> None:
    stored = env.raw_bytes("patients", "ssn", 1)
    assert stored is not None
    with tenant_context("acme"), env.Session() as s:
        p = s.get(Patient, 1)
        assert p is not None
        p.__dict__  # noqa: B018
        data = pickle.dumps(p)
    assert stored not in data and stored[13:] not in data
    copy = pickle.loads(data)
    assert_pending(copy, "ssn")
    with pytest.raises(DetachedInstanceError):
        copy.ssn  # noqa: B018
    with tenant_context("acme"), env.Session() as s:
        s.add(copy)
        assert copy.ssn == SSN[1]


def test_delete_pending(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        p = s.get(Patient, 3)
        s.delete(p)
        s.commit()
    assert env.raw("select id from patients order by id") == [(1,), (2,)]


def test_populate_existing_and_identity_map(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        first = load_all(env, s)
        again = load_all(env, s)  # the same identities, still pending
        assert again == first
        assert_pending(first[0], "ssn")
        forced = list(
            s.scalars(
                select(Patient).order_by(Patient.id).execution_options(populate_existing=True)
            )
        )
        assert forced == first
        assert [p.ssn for p in first] == [SSN[1], SSN[2], SSN[3]]
        assert [p.age for p in again] == [41, 42, 43]


def test_populate_existing_over_changed_value(env: Env) -> None:
    bind = env.engine
    if bind.dialect.name in ("mysql", "mariadb"):  # REPEATABLE READ would hide s2's commit
        bind = bind.execution_options(isolation_level="READ COMMITTED")
    with tenant_context("acme"), env.Session(bind=bind) as s1, env.Session() as s2:
        p = s1.get(Patient, 1)
        assert p is not None
        other = s2.get(Patient, 1)
        assert other is not None
        other.ssn = "CHANGED"
        s2.commit()
        s1.scalars(select(Patient).execution_options(populate_existing=True)).all()
        assert p.ssn == "CHANGED"


def test_yield_per_decrypts_each_partition_eagerly(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        seen = [p for p in s.scalars(select(Patient).execution_options(yield_per=2))]
        assert [p.__dict__["ssn"] for p in seen] == [SSN[1], SSN[2], SSN[3]]


@pytest.mark.parametrize("strategy", [joinedload, selectinload])
def test_relationships_in_the_same_result(env: Env, strategy: Any) -> None:
    with tenant_context("acme"), env.Session() as s:
        owner = s.scalars(select(Owner).options(strategy(Owner.pets))).unique().one()
        assert_pending(owner, "name")
        assert_pending(owner.pets[0], "chip")
        assert owner.pets[0].chip == "CHIP-1"
        assert owner.name == "OWNER-NAME"
        pet = s.scalars(select(Pet)).one()
        assert pet.owner.name == "OWNER-NAME"


def test_joined_inheritance(engine: Engine) -> None:
    e = make_env(engine, lazy_decrypt=True)
    LazyBase.metadata.create_all(engine)
    with tenant_context("acme"), e.Session() as s:
        s.add_all([Employee(id=1, a="A-1", b="B-1"), Person(id=2, a="A-2")])
        s.commit()
    with tenant_context("acme"), e.Session() as s:
        people = list(s.scalars(select(Person).order_by(Person.id)))
        assert_pending(people[0], "a", "b")
        assert_pending(people[1], "a")
        assert people[0].a == "A-1"
        assert people[1].__dict__["a"] == "A-2"
        assert people[0].b == "B-1"  # type: ignore[attr-defined]
        people[0].a = "A-1-NEW"
        s.commit()
    with tenant_context("acme"), e.Session() as s:
        emp = s.get(Employee, 1)
        assert emp is not None and (emp.a, emp.b) == ("A-1-NEW", "B-1")
    LazyBase.metadata.drop_all(engine)


def test_other_tenant_and_malformed_rows_raise_at_load(env: Env) -> None:
    with tenant_context("globex"), env.Session() as s:
        s.add(Patient(id=10, tenant_id="globex", ssn="GLOBEX"))
        s.commit()
    with tenant_context("acme"), env.Session() as s, pytest.raises(TenantMismatchError):
        load_all(env, s)
    with env.Session() as s, pytest.raises(NoTenantError):
        s.get(Patient, 1)
    with env.engine.begin() as conn:
        conn.execute(text("update patients set cmk_edek = :v where id = 2"), {"v": b"\x07" * 40})
    with tenant_context("acme"), env.Session() as s, pytest.raises(DecryptionError):
        s.get(Patient, 2)


def test_tampered_value_raises_at_access_and_stays_pending(env: Env) -> None:
    stored = env.raw_bytes("patients", "ssn", 2)
    assert stored is not None
    bad = stored[:-1] + bytes([stored[-1] ^ 1])
    with env.engine.begin() as conn:
        conn.execute(text("update patients set ssn = :v where id = 2"), {"v": bad})
    with tenant_context("acme"), env.Session() as s:
        rows = load_all(env, s)
        for _ in range(2):
            with pytest.raises(DecryptionError):
                rows[0].ssn  # noqa: B018
            for p in rows:  # nothing of the batch exposed, its good rows included
                assert_pending(p, "ssn")
        assert rows[0].age == 41  # other columns are unaffected


def test_revocation_bound_holds_for_pending_values(engine: Engine) -> None:
    clock = Clock()
    e = make_env(engine, lazy_decrypt=True, cache_ttl=10, clock=clock)
    with tenant_context("acme"), e.Session() as s:
        s.add(Patient(id=1, tenant_id="acme", ssn="X"))
        s.commit()
    with tenant_context("acme"), e.Session() as s:
        p = s.get(Patient, 1)
        assert p is not None
        clock.now += 11  # past cache_ttl: the key must be asked for again
        e.kms.deny("fake://acme")
        with pytest.raises(KeyAccessDeniedError):
            p.ssn  # noqa: B018
        assert_pending(p, "ssn")
        e.kms.allow("fake://acme")
        e.cmk.revoke("acme")
        with pytest.raises(TenantRevokedError):
            p.ssn  # noqa: B018
        assert_pending(p, "ssn")


def test_partial_refresh_keeps_the_other_pending_values(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        rows = load_all(env, s)
        s.refresh(rows[0], ["age"])
        assert rows[0].__dict__["age"] == 41
        assert_pending(rows[0], "ssn", "notes")
        assert [p.ssn for p in rows] == [SSN[1], SSN[2], SSN[3]]
        rows[0].notes = {"n": "new"}
        s.commit()
    with tenant_context("acme"), env.Session() as s:
        p = s.get(Patient, 1)
        assert p is not None and (p.ssn, p.notes, p.age) == (SSN[1], {"n": "new"}, 41)
