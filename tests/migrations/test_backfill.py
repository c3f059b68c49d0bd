"""The backfill engine (migrations_helpers.backfill) on SQLite and PostgreSQL.

What a user would check: the stored text after a run (marker, no plaintext), that the
application's model reads every row back, that decrypt restores the exact text, that concurrent
application writes survive, that a SIGKILLed worker's job finishes on a rerun with every row
encrypted exactly once, that two workers split the work, and the KMS call counts of a rewrap.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
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
    create_engine,
    event,
    insert,
    select,
    text,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from migrations_helpers import backfill
from migrations_helpers.backfill import Progress
from sqlalchemy_cmk import (
    CMK,
    ConfigurationError,
    DecryptionError,
    EncryptedMixin,
    EncryptedType,
    TenantMismatchError,
    TenantNotConfiguredError,
    tenant_context,
)
from sqlalchemy_cmk._format import parse_envelope, split_leased
from sqlalchemy_cmk.providers.local import LocalKeyProvider
from sqlalchemy_cmk.testing import FakeKeyProvider, MemoryAuditSink

TABLE = "bf_people"
TENANTS = ("acme", "globex", "initech")
COLS = ["name", "note"]
HERE = Path(__file__).parent
ROOT = HERE.parent.parent

metadata = MetaData()
people = Table(  # the table as it is before the migration: plain text columns
    TABLE,
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("tenant_id", String(20)),
    Column("name", Text),
    Column("note", Text),
    Column("cmk_edek", LargeBinary),
)


class Base(DeclarativeBase):
    pass


class Person(EncryptedMixin, Base):
    """The application's model during the migration: dual-read mode."""

    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(String(20))
    name: Mapped[str | None] = mapped_column(
        EncryptedType(Text, storage="text", allow_plaintext=True)
    )
    note: Mapped[str | None] = mapped_column(
        EncryptedType(Text, storage="text", allow_plaintext=True)
    )


SAMPLES: list[str | None] = [
    "Ada Lovelace",
    "Zoë Ünïcødé 😀 — ∑ 漢字",
    "",
    "long " * 2000,
    None,
    "CMK:upper-case marker is plaintext",
    "line\nbreak\t'single' \"double\" \\ back",
]


def original(i: int) -> tuple[str, str | None, str | None]:
    """Tenant, name, note of row ``i``: unicode, empty, long, NULL, marker look-alikes."""
    name = SAMPLES[i % len(SAMPLES)]
    note = SAMPLES[(i * 3 + 1) % len(SAMPLES)]
    if name:
        name = f"{name} #{i}"
    if i % 11 == 0:
        note = None
    return TENANTS[i % len(TENANTS)], name, note


def seed(engine: Engine, n: int, start: int = 0) -> dict[int, tuple[str, str | None, str | None]]:
    metadata.create_all(engine)
    rows = {i: original(i) for i in range(start, start + n)}
    with engine.begin() as conn:
        conn.execute(
            insert(people),
            [{"id": i, "tenant_id": t, "name": nm, "note": nt} for i, (t, nm, nt) in rows.items()],
        )
    return rows


def raw(engine: Engine) -> dict[int, tuple[Any, ...]]:
    with engine.connect() as conn:
        return {
            r[0]: (r[1], r[2], r[3], None if r[4] is None else bytes(r[4]))
            for r in conn.execute(select(people).order_by(people.c.id))
        }


def read_app(engine: Engine, cmk: CMK) -> dict[int, tuple[str, str | None, str | None]]:
    """What the application sees: every row through the ORM, tenant by tenant."""
    maker = sessionmaker(engine)
    cmk.install(maker)
    out = {}
    for t in TENANTS:
        with tenant_context(t), maker() as s:
            for p in s.scalars(select(Person).where(Person.tenant_id == t)):
                out[p.id] = (p.tenant_id, p.name, p.note)
    return out


def expected_done(rows: dict[int, tuple[str, str | None, str | None]]) -> int:
    return sum(1 for _, nm, nt in rows.values() if nm is not None or nt is not None)


def make_cmk(provider: Any, **kw: Any) -> CMK:
    kw.setdefault("tenant_keys", {t: f"{provider.scheme}://{t}" for t in TENANTS})
    return CMK(provider, audit_sinks=[], **kw)


@pytest.fixture
def provider() -> FakeKeyProvider:
    return FakeKeyProvider()


@pytest.fixture
def cmk(provider: FakeKeyProvider) -> CMK:
    return make_cmk(provider)


def encrypt(engine: Engine, cmk: CMK, **kw: Any) -> backfill.Report:
    return backfill.encrypt_columns(engine, cmk, TABLE, COLS, tenant_column="tenant_id", **kw)


def decrypt(engine: Engine, cmk: CMK, **kw: Any) -> backfill.Report:
    return backfill.decrypt_columns(engine, cmk, TABLE, COLS, tenant_column="tenant_id", **kw)


def plaintext_rows(engine: Engine) -> int:
    return sum(
        1
        for _, nm, nt, _ in raw(engine).values()
        if any(v is not None and not v.startswith("cmk:") for v in (nm, nt))
    )


# -- encrypt / decrypt ------------------------------------------------------------------------


def test_encrypt_in_place_reads_back_and_second_run_does_nothing(engine: Engine, cmk: CMK) -> None:
    rows = seed(engine, 90)
    seen: list[Progress] = []
    report = encrypt(engine, cmk, batch_size=20, progress=seen.append)
    assert report.rows == expected_done(rows)
    assert report.conflicts == 0
    assert sum(report.by_tenant.values()) == report.rows and set(report.by_tenant) == set(TENANTS)
    assert report.batches == 5 and report.passes >= 2
    assert seen and seen[-1].done == report.rows and seen[0].total == report.rows

    stored = raw(engine)
    for i, (t, name, note) in rows.items():
        s_t, s_name, s_note, edek = stored[i]
        assert s_t == t
        for plain, cipher in ((name, s_name), (note, s_note)):
            if plain is None:
                assert cipher is None  # NULL stays NULL
            else:
                assert cipher is not None and cipher.startswith("cmk:")
                if len(plain) >= 4:
                    assert plain not in cipher and plain[:12] not in cipher
        assert (edek is None) == (name is None and note is None)
        if edek is not None:
            assert parse_envelope(edek[17:]).tenant == t  # sealed under its own tenant
    assert read_app(engine, cmk) == rows

    again = encrypt(engine, cmk, batch_size=20)
    assert (again.rows, again.batches, again.conflicts) == (0, 0, 0)
    assert raw(engine) == stored
    st = backfill.status(engine, TABLE, COLS)
    assert st.counts["name"]["plaintext"] == st.counts["note"]["plaintext"] == 0
    assert st.counts["name"]["null"] == sum(1 for r in rows.values() if r[1] is None)
    assert st.counts["note"]["encrypted"] == sum(1 for r in rows.values() if r[2] is not None)


def test_decrypt_restores_every_value_byte_for_byte(engine: Engine, cmk: CMK) -> None:
    rows = seed(engine, 50)
    before = raw(engine)
    encrypt(engine, cmk, batch_size=16)
    edeks = {i: r[3] for i, r in raw(engine).items()}
    report = decrypt(engine, cmk, batch_size=16)
    assert report.rows == expected_done(rows)
    after = raw(engine)
    assert {i: r[:3] for i, r in after.items()} == {i: r[:3] for i, r in before.items()}
    assert {i: r[3] for i, r in after.items()} == edeks  # the companion is left in place
    assert decrypt(engine, cmk).rows == 0
    # Encrypting again reuses the companions left in place.
    encrypt(engine, cmk)
    assert {i: r[3] for i, r in raw(engine).items()} == edeks
    assert read_app(engine, cmk) == rows


def test_a_second_column_is_sealed_with_the_rows_existing_companion(
    engine: Engine, cmk: CMK
) -> None:
    rows = seed(engine, 30)
    backfill.encrypt_columns(engine, cmk, TABLE, ["name"], tenant_column="tenant_id")
    first = raw(engine)
    assert all(r[2] is None or not r[2].startswith("cmk:") for r in first.values())
    report = backfill.encrypt_columns(engine, cmk, TABLE, ["note"], tenant_column="tenant_id")
    assert report.rows == sum(1 for r in rows.values() if r[2] is not None)
    second = raw(engine)
    for i, r in second.items():
        if first[i][3] is not None:
            assert r[3] == first[i][3]  # same row id and data key: the name stays valid
    assert read_app(engine, cmk) == rows


def test_unknown_tenant_raises_and_writes_nothing_of_the_batch(engine: Engine, cmk: CMK) -> None:
    seed(engine, 12)
    with engine.begin() as conn:
        conn.execute(insert(people), [{"id": 100, "tenant_id": "umbrella", "name": "Alice"}])
    before = raw(engine)
    with pytest.raises(TenantNotConfiguredError) as info:
        encrypt(engine, cmk, batch_size=100)
    assert info.value.tenant == "umbrella"
    assert raw(engine) == before


# -- online: application writes during the backfill ------------------------------------------


def test_application_writes_between_batches_are_kept(engine: Engine, cmk: CMK) -> None:
    expected = seed(engine, 60)
    maker = sessionmaker(engine)
    cmk.install(maker)
    rng = random.Random(7)
    next_id = 1000
    calls = 0
    while True:
        report = encrypt(engine, cmk, batch_size=8, max_batches=1)
        calls += 1
        if report.batches == 0:
            break
        assert calls < 60
        # The application keeps working: updates rows done and not done, and inserts rows.
        for _ in range(3):
            i = rng.choice(sorted(expected))
            t, name, note = expected[i]
            with tenant_context(t), maker() as s:
                p = s.get(Person, i)
                assert p is not None and (p.name, p.note) == (name, note)
                p.name = f"app write {calls} {i} ✓"
                s.commit()
            expected[i] = (t, f"app write {calls} {i} ✓", note)
        t = TENANTS[calls % 3]
        with tenant_context(t), maker() as s:
            s.add(Person(id=next_id, tenant_id=t, name=f"new {next_id}", note=None))
            s.commit()
        expected[next_id] = (t, f"new {next_id}", None)
        next_id += 1
    assert plaintext_rows(engine) == 0
    assert read_app(engine, cmk) == expected


def test_compare_and_swap_keeps_a_write_made_inside_the_batch(engine: Engine, cmk: CMK) -> None:
    seed(engine, 10)
    app = create_engine(engine.url, connect_args=_connect_args(engine))
    maker = sessionmaker(app)
    cmk.install(maker)
    fired: list[object] = []

    def app_write() -> None:
        with tenant_context("globex"), maker() as s:
            p = s.get(Person, 4)
            assert p is not None
            p.name = "written while the batch was in flight"
            s.commit()

    def before_update(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if fired or not statement.lstrip().upper().startswith("UPDATE"):
            return
        fired.append(statement)
        if engine.dialect.name == "sqlite":
            app_write()  # SQLite: the SELECT took no lock; the write lands before our UPDATE
        else:
            # PostgreSQL, MariaDB: the batch's rows are claimed (FOR UPDATE), so the write
            # must wait.
            with app.connect() as c:
                if engine.dialect.name == "mysql":
                    c.execute(text("SET SESSION innodb_lock_wait_timeout = 1"))
                else:
                    c.execute(text("SET lock_timeout = '200ms'"))
                with pytest.raises(OperationalError, match=r"(?i)lock"):
                    c.execute(text(f"UPDATE {TABLE} SET name = 'x' WHERE id = 4"))

    event.listen(engine, "before_cursor_execute", before_update)
    try:
        report = encrypt(engine, cmk, batch_size=100)
    finally:
        event.remove(engine, "before_cursor_execute", before_update)
    assert fired
    if engine.dialect.name == "sqlite":
        # The row lost its compare-and-swap; a later pass sealed its other column (still
        # plaintext: the application wrote only the name) under the application's companion.
        assert report.conflicts == 1 and report.batches == 2
        assert report.rows == expected_done(raw_originals(10))
    else:
        assert report.conflicts == 0
        app_write()  # after the batch, the application's write simply wins
    with tenant_context("globex"), maker() as s:
        p = s.get(Person, 4)
        assert p is not None and p.name == "written while the batch was in flight"
    assert plaintext_rows(engine) == 0
    app.dispose()


@pytest.mark.parametrize("change", ["upper", "trailing space", "accent"])
def test_compare_and_swap_is_exact_whatever_the_collation(
    engine: Engine, cmk: CMK, change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plaintext write landing inside a batch (an instance not yet in dual-read mode) that
    changes only case, trailing spaces or accents must still win: under MariaDB's default
    collation (or a SQLite column's NOCASE, RTRIM) 'abc' = 'ABC' = 'abc ', and a compare-and-swap
    comparing that way would seal the old value over the new one. Walked without row locks
    (SQLite; MariaDB before 10.6)."""
    if engine.dialect.name == "postgresql":
        pytest.skip("PostgreSQL claims the batch's rows: the write waits (test above)")
    if engine.dialect.name == "mysql":  # as on a server without SKIP LOCKED
        from sqlalchemy_cmk._dialects.mysql import MYSQL

        monkeypatch.setattr(MYSQL, "skip_locked", lambda dialect: False)
    if engine.dialect.name == "sqlite":  # the column as a user may declare it: folding
        collation = {"upper": "NOCASE", "trailing space": "RTRIM", "accent": "BINARY"}[change]
        with engine.begin() as conn:
            conn.execute(
                text(
                    f"CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY, tenant_id VARCHAR(20), "
                    f"name TEXT COLLATE {collation}, note TEXT, cmk_edek BLOB)"
                )
            )
    else:
        metadata.create_all(engine)
    before = {"upper": "abc", "trailing space": "abc", "accent": "resume"}[change]
    after = {"upper": "ABC", "trailing space": "abc ", "accent": "résumé"}[change]
    with engine.begin() as conn:
        conn.execute(insert(people), [{"id": 1, "tenant_id": "acme", "name": before}])
    fired: list[object] = []

    def before_update(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if fired or not statement.lstrip().upper().startswith("UPDATE"):
            return
        fired.append(statement)
        with engine.connect() as other:  # another connection, committed before our UPDATE
            other.execute(people.update().where(people.c.id == 1).values(name=after))
            other.commit()

    event.listen(engine, "before_cursor_execute", before_update)
    try:
        report = encrypt(engine, cmk, batch_size=10)
    finally:
        event.remove(engine, "before_cursor_execute", before_update)
    assert fired and report.conflicts == 1
    assert read_app(engine, cmk) == {1: ("acme", after, None)}
    assert plaintext_rows(engine) == 0


def raw_originals(n: int) -> dict[int, tuple[str, str | None, str | None]]:
    return {i: original(i) for i in range(n)}


def _connect_args(engine: Engine) -> dict[str, str]:
    if engine.dialect.name != "postgresql":
        return {}
    return {"options": f"-csearch_path={_schema(engine)}"}


def _schema(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(text("SELECT current_schema()")).scalar_one())


def test_stale_session_writing_one_column_after_the_backfill(engine: Engine, cmk: CMK) -> None:
    """A session loads a plaintext row, the backfill encrypts both its columns, then the
    session changes one column: the session must seal under the companion the row has now
    (the backfill's), not the NULL it loaded, or the other column's ciphertext is stranded."""
    rows = seed(engine, 12)
    maker = sessionmaker(engine)
    cmk.install(maker)
    t, name, note = rows[2]  # initech, both columns set
    assert name is not None and note is not None
    with tenant_context(t), maker() as s:
        p = s.get(Person, 2)
        assert p is not None and p.cmk_edek is None
        encrypt(engine, cmk)  # meanwhile, in another process
        p.name = "changed by a session loaded before the backfill"
        s.commit()
    rows[2] = (t, "changed by a session loaded before the backfill", note)
    assert read_app(engine, cmk) == rows


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param("postgresql", marks=pytest.mark.postgresql),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
    indirect=True,
)  # SQLite: one worker
def test_concurrent_writer_thread_on_a_server(engine: Engine, provider: FakeKeyProvider) -> None:
    cmk = make_cmk(provider, write_key_max_uses=8)
    provider.latency = 0.002  # every batch wraps: the backfill and the writer overlap
    expected = seed(engine, 300)
    maker = sessionmaker(engine)
    cmk.install(maker)
    stop = threading.Event()
    errors: list[BaseException] = []
    writes = 0

    def writer() -> None:
        nonlocal writes
        rng = random.Random(3)
        try:
            while not stop.is_set():
                i = rng.randrange(300)
                t = expected[i][0]
                value = f"concurrent {writes} ✓"
                with tenant_context(t), maker() as s:
                    p = s.get(Person, i)
                    assert p is not None
                    p.name = value  # one column: the other keeps the backfill's ciphertext
                    s.commit()
                expected[i] = (t, value, expected[i][2])
                writes += 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        report = encrypt(engine, cmk, batch_size=10)
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert writes > 20, writes
    assert report.rows + report.conflicts > 0
    assert plaintext_rows(engine) == 0
    assert read_app(engine, cmk) == expected


# -- crashes and parallel workers -------------------------------------------------------------


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    return LocalKeyProvider.generate_key_file(tmp_path / "keys.json", TENANTS)


def _worker(engine: Engine, keyfile: Path, batch: int, latency: float, go: Path | None = None):  # type: ignore[no-untyped-def]
    url = engine.url.render_as_string(hide_password=False)
    schema = _schema(engine) if engine.dialect.name == "postgresql" else "-"
    args = [sys.executable, str(HERE / "_worker.py"), url, schema, str(keyfile), str(batch)]
    args.append(str(latency))
    if go is not None:
        args.append(str(go))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )


def _local_cmk(keyfile: Path) -> CMK:
    return make_cmk(LocalKeyProvider.from_file(keyfile))


def test_sigkill_mid_run_then_rerun_finishes_exactly_once(engine: Engine, keyfile: Path) -> None:
    rows = seed(engine, 200)
    proc = _worker(engine, keyfile, batch=5, latency=0.01)
    assert proc.stdout is not None
    batches = 0
    deadline = time.monotonic() + 30
    while batches < 6:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        batches += line.startswith("batch ")
        assert time.monotonic() < deadline
    time.sleep(0.013)  # land inside a batch's transaction (most of a batch is its KMS wraps)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    proc.stdout.close()
    proc.stderr.close()  # type: ignore[union-attr]

    left = plaintext_rows(engine)
    done = expected_done(rows) - left
    assert 30 <= done < expected_done(rows)  # killed mid-run, committed batches kept
    cmk = _local_cmk(keyfile)
    report = encrypt(engine, cmk, batch_size=7)
    assert report.rows == left  # no row encrypted twice, none skipped
    assert plaintext_rows(engine) == 0
    assert read_app(engine, cmk) == rows  # a double encryption would read back as "cmk:..."
    assert encrypt(engine, cmk).rows == 0


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param("postgresql", marks=pytest.mark.postgresql),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
    indirect=True,
)  # SQLite: one worker
def test_two_workers_share_the_job_on_a_server(
    engine: Engine, keyfile: Path, tmp_path: Path
) -> None:
    rows = seed(engine, 300)
    go = tmp_path / "go"
    procs = [_worker(engine, keyfile, batch=6, latency=0.004, go=go) for _ in range(2)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    go.touch()
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["rows"] for r in reports) == expected_done(rows)  # each row done once
    assert all(r["rows"] > 0 for r in reports), reports  # both did work
    assert plaintext_rows(engine) == 0
    cmk = _local_cmk(keyfile)
    assert read_app(engine, cmk) == rows
    assert encrypt(engine, cmk).rows == 0


def test_memory_is_bounded_by_the_batch_not_the_table(engine: Engine, cmk: CMK) -> None:
    metadata.create_all(engine)

    def peak(n: int, start: int) -> int:
        seed_rows = {i: original(i) for i in range(start, start + n)}
        with engine.begin() as conn:
            conn.execute(text(f"DELETE FROM {TABLE}"))
            conn.execute(
                insert(people),
                [
                    {"id": i, "tenant_id": t, "name": a, "note": b}
                    for i, (t, a, b) in seed_rows.items()
                ],
            )
        tracemalloc.start()
        try:
            report = encrypt(engine, cmk, batch_size=25)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            assert report.rows == expected_done(seed_rows)

    peak(30, 0)  # warm up: compiled statements, key caches
    small = peak(150, 10_000)
    big = peak(600, 20_000)
    assert big < small * 1.5, (small, big)


# -- verify, status, rewrap, rotate -----------------------------------------------------------


def test_verify_counts_by_tenant_and_catches_tampering(engine: Engine, cmk: CMK) -> None:
    rows = seed(engine, 60)
    encrypt(engine, cmk)
    clean = backfill.verify(engine, cmk, TABLE, COLS, tenant_column="tenant_id", batch_size=13)
    assert clean.ok and not clean.failed and not clean.plaintext
    assert clean.checked == expected_done(rows)
    assert sum(clean.encrypted_ok.values()) == expected_done(rows)
    assert set(clean.encrypted_ok) == set(TENANTS)

    stored = raw(engine)
    with engine.begin() as conn:
        # Row 1 (globex): copy in the name ciphertext of row 7 (globex too): fails to decrypt.
        conn.execute(people.update().where(people.c.id == 1).values(name=stored[7][1]))
        # Row 2 (initech): someone changed its tenant column to acme.
        conn.execute(people.update().where(people.c.id == 2).values(tenant_id="acme"))
        # Row 3 (acme): a bit flipped inside the ciphertext.
        blob = bytearray(base64.b64decode(stored[3][1][4:]))
        blob[20] ^= 1
        flipped = "cmk:" + base64.b64encode(bytes(blob)).decode()
        conn.execute(people.update().where(people.c.id == 3).values(name=flipped))
        # A plaintext row left (written by an old application version).
        conn.execute(insert(people), [{"id": 500, "tenant_id": "globex", "name": "late"}])
    report = backfill.verify(engine, cmk, TABLE, COLS, tenant_column="tenant_id", batch_size=13)
    assert not report.ok
    assert sorted(report.failures) == [
        ("1", "globex", "DecryptionError"),
        ("2", "acme", "TenantMismatchError"),
        ("3", "acme", "DecryptionError"),
    ]
    assert report.failed == {"globex": 1, "acme": 2}
    assert report.plaintext == {"globex": 1}
    assert sum(report.encrypted_ok.values()) == expected_done(rows) - 3
    assert report.checked == expected_done(rows) + 1
    sampled = backfill.verify(engine, cmk, TABLE, COLS, tenant_column="tenant_id", sample=0.3)
    assert 0 < sampled.checked < report.checked

    # decrypt stops at the first bad row, naming it, and writes nothing of its batch: tenants
    # are checked first (nothing is unwrapped for a refused batch), so row 2's, then values.
    before = raw(engine)
    with pytest.raises(TenantMismatchError, match="row 2 of 'bf_people'"):
        decrypt(engine, cmk, batch_size=100)
    assert raw(engine) == before
    with engine.begin() as conn:
        conn.execute(people.update().where(people.c.id == 2).values(tenant_id="initech"))
    before = raw(engine)
    with pytest.raises(DecryptionError, match="row 1 of 'bf_people'"):
        decrypt(engine, cmk, batch_size=100)
    assert raw(engine) == before


def test_a_refused_batch_is_audited_once(engine: Engine, provider: FakeKeyProvider) -> None:
    """Issue 12: a backfill batch is one access. decrypt_columns refused by a tampered value
    gives one ``decrypt`` event, ``tampered``, for the operator's cross-tenant context (no
    tenant: the row's tenant did not authenticate), and no ``ok`` for the refused batch."""
    audit = MemoryAuditSink()
    cmk = CMK(provider, tenant_keys={t: f"fake://{t}" for t in TENANTS}, audit_sinks=[audit])
    seed(engine, 12)
    encrypt(engine, cmk)
    stored = raw(engine)
    blob = bytearray(base64.b64decode(stored[3][1][4:]))
    blob[20] ^= 1
    with engine.begin() as conn:
        conn.execute(
            people.update()
            .where(people.c.id == 3)
            .values(name="cmk:" + base64.b64encode(bytes(blob)).decode())
        )
    audit.events.clear()
    with pytest.raises(DecryptionError):
        decrypt(engine, cmk, batch_size=100)
    decrypts = [(e.outcome, e.tenant, e.table, e.error) for e in audit.of("decrypt")]
    assert decrypts == [("tampered", None, TABLE, "DecryptionError")]
    assert audit.of("decrypt")[0].actor  # the operation's actor, for the app's own trail


def test_verify_reports_a_revoked_tenant_and_goes_on(
    engine: Engine, provider: FakeKeyProvider
) -> None:
    rows = seed(engine, 30)
    encrypt(engine, make_cmk(provider))
    provider.deny("fake://initech")
    fresh = make_cmk(provider)  # nothing cached
    report = backfill.verify(engine, fresh, TABLE, COLS, tenant_column="tenant_id", batch_size=7)
    initech = sum(1 for i, r in rows.items() if r[0] == "initech" and (r[1] or r[2]) is not None)
    assert report.failed == {"initech": initech}
    assert {f[2] for f in report.failures} == {"KeyAccessDeniedError"}
    assert set(report.encrypted_ok) == {"acme", "globex"}
    assert sum(report.encrypted_ok.values()) == expected_done(rows) - initech


def test_status_counts_without_keys(engine: Engine, cmk: CMK) -> None:
    rows = seed(engine, 40)
    encrypt(engine, cmk, max_batches=1, batch_size=10)
    st = backfill.status(engine, TABLE, COLS)
    stored = raw(engine)
    for k, col in enumerate(COLS, start=1):
        values = [r[k] for r in stored.values()]
        assert st.counts[col] == {
            "plaintext": sum(1 for v in values if v is not None and not v.startswith("cmk:")),
            "encrypted": sum(1 for v in values if v is not None and v.startswith("cmk:")),
            "null": sum(1 for v in values if v is None),
        }
    assert st.counts["name"]["encrypted"] > 0 and st.counts["name"]["plaintext"] > 0
    assert len(rows) == 40


def test_rewrap_moves_every_envelope_with_one_wrap_and_a_proof_each(
    engine: Engine, provider: FakeKeyProvider
) -> None:
    rows = seed(engine, 80)
    old = make_cmk(
        provider, tenant_keys={t: f"fake://{t}-v1" for t in TENANTS}, write_key_max_uses=9
    )
    encrypt(engine, old, batch_size=10)
    before = raw(engine)
    envelopes = {r[3][17:] for r in before.values() if r[3] is not None}
    assert len(envelopes) > 6  # several data keys per tenant
    new = make_cmk(provider, tenant_keys={t: [f"fake://{t}-v2", f"fake://{t}-v1"] for t in TENANTS})

    provider.reset_counts()
    only = backfill.rewrap_keys(engine, new, TABLE, tenant="acme", batch_size=7)
    acme_envs = {e for e in envelopes if parse_envelope(e).tenant == "acme"}
    # Per envelope: an unwrap into a key the call owns and a second one that must agree (a
    # wrong key re-wrapped would be lost for good), the wrap, the unwrap that proves it.
    assert provider.unwrap_count == 3 * provider.wrap_count == 3 * len(acme_envs)
    assert set(only.by_tenant) == {"acme"}

    provider.reset_counts()
    report = backfill.rewrap_keys(engine, new, TABLE, batch_size=7)
    assert provider.unwrap_count == 3 * provider.wrap_count == 3 * len(envelopes - acme_envs)
    after = raw(engine)
    assert only.rows + report.rows == len(envelopes and [r for r in after.values() if r[3]])
    for i, r in after.items():
        assert r[:3] == before[i][:3]  # data untouched
        if r[3] is not None:
            assert r[3][:17] == before[i][3][:17]  # same row id
            env = parse_envelope(r[3][17:])
            assert env.key_ref == f"fake://{env.tenant}-v2"
    provider.reset_counts()
    assert backfill.rewrap_keys(engine, new, TABLE).rows == 0
    assert provider.unwrap_count == provider.wrap_count == 0
    # Readable with the new key alone.
    only_v2 = make_cmk(provider, tenant_keys={t: f"fake://{t}-v2" for t in TENANTS})
    assert read_app(engine, only_v2) == rows


def test_rotate_gives_fresh_companions_and_values_still_decrypt(engine: Engine, cmk: CMK) -> None:
    rows = seed(engine, 45)
    encrypt(engine, cmk)
    with engine.begin() as conn:  # a plaintext row: rotate leaves it alone
        conn.execute(insert(people), [{"id": 900, "tenant_id": "acme", "name": "plain"}])
    rows[900] = ("acme", "plain", None)
    before = raw(engine)
    report = backfill.rotate_data_keys(
        engine, cmk, TABLE, COLS, tenant_column="tenant_id", batch_size=10
    )
    assert report.rows == expected_done(rows) - 1
    after = raw(engine)
    for i, r in after.items():
        if before[i][3] is None:
            assert r == before[i]
            continue
        assert r[3][1:17] != before[i][3][1:17]  # new row id
        assert r[1:3] != before[i][1:3] or r[1] is None
    assert after[900] == before[900]
    assert read_app(engine, cmk) == rows
    only = backfill.rotate_data_keys(
        engine, cmk, TABLE, COLS, tenant_column="tenant_id", tenant="globex"
    )
    assert set(only.by_tenant) == {"globex"}
    assert read_app(engine, cmk) == rows


# -- configuration errors ---------------------------------------------------------------------


def test_configuration_errors_say_what_to_do(engine: Engine, cmk: CMK) -> None:
    md = MetaData()
    Table(
        "bare",
        md,
        Column("id", Integer, primary_key=True),
        Column("t", String(9)),
        Column("v", Text),
        Column("short", String(50)),
        Column("n", Integer),
    )
    Table(
        "pair",
        md,
        Column("a", Integer, primary_key=True),
        Column("b", Integer, primary_key=True),
        Column("t", String(9)),
        Column("v", Text),
        Column("cmk_edek", LargeBinary),
    )
    md.create_all(engine)
    run: Callable[..., Any] = backfill.encrypt_columns
    with pytest.raises(ConfigurationError, match="does not exist"):
        run(engine, cmk, "nope", ["v"], tenant_column="t")
    with pytest.raises(ConfigurationError, match="ensure_companion"):
        run(engine, cmk, "bare", ["v"], tenant_column="t")
    assert backfill.ensure_companion(engine, "bare") is True
    assert backfill.ensure_companion(engine, "bare") is False
    with pytest.raises(ConfigurationError, match="no column 'w'"):
        run(engine, cmk, "bare", ["w"], tenant_column="t")
    with pytest.raises(ConfigurationError, match="tenant column"):
        run(engine, cmk, "bare", ["v"], tenant_column="tenant")
    with pytest.raises(ConfigurationError, match="TEXT first"):
        run(engine, cmk, "bare", ["short"], tenant_column="t")
    with pytest.raises(ConfigurationError, match="not a text column"):
        run(engine, cmk, "bare", ["n"], tenant_column="t")
    with pytest.raises(ConfigurationError, match="composite primary key"):
        run(engine, cmk, "pair", ["v"], tenant_column="t")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO bare (id, t, v) VALUES (1, NULL, 'x')"))
    with pytest.raises(ConfigurationError, match="no tenant"):
        run(engine, cmk, "bare", ["v"], tenant_column="t")
    assert (
        backfill.encrypt_columns(engine, cmk, "bare", ["v"], tenant_column="t", max_batches=0).rows
        == 0
    )


# -- leased keys (stored format version 2) ----------------------------------------------------


def test_rewrap_and_rotate_handle_v1_and_v2_rows_in_one_table(
    engine: Engine, provider: FakeKeyProvider
) -> None:
    v1_keys = {t: f"fake://{t}-v1" for t in TENANTS}
    rows = seed(engine, 30)
    encrypt(engine, make_cmk(provider, tenant_keys=v1_keys, write_key_max_uses=9), batch_size=10)
    rows.update(seed(engine, 30, start=30))
    leased = make_cmk(provider, tenant_keys=v1_keys, write_key_max_uses=9, lease_period=60.0)
    encrypt(engine, leased, batch_size=10)
    before = raw(engine)
    comps = [r[3] for r in before.values() if r[3] is not None]
    assert {c[0] for c in comps} == {1, 2}
    v1_envs = {c[17:] for c in comps if c[0] == 1}
    v2_envs = {c[17:] for c in comps if c[0] == 2}
    leases = {split_leased(e)[0] for e in v2_envs}
    assert len(v2_envs) > len(leases) == len(TENANTS)  # several data keys under each lease

    new = make_cmk(
        provider,
        tenant_keys={t: [f"fake://{t}-v2", f"fake://{t}-v1"] for t in TENANTS},
        lease_period=60.0,
    )
    provider.reset_counts()
    report = backfill.rewrap_keys(engine, new, TABLE, batch_size=7)
    # A verified round trip per v1 data key (and its confirming unwrap), and per lease (proven
    # against a local wrap, no KMS call): not per v2 data key.
    assert provider.wrap_count == len(v1_envs) + len(leases)
    assert provider.unwrap_count == 3 * len(v1_envs) + 2 * len(leases)
    assert report.rows == len(comps)
    after = raw(engine)
    for i, r in after.items():
        assert r[:3] == before[i][:3]  # data untouched
        if r[3] is not None:
            assert r[3][:17] == before[i][3][:17]  # same version and row id
            assert (
                parse_envelope(r[3][17:]).key_ref == f"fake://{parse_envelope(r[3][17:]).tenant}-v2"
            )
            if r[3][0] == 2:  # the data key's local wrap is kept: only the lease moved
                assert split_leased(r[3][17:])[1] == split_leased(before[i][3][17:])[1]
    only_v2 = make_cmk(provider, tenant_keys={t: f"fake://{t}-v2" for t in TENANTS})
    assert read_app(engine, only_v2) == rows

    # Rotation writes what the CMK writes: version 2 with leases on, version 1 without.
    backfill.rotate_data_keys(engine, new, TABLE, COLS, tenant_column="tenant_id", batch_size=10)
    assert {r[3][0] for r in raw(engine).values() if r[3] is not None} == {2}
    assert read_app(engine, only_v2) == rows
    backfill.rotate_data_keys(engine, only_v2, TABLE, COLS, tenant_column="tenant_id")
    assert {r[3][0] for r in raw(engine).values() if r[3] is not None} == {1}
    assert read_app(engine, new) == rows


@pytest.mark.parametrize("lease_period", [None, 60.0], ids=["v1", "v2"])
def test_rewrap_refuses_a_key_the_kms_unwrapped_wrongly_and_keeps_the_rows(
    engine: Engine, provider: FakeKeyProvider, lease_period: float | None
) -> None:
    # A KMS that answers one unwrap of an old envelope with a wrong key: re-wrapping that key
    # under the new primary would point every row of the envelope at it for ever (the old
    # envelope, the only way back, is overwritten). The rewrap must raise and write nothing.
    rows = seed(engine, 12)
    v1_keys = {t: f"fake://{t}-v1" for t in TENANTS}
    encrypt(engine, make_cmk(provider, tenant_keys=v1_keys, lease_period=lease_period))
    before = raw(engine)
    moved = {t: [f"fake://{t}-v2", f"fake://{t}-v1"] for t in TENANTS}
    provider.inject("garbage", operation="unwrap", count=1)
    with pytest.raises(DecryptionError, match="old envelope was kept"):
        backfill.rewrap_keys(engine, make_cmk(provider, tenant_keys=moved), TABLE)
    assert raw(engine) == before
    provider.heal()
    assert backfill.rewrap_keys(engine, make_cmk(provider, tenant_keys=moved), TABLE).rows > 0
    only_v2 = make_cmk(provider, tenant_keys={t: f"fake://{t}-v2" for t in TENANTS})
    assert read_app(engine, only_v2) == rows
