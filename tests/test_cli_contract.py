"""The exit status and stderr contract of the ``sqlalchemy-cmk`` command, run as an operator runs
it: the installed console script in a subprocess, its exit status and what it prints on stderr.

The contract (docs/usage.md, "Exit status"): 0 done, 1 failed, 2 invoked or configured wrongly
(nothing changed), 141 the output's reader went away; every failure is one line on stderr,
never a traceback, never a value from the database.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, Text, inspect, text

ROOT = Path(__file__).resolve().parents[1]
SECRET = base64.b64encode(os.urandom(32)).decode()
SSN = "SSN-123-45-6789"  # the plaintext no failure may print
TARGET = ["--table", "notes", "--column", "body", "--tenant-column", "tenant_id"]
ROWS = 120


def database_url(engine: Engine) -> str:
    """The engine's URL, with the per-test PostgreSQL schema of conftest in the URL itself."""
    url = engine.url
    if url.get_backend_name() == "postgresql":
        with engine.connect() as conn:
            schema = conn.execute(text("select current_schema()")).scalar_one()
        url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def cli(
    *argv: str,
    cwd: Path,
    url: str | None = None,
    stdout: Any = subprocess.PIPE,
    stderr: Any = subprocess.PIPE,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """The installed console script, importing the package from this checkout."""
    script = Path(sys.executable).parent / "sqlalchemy-cmk"
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout first, whatever is installed
    env.pop("SQLALCHEMY_CMK_TRACEBACK", None)
    if url is not None:
        env["SQLALCHEMY_CMK_DATABASE_URL"] = url
    env["SQLALCHEMY_CMK_REGISTRY_SECRET"] = SECRET
    env["SQLALCHEMY_CMK_REGISTRY_ID"] = "test-eu"
    return subprocess.run(
        [str(script), *argv],
        cwd=cwd,
        env=env,
        stdout=stdout,
        stderr=stderr,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_line_failure(done: subprocess.CompletedProcess[str], status: int) -> str:
    """Assert the contract of a failure; return its one line."""
    err = done.stderr
    assert "Traceback" not in err, err
    assert done.returncode == status, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("sqlalchemy-cmk: "), err
    return lines[0]


APP = """
import base64, os

from sqlalchemy import create_engine, text
from sqlalchemy_cmk import CMK
from sqlalchemy_cmk.providers.local import LocalKeyProvider

KEYS = {keys!r}


class Provider(LocalKeyProvider):
    # Fault injection: the application inserts rows while the migration runs (the first wrap
    # is the migration's first batch), or a provider that fails with a message of its own.
    inserted = False

    def wrap_key(self, key_ref, data_key, context):
        mode = os.environ.get("APP_FAULT")
        if mode == "insert" and not Provider.inserted:
            Provider.inserted = True
            engine = create_engine(os.environ["SQLALCHEMY_CMK_DATABASE_URL"])
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO notes (id, tenant_id, body) SELECT g, 'acme', 'late ' || g "
                        "FROM generate_series(100001, 100000 + :n) AS g"
                    ),
                    {{"n": int(os.environ["APP_INSERT"])}},
                )
            engine.dispose()
        if mode == "raise":
            raise ValueError("refusing {ssn}")
        return super().wrap_key(key_ref, data_key, context)


provider = Provider({{n: base64.b64decode(k) for n, k in KEYS.items()}})
cmk = CMK(provider, tenant_keys={{"acme": "local://acme", "globex": "local://globex"}},
          audit_sinks=[])
"""


@pytest.fixture
def app(tmp_path: Path) -> str:
    """An application module in ``tmp_path`` (the subprocess's current directory)."""
    name = f"cmk_contract_{uuid.uuid4().hex[:8]}"
    keys = {n: base64.b64encode(os.urandom(32)).decode() for n in ("acme", "globex")}
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(APP.format(keys=keys, ssn=SSN)))
    return name


@pytest.fixture
def notes(engine: Engine) -> str:
    """A plaintext table ``notes``: every value looks like an SSN. Returns the database URL."""
    metadata = MetaData()
    table = Table(
        "notes",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("tenant_id", String(50), nullable=False),
        Column("body", Text),
    )
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            table.insert(),
            [
                {"id": i, "tenant_id": ("acme", "globex")[i % 2], "body": f"{SSN}-{i:04d}"}
                for i in range(1, ROWS + 1)
            ],
        )
    return database_url(engine)


def encrypted(engine: Engine) -> int:
    """How many values of ``notes.body`` are stored encrypted."""
    with engine.connect() as conn:
        query = text("SELECT count(*) FROM notes WHERE body LIKE 'cmk:%'")
        return int(conn.execute(query).scalar_one())


def raw(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT * FROM notes ORDER BY id"))]


# -- a database that refuses a decrypted row: no plaintext, no misleading hint ---------------


@pytest.mark.parametrize(
    ("engine", "refusal"),
    [("sqlite", "unique"), ("postgresql", "unique"), ("postgresql", "check")],
    indirect=["engine"],
)
def test_a_refused_decrypted_row_is_one_line_without_plaintext(
    engine: Engine, notes: str, app: str, tmp_path: Path, refusal: str
) -> None:
    if refusal == "unique":  # two rows of one value: distinct ciphertexts, equal plaintexts
        with engine.begin() as conn:
            conn.execute(text("UPDATE notes SET body = (SELECT body FROM notes WHERE id = 1)"))
    done = cli("encrypt-column", *TARGET, "--cmk", f"{app}:cmk", cwd=tmp_path, url=notes)
    assert done.returncode == 0, done.stderr
    with engine.begin() as conn:
        if refusal == "check":  # holds over ciphertext, refuses the plaintext back
            conn.execute(
                text("ALTER TABLE notes ADD CONSTRAINT no_ssn CHECK (body NOT LIKE 'SSN-%')")
            )
        else:  # holds over ciphertext, refuses the second equal plaintext
            conn.execute(text("CREATE UNIQUE INDEX notes_body_key ON notes (body)"))
    before = raw(engine)
    done = cli("decrypt-column", *TARGET, "--cmk", f"{app}:cmk", cwd=tmp_path, url=notes)
    line = one_line_failure(done, 1)
    assert SSN not in done.stderr and SSN not in done.stdout
    assert "URL" not in line  # the URL was right: no hint that it was not
    assert "[SQL" not in line and "[parameters" not in line and "DETAIL" not in line
    if refusal == "check":
        assert "no_ssn" in line  # which constraint refused: what the operator needs
    assert raw(engine) != [] and len(raw(engine)) == len(before)


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_a_value_in_a_postgresql_primary_message_is_hidden(engine: Engine) -> None:
    """PostgreSQL quotes the value itself in some primary messages (data exceptions)."""
    from sqlalchemy.exc import DBAPIError

    from sqlalchemy_cmk.cli._common import _database_error

    with engine.connect() as conn, pytest.raises(DBAPIError) as caught:
        conn.execute(text("SELECT CAST(:v AS integer)"), {"v": SSN})
    line = _database_error(caught.value, migration=True)
    assert SSN not in line and "invalid input syntax for type integer" in line
    assert "\n" not in line


class _MySQLError(Exception):
    """The shape of a MySQL driver's error: ``args == (errno, message)``."""


@pytest.mark.parametrize(
    ("message", "kept"),
    [
        (f"Duplicate entry '{SSN}' for key 'notes.body'", "for key 'notes.body'"),
        ("Duplicate entry 'it''s' ' for key 'x' for key 'notes.body'", "for key 'notes.body'"),
        (
            f"Incorrect integer value: '{SSN}' for column `test`.`notes`.`n` at row 1",
            "for column `test`.`notes`.`n`",
        ),
    ],
)
def test_values_in_mysql_messages_are_hidden(message: str, kept: str) -> None:
    from sqlalchemy_cmk.cli._common import _scrub_database_message

    line = _scrub_database_message(_MySQLError(1062, message))
    assert SSN not in line and "it''s" not in line and kept in line and "(value hidden)" in line


# -- --cmk and --metadata that do not load: exit 2, one line, nothing touched -----------------

BAD_MODULES = {
    "raises": ("raise RuntimeError('no settings: DATABASE_PASSWORD is unset')\n", "cmk"),
    "exits-0": ("import sys\nsys.exit(0)\n", "cmk"),
    "exits-none": ("raise SystemExit\n", "cmk"),
    "needs-arguments": ("def make(region):\n    raise AssertionError('called')\n", "make"),
    "factory-raises": ("def make():\n    raise KeyError('tenant map')\n", "make"),
    "factory-exits": ("import sys\ndef make():\n    sys.exit(0)\n", "make"),
    "non-cmk-callable": ("def make():\n    return {'acme': 'local://acme'}\n", "make"),
    "non-cmk-attribute": ("cmk = 'local://acme'\n", "cmk"),
    "a-class": ("class CMKFactory:\n    pass\n", "CMKFactory"),
}


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
@pytest.mark.parametrize("case", sorted(BAD_MODULES))
def test_a_cmk_that_does_not_load_exits_2_before_touching_anything(
    engine: Engine, notes: str, tmp_path: Path, case: str
) -> None:
    source, attribute = BAD_MODULES[case]
    name = f"bad_cmk_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(source)
    before = raw(engine)
    for argv in (
        ["encrypt-column", *TARGET],
        ["verify", *TARGET],
        ["check-tenant", "acme"],
    ):
        done = cli(*argv, "--cmk", f"{name}:{attribute}", cwd=tmp_path, url=notes)
        line = one_line_failure(done, 2)
        assert f"--cmk {name}:{attribute}" in line
        assert done.stdout == ""
    with engine.connect() as conn:  # not even the companion column was added
        columns = [r[1] for r in conn.execute(text("PRAGMA table_info(notes)"))]
    assert columns == ["id", "tenant_id", "body"] and raw(engine) == before


def test_a_column_under_a_unique_index_is_refused_before_anything_changes(
    engine: Engine, notes: str, app: str, tmp_path: Path
) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE UNIQUE INDEX notes_body_key ON notes (body)"))
    before = raw(engine)
    done = cli("encrypt-column", *TARGET, "--cmk", f"{app}:cmk", cwd=tmp_path, url=notes)
    line = one_line_failure(done, 2)
    assert "notes_body_key" in line and SSN not in line
    columns = [c["name"] for c in inspect(engine).get_columns("notes")]
    assert columns == ["id", "tenant_id", "body"] and raw(engine) == before  # no companion


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_metadata_module_that_exits_on_import_exits_2(
    engine: Engine, notes: str, app: str, tmp_path: Path
) -> None:
    (tmp_path / "bad_models.py").write_text("import sys\nsys.exit(0)\n")
    done = cli(
        "encrypt-column",
        "--table",
        "notes",
        "--column",
        "body",
        "--metadata",
        "bad_models:Base",
        "--cmk",
        f"{app}:cmk",
        cwd=tmp_path,
        url=notes,
    )
    line = one_line_failure(done, 2)
    assert "--metadata bad_models:Base" in line and "sys.exit(0)" in line


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_provider_failing_its_own_way_is_one_line_without_its_message(
    engine: Engine, notes: str, app: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APP_FAULT", "raise")
    done = cli("encrypt-column", *TARGET, "--cmk", f"{app}:cmk", cwd=tmp_path, url=notes)
    line = one_line_failure(done, 1)
    assert SSN not in line


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    for argv in (
        ["encrypt-column", *TARGET],  # no --cmk
        ["verify", *TARGET, "--cmk", "x:y", "--sample", "2"],
        ["tenants"],
        ["no-such-command"],
    ):
        line = one_line_failure(cli(*argv, cwd=tmp_path), 2)
        assert "--help" in line


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_an_unreachable_database_is_one_line_with_the_url_hint(
    engine: Engine, notes: str, app: str, tmp_path: Path
) -> None:
    url = "postgresql+psycopg://nobody@127.0.0.1:9/none?connect_timeout=2"
    done = cli("status", "--table", "notes", "--column", "body", cwd=tmp_path, url=url)
    assert "is the URL right" in one_line_failure(done, 1)
    done = cli("encrypt-column", *TARGET, "--cmk", f"{app}:cmk", cwd=tmp_path, url=url)
    assert "is the URL right" in one_line_failure(done, 1)
    # A usage error is one whatever the database: found before connecting.
    done = cli("encrypt-column", *TARGET, "--cmk", f"{app}:nothing", cwd=tmp_path, url=url)
    assert "has no attribute" in one_line_failure(done, 2)


# -- progress: never past the total; a sample shows no ETA -----------------------------------

PROGRESS = re.compile(r"^(encrypt|verify) notes: ([\d,]+)(?:/([\d,]+))? rows")


def progress_lines(err: str) -> list[tuple[int, int | None, str]]:
    found = []
    for line in err.splitlines():
        m = PROGRESS.match(line)
        if m:
            total = int(m[3].replace(",", "")) if m[3] else None
            found.append((int(m[2].replace(",", "")), total, line))
    return found


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_progress_never_passes_the_total_when_rows_arrive_meanwhile(
    engine: Engine, notes: str, app: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    late = 200
    monkeypatch.setenv("APP_FAULT", "insert")
    monkeypatch.setenv("APP_INSERT", str(late))
    done = cli(
        "encrypt-column",
        *TARGET,
        "--cmk",
        f"{app}:cmk",
        "--batch-size",
        "20",
        "--progress-every",
        "0",
        cwd=tmp_path,
        url=notes,
    )
    assert done.returncode == 0, done.stderr
    lines = progress_lines(done.stderr)
    assert lines, done.stderr
    for count, total, line in lines:
        assert total is not None and count <= total, line
        assert "(100.0%)" in line or float(line.split("(")[1].split("%")[0]) <= 100, line
    assert lines[-1][0] == ROWS + late  # the late rows were encrypted too, and counted


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_verify_sample_shows_no_eta_for_the_whole_table(
    engine: Engine, notes: str, app: str, tmp_path: Path
) -> None:
    assert (
        cli("encrypt-column", *TARGET, "--cmk", f"{app}:cmk", cwd=tmp_path, url=notes).returncode
        == 0
    )
    done = cli(
        "verify",
        *TARGET,
        "--cmk",
        f"{app}:cmk",
        "--sample",
        "0.3",
        "--batch-size",
        "5",
        "--progress-every",
        "0",
        cwd=tmp_path,
        url=notes,
    )
    assert done.returncode == 0, done.stderr
    lines = progress_lines(done.stderr)
    assert lines, done.stderr
    for _, total, line in lines:
        assert total is None and "ETA" not in line, line


# -- a closed pipe: quiet, whatever the command -----------------------------------------------


def closed_pipe_run(argv: Sequence[str], *, cwd: Path, url: str, both: bool) -> tuple[int, str]:
    """Run with stdout (and stderr too if ``both``) a pipe whose reader has already gone,
    as ``| head -0`` leaves it; returns the exit status and stderr (when not closed)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = cli(
            *argv,
            cwd=cwd,
            url=url,
            stdout=write_end,
            stderr=write_end if both else subprocess.PIPE,
        )
    finally:
        os.close(write_end)
    return done.returncode, done.stderr or ""


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_closed_pipe_ends_every_command_quietly(
    engine: Engine, notes: str, app: str, tmp_path: Path
) -> None:
    assert cli("tenants", "init", cwd=tmp_path, url=notes).returncode == 0
    assert (
        cli("tenants", "add", "acme", "--key", "local://acme", cwd=tmp_path, url=notes).returncode
        == 0
    )
    commands = [
        ["status", "--table", "notes", "--column", "body"],
        ["status", "--table", "notes", "--column", "body", "--json"],
        ["tenants", "list"],
        ["tenants", "show", "acme"],
        ["encrypt-column", *TARGET, "--cmk", f"{app}:cmk", "--progress-every", "0"],
        ["verify", *TARGET, "--cmk", f"{app}:cmk", "--progress-every", "0"],
        ["check-tenant", "acme", "--cmk", f"{app}:cmk"],
    ]
    for argv in commands:
        status, err = closed_pipe_run(argv, cwd=tmp_path, url=notes, both=False)
        assert status in (0, 141), (argv, status, err)
        assert "Traceback" not in err and "BrokenPipe" not in err and "Exception" not in err
    # Everything was encrypted although no one read the report.
    assert encrypted(engine) == ROWS
    # Progress to a closed stderr does not stop the work either (`2>&1 | head -0`).
    assert (
        cli("decrypt-column", *TARGET, "--cmk", f"{app}:cmk", cwd=tmp_path, url=notes).returncode
        == 0
    )
    status, _ = closed_pipe_run(
        [
            "encrypt-column",
            *TARGET,
            "--cmk",
            f"{app}:cmk",
            "--batch-size",
            "10",
            "--progress-every",
            "0",
        ],
        cwd=tmp_path,
        url=notes,
        both=True,
    )
    assert status in (0, 141)
    assert encrypted(engine) == ROWS


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_an_interrupted_migration_exits_130_in_one_line(
    engine: Engine, app: str, tmp_path: Path
) -> None:
    """Ctrl-C (SIGINT) mid-run: status 130, one line after the progress, no traceback; the
    same command then finishes the job."""
    import signal

    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE notes (id integer PRIMARY KEY, tenant_id text, body text)"))
        conn.execute(
            text(
                "INSERT INTO notes SELECT g, CASE WHEN g % 2 = 0 THEN 'acme' ELSE 'globex' END, "
                "'value ' || g FROM generate_series(1, 40000) AS g"
            )
        )
    url = database_url(engine)
    script = Path(sys.executable).parent / "sqlalchemy-cmk"
    argv = [str(script), "encrypt-column", *TARGET, "--cmk", f"{app}:cmk"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), SQLALCHEMY_CMK_DATABASE_URL=url)
    proc = subprocess.Popen(
        [*argv, "--batch-size", "50", "--progress-every", "0"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert first.startswith("encrypt notes: "), first
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    failures = [line for line in err.splitlines() if not line.startswith("encrypt notes: ")]
    assert [line for line in failures if line.strip()] == [
        "sqlalchemy-cmk: interrupted: the committed batches stay done; run the same command "
        "again to finish"
    ]
    done = cli(*argv[1:], "--no-progress", cwd=tmp_path, url=url)
    assert done.returncode == 0, done.stderr
    assert encrypted(engine) == 40000
