"""The session hooks keep each row under its own tenant and its own key, on every ORM path.

Each case here once stored a row under the wrong tenant or left it unreadable (issue 7): a flush
under another tenant than the row was added under, an unchecked tenant column, joined and
single-table inheritance, ``load_only``, ``merge`` after a rotation, two writers of a row's first
key, and an application listener that raised after ours. Every test checks the raw database.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from sqlalchemy import (
    Engine,
    ForeignKey,
    Integer,
    String,
    Text,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    defer,
    load_only,
    mapped_column,
    sessionmaker,
)

from sqlalchemy_cmk import (
    CMK,
    CMKError,
    ConfigurationError,
    EDEKType,
    EncryptedMixin,
    EncryptedType,
    NoTenantError,
    PlaintextWriteError,
    TenantContextError,
    TenantMismatchError,
    cross_tenant_context,
    tenant_column,
    tenant_context,
)
from sqlalchemy_cmk.testing import FakeKeyProvider, MemoryAuditSink

from ._upsert import insert_or_ignore

TENANTS = {"acme": "fake://acme", "globex": "fake://globex"}


class Base(DeclarativeBase):
    pass


class Customer(EncryptedMixin, Base):
    """A model that declares its tenant column."""

    __tablename__ = "si_customers"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = tenant_column(String(50))
    email: Mapped[str | None] = mapped_column(EncryptedType(String))
    note: Mapped[str | None] = mapped_column(String(50))


class Plain(EncryptedMixin, Base):
    """A model without a declared tenant column: the row's binding alone protects it."""

    __tablename__ = "si_plain"
    id: Mapped[int] = mapped_column(primary_key=True)
    ssn: Mapped[str | None] = mapped_column(EncryptedType(String))
    age: Mapped[int | None] = mapped_column(EncryptedType(Integer))


class Person(EncryptedMixin, Base):
    """Joined-table inheritance, encrypted columns and a companion on both tables."""

    __tablename__ = "si_people"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    a: Mapped[str | None] = mapped_column(EncryptedType(String))
    __mapper_args__: ClassVar[dict[str, Any]] = {
        "polymorphic_on": "kind",
        "polymorphic_identity": "person",
    }


class Employee(Person):
    __tablename__ = "si_employees"
    id: Mapped[int] = mapped_column(ForeignKey("si_people.id"), primary_key=True)
    b: Mapped[str | None] = mapped_column(EncryptedType(String))
    emp_edek: Mapped[bytes | None] = mapped_column(EDEKType(), nullable=True)
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "employee"}


class Vehicle(EncryptedMixin, Base):
    """Single-table inheritance, the encrypted column only on a subclass."""

    __tablename__ = "si_vehicles"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__: ClassVar[dict[str, Any]] = {
        "polymorphic_on": "kind",
        "polymorphic_identity": "vehicle",
    }


class Car(Vehicle):
    vin: Mapped[str | None] = mapped_column(EncryptedType(String), nullable=True)
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "car"}


class Document(EncryptedMixin, Base):
    """Text storage, so that the migration tools can rotate it."""

    __tablename__ = "si_documents"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = tenant_column(String(50))
    body: Mapped[str | None] = mapped_column(EncryptedType(Text, storage="text"))


class Legacy(EncryptedMixin, Base):
    """A table whose rows predate tenancy: its tenant column may be NULL."""

    __tablename__ = "si_legacy"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str | None] = tenant_column(String(50), nullable=True)
    secret: Mapped[str | None] = mapped_column(EncryptedType(String))
    other: Mapped[str | None] = mapped_column(EncryptedType(String))


@dataclass
class Env:
    engine: Engine
    Session: sessionmaker[Session]
    cmk: CMK
    kms: FakeKeyProvider

    def raw(self, sql: str) -> list[Any]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]

    def dump(self) -> list[Any]:
        """Everything the tables hold, for before/after comparisons."""
        return [self.raw(f"select * from {t} order by 1") for t in sorted(Base.metadata.tables)]


@pytest.fixture
def env(engine: Engine) -> Iterator[Env]:
    Base.metadata.create_all(engine)
    kms = FakeKeyProvider()
    cmk = CMK(kms, tenant_keys=TENANTS, audit_sinks=[MemoryAuditSink()])
    maker = sessionmaker(engine)
    cmk.install(maker)
    yield Env(engine, maker, cmk, kms)


def read(env: Env, model: type[Any], pk: int, tenant: str) -> Any:
    with tenant_context(tenant), env.Session() as s:
        obj = s.get(model, pk)
        assert obj is not None
        s.expunge(obj)
        return obj


def no_plaintext(env: Env, *secrets: str) -> None:
    blob = repr(env.dump()).encode()
    for secret in secrets:
        assert secret.encode() not in blob, "plaintext reached the database"


# -- a row keeps the tenant it was added under ---------------------------------------------------


@pytest.mark.parametrize("how", ["commit", "autoflush", "flush"])
def test_a_row_added_under_one_tenant_is_never_sealed_under_another(env: Env, how: str) -> None:
    before = env.dump()
    s = env.Session()
    with tenant_context("acme"):
        s.add(Plain(id=1, ssn="ACME-SSN-ADDED"))
    with tenant_context("globex"), pytest.raises(TenantMismatchError) as info:
        if how == "commit":
            s.commit()
        elif how == "autoflush":
            s.scalars(select(Plain)).all()
        else:
            s.flush()
    assert "acme" not in str(info.value), "the message may reach globex's users"
    assert info.value.row_tenant == "acme"
    s.rollback()
    assert env.dump() == before
    # Under its own tenant it goes through.
    with tenant_context("acme"):
        s.add(Plain(id=1, ssn="ACME-SSN-ADDED"))
        s.commit()
    s.close()
    assert read(env, Plain, 1, "acme").ssn == "ACME-SSN-ADDED"
    with pytest.raises(TenantMismatchError):
        read(env, Plain, 1, "globex")


def test_a_row_loaded_without_a_key_stays_with_the_loading_tenant(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        s.add(Plain(id=1))  # no encrypted values: no key yet
        s.commit()
    with env.Session() as s:
        with tenant_context("acme"):
            row = s.get(Plain, 1)
            assert row is not None
        row.ssn = "WHOSE-IS-THIS"
        with tenant_context("globex"), pytest.raises(TenantMismatchError):
            s.flush()
        s.rollback()
    assert env.raw("select cmk_edek, ssn from si_plain") == [(None, None)]


# -- a declared tenant column is checked on every write and load ---------------------------------


def test_declared_tenant_column_is_filled_from_the_context(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        s.add(Customer(id=1, email="filled@acme.example"))
        s.commit()
    assert env.raw("select tenant_id from si_customers") == [("acme",)]
    assert read(env, Customer, 1, "acme").email == "filled@acme.example"


@pytest.mark.parametrize("how", ["add", "bulk"])
def test_declared_tenant_column_naming_another_tenant_is_refused(env: Env, how: str) -> None:
    before = env.dump()
    with tenant_context("acme"), env.Session() as s:
        with pytest.raises(TenantMismatchError):
            if how == "add":
                s.add(Customer(id=1, tenant_id="globex", email="wrong@globex.example"))
                s.flush()
            else:
                s.execute(
                    insert(Customer), [{"id": 1, "tenant_id": "globex", "email": "wrong@g.example"}]
                )
        s.rollback()
    assert env.dump() == before


def test_declared_tenant_column_is_checked_for_plain_updates_and_cannot_change(env: Env) -> None:
    with tenant_context("globex"), env.Session() as s:
        s.add(Customer(id=1, email="g@globex.example"))
        s.commit()
    before = env.dump()
    with env.Session() as s:
        with cross_tenant_context(actor="ops"):
            row = s.get(Customer, 1)
            assert row is not None
        row.note = "touched by acme"
        with tenant_context("acme"), pytest.raises(TenantMismatchError):
            s.flush()
        s.rollback()
    with tenant_context("globex"), env.Session() as s:
        row = s.get(Customer, 1)
        assert row is not None
        row.tenant_id = "acme"
        with pytest.raises(TenantMismatchError):
            s.flush()
        s.rollback()
    assert env.dump() == before


def test_new_rows_of_a_tenant_model_need_a_tenant(env: Env) -> None:
    with env.Session() as s:
        s.add(Customer(id=1, note="no context"))
        with pytest.raises(NoTenantError):
            s.flush()
        s.rollback()
    assert env.raw("select count(*) from si_customers") == [(0,)]


def test_a_tenant_column_edited_in_the_database_is_refused_on_load(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        s.add(Customer(id=1, email="moved@acme.example"))
        s.commit()
    with env.engine.begin() as conn:
        conn.execute(text("update si_customers set tenant_id = 'globex'"))
    with (
        cross_tenant_context(actor="export"),
        env.Session() as s,
        pytest.raises(TenantMismatchError),
    ):
        s.scalars(select(Customer)).all()


# -- companions are found by the row's own table, for every mapping ------------------------------


def test_joined_inheritance_updates_use_each_rows_own_companion(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        s.add_all([Employee(id=1, a="A1-ACME", b="B1-ACME"), Employee(id=2, a="A2", b="B2")])
        s.commit()
    with tenant_context("globex"), env.Session() as s:
        s.add(Employee(id=3, a="A3-GLOBEX", b="B3-GLOBEX"))
        s.commit()
    for tenant, pk in (("acme", 1), ("acme", 2), ("globex", 3)):
        with tenant_context(tenant), env.Session() as s:
            row = s.get(Employee, pk)
            assert row is not None
            row.b = f"B{pk}-UPDATED"
            row.a = f"A{pk}-UPDATED"
            s.commit()
    for tenant, pk in (("acme", 1), ("acme", 2), ("globex", 3)):
        row = read(env, Employee, pk, tenant)
        assert (row.a, row.b) == (f"A{pk}-UPDATED", f"B{pk}-UPDATED")
    with tenant_context("acme"), env.Session() as s:
        query = select(Employee).options(load_only(Employee.b)).where(Employee.id < 3)
        rows = s.scalars(query.order_by(Employee.id)).all()
        assert [r.b for r in rows] == ["B1-UPDATED", "B2-UPDATED"]
    no_plaintext(env, "B1-UPDATED", "A3-GLOBEX")


def test_single_table_inheritance_with_a_subclass_encrypted_column(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        s.add_all([Car(id=1, vin="VIN-SECRET-1"), Vehicle(id=2)])
        s.commit()
    with tenant_context("acme"), env.Session() as s:
        assert s.scalars(select(Car)).one().vin == "VIN-SECRET-1"
        assert len(s.scalars(select(Vehicle)).all()) == 2
        car = s.get(Car, 1)
        assert car is not None
        car.vin = "VIN-SECRET-2"
        s.commit()
    assert read(env, Car, 1, "acme").vin == "VIN-SECRET-2"
    no_plaintext(env, "VIN-SECRET-1", "VIN-SECRET-2")


def test_a_misconfigured_model_does_not_break_its_registrys_other_models(env: Env) -> None:
    class Other(DeclarativeBase):
        pass

    class Good(EncryptedMixin, Other):
        __tablename__ = "si_good"
        id: Mapped[int] = mapped_column(primary_key=True)
        secret: Mapped[str | None] = mapped_column(EncryptedType(String))

    class Broken(Other):  # no companion column
        __tablename__ = "si_broken"
        id: Mapped[int] = mapped_column(primary_key=True)
        secret: Mapped[str | None] = mapped_column(EncryptedType(String))

    Other.metadata.create_all(env.engine)
    with tenant_context("acme"), env.Session() as s:
        s.add(Good(id=1, secret="GOOD"))
        s.commit()
        assert s.scalars(select(Good)).one().secret == "GOOD"
        with pytest.raises(CMKError, match="Broken"):
            s.scalars(select(Broken)).all()


# -- only the hooks write companions -------------------------------------------------------------


def test_merge_of_a_stale_copy_after_a_rotation_loses_nothing(env: Env) -> None:
    from migrations_helpers import backfill

    with tenant_context("acme"), env.Session() as s:
        s.add(Document(id=1, body="BODY-BEFORE-ROTATION"))
        s.commit()
    stale = read(env, Document, 1, "acme")
    report = backfill.rotate_data_keys(
        env.engine, env.cmk, "si_documents", ["body"], tenant_column="tenant_id"
    )
    assert report.rows == 1
    (rotated,) = env.raw("select cmk_edek from si_documents")
    with tenant_context("acme"), env.Session() as s:
        merged = s.merge(stale)
        assert merged.body == "BODY-BEFORE-ROTATION"
        # A reload that leaves the companion out reads the row's own, not the merged copy's.
        query = select(Document).options(load_only(Document.body))
        again = s.scalars(query.execution_options(populate_existing=True)).one()
        assert again.body == "BODY-BEFORE-ROTATION"
        s.commit()
    assert env.raw("select cmk_edek from si_documents") == [rotated]
    assert read(env, Document, 1, "acme").body == "BODY-BEFORE-ROTATION"
    # And an explicit assignment of a companion is not written either.
    with tenant_context("acme"), env.Session() as s:
        doc = s.get(Document, 1)
        assert doc is not None
        doc.cmk_edek = stale.cmk_edek
        doc.body = "BODY-AFTER"
        s.commit()
    assert read(env, Document, 1, "acme").body == "BODY-AFTER"


@pytest.mark.parametrize(
    "how", ["refresh with names", "expired attribute", "deferred column", "populate_existing"]
)
@pytest.mark.parametrize("change", ["rotation", "first key from another session"])
def test_a_partial_load_after_the_rows_key_changed_reads_the_rows_own_key(
    env: Env, how: str, change: str
) -> None:
    """A session holds a row; its key changes elsewhere (an online rotation, or another
    session's first write); then the session loads some encrypted attributes but not the
    companion. The companion in memory is the old one: it must not open the new ciphertext."""
    from migrations_helpers import backfill

    first = change == "rotation"
    with tenant_context("acme"), env.Session() as s:
        s.add(Legacy(id=1, secret="S1" if first else None, other="O1" if first else None))
        s.commit()
    with tenant_context("acme"):
        s = env.Session(expire_on_commit=False)
        if how == "deferred column":
            doc = s.scalars(select(Legacy).options(defer(Legacy.other))).one()
        else:
            doc = s.get(Legacy, 1)
        assert doc is not None and doc.secret == ("S1" if first else None)
        s.commit()  # the session keeps the row (and its companion) past its transaction
        if first:
            backfill.rotate_data_keys(env.engine, env.cmk, "si_legacy", metadata=Base)
        else:
            with env.Session() as other:
                row = other.get(Legacy, 1)
                assert row is not None
                row.secret, row.other = "S2", "O2"
                other.commit()
        want = ("S1", "O1") if first else ("S2", "O2")
        if how == "refresh with names":
            s.refresh(doc, ["secret", "other"])
        elif how == "expired attribute":
            s.expire(doc, ["secret", "other"])
        elif how == "populate_existing":
            query = select(Legacy).options(load_only(Legacy.secret, Legacy.other))
            s.scalars(query.execution_options(populate_existing=True)).one()
        if how == "deferred column":
            s.expire(doc, ["secret"])
        assert (doc.secret, doc.other) == want
        doc.secret = "S3"
        s.commit()
        s.close()
    assert (read(env, Legacy, 1, "acme").secret, read(env, Legacy, 1, "acme").other) == (
        "S3",
        want[1],
    )


def test_a_legacy_row_with_no_tenant_gets_one_with_its_first_key(env: Env) -> None:
    """A row written before tenancy (tenant column NULL) gets its first encrypted value: the
    tenant column is filled with the key's tenant, so the row loads again (it used to be
    refused to everyone, the column naming no tenant and the key one)."""
    with env.engine.begin() as conn:
        conn.execute(insert(Legacy.__table__).values(id=1, tenant_id=None))
    with tenant_context("acme"), env.Session() as s:
        row = s.get(Legacy, 1)
        assert row is not None and row.tenant_id is None
        row.secret = "LEGACY-SECRET"
        s.commit()
    assert env.raw("select tenant_id from si_legacy") == [("acme",)]
    assert read(env, Legacy, 1, "acme").secret == "LEGACY-SECRET"
    with pytest.raises(TenantMismatchError):
        read(env, Legacy, 1, "globex")
    no_plaintext(env, "LEGACY-SECRET")
    # Another tenant cannot claim such a row by writing it: it is bound to its loader.
    with env.engine.begin() as conn:
        conn.execute(insert(Legacy.__table__).values(id=2, tenant_id=None))
    with tenant_context("acme"), env.Session() as s:
        row = s.get(Legacy, 2)
        assert row is not None
        with tenant_context("globex"):
            row.secret = "GLOBEX-CLAIM"
            with pytest.raises(TenantMismatchError):
                s.flush()
    assert env.raw("select tenant_id, secret from si_legacy where id = 2") == [(None, None)]


def test_a_companion_copied_onto_a_new_row_without_values_is_dropped(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        s.add(Plain(id=1, ssn="FIRST"))
        s.commit()
    copied = env.raw("select cmk_edek from si_plain")[0][0]
    with tenant_context("acme"), env.Session() as s:
        s.add(Plain(id=2, cmk_edek=bytes(copied)))
        s.commit()
    assert env.raw("select cmk_edek from si_plain where id = 2") == [(None,)]


def test_two_writers_of_a_rows_first_key_both_keep_their_values(env: Env) -> None:
    """Both sessions see the row without a key; the second must wait and use the first's."""
    with tenant_context("acme"), env.Session() as s:
        s.add(Plain(id=1))
        s.commit()
    first = env.Session()
    second = env.Session()
    with tenant_context("acme"):
        a = first.get(Plain, 1)
        b = second.get(Plain, 1)
        assert a is not None and b is not None
        a.ssn = "SSN-FROM-FIRST"
        b.age = 41
        first.flush()  # holds the row (or, on SQLite, the database) until it commits
    errors: list[BaseException] = []

    @tenant_context("acme")
    def write_second() -> None:
        try:
            second.commit()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=write_second)
    worker.start()
    worker.join(0.5)
    assert worker.is_alive(), "the second writer must wait for the first"
    first.commit()
    worker.join(30)
    first.close()
    second.close()
    assert not errors, errors
    row = read(env, Plain, 1, "acme")
    assert (row.ssn, row.age) == ("SSN-FROM-FIRST", 41)


# -- nothing sealed stays in an instance ---------------------------------------------------------


def test_an_application_listener_that_raises_leaves_plaintext_in_the_instances(env: Env) -> None:
    def veto(session: Session, flush_context: Any, instances: Any) -> None:
        raise RuntimeError("application veto")

    event.listen(env.Session, "before_flush", veto)
    try:
        with tenant_context("acme"), env.Session() as s:
            p = Plain(id=1, ssn="STILL-PLAIN")
            s.add(p)
            with pytest.raises(RuntimeError):
                s.flush()
            assert p.ssn == "STILL-PLAIN"
            with pytest.raises(RuntimeError):
                s.flush()
            assert p.ssn == "STILL-PLAIN"
    finally:
        event.remove(env.Session, "before_flush", veto)
    assert env.raw("select count(*) from si_plain") == [(0,)]


def test_a_failed_flush_leaves_plaintext_and_a_retry_succeeds(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        s.add(Plain(id=1, ssn="TAKEN"))
        s.commit()
    with tenant_context("acme"), env.Session() as s:
        dup = Plain(id=1, ssn="DUPLICATE-KEY")
        s.add(dup)
        with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
            s.flush()
        s.rollback()
        assert dup.ssn == "DUPLICATE-KEY"
    no_plaintext(env, "DUPLICATE-KEY", "TAKEN")


@pytest.mark.parametrize("how", ["update", "bulk_update", "bulk_save", "core_insert", "null"])
def test_a_companion_from_outside_the_hooks_is_refused(env: Env, how: str) -> None:
    with tenant_context("acme"), env.Session() as s:
        s.add_all([Plain(id=1, ssn="ONE"), Plain(id=2, ssn="TWO")])
        s.commit()
    (other,) = env.raw("select cmk_edek from si_plain where id = 2")[0]
    before = env.dump()
    with tenant_context("acme"), env.Session() as s:
        with pytest.raises(PlaintextWriteError):
            if how == "update":
                s.execute(update(Plain).where(Plain.id == 1).values(cmk_edek=bytes(other)))
            elif how == "bulk_update":
                s.execute(update(Plain), [{"id": 1, "cmk_edek": bytes(other)}])
            elif how == "bulk_save":
                s.bulk_save_objects([Plain(id=3, cmk_edek=bytes(other))])
            elif how == "core_insert":
                s.execute(insert(Plain.__table__).values(id=3, cmk_edek=bytes(other)))
            else:
                s.execute(update(Plain).where(Plain.id == 1).values(cmk_edek=None))
        s.rollback()
    assert env.dump() == before


@pytest.mark.parametrize("flush_under", ["acme", "globex"])
def test_rows_added_under_two_tenants_in_one_session_cannot_share_a_flush(
    env: Env, flush_under: str
) -> None:
    s = env.Session()
    s.add(Plain(id=9))  # no context, no values: bound when it is first written
    with tenant_context("acme"):
        s.add(Plain(id=1, ssn="ADDED-UNDER-ACME"))
    with tenant_context("globex"):
        s.add(Plain(id=2, ssn="ADDED-UNDER-GLOBEX"))
    with tenant_context(flush_under), pytest.raises(TenantMismatchError):
        s.flush()
    s.rollback()
    s.close()
    assert env.raw("select count(*) from si_plain") == [(0,)]
    s = env.Session()
    with tenant_context("acme"):
        s.add(Plain(id=1, ssn="ADDED-UNDER-ACME"))
    with tenant_context("globex"):
        s.add(Plain(id=2, ssn="ADDED-UNDER-GLOBEX"))
    other = "globex" if flush_under == "acme" else "acme"
    for obj in list(s.new):  # the other tenant's row leaves; then the flush goes through
        if (obj.id == 2) == (other == "globex"):
            s.expunge(obj)
    with tenant_context(flush_under):
        s.commit()
    s.close()
    assert env.raw("select count(*) from si_plain") == [(1,)]


@pytest.mark.parametrize("hide", ["defer", "null"])
def test_a_key_a_load_could_not_prove_is_never_used_to_seal(env: Env, hide: str) -> None:
    """A wrong key from the KMS, for a row whose values the load did not decrypt (deferred, or
    NULL), must not be cached: the next update would seal under it and lose the value."""
    with tenant_context("acme"), env.Session() as s:
        s.add(Plain(id=1, ssn="OLD-SSN", age=None if hide == "null" else 7))
        s.commit()
    if hide == "null":
        with tenant_context("acme"), env.Session() as s:
            row = s.get(Plain, 1)
            assert row is not None
            row.ssn = None  # the row keeps its key, holds no value
            s.commit()
    env.cmk.forget_tenant()
    env.kms.inject("garbage", operation="unwrap")
    with tenant_context("acme"), env.Session() as s:
        s.get(Plain, 1, options=[defer(Plain.ssn), defer(Plain.age)])
    env.kms.heal()
    with tenant_context("acme"), env.Session() as s:
        row = s.get(Plain, 1, options=[defer(Plain.ssn)])
        assert row is not None
        row.ssn = "NEW-SSN"
        s.commit()
    env.cmk.forget_tenant()
    assert read(env, Plain, 1, "acme").ssn == "NEW-SSN"


@pytest.mark.parametrize("how", ["load_only", "cross_tenant", "merge_no_load"])
def test_another_tenant_cannot_give_a_joined_rows_table_its_first_key(env: Env, how: str) -> None:
    with tenant_context("acme"), env.Session() as s:
        s.add(Employee(id=1, a="ACME-A"))  # the subclass table has no key yet
        s.commit()
    before = env.dump()
    with env.Session() as s:
        if how == "load_only":
            with tenant_context("globex"):
                row = s.get(Employee, 1, options=[load_only(Employee.b)])
        elif how == "cross_tenant":
            with cross_tenant_context(actor="ops"):
                row = s.get(Employee, 1)
        else:
            detached = read(env, Employee, 1, "acme")
            row = s.merge(detached, load=False)
        assert row is not None
        row.b = "GLOBEX-B"
        with tenant_context("globex"), pytest.raises(TenantMismatchError):
            s.flush()
        s.rollback()
    assert env.dump() == before
    assert read(env, Employee, 1, "acme").a == "ACME-A"


@pytest.mark.parametrize("how", ["update", "bulk_update", "insert_values", "insert_values_multi"])
def test_statements_cannot_move_a_row_to_another_tenant(env: Env, how: str) -> None:
    with tenant_context("acme"), env.Session() as s:
        s.add(Customer(id=1, email="stay@acme.example"))
        s.commit()
    before = env.dump()
    with tenant_context("acme"), env.Session() as s:
        with pytest.raises(TenantContextError):
            if how == "update":
                s.execute(update(Customer).where(Customer.id == 1).values(tenant_id="globex"))
            elif how == "bulk_update":
                s.execute(update(Customer), [{"id": 1, "tenant_id": "globex"}])
            elif how == "insert_values":
                s.execute(insert(Customer).values(id=2, tenant_id="globex", note="x"))
            else:
                s.execute(insert(Customer).values([{"id": 2, "tenant_id": "globex", "note": "x"}]))
        s.rollback()
    assert env.dump() == before


def test_insert_on_conflict_do_nothing_keeps_existing_rows(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        s.add(Plain(id=1, ssn="EXISTING"))
        s.commit()
        stmt = insert_or_ignore(env.engine, Plain)
        s.execute(stmt, [{"id": 1, "ssn": "IGNORED"}, {"id": 2, "ssn": "INSERTED"}])
        s.commit()
    assert read(env, Plain, 1, "acme").ssn == "EXISTING"
    assert read(env, Plain, 2, "acme").ssn == "INSERTED"


def test_an_application_before_insert_listener_sees_every_row_alike(env: Env) -> None:
    seen: list[Any] = []

    def watch(mapper: Any, connection: Any, target: Plain) -> None:
        seen.append(target.ssn)

    event.listen(Plain, "before_insert", watch)
    try:
        with tenant_context("acme"), env.Session() as s:
            s.add_all([Plain(id=i, ssn=f"SSN-{i}") for i in range(1, 4)])
            s.commit()
    finally:
        event.remove(Plain, "before_insert", watch)
    assert len({type(v) for v in seen}) == 1, "every row must look the same to a listener"


# -- one CMK per session -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["maker", "base class", "session"])
def test_a_second_cmk_hooked_into_the_same_session_is_refused_loudly(env: Env, where: str) -> None:
    # An app factory run twice, or a CMK on a Session base class and another on the maker:
    # each CMK's hooks seal and open every value with its own keys, so rows were written
    # under one and every read failed as if tampered with (DecryptionError), the cause hidden.
    class Base_(Session):
        pass

    class Sub(Base_):
        pass

    maker = sessionmaker(env.engine, class_=Sub)
    env.cmk.install(maker)
    other = CMK(FakeKeyProvider(), tenant_keys=TENANTS)
    session = maker()
    target = {"maker": maker, "base class": Base_, "session": session}[where]
    other.install(target)
    before = env.dump()
    with tenant_context("acme"), pytest.raises(ConfigurationError, match="more than one CMK"):
        session.add(Document(id=1, tenant_id="acme", body="two keys"))
        session.flush()
    session.rollback()
    assert env.dump() == before
    with tenant_context("acme"), pytest.raises(ConfigurationError, match="more than one CMK"):
        session.scalars(select(Document)).all()
    session.close()
    other.uninstall(target)
    # The same CMK on the class and the maker is one CMK: it works.
    one = sessionmaker(env.engine, class_=Sub)
    env.cmk.install(Base_)
    with tenant_context("acme"), one() as s:
        s.add(Document(id=2, tenant_id="acme", body="one key"))
        s.commit()
    assert read(env, Document, 2, "acme").body == "one key"
