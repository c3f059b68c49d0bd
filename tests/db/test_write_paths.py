"""Every way of writing: the paths that can encrypt do, the others refuse before sending SQL.
Core reads see opaque values; SQL echo logs never see plaintext."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, insert, select, text, update

from sqlalchemy_cmk import (
    DecryptionError,
    EncryptedValue,
    NoTenantError,
    PlaintextWriteError,
    TenantMismatchError,
    UnsupportedQueryError,
    tenant_context,
)

from ._upsert import upsert
from .models import (
    Env,
    Patient,
    assert_absent,
    make_env,
)

PATIENTS = Patient.__table__

SSN = "SECRET-SSN-078-05-1120"
NOTES = {"diagnosis": "SECRET-DIAGNOSIS-lupus", "meds": ["SECRET-MED-x"]}


@pytest.fixture
def env(engine: Engine) -> Env:
    return make_env(engine)


@pytest.fixture
def row_id(env: Env) -> int:
    """One stored patient of tenant acme."""
    with tenant_context("acme"), env.Session() as s:
        p = Patient(tenant_id="acme", ssn=SSN, notes=NOTES, age=44)
        s.add(p)
        s.commit()
        return p.id


def raw_table(env: Env) -> list[tuple[Any, ...]]:
    rows = env.raw("select id, tenant_id, ssn, notes, age, cmk_edek from patients order by id")
    return [tuple(bytes(v) if isinstance(v, bytes | memoryview) else v for v in r) for r in rows]


def count(env: Env) -> int:
    return int(env.raw("select count(*) from patients")[0][0])


# -- paths that encrypt ----------------------------------------------------------------------


def test_unit_of_work_encrypts(env: Env, row_id: int) -> None:
    (row,) = env.raw("select ssn, notes, age, cmk_edek from patients")
    for value in row:
        assert bytes(value)[0] == 0x01
    assert_absent(bytes(row.ssn), [SSN])
    assert_absent(bytes(row.notes), ["SECRET-DIAGNOSIS-lupus", "SECRET-MED-x"])


def test_orm_bulk_insert_encrypts(env: Env) -> None:
    rows = [
        {"tenant_id": "acme", "ssn": f"{SSN}-{i}", "notes": {"i": i}, "age": i} for i in range(20)
    ]
    rows.append({"tenant_id": "acme", "ssn": None, "age": None})  # nothing to encrypt
    rows.append({"tenant_id": "acme", "notes": ["only", "notes"]})  # other keys
    with tenant_context("acme"), env.Session() as s:
        s.execute(insert(Patient), rows)
        s.commit()
    assert rows[0]["ssn"] == f"{SSN}-0", "the caller's dicts must not be changed"
    assert env.kms.wrap_count == 1, "one batch, one data key"

    stored = raw_table(env)
    assert len(stored) == 22
    for i, (_, _, ssn, notes, age, edek) in enumerate(stored[:20]):
        assert ssn[0] == notes[0] == age[0] == edek[0] == 0x01
        assert_absent(ssn, [f"{SSN}-{i}"])
    assert len({r[5][1:17] for r in stored[:20]}) == 20, "each row has its own row id"
    assert stored[20][2:] == (None, None, None, None)
    assert stored[21][2] is None and stored[21][3] is not None and stored[21][5] is not None

    with tenant_context("acme"), env.Session() as s:
        loaded = s.scalars(select(Patient).order_by(Patient.id)).all()
        assert [(p.ssn, p.notes, p.age) for p in loaded[:20]] == [
            (f"{SSN}-{i}", {"i": i}, i) for i in range(20)
        ]
        assert (loaded[20].ssn, loaded[20].notes) == (None, None)
        assert loaded[21].notes == ["only", "notes"]


def test_orm_bulk_insert_returning_gives_plaintext(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        returned = s.scalars(
            insert(Patient).returning(Patient),
            [{"tenant_id": "acme", "ssn": SSN, "age": 1}, {"tenant_id": "acme", "age": 2}],
        ).all()
        assert [(p.ssn, p.age) for p in returned] == [(SSN, 1), (None, 2)]
        s.commit()
    assert bytes(env.raw("select ssn from patients order by id")[0][0])[0] == 0x01


# -- paths that cannot encrypt, and so refuse ------------------------------------------------


def test_update_statement_with_value_is_refused(env: Env, row_id: int) -> None:
    before = raw_table(env)
    with tenant_context("acme"), env.Session() as s:
        p = s.get(Patient, row_id)
        assert p is not None and p.ssn == SSN
        with pytest.raises(PlaintextWriteError) as info:
            s.execute(update(Patient).where(Patient.id == row_id).values(ssn="NEW-PLAIN-SSN"))
        assert "NEW-PLAIN-SSN" not in str(info.value)
        s.rollback()
        assert p.ssn == SSN
        # The session still works after the refusal.
        p.age = 45
        s.commit()
    after = raw_table(env)
    assert [r[:4] for r in after] == [r[:4] for r in before]  # ssn and notes untouched
    with tenant_context("acme"), env.Session() as s:
        p = s.get(Patient, row_id)
        assert p is not None
        assert (p.ssn, p.age) == (SSN, 45)


def test_update_statement_refused_even_with_a_plain_column_alongside(env: Env, row_id: int) -> None:
    before = raw_table(env)
    with tenant_context("acme"), env.Session() as s:
        with pytest.raises(PlaintextWriteError):
            s.execute(update(Patient).values(tenant_id="other", age=1))
        s.rollback()
    assert raw_table(env) == before


def test_orm_bulk_update_by_primary_key_is_refused(env: Env, row_id: int) -> None:
    before = raw_table(env)
    with tenant_context("acme"), env.Session() as s:
        with pytest.raises(PlaintextWriteError):
            s.execute(update(Patient), [{"id": row_id, "ssn": "BULK-PLAIN-SSN"}])
        s.rollback()
    assert raw_table(env) == before


def test_orm_insert_with_inline_values_is_refused(env: Env) -> None:
    """insert(Model).values(...) carries the value in the statement, where no hook can seal it."""
    with tenant_context("acme"), env.Session() as s:
        with pytest.raises(PlaintextWriteError):
            s.execute(insert(Patient).values(tenant_id="acme", ssn="INLINE-PLAIN-SSN"))
        s.rollback()
    assert count(env) == 0


@pytest.mark.parametrize(
    "write",
    [
        lambda s, i: s.bulk_save_objects([Patient(id=i + 1, tenant_id="acme", ssn="LEGACY-1")]),
        lambda s, i: s.bulk_insert_mappings(
            Patient, [{"id": i + 1, "tenant_id": "acme", "ssn": "LEGACY-2"}]
        ),
        lambda s, i: s.bulk_update_mappings(Patient, [{"id": i, "ssn": "LEGACY-3"}]),
        lambda s, i: s.execute(insert(Patient).values([{"tenant_id": "acme", "ssn": "MULTI"}])),
    ],
    ids=["bulk_save_objects", "bulk_insert_mappings", "bulk_update_mappings", "multi-values"],
)
def test_legacy_bulk_and_multivalues_writes_are_refused(env: Env, row_id: int, write: Any) -> None:
    """The legacy bulk methods skip the flush hooks: they must be refused, not store plaintext."""
    before = raw_table(env)
    with tenant_context("acme"), env.Session() as s:
        with pytest.raises(PlaintextWriteError):
            write(s, row_id)
        s.rollback()
    assert raw_table(env) == before


def test_merge_of_detached_object_encrypts(env: Env, row_id: int) -> None:
    with tenant_context("acme"), env.Session() as s:
        s.merge(Patient(id=row_id, tenant_id="acme", ssn="MERGED-SSN"))
        s.commit()
    stored = env.raw_bytes("patients", "ssn", row_id)
    assert stored is not None and stored[0] == 0x01
    assert_absent(stored, ["MERGED-SSN"])
    with tenant_context("acme"), env.Session() as s:
        p = s.get(Patient, row_id)
        assert p is not None
        assert (p.ssn, p.notes, p.age) == ("MERGED-SSN", NOTES, 44)


def test_upsert_never_leaves_an_undecryptable_row(env: Env, row_id: int) -> None:
    stmt = upsert(env.engine, Patient, lambda proposed: {"ssn": proposed.ssn})
    with tenant_context("acme"), env.Session() as s:
        with pytest.raises(PlaintextWriteError, match="upsert"):
            s.execute(stmt, [{"id": row_id, "tenant_id": "acme", "ssn": "UPSERTED-SSN"}])
        s.rollback()
        expected = SSN
    env.cmk.forget_tenant()
    with tenant_context("acme"), env.Session() as s:
        p = s.get(Patient, row_id)
        assert p is not None
        assert (p.ssn, p.age) == (expected, 44)


def test_filtering_on_an_encrypted_column_is_refused_with_a_reason(env: Env) -> None:
    """A read error, not a write error: refused when the comparison is built."""
    expected = pytest.raises(UnsupportedQueryError, match="Sort and group on a plaintext")
    with tenant_context("acme"), env.Session() as s, expected as info:
        s.scalars(select(Patient).where(Patient.ssn == "FILTER-SSN")).all()
    assert "FILTER-SSN" not in str(info.value)


def test_core_insert_is_refused(env: Env) -> None:
    with tenant_context("acme"), env.engine.connect() as conn:
        with pytest.raises(PlaintextWriteError):
            conn.execute(PATIENTS.insert(), {"tenant_id": "acme", "ssn": "CORE-PLAIN-SSN"})
        with pytest.raises(PlaintextWriteError):
            conn.execute(
                PATIENTS.insert(),
                [{"tenant_id": "acme", "ssn": None}, {"tenant_id": "acme", "ssn": "CORE-2"}],
            )
        conn.commit()
    assert count(env) == 0


def test_core_statement_through_installed_session_is_refused(env: Env, row_id: int) -> None:
    before = raw_table(env)
    with tenant_context("acme"), env.Session() as s:
        with pytest.raises(PlaintextWriteError):
            s.execute(PATIENTS.insert(), {"tenant_id": "acme", "ssn": "CORE-PLAIN-SSN"})
        s.rollback()
        with pytest.raises(PlaintextWriteError):
            s.execute(PATIENTS.update().values(ssn="CORE-PLAIN-SSN"))
        s.rollback()
    assert raw_table(env) == before


def test_core_update_with_value_is_refused(env: Env, row_id: int) -> None:
    before = raw_table(env)
    with env.engine.begin() as conn, pytest.raises(PlaintextWriteError):
        conn.execute(PATIENTS.update().values(notes={"plain": True}))
    assert raw_table(env) == before


def test_update_to_none_is_allowed(env: Env, row_id: int) -> None:
    with tenant_context("acme"), env.Session() as s:
        s.execute(update(Patient).where(Patient.id == row_id).values(ssn=None))
        s.commit()
    with env.engine.begin() as conn:
        conn.execute(PATIENTS.update().where(PATIENTS.c.id == row_id).values(notes=None))
    (row,) = env.raw("select ssn, notes, age from patients")
    assert row.ssn is None and row.notes is None and row.age is not None
    with tenant_context("acme"), env.Session() as s:
        p = s.get(Patient, row_id)
        assert p is not None
        assert (p.ssn, p.notes, p.age) == (None, None, 44)


# -- Core reads ------------------------------------------------------------------------------


def test_column_only_orm_select_is_never_raw_or_wrong(env: Env, row_id: int) -> None:
    """select(Model.column) loads no instance, so no hook decrypts it: it must come back as the
    plaintext or as an opaque EncryptedValue, never as raw bytes or a wrong value."""
    with tenant_context("acme"), env.Session() as s:
        ((ssn, age),) = s.execute(select(Patient.ssn, Patient.age)).all()
    assert ssn == SSN or isinstance(ssn, EncryptedValue)
    assert age == 44 or isinstance(age, EncryptedValue)


def test_core_read_returns_opaque_values(env: Env, row_id: int) -> None:
    with env.engine.connect() as conn:
        row = conn.execute(select(PATIENTS)).one()
    for col in ("ssn", "notes", "age"):
        value = row._mapping[col]
        assert isinstance(value, EncryptedValue)
        assert_absent(repr(value), [SSN, "SECRET-DIAGNOSIS-lupus"])
        assert_absent(str(value), [SSN, "SECRET-DIAGNOSIS-lupus"])
    assert_absent(repr(row), [SSN, "SECRET-DIAGNOSIS-lupus", "SECRET-MED-x"])


def test_decrypt_row_in_the_tenant_context(env: Env, row_id: int) -> None:
    with env.engine.connect() as conn:
        row = conn.execute(select(PATIENTS)).one()
    with tenant_context("acme"):
        plain = env.cmk.decrypt_row(PATIENTS, row._mapping)
    assert (plain["id"], plain["tenant_id"]) == (row_id, "acme")
    assert (plain["ssn"], plain["notes"], plain["age"]) == (SSN, NOTES, 44)
    assert isinstance(row._mapping["ssn"], EncryptedValue), "the row itself is not changed"

    with tenant_context("globex"), pytest.raises(TenantMismatchError) as info:
        env.cmk.decrypt_row(PATIENTS, row._mapping)
    assert info.value.row_tenant == "acme"
    with pytest.raises(NoTenantError):
        env.cmk.decrypt_row(PATIENTS, row._mapping)


def test_decrypt_row_without_companion_column_fails_typed(env: Env, row_id: int) -> None:
    with env.engine.connect() as conn:
        row = conn.execute(select(PATIENTS.c.id, PATIENTS.c.ssn)).one()
    with tenant_context("acme"), pytest.raises(DecryptionError):
        env.cmk.decrypt_row(PATIENTS, row._mapping)


# -- SQL echo --------------------------------------------------------------------------------


@pytest.fixture(params=[True, "debug"], ids=["echo", "echo-debug"])
def echo_engine(request: pytest.FixtureRequest, engine: Engine) -> Iterator[Engine]:
    """A second engine on the same database and schema, created with echo on."""
    connect_args = {}
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            schema = conn.execute(text("select current_schema()")).scalar_one()
        connect_args = {"options": f"-csearch_path={schema}"}
    eng = create_engine(engine.url, echo=request.param, connect_args=connect_args)
    yield eng
    eng.dispose()


def test_echo_logs_never_contain_plaintext(
    echo_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sqlalchemy.engine")
    env = make_env(echo_engine)
    secrets = [SSN, "SECRET-DIAGNOSIS-lupus", "SECRET-MED-x", "SECRET-BULK-SSN", "SECRET-UPD"]
    with tenant_context("acme"), env.Session() as s:
        p = Patient(tenant_id="acme", ssn=SSN, notes=NOTES, age=44)
        s.add(p)
        s.commit()
        s.execute(insert(Patient), [{"tenant_id": "acme", "ssn": "SECRET-BULK-SSN"}])
        p.notes = {"diagnosis": "SECRET-DIAGNOSIS-lupus", "v": 2}
        s.commit()
        loaded = s.scalars(select(Patient).order_by(Patient.id)).all()
        assert [x.ssn for x in loaded] == [SSN, "SECRET-BULK-SSN"]
        with pytest.raises(PlaintextWriteError):
            s.execute(update(Patient).values(ssn="SECRET-UPD"))
        s.rollback()
        assert s.scalar(select(func.count()).select_from(Patient)) == 2
    engine_records = [r for r in caplog.records if r.name.startswith("sqlalchemy.engine")]
    assert any("INSERT INTO patients" in r.getMessage() for r in engine_records), (
        "echo did not log: the test would pass vacuously"
    )
    if echo_engine.echo == "debug":
        assert any(r.levelno == logging.DEBUG for r in engine_records)
    for record in engine_records:
        assert_absent(record.getMessage(), secrets)
        assert_absent(record.getMessage(), env.kms.data_keys)
