"""The ``sqlalchemy-cmk`` command: manage the tenant key registry, check a tenant's key.

Usage::

    sqlalchemy-cmk tenants init
    sqlalchemy-cmk tenants add TENANT --key REF [--accept REF ...] [--credential NAME=VALUE ...]
    sqlalchemy-cmk tenants list [--json]
    sqlalchemy-cmk tenants show TENANT [--json]
    sqlalchemy-cmk tenants set-primary TENANT REF [--if-version N]
    sqlalchemy-cmk tenants add-key TENANT REF [--if-version N]
    sqlalchemy-cmk tenants remove-key TENANT REF [--if-version N]
    sqlalchemy-cmk tenants disable TENANT [--if-version N]
    sqlalchemy-cmk tenants enable TENANT [--if-version N]
    sqlalchemy-cmk tenants verify [--expect SNAPSHOT.json] [--json]
    sqlalchemy-cmk tenants reseal        (new secret from $SQLALCHEMY_CMK_NEW_REGISTRY_SECRET)
    sqlalchemy-cmk tenants upgrade-mac   (re-MAC rows written before registry_id existed)
    sqlalchemy-cmk check-tenant TENANT --cmk module:attribute [--app-dir DIR] [--json]

    sqlalchemy-cmk encrypt-column --table T --column C [--column C2 ...] --tenant-column TC
                                  --cmk module:attribute [--workers N]
    sqlalchemy-cmk decrypt-column --table T --column C ... --tenant-column TC --cmk ...
                                  [--workers N]
    sqlalchemy-cmk rewrap --table T --cmk ... [--tenant TENANT]
    sqlalchemy-cmk rotate --table T --column C ... --tenant-column TC --cmk ... [--tenant TENANT]
    sqlalchemy-cmk verify --table T --column C ... --tenant-column TC --cmk ... [--sample F]
                          [--require-encrypted]
    sqlalchemy-cmk status --table T --column C ...

    (all take --database-url, --schema and --json; all but status also --companion-column,
    --batch-size, --progress-every SECONDS and --no-progress; instead of --tenant-column TC,
    --metadata module:Base finds the tenant column the model declares)

The migration commands (encrypt-column ... status) run the backfill engine of
``migrations_helpers.backfill``, the one behind the Alembic operations, for tables too big to
encrypt inside a migration; see docs/migrations.md. ``--workers N`` (encrypt-column,
decrypt-column) starts N processes, each with its own engine, that partition the table through
PostgreSQL's ``FOR UPDATE SKIP LOCKED``.
Progress goes to stderr (a redrawn bar on a terminal, a plain line every few seconds
otherwise), the final report to stdout (``--json`` for machines).

The ``tenants`` commands take the database URL from ``--database-url`` or the environment
variable ``SQLALCHEMY_CMK_DATABASE_URL``, the registry identity (the application's
``registry_id=``) from ``--registry-id`` or ``SQLALCHEMY_CMK_REGISTRY_ID``, and the registry
secret (base64) only from the environment variable ``SQLALCHEMY_CMK_REGISTRY_SECRET``: a secret
given as a command-line flag would land in shell history and in the process list. Tenant ids,
key references and credentials are printed with anything non-printable escaped, so a stored
value cannot forge a line of output.

Exit status (a contract, docs/usage.md "Exit status"): 0 done; 1 the operation failed (a
tampered row, a failed check, a conflict, an invalid change, a row that did not verify,
plaintext left under ``--require-encrypted``, a worker that died, a database error); 2 the
command was invoked or configured wrongly and changed nothing (bad arguments, missing URL or
secret, a ``--cmk`` or ``--metadata`` that does not load, ``encrypt-column`` on a column
under a unique index); 130 interrupted; 141 the reader of the output went away (``| head``).
Every failure is one line on stderr starting ``sqlalchemy-cmk:``, never a traceback, and never
quotes a value from the database (a driver's DETAIL lines, SQLAlchemy's ``[SQL: ...]`` and
``[parameters: ...]`` are dropped). ``SQLALCHEMY_CMK_TRACEBACK=1`` shows the traceback of an
unexpected error (it may show data).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import importlib
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
    StatementError,
)

from ._cmk import load_cmk
from .errors import CMKError, ConfigurationError
from .registry_db import (
    DatabaseKeyRegistry,
    RegistryIntegrityError,
    TenantRecord,
    tenant_id_problem,
)

if TYPE_CHECKING:  # the core command does not need migrations_helpers at import
    from migrations_helpers.backfill import Progress, Report

__all__ = ["main"]

URL_ENV = "SQLALCHEMY_CMK_DATABASE_URL"
SECRET_ENV = "SQLALCHEMY_CMK_REGISTRY_SECRET"  # noqa: S105 (the variable's name, not a secret)
NEW_SECRET_ENV = "SQLALCHEMY_CMK_NEW_REGISTRY_SECRET"  # noqa: S105
REGISTRY_ID_ENV = "SQLALCHEMY_CMK_REGISTRY_ID"


class UsageError(Exception):
    """The command was invoked or configured wrongly: exit 2."""


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sqlalchemy-cmk",
        description=(
            "Manage the tenant key registry, check tenants' keys, and encrypt, verify and "
            "re-key existing data (docs/migrations.md)."
        ),
        epilog=f"The registry secret is read from ${SECRET_ENV} (base64), never from a flag.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = _Parser(add_help=False)
    db.add_argument(
        "--database-url", help=f"SQLAlchemy URL of the registry's database (default: ${URL_ENV})"
    )
    db.add_argument("--table", default="cmk_tenants", help="registry table (default: %(default)s)")
    db.add_argument("--schema", default=None, help="schema of the registry table")
    db.add_argument(
        "--registry-id",
        default=None,
        help=f"this deployment's registry identity, the application's registry_id= "
        f"(default: ${REGISTRY_ID_ENV})",
    )
    db.add_argument(
        "--allow-v1-macs",
        action="store_true",
        help="also accept rows MACed before registry_id existed (only during the upgrade)",
    )
    as_json = _Parser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON for machines")
    if_version = _Parser(add_help=False)
    if_version.add_argument(
        "--if-version",
        type=int,
        default=None,
        metavar="N",
        help="change only if the tenant's row is still at version N",
    )

    tenants = commands.add_parser("tenants", help="manage the tenant key registry")
    sub = tenants.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("init", parents=[db], help="create the registry table if it does not exist")
    p = sub.add_parser("add", parents=[db, as_json], help="add a tenant")
    p.add_argument("tenant")
    p.add_argument("--key", required=True, metavar="REF", help="primary key reference")
    p.add_argument(
        "--accept", action="append", default=[], metavar="REF", help="another accepted key"
    )
    p.add_argument(
        "--credential",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a credential reference (role ARN, client id, secret name), never a secret",
    )
    sub.add_parser("list", parents=[db, as_json], help="list tenants")
    p = sub.add_parser("show", parents=[db, as_json], help="show one tenant")
    p.add_argument("tenant")
    for name, help_ in [
        ("set-primary", "make REF the primary key (the old primary stays accepted)"),
        ("add-key", "accept REF for decryption"),
        ("remove-key", "stop accepting REF (never the primary)"),
    ]:
        p = sub.add_parser(name, parents=[db, as_json, if_version], help=help_)
        p.add_argument("tenant")
        p.add_argument("ref", metavar="REF")
    for name, help_ in [
        ("disable", "refuse the tenant's lookups"),
        ("enable", "serve the tenant's lookups again"),
    ]:
        p = sub.add_parser(name, parents=[db, as_json, if_version], help=help_)
        p.add_argument("tenant")
    p = sub.add_parser("verify", parents=[db, as_json], help="check every row's integrity")
    p.add_argument(
        "--expect",
        type=Path,
        metavar="SNAPSHOT",
        help="a saved `tenants list --json`: also refuse rows older than it, or missing",
    )
    sub.add_parser(
        "reseal",
        parents=[db],
        help=f"rotate the registry secret: re-MAC every row under ${NEW_SECRET_ENV}",
    )
    sub.add_parser(
        "upgrade-mac",
        parents=[db],
        help="re-MAC rows written before registry_id existed so that they bind it",
    )

    p = commands.add_parser(
        "check-tenant", parents=[as_json], help="prove a tenant's key works end to end"
    )
    p.add_argument("tenant")
    p.add_argument(
        "--cmk",
        required=True,
        metavar="MODULE:ATTRIBUTE",
        help="your CMK object (or a function returning it), e.g. myapp.crypto:cmk",
    )
    p.add_argument(
        "--app-dir",
        default=".",
        metavar="DIR",
        help="directory to import MODULE from (default: the current directory)",
    )
    _migration_parsers(commands, as_json)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    The status is a contract (docs/usage.md, "Exit status"): 0 done (and, for the migration
    commands, verified), 1 failed, 2 invoked or configured wrongly (nothing was changed), 130
    interrupted, 141 the reader of the output went away (``| head``). Every failure is one
    line on stderr, never a traceback, and never carries a value from the database.
    """
    try:
        with _driver_logs_silenced():
            code = _main(argv)
        # Output to a pipe is block-buffered: a reader that went away shows only here.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python's documented SIGPIPE recipe: point stdout at devnull so that the interpreter's
        # own flush at exit does not fail again, and exit quietly, like a tool killed by
        # SIGPIPE (128 + 13), the work done so far committed.
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
TRACEBACK_ENV = "SQLALCHEMY_CMK_TRACEBACK"


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or argparse's own usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    out = sys.stdout
    migration = args.command in _MIGRATION_COMMANDS
    try:
        if args.command == "check-tenant":
            return _check_tenant(args, out)
        if migration:
            return _migration(args, out)
        return _tenants(args, out)
    except UsageError as exc:
        _fail(f"error: {exc}")
        return EXIT_USAGE
    except CMKError as exc:  # messages of ours carry no plaintext, keys or ciphertext
        _fail(f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    except SQLAlchemyError as exc:
        _fail(_database_error(exc, migration))
        return EXIT_FAILED
    except KeyboardInterrupt:
        _fail(
            "interrupted"
            + (
                ": the committed batches stay done; run the same command again to finish"
                if migration
                else ""
            ),
            newline=_isatty(sys.stderr),  # end a progress bar's line first
        )
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise  # main's: the reader of stdout went away
    except (Exception, SystemExit) as exc:  # a bug, or user code (a provider) failing its way
        if os.environ.get(TRACEBACK_ENV):
            raise
        # Only the type: the message of an exception we do not know may carry a value.
        _fail(
            f"unexpected {type(exc).__name__}"
            + (f" (sys.exit({exc.code!r}) called)" if isinstance(exc, SystemExit) else "")
            + f"; set {TRACEBACK_ENV}=1 to see the traceback (it may show data)"
        )
        return EXIT_FAILED


@contextlib.contextmanager
def _driver_logs_silenced() -> Iterator[None]:
    """Keep psycopg's log records off stderr while the command runs.

    psycopg logs, as a warning, an error it cannot raise because another is already on its way
    (``error ignored terminating <psycopg.Pipeline ...>: ...``). The command reports the error
    on its way, in one scrubbed line; the logged one would print raw through Python's
    last-resort handler (or the user's logging), and a database error's text can quote a row.
    """
    logger = logging.getLogger("psycopg")
    handler = logging.NullHandler()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _fail(message: str, *, newline: bool = False) -> None:
    """Report a failure as one line on stderr (a message that spans lines is joined)."""
    line = " ".join(message.split("\n"))
    with contextlib.suppress(OSError, ValueError):  # stderr gone too: nothing to tell
        print(("\n" if newline else "") + f"sqlalchemy-cmk: {_printable(line)}", file=sys.stderr)
        sys.stderr.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"sqlalchemy-cmk: error: {message} (see {self.prog} --help)\n")


# What a database driver puts into the first line of its message that can be a stored value.
# PostgreSQL names values in DETAIL lines (dropped with every line after the first), and in
# a few primary messages of data exceptions (``invalid input syntax for type integer:
# "..."``, ``value "..." is out of range``); MySQL and MariaDB in ``Duplicate entry '...' for
# key`` and ``Incorrect ... value: '...' for column``. Greedy matches, anchored on the text
# after the value, so that a value containing quotes is hidden whole.
_VALUE_PATTERNS = [
    (re.compile(r"(Duplicate entry )'.*'( for key .*)$", re.DOTALL), r"\1(value hidden)\2"),
    (re.compile(r"( value: )'.*'( for column .*)$", re.DOTALL), r"\1(value hidden)\2"),
    (re.compile(r'(\bvalue )".*"( is out of range.*)$', re.DOTALL), r"\1(value hidden)\2"),
    (re.compile(r'(: )".*"$', re.DOTALL), r"\1(value hidden)"),
]
_DROPPED_LINES = ("DETAIL:", "HINT:", "CONTEXT:", "LINE ", "[SQL:", "[parameters:", "(Background")


def _scrub_database_message(orig: BaseException) -> str:
    """A driver's error message as one line without the row values it may quote.

    Keeps the first line (PostgreSQL's primary message: which constraint, which column) and
    drops what follows (``DETAIL: Failing row contains (...)``, ``Key (ref)=(...)``, the
    statement); hides the values the primary message itself can quote.
    """
    args: tuple[Any, ...] = getattr(orig, "args", ())
    diag = getattr(orig, "diag", None)  # psycopg: the primary message, apart from the DETAIL
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    if isinstance(primary, str) and primary:
        text = primary
    elif len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], str):
        text = args[1]  # MySQL drivers: (error number, message)
    else:
        text = str(orig)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = lines[0].strip() if lines else type(orig).__name__
    if first.startswith(_DROPPED_LINES):
        first = type(orig).__name__
    for pattern, replacement in _VALUE_PATTERNS:
        first = pattern.sub(replacement, first)
    return first


def _database_error(exc: SQLAlchemyError, migration: bool) -> str:
    """One line for a database error: the driver's scrubbed message and a hint that fits it."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        message = _scrub_database_message(exc.orig)
        state = str(getattr(getattr(exc.orig, "diag", None), "sqlstate", None) or "")
        lowered = message.lower()
        hint = None
        if isinstance(exc, IntegrityError) or state.startswith("23"):
            hint = (
                "a constraint or unique index of the table refused a value (values are not "
                "shown); see docs/migrations.md"
                if migration
                else None
            )
        elif (
            state in {"42P01", "42703"}
            or "no such table" in lowered
            or ("no such column" in lowered or "doesn't exist" in lowered)
        ):
            hint = (
                "do the table and columns exist?"
                if migration
                else "has `sqlalchemy-cmk tenants init` created the table?"
            )
        elif state.startswith("08") or (
            isinstance(exc, (OperationalError, InterfaceError)) and "connect" in lowered
        ):
            hint = "is the URL right, and is the server up?"
        return f"database error: {message}" + (f" ({hint})" if hint else "")
    if isinstance(exc, StatementError):  # a Python error while binding: its text may be data
        inner = type(exc.orig).__name__ if exc.orig is not None else "error"
        return f"database statement failed: {inner} (values are not shown)"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# -- tenants ---------------------------------------------------------------------------------


def _engine(args: argparse.Namespace) -> Engine:
    url = args.database_url or os.environ.get(URL_ENV)
    if not url:
        raise UsageError(f"no database URL: pass --database-url or set ${URL_ENV}")
    try:
        return create_engine(make_url(url))
    except (ArgumentError, ValueError) as exc:
        raise UsageError(f"invalid database URL: {exc}") from None
    except ImportError as exc:
        raise UsageError(f"the database driver is not installed: {exc}") from None


def _secret(variable: str = SECRET_ENV) -> bytes:
    raw = os.environ.get(variable)
    if not raw:
        raise UsageError(
            f"no registry secret: set ${variable} to the base64 of at least 32 random bytes"
            + (" (the same secret the application uses)" if variable == SECRET_ENV else "")
        )
    try:
        return base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"${variable} is not valid base64") from None


def _credentials(items: Sequence[str]) -> dict[str, str]:
    creds: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UsageError(f"--credential takes NAME=VALUE, got {item!r}")
        creds[name] = value
    return creds


def _registry_id(args: argparse.Namespace) -> str:
    registry_id = args.registry_id or os.environ.get(REGISTRY_ID_ENV)
    if not registry_id:
        raise UsageError(
            f"no registry id: pass --registry-id or set ${REGISTRY_ID_ENV} to the registry_id= "
            "the application gives DatabaseKeyRegistry (e.g. prod-eu)"
        )
    problem = tenant_id_problem(registry_id)
    if problem is not None:
        raise UsageError(f"registry id {registry_id!r} is refused: {problem}")
    return registry_id


def _tenants(args: argparse.Namespace, out: TextIO) -> int:
    secret = _secret()
    registry_id = _registry_id(args)
    engine = _engine(args)
    try:
        try:
            registry = DatabaseKeyRegistry(
                engine,
                secret,
                registry_id=registry_id,
                table_name=args.table,
                schema=args.schema,
                allow_v1_macs=args.allow_v1_macs,
                cache_ttl=0,
            )
        except ConfigurationError as exc:
            raise UsageError(f"${SECRET_ENV}: {exc}") from None
        return _TENANT_ACTIONS[args.action](registry, args, out)
    finally:
        engine.dispose()


def _init(registry: DatabaseKeyRegistry, args: argparse.Namespace, out: TextIO) -> int:
    registry.create_table()
    print(f"registry table {registry.table.fullname} is ready", file=out)
    return 0


def _add(registry: DatabaseKeyRegistry, args: argparse.Namespace, out: TextIO) -> int:
    rec = registry.add_tenant(
        args.tenant, args.key, accepted=args.accept, credentials=_credentials(args.credential)
    )
    return _print_record(rec, args, out, "added")


def _list(registry: DatabaseKeyRegistry, args: argparse.Namespace, out: TextIO) -> int:
    records = registry.list_tenants()
    if args.json:
        json.dump([r.to_dict() for r in records], out, indent=2)
        print(file=out)
        return 0
    rows = [
        [
            _cell(r.tenant),
            "disabled" if r.disabled else "enabled",
            str(r.version),
            _cell(r.primary),
            ", ".join(_cell(a) for a in r.accepted if a != r.primary) or "-",
            r.updated_at.strftime("%Y-%m-%d %H:%M:%SZ"),
        ]
        for r in records
    ]
    _print_table(["TENANT", "STATUS", "VERSION", "PRIMARY", "ALSO ACCEPTED", "UPDATED"], rows, out)
    return 0


def _show(registry: DatabaseKeyRegistry, args: argparse.Namespace, out: TextIO) -> int:
    return _print_record(registry.get(args.tenant), args, out, None)


def _change(
    method: Callable[..., TenantRecord], verb: str
) -> Callable[[DatabaseKeyRegistry, argparse.Namespace, TextIO], int]:
    def run(registry: DatabaseKeyRegistry, args: argparse.Namespace, out: TextIO) -> int:
        positional = [args.tenant] + ([args.ref] if hasattr(args, "ref") else [])
        rec = method(registry, *positional, expected_version=args.if_version)
        return _print_record(rec, args, out, verb)

    return run


def _verify(registry: DatabaseKeyRegistry, args: argparse.Namespace, out: TextIO) -> int:
    expected: dict[str, int] | None = None
    if args.expect is not None:
        try:
            snapshot = json.loads(args.expect.read_text())
            expected = {str(item["tenant"]): int(item["version"]) for item in snapshot}
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise UsageError(
                f"--expect {args.expect}: not a `tenants list --json` snapshot ({exc})"
            ) from None
    problems = registry.verify(expected)
    if args.json:
        json.dump(
            {
                "ok": not problems,
                "problems": [{"tenant": p.tenant, "error": str(p)} for p in problems],
            },
            out,
            indent=2,
        )
        print(file=out)
    elif problems:
        for p in problems:
            tenant = "?" if p.tenant is None else _cell(p.tenant)
            print(f"TAMPERED {tenant}: {_printable(str(p))}", file=out)
        print(f"{len(problems)} bad row(s) in {registry.table.fullname}", file=out)
    else:
        print(f"all rows of {registry.table.fullname} verified", file=out)
    if problems:
        _fail(f"tenants verify failed: {len(problems)} bad row(s) in {registry.table.fullname}")
    return 1 if problems else 0


def _reseal(registry: DatabaseKeyRegistry, args: argparse.Namespace, out: TextIO) -> int:
    new_secret = _secret(NEW_SECRET_ENV)
    try:
        count = registry.reseal(new_secret)
    except ConfigurationError as exc:
        if isinstance(exc, RegistryIntegrityError):
            raise
        raise UsageError(f"${NEW_SECRET_ENV}: {exc}") from None
    print(
        f"{count} row(s) of {registry.table.fullname} resealed: restart every process with the "
        f"new secret in ${SECRET_ENV}",
        file=out,
    )
    return 0


def _upgrade_mac(registry: DatabaseKeyRegistry, args: argparse.Namespace, out: TextIO) -> int:
    count = registry.upgrade_macs()
    print(
        f"{count} row(s) of {registry.table.fullname} upgraded to MAC version 2 (registry id "
        f"{registry.registry_id!r}); every row now binds it: remove allow_v1_macs from the "
        "application's configuration",
        file=out,
    )
    return 0


_TENANT_ACTIONS: dict[str, Callable[[DatabaseKeyRegistry, argparse.Namespace, TextIO], int]] = {
    "init": _init,
    "add": _add,
    "list": _list,
    "show": _show,
    "set-primary": _change(DatabaseKeyRegistry.set_primary, "primary set"),
    "add-key": _change(DatabaseKeyRegistry.add_key, "key added"),
    "remove-key": _change(DatabaseKeyRegistry.remove_key, "key removed"),
    "disable": _change(DatabaseKeyRegistry.disable, "disabled"),
    "enable": _change(DatabaseKeyRegistry.enable, "enabled"),
    "verify": _verify,
    "reseal": _reseal,
    "upgrade-mac": _upgrade_mac,
}


def _print_record(
    rec: TenantRecord, args: argparse.Namespace, out: TextIO, verb: str | None
) -> int:
    if args.json:
        json.dump(rec.to_dict(), out, indent=2)
        print(file=out)
        return 0
    print(
        f"tenant {_cell(rec.tenant)}" + (f": {verb} (version {rec.version})" if verb else ""),
        file=out,
    )
    others = [_cell(a) for a in rec.accepted if a != rec.primary]
    print(f"  status:        {'disabled' if rec.disabled else 'enabled'}", file=out)
    print(f"  primary:       {_cell(rec.primary)}", file=out)
    print(f"  also accepted: {', '.join(others) or '-'}", file=out)
    for name, value in sorted(rec.credentials.items()):
        print(f"  credential:    {_cell(name)}={_cell(value)}", file=out)
    if verb is None:
        print(f"  version:       {rec.version} ({rec.updated_at.isoformat()})", file=out)
    return 0


def _printable(text: str) -> str:
    """``text`` with every non-printable character (newline, NUL, bidi override...) escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _cell(value: str) -> str:
    """A stored value as one unambiguous cell: as is when plain, else quoted and escaped.

    A registry value cannot forge output: a newline would start a line that looks like another
    tenant's, a space a column that looks like another field, U+202E reverse what follows.
    """
    if value and value.isprintable() and " " not in value:
        return value
    return repr(value)


def _print_table(header: list[str], rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)


# -- check-tenant ----------------------------------------------------------------------------


def _load_cmk(spec: str, app_dir: str) -> Any:
    path = str(Path(app_dir).resolve())
    if path not in sys.path:
        sys.path.insert(0, path)  # a console script's sys.path does not hold the current directory
    try:
        return load_cmk(spec)
    except ConfigurationError as exc:
        raise UsageError(f"--cmk {spec}: {exc} (imported from {path})") from None


def _check_tenant(args: argparse.Namespace, out: TextIO) -> int:
    cmk = _load_cmk(args.cmk, args.app_dir)
    result = cmk.check_tenant(args.tenant, actor="sqlalchemy-cmk check-tenant")
    if args.json:
        doc = {
            "tenant": result.tenant,
            "ok": result.ok,
            "key_ref": result.key_ref,
            "steps": [{"name": s.name, "ok": s.ok, "detail": s.detail} for s in result.steps],
        }
        json.dump(doc, out, indent=2)
        print(file=out)
    else:
        print(str(result), file=out)
    if not result.ok:
        failed = next((step.name for step in result.steps if not step.ok), "a step")
        _fail(f"check-tenant {_cell(args.tenant)} failed at {failed}")
    return 0 if result.ok else 1


# -- migrations: encrypt-column, decrypt-column, rewrap, rotate, verify, status ---------------

_MIGRATION_COMMANDS = frozenset(
    {"encrypt-column", "decrypt-column", "rewrap", "rotate", "verify", "status"}
)
ACTOR = "sqlalchemy-cmk migration"
PROGRESS_EVERY = 5.0  # seconds between plain progress lines when stderr is not a terminal
_REDRAW_EVERY = 0.1  # seconds between redraws of the progress bar on a terminal
_MAX_FAILURES_SHOWN = 20
_VERBS = {
    "encrypt-column": ("encrypt", "encrypted"),
    "decrypt-column": ("decrypt", "decrypted"),
    "rewrap": ("rewrap", "rewrapped"),
    "rotate": ("rotate", "re-encrypted under fresh data keys"),
}


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0.0 < number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {number}")
    return number


def _migration_parsers(
    commands: argparse._SubParsersAction[_Parser],
    as_json: _Parser,
) -> None:
    target = _Parser(add_help=False)
    target.add_argument(
        "--database-url", help=f"SQLAlchemy URL of the application's database (default: ${URL_ENV})"
    )
    target.add_argument("--table", required=True, help="the table to work on")
    target.add_argument("--schema", default=None, help="the table's schema")
    columns = _Parser(add_help=False)
    columns.add_argument(
        "--column",
        dest="columns",
        action="append",
        required=True,
        metavar="NAME",
        help="a text column (repeat for several)",
    )
    batching = _Parser(add_help=False)
    batching.add_argument(
        "--companion-column",
        default="cmk_edek",
        metavar="NAME",
        help="the EDEK companion column (default: %(default)s)",
    )
    batching.add_argument(
        "--batch-size",
        type=_positive_int,
        default=1000,
        metavar="N",
        help="rows per batch, each in its own transaction (default: %(default)s)",
    )
    batching.add_argument(
        "--progress-every",
        type=float,
        default=PROGRESS_EVERY,
        metavar="SECONDS",
        help="seconds between progress lines when stderr is not a terminal (default: %(default)s)",
    )
    batching.add_argument("--no-progress", action="store_true", help="print no progress")
    keys = _Parser(add_help=False)
    keys.add_argument(
        "--cmk",
        required=True,
        metavar="MODULE:ATTRIBUTE",
        help="your CMK object (or a function returning it), e.g. myapp.crypto:cmk",
    )
    keys.add_argument(
        "--app-dir",
        default=".",
        metavar="DIR",
        help="directory to import MODULE from (default: the current directory)",
    )
    tenant_column = _Parser(add_help=False)
    tenant_column.add_argument(
        "--tenant-column",
        default=None,
        metavar="NAME",
        help="the column naming each row's tenant, whose key seals the row (default: the one "
        "the model declares with sqlalchemy_cmk.tenant_column(), found through --metadata)",
    )
    tenant_column.add_argument(
        "--metadata",
        default=None,
        metavar="MODULE:ATTRIBUTE",
        help="your models (a declarative base, a MetaData or a Table), e.g. myapp.models:Base, "
        "imported from --app-dir: the table's declared tenant column is the default, and a "
        "--tenant-column that contradicts it is refused",
    )
    workers = _Parser(add_help=False)
    workers.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="processes to run, each with its own connection (PostgreSQL only above 1)",
    )
    one_tenant = _Parser(add_help=False)
    one_tenant.add_argument("--tenant", default=None, help="only this tenant's rows")

    backfill = [target, columns, batching, keys, tenant_column, workers, as_json]
    commands.add_parser(
        "encrypt-column",
        parents=backfill,
        help="encrypt existing plaintext text columns in place, online (adds the companion)",
    )
    commands.add_parser(
        "decrypt-column",
        parents=backfill,
        help="restore encrypted text columns to plaintext (the rollback)",
    )
    commands.add_parser(
        "rewrap",
        parents=[target, batching, keys, one_tenant, as_json],
        help="re-wrap data keys under each tenant's current primary key (no re-encryption)",
    )
    commands.add_parser(
        "rotate",  # one worker: a rotation walks the rows that exist when it starts, once
        parents=[target, columns, batching, keys, tenant_column, one_tenant, as_json],
        help="re-encrypt rows under fresh data keys (name every encrypted column of the table)",
    )
    p = commands.add_parser(
        "verify",
        parents=[target, columns, batching, keys, tenant_column, as_json],
        help="decrypt every row (or a sample); exit 1 on any failure",
    )
    p.add_argument(
        "--sample", type=_fraction, default=None, metavar="FRACTION", help="check only this share"
    )
    p.add_argument(
        "--require-encrypted", action="store_true", help="also exit 1 when plaintext remains"
    )
    commands.add_parser(
        "status",
        parents=[target, columns, as_json],
        help="count plaintext / encrypted / NULL values (SQL only, no keys needed)",
    )


@dataclass(frozen=True)
class _Job:
    """One backfill, as every worker process runs it (picklable: spawned workers get a copy)."""

    command: str
    url: str
    cmk: str
    app_dir: str
    table: str
    columns: tuple[str, ...]
    tenant_column: str | None
    tenant: str | None
    companion_column: str
    schema: str | None
    batch_size: int


def _migration_engine(url: str) -> Engine:
    # hide_parameters: a failed statement's message must not carry the values (plaintext).
    return create_engine(make_url(url), hide_parameters=True)


def _migration(args: argparse.Namespace, out: TextIO) -> int:
    from migrations_helpers import backfill  # lazily: the core command does not need it

    url = args.database_url or os.environ.get(URL_ENV)
    if not url:
        raise UsageError(f"no database URL: pass --database-url or set ${URL_ENV}")
    try:
        engine = _migration_engine(url)
    except (ArgumentError, ValueError) as exc:
        raise UsageError(f"invalid database URL: {exc}") from None
    except ImportError as exc:
        raise UsageError(f"the database driver is not installed: {exc}") from None
    try:
        # The usage checks first (exit 2 whatever the database's state), then reach the
        # database once: an unreachable server or a wrong URL is reported as such (with the
        # URL hint), not as the failure of some batch.
        cmk: Any = None
        workers: int = getattr(args, "workers", 1)
        if args.command != "status":
            if workers > 1 and engine.dialect.name != "postgresql":
                raise UsageError(
                    f"--workers {workers}: {engine.dialect.name} runs single-worker (parallel "
                    "workers partition the table with PostgreSQL's FOR UPDATE SKIP LOCKED); "
                    "use --workers 1"
                )
            cmk = _load_cmk(args.cmk, args.app_dir)
            if hasattr(args, "tenant_column"):  # every command that seals or opens rows
                args.tenant_column = _tenant_column(args)
        with engine.connect():
            pass
        if args.command == "status":
            return _status(engine, args, out)
        if args.command == "verify":
            return _verify_table(engine, cmk, args, out)
        job = _Job(
            command=args.command,
            url=url,
            cmk=args.cmk,
            app_dir=str(Path(args.app_dir).resolve()),
            table=args.table,
            columns=tuple(getattr(args, "columns", None) or ()),
            tenant_column=getattr(args, "tenant_column", None),
            tenant=getattr(args, "tenant", None),
            companion_column=args.companion_column,
            schema=args.schema,
            batch_size=args.batch_size,
        )
        added = False
        if job.command == "encrypt-column":  # before any worker starts: one ALTER, not N
            try:  # what refuses the columns must do so before the companion is added
                backfill.check_encryptable(engine, job.table, job.columns, schema=job.schema)
            except backfill.UniqueColumnError as exc:
                raise UsageError(f"{type(exc).__name__}: {exc}") from None
            added = backfill.ensure_companion(
                engine, job.table, companion_column=job.companion_column, schema=job.schema
            )
        view = _progress_view(args, _VERBS[job.command][0] + " " + _fullname(args))
        problems: list[str] = []
        started = time.monotonic()
        try:
            if workers == 1:
                report = _run_job(job, engine, cmk, lambda p: view.update(p.done, p.total))
            else:
                report, problems = _run_workers(job, workers, view)
        finally:
            view.close()
        report.seconds = time.monotonic() - started
        _print_report(report, job, workers, added, problems, args, out)
        return 1 if problems else 0
    finally:
        engine.dispose()


def _tenant_column(args: argparse.Namespace) -> str:
    """--tenant-column, or the tenant column the model given by --metadata declares; resolved
    here, once, so that a mistake stops the command before anything (even the schema) changes
    and spawned workers get a plain name."""
    from migrations_helpers.backfill import resolve_tenant_column

    models: Any = None
    if args.metadata is not None:
        path = str(Path(args.app_dir).resolve())
        if path not in sys.path:
            sys.path.insert(0, path)
        module_name, sep, attr = args.metadata.partition(":")
        if not sep or not module_name or not attr:
            raise UsageError(
                f"--metadata takes MODULE:ATTRIBUTE, e.g. myapp.models:Base; got {args.metadata!r}"
            )
        try:
            models = importlib.import_module(module_name)
            for part in attr.split("."):
                models = getattr(models, part)
        except (ImportError, AttributeError) as exc:
            raise UsageError(f"--metadata {args.metadata}: {exc} (imported from {path})") from None
        except (Exception, SystemExit) as exc:  # the module's own code failed on import
            what = (
                f"called sys.exit({exc.code!r})"
                if isinstance(exc, SystemExit)
                else type(exc).__name__
            )
            raise UsageError(
                f"--metadata {args.metadata}: importing {module_name!r} failed: {what} "
                f"(imported from {path})"
            ) from None
    try:
        return resolve_tenant_column(
            args.table, args.tenant_column, metadata=models, schema=args.schema
        )
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None


def _fullname(args: argparse.Namespace) -> str:
    return f"{args.schema}.{args.table}" if args.schema else str(args.table)


def _run_job(job: _Job, engine: Engine, cmk: Any, progress: Callable[[Progress], None]) -> Report:
    """Run the job's backfill once, in this process."""
    from migrations_helpers import backfill

    if job.command == "rewrap":
        return backfill.rewrap_keys(
            engine,
            cmk,
            job.table,
            tenant=job.tenant,
            companion_column=job.companion_column,
            schema=job.schema,
            batch_size=job.batch_size,
            progress=progress,
            actor=ACTOR,
        )
    assert job.tenant_column is not None  # argparse requires it for the other commands
    if job.command == "rotate":
        return backfill.rotate_data_keys(
            engine,
            cmk,
            job.table,
            job.columns,
            tenant_column=job.tenant_column,
            tenant=job.tenant,
            companion_column=job.companion_column,
            schema=job.schema,
            batch_size=job.batch_size,
            progress=progress,
            actor=ACTOR,
        )
    run = backfill.encrypt_columns if job.command == "encrypt-column" else backfill.decrypt_columns
    return run(
        engine,
        cmk,
        job.table,
        job.columns,
        tenant_column=job.tenant_column,
        companion_column=job.companion_column,
        schema=job.schema,
        batch_size=job.batch_size,
        progress=progress,
        actor=ACTOR,
    )


def _describe(exc: BaseException, migration: bool = True) -> str:
    """An error as one line, without data, as ``main`` reports it (for a worker's failure)."""
    if isinstance(exc, UsageError):
        return f"error: {exc}"
    if isinstance(exc, CMKError):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, SQLAlchemyError):
        return _database_error(exc, migration)
    if isinstance(exc, SystemExit):
        return f"unexpected SystemExit (sys.exit({exc.code!r}) called)"
    return f"unexpected {type(exc).__name__}"


def _worker(index: int, job: _Job, conn: Any) -> None:
    """Body of one ``--workers`` process: its own engine and CMK, the same backfill as the others.

    Runs in a spawned process, so it imports everything afresh (the CMK from ``job.cmk``).
    Everything it has to say goes to the parent through ``conn``, its own pipe: no lock is
    shared between workers, so one killed mid-message cannot block the others.
    """
    engine: Engine | None = None
    silenced = _driver_logs_silenced()
    silenced.__enter__()  # for the life of the process: it ends with the job
    try:
        engine = _migration_engine(job.url)
        cmk = _load_cmk(job.cmk, job.app_dir)
        report = _run_job(job, engine, cmk, lambda p: conn.send(("progress", p.done, p.total)))
        conn.send(("done", report))
    except BaseException as exc:  # reported to the parent, which decides
        with contextlib.suppress(OSError):  # unless the parent is gone
            conn.send(("error", _describe(exc)))
    finally:
        conn.close()
        if engine is not None:
            engine.dispose()


def _run_workers(job: _Job, count: int, view: _ProgressView) -> tuple[Report, list[str]]:
    """Run ``job`` in ``count`` spawned processes at once; merge their reports.

    No coordinator: each worker runs the whole backfill and PostgreSQL's ``SKIP LOCKED`` hands
    each batch to one of them. Returns the merged report and one line per worker that failed
    or died (the work it did is committed; running the command again finishes the rest).
    """
    import multiprocessing
    from multiprocessing.connection import wait

    from migrations_helpers.backfill import Report

    context = multiprocessing.get_context("spawn")  # fork would copy engines and locks
    processes: list[Any] = []
    readers: dict[Any, int] = {}  # a worker's read end -> its index
    done = [0] * count
    totals: list[int | None] = [None] * count
    reports: list[Report] = []
    problems: list[str] = []
    pending = set(range(count))  # workers that have not reported an outcome yet
    try:
        for i in range(count):
            read_end, writer = context.Pipe(duplex=False)
            process = context.Process(
                target=_worker,
                args=(i, job, writer),
                name=f"sqlalchemy-cmk-worker-{i}",
                daemon=True,
            )
            processes.append(process)
            readers[read_end] = i
            process.start()
            writer.close()  # the worker holds the only write end: EOF when it exits
        while readers:
            for ready in wait(list(readers), timeout=1.0):
                reader: Any = ready
                i = readers[reader]
                try:
                    message = reader.recv()
                except EOFError:  # the worker exited: after its outcome, or killed before
                    del readers[reader]
                    reader.close()
                    if i in pending:
                        pending.discard(i)
                        processes[i].join(timeout=5)
                        problems.append(
                            f"worker {i} died (exit status {processes[i].exitcode}) without a "
                            "report: its finished batches are committed; run the command again"
                        )
                    continue
                if message[0] == "progress":
                    done[i], totals[i] = message[1], message[2]
                    known = [t for t in totals if t is not None]
                    view.update(sum(done), max(known) if known else None)
                elif message[0] == "done":
                    reports.append(message[1])
                    pending.discard(i)
                else:
                    problems.append(f"worker {i}: {message[1]}")
                    pending.discard(i)
    except BaseException:  # interrupted: stop the workers now; their open batches roll back
        for process in processes:
            if process.is_alive():
                process.terminate()
        raise
    finally:
        for reader in readers:
            reader.close()
        for process in processes:
            if process.pid is None:
                continue  # never started
            process.join(timeout=10)
            if process.is_alive():  # did not stop on SIGTERM
                process.kill()
                process.join()
            process.close()
    merged = Report(
        operation=reports[0].operation if reports else _VERBS[job.command][0],
        table=job.table,
        columns=job.columns,
    )
    for report in reports:
        merged.rows += report.rows
        merged.conflicts += report.conflicts
        merged.batches += report.batches
        merged.passes = max(merged.passes, report.passes)
        for tenant, rows in report.by_tenant.items():
            merged.by_tenant[tenant] = merged.by_tenant.get(tenant, 0) + rows
    return merged, problems


def _print_report(
    report: Report,
    job: _Job,
    workers: int,
    companion_added: bool,
    problems: list[str],
    args: argparse.Namespace,
    out: TextIO,
) -> None:
    if args.json:
        doc = asdict(report)
        doc.update(
            workers=workers, companion_added=companion_added, ok=not problems, errors=problems
        )
        json.dump(doc, out, indent=2)
        print(file=out)
    else:
        name = _fullname(args)
        if companion_added:
            print(f"added the companion column {job.companion_column} to {name}", file=out)
        what = f"{name} ({', '.join(job.columns)})" if job.columns else name
        rate = report.rows / report.seconds if report.seconds > 0 else 0.0
        print(
            f"{_VERBS[job.command][1]} {report.rows:,} row(s) of {what} in "
            f"{report.seconds:.1f} s ({rate:,.0f} rows/s, {workers} worker(s)); "
            f"{report.batches:,} batch(es), {report.passes} pass(es), "
            f"{report.conflicts:,} compare-and-swap conflict(s) retried",
            file=out,
        )
        for tenant, rows in sorted(report.by_tenant.items()):
            print(f"  tenant {tenant}: {rows:,}", file=out)
    if problems:
        _fail(
            "not finished: "
            + "; ".join(problems)
            + ": the committed batches stay done; fix the cause and run the same command again"
        )


def _verify_table(engine: Engine, cmk: Any, args: argparse.Namespace, out: TextIO) -> int:
    from migrations_helpers import backfill

    view = _progress_view(args, "verify " + _fullname(args))
    sampled = args.sample is not None and args.sample < 1
    try:
        report = backfill.verify(
            engine,
            cmk,
            args.table,
            args.columns,
            tenant_column=args.tenant_column,
            companion_column=args.companion_column,
            schema=args.schema,
            batch_size=args.batch_size,
            sample=args.sample,
            # The engine's total is the whole table's; a sample checks a share of it, so no
            # total (and no ETA) is shown rather than one the run will never reach.
            progress=lambda p: view.update(p.done, None if sampled else p.total),
        )
    finally:
        view.close()
    encrypted = sum(report.encrypted_ok.values())
    plaintext = sum(report.plaintext.values())
    failed = sum(report.failed.values())
    ok = report.ok and not (args.require_encrypted and plaintext)
    if args.json:
        doc = asdict(report)
        doc.update(ok=ok, encrypted_ok_total=encrypted, plaintext_total=plaintext)
        doc["failed_total"] = failed
        json.dump(doc, out, indent=2)
        print(file=out)
        if failed:
            _fail(f"verify failed: {failed:,} row(s) of {_fullname(args)} did not decrypt")
        elif not ok:
            _fail(f"verify failed: {plaintext:,} plaintext value(s) remain (--require-encrypted)")
        return 0 if ok else 1
    tenants = sorted({*report.encrypted_ok, *report.plaintext, *report.failed})
    rows = [
        [
            t,
            f"{report.encrypted_ok.get(t, 0):,}",
            f"{report.plaintext.get(t, 0):,}",
            f"{report.failed.get(t, 0):,}",
        ]
        for t in tenants
    ]
    if rows:
        _print_table(["TENANT", "OK", "PLAINTEXT", "FAILED"], rows, out)
    for pk, tenant, error in report.failures[:_MAX_FAILURES_SHOWN]:
        print(f"FAILED row {pk} (tenant {tenant}): {error}", file=out)
    shown = min(len(report.failures), _MAX_FAILURES_SHOWN)
    if failed > shown:
        print(
            f"... and {failed - shown:,} more failed row(s) (--json lists the first "
            f"{len(report.failures):,})",
            file=out,
        )
    sample = f" (a {args.sample:.0%} sample)" if args.sample else ""
    print(
        f"checked {report.checked:,} row(s) of {_fullname(args)} ({', '.join(args.columns)})"
        f"{sample}: {encrypted:,} ok, {plaintext:,} plaintext, {failed:,} failed",
        file=out,
    )
    if failed:
        print(f"FAILED: {failed:,} row(s) did not decrypt", file=out)
        _fail(f"verify failed: {failed:,} row(s) of {_fullname(args)} did not decrypt")
    elif not ok:
        print(f"FAILED: {plaintext:,} plaintext value(s) remain (--require-encrypted)", file=out)
        _fail(f"verify failed: {plaintext:,} plaintext value(s) remain (--require-encrypted)")
    else:
        print("OK" + (f" ({plaintext:,} plaintext left)" if plaintext else ""), file=out)
    return 0 if ok else 1


def _status(engine: Engine, args: argparse.Namespace, out: TextIO) -> int:
    from migrations_helpers import backfill

    report = backfill.status(engine, args.table, args.columns, schema=args.schema)
    if args.json:
        json.dump(asdict(report), out, indent=2)
        print(file=out)
        return 0
    rows = [
        [column, *(f"{counts.get(k, 0):,}" for k in ("plaintext", "encrypted", "null"))]
        for column, counts in report.counts.items()
    ]
    _print_table(["COLUMN", "PLAINTEXT", "ENCRYPTED", "NULL"], rows, out)
    left = sum(c.get("plaintext", 0) for c in report.counts.values())
    print(
        f"{_fullname(args)}: "
        + (f"{left:,} plaintext value(s) left" if left else "no plaintext left"),
        file=out,
    )
    return 0


def _progress_view(args: argparse.Namespace, label: str) -> _ProgressView:
    return _ProgressView(
        label,
        sys.stderr,
        enabled=not args.no_progress,
        every=max(0.0, args.progress_every),
    )


class _ProgressView:
    """Rows done / total, rate and ETA on ``stream``: one line redrawn with ``\\r`` on a
    terminal, a plain line every ``every`` seconds otherwise (logs, CI), and a last line at the
    end."""

    def __init__(self, label: str, stream: TextIO, *, enabled: bool, every: float) -> None:
        self.label = label
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and stream.isatty()
        self.every = _REDRAW_EVERY if self.tty else every
        self.started = time.monotonic()
        self.last_shown = self.started
        self.done = 0
        self.total: int | None = None
        self.updated = False  # an update arrived since the last line was shown
        self.width = 0

    def update(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        # The total is counted when the call starts; rows the application inserts meanwhile
        # are done too. Never show more done than the total: raise the total instead.
        if total is not None:
            total = max(total, done)
        self.done, self.total, self.updated = done, total, True
        now = time.monotonic()
        if now - self.last_shown >= self.every:
            self._show(now)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.updated:
            self._show(time.monotonic())
        if self.tty and self.width:
            self._write("\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # stderr's reader went away: the work goes on, unseen
            self.enabled = False

    def _show(self, now: float) -> None:
        self.last_shown, self.updated = now, False
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        total = self.total
        if total is not None and total > 0:
            share = min(self.done / total, 1.0)
            left = max(total - self.done, 0)
            eta: str | None = _clock(left / rate) if rate > 0 else "?"
            counts = f"{self.done:,}/{total:,} rows ({share:.1%})"
        else:  # no total (a sample): no share, no ETA to promise
            share, eta, counts = 0.0, None, f"{self.done:,} rows"
        if self.tty:
            bar = ""
            if eta is not None:
                filled = round(share * 24)
                bar = f" [{'#' * filled}{'.' * (24 - filled)}]"
            line = f"{self.label}{bar} {counts} {rate:,.0f} rows/s" + (
                f" ETA {eta}" if eta is not None else ""
            )
            self._write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            self._write(
                f"{self.label}: {counts}, {rate:,.0f} rows/s, "
                + (f"ETA {eta}, " if eta is not None else "")
                + f"elapsed {_clock(elapsed)}\n"
            )


def _clock(seconds: float) -> str:
    whole = int(seconds + 0.5)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
