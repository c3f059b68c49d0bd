"""``sqlalchemy-cmk search build|rotate|status|verify``: blind indexes of searchable columns.

Usage::

    sqlalchemy-cmk search build  --index users.email_bidx --metadata myapp.models:Base \\
                                 --cmk myapp.crypto:cmk [--settle SECONDS] [--batch-size N]
    sqlalchemy-cmk search rotate --index users.email_bidx --metadata ... --cmk ... [--bits N]
    sqlalchemy-cmk search status [--index users.email_bidx] --metadata ...
    sqlalchemy-cmk search verify --index users.email_bidx --metadata ... --cmk ...

(all take --database-url (or $SQLALCHEMY_CMK_DATABASE_URL), --app-dir and --json; build and
rotate take --batch-size, --settle, --progress-every and --no-progress.)

``--index`` is ``table.index_name`` (``<column>_bidx`` by default) or a domain shared by
several tables (``BlindIndex(domain=...)``). The models given by ``--metadata`` say which
columns are searchable. ``build`` and ``rotate`` run :func:`migrations_helpers.build_index`
and :func:`migrations_helpers.rotate_index` (through ``run_job``, as ``op.build_blind_index``
and ``op.rotate_blind_index`` do); a killed run is finished by running the same command again
(docs/search-rotation.md). ``verify`` exits 1 when a row's index does not match its value.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
from dataclasses import asdict
from typing import Any, TextIO

from sqlalchemy import Engine
from sqlalchemy.exc import ArgumentError

from ._common import URL_ENV, UsageError, _app_path, _fail, _Parser, _print_table
from ._progress import PROGRESS_EVERY, _progress_view
from .migrate import _load_cmk, _migration_engine, _positive_int

_MAX_FAILURES_SHOWN = 20


def _seconds(value: str) -> float:
    try:
        n = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    from migrations_helpers.search_index import MAX_SETTLE  # lazy: the CLI starts fast

    # NaN passes a ">= 0" test and would wait nothing between phases; infinity would move
    # the state and then overflow the sleep.
    if not (math.isfinite(n) and 0 <= n <= MAX_SETTLE):
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_SETTLE:g}, not {value}")
    return n


def add_parsers(commands: argparse._SubParsersAction[_Parser], as_json: _Parser) -> None:
    """Add ``search`` and its subcommands to ``commands``."""
    search = commands.add_parser(
        "search",
        help="build, rotate, check blind indexes of searchable encrypted columns",
        description="Blind indexes of searchable columns (docs/search-rotation.md).",
    )
    sub = search.add_subparsers(dest="search_command", required=True, metavar="SUBCOMMAND")
    common = _Parser(add_help=False)
    common.add_argument(
        "--database-url", help=f"SQLAlchemy URL of the application's database (default: ${URL_ENV})"
    )
    common.add_argument(
        "--metadata",
        required=True,
        metavar="MODULE:ATTRIBUTE",
        help="your models (a declarative base, a MetaData or a Table), e.g. myapp.models:Base",
    )
    common.add_argument(
        "--app-dir",
        default=".",
        metavar="DIR",
        help="directory to import MODULE from (default: the current directory)",
    )
    index = _Parser(add_help=False)
    index.add_argument(
        "--index",
        required=True,
        metavar="TABLE.NAME",
        help="the blind index: table.index_name (default name <column>_bidx), or its domain",
    )
    keys = _Parser(add_help=False)
    keys.add_argument(
        "--cmk",
        required=True,
        metavar="MODULE:ATTRIBUTE",
        help="your CMK object (or a function returning it), e.g. myapp.crypto:cmk",
    )
    walking = _Parser(add_help=False)
    walking.add_argument(
        "--batch-size",
        type=_positive_int,
        default=1000,
        metavar="N",
        help="rows per batch, each in its own transaction (default: %(default)s)",
    )
    walking.add_argument(
        "--settle",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="wait after each state change, so every process has read it (default: twice "
        "the CMK's search_state_ttl); never shorter than any process's search_state_ttl",
    )
    walking.add_argument(
        "--progress-every",
        type=_seconds,
        default=PROGRESS_EVERY,
        metavar="SECONDS",
        help="seconds between progress lines when stderr is not a terminal (default: %(default)s)",
    )
    walking.add_argument("--no-progress", action="store_true", help="print no progress")
    sub.add_parser(
        "build",
        parents=[common, index, keys, walking, as_json],
        help="fill a blind index for the rows that exist, then make it searchable",
    )
    p = sub.add_parser(
        "rotate",
        parents=[common, index, keys, walking, as_json],
        help="move a blind index to its next key version (every phase; resumable)",
    )
    p.add_argument(
        "--bits", type=_positive_int, default=None, metavar="N", help="a new width (default: same)"
    )
    p = sub.add_parser(
        "status",
        parents=[common, as_json],
        help="each blind index's phase, key version, width, and rows done / pending (no keys)",
    )
    p.add_argument("--index", default=None, metavar="TABLE.NAME", help="only this index")
    sub.add_parser(
        "verify",
        parents=[common, index, keys, as_json],
        help="recompute every row's index values; exit 1 if any does not match",
    )


def _models(spec: str, app_dir: str) -> Any:
    path = _app_path(app_dir)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--metadata takes MODULE:ATTRIBUTE, e.g. myapp.models:Base; got {spec!r}")
    try:
        models: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            models = getattr(models, part)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"--metadata {spec}: {exc} (imported from {path})") from None
    except (Exception, SystemExit) as exc:  # the module's own code failed on import
        what = (
            f"called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else type(exc).__name__
        )
        raise UsageError(
            f"--metadata {spec}: importing {module_name!r} failed: {what} (imported from {path})"
        ) from None
    return models


def run_search(args: argparse.Namespace, out: TextIO) -> int:
    """Run the ``search`` subcommand ``args`` names; returns the exit status."""
    url = args.database_url or os.environ.get(URL_ENV)
    if not url:
        raise UsageError(f"no database URL: pass --database-url or set ${URL_ENV}")
    try:
        engine = _migration_engine(url)
    except (ArgumentError, ValueError, ImportError) as exc:
        raise UsageError(f"invalid database URL or driver: {exc}") from None
    try:
        models = _models(args.metadata, args.app_dir)
        _check_index(models, getattr(args, "index", None))
        cmk = _load_cmk(args.cmk, args.app_dir) if hasattr(args, "cmk") else None
        with engine.connect():
            pass
        command = args.search_command
        if command == "status":
            return _status(engine, models, args, out)
        if command == "verify":
            return _verify(engine, cmk, models, args, out)
        return _walk(engine, cmk, models, args, out)
    finally:
        engine.dispose()


def _check_index(models: Any, index: str | None) -> None:
    """An index the models do not declare is a usage error (exit 2), before any key loads."""
    if index is None:
        return
    domains = _domains(models)
    table, _, name = index.rpartition(".")
    if index not in domains and not _by_table_name(models, table, name):
        raise UsageError(
            f"--index {index}: the models given have no such blind index; known: "
            + (", ".join(sorted(domains)) or "(none: no column of the models has search=)")
        )


def _domains(models: Any) -> set[str]:
    from sqlalchemy_cmk import EncryptedType

    out: set[str] = set()
    for table, column in _searchable(models):
        assert isinstance(column.type, EncryptedType)
        for ix in column.type.search:
            name = ix.name or f"{column.name}_bidx"
            out.add(ix.domain or f"{table.name}.{name}")
    return out


def _by_table_name(models: Any, table: str, name: str) -> bool:
    from sqlalchemy_cmk import EncryptedType

    for t, column in _searchable(models):
        assert isinstance(column.type, EncryptedType)
        if t.name == table and any(
            (ix.name or f"{column.name}_bidx") == name for ix in column.type.search
        ):
            return True
    return False


def _searchable(models: Any) -> list[tuple[Any, Any]]:
    from sqlalchemy import MetaData, Table

    from sqlalchemy_cmk import EncryptedType

    sources = list(models) if isinstance(models, list | tuple) else [models]
    out = []
    for source in sources:
        md = source if isinstance(source, MetaData | Table) else getattr(source, "metadata", None)
        if not isinstance(md, MetaData | Table):
            raise UsageError(
                "--metadata must name a declarative base, a MetaData or a Table, "
                f"not {type(source).__name__}"
            )
        tables = [md] if isinstance(md, Table) else list(md.tables.values())
        for table in tables:
            for column in table.columns:
                if isinstance(column.type, EncryptedType) and column.type.search:
                    out.append((table, column))
    return out


def _walk(engine: Engine, cmk: Any, models: Any, args: argparse.Namespace, out: TextIO) -> int:
    from migrations_helpers import Job, run_job

    operation = "build_index" if args.search_command == "build" else "rotate_index"
    view = _progress_view(args, f"{args.search_command} {args.index}")
    try:
        job = Job(
            table=args.index,
            metadata=models,
            batch_size=args.batch_size,
            settle=args.settle,
            bits=getattr(args, "bits", None),
            progress=lambda p: view.update(p.done, p.total),
        )
        report = run_job(engine, cmk, operation, job)  # type: ignore[call-overload]
    finally:
        view.close()
    clean = report.verify is None or report.verify.clean
    if args.json:
        doc = asdict(report)
        doc["ok"] = clean
        json.dump(doc, out, indent=2)
        print(file=out)
    else:
        steps = "; ".join(report.steps) or "no state change"
        rate = report.rows / report.seconds if report.seconds > 0 else 0.0
        print(
            f"{args.search_command} {report.domain}: {steps}; now {report.phase} "
            f"(key version {report.version}, {report.bits} bits); {report.rows:,} row(s) "
            f"written in {report.seconds:.1f} s ({rate:,.0f} rows/s; {report.waited:.1f} s "
            f"waiting for every process to see a state), {report.conflicts:,} left to "
            "concurrent writes",
            file=out,
        )
        if report.verify is not None:
            _print_verify(report.verify, out)
    if not clean:
        _fail(f"verify failed: rows of {report.domain} whose index does not match their value")
        return 1
    return 0


def _status(engine: Engine, models: Any, args: argparse.Namespace, out: TextIO) -> int:
    from migrations_helpers import index_status

    found = index_status(engine, models, args.index)
    if args.json:
        json.dump([asdict(s) for s in found], out, indent=2)
        print(file=out)
        return 0
    rows = []
    for s in found:
        other = "" if s.other_version is None else f"v{s.other_version}/{s.other_bits}b"
        for table, counts in sorted(s.tables.items()):
            rows.append(
                [
                    s.domain,
                    s.phase,
                    f"slot {s.slot} v{s.version}/{s.bits}b",
                    other,
                    table,
                    f"{counts['done']:,}",
                    f"{counts['pending']:,}",
                ]
            )
    _print_table(["INDEX", "PHASE", "READS", "ALSO WRITES", "TABLE", "DONE", "PENDING"], rows, out)
    return 0


def _verify(engine: Engine, cmk: Any, models: Any, args: argparse.Namespace, out: TextIO) -> int:
    from migrations_helpers import verify_index

    report = verify_index(engine, cmk, models, args.index)
    if args.json:
        doc = asdict(report)
        doc["ok"] = report.clean
        json.dump(doc, out, indent=2)
        print(file=out)
    else:
        _print_verify(report, out)
    if not report.clean:
        _fail(
            f"verify failed: {sum(report.mismatched.values()):,} mismatched, "
            f"{sum(report.failed.values()):,} failed row(s) of {report.domain}"
        )
        return 1
    return 0


def _print_verify(report: Any, out: TextIO) -> None:
    tenants = sorted({*report.ok, *report.mismatched, *report.failed})
    rows = [
        [
            t,
            f"{report.ok.get(t, 0):,}",
            f"{report.mismatched.get(t, 0):,}",
            f"{report.failed.get(t, 0):,}",
        ]
        for t in tenants
    ]
    if rows:
        _print_table(["TENANT", "OK", "MISMATCHED", "FAILED"], rows, out)
    for table, pk, tenant, why in report.failures[:_MAX_FAILURES_SHOWN]:
        print(f"{why.upper()} {table} row {pk} (tenant {tenant})", file=out)
    print(
        f"checked {report.checked:,} row(s) of {report.domain} (phase {report.phase}): "
        + ("OK" if report.clean else "FAILED"),
        file=out,
    )
