"""The ``sqlalchemy-cmk`` command line: ``main(argv)`` in-process on SQLite and PostgreSQL, and
the installed console script in a subprocess."""

from __future__ import annotations

import base64
import datetime
import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from sqlalchemy_cmk.cli import main
from sqlalchemy_cmk.registry_db import DatabaseKeyRegistry

SECRET = os.urandom(32)
ROLE = "arn:aws:iam::111122223333:role/acme-cmk"


def database_url(engine: Engine) -> str:
    """The engine's URL, with the per-test PostgreSQL schema of conftest in the URL itself."""
    url = engine.url
    if url.get_backend_name() == "postgresql":
        with engine.connect() as conn:
            schema = conn.execute(text("select current_schema()")).scalar_one()
        url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture
def cli_env(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Engine:
    monkeypatch.setenv("SQLALCHEMY_CMK_DATABASE_URL", database_url(engine))
    monkeypatch.setenv("SQLALCHEMY_CMK_REGISTRY_SECRET", base64.b64encode(SECRET).decode())
    monkeypatch.setenv("SQLALCHEMY_CMK_REGISTRY_ID", "test-eu")
    assert main(["tenants", "init"]) == 0
    return engine


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_tenant_lifecycle(cli_env: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "tenants",
        "add",
        "acme",
        "--key",
        "fake://acme-2",
        "--accept",
        "fake://acme-1",
        "--credential",
        f"role_arn={ROLE}",
    )
    assert code == 0
    assert "tenant acme: added (version 1)" in out and "fake://acme-2" in out
    assert f"credential:    role_arn={ROLE}" in out
    assert run(capsys, "tenants", "add", "globex", "--key", "fake://globex")[0] == 0

    code, out, _ = run(capsys, "tenants", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "TENANT",
        "STATUS",
        "VERSION",
        "PRIMARY",
        "ALSO",
        "ACCEPTED",
        "UPDATED",
    ]
    assert lines[1].split()[:5] == ["acme", "enabled", "1", "fake://acme-2", "fake://acme-1"]
    assert lines[2].split()[:5] == ["globex", "enabled", "1", "fake://globex", "-"]

    assert run(capsys, "tenants", "set-primary", "acme", "fake://acme-3")[0] == 0
    assert run(capsys, "tenants", "add-key", "acme", "fake://acme-4")[0] == 0
    code, out, _ = run(capsys, "tenants", "remove-key", "acme", "fake://acme-1")
    assert code == 0 and "key removed (version 4)" in out
    assert run(capsys, "tenants", "disable", "globex")[0] == 0

    code, out, _ = run(capsys, "tenants", "list", "--json")
    assert code == 0
    doc = {t["tenant"]: t for t in json.loads(out)}
    assert doc["acme"]["primary"] == "fake://acme-3"
    assert doc["acme"]["accepted"] == ["fake://acme-2", "fake://acme-3", "fake://acme-4"]
    assert doc["acme"]["credentials"] == {"role_arn": ROLE}
    assert doc["acme"]["version"] == 4
    assert doc["globex"]["disabled"] is True

    code, out, _ = run(capsys, "tenants", "show", "globex", "--json")
    assert json.loads(out)["disabled"] is True
    assert run(capsys, "tenants", "enable", "globex")[0] == 0
    code, out, _ = run(capsys, "tenants", "show", "globex")
    assert out.startswith("tenant globex\n")
    assert "status:        enabled" in out and "version:       3 (" in out

    # What the CLI wrote, the application's registry reads.
    registry = DatabaseKeyRegistry(cli_env, SECRET, registry_id="test-eu")
    assert registry.tenant_keys("acme").primary == "fake://acme-3"
    code, out, _ = run(capsys, "tenants", "verify")
    assert (code, out.strip()) == (0, "all rows of cmk_tenants verified")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tenants", "remove-key", "acme", "fake://acme"], "primary key of tenant 'acme'"),
        (["tenants", "add", "acme", "--key", "fake://x"], "already exists"),
        (["tenants", "add", "new", "--key", "no-scheme"], "not a URI"),
        (
            ["tenants", "add", "new", "--key", "fake://x", "--credential", "client_secret=abc"],
            "looks like a secret",
        ),
        (["tenants", "set-primary", "nobody", "fake://x"], "not in the key registry"),
        (["tenants", "set-primary", "acme", "fake://x", "--if-version", "7"], "RegistryConflict"),
    ],
)
def test_refused_changes_exit_1_and_say_why(
    cli_env: Engine, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert run(capsys, "tenants", "add", "acme", "--key", "fake://acme")[0] == 0
    code, out, err = run(capsys, *argv)
    assert code == 1
    assert message in err
    assert out == ""


def test_verify_finds_tampered_rows(cli_env: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    for tenant in ("acme", "globex"):
        assert run(capsys, "tenants", "add", tenant, "--key", f"fake://{tenant}")[0] == 0
    with cli_env.begin() as conn:
        conn.execute(
            text("update cmk_tenants set primary_key_ref = 'fake://evil' where tenant_id = 'acme'")
        )
    code, out, _ = run(capsys, "tenants", "verify")
    assert code == 1
    assert out.startswith("TAMPERED acme: ") and "1 bad row(s)" in out and "globex" not in out
    code, out, _ = run(capsys, "tenants", "verify", "--json")
    assert code == 1
    assert [p["tenant"] for p in json.loads(out)["problems"]] == ["acme"]
    code, _, err = run(capsys, "tenants", "list")
    assert code == 1 and "RegistryIntegrityError" in err and "'acme'" in err


def test_verify_against_a_snapshot_finds_a_replayed_row(
    cli_env: Engine, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert run(capsys, "tenants", "add", "acme", "--key", "fake://acme-1")[0] == 0
    with cli_env.connect() as conn:
        old = dict(conn.execute(text("select * from cmk_tenants")).one()._mapping)
    assert run(capsys, "tenants", "set-primary", "acme", "fake://acme-2")[0] == 0
    snapshot = tmp_path / "snapshot.json"
    code, out, _ = run(capsys, "tenants", "list", "--json")
    snapshot.write_text(out)
    with cli_env.begin() as conn:  # put the genuine version-1 row back
        cols = [c for c in old if c != "tenant_id"]
        conn.execute(
            text(f"update cmk_tenants set {', '.join(f'{c} = :{c}' for c in cols)}"),
            {c: old[c] for c in cols},
        )
    assert run(capsys, "tenants", "verify")[0] == 0  # the MAC alone cannot tell
    code, out, _ = run(capsys, "tenants", "verify", "--expect", str(snapshot))
    assert code == 1 and "TAMPERED acme" in out and "the snapshot expects" in out
    snapshot.write_text("[{}]")
    assert run(capsys, "tenants", "verify", "--expect", str(snapshot))[0] == 2


def test_reseal_takes_the_new_secret_from_the_environment(
    cli_env: Engine, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run(capsys, "tenants", "add", "acme", "--key", "fake://acme")[0] == 0
    code, _, err = run(capsys, "tenants", "reseal")
    assert code == 2 and "SQLALCHEMY_CMK_NEW_REGISTRY_SECRET" in err
    monkeypatch.setenv("SQLALCHEMY_CMK_NEW_REGISTRY_SECRET", base64.b64encode(b"x" * 8).decode())
    assert run(capsys, "tenants", "reseal")[0] == 2
    new_secret = os.urandom(32)
    monkeypatch.setenv("SQLALCHEMY_CMK_NEW_REGISTRY_SECRET", base64.b64encode(new_secret).decode())
    code, out, _ = run(capsys, "tenants", "reseal")
    assert code == 0 and "1 row(s) of cmk_tenants resealed" in out
    assert run(capsys, "tenants", "verify")[0] == 1  # the old secret no longer verifies
    monkeypatch.setenv("SQLALCHEMY_CMK_REGISTRY_SECRET", base64.b64encode(new_secret).decode())
    assert run(capsys, "tenants", "verify")[0] == 0


# -- registry identity, MAC versions and output that cannot be forged ------------------------


def test_bad_tenant_ids_are_refused_and_printed_escaped(
    cli_env: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    forged = "acme\nglobex    enabled  1        fake://evil"
    code, out, err = run(capsys, "tenants", "add", forged, "--key", "fake://acme")
    assert code == 1 and out == ""
    assert "is refused" in err and "not printable" in err
    assert err.count("\n") == 1  # one line: the id's newline is escaped, not printed
    assert run(capsys, "tenants", "show", "acme\x00")[0] == 1  # unknown, not a driver error
    # Ids with spaces are allowed, and quoted in the table so no column can be faked.
    assert run(capsys, "tenants", "add", "acme corp  enabled", "--key", "fake://a")[0] == 0
    code, out, _ = run(capsys, "tenants", "list")
    assert code == 0 and out.splitlines()[1].startswith("'acme corp  enabled'  enabled")


def test_a_legacy_row_cannot_forge_verify_or_list_output(
    cli_env: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "tenants", "add", "acme", "--key", "fake://acme")[0] == 0
    with cli_env.connect() as conn:
        row = dict(conn.execute(text("select * from cmk_tenants")).one()._mapping)
    row["tenant_id"] = "x\nTAMPERED globex: all good\u202e"  # written by hand, or by ec93feb
    binds = ", ".join(":" + c for c in row)
    with cli_env.begin() as conn:
        conn.execute(
            text(f"insert into cmk_tenants ({', '.join(row)}) values ({binds})"),
            row,
        )
    code, out, _ = run(capsys, "tenants", "verify")
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("TAMPERED 'x\\nTAMPERED globex")
    assert all(line.isprintable() for line in lines)
    code, out, err = run(capsys, "tenants", "list")
    assert code == 1 and err.count("\n") == 1 and "\u202e" not in err


def test_the_registry_id_is_required_and_binds_the_rows(
    cli_env: Engine, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run(capsys, "tenants", "add", "acme", "--key", "fake://acme")[0] == 0
    monkeypatch.delenv("SQLALCHEMY_CMK_REGISTRY_ID")
    code, _, err = run(capsys, "tenants", "list")
    assert code == 2 and "--registry-id" in err and "SQLALCHEMY_CMK_REGISTRY_ID" in err
    code, _, err = run(capsys, "tenants", "list", "--registry-id", "prod\neu")
    assert code == 2 and "not printable" in err
    # The same table read as another deployment: every row refused.
    code, out, _ = run(capsys, "tenants", "verify", "--registry-id", "staging-eu")
    assert code == 1 and out.startswith("TAMPERED acme: ")
    assert run(capsys, "tenants", "verify", "--registry-id", "test-eu")[0] == 0


def test_upgrade_mac_rewrites_rows_from_before_registry_id(
    cli_env: Engine, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A row written by ec93feb (its golden MAC; see tests/test_registry_db.py).
    monkeypatch.setenv(
        "SQLALCHEMY_CMK_REGISTRY_SECRET", base64.b64encode(bytes(range(32))).decode()
    )
    with cli_env.begin() as conn:
        conn.execute(
            text(
                # The columns named: the table has the audit column now, the old row none.
                "insert into cmk_tenants (tenant_id, primary_key_ref, accepted_key_refs, "
                "credentials, disabled, version, updated_at, mac) values ('acme', 'fake://acme-2', "
                '\'["fake://acme-1","fake://acme-2"]\', '
                '\'{"role_arn":"arn:aws:iam::111122223333:role/acme-cmk"}\', '
                ":f, 3, :at, '36206c910a23900ef4efe18422b9840a2c353ad4fb9e03da052db284e6090c39')"
            ),
            {
                "f": False,
                "at": datetime.datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=datetime.timezone.utc),
            },
        )
    code, _, err = run(capsys, "tenants", "show", "acme")
    assert code == 1 and "tenants upgrade-mac" in err
    code, out, _ = run(capsys, "tenants", "show", "acme", "--allow-v1-macs")
    assert code == 0 and "primary:       fake://acme-2" in out
    code, out, _ = run(capsys, "tenants", "upgrade-mac")
    assert code == 0 and "1 row(s) of cmk_tenants upgraded to MAC version 2" in out
    code, out, _ = run(capsys, "tenants", "show", "acme", "--json")
    assert code == 0 and json.loads(out)["version"] == 4
    assert run(capsys, "tenants", "verify")[0] == 0
    code, out, _ = run(capsys, "tenants", "upgrade-mac")
    assert code == 0 and out.startswith("0 row(s)")


# -- configuration errors: exit 2 ------------------------------------------------------------


def test_missing_or_bad_configuration_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.delenv("SQLALCHEMY_CMK_DATABASE_URL", raising=False)
    monkeypatch.delenv("SQLALCHEMY_CMK_REGISTRY_SECRET", raising=False)
    url = f"sqlite:///{tmp_path}/r.db"
    code, _, err = run(capsys, "tenants", "list", "--database-url", url)
    assert code == 2 and "SQLALCHEMY_CMK_REGISTRY_SECRET" in err
    monkeypatch.setenv("SQLALCHEMY_CMK_REGISTRY_SECRET", base64.b64encode(SECRET).decode())
    monkeypatch.setenv("SQLALCHEMY_CMK_REGISTRY_ID", "test-eu")
    code, _, err = run(capsys, "tenants", "list")
    assert code == 2 and "--database-url" in err and "SQLALCHEMY_CMK_DATABASE_URL" in err
    code, _, err = run(capsys, "tenants", "list", "--database-url", "not a url")
    assert code == 2 and "invalid database URL" in err
    monkeypatch.setenv("SQLALCHEMY_CMK_REGISTRY_SECRET", "%%% not base64")
    code, _, err = run(capsys, "tenants", "list", "--database-url", url)
    assert code == 2 and "not valid base64" in err
    monkeypatch.setenv("SQLALCHEMY_CMK_REGISTRY_SECRET", base64.b64encode(b"short").decode())
    code, _, err = run(capsys, "tenants", "list", "--database-url", url)
    assert code == 2 and "at least 32" in err
    # The secret is never a flag.
    code, _, err = run(capsys, "tenants", "list", "--secret", "abc")
    assert code == 2 and "unrecognized arguments" in err
    assert run(capsys, "tenants")[0] == 2
    assert run(capsys, "--help")[0] == 0


def test_missing_table_is_explained(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("SQLALCHEMY_CMK_REGISTRY_SECRET", base64.b64encode(SECRET).decode())
    monkeypatch.setenv("SQLALCHEMY_CMK_REGISTRY_ID", "test-eu")
    code, _, err = run(capsys, "tenants", "list", "--database-url", f"sqlite:///{tmp_path}/e.db")
    assert code == 1 and "tenants init" in err


# -- check-tenant ----------------------------------------------------------------------------


@pytest.fixture
def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A tiny application module defining a CMK whose tenant "revoked" has a revoked key."""
    name = f"cmk_app_{uuid.uuid4().hex[:8]}"
    keys = {n: base64.b64encode(os.urandom(32)).decode() for n in ("acme", "revoked")}
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            f"""
            import base64

            from sqlalchemy_cmk import CMK
            from sqlalchemy_cmk.providers.local import LocalKeyProvider

            provider = LocalKeyProvider(
                {{name: base64.b64decode(key) for name, key in {keys!r}.items()}}
            )
            provider.revoke("revoked")
            cmk = CMK(
                provider,
                tenant_keys={{"acme": "local://acme", "revoked": "local://revoked"}},
                audit_sinks=[],
            )

            def make_cmk():
                return cmk

            engines = []

            def make_registry_cmk():
                # What an application does: the tenants live in the database registry.
                import os

                from sqlalchemy import create_engine

                from sqlalchemy_cmk.registry_db import DatabaseKeyRegistry

                engines.append(create_engine(os.environ["SQLALCHEMY_CMK_DATABASE_URL"]))
                secret = base64.b64decode(os.environ["SQLALCHEMY_CMK_REGISTRY_SECRET"])
                registry = DatabaseKeyRegistry(engines[-1], secret, registry_id="test-eu")
                return CMK(provider, registry=registry, audit_sinks=[])
            """
        )
    )
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI adds --app-dir to it
    yield name
    module = sys.modules.pop(name, None)
    for engine in getattr(module, "engines", []):
        engine.dispose()


def test_check_tenant_ok(
    app_module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys, "check-tenant", "acme", "--cmk", f"{app_module}:cmk", "--app-dir", str(tmp_path)
    )
    assert code == 0
    assert out.splitlines()[0] == "tenant acme: OK"
    assert "[ok] registry: primary local://acme" in out
    assert "[ok] wrap+unwrap: probe key round trip" in out
    code, out, _ = run(
        capsys,
        "check-tenant",
        "acme",
        "--cmk",
        f"{app_module}:make_cmk",
        "--app-dir",
        str(tmp_path),
        "--json",
    )
    doc = json.loads(out)
    assert code == 0 and doc["ok"] is True and doc["key_ref"] == "local://acme"
    assert [s["name"] for s in doc["steps"]] == ["registry", "wrap+unwrap"]


def test_check_tenant_with_a_revoked_key_exits_1_with_a_diagnosis(
    app_module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--cmk", f"{app_module}:cmk", "--app-dir", str(tmp_path)]
    code, out, _ = run(capsys, "check-tenant", "revoked", *argv)
    assert code == 1
    assert out.splitlines()[0] == "tenant revoked: FAILED"
    assert "[FAIL] wrap+unwrap: KeyAccessDeniedError for local://revoked" in out
    assert "the tenant's KMS refused" in out
    code, out, _ = run(capsys, "check-tenant", "nobody", *argv)
    assert code == 1 and "[FAIL] registry" in out


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "module:attribute"),
        ("no_such_module_xyz:cmk", "cannot import"),
        ("{app}:nothing", "has no attribute"),
        ("{app}:provider", "not a CMK"),
    ],
)
def test_check_tenant_bad_cmk_spec_exits_2(
    app_module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str, message: str
) -> None:
    spec = spec.format(app=app_module)
    code, _, err = run(capsys, "check-tenant", "acme", "--cmk", spec, "--app-dir", str(tmp_path))
    assert code == 2 and message in err


# -- the installed console script ------------------------------------------------------------


def console_script() -> str:
    found = shutil.which("sqlalchemy-cmk", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("the sqlalchemy-cmk console script is not installed: pip install -e .")
    return found


def test_onboarding_flow_through_the_console_script(
    app_module: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Register tenants, then prove their keys work through the application's own CMK, which
    reads the registry; the installed command is run as an operator would run it."""
    monkeypatch.setenv("SQLALCHEMY_CMK_DATABASE_URL", f"sqlite:///{tmp_path}/registry.db")
    monkeypatch.setenv("SQLALCHEMY_CMK_REGISTRY_SECRET", base64.b64encode(SECRET).decode())
    monkeypatch.setenv("SQLALCHEMY_CMK_REGISTRY_ID", "test-eu")
    assert run(capsys, "tenants", "init")[0] == 0
    assert run(capsys, "tenants", "add", "acme", "--key", "local://acme")[0] == 0
    assert run(capsys, "tenants", "add", "revoked", "--key", "local://revoked")[0] == 0
    argv = ["--cmk", f"{app_module}:make_registry_cmk", "--app-dir", str(tmp_path)]
    code, out, _ = run(capsys, "check-tenant", "acme", *argv)
    assert code == 0 and "[ok] registry: primary local://acme" in out

    script = console_script()
    done = subprocess.run(
        [script, "tenants", "list", "--json"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [t["tenant"] for t in json.loads(done.stdout)] == ["acme", "revoked"]
    # check-tenant imports the application's module from the current directory by default.
    done = subprocess.run(
        [script, "check-tenant", "revoked", "--cmk", f"{app_module}:make_registry_cmk"],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "tenant revoked: FAILED" in done.stdout
    assert "KeyAccessDeniedError for local://revoked" in done.stdout
