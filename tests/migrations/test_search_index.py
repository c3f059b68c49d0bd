"""Building and rotating blind indexes online (migrations_helpers.search_index), on every dialect.

What a user would check: rows written before a column became searchable are found once the
index is built (and searches refuse before); a build killed mid-walk finishes on a rerun; a
whole rotation (twice, and to another width) under a concurrent writer and reader never makes
a search miss a row or find a wrong one, a unique index refuses a duplicate in every phase, and
verify_index finds nothing wrong at the end.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import threading
import time
import types
import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, String, create_engine, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from migrations_helpers import search_index
from migrations_helpers.backfill import Progress
from sqlalchemy_cmk import (
    CMK,
    ConfigurationError,
    EncryptedMixin,
    EncryptedType,
    tenant_column,
    tenant_context,
)
from sqlalchemy_cmk.cli import main
from sqlalchemy_cmk.errors import IndexNotReadyError
from sqlalchemy_cmk.search import BlindIndex, last_digits, search_tables
from sqlalchemy_cmk.testing import FakeKeyProvider, MemoryAuditSink

TABLE = "sr_people"
TENANTS = ("acme", "globex")
TENANT_KEYS = {t: f"fake://{t}" for t in TENANTS}


class PlainBase(DeclarativeBase):
    pass


class PlainPerson(EncryptedMixin, PlainBase):
    """The model before the columns became searchable: no search=, no slot columns mapped."""

    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = tenant_column(String(40))
    email: Mapped[str | None] = mapped_column(EncryptedType(String(255)), nullable=True)
    ssn: Mapped[str | None] = mapped_column(EncryptedType(String(20)), nullable=True)


class Base(DeclarativeBase):
    pass


class Person(EncryptedMixin, Base):
    """The same table, searchable: an exact unique index, a truncated one, a derived one."""

    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = tenant_column(String(40))
    email: Mapped[str | None] = mapped_column(
        EncryptedType(String(255), search=BlindIndex(normalize="email", unique=True)),
        nullable=True,
    )
    ssn: Mapped[str | None] = mapped_column(
        EncryptedType(
            String(20),
            search=[
                BlindIndex(bits=16),
                BlindIndex(name="ssn_last4", transform=last_digits(4), bits=8),
            ],
        ),
        nullable=True,
    )


search_tables(Base.metadata)


def make_cmk(ttl: float = 0.2, sink: MemoryAuditSink | None = None) -> CMK:
    return CMK(
        FakeKeyProvider(),
        tenant_keys=TENANT_KEYS,
        search_state_ttl=ttl,
        audit_sinks=[sink] if sink is not None else [],
    )


def setup(engine: Engine, cmk: CMK) -> tuple[Any, Any]:
    Base.metadata.create_all(engine)
    plain = sessionmaker(engine)
    cmk.install(plain)
    searching = sessionmaker(engine)
    cmk.install(searching)
    return plain, searching


def seed(plain: Any, n: int) -> dict[str, list[tuple[int, str, str | None]]]:
    """Rows written by the model without search=: (id, email, ssn) by tenant."""
    out: dict[str, list[tuple[int, str, str | None]]] = {}
    for tenant in TENANTS:
        with tenant_context(tenant), plain.begin() as s:
            rows = []
            for i in range(n):
                p = PlainPerson(
                    email=f"User{i}@{tenant}.example",
                    ssn=None if i % 5 == 0 else f"{i:03d}-45-{i:04d}",
                )
                s.add(p)
                rows.append(p)
            s.flush()
            out[tenant] = [(p.id, p.email or "", p.ssn) for p in rows]
    return out


def find(searching: Any, tenant: str, *where: Any) -> list[int]:
    with tenant_context(tenant), searching() as s:
        return sorted(p.id for p in s.scalars(select(Person).where(*where)))


def test_build_finds_rows_written_before_the_column_was_searchable(engine: Engine) -> None:
    sink = MemoryAuditSink()
    cmk = make_cmk(sink=sink)
    plain, searching = setup(engine, cmk)
    rows = seed(plain, 12)
    with pytest.raises(IndexNotReadyError):
        find(searching, "acme", Person.email == "user1@acme.example")
    status = {s.domain: s for s in search_index.index_status(engine, Base.metadata)}
    assert status[f"{TABLE}.email_bidx"].phase == "building"
    assert status[f"{TABLE}.email_bidx"].tables[TABLE] == {"done": 0, "pending": 24}

    for index in ("email_bidx", "ssn_bidx", "ssn_last4"):
        report = search_index.build_index(
            engine, cmk, Base.metadata, f"{TABLE}.{index}", batch_size=5
        )  # waits 2 * search_state_ttl: this process's searches saw "building" a moment ago
        assert report.phase == "ready"
        assert report.waited > 0
        assert report.steps == ["(none) -> building", "building -> ready"]
    assert report.rows > 0
    # The walk decrypted rows under each tenant's own key, audited per tenant.
    assert {e.tenant for e in sink.events if e.operation == "decrypt"} >= set(TENANTS)

    for tenant, people in rows.items():
        for pk, email, ssn in people:
            assert find(searching, tenant, Person.email == email.upper()) == [pk]
            if ssn is not None:
                assert pk in find(searching, tenant, Person.ssn == ssn)
                assert pk in find(searching, tenant, Person.ssn.blind("ssn_last4") == ssn[-4:])
        # Another tenant's value is not found.
        other = next(t for t in TENANTS if t != tenant)
        assert find(searching, other, Person.email == people[1][1]) == []
    for index in ("email_bidx", "ssn_bidx", "ssn_last4"):
        check = search_index.verify_index(engine, cmk, Base.metadata, f"{TABLE}.{index}")
        assert check.clean, check
        assert check.checked == 24
    status = {s.domain: s for s in search_index.index_status(engine, Base.metadata)}
    assert status[f"{TABLE}.email_bidx"].tables[TABLE] == {"done": 24, "pending": 0}

    # A finished build only verifies.
    again = search_index.build_index(engine, cmk, Base.metadata, f"{TABLE}.email_bidx")
    assert again.rows == 0 and again.steps == []
    assert again.verify is not None and again.verify.clean


def test_killed_build_finishes_on_rerun(engine: Engine) -> None:
    cmk = make_cmk()
    plain, searching = setup(engine, cmk)
    rows = seed(plain, 15)

    def boom(p: Progress) -> None:
        if p.done >= 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search_index.build_index(
            engine, cmk, Base.metadata, f"{TABLE}.email_bidx", batch_size=5, progress=boom, settle=0
        )
    (status,) = search_index.index_status(engine, Base.metadata, f"{TABLE}.email_bidx")
    assert status.phase == "building"
    assert status.tables[TABLE]["done"] == 10
    with pytest.raises(IndexNotReadyError):
        find(searching, "acme", Person.email == "user1@acme.example")

    report = search_index.build_index(
        engine, cmk, Base.metadata, f"{TABLE}.email_bidx", batch_size=5, settle=0
    )
    assert report.phase == "ready" and report.rows == 20
    assert report.steps == ["building -> ready"]
    cmk._search.forget()
    for tenant, people in rows.items():
        for pk, email, _ in people:
            assert find(searching, tenant, Person.email == email) == [pk]


def test_rotation_refused_before_build_and_resumes(engine: Engine) -> None:
    cmk = make_cmk()
    plain, searching = setup(engine, cmk)
    seed(plain, 4)
    with pytest.raises(ConfigurationError, match="search build"):
        search_index.rotate_index(engine, cmk, Base.metadata, f"{TABLE}.email_bidx", settle=0)
    with pytest.raises(ConfigurationError, match="no blind index"):
        search_index.build_index(engine, cmk, Base.metadata, f"{TABLE}.nope", settle=0)
    search_index.build_index(engine, cmk, Base.metadata, f"{TABLE}.email_bidx", settle=0)
    with pytest.raises(ConfigurationError, match="exact"):
        search_index.rotate_index(engine, cmk, Base.metadata, f"{TABLE}.email_bidx", bits=64)

    # Killed while filling the new slot: the state says rotating, a rerun finishes it.
    def boom(p: Progress) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search_index.rotate_index(
            engine, cmk, Base.metadata, f"{TABLE}.email_bidx", batch_size=2, progress=boom, settle=0
        )
    (status,) = search_index.index_status(engine, Base.metadata, f"{TABLE}.email_bidx")
    assert (status.phase, status.slot, status.version, status.other_version) == (
        "rotating",
        0,
        1,
        2,
    )
    report = search_index.rotate_index(engine, cmk, Base.metadata, f"{TABLE}.email_bidx", settle=0)
    assert report.steps == ["rotating -> switched", "switched -> ready"]
    assert (report.phase, report.version) == ("ready", 2)
    (status,) = search_index.index_status(engine, Base.metadata, f"{TABLE}.email_bidx")
    assert (status.slot, status.version, status.bits) == (1, 2, 128)
    assert search_index.verify_index(engine, cmk, Base.metadata, f"{TABLE}.email_bidx").clean
    cmk._search.forget()
    assert len(find(searching, "acme", Person.email == "user3@acme.example")) == 1


def _retrying(fn: Any) -> Any:
    """SQLite: a writer may find the database locked by the walk; retry it."""
    for attempt in range(50):
        try:
            return fn()
        except OperationalError as exc:
            if "locked" not in str(exc) or attempt == 49:
                raise
            time.sleep(0.02)
    return None  # pragma: no cover


def test_concurrent_writer_and_reader_across_whole_rotations(engine: Engine) -> None:
    cmk = make_cmk(ttl=0.2)
    plain, searching = setup(engine, cmk)
    seeded = seed(plain, 10)
    index = f"{TABLE}.email_bidx"
    search_index.build_index(engine, cmk, Base.metadata, index, settle=0.5)

    stable: list[tuple[str, int, str]] = [
        (t, pk, email) for t, people in seeded.items() for pk, email, _ in people[:6]
    ]
    mutable: dict[int, tuple[str, str]] = {
        pk: (t, email) for t, people in seeded.items() for pk, email, _ in people[6:]
    }
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[str] = []
    counts = {"reads": 0, "inserts": 0, "updates": 0, "duplicates": 0}
    phases: set[str] = set()

    def reader() -> None:
        rnd = random.Random(1)
        while not stop.is_set():
            with lock:
                tenant, pk, email = rnd.choice(stable)
            try:
                got = _retrying(lambda t=tenant, e=email: find(searching, t, Person.email == e))
            except Exception as exc:  # reported below, with its type only
                errors.append(f"reader: {type(exc).__name__}: {exc}")
                return
            if got != [pk]:
                errors.append(f"reader: {email!r} of {tenant} found {got}, expected [{pk}]")
                return
            counts["reads"] += 1

    def writer() -> None:
        rnd = random.Random(2)
        n = 0
        while not stop.is_set():
            n += 1
            tenant = rnd.choice(TENANTS)
            try:
                if n % 3 == 0:
                    email = f"new{n}@{tenant}.example"

                    def insert(email: str = email, tenant: str = tenant) -> int:
                        with tenant_context(tenant), searching.begin() as s:
                            p = Person(email=email, ssn=None)
                            s.add(p)
                            s.flush()
                            return p.id

                    pk = _retrying(insert)
                    with lock:
                        stable.append((tenant, pk, email))
                    counts["inserts"] += 1
                elif n % 3 == 1:
                    pk = rnd.choice(sorted(mutable))
                    owner, _ = mutable[pk]
                    email = f"moved{n}@{owner}.example"

                    def change(pk: int = pk, owner: str = owner, email: str = email) -> None:
                        with tenant_context(owner), searching.begin() as s:
                            p = s.get(Person, pk)
                            assert p is not None
                            p.email = email

                    _retrying(change)
                    mutable[pk] = (owner, email)
                    counts["updates"] += 1
                else:
                    with lock:
                        t2, _, existing = rnd.choice([r for r in stable if r[0] == tenant])

                    def duplicate(t2: str = t2, existing: str = existing) -> None:
                        with tenant_context(t2), searching.begin() as s:
                            s.add(Person(email=" " + existing.upper()))

                    try:
                        _retrying(duplicate)
                    except IntegrityError:
                        counts["duplicates"] += 1
                    else:
                        errors.append(f"writer: a duplicate was accepted in {sorted(phases)}")
                        return
            except Exception as exc:
                errors.append(f"writer: {type(exc).__name__}: {exc}")
                return
            time.sleep(0.005)

    def watch() -> None:
        while not stop.is_set():
            (st,) = search_index.index_status(engine, Base.metadata, index)
            phases.add(st.phase)
            time.sleep(0.05)

    threads = [threading.Thread(target=f) for f in (reader, writer, watch)]
    for t in threads:
        t.start()
    try:
        first = search_index.rotate_index(
            engine, cmk, Base.metadata, index, batch_size=7, settle=0.5
        )
        second = search_index.rotate_index(
            engine, cmk, Base.metadata, index, bits=160, batch_size=7, settle=0.5
        )
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    assert first.steps == ["ready -> rotating", "rotating -> switched", "switched -> ready"]
    assert (second.version, second.bits, second.phase) == (3, 160, "ready")
    assert phases >= {"rotating", "switched", "ready"}
    assert counts["reads"] > 20 and counts["inserts"] > 3 and counts["updates"] > 3
    assert counts["duplicates"] > 3
    check = search_index.verify_index(engine, cmk, Base.metadata, index)
    assert check.clean, check
    cmk._search.forget()
    for pk, (tenant, email) in mutable.items():
        assert find(searching, tenant, Person.email == email) == [pk]
    for tenant, pk, email in stable:
        assert find(searching, tenant, Person.email == email) == [pk]


# -- the CLI and the Alembic operations ----------------------------------------------------------


def _database_url(engine: Engine) -> str:
    url = engine.url
    if url.get_backend_name() == "postgresql":
        with engine.connect() as conn:
            schema = conn.execute(text("select current_schema()")).scalar_one()
        url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def _connect_args(engine: Engine) -> dict[str, Any]:
    """conftest's per-test PostgreSQL schema, for another engine on the same database."""
    if engine.url.get_backend_name() != "postgresql":
        return {}
    with engine.connect() as conn:
        schema = conn.execute(text("select current_schema()")).scalar_one()
    return {"options": f"-csearch_path={schema}"}


@pytest.fixture
def app_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    """An application module (its CMK and models) that --cmk and --metadata import."""
    module = types.ModuleType(f"sr_app_{uuid.uuid4().hex[:8]}")
    module.cmk = make_cmk(ttl=0.05)  # type: ignore[attr-defined]
    module.Base = Base  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def test_cli_build_status_verify_rotate(
    engine: Engine, app_module: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    cmk = app_module.cmk
    plain, searching = setup(engine, cmk)
    rows = seed(plain, 6)
    name = app_module.__name__
    base = ["--database-url", _database_url(engine), "--metadata", f"{name}:Base"]
    keys = ["--cmk", f"{name}:cmk"]
    index = ["--index", f"{TABLE}.email_bidx"]

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = run("search", "status", *base, "--json")
    assert code == 0
    doc = {d["domain"]: d for d in json.loads(out)}
    assert doc[f"{TABLE}.email_bidx"]["phase"] == "building"
    assert doc[f"{TABLE}.email_bidx"]["tables"][TABLE] == {"done": 0, "pending": 12}

    code, out, err = run("search", "build", *base, *keys, *index, "--no-progress")
    assert code == 0, err
    assert "building -> ready" in out and "12 row(s)" in out
    code, out, _ = run("search", "verify", *base, *keys, *index, "--json")
    assert code == 0 and json.loads(out)["ok"] and json.loads(out)["checked"] == 12
    code, out, err = run("search", "rotate", *base, *keys, *index, "--no-progress", "--json")
    assert code == 0, err
    assert json.loads(out)["steps"][-1] == "switched -> ready"
    code, out, _ = run("search", "status", *base, *index)
    assert code == 0 and "ready" in out and "slot 1 v2/128b" in out
    cmk._search.forget()
    tenant, people = next(iter(rows.items()))
    assert find(searching, tenant, Person.email == people[2][1]) == [people[2][0]]

    # A stored value tampered with: verify names the row, never the value; exit 1.
    with engine.begin() as conn:
        conn.execute(
            text(f"UPDATE {TABLE} SET email_bidx_alt = email_bidx WHERE id = :id"),
            {"id": people[0][0]},
        )
    code, out, err = run("search", "verify", *base, *keys, *index)
    assert code == 1
    assert f"MISMATCH {TABLE} row {people[0][0]}" in out and "verify failed" in err
    assert people[0][1] not in out + err
    # The repair: a full build of a ready index rewrites the row, and verifies clean.
    repaired = search_index.build_index(
        engine, cmk, Base.metadata, f"{TABLE}.email_bidx", full=True, settle=0
    )
    assert repaired.rows == 1 and repaired.phase == "ready"
    assert repaired.verify is not None and repaired.verify.clean

    # Usage errors: exit 2, nothing done.
    code, _, err = run("search", "build", *base, *keys, "--index", f"{TABLE}.nope")
    assert code == 2 and "no such blind index" in err
    code, _, err = run("search", "rotate", *base, *keys, *index, "--bits", "64")
    assert code == 1 and "exact" in err


def test_alembic_build_and_rotate_operations(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext

    import migrations_helpers
    from migrations_helpers import alembic_ops

    cmk = make_cmk(ttl=0.05)
    plain, searching = setup(engine, cmk)
    rows = seed(plain, 5)
    migrations_helpers.register()
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"target_metadata": Base.metadata, "transaction_per_migration": True}
        )
        op = Operations(ctx)
        with caplog.at_level(logging.INFO, logger=alembic_ops.log.name), ctx.begin_transaction():
            built = op.build_blind_index(f"{TABLE}.ssn_bidx", cmk=cmk, batch_size=3)
            rotated = op.rotate_blind_index(f"{TABLE}.ssn_bidx", bits=12, cmk=cmk)
    assert built.steps[-1] == "building -> ready" and built.rows == 8
    assert (rotated.phase, rotated.version, rotated.bits) == ("ready", 2, 12)
    assert "build_index sr_people.ssn_bidx" in caplog.text
    cmk._search.forget()
    for tenant, people in rows.items():
        for pk, _, ssn in people:
            if ssn is not None:
                assert pk in find(searching, tenant, Person.ssn == ssn)
    # Reverses do nothing, and render as runnable source.
    undo = alembic_ops.RotateBlindIndexOp(f"{TABLE}.ssn_bidx", bits=12).reverse()
    assert isinstance(undo, alembic_ops.NothingToUndoOp)
    from alembic.autogenerate.api import AutogenContext
    from alembic.autogenerate.render import render_op_text

    autogen = AutogenContext(
        MigrationContext.configure(
            dialect_name="postgresql",
            opts={"sqlalchemy_module_prefix": "sa.", "alembic_module_prefix": "op."},
        )
    )
    assert (
        render_op_text(
            autogen, alembic_ops.RotateBlindIndexOp("users.email_bidx", bits=160, settle=12.0)
        )
        == "op.rotate_blind_index('users.email_bidx', bits=160, settle=12.0)"
    )
    assert (
        render_op_text(autogen, alembic_ops.BuildBlindIndexOp("users.email_bidx", cmk="app:cmk"))
        == "op.build_blind_index('users.email_bidx', cmk='app:cmk')"
    )
    # Offline (--sql) mode refuses.
    offline = MigrationContext.configure(
        dialect_name="sqlite", opts={"as_sql": True, "target_metadata": Base.metadata}
    )
    with pytest.raises(ConfigurationError, match="offline"):
        Operations(offline).build_blind_index(f"{TABLE}.ssn_bidx", cmk=cmk)


def test_two_workers_share_a_build(engine: Engine) -> None:
    """Two builds at once (as two worker processes would run): each row is written once,
    the state moves once, and every row is found."""
    cmk = make_cmk(ttl=0.05)
    plain, searching = setup(engine, cmk)
    rows = seed(plain, 40)
    reports: list[Any] = []
    errors: list[BaseException] = []

    def work() -> None:
        own = create_engine(engine.url, connect_args=_connect_args(engine))
        try:
            reports.append(
                search_index.build_index(
                    own, cmk, Base.metadata, f"{TABLE}.email_bidx", batch_size=4, settle=0.1
                )
            )
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    written = sum(r.rows for r in reports)
    if engine.dialect.name == "sqlite":
        # No row locks: both may compute a row; the loser's compare-and-swap fails, and the
        # row, holding the very value it computed, counts for both.
        assert written >= 80
    else:
        assert written == 80  # SKIP LOCKED: each row claimed by one worker
    assert sum(len(r.steps) for r in reports) == 2  # created once, made ready once
    assert {r.phase for r in reports} == {"ready"}
    cmk._search.forget()
    for tenant, people in rows.items():
        for pk, email, _ in people:
            assert find(searching, tenant, Person.email == email) == [pk]
