"""``sqlalchemy-cmk keys``: create a local key file and add or rotate tenants' keys in it.

The file is the one :class:`~sqlalchemy_cmk.providers.local.LocalKeyProvider` reads
(``{"keys": {name: base64}, "tenants": {tenant: [name, ...]}}``, the primary first). Every
change is written to a temporary file in the same directory (mode 0600), flushed to disk, and
renamed over the old one, so a crash leaves the old file or the new one, never half of either;
a key that exists is never replaced (data under it would become unreadable), and ``init``
never replaces a file. Key bytes are never printed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from ..errors import ConfigurationError
from ..providers.local import LocalKeyProvider
from ._common import EXIT_OK, UsageError, _Parser, _print_table, _printable

# Names go into ``local://<name>`` and into from_env's ``name=base64,...``: no "," or "=".
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

try:  # serialise concurrent changes of one file; not on Windows
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


def add_parsers(commands: argparse._SubParsersAction[_Parser], as_json: _Parser) -> None:
    """Add ``keys`` and its actions to ``commands``."""
    keys = commands.add_parser("keys", help="create and change a local key file")
    sub = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="create a key file (refused if the file exists)")
    init.add_argument("file", metavar="FILE")
    init.add_argument(
        "--tenant",
        action="append",
        default=[],
        metavar="TENANT",
        help="a tenant to give a key (repeatable); its key is named after it",
    )
    for action, text in (
        ("add", "add a tenant with a new key"),
        ("rotate", "give a tenant a new primary key; its older keys stay, for reading"),
    ):
        p = sub.add_parser(action, help=text)
        p.add_argument("file", metavar="FILE")
        p.add_argument("--tenant", required=True, metavar="TENANT")
        p.add_argument(
            "--key-id",
            default=None,
            metavar="ID",
            help="the new key's name (default: the tenant id, then TENANT-2, TENANT-3, ...)",
        )
    listing = sub.add_parser(
        "list", parents=[as_json], help="tenants and their key names (never the keys)"
    )
    listing.add_argument("file", metavar="FILE")


def run_keys(args: argparse.Namespace, out: TextIO) -> int:
    """Run ``keys ACTION``; returns the exit status (errors raise, for ``main`` to report)."""
    try:
        return _run(args, out)
    except OSError as exc:
        # The system's reason (no such directory, permission denied) names no key; the path
        # is the one the user gave.
        raise ConfigurationError(
            f"key file {args.file}: {exc.strerror or type(exc).__name__}"
        ) from None


def _run(args: argparse.Namespace, out: TextIO) -> int:
    # Through a link, the file it points to: replacing the link by a changed copy would leave
    # the real file, which something else may read, without the new key.
    path = Path(os.path.realpath(args.file))
    if args.action == "init":
        doc: dict[str, Any] = {"keys": {}, "tenants": {}}
        for tenant in args.tenant:
            _add(doc, tenant, None, rotate=False)
        _write_new(path, doc)
        tenants = _count(len(args.tenant), "tenant")
        print(f"created {_printable(args.file)} with {tenants}", file=out)
        return EXIT_OK
    if args.action == "list":
        doc = _read(path)
        tenants = doc["tenants"]
        assigned = {name for names in tenants.values() for name in names}
        unassigned = sorted(set(doc["keys"]) - assigned)
        if args.json:
            json.dump({"tenants": tenants, "unassigned_keys": unassigned}, out, indent=2)
            out.write("\n")
        else:
            # Escaped: `keys add` refuses such names, but a file edited by hand may hold them.
            rows = [
                [_printable(t), _printable(names[0]), _printable(" ".join(names[1:])) or "-"]
                for t, names in tenants.items()
            ]
            rows += [["(no tenant)", "-", _printable(name)] for name in unassigned]
            _print_table(["TENANT", "PRIMARY", "ALSO ACCEPTED"], rows, out)
        return EXIT_OK
    with _locked(path):
        doc = _read(path)
        name = _add(doc, args.tenant, args.key_id, rotate=args.action == "rotate")
        _replace(path, doc)
    names = doc["tenants"][args.tenant]
    older = f"; still accepted for reading: {', '.join(names[1:])}" if names[1:] else ""
    print(
        f"tenant {_printable(args.tenant)}: new primary key {name} (local://{name}){older}",
        file=out,
    )
    return EXIT_OK


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _add(doc: dict[str, Any], tenant: str, key_id: str | None, *, rotate: bool) -> str:
    """Give ``tenant`` a new random key in ``doc`` (primary); returns the key's name."""
    keys: dict[str, str] = doc["keys"]
    tenants: dict[str, list[str]] = doc["tenants"]
    if not tenant or not tenant.isprintable():
        raise UsageError("a tenant id must be non-empty and printable")
    current = tenants.get(tenant)
    if current is None and rotate and tenant in keys:
        current = [tenant]  # a file from generate_key_file(): the key named after the tenant
    if rotate and current is None:
        raise ConfigurationError(
            f"tenant {tenant!r} has no key in the file to rotate; add it with `keys add`"
        )
    if not rotate and (current is not None or tenant in tenants):
        raise ConfigurationError(
            f"tenant {tenant!r} already has keys in the file; give it a new one with `keys rotate`"
        )
    if key_id is None:
        candidates = [tenant] + [f"{tenant}-{n}" for n in range(2, 10_000)]
        key_id = next((c for c in candidates if c not in keys), None)
        if key_id is None or not _KEY_ID.fullmatch(key_id):
            raise UsageError(f"name the key with --key-id: {tenant!r} does not make a key name")
    if not _KEY_ID.fullmatch(key_id):
        raise UsageError(
            "a key id is 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if key_id in keys:
        raise ConfigurationError(
            f"key {key_id!r} exists in the file; refusing to replace a key (data under it would "
            "become unreadable)"
        )
    keys[key_id] = base64.b64encode(os.urandom(32)).decode()
    tenants[tenant] = [key_id, *(current or [])]
    return key_id


def _read(path: Path) -> dict[str, Any]:
    """The key file, checked as the provider that will read it checks it."""
    if not path.exists():
        raise UsageError(f"key file {path} does not exist; create it with `keys init {path}`")
    try:
        doc = json.loads(path.read_text())
        shape_ok = (
            isinstance(doc, dict)
            and isinstance(doc.get("keys"), dict)
            and isinstance(doc.setdefault("tenants", {}), dict)
        )
    except (OSError, ValueError) as exc:
        # Not chained: a JSONDecodeError holds the whole file (the keys) in its ``doc``.
        problem = type(exc).__name__
    else:
        problem = "" if shape_ok else 'not {"keys": {...}, "tenants": {...}}'
    if problem:
        raise ConfigurationError(f"key file {path} is unreadable or not a key file ({problem})")
    if doc["keys"] or doc["tenants"]:  # a file just made by `init` with no tenant is empty
        LocalKeyProvider.from_file(path)  # every key and every tenant's list, as at start-up
    return dict(doc)


def _write_new(path: Path, doc: dict[str, Any]) -> None:
    """Create ``path`` with ``doc``; refuse if it exists (a hard link never replaces a file)."""
    with _temporary(path, doc) as tmp:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ConfigurationError(
                f"key file {path} exists; refusing to overwrite master keys (add a tenant with "
                "`keys add`, a new key with `keys rotate`)"
            ) from None
    _sync_directory(path)


def _replace(path: Path, doc: dict[str, Any]) -> None:
    was = os.stat(path)
    with _temporary(path, doc) as tmp:
        # The mode and group the operator gave the file (0640 for the application's group,
        # say) stay, or the application could not read its keys at the next start; bits for
        # others never come back.
        os.chmod(tmp, stat.S_IMODE(was.st_mode) & 0o770)
        with contextlib.suppress(PermissionError):  # only a member of the group may
            os.chown(tmp, -1, was.st_gid)
        os.replace(tmp, path)
    _sync_directory(path)


@contextlib.contextmanager
def _temporary(path: Path, doc: dict[str, Any]) -> Iterator[str]:
    """A file beside ``path`` holding ``doc``, mode 0600, on disk; removed afterwards."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:  # mkstemp makes it 0600
            json.dump(doc, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _sync_directory(path: Path) -> None:
    # The rename is durable once the directory is on disk too.
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the key file as it is now (two changes at once: one waits).

    The lock is on the file's inode, which a change replaces: after the wait, a lock on a file
    that is no longer at ``path`` is retried on the new one.
    """
    if fcntl is None or not path.exists():
        yield
        return
    while True:
        with open(path, "rb") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                if os.path.exists(path) and os.path.samestat(os.fstat(fh.fileno()), os.stat(path)):
                    yield
                    return
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
