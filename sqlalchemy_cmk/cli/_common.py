"""What every command of ``sqlalchemy-cmk`` shares: exit codes, the one-line failure, scrubbed
database errors, escaped output.

Imports only the public API of ``sqlalchemy_cmk`` (its ``__all__``) and SQLAlchemy: the
migration commands use this module, and they may use nothing private of the core
(``tests/test_cli_imports.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn, TextIO

from sqlalchemy.exc import (
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
    StatementError,
)

from sqlalchemy_cmk import CMKError

URL_ENV = "SQLALCHEMY_CMK_DATABASE_URL"
SECRET_ENV = "SQLALCHEMY_CMK_REGISTRY_SECRET"  # noqa: S105 (the variable's name, not a secret)
NEW_SECRET_ENV = "SQLALCHEMY_CMK_NEW_REGISTRY_SECRET"  # noqa: S105
REGISTRY_ID_ENV = "SQLALCHEMY_CMK_REGISTRY_ID"
TRACEBACK_ENV = "SQLALCHEMY_CMK_TRACEBACK"

# The exit status, a contract (docs/usage.md, "Exit status").
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


class UsageError(Exception):
    """The command was invoked or configured wrongly: exit 2."""


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
# after the value, so that a value containing quotes is hidden whole. PostgreSQL's encoding
# errors name the value's bytes (``invalid byte sequence for encoding "UTF8": 0xe2 0x28``), and
# its date formatting the value mid-message (``invalid value "..." for "MM"``).
_VALUE_PATTERNS = [
    (re.compile(r"0x[0-9a-fA-F]{2}(?: 0x[0-9a-fA-F]{2})*"), "(bytes hidden)"),
    (re.compile(r'(\binvalid value )".*"( for "[^"]*".*)$', re.DOTALL), r"\1(value hidden)\2"),
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
    return _hide_values(first)


def _hide_values(line: str) -> str:
    """``line`` with the values a driver's message can quote replaced by ``(value hidden)``."""
    for pattern, replacement in _VALUE_PATTERNS:
        line = pattern.sub(replacement, line)
    return line


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
            or "unknown column" in lowered  # MySQL, MariaDB
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
    # Another SQLAlchemy error (no driver message, no statement): its first line, which may
    # still quote something it was given, scrubbed like a driver's.
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines and not lines[0].startswith(_DROPPED_LINES) else ""
    return f"{type(exc).__name__}: {_hide_values(first)}".rstrip(": ")


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


def _app_path(app_dir: str) -> str:
    """Put ``app_dir`` (resolved) first on ``sys.path``, so that ``--cmk`` and ``--metadata``
    import the user's modules from it (a console script's ``sys.path`` does not hold the
    current directory); returns it for messages."""
    path = str(Path(app_dir).resolve())
    if path not in sys.path:
        sys.path.insert(0, path)
    return path


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
