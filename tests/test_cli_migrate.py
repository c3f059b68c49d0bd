"""The migration commands of ``sqlalchemy-cmk`` (encrypt-column, decrypt-column, rewrap, rotate,
verify, status): ``main(argv)`` in-process on SQLite and PostgreSQL, ``--workers 2`` as real
spawned processes on PostgreSQL. What is checked is what an operator would check: the raw text in
the table, the exit status, the counts, the application reading its rows back."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_cmk import EncryptedMixin, EncryptedType, tenant_context
from sqlalchemy_cmk.cli import main
from sqlalchemy_cmk.cli._progress import _ProgressView

TENANTS = ("acme", "globex")
ROWS = 240


def database_url(engine: Engine) -> str:
    """The engine's URL, with the per-test PostgreSQL schema of conftest in the URL itself."""
    url = engine.url
    if url.get_backend_name() == "postgresql":
        with engine.connect() as conn:
            schema = conn.execute(text("select current_schema()")).scalar_one()
        url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A tiny application module defining its CMKs with fixed local keys, so that worker
    processes, which import it afresh, seal under the same keys as this process opens with."""
    name = f"cmk_mig_app_{uuid.uuid4().hex[:8]}"
    keys = {n: base64.b64encode(os.urandom(32)).decode() for n in ("acme", "acme-2", "globex")}
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            f"""
            import base64

            from sqlalchemy_cmk import CMK
            from sqlalchemy_cmk.providers.local import LocalKeyProvider

            provider = LocalKeyProvider(
                {{name: base64.b64decode(key) for name, key in {keys!r}.items()}}
            )
            cmk = CMK(
                provider,
                tenant_keys={{"acme": "local://acme", "globex": "local://globex"}},
                audit_sinks=[],
            )
            # acme moves to a new key: new data keys are wrapped under acme-2, old still read.
            cmk_moving = CMK(
                provider,
                tenant_keys={{
                    "acme": ["local://acme-2", "local://acme"],
                    "globex": "local://globex",
                }},
                audit_sinks=[],
            )
            # ... and once the move is done, the old key is no longer accepted.
            cmk_moved = CMK(
                provider,
                tenant_keys={{"acme": "local://acme-2", "globex": "local://globex"}},
                audit_sinks=[],
            )
            cmk_acme_only = CMK(provider, tenant_keys={{"acme": "local://acme"}}, audit_sinks=[])
            """
        )
    )
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI adds --app-dir to it
    monkeypatch.chdir(tmp_path)  # --app-dir defaults to the current directory
    main_argv = ["--cmk", f"{name}:cmk"]
    yield type("App", (), {"name": name, "argv": main_argv, "dir": tmp_path})
    sys.modules.pop(name, None)


def body(i: int) -> str | None:
    if i % 50 == 7:
        return None
    if i == 3:
        return ""  # empty, not NULL: encrypted like any other value
    return f"note {i}: Grüße, 東京 {'x' * (i % 13)} — {i * 7919}"


@pytest.fixture
def notes(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> dict[int, tuple[str, str | None]]:
    """A plaintext table ``notes`` of ROWS rows over two tenants; returns id -> (tenant, body)."""
    metadata = MetaData()
    table = Table(
        "notes",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("tenant_id", String(50), nullable=False),
        Column("body", Text),
    )
    metadata.create_all(engine)
    rows = {i: (TENANTS[i % 2], body(i)) for i in range(1, ROWS + 1)}
    with engine.begin() as conn:
        conn.execute(
            table.insert(), [{"id": i, "tenant_id": t, "body": b} for i, (t, b) in rows.items()]
        )
    monkeypatch.setenv("SQLALCHEMY_CMK_DATABASE_URL", database_url(engine))
    return rows


def stored(engine: Engine) -> dict[int, tuple[str | None, bytes | None]]:
    with engine.connect() as conn:
        result = conn.execute(text("SELECT id, body, cmk_edek FROM notes ORDER BY id"))
        return {i: (b, bytes(e) if e is not None else None) for i, b, e in result}


TARGET = ["--table", "notes", "--column", "body", "--tenant-column", "tenant_id"]


def status_counts(capsys: pytest.CaptureFixture[str]) -> dict[str, int]:
    code, out, _ = run(capsys, "status", "--table", "notes", "--column", "body", "--json")
    assert code == 0
    counts: dict[str, int] = json.loads(out)["counts"]["body"]
    return counts


def test_encrypt_status_verify_decrypt(
    engine: Engine,
    notes: dict[int, tuple[str, str | None]],
    app: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    nulls = sum(1 for _, b in notes.values() if b is None)
    assert status_counts(capsys) == {"plaintext": ROWS - nulls, "encrypted": 0, "null": nulls}
    code, _, err = run(capsys, "verify", *TARGET, *app.argv)
    assert code == 1 and "no companion column 'cmk_edek'" in err  # nothing to verify yet

    code, out, err = run(
        capsys, "encrypt-column", *TARGET, *app.argv, "--batch-size", "25", "--progress-every", "0"
    )
    assert code == 0, err
    assert "added the companion column cmk_edek to notes" in out
    assert f"encrypted {ROWS - nulls:,} row(s) of notes (body)" in out
    # Not a terminal: plain progress lines, one per batch at --progress-every 0, no \r.
    lines = [line for line in err.splitlines() if line.startswith("encrypt notes: ")]
    assert len(lines) >= (ROWS - nulls) // 25 and "\r" not in err
    assert lines[-1].startswith(f"encrypt notes: {ROWS - nulls:,}/{ROWS - nulls:,} rows (100.0%)")
    assert "rows/s, ETA" in lines[0]

    raw = stored(engine)
    for i, (_, value) in notes.items():
        now = raw[i][0]
        if value is None:
            assert now is None
            continue
        assert now is not None and now.startswith("cmk:")
        assert value == "" or value not in now
        assert raw[i][1] is not None  # the companion
    assert status_counts(capsys) == {"plaintext": 0, "encrypted": ROWS - nulls, "null": nulls}

    code, out, _ = run(capsys, "verify", *TARGET, *app.argv, "--require-encrypted")
    assert code == 0 and out.rstrip().endswith("OK"), out
    code, out, _ = run(capsys, "verify", *TARGET, *app.argv, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"] is True and doc["failed_total"] == 0
    assert doc["encrypted_ok_total"] == ROWS - nulls and doc["plaintext_total"] == 0

    # The application, no longer in dual-read mode, reads every row back as it was.
    module = sys.modules[app.name]
    with Session(engine) as session:
        module.cmk.install(session)
        for tenant in TENANTS:
            with tenant_context(tenant, actor="test"):
                got = {
                    n.id: n.body
                    for n in session.query(StrictNote).filter(StrictNote.tenant_id == tenant)
                }
            assert got == {i: b for i, (t, b) in notes.items() if t == tenant}

    # Running the finished job again does nothing.
    code, out, _ = run(capsys, "encrypt-column", *TARGET, *app.argv, "--json")
    assert (
        code == 0 and json.loads(out)["rows"] == 0 and json.loads(out)["companion_added"] is False
    )
    assert stored(engine) == raw

    code, out, _ = run(capsys, "decrypt-column", *TARGET, *app.argv, "--batch-size", "100")
    assert code == 0 and f"decrypted {ROWS - nulls:,} row(s)" in out
    assert {i: b for i, (b, _) in stored(engine).items()} == {i: b for i, (_, b) in notes.items()}
    assert status_counts(capsys)["encrypted"] == 0
    code, out, _ = run(capsys, "verify", *TARGET, *app.argv)
    assert code == 0 and "FAILED:" not in out  # plaintext is not a failure ...
    assert f"0 ok, {ROWS - nulls:,} plaintext, 0 failed" in out
    code, out, _ = run(capsys, "verify", *TARGET, *app.argv, "--require-encrypted")
    assert code == 1 and "plaintext value(s) remain" in out  # ... unless required


class StrictBase(DeclarativeBase):
    pass


class StrictNote(EncryptedMixin, StrictBase):
    """The application's model once the migration is done: no plaintext accepted."""

    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(50))
    body: Mapped[str | None] = mapped_column(EncryptedType(Text, storage="text"))


def test_verify_catches_a_tampered_row_and_a_moved_row(
    engine: Engine,
    notes: dict[int, tuple[str, str | None]],
    app: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(capsys, "encrypt-column", *TARGET, *app.argv)[0] == 0
    value = stored(engine)[10][0]
    assert value is not None
    blob = bytearray(base64.b64decode(value[len("cmk:") :]))
    blob[-1] ^= 0x01  # one bit of the authentication tag
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE notes SET body = :b WHERE id = 10"),
            {"b": "cmk:" + base64.b64encode(bytes(blob)).decode()},
        )
        # Row 11 belongs to globex; relabel it as acme's: its envelope still names globex.
        conn.execute(text("UPDATE notes SET tenant_id = 'acme' WHERE id = 11"))
    code, out, _ = run(capsys, "verify", *TARGET, *app.argv)
    assert code == 1
    assert "FAILED row 10 (tenant acme)" in out
    assert "FAILED row 11" in out
    assert "FAILED: 2 row(s) did not decrypt" in out
    assert str(notes[10][1]) not in out  # never plaintext in the output
    code, out, _ = run(capsys, "verify", *TARGET, *app.argv, "--json")
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False and doc["failed_total"] == 2
    assert sorted(pk for pk, _, _ in doc["failures"]) == ["10", "11"]


def test_a_tenant_without_a_key_fails_and_leaves_its_rows_alone(
    engine: Engine,
    notes: dict[int, tuple[str, str | None]],
    app: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run(
        capsys, "encrypt-column", *TARGET, "--cmk", f"{app.name}:cmk_acme_only", "--no-progress"
    )
    assert code == 1 and "TenantNotConfiguredError" in err and "globex" in err
    raw = stored(engine)
    for i, (tenant, value) in notes.items():
        if tenant == "globex":
            assert raw[i][0] == value  # untouched plaintext
    # With every tenant's key, running again finishes the job.
    assert run(capsys, "encrypt-column", *TARGET, *app.argv)[0] == 0
    assert status_counts(capsys)["plaintext"] == 0


def test_rewrap_moves_a_tenant_to_its_new_key_and_rotate_renews_data_keys(
    engine: Engine,
    notes: dict[int, tuple[str, str | None]],
    app: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(capsys, "encrypt-column", *TARGET, *app.argv)[0] == 0
    moved = ["--cmk", f"{app.name}:cmk_moved"]
    assert run(capsys, "verify", *TARGET, *moved)[0] == 1  # acme's rows still under the old key
    before = stored(engine)

    code, out, err = run(
        capsys, "rewrap", "--table", "notes", "--cmk", f"{app.name}:cmk_moving", "--tenant", "acme"
    )
    assert code == 0, err
    assert "rewrapped" in out
    after = stored(engine)
    for i, (tenant, _) in notes.items():
        assert after[i][0] == before[i][0]  # values untouched: no re-encryption
        if tenant == "globex":
            assert after[i][1] == before[i][1]
    assert any(after[i][1] != before[i][1] for i, (t, _) in notes.items() if t == "acme")
    code, out, _ = run(capsys, "verify", *TARGET, *moved, "--require-encrypted")
    assert code == 0, out

    code, out, err = run(capsys, "rotate", *TARGET, *moved, "--json")
    assert code == 0, err
    rotated = stored(engine)
    changed = [i for i, (_, b) in notes.items() if b is not None]
    assert json.loads(out)["rows"] == len(changed)
    assert all(rotated[i][0] != after[i][0] and rotated[i][1] != after[i][1] for i in changed)
    assert run(capsys, "verify", *TARGET, *moved, "--require-encrypted")[0] == 0
    assert run(capsys, "decrypt-column", *TARGET, *moved)[0] == 0
    assert {i: b for i, (b, _) in stored(engine).items()} == {i: b for i, (_, b) in notes.items()}


def _note(g: int) -> str:
    return f"value {g} {hashlib.md5(str(g).encode()).hexdigest()}"


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param("postgresql", marks=pytest.mark.postgresql),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
    indirect=True,
)  # SQLite: one worker
def test_two_worker_processes_on_a_server(
    engine: Engine, app: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = 3000
    notes = {g: ("acme" if g % 2 == 0 else "globex", _note(g)) for g in range(1, rows + 1)}
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE notes (id integer PRIMARY KEY, tenant_id text, body text)"))
        conn.execute(
            text("INSERT INTO notes VALUES (:id, :t, :b)"),
            [{"id": g, "t": t, "b": b} for g, (t, b) in notes.items()],
        )
    monkeypatch.setenv("SQLALCHEMY_CMK_DATABASE_URL", database_url(engine))
    code, out, err = run(
        capsys,
        "encrypt-column",
        *TARGET,
        *app.argv,
        "--workers",
        "2",
        "--batch-size",
        "100",
        "--progress-every",
        "0",
        "--json",
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["workers"] == 2 and doc["ok"] is True and doc["rows"] == rows
    assert doc["by_tenant"] == {"acme": rows // 2, "globex": rows // 2}
    assert "encrypt notes: " in err  # progress from the workers, merged by the parent
    with engine.connect() as conn:
        encrypted = conn.execute(text("SELECT count(*) FROM notes WHERE body LIKE 'cmk:%'"))
        assert encrypted.scalar() == rows
    # Sealed in the workers, opened here: every row decrypts, each exactly once encrypted.
    code, out, _ = run(capsys, "verify", *TARGET, *app.argv, "--require-encrypted", "--json")
    assert code == 0 and json.loads(out)["encrypted_ok_total"] == rows
    code, out, _ = run(capsys, "decrypt-column", *TARGET, *app.argv, "--workers", "2", "--json")
    assert code == 0 and json.loads(out)["rows"] == rows
    with engine.connect() as conn:
        assert dict(conn.execute(text("SELECT id, body FROM notes")).all()) == {  # type: ignore[arg-type]
            g: b for g, (_, b) in notes.items()
        }


def worker_pids(parent: int) -> list[int]:
    """The spawned workers of ``parent`` (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [
        int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_a_killed_worker_is_reported_and_a_rerun_finishes(
    engine: Engine, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL one of two workers of the installed command mid-run: exit 1 naming the dead
    worker; the same command again leaves every row encrypted exactly once."""
    rows = 60_000
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE notes (id integer PRIMARY KEY, tenant_id text, body text)"))
        conn.execute(
            text(
                "INSERT INTO notes SELECT g, CASE WHEN g % 2 = 0 THEN 'acme' ELSE 'globex' END, "
                "'value ' || g FROM generate_series(1, :n) AS g"
            ),
            {"n": rows},
        )
    env = dict(os.environ, SQLALCHEMY_CMK_DATABASE_URL=database_url(engine))
    script = str(Path(sys.executable).parent / "sqlalchemy-cmk")
    argv = [script, "encrypt-column", *TARGET, *app.argv, "--workers", "2"]
    proc = subprocess.Popen(
        [*argv, "--batch-size", "50", "--progress-every", "0"],
        env=env,
        cwd=app.dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a hang is ended with its workers, below
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # the first batch is committed
        assert first.startswith("encrypt notes: "), first
        victims = worker_pids(proc.pid)
        assert len(victims) == 2
        os.kill(victims[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 1, err
    assert "died (exit status -9)" in err and "run the same command again" in err
    done = subprocess.run(
        [*argv, "--json"], env=env, cwd=app.dir, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    with engine.connect() as conn:
        counts = conn.execute(
            text(
                "SELECT count(*) FILTER (WHERE body LIKE 'cmk:%'), "
                "count(*) FILTER (WHERE cmk_edek IS NOT NULL), count(*) FROM notes"
            )
        ).one()
    assert tuple(counts) == (rows, rows, rows)
    # Exactly once: every value decrypts under its row's one companion.
    monkeypatch.setenv("SQLALCHEMY_CMK_DATABASE_URL", database_url(engine))
    assert main(["verify", *TARGET, *app.argv, "--require-encrypted", "--no-progress"]) == 0


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_workers_are_refused_on_sqlite(
    engine: Engine,
    notes: dict[int, tuple[str, str | None]],
    app: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run(capsys, "encrypt-column", *TARGET, *app.argv, "--workers", "2")
    assert code == 2 and "single-worker" in err and "--workers 1" in err
    with engine.connect() as conn:  # refused before anything was touched, even the schema
        assert dict(conn.execute(text("SELECT id, body FROM notes")).all()) == {
            i: b for i, (_, b) in notes.items()
        }
        columns = [r[1] for r in conn.execute(text("PRAGMA table_info(notes)"))]
    assert columns == ["id", "tenant_id", "body"]


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_usage_errors_exit_2(
    engine: Engine,
    notes: dict[int, tuple[str, str | None]],
    app: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert run(capsys, "encrypt-column", *TARGET)[0] == 2  # no --cmk
    assert run(capsys, "encrypt-column", "--table", "notes", *app.argv)[0] == 2  # no --column
    assert run(capsys, "encrypt-column", *TARGET, *app.argv, "--batch-size", "0")[0] == 2
    assert run(capsys, "verify", *TARGET, *app.argv, "--sample", "2")[0] == 2
    code, _, err = run(capsys, "encrypt-column", *TARGET, "--cmk", "nope_xyz:cmk")
    assert code == 2 and "cannot import" in err
    monkeypatch.delenv("SQLALCHEMY_CMK_DATABASE_URL")
    code, _, err = run(capsys, "status", "--table", "notes", "--column", "body")
    assert code == 2 and "SQLALCHEMY_CMK_DATABASE_URL" in err


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_and_lines_elsewhere() -> None:
    tty = FakeTerminal()
    view = _ProgressView("encrypt notes", tty, enabled=True, every=5.0)
    view.every = 0.0  # redraw on every update
    view.update(500, 1000)
    view.update(1000, 1000)
    view.close()
    shown = tty.getvalue()
    assert shown.startswith("\rencrypt notes [") and shown.endswith("\n")
    assert shown.count("\n") == 1  # one line, redrawn in place
    assert "500/1,000 rows (50.0%)" in shown and "1,000/1,000 rows (100.0%)" in shown
    assert "rows/s ETA " in shown

    log = io.StringIO()
    view = _ProgressView("verify notes", log, enabled=True, every=3600.0)
    view.update(10, None)
    view.update(20, None)
    view.close()  # nothing within the interval: only the last line, at the end
    assert log.getvalue().splitlines() == [log.getvalue().splitlines()[0]]
    assert log.getvalue().startswith("verify notes: 20 rows, ")
    quiet = io.StringIO()
    view = _ProgressView("x", quiet, enabled=False, every=0.0)
    view.update(1, 1)
    view.close()
    assert quiet.getvalue() == ""
