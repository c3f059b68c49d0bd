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
    sqlalchemy-cmk tenants audit show TENANT [--json]
    sqlalchemy-cmk tenants audit set TENANT --destination JSON [--destination JSON ...]
                   [--on-spool-failure deny|serve] [--max-events-per-second N] [--if-version N]
    sqlalchemy-cmk tenants audit set TENANT --from-file FILE   (as `audit show --json` prints)
    sqlalchemy-cmk tenants audit clear TENANT [--if-version N]
    sqlalchemy-cmk check-tenant TENANT --cmk module:attribute [--app-dir DIR] [--json]

    sqlalchemy-cmk keys init FILE [--tenant TENANT ...]     (a local key file; never replaced)
    sqlalchemy-cmk keys add FILE --tenant TENANT [--key-id ID]
    sqlalchemy-cmk keys rotate FILE --tenant TENANT [--key-id ID]   (older keys kept, for reading)
    sqlalchemy-cmk keys list FILE [--json]                  (key names only, never the keys)

    sqlalchemy-cmk encrypt-column --table T --column C [--column C2 ...] --tenant-column TC
                                  --cmk module:attribute [--into [C=]TARGET ...] [--workers N]
    sqlalchemy-cmk decrypt-column --table T --column C ... --tenant-column TC --cmk ...
                                  [--into [C=]TARGET ...] [--workers N]
    sqlalchemy-cmk rewrap --table T --cmk ... [--tenant TENANT]
    sqlalchemy-cmk rotate --table T [--column C ...] --tenant-column TC --cmk ... [--tenant TENANT]
    sqlalchemy-cmk verify --table T [--column C ...] --tenant-column TC --cmk ... [--sample F]
                          [--require-encrypted]

    (rotate and verify without --column: every encrypted column of the table; decrypt-column
    --into: a binary, default-storage column's plaintext goes to the plain column TARGET;
    encrypt-column, decrypt-column, rewrap and rotate take --max-kms-rps R, the command's KMS
    requests per second, shared by its workers)
    sqlalchemy-cmk search build|rotate|verify --index TABLE.NAME --metadata module:Base --cmk ...
                          [--settle SECONDS] [--bits N (rotate)]
    sqlalchemy-cmk search status [--index TABLE.NAME] --metadata module:Base
    (blind indexes of searchable columns: build one over existing rows, rotate its key; see
    docs/search-rotation.md)
    sqlalchemy-cmk audit status|tail|verify|replay --spool DIR [--tenant T] ...
    (the audit spool of each tenant's events: backlog, deliveries, the hash chains, re-delivery
    of a range; docs/audit.md)
    sqlalchemy-cmk status --table T --column C ...
    sqlalchemy-cmk cutover --table T --column C ... --into [C=]TARGET ...
    (encrypt-column --into: move text column C into the binary column TARGET, C left NULL;
    cutover: exit 0 once every C is empty, 1 naming the values left; the drop is a migration's)

    (all take --database-url, --schema and --json; all but status and cutover also
    --companion-column, --batch-size, --progress-every SECONDS and --no-progress; instead of
    --tenant-column TC, --metadata module:Base finds the tenant column the model declares)

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

The package: :mod:`._common` (exit codes, the one-line failure, scrubbed database errors),
:mod:`.tenants` (the registry commands and ``check-tenant``), :mod:`.keys` (local key
files), :mod:`.migrate` (the migration
commands, on the public API of ``migrations_helpers``), :mod:`.search` (blind indexes, on the
same API) and :mod:`._progress`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError

from ..errors import CMKError
from . import audit, keys, migrate, search, tenants
from ._common import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    SECRET_ENV,
    TRACEBACK_ENV,
    UsageError,
    _database_error,
    _driver_logs_silenced,
    _fail,
    _isatty,
    _Parser,
)

__all__ = ["main"]


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

    as_json = _Parser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON for machines")
    tenants.add_parsers(commands, as_json)
    keys.add_parsers(commands, as_json)
    migrate.add_parsers(commands, as_json)
    search.add_parsers(commands, as_json)
    audit.add_parsers(commands, as_json)
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


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or argparse's own usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    out = sys.stdout
    migration = args.command in migrate.COMMANDS or args.command == "search"
    try:
        if args.command == "check-tenant":
            return tenants.run_check_tenant(args, out)
        if args.command == "search":
            return search.run_search(args, out)
        if migration:
            return migrate.run_migration(args, out)
        if args.command == "keys":
            return keys.run_keys(args, out)
        if args.command == "audit":
            return audit.run_audit(args, out)
        return tenants.run_tenants(args, out)
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
