"""Values go in as Python objects and come back as the same objects, through every ORM load path,
while the database holds only versioned ciphertext and a companion without key material."""

from __future__ import annotations

import datetime
import json
import struct
from typing import Any

import pytest
from sqlalchemy import Double, Engine, Float, select
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    defer,
    joinedload,
    load_only,
    mapped_column,
    selectinload,
)

from sqlalchemy_cmk import (
    EncryptedMixin,
    EncryptedType,
    tenant_context,
)

from .models import (
    ALL_TYPES_VALUES,
    FALSY_VALUES,
    AllTypes,
    Env,
    Owner,
    Patient,
    Pet,
    assert_absent,
    make_env,
)

ENCRYPTED_COLUMNS = list(ALL_TYPES_VALUES)


@pytest.fixture
def env(engine: Engine) -> Env:
    return make_env(engine)


def assert_same(actual: Any, expected: Any) -> None:
    """Equal and of exactly the same type (a Decimal is not a float, a bool is not an int)."""
    assert actual == expected
    assert type(actual) is type(expected)
    if isinstance(expected, datetime.datetime | datetime.time):
        assert actual.utcoffset() == expected.utcoffset()


def add(env: Env, obj: Any) -> int:
    with env.Session() as s:
        s.add(obj)
        s.commit()
        return int(obj.id)


# -- every supported type --------------------------------------------------------------------


@pytest.mark.parametrize("values", [ALL_TYPES_VALUES, FALSY_VALUES], ids=["typical", "falsy"])
def test_every_type_round_trips_with_its_python_type(env: Env, values: dict[str, Any]) -> None:
    with tenant_context("acme"):
        row_id = add(env, AllTypes(**values))
        with env.Session() as s:
            obj = s.get(AllTypes, row_id)
            assert obj is not None
            for col, expected in values.items():
                assert_same(getattr(obj, col), expected)
        # The same through a query, in a session that has not seen the object.
        with env.Session() as s:
            obj = s.scalars(select(AllTypes)).one()
            for col, expected in values.items():
                assert_same(getattr(obj, col), expected)
    for col in values:
        stored = env.raw_bytes("all_types", col, row_id)
        assert stored is not None, f"{col}: a falsy value must not be stored as NULL"
        assert stored[0] == 0x01


# MySQL's BLOB and TEXT stop at 65,535 bytes: values past it must come back whole.
PAST_64K = 70_000


def test_values_past_64_kib_round_trip_exactly(env: Env) -> None:
    values = {
        "txt": "é" * (PAST_64K // 2 - 100) + "x" * 200,  # past 64 KiB in UTF-8 only
        "blob": bytes(range(256)) * (PAST_64K // 256 + 1),
        "doc": {"items": ["y" * 100 for _ in range(PAST_64K // 100)]},
        "s": "\U0001f510" * 200,  # String(200): 200 four-byte characters, 800 bytes
    }
    with tenant_context("acme"):
        row_id = add(env, AllTypes(**values))
        env.cmk.forget_tenant()
        with env.Session() as s:
            obj = s.get(AllTypes, row_id)
            assert obj is not None
            for col, expected in values.items():
                assert getattr(obj, col) == expected, col
    for col in ("txt", "blob", "doc"):
        stored = env.raw_bytes("all_types", col, row_id)
        assert stored is not None and len(stored) > 65_535, col


def test_timezone_offset_is_kept_not_normalized(env: Env) -> None:
    minus = datetime.timezone(datetime.timedelta(hours=-3, minutes=-30))
    value = datetime.datetime(2001, 1, 1, 23, 0, tzinfo=minus)
    with tenant_context("acme"):
        row_id = add(env, AllTypes(aware=value, naive=value.replace(tzinfo=None)))
        with env.Session() as s:
            obj = s.get(AllTypes, row_id)
            assert obj is not None
            assert obj.aware.utcoffset() == datetime.timedelta(hours=-3, minutes=-30)
            assert obj.aware.hour == 23
            assert obj.naive.tzinfo is None
            assert obj.naive == datetime.datetime(2001, 1, 1, 23, 0)


def test_null_stays_sql_null_and_needs_no_key(env: Env) -> None:
    with tenant_context("acme"):
        row_id = add(env, AllTypes())
        with env.Session() as s:
            obj = s.get(AllTypes, row_id)
            assert obj is not None
            assert all(getattr(obj, c) is None for c in ENCRYPTED_COLUMNS)
    q = env.engine.dialect.identifier_preparer.quote  # "blob" is a MySQL keyword
    columns = ", ".join(q(c) for c in [*ENCRYPTED_COLUMNS, "cmk_edek"])
    (row,) = env.raw(f"select {columns} from all_types")
    assert all(v is None for v in row)
    assert env.kms.wrap_count == 0
    # IS NULL works on an encrypted column.
    with env.engine.connect() as conn:
        found = conn.execute(select(AllTypes.id).where(AllTypes.s.is_(None))).scalars().all()
    assert found == [row_id]  # IS NULL works on an encrypted column


def test_some_null_some_set(env: Env) -> None:
    with tenant_context("acme"):
        row_id = add(env, Patient(tenant_id="acme", ssn="111-22-3333", notes=None, age=None))
        with env.Session() as s:
            p = s.get(Patient, row_id)
            assert p is not None
            assert (p.ssn, p.notes, p.age) == ("111-22-3333", None, None)
    (row,) = env.raw("select ssn, notes, age, cmk_edek from patients")
    assert row.ssn is not None and row.cmk_edek is not None
    assert row.notes is None and row.age is None
    with env.engine.connect() as conn:
        ids = conn.execute(select(Patient.id).where(Patient.notes.is_(None))).scalars().all()
    assert ids == [row_id]


# -- load paths ------------------------------------------------------------------------------


def test_values_survive_every_reload_path(env: Env) -> None:
    notes = {"allergies": ["penicillin"], "nested": {"level": 2}}
    with tenant_context("acme"), env.Session() as s:
        p = Patient(tenant_id="acme", ssn="078-05-1120", notes=notes, age=41)
        s.add(p)
        s.commit()  # expire_on_commit: the next access reloads
        assert (p.ssn, p.notes, p.age) == ("078-05-1120", notes, 41)

        s.expire(p)
        assert p.ssn == "078-05-1120"

        s.expire(p, ["notes"])
        assert p.notes == notes
        assert p.age == 41

        s.refresh(p)
        assert (p.ssn, p.notes, p.age) == ("078-05-1120", notes, 41)

        s.refresh(p, ["age"])
        assert p.age == 41

        assert s.get(Patient, p.id) is p
        assert s.get(Patient, p.id, populate_existing=True).ssn == "078-05-1120"  # type: ignore[union-attr]

        again = s.scalars(select(Patient).execution_options(populate_existing=True)).one()
        assert again is p
        assert (p.ssn, p.notes, p.age) == ("078-05-1120", notes, 41)

        # yield_per streams: each instance is decrypted as it arrives.
        streamed = list(s.scalars(select(Patient).execution_options(yield_per=1)))
        assert [x.ssn for x in streamed] == ["078-05-1120"]

    with tenant_context("acme"), env.Session() as s:
        fresh = s.get(Patient, p.id)
        assert fresh is not None
        assert (fresh.ssn, fresh.notes, fresh.age) == ("078-05-1120", notes, 41)


def test_deferred_encrypted_column_decrypts_on_access(env: Env) -> None:
    with tenant_context("acme"):
        row_id = add(env, Patient(tenant_id="acme", ssn="deferred-ssn", age=3))
        with env.Session() as s:
            p = s.scalars(select(Patient).options(defer(Patient.ssn))).one()
            assert "ssn" not in p.__dict__
            assert p.age == 3
            assert p.ssn == "deferred-ssn"
            assert p.id == row_id


def test_load_only_of_an_encrypted_column(env: Env) -> None:
    with tenant_context("acme"):
        add(env, Patient(tenant_id="acme", ssn="load-only-ssn", age=3))
        with env.Session() as s:
            p = s.scalars(select(Patient).options(load_only(Patient.ssn))).one()
            assert p.ssn == "load-only-ssn"
            assert p.age == 3


def test_load_only_fetches_the_companions_of_many_rows(env: Env) -> None:
    with tenant_context("acme"):
        for i in range(5):
            add(env, Patient(tenant_id="acme", ssn=f"lo-{i}", age=i))
        with env.Session() as s:
            rows = s.scalars(select(Patient).options(load_only(Patient.ssn))).all()
            assert sorted((p.ssn, p.age) for p in rows) == [(f"lo-{i}", i) for i in range(5)]


def test_many_rows_in_one_query(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        s.add_all([Patient(tenant_id="acme", ssn=f"ssn-{i}", age=i) for i in range(50)])
        s.commit()
    with tenant_context("acme"), env.Session() as s:
        rows = s.scalars(select(Patient).order_by(Patient.id)).all()
        assert [(p.ssn, p.age) for p in rows] == [(f"ssn-{i}", i) for i in range(50)]


def _owner_with_pets(env: Env) -> int:
    with tenant_context("acme"), env.Session() as s:
        owner = Owner(
            name="Ada Lovelace",
            pets=[Pet(species="cat", chip="CHIP-0001"), Pet(species="dog", chip="CHIP-0002")],
        )
        s.add(owner)
        s.commit()
        return owner.id


def test_relationship_lazy_loads_decrypt(env: Env) -> None:
    owner_id = _owner_with_pets(env)
    with tenant_context("acme"), env.Session() as s:
        owner = s.get(Owner, owner_id)
        assert owner is not None
        assert owner.name == "Ada Lovelace"
        assert [p.chip for p in owner.pets] == ["CHIP-0001", "CHIP-0002"]
    with tenant_context("acme"), env.Session() as s:
        pet = s.scalars(select(Pet).where(Pet.species == "dog")).one()
        assert pet.chip == "CHIP-0002"
        assert pet.owner.name == "Ada Lovelace"  # many-to-one lazy load


@pytest.mark.parametrize("loader", [selectinload, joinedload])
def test_eager_loads_of_related_encrypted_model_decrypt(env: Env, loader: Any) -> None:
    owner_id = _owner_with_pets(env)
    with tenant_context("acme"), env.Session() as s:
        owner = s.scalars(select(Owner).options(loader(Owner.pets))).unique().one()
        assert owner.id == owner_id
        assert "pets" in owner.__dict__  # loaded eagerly, not lazily on access
        assert owner.name == "Ada Lovelace"
        assert [(p.species, p.chip) for p in owner.pets] == [
            ("cat", "CHIP-0001"),
            ("dog", "CHIP-0002"),
        ]
    with tenant_context("acme"), env.Session() as s:
        pets = s.scalars(select(Pet).options(loader(Pet.owner)).order_by(Pet.id)).unique().all()
        assert [p.owner.name for p in pets] == ["Ada Lovelace", "Ada Lovelace"]
        assert [p.chip for p in pets] == ["CHIP-0001", "CHIP-0002"]


# -- updates ---------------------------------------------------------------------------------


def _raw_patient(env: Env, row_id: int) -> dict[str, bytes | None]:
    return {c: env.raw_bytes("patients", c, row_id) for c in ("ssn", "notes", "age", "cmk_edek")}


def test_update_one_column_keeps_others_and_does_not_reencrypt_them(env: Env) -> None:
    with tenant_context("acme"):
        row_id = add(env, Patient(tenant_id="acme", ssn="old-ssn", notes={"k": "v"}, age=30))
        before = _raw_patient(env, row_id)
        with env.Session() as s:
            p = s.get(Patient, row_id)
            assert p is not None
            p.ssn = "new-ssn"
            p.age = 30  # assigned but equal: not a change
            s.flush()
            assert p.ssn == "new-ssn"  # plaintext again in the object after the flush
            s.commit()
        after = _raw_patient(env, row_id)
        with env.Session() as s:
            p = s.get(Patient, row_id)
            assert p is not None
            assert (p.ssn, p.notes, p.age) == ("new-ssn", {"k": "v"}, 30)
    assert after["ssn"] != before["ssn"]
    assert after["notes"] == before["notes"]
    assert after["age"] == before["age"]
    assert after["cmk_edek"] == before["cmk_edek"]  # same row id and key: old values still open


def test_commit_without_changes_rewrites_nothing(env: Env) -> None:
    with tenant_context("acme"):
        row_id = add(env, Patient(tenant_id="acme", ssn="same", notes=[1, 2], age=5))
        before = _raw_patient(env, row_id)
        with env.Session() as s:
            p = s.get(Patient, row_id)
            assert p is not None
            assert p.ssn == "same"
            p.ssn = "same"
            s.commit()
    assert _raw_patient(env, row_id) == before


def test_setting_value_on_row_without_companion(env: Env) -> None:
    with tenant_context("acme"):
        row_id = add(env, Patient(tenant_id="acme"))
        assert _raw_patient(env, row_id)["cmk_edek"] is None
        with env.Session() as s:
            p = s.get(Patient, row_id)
            assert p is not None
            p.age = 77
            s.commit()
        with env.Session() as s:
            p = s.get(Patient, row_id)
            assert p is not None
            assert (p.ssn, p.age) == (None, 77)
    assert _raw_patient(env, row_id)["cmk_edek"] is not None


def test_update_after_commit_without_reload(env: Env) -> None:
    """The object is expired by the commit; changing it must still reuse the row's key."""
    with tenant_context("acme"), env.Session() as s:
        p = Patient(tenant_id="acme", ssn="a", age=1)
        s.add(p)
        s.commit()
        p.age = 2  # no attribute read in between: cmk_edek is expired
        s.commit()
        row_id = p.id
    with tenant_context("acme"), env.Session() as s:
        fresh = s.get(Patient, row_id)
        assert fresh is not None
        assert (fresh.ssn, fresh.age) == ("a", 2)


def test_update_to_none_stores_null(env: Env) -> None:
    with tenant_context("acme"):
        row_id = add(env, Patient(tenant_id="acme", ssn="x", age=9))
        with env.Session() as s:
            p = s.get(Patient, row_id)
            assert p is not None
            p.ssn = None
            s.commit()
        with env.Session() as s:
            p = s.get(Patient, row_id)
            assert p is not None
            assert (p.ssn, p.age) == (None, 9)
    assert env.raw_bytes("patients", "ssn", row_id) is None


# -- what the database holds -----------------------------------------------------------------


def _plaintexts(value: Any) -> list[str | bytes]:
    if isinstance(value, str | bytes):
        return [value]
    if isinstance(value, dict):
        return [json.dumps(value), json.dumps(value, separators=(",", ":"), ensure_ascii=False)]
    if isinstance(value, datetime.date | datetime.time):
        return [value.isoformat()]
    if hasattr(value, "bytes"):  # UUID
        return [str(value), value.hex, value.bytes]
    return [str(value)]


def test_raw_values_are_versioned_ciphertext(env: Env) -> None:
    with tenant_context("acme"):
        row_id = add(env, AllTypes(**ALL_TYPES_VALUES))
    for col, value in ALL_TYPES_VALUES.items():
        stored = env.raw_bytes("all_types", col, row_id)
        assert stored is not None
        assert stored[0] == 0x01, col
        assert len(stored) >= 1 + 12 + 1 + 16
        assert_absent(stored, _plaintexts(value))
        assert_absent(stored, env.kms.data_keys)
    assert env.kms.data_keys, "the recording provider saw no data key"


def test_raw_column_is_binary(env: Env) -> None:
    with tenant_context("acme"):
        add(env, Patient(tenant_id="acme", ssn="123-45-6789"))
    if env.engine.dialect.name == "postgresql":
        (row,) = env.raw("select pg_typeof(ssn)::text, pg_typeof(cmk_edek)::text from patients")
        assert tuple(row) == ("bytea", "bytea")
    elif env.engine.dialect.name == "mysql":
        # BLOB would stop at 64 KiB: the unbounded String gets LONGBLOB, the companion (at most
        # about 11 KiB) BLOB.
        rows = env.raw(
            "select column_name, data_type from information_schema.columns "
            "where table_schema = database() and table_name = 'patients'"
        )
        types = {name.lower(): kind.lower() for name, kind in rows}
        kinds = (types["ssn"], types["notes"], types["age"])
        assert kinds == ("longblob", "longblob", "mediumblob")
        assert types["cmk_edek"] == "blob"
    else:
        (row,) = env.raw("select typeof(ssn), typeof(cmk_edek) from patients")
        assert tuple(row) == ("blob", "blob")


def test_same_plaintext_gives_different_ciphertexts(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        s.add_all([Patient(tenant_id="acme", ssn="same-ssn") for _ in range(3)])
        s.commit()
    stored = [bytes(r.ssn) for r in env.raw("select ssn from patients")]
    assert len(set(stored)) == 3


def test_companion_holds_tenant_and_key_ref_but_no_key_material(env: Env) -> None:
    secret = "987-65-4321-secret"
    with tenant_context("acme"), env.Session() as s:
        s.add_all([Patient(tenant_id="acme", ssn=secret, age=i) for i in range(3)])
        s.commit()
    companions = [bytes(r.cmk_edek) for r in env.raw("select cmk_edek from patients order by id")]
    assert env.kms.wrap_count == 1
    (wrapped,) = env.kms.wrapped_keys
    for comp in companions:
        assert comp[0] == 0x01
        # Layout of version 1: version | row id (16) | u16 len | tenant | u8 len | scheme |
        # u16 len | key ref | u16 len | wrapped key.
        pos = 17
        (n,) = struct.unpack_from(">H", comp, pos)
        assert comp[pos + 2 : pos + 2 + n] == b"acme"
        pos += 2 + n
        assert comp[pos + 1 : pos + 1 + comp[pos]] == b"fake"
        pos += 1 + comp[pos]
        (n,) = struct.unpack_from(">H", comp, pos)
        assert comp[pos + 2 : pos + 2 + n] == b"fake://acme"
        pos += 2 + n
        (n,) = struct.unpack_from(">H", comp, pos)
        assert comp[pos + 2 :] == wrapped and n == len(wrapped)
        assert_absent(comp, [*env.kms.data_keys, secret])
    # One wrapped key for the flush, but a row id of its own for every row.
    assert len({c[17:] for c in companions}) == 1
    assert len({c[1:17] for c in companions}) == 3


def test_falsy_values_do_not_leak_as_null_or_plain(env: Env) -> None:
    with tenant_context("acme"):
        row_id = add(env, AllTypes(**FALSY_VALUES))
    for col in FALSY_VALUES:
        stored = env.raw_bytes("all_types", col, row_id)
        assert stored is not None and stored[0] == 0x01
        assert stored not in (b"", b"0", b"\x00", b"false", b"[]")


def test_float_round_trips(engine: Engine) -> None:
    class FloatBase(DeclarativeBase):
        pass

    class Measurement(EncryptedMixin, FloatBase):
        __tablename__ = "measurements"
        id: Mapped[int] = mapped_column(primary_key=True)
        flt: Mapped[float | None] = mapped_column(EncryptedType(Float))
        dbl: Mapped[float | None] = mapped_column(EncryptedType(Double))

    FloatBase.metadata.create_all(engine)
    env = make_env(engine)
    with tenant_context("acme"):
        with env.Session() as s:
            s.add_all([Measurement(id=1, flt=0.1 + 0.2, dbl=-1e300), Measurement(id=2, flt=0.0)])
            s.commit()
        with env.Session() as s:
            one, two = s.scalars(select(Measurement).order_by(Measurement.id)).all()
            assert_same(one.flt, 0.1 + 0.2)
            assert_same(one.dbl, -1e300)
            assert_same(two.flt, 0.0)
    (row,) = env.raw("select flt from measurements where id = 2")
    assert bytes(row.flt)[0] == 0x01
