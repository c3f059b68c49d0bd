"""Migrations that cannot lose data (issue 8), on SQLite and PostgreSQL.

What a user would check after each operation: the raw rows (nothing overwritten, nothing
stranded), that the application reads every row back, and the error it gets when something is
refused: its type, what it names, and that no plaintext travels with it.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import sys
import threading
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import (
    JSON,
    CheckConstraint,
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    insert,
    inspect,
    make_url,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import migrations_helpers
from migrations_helpers import backfill
from sqlalchemy_cmk import (
    CMK,
    ConfigurationError,
    DecryptionError,
    EDEKType,
    EncryptedMixin,
    EncryptedType,
    KMSUnavailableError,
    tenant_context,
)
from sqlalchemy_cmk._format import parse_envelope
from sqlalchemy_cmk.cli import main
from sqlalchemy_cmk.testing import FakeKeyProvider

from .test_alembic_ops import DIALECTS, make_config

TENANTS = ("acme", "globex")


@pytest.fixture(params=DIALECTS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """For the Alembic tests: a SQLite file, a PostgreSQL schema or a MariaDB database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/app.db"
        migrations_helpers.configure(None)
        return
    if request.param == "mariadb":  # a database of its own (MySQL's schemas are databases)
        yield request.getfixturevalue("mariadb_url")
        migrations_helpers.configure(None)
        return
    base = request.getfixturevalue("postgres_url")
    schema = f"it_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    yield url.render_as_string(hide_password=False)
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()
    migrations_helpers.configure(None)


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


def test_rotate_racing_forget_tenant_leaves_every_row_readable(engine: Engine) -> None:
    provider = ThrottledWrap()
    cmk = make_cmk(provider, write_key_max_uses=4, retry_backoff=0.01)
    rows = seed_docs(engine, cmk, 120)
    stop = threading.Event()

    def forget() -> None:
        while not stop.is_set():
            cmk.forget_tenant()
            read_docs(engine, cmk)

    threads = [threading.Thread(target=forget) for _ in range(2)]
    for th in threads:
        th.start()
    try:
        report = backfill.rotate_data_keys(engine, cmk, "it_docs", tenant_column="tenant_id")
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert report.rows == sum(1 for r in rows.values() if r[1] is not None or r[2] is not None)
    assert read_docs(engine, make_cmk(provider)) == rows  # a fresh process reads every row


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


# -- 1. every operation on both storages -------------------------------------------------------


def test_binary_storage_status_verify_rotate_from_the_database(engine: Engine) -> None:
    provider = FakeKeyProvider()
    cmk = make_cmk(provider)
    rows = seed_docs(engine, cmk, 40)
    st = backfill.status(engine, "it_docs", ["a", "b"])
    assert st.counts["a"] == {
        "plaintext": 0,
        "encrypted": sum(1 for r in rows.values() if r[1] is not None),
        "null": sum(1 for r in rows.values() if r[1] is None),
    }
    clean = backfill.verify(engine, cmk, "it_docs", ["a", "b"], tenant_column="tenant_id")
    assert clean.ok and clean.checked == sum(1 for r in rows.values() if r[1] or r[2])
    found = backfill.verify(engine, cmk, "it_docs", tenant_column="tenant_id")  # every column
    assert found.columns == ("a", "b") and found.ok

    before = raw_docs(engine)
    report = backfill.rotate_data_keys(engine, cmk, "it_docs", tenant_column="tenant_id")
    assert report.columns == ("a", "b")  # found in the database: both share the companion
    after = raw_docs(engine)
    assert report.rows == sum(1 for r in before.values() if r[2] is not None)
    for i, r in after.items():
        if before[i][2] is not None:
            assert r[2][1:17] != before[i][2][1:17]  # a new row id
            assert all(v is None or v != before[i][k] for k, v in enumerate(r[:2]))
    assert read_docs(engine, cmk) == rows

    # A flipped bit in a binary value is a failure of that row only.
    victim = next(i for i, r in after.items() if r[0] is not None)
    flipped = bytearray(after[victim][0])
    flipped[-1] ^= 1
    docs = Table("it_docs", MetaData(), Column("id", Integer), Column("a", LargeBinary))
    with engine.begin() as conn:
        conn.execute(docs.update().where(docs.c.id == victim).values(a=bytes(flipped)))
    bad = backfill.verify(engine, cmk, "it_docs", ["a", "b"], tenant_column="tenant_id")
    assert [f[0] for f in bad.failures] == [str(victim)]
    assert bad.failures[0][2] == "DecryptionError"


# -- 2. no column stranded, nothing unreadable committed ---------------------------------------

notes_md = MetaData()
notes = Table(  # before the migration: two plaintext text columns
    "it_notes",
    notes_md,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("tenant_id", String(20)),
    Column("name", Text),
    Column("note", Text),
    Column("cmk_edek", LargeBinary),
)


def seed_notes(engine: Engine, n: int) -> dict[int, tuple[Any, ...]]:
    notes_md.create_all(engine)
    rows = [
        {"id": i, "tenant_id": TENANTS[i % 2], "name": f"name {i}", "note": f"note {i} ✓"}
        for i in range(n)
    ]
    with engine.begin() as conn:
        conn.execute(insert(notes), rows)
    return raw_notes(engine)


def raw_notes(engine: Engine) -> dict[int, tuple[Any, ...]]:
    with engine.connect() as conn:
        return {
            r[0]: (r[1], r[2], r[3], None if r[4] is None else bytes(r[4]))
            for r in conn.execute(select(notes).order_by(notes.c.id))
        }


@pytest.mark.parametrize("storage", ["text", "binary"])
def test_rotate_refuses_a_column_set_that_strands_another(engine: Engine, storage: str) -> None:
    cmk = make_cmk(FakeKeyProvider())
    if storage == "text":
        seed_notes(engine, 20)
        table, cols = "it_notes", ("name", "note")
        backfill.encrypt_columns(engine, cmk, table, list(cols), tenant_column="tenant_id")
        snapshot = raw_notes
    else:
        seed_docs(engine, cmk, 20)
        table, cols = "it_docs", ("a", "b")
        snapshot = raw_docs
    before = snapshot(engine)
    for models in (None, Base.metadata if storage == "binary" else None):
        with pytest.raises(backfill.IncompleteColumnsError) as info:
            backfill.rotate_data_keys(
                engine, cmk, table, [cols[0]], tenant_column="tenant_id", metadata=models
            )
        assert info.value.missing == (cols[1],)
        assert repr(cols[1]) in str(info.value) and isinstance(info.value, ConfigurationError)
    assert snapshot(engine) == before  # nothing written
    report = backfill.rotate_data_keys(engine, cmk, table, list(cols), tenant_column="tenant_id")
    assert report.rows == sum(1 for r in before.values() if r[-1] is not None)
    assert backfill.verify(engine, cmk, table, list(cols), tenant_column="tenant_id").ok


@pytest.mark.parametrize("verify_write_keys", [True, False])
def test_encrypt_with_a_wrap_answering_garbage_loses_nothing(
    engine: Engine, verify_write_keys: bool
) -> None:
    before = seed_notes(engine, 30)
    provider = GarbageWrap()
    provider.broken = True
    kw = {} if verify_write_keys else {"verify_write_keys": False}
    cmk = make_cmk(provider, **kw)
    with pytest.raises(DecryptionError):
        backfill.encrypt_columns(
            engine, cmk, "it_notes", ["name", "note"], tenant_column="tenant_id", batch_size=7
        )
    assert raw_notes(engine) == before  # every plaintext still there
    provider.broken = False
    report = backfill.encrypt_columns(
        engine, make_cmk(provider), "it_notes", ["name", "note"], tenant_column="tenant_id"
    )
    assert report.rows == 30


def test_rotate_with_a_wrap_answering_garbage_commits_nothing(engine: Engine) -> None:
    provider = GarbageWrap()
    cmk = make_cmk(provider, verify_write_keys=False)
    rows = seed_docs(engine, cmk, 25)
    before = raw_docs(engine)
    provider.broken = True
    with pytest.raises(backfill.UnreadableWriteError):
        backfill.rotate_data_keys(engine, cmk, "it_docs", tenant_column="tenant_id")
    assert raw_docs(engine) == before
    provider.broken = False
    assert read_docs(engine, make_cmk(provider)) == rows


# -- 5. database errors carry no row values ---------------------------------------------------

SECRET = "SSN-123-45-6789"


class RefBase(DeclarativeBase):
    pass


class Ref(EncryptedMixin, RefBase):
    """The application's model of ``it_refs``: ``ref`` in text storage."""

    __tablename__ = "it_refs"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(String(20))
    ref: Mapped[str | None] = mapped_column(EncryptedType(Text, storage="text"))


def refs_table(constraint: str) -> Table:
    """``it_refs`` as the database has it: with a CHECK that refuses a plaintext SSN, or a
    unique index on ``ref`` (neither can be declared on the encrypted model)."""
    md = MetaData()
    extra: list[Any] = []
    if constraint == "check":
        extra.append(
            CheckConstraint(
                "substr(ref, 1, 4) = 'cmk:' OR substr(ref, 1, 4) <> 'SSN-'", name="ck_ref_plain"
            )
        )
    table = Table(
        "it_refs",
        md,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("tenant_id", String(20)),
        Column("ref", Text),
        Column("cmk_edek", LargeBinary),
        *extra,
    )
    if constraint == "unique":
        Index("ix_ref_unique", table.c.ref, unique=True)
    return table


def seed_refs(engine: Engine, cmk: CMK, constraint: str) -> None:
    refs_table(constraint).metadata.create_all(engine)
    maker = sessionmaker(engine)
    cmk.install(maker)
    with tenant_context("acme"), maker.begin() as s:  # two rows with the same plaintext
        s.add_all([Ref(id=i, tenant_id="acme", ref=SECRET) for i in (1, 2)])


def assert_scrubbed(exc: BaseException) -> None:
    """No plaintext anywhere a log, a traceback or a caller could find it."""
    seen: list[str] = ["".join(traceback.format_exception(exc)), str(exc), repr(exc)]
    chained: BaseException | None = exc
    while chained is not None:
        seen += [str(chained), repr(chained), repr(vars(chained))]
        chained = chained.__cause__ or chained.__context__
    for text_ in seen:
        assert SECRET not in text_ and "123-45" not in text_
    assert exc.__cause__ is None and exc.__context__ is None


@pytest.mark.parametrize("constraint", ["check", "unique"])
def test_decrypt_refused_by_the_database_names_the_row_never_the_value(
    engine: Engine, constraint: str
) -> None:
    cmk = make_cmk(FakeKeyProvider())
    seed_refs(engine, cmk, constraint)
    before = backfill.status(engine, "it_refs", ["ref"])
    with pytest.raises(backfill.MigrationDatabaseError) as info:
        backfill.decrypt_columns(engine, cmk, "it_refs", ["ref"], tenant_column="tenant_id")
    err = info.value
    assert_scrubbed(err)
    assert err.table == "it_refs" and err.column == "ref" and err.operation == "decrypt"
    if constraint == "check":
        assert err.pk == "1"  # the first row the database refuses on its own
        assert err.constraint == "ck_ref_plain"
    else:  # each row alone is fine: the two collide
        assert err.pk is None and "from 1 to 2" in str(err)
    if engine.dialect.name == "postgresql":
        assert err.sqlstate == ("23514" if constraint == "check" else "23505")
        assert err.error_class == ("CheckViolation" if constraint == "check" else "UniqueViolation")
    assert backfill.status(engine, "it_refs", ["ref"]) == before  # nothing written


R1_REFS = '''
"""create it_refs: a CHECK refuses a plaintext SSN"""
import sqlalchemy as sa
from alembic import op

revision = "r1"
down_revision = None


def upgrade():
    op.create_table(
        "it_refs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("tenant_id", sa.String(20)),
        sa.Column("ref", sa.Text),
        sa.CheckConstraint(
            "substr(ref, 1, 4) = 'cmk:' OR substr(ref, 1, 4) <> 'SSN-'", name="ck_ref_plain"
        ),
    )


def downgrade():
    op.drop_table("it_refs")
'''

R2_REFS = '''
"""encrypt it_refs.ref"""
from alembic import op

revision = "r2"
down_revision = "r1"


def upgrade():
    op.encrypt_column("it_refs", "ref", tenant_column="tenant_id")


def downgrade():
    op.decrypt_column("it_refs", "ref", tenant_column="tenant_id")
'''


def test_alembic_downgrade_refused_by_a_check_carries_no_plaintext(
    tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    cmk = make_cmk(FakeKeyProvider())
    cfg = make_config(tmp_path, db_url, {"r1": R1_REFS, "r2": R2_REFS}, cmk=cmk)
    engine = create_engine(db_url)  # the user's engine: parameters not hidden
    try:
        command.upgrade(cfg, "head")
        maker = sessionmaker(engine)
        cmk.install(maker)
        with tenant_context("acme"), maker.begin() as s:
            s.add(Ref(id=1, tenant_id="acme", ref=SECRET))
        caplog.set_level(logging.DEBUG)
        with pytest.raises(backfill.MigrationDatabaseError) as info:
            command.downgrade(cfg, "r1")
        assert_scrubbed(info.value)
        assert info.value.pk == "1" and info.value.constraint == "ck_ref_plain"
        assert SECRET not in caplog.text
        with engine.connect() as conn:
            assert conn.execute(select(refs_table("check").c.ref)).scalar_one().startswith("cmk:")
    finally:
        engine.dispose()


# -- 6. a column under a unique index is never encrypted --------------------------------------


def test_encrypt_refuses_a_column_under_a_unique_index(engine: Engine) -> None:
    cmk = make_cmk(FakeKeyProvider())
    md = MetaData()
    table = Table(
        "it_codes",
        md,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("tenant_id", String(20)),
        Column("code", Text, unique=True),  # a unique constraint
        Column("ref", Text),
        Column("cmk_edek", LargeBinary),
    )
    Index("ix_codes_ref", table.c.ref, unique=True)  # a unique index
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), [{"id": 1, "tenant_id": "acme", "code": "c", "ref": "r"}])
    for column in ("code", "ref"):
        with pytest.raises(backfill.UniqueColumnError) as info:
            backfill.encrypt_columns(engine, cmk, "it_codes", [column], tenant_column="tenant_id")
        assert info.value.column == column and isinstance(info.value, ConfigurationError)
        assert "enforce nothing" in str(info.value)
    assert info.value.index == "ix_codes_ref"
    with engine.connect() as conn:
        assert conn.execute(select(table.c.code, table.c.ref)).one() == ("c", "r")


R1_CODES = '''
"""create it_codes with a unique index on ref"""
import sqlalchemy as sa
from alembic import op

revision = "r1"
down_revision = None


def upgrade():
    op.create_table(
        "it_codes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.String(20)),
        sa.Column("ref", sa.Text),
    )
    op.create_index("ix_codes_ref", "it_codes", ["ref"], unique=True)
    op.execute("INSERT INTO it_codes (id, tenant_id, ref) VALUES (1, 'acme', 'r1')")


def downgrade():
    op.drop_table("it_codes")
'''

R2_CODES = '''
"""encrypt it_codes.ref"""
from alembic import op

revision = "r2"
down_revision = "r1"


def upgrade():
    op.encrypt_column("it_codes", "ref", tenant_column="tenant_id")


def downgrade():
    op.decrypt_column("it_codes", "ref", tenant_column="tenant_id")
'''


def test_op_encrypt_column_refuses_a_unique_index_before_any_change(
    tmp_path: Path, db_url: str
) -> None:
    cmk = make_cmk(FakeKeyProvider())
    cfg = make_config(tmp_path, db_url, {"r1": R1_CODES, "r2": R2_CODES}, cmk=cmk)
    command.upgrade(cfg, "r1")
    with pytest.raises(backfill.UniqueColumnError, match="ix_codes_ref"):
        command.upgrade(cfg, "r2")
    engine = create_engine(db_url)
    try:
        assert "cmk_edek" not in {c["name"] for c in inspect(engine).get_columns("it_codes")}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT ref FROM it_codes")).scalar_one() == "r1"
    finally:
        engine.dispose()


def test_decrypt_binary_storage_into_plaintext_columns(engine: Engine) -> None:
    cmk = make_cmk(FakeKeyProvider())
    rows = seed_docs(engine, cmk, 30)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE it_docs ADD COLUMN a_plain TEXT"))
        conn.execute(text("ALTER TABLE it_docs ADD COLUMN b_plain TEXT"))
    with pytest.raises(ConfigurationError, match="into="):
        backfill.decrypt_columns(engine, cmk, "it_docs", ["a", "b"], tenant_column="tenant_id")
    companions = {i: r[2] for i, r in raw_docs(engine).items()}
    report = backfill.decrypt_columns(
        engine,
        cmk,
        "it_docs",
        ["a", "b"],
        tenant_column="tenant_id",
        into={"a": "a_plain", "b": "b_plain"},
        batch_size=7,
    )
    assert report.rows == sum(1 for r in rows.values() if r[1] is not None or r[2] is not None)
    with engine.connect() as conn:
        got = {
            r[0]: (r[1], r[2], r[3], r[4])
            for r in conn.execute(text("SELECT id, a, b, a_plain, b_plain FROM it_docs"))
        }
    assert got == {i: (None, None, a, b) for i, (_, a, b) in rows.items()}
    assert {i: r[2] for i, r in raw_docs(engine).items()} == companions  # left in place
    again = backfill.decrypt_columns(
        engine,
        cmk,
        "it_docs",
        ["a", "b"],
        tenant_column="tenant_id",
        into={"a": "a_plain", "b": "b_plain"},
    )
    assert again.rows == 0


class TypedBase(DeclarativeBase):
    pass


class Event(EncryptedMixin, TypedBase):
    """Binary storage of other types: moved between keys without being decoded."""

    __tablename__ = "it_events"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(String(20))
    doc: Mapped[dict[str, Any] | None] = mapped_column(EncryptedType(JSON))
    at: Mapped[datetime.datetime | None] = mapped_column(EncryptedType(DateTime(timezone=True)))
    blob: Mapped[bytes | None] = mapped_column(EncryptedType(LargeBinary))


def test_rotate_and_verify_any_column_type_in_binary_storage(engine: Engine) -> None:
    cmk = make_cmk(FakeKeyProvider())
    TypedBase.metadata.create_all(engine)
    when = datetime.datetime(2026, 12, 2, 15, 4, 5, 123456, tzinfo=datetime.UTC)
    rows = {
        i: ({"n": i, "ü": [1.5, None, "x"]}, when + datetime.timedelta(days=i), bytes([i]) * i)
        for i in range(12)
    }
    maker = sessionmaker(engine)
    cmk.install(maker)
    with tenant_context("acme"), maker.begin() as s:
        s.add_all(
            Event(id=i, tenant_id="acme", doc=d, at=a, blob=b) for i, (d, a, b) in rows.items()
        )
    report = backfill.rotate_data_keys(engine, cmk, "it_events", tenant_column="tenant_id")
    assert report.columns == ("doc", "at", "blob") and report.rows == 12
    with tenant_context("acme"), maker() as s:
        got = {e.id: (e.doc, e.at, e.blob) for e in s.scalars(select(Event))}
    assert got == rows
    assert backfill.verify(
        engine, cmk, "it_events", metadata=TypedBase, tenant_column="tenant_id"
    ).ok

    # A model that says another type: the values decrypt, but the application could not load them.
    wrong = MetaData()
    Table(
        "it_events",
        wrong,
        Column("id", Integer, primary_key=True),
        Column("tenant_id", String(20)),
        Column("doc", EncryptedType(Text)),
        Column("cmk_edek", EDEKType()),
    )
    bad = backfill.verify(
        engine, cmk, "it_events", ["doc"], metadata=wrong, tenant_column="tenant_id"
    )
    assert bad.failed == {"acme": 12} and {f[2] for f in bad.failures} == {"ConfigurationError"}


def test_decrypt_column_command_refused_by_a_check_prints_no_plaintext(
    engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = f"it_app_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "import os\n"
        "from sqlalchemy_cmk import CMK\n"
        "from sqlalchemy_cmk.providers.local import LocalKeyProvider\n"
        f"cmk = CMK(LocalKeyProvider({{'acme': {os.urandom(32)!r}}}),\n"
        "          tenant_keys={'acme': 'local://acme'}, audit_sinks=[])\n"
    )
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    app = importlib.import_module(name)
    try:
        seed_refs(engine, app.cmk, "check")
        url = engine.url
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                schema = conn.execute(text("select current_schema()")).scalar_one()
            url = url.update_query_dict({"options": f"-csearch_path={schema}"})
        argv = ["decrypt-column", "--table", "it_refs", "--column", "ref"]
        argv += ["--tenant-column", "tenant_id", "--cmk", f"{name}:cmk", "--app-dir", str(tmp_path)]
        argv += ["--database-url", url.render_as_string(hide_password=False), "--no-progress"]
        capsys.readouterr()
        code = main(argv)
        out, err = capsys.readouterr()
    finally:
        sys.modules.pop(name, None)
    assert code == 1
    assert SECRET not in out + err and "123-45" not in out + err
    assert "MigrationDatabaseError" in err and "ck_ref_plain" in err
