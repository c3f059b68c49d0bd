"""Finding a table's encrypted columns without the models (issue 8, F1).

``rotate_data_keys`` and ``verify`` without ``metadata=`` find the encrypted columns in the
database. They used to try decrypting five sampled values of each binary column: when those
belonged to a revoked or off-boarded tenant, or were tampered with, the column counted as
plain, rotation stranded it (every other tenant's values in it stopped decrypting, exit 0) and
verify skipped it (OK, exit 0). Discovery now reads the stored format of every row with a
companion and never decrypts; what the format cannot settle is refused, not guessed.

Checked as a user would: the application reading its rows back, the raw bytes in the table,
the error type, and the console script's exit status and one-line failure. SQLite and
PostgreSQL, binary and text storage.
"""

from __future__ import annotations

import base64
import importlib
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import sessionmaker

from migrations_helpers import IncompleteColumnsError, rotate_data_keys, verify
from migrations_helpers.backfill import UndeterminedColumnsError
from sqlalchemy_cmk import tenant_context

ROOT = Path(__file__).resolve().parents[2]
TENANTS = ("acme", "initech")
SECRET_WORD = "SSN-987-65-4321"  # in every value: no failure may print it
OFF = range(1, 6)  # initech's rows, the first ones holding b, and only b
ACME = range(10, 14)  # acme's rows: a and b

APP = """
import base64
import os

from sqlalchemy import LargeBinary, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_cmk import CMK, EncryptedMixin, EncryptedType, tenant_column
from sqlalchemy_cmk.providers.local import LocalKeyProvider

KEYS = {keys!r}
# Tenants taken out of the configuration, as an operator does after off-boarding one.
OFF = set(filter(None, os.environ.get("OFFBOARDED", "").split(",")))
cmk = CMK(
    LocalKeyProvider({{n: base64.b64decode(k) for n, k in KEYS.items()}}),
    tenant_keys={{t: f"local://{{t}}" for t in KEYS if t not in OFF}},
    audit_sinks=[],
)


class Base(DeclarativeBase):
    pass


class Doc(EncryptedMixin, Base):
    __tablename__ = "disc_docs"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = tenant_column(String(20))
    a: Mapped[str | None] = mapped_column(EncryptedType(String, storage={storage!r}))
    b: Mapped[str | None] = mapped_column(EncryptedType(String, storage={storage!r}))
    label: Mapped[str | None] = mapped_column(String(40))  # plain text
    blob: Mapped[bytes | None] = mapped_column(LargeBinary)  # plain bytes
"""


def database_url(engine: Engine) -> str:
    """The engine's URL, with the per-test PostgreSQL schema of conftest in the URL itself."""
    url = engine.url
    if url.get_backend_name() == "postgresql":
        with engine.connect() as conn:
            schema = conn.execute(text("select current_schema()")).scalar_one()
        url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture(params=["binary", "text"])
def app(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The application module (keys, CMK, model) in ``tmp_path``, imported here too."""
    name = f"cmk_disc_{uuid.uuid4().hex[:8]}"
    keys = {t: base64.b64encode(os.urandom(32)).decode() for t in TENANTS}
    source = APP.format(keys=keys, storage=request.param)
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    module = importlib.import_module(name)
    yield module
    sys.modules.pop(name, None)


def _session(engine: Engine, app: Any) -> Any:
    maker = sessionmaker(engine)
    app.cmk.install(maker)
    return maker


@pytest.fixture
def docs(engine: Engine, app: Any) -> None:
    """initech's rows first, holding only ``b``; then acme's, holding ``a`` and ``b``. The
    plain columns hold values that must never count as encrypted."""
    app.Base.metadata.create_all(engine)
    maker = _session(engine, app)
    with tenant_context("initech"), maker.begin() as session:
        for i in OFF:
            session.add(app.Doc(id=i, tenant_id="initech", b=f"{SECRET_WORD} ib-{i}"))
    with tenant_context("acme"), maker.begin() as session:
        for i in ACME:
            session.add(
                app.Doc(
                    id=i,
                    tenant_id="acme",
                    a=f"{SECRET_WORD} a-{i}",
                    b=f"{SECRET_WORD} b-{i}",
                    label=f"label {i}",
                    blob=b"\x89PNG" + bytes(40),
                )
            )


def acme_reads(engine: Engine, app: Any) -> dict[int, tuple[str | None, str | None]]:
    maker = _session(engine, app)
    with tenant_context("acme"), maker() as session:
        return {
            d.id: (d.a, d.b)
            for d in session.scalars(
                select(app.Doc).where(app.Doc.tenant_id == "acme").order_by(app.Doc.id)
            )
        }


def acme_expected() -> dict[int, tuple[str | None, str | None]]:
    return {i: (f"{SECRET_WORD} a-{i}", f"{SECRET_WORD} b-{i}") for i in ACME}


def raw(engine: Engine) -> dict[int, tuple[Any, ...]]:
    """The stored values: id -> (a, b, cmk_edek)."""
    with engine.connect() as conn:
        result = conn.execute(text("SELECT id, a, b, cmk_edek FROM disc_docs ORDER BY id"))
        return {
            r[0]: tuple(bytes(v) if isinstance(v, (bytes, memoryview)) else v for v in r[1:])
            for r in result
        }


def overwrite(engine: Engine, column: str, ids: range, value: Any) -> None:
    with engine.begin() as conn:
        for i in ids:
            conn.execute(
                text(f"UPDATE disc_docs SET {column} = :v WHERE id = :i"), {"v": value, "i": i}
            )


def unsealed(app: Any) -> Any:
    """A value that is not in the sealed format of the app's storage."""
    return b"\x02not sealed at all, not even close" if _storage(app) == "binary" else "plain"


def _storage(app: Any) -> str:
    return str(app.Doc.__table__.c.a.type.storage)


# -- the Python API --------------------------------------------------------------------------


@pytest.mark.usefixtures("docs")
def test_rotate_without_models_takes_a_column_only_a_revoked_tenant_shows_first(
    engine: Engine, app: Any
) -> None:
    app.cmk.revoke("initech")
    before = raw(engine)
    report = rotate_data_keys(
        engine, app.cmk, "disc_docs", tenant="acme", tenant_column="tenant_id"
    )
    assert report.columns == ("a", "b") and report.rows == len(ACME)
    after = raw(engine)
    for i in ACME:  # new companion, both values sealed again under it
        assert after[i][2] != before[i][2]
        assert after[i][0] != before[i][0] and after[i][1] != before[i][1]
    assert all(after[i] == before[i] for i in OFF)  # the revoked tenant's rows untouched
    assert acme_reads(engine, app) == acme_expected()


@pytest.mark.usefixtures("docs")
def test_verify_without_models_checks_a_column_only_a_revoked_tenant_shows_first(
    engine: Engine, app: Any
) -> None:
    app.cmk.revoke("initech")
    report = verify(engine, app.cmk, "disc_docs", tenant_column="tenant_id")
    assert report.columns == ("a", "b")
    assert report.checked == len(OFF) + len(ACME)
    assert report.encrypted_ok == {"acme": len(ACME)}
    assert report.failed == {"initech": len(OFF)} and not report.ok


def test_verify_without_models_finds_tampered_values(engine: Engine, app: Any) -> None:
    """Six rows' values swapped among themselves: every sampled value fails, yet the column is
    found (it is in the sealed format), and the six rows fail."""
    app.Base.metadata.create_all(engine)
    maker = _session(engine, app)
    with tenant_context("acme"), maker.begin() as session:
        session.add_all(
            app.Doc(id=i, tenant_id="acme", a=f"{SECRET_WORD} {i}") for i in range(1, 21)
        )
    stored = [raw(engine)[i][0] for i in range(1, 7)]
    with engine.begin() as conn:
        for i, v in enumerate(stored[1:] + stored[:1], 1):
            conn.execute(text("UPDATE disc_docs SET a = :v WHERE id = :i"), {"v": v, "i": i})
    report = verify(engine, app.cmk, "disc_docs", tenant_column="tenant_id")
    assert report.columns == ("a",) and report.checked == 20
    assert report.failed == {"acme": 6} and not report.ok
    assert {pk for pk, _, _ in report.failures} == {str(i) for i in range(1, 7)}


@pytest.mark.usefixtures("docs")
def test_a_binary_column_of_sealed_and_unsealed_values_is_refused_not_guessed(
    engine: Engine, app: Any
) -> None:
    if _storage(app) == "text":
        pytest.skip("text storage holds plaintext beside ciphertext by design")
    overwrite(engine, "b", OFF, unsealed(app))
    before = raw(engine)
    with pytest.raises(UndeterminedColumnsError) as caught:
        rotate_data_keys(engine, app.cmk, "disc_docs", tenant="acme", tenant_column="tenant_id")
    assert isinstance(caught.value, IncompleteColumnsError) and caught.value.missing == ("b",)
    assert SECRET_WORD not in str(caught.value)
    assert raw(engine) == before  # nothing written
    with pytest.raises(UndeterminedColumnsError):
        rotate_data_keys(engine, app.cmk, "disc_docs", ["a"], tenant_column="tenant_id")
    with pytest.raises(UndeterminedColumnsError):
        verify(engine, app.cmk, "disc_docs", tenant_column="tenant_id")
    # The models settle it: b is encrypted, and the overwritten rows fail verification.
    report = verify(engine, app.cmk, "disc_docs", metadata=app.Base)
    assert report.columns == ("a", "b") and report.failed == {"initech": len(OFF)}
    assert raw(engine) == before


@pytest.mark.usefixtures("docs")
def test_companions_with_no_sealed_value_anywhere_are_not_reported_ok(
    engine: Engine, app: Any
) -> None:
    every = range(1, 14)
    overwrite(engine, "a", every, unsealed(app))
    overwrite(engine, "b", every, unsealed(app))
    before = raw(engine)
    with pytest.raises(UndeterminedColumnsError) as caught:
        verify(engine, app.cmk, "disc_docs", tenant_column="tenant_id")
    assert caught.value.missing == ()
    with pytest.raises(UndeterminedColumnsError):
        rotate_data_keys(engine, app.cmk, "disc_docs", tenant_column="tenant_id")
    assert raw(engine) == before


@pytest.mark.usefixtures("docs")
def test_plain_columns_are_not_taken_for_encrypted_ones(engine: Engine, app: Any) -> None:
    report = verify(engine, app.cmk, "disc_docs", tenant_column="tenant_id")
    assert report.columns == ("a", "b") and report.ok


def test_a_table_without_companions_has_no_encrypted_columns(engine: Engine, app: Any) -> None:
    app.Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO disc_docs (id, tenant_id, label) VALUES (1, 'acme', 'x')"))
    report = verify(engine, app.cmk, "disc_docs", tenant_column="tenant_id")
    assert report.columns == () and report.checked == 0


# -- the console script ----------------------------------------------------------------------


def cli(
    app: Any, engine: Engine, *argv: str, offboarded: str = ""
) -> subprocess.CompletedProcess[str]:
    """The installed console script, importing the package from this checkout, in the
    application's directory; ``offboarded`` tenants are out of its configuration."""
    script = Path(sys.executable).parent / "sqlalchemy-cmk"
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        SQLALCHEMY_CMK_DATABASE_URL=database_url(engine),
        OFFBOARDED=offboarded,
    )
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


@pytest.mark.usefixtures("docs")
def test_cli_rotate_for_one_tenant_after_another_is_offboarded(engine: Engine, app: Any) -> None:
    table = ("--table", "disc_docs", "--tenant-column", "tenant_id")
    done = cli(app, engine, "rotate", *table, "--tenant", "acme", offboarded="initech")
    assert done.returncode == 0, done.stderr
    assert acme_reads(engine, app) == acme_expected()
    # verify without --metadata checks b too, and fails on the off-boarded tenant's rows.
    done = cli(app, engine, "verify", *table, offboarded="initech")
    assert "(a, b)" in done.stdout, done.stdout
    assert "verify failed" in one_line_failure(done, 1)
    assert cli(app, engine, "verify", *table).returncode == 0  # all tenants configured


@pytest.mark.usefixtures("docs")
def test_cli_refuses_what_the_stored_format_cannot_settle(engine: Engine, app: Any) -> None:
    table = ("--table", "disc_docs", "--tenant-column", "tenant_id")
    if _storage(app) == "binary":
        overwrite(engine, "b", OFF, unsealed(app))
    else:  # text: nothing sealed anywhere, though every row has a companion
        overwrite(engine, "a", range(1, 14), unsealed(app))
        overwrite(engine, "b", range(1, 14), unsealed(app))
    before = raw(engine)
    for argv in (("rotate", *table, "--tenant", "acme"), ("verify", *table)):
        line = one_line_failure(cli(app, engine, *argv), 1)
        assert "UndeterminedColumnsError" in line, line
    assert raw(engine) == before
