"""The migration commands on binary (default-storage) columns, run as an operator runs them: the
installed console script in a subprocess. ``rotate`` and ``verify`` without ``--column`` take
every encrypted column of the table; ``decrypt-column --into`` moves binary columns' plaintext
to plain columns; a worker's database error is one scrubbed line.

What is checked is what a user would check: the raw bytes in the table, the exit status, one
line on stderr, and the application reading its rows back."""

from __future__ import annotations

import base64
import importlib
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import sessionmaker

from sqlalchemy_cmk import tenant_context

ROOT = Path(__file__).resolve().parents[1]
TENANTS = ("acme", "globex")
ROWS = 40
SECRET_WORD = "SSN-123-45-6789"  # in every value: no failure may print it

APP = """
import base64

from sqlalchemy import String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_cmk import CMK, EncryptedMixin, EncryptedType, tenant_column
from sqlalchemy_cmk.providers.local import LocalKeyProvider

KEYS = {keys!r}
cmk = CMK(
    LocalKeyProvider({{n: base64.b64decode(k) for n, k in KEYS.items()}}),
    tenant_keys={{"acme": "local://acme", "globex": "local://globex"}},
    audit_sinks=[],
)


class Base(DeclarativeBase):
    pass


class Doc(EncryptedMixin, Base):
    __tablename__ = "cli_docs"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = tenant_column(String(20))
    a: Mapped[str | None] = mapped_column(EncryptedType(String))  # binary (default) storage
    b: Mapped[str | None] = mapped_column(EncryptedType(Text))
    a_plain: Mapped[str | None] = mapped_column(Text)  # decrypt-column --into targets
    b_plain: Mapped[str | None] = mapped_column(Text)
"""


def database_url(engine: Engine) -> str:
    """The engine's URL, with the per-test PostgreSQL schema of conftest in the URL itself."""
    url = engine.url
    if url.get_backend_name() == "postgresql":
        with engine.connect() as conn:
            schema = conn.execute(text("select current_schema()")).scalar_one()
        url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The application module (keys, CMK, model), written to ``tmp_path`` for the command and
    imported here to write and read rows under the same keys."""
    name = f"cmk_cols_{uuid.uuid4().hex[:8]}"
    keys = {n: base64.b64encode(os.urandom(32)).decode() for n in TENANTS}
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(APP.format(keys=keys)))
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    module = importlib.import_module(name)
    yield module
    sys.modules.pop(name, None)


@pytest.fixture
def docs(engine: Engine, app: Any) -> dict[int, tuple[str, str | None, str | None]]:
    """ROWS rows written by the application (binary storage, two columns sharing the
    companion); returns id -> (tenant, a, b)."""
    app.Base.metadata.create_all(engine)
    rows = {
        i: (
            TENANTS[i % 2],
            f"{SECRET_WORD} a-{i}" if i % 5 else None,
            f"{SECRET_WORD} b-{i} ünï" if i % 3 else None,
        )
        for i in range(1, ROWS + 1)
    }
    maker = sessionmaker(engine)
    app.cmk.install(maker)
    for tenant in TENANTS:
        with tenant_context(tenant), maker.begin() as session:
            for i, (t, a, b) in rows.items():
                if t == tenant:
                    session.add(app.Doc(id=i, tenant_id=t, a=a, b=b))
    return rows


def read_back(engine: Engine, app: Any) -> dict[int, tuple[str, str | None, str | None]]:
    """What the application reads: id -> (tenant, a, b)."""
    maker = sessionmaker(engine)
    app.cmk.install(maker)
    out = {}
    for tenant in TENANTS:
        with tenant_context(tenant), maker() as session:
            for d in session.scalars(select(app.Doc).where(app.Doc.tenant_id == tenant)):
                out[d.id] = (d.tenant_id, d.a, d.b)
    return out


def raw(engine: Engine) -> dict[int, tuple[Any, ...]]:
    """The stored bytes: id -> (a, b, a_plain, b_plain, cmk_edek)."""
    with engine.connect() as conn:
        result = conn.execute(
            text("SELECT id, a, b, a_plain, b_plain, cmk_edek FROM cli_docs ORDER BY id")
        )
        return {
            r[0]: tuple(bytes(v) if isinstance(v, (bytes, memoryview)) else v for v in r[1:])
            for r in result
        }


def cli(app: Any, engine: Engine, *argv: str) -> subprocess.CompletedProcess[str]:
    """The installed console script, importing the package from this checkout, in the
    application's directory."""
    script = Path(sys.executable).parent / "sqlalchemy-cmk"
    env = dict(os.environ, PYTHONPATH=str(ROOT), SQLALCHEMY_CMK_DATABASE_URL=database_url(engine))
    env.pop("SQLALCHEMY_CMK_TRACEBACK", None)
    return subprocess.run(
        [str(script), *argv, "--cmk", f"{app.__name__}:cmk", "--no-progress"],
        cwd=Path(app.__file__).parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def one_line_failure(done: subprocess.CompletedProcess[str], status: int) -> str:
    err = done.stderr
    assert "Traceback" not in err, err
    assert done.returncode == status, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sqlalchemy-cmk: "), err
    assert SECRET_WORD not in err and SECRET_WORD not in done.stdout
    return lines[0]


TABLE = ["--table", "cli_docs", "--tenant-column", "tenant_id"]


def test_rotate_and_verify_without_column_take_every_encrypted_column(
    engine: Engine, app: Any, docs: dict[int, tuple[str, str | None, str | None]]
) -> None:
    before = raw(engine)
    done = cli(app, engine, "verify", *TABLE, "--json")  # no --column: found in the database
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["columns"] == ["a", "b"] and report["ok"]
    assert report["encrypted_ok_total"] == sum(1 for _, a, b in docs.values() if a or b)

    # A list leaving b out would strand it: refused, one line naming it, nothing written.
    line = one_line_failure(cli(app, engine, "rotate", *TABLE, "--column", "a"), 1)
    assert "IncompleteColumnsError" in line and "'b'" in line
    assert raw(engine) == before

    done = cli(app, engine, "rotate", *TABLE)
    assert done.returncode == 0, done.stderr
    assert "(a, b)" in done.stdout  # the report names the columns it found
    after = raw(engine)
    for i, (a, b, _, _, edek) in after.items():
        old_a, old_b, _, _, old_edek = before[i]
        if old_edek is None:
            continue
        # A new companion, and each value sealed again under it (not left under the old one).
        assert edek != old_edek, i
        assert (a is None) == (old_a is None) and (a is None or a != old_a), i
        assert (b is None) == (old_b is None) and (b is None or b != old_b), i
    assert read_back(engine, app) == docs

    # With the model: its encrypted columns, and its declared tenant column.
    done = cli(app, engine, "verify", "--table", "cli_docs", "--metadata", f"{app.__name__}:Base")
    assert done.returncode == 0, done.stderr
    assert "(a, b)" in done.stdout and "OK" in done.stdout


def test_verify_without_column_checks_the_second_column_too(
    engine: Engine, app: Any, docs: dict[int, tuple[str, str | None, str | None]]
) -> None:
    """A value of ``b`` moved to another row of the same tenant (a row swap an attacker with
    write access can make) fails verify, though ``a`` of that row is intact."""
    rows = raw(engine)
    pair = [i for i, (a, b, *_rest) in rows.items() if a is not None and b is not None]
    first = pair[0]
    second = next(i for i in pair[1:] if docs[i][0] == docs[first][0])
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE cli_docs SET b = :b WHERE id = :id"), {"b": rows[second][1], "id": first}
        )
    done = cli(app, engine, "verify", *TABLE)
    line = one_line_failure(done, 1)
    assert "1 row(s)" in line and f"FAILED row {first} " in done.stdout


def test_decrypt_column_into_plain_columns(
    engine: Engine, app: Any, docs: dict[int, tuple[str, str | None, str | None]]
) -> None:
    before = raw(engine)
    both = ["--column", "a", "--column", "b"]
    # A binary column's plaintext has no place in it: refused, nothing written.
    line = one_line_failure(cli(app, engine, "decrypt-column", *TABLE, *both), 1)
    assert "--into" in line or "into=" in line
    # A bare TARGET with two columns is ambiguous; a source not among the columns is a typo.
    for into in (["--into", "a_plain"], ["--into", "c=a_plain"], ["--into", "=a_plain"]):
        line = one_line_failure(cli(app, engine, "decrypt-column", *TABLE, *both, *into), 2)
        assert "--into" in line
    assert raw(engine) == before

    workers = ["--workers", "2"] if engine.dialect.name == "postgresql" else []
    done = cli(app, engine, "decrypt-column", *TABLE, "--column", "a", "--into", "a_plain")
    assert done.returncode == 0, done.stderr
    done = cli(
        app, engine, "decrypt-column", *TABLE, "--column", "b", "--into", "b=b_plain", *workers
    )
    assert done.returncode == 0, done.stderr
    after = raw(engine)
    for i, (_, a, b) in docs.items():
        assert after[i][:4] == (None, None, a, b), i
        assert after[i][4] == before[i][4]  # the companion is left in place
    done = cli(
        app, engine, "decrypt-column", *TABLE, *both, "--into", "a=a_plain", "--into", "b=b_plain"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("decrypted 0 row(s)")  # done already: nothing to do
    assert raw(engine) == after


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_a_workers_database_error_is_one_scrubbed_line(
    engine: Engine, app: Any, docs: dict[int, tuple[str, str | None, str | None]]
) -> None:
    """Two workers decrypt into a column whose CHECK refuses the plaintext: PostgreSQL's
    message quotes the row (``Failing row contains (...)``); each worker's failure reaches
    the operator as part of one line without it."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "ALTER TABLE cli_docs ADD CONSTRAINT no_ssn "
                f"CHECK (a_plain NOT LIKE '{SECRET_WORD}%')"
            )
        )
    before = raw(engine)
    done = cli(
        app,
        engine,
        "decrypt-column",
        *TABLE,
        "--column",
        "a",
        "--into",
        "a_plain",
        "--workers",
        "2",
    )
    line = one_line_failure(done, 1)
    assert "no_ssn" in line and "DETAIL" not in line and "[parameters" not in line
    assert raw(engine) == before


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
@pytest.mark.parametrize(
    ("statement", "value", "kept"),
    [
        # DETAIL: Failing row contains (1, SSN-...).
        ("INSERT INTO guarded VALUES (1, :v)", SECRET_WORD, 'violates check constraint "no_ssn"'),
        # invalid input syntax for type integer: "SSN-..."
        ("SELECT CAST(:v AS integer)", SECRET_WORD, "invalid input syntax for type integer"),
        # invalid value "SS" for "MM" (a slice of the value, mid-message)
        ("SELECT to_date(:v, 'MM')", SECRET_WORD, 'for "MM"'),
        # invalid byte sequence for encoding "UTF8": 0xe2 0x28 0xa1 (the value's bytes)
        ("SELECT convert_from(:v, 'UTF8')", b"\xe2\x28\xa1", "invalid byte sequence"),
    ],
)
def test_describe_scrubs_the_databases_own_message(
    engine: Engine, statement: str, value: Any, kept: str
) -> None:
    """``_describe`` (a worker's failure, as the parent prints it) of a raw database error: the
    primary message's gist is kept, the value it quotes is not, nor DETAIL, SQL or parameters."""
    from sqlalchemy.exc import DBAPIError

    from sqlalchemy_cmk.cli._common import _describe

    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE guarded (id int, v text CONSTRAINT no_ssn CHECK (v = ''))"))
    with engine.connect() as conn, pytest.raises(DBAPIError) as caught:
        conn.execute(text(statement), {"v": value})
    line = _describe(caught.value)
    assert kept in line and line.startswith("database error: "), line
    shown = value if isinstance(value, str) else "0xe2"
    assert shown not in line and '"SS"' not in line, line
    for dropped in ("\n", "DETAIL", "[SQL", "[parameters", "Failing row"):
        assert dropped not in line, line


def test_describe_scrubs_another_sqlalchemy_error() -> None:
    from sqlalchemy.exc import InvalidRequestError

    from sqlalchemy_cmk.cli._common import _describe

    line = _describe(InvalidRequestError(f'no such key: "{SECRET_WORD}"\nmore'))
    assert line == "InvalidRequestError: no such key: (value hidden)", line


def sql_only(app: Any, engine: Engine, *argv: str) -> subprocess.CompletedProcess[str]:
    """A command that needs no keys (``status``, ``cutover``): no --cmk, no progress."""
    script = Path(sys.executable).parent / "sqlalchemy-cmk"
    env = dict(os.environ, PYTHONPATH=str(ROOT), SQLALCHEMY_CMK_DATABASE_URL=database_url(engine))
    return subprocess.run(
        [str(script), *argv],
        cwd=Path(app.__file__).parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_encrypt_column_into_moves_text_columns_into_binary_and_back(
    engine: Engine, app: Any, docs: dict[int, tuple[str, str | None, str | None]]
) -> None:
    """The round trip an operator runs: the binary columns' plaintext into the text columns
    (decrypt-column --into), then back into the binary columns (encrypt-column --into), each
    followed by cutover's check; the application reads the binary columns throughout."""
    both = ["--into", "a=a_plain", "--into", "b=b_plain"]
    done = cli(app, engine, "decrypt-column", *TABLE, "--column", "a", "--column", "b", *both)
    assert done.returncode == 0, done.stderr
    ready = sql_only(
        app, engine, "cutover", "--table", "cli_docs", "--column", "a", "--into", "a_plain"
    )
    assert ready.returncode == 0, ready.stderr
    assert "ready to drop" in ready.stdout
    # The forward move has not run: cutover refuses, naming the count, in one line.
    left = sum(1 for _, a, _ in docs.values() if a is not None)
    line = one_line_failure(
        sql_only(
            app, engine, "cutover", "--table", "cli_docs", "--column", "a_plain", "--into", "a"
        ),
        1,
    )
    assert "MoveNotFinishedError" in line and f"{left:,} value(s)" in line
    for wrong, why in (  # invoked wrongly: exit 2, as encrypt-column --into says it
        (["--table", "nope", "--column", "a", "--into", "a_plain"], "does not exist"),
        (["--table", "cli_docs", "--column", "nope", "--into", "a_plain"], "nope"),
        (["--table", "cli_docs", "--column", "a", "--into", "a"], "another column"),
    ):
        line = one_line_failure(sql_only(app, engine, "cutover", *wrong), 2)
        assert why in line, line

    cols = ["--column", "a_plain", "--column", "b_plain"]
    before = raw(engine)
    for into, why in (
        (["--into", "a_plain=a", "--into", "b_plain=b_plain"], "the column itself"),
        (["--into", "a_plain=a", "--into", "b_plain=tenant_id"], "not a binary column"),
        (["--into", "a_plain=a", "--into", "b_plain=nope"], "no column 'nope'"),
        (["--into", "a_plain=a"], "every column"),
    ):
        line = one_line_failure(cli(app, engine, "encrypt-column", *TABLE, *cols, *into), 2)
        assert why in line, line
    assert raw(engine) == before

    workers = ["--workers", "2"] if engine.dialect.name == "postgresql" else []
    forward = ["--into", "a_plain=a", "--into", "b_plain=b", "--max-kms-rps", "200"]
    done = cli(app, engine, "encrypt-column", *TABLE, *cols, *forward, *workers)
    assert done.returncode == 0, done.stderr
    moved = sum(1 for _, a, b in docs.values() if a is not None or b is not None)
    assert done.stdout.startswith(f"encrypted {moved:,} row(s) of cli_docs (a_plain -> a")
    after = raw(engine)
    for i, (_, a, b) in docs.items():
        assert after[i][2:4] == (None, None), i
        for plain, stored in ((a, after[i][0]), (b, after[i][1])):
            assert (stored is None) == (plain is None)
            assert stored is None or SECRET_WORD.encode() not in stored
    assert read_back(engine, app) == docs  # the model's EncryptedType columns read every row
    ready = sql_only(
        app,
        engine,
        "cutover",
        "--table",
        "cli_docs",
        *cols,
        "--into",
        "a_plain=a",
        "--into",
        "b_plain=b",
        "--json",
    )
    assert ready.returncode == 0, ready.stderr
    assert json.loads(ready.stdout)["remaining"] == 0
    again = cli(app, engine, "encrypt-column", *TABLE, *cols, *forward)
    assert again.returncode == 0 and again.stdout.startswith("encrypted 0 row(s)")
