"""``sqlalchemy-cmk keys``: a local key file made and changed from the command line, read by
``LocalKeyProvider`` afterwards, and never a key replaced."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sqlalchemy_cmk import CMK, tenant_context
from sqlalchemy_cmk.cli import main
from sqlalchemy_cmk.errors import KeyNotFoundError
from sqlalchemy_cmk.providers.local import LocalKeyProvider


def keys(*argv: str | Path) -> int:
    return main(["keys", *map(str, argv)])


def key_bytes(path: Path) -> dict[str, str]:
    return dict(json.loads(path.read_text())["keys"])


def test_init_makes_a_private_file_the_provider_reads(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    assert keys("init", path, "--tenant", "acme", "--tenant", "globex") == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    provider = LocalKeyProvider.from_file(path)
    assert provider.tenant_keys == {"acme": ["local://acme"], "globex": ["local://globex"]}
    cmk = CMK(provider, tenant_keys=provider.tenant_keys)
    for tenant in ("acme", "globex"):
        with tenant_context(tenant):
            assert cmk.decrypt_document(cmk.encrypt_document({"f": b"x"})) == {"f": b"x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json"]  # no temporary left


def test_init_never_replaces_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.json"
    assert keys("init", path, "--tenant", "acme") == 0
    before = path.read_bytes()
    assert keys("init", path, "--tenant", "globex") == 1
    assert path.read_bytes() == before
    err = capsys.readouterr().err
    assert err.startswith("sqlalchemy-cmk: ") and err.count("\n") == 1
    assert "refusing to overwrite" in err


def test_data_sealed_before_a_rotate_opens_after_it(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    assert keys("init", path, "--tenant", "acme") == 0
    provider = LocalKeyProvider.from_file(path)
    with tenant_context("acme"):
        old = CMK(provider, tenant_keys=provider.tenant_keys).encrypt_document({"f": b"old"})
    acme_key = key_bytes(path)["acme"]

    assert keys("rotate", path, "--tenant", "acme") == 0
    assert key_bytes(path)["acme"] == acme_key  # the old key, unchanged
    provider = LocalKeyProvider.from_file(path)
    assert provider.tenant_keys == {"acme": ["local://acme-2", "local://acme"]}
    cmk = CMK(provider, tenant_keys=provider.tenant_keys)
    with tenant_context("acme"):
        assert cmk.decrypt_document(old) == {"f": b"old"}
        new = cmk.encrypt_document({"f": b"new"})
    # The new key is the primary: the new key alone opens the new document, and not the old
    # one (the rotate kept the key that mattered).
    only_new = LocalKeyProvider({"acme-2": base64.b64decode(key_bytes(path)["acme-2"])})
    with tenant_context("acme"):
        cmk = CMK(only_new, tenant_keys={"acme": ["local://acme-2", "local://acme"]})
        assert cmk.decrypt_document(new) == {"f": b"new"}
        with pytest.raises(KeyNotFoundError):
            cmk.decrypt_document(old)


def test_a_file_from_generate_key_file_can_be_rotated(tmp_path: Path) -> None:
    path = LocalKeyProvider.generate_key_file(tmp_path / "keys.json", ["acme"])
    before = key_bytes(path)
    assert keys("rotate", path, "--tenant", "acme", "--key-id", "acme-2027") == 0
    assert key_bytes(path)["acme"] == before["acme"]
    provider = LocalKeyProvider.from_file(path)
    assert provider.tenant_keys == {"acme": ["local://acme-2027", "local://acme"]}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(("mode", "kept"), [(0o640, 0o640), (0o400, 0o400), (0o644, 0o640)])
def test_a_change_keeps_the_mode_given_to_the_file_never_for_others(
    tmp_path: Path, mode: int, kept: int
) -> None:
    """An operator who made the file group-readable for the application's user must not find
    it 0600 (an outage at the next start) after `keys add`; bits for others are dropped."""
    path = tmp_path / "keys.json"
    assert keys("init", path, "--tenant", "acme") == 0
    path.chmod(mode)
    assert keys("add", path, "--tenant", "globex") == 0
    assert stat.S_IMODE(path.stat().st_mode) == kept
    assert LocalKeyProvider.from_file(path).tenant_keys["globex"] == ["local://globex"]


@pytest.mark.parametrize(
    ("argv", "status", "says"),
    [
        (["add", "--tenant", "acme"], 1, "already has keys"),
        (["add", "--tenant", "initech", "--key-id", "acme"], 1, "refusing to replace a key"),
        (["rotate", "--tenant", "acme", "--key-id", "acme"], 1, "refusing to replace a key"),
        (["rotate", "--tenant", "initech"], 1, "no key in the file to rotate"),
        (["add", "--tenant", "initech", "--key-id", "a,b"], 2, "a key id is"),
        (["add", "--tenant", "bad\nid"], 2, "printable"),
    ],
)
def test_refused_changes_leave_the_file_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], status: int, says: str
) -> None:
    path = tmp_path / "keys.json"
    assert keys("init", path, "--tenant", "acme") == 0
    before = path.read_bytes()
    assert keys(argv[0], path, *argv[1:]) == status
    assert path.read_bytes() == before
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err


def test_add_and_list_show_names_never_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.json"
    assert keys("init", path) == 0
    assert keys("add", path, "--tenant", "acme", "--key-id", "acme-2026") == 0
    assert keys("rotate", path, "--tenant", "acme") == 0
    assert keys("add", path, "--tenant", "globex") == 0
    capsys.readouterr()
    assert keys("list", path) == 0
    table = capsys.readouterr().out
    assert table.split() == [
        *("TENANT", "PRIMARY", "ALSO", "ACCEPTED"),
        *("acme", "acme", "acme-2026"),
        *("globex", "globex", "-"),
    ]
    assert keys("list", path, "--json") == 0
    printed = capsys.readouterr().out
    assert json.loads(printed) == {
        "tenants": {"acme": ["acme", "acme-2026"], "globex": ["globex"]},
        "unassigned_keys": [],
    }
    for secret in key_bytes(path).values():
        assert secret not in table + printed


def test_a_missing_or_broken_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert keys("list", tmp_path / "none.json") == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text('{"keys": {"acme": "c2VjcmV0IGJ5dGVz"')  # cut short; holds a "key"
    assert keys("rotate", broken, "--tenant", "acme") == 1
    err = capsys.readouterr().err
    assert "not a key file" in err and "c2VjcmV0" not in err and err.count("\n") == 1
    # Keys and tenants checked as the provider checks them at start-up, before any change.
    key = base64.b64encode(os.urandom(32)).decode()
    for doc, says in (
        ({"keys": {"acme": key}, "tenants": ["acme"]}, "not a key file"),
        ({"keys": {"acme": key}, "tenants": {"acme": ["gone"]}}, "must name one or more"),
        ({"keys": {"acme": "c2hvcnQ="}}, "must be 32 bytes"),
    ):
        broken.write_text(json.dumps(doc))
        before = broken.read_bytes()
        assert keys("rotate", broken, "--tenant", "acme") == 1
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1 and key not in err
        assert broken.read_bytes() == before


def test_concurrent_rotates_all_land(tmp_path: Path) -> None:
    # Four processes rotate at once: each reads, adds and renames under the file's lock, so
    # none of them writes over another's new key.
    path = tmp_path / "keys.json"
    assert keys("init", path, "--tenant", "acme") == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    rotate = [sys.executable, "-m", "sqlalchemy_cmk.cli", "keys", "rotate", str(path)]
    procs = [
        subprocess.Popen(
            [*rotate, "--tenant", "acme", "--key-id", f"acme-p{n}"],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        for n in range(4)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0] * 4
    provider = LocalKeyProvider.from_file(path)
    assert sorted(provider.tenant_keys["acme"]) == sorted(
        ["local://acme"] + [f"local://acme-p{n}" for n in range(4)]
    )


def test_a_change_through_a_symlink_lands_in_the_file_it_points_to(tmp_path: Path) -> None:
    """A key file reached through a link (a mounted secret, a 'current' link) is changed where
    it lives: replacing the link with a copy would leave the real file without the new key,
    and whatever reads the real file could not open data sealed under it."""
    real = tmp_path / "keys.json"
    link = tmp_path / "current.json"
    assert keys("init", real, "--tenant", "acme") == 0
    link.symlink_to(real)
    assert keys("add", link, "--tenant", "globex") == 0
    assert keys("rotate", link, "--tenant", "acme") == 0
    assert link.is_symlink()
    assert LocalKeyProvider.from_file(real).tenant_keys == {
        "acme": ["local://acme-2", "local://acme"],
        "globex": ["local://globex"],
    }
    assert stat.S_IMODE(real.stat().st_mode) == 0o600


@pytest.mark.parametrize("action", ["init", "add", "list"])
def test_a_path_the_system_refuses_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    """A directory where the file should be, or a directory that does not exist: one line
    naming the file and the system's reason, exit 1, never 'unexpected ...'."""
    where = tmp_path / "no-such-dir" / "keys.json" if action == "init" else tmp_path
    argv = ["--tenant", "acme"] if action != "list" else []
    assert keys(action, where, *argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("sqlalchemy-cmk: ") and err.count("\n") == 1
    assert str(where) in err and "unexpected" not in err


def test_list_escapes_names_from_a_hand_edited_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`keys add` refuses a non-printable tenant id, but a file edited by hand (or written by
    generate_key_file) can hold one: listed escaped, it cannot forge a line or a terminal
    sequence."""
    path = tmp_path / "keys.json"
    key = base64.b64encode(os.urandom(32)).decode()
    forged = "evil\nacme  acme  -"
    doc = {"keys": {"k\x1b[2J": key}, "tenants": {forged: ["k\x1b[2J"]}}
    path.write_text(json.dumps(doc))
    assert keys("list", path) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 2 and "\x1b" not in out and "\\n" in out
