"""The migration commands: ``encrypt-column``, ``decrypt-column``, ``rewrap``, ``rotate``,
``verify``, ``status`` and ``cutover``.

Each runs the backfill engine behind the Alembic operations, for tables too big to encrypt
inside a migration (docs/migrations.md), through the public API of ``migrations_helpers`` alone
(its ``__all__``), and of the core only what ``sqlalchemy_cmk.__all__`` exports:
``tests/test_cli_imports.py`` holds this module (and the modules of this package it imports) to
that. ``migrations_helpers`` is imported when a command runs, not with the CLI: the registry
commands do not need it.

``--workers N`` (encrypt-column, decrypt-column) starts N spawned processes, each with its own
engine, that partition the table through ``FOR UPDATE SKIP LOCKED`` (PostgreSQL, MariaDB
10.6+, MySQL 8.0+). Progress goes
to stderr (:mod:`._progress`), the final report to stdout (``--json`` for machines).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.exc import ArgumentError

from sqlalchemy_cmk import ConfigurationError

from ._common import (
    URL_ENV,
    UsageError,
    _app_path,
    _describe,
    _driver_logs_silenced,
    _fail,
    _Parser,
    _print_table,
)
from ._progress import PROGRESS_EVERY, _progress_view, _ProgressView

if TYPE_CHECKING:
    from migrations_helpers import Job, Progress, Report

COMMANDS = frozenset(
    {"encrypt-column", "decrypt-column", "rewrap", "rotate", "verify", "status", "cutover"}
)
_NO_KEYS = frozenset({"status", "cutover"})  # SQL only: no CMK, no tenant column
_MAX_FAILURES_SHOWN = 20
_VERBS: dict[str, tuple[Literal["encrypt", "decrypt", "rewrap", "rotate"], str]] = {
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


def _rate(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0.0 < number < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return number


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0.0 < number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {number}")
    return number


def add_parsers(commands: argparse._SubParsersAction[_Parser], as_json: _Parser) -> None:
    """Add the migration commands to ``commands``."""
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
    # rotate and verify find the table's encrypted columns themselves (rotate must take them
    # all, or it would strand one): naming them is optional there.
    every_column = _Parser(add_help=False)
    every_column.add_argument(
        "--column",
        dest="columns",
        action="append",
        default=None,
        metavar="NAME",
        help="an encrypted column (repeat for several; default: every encrypted column of the "
        "table, the model's with --metadata, else those the database shows)",
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
    budget = _Parser(add_help=False)
    budget.add_argument(
        "--max-kms-rps",
        type=_rate,
        default=None,
        metavar="R",
        help="at most R KMS requests per second for the whole command (wraps, unwraps, proofs, "
        "retries; shared evenly by --workers), to stay inside the tenants' KMS quotas",
    )

    backfill = [target, columns, batching, keys, tenant_column, workers, budget, as_json]
    p = commands.add_parser(
        "encrypt-column",
        parents=backfill,
        help="encrypt existing plaintext text columns in place, online (adds the companion); "
        "with --into, move them into binary columns",
    )
    p.add_argument(
        "--into",
        action="append",
        default=[],
        metavar="[COLUMN=]TARGET",
        help="move COLUMN into the existing binary column TARGET (the default storage of "
        "EncryptedType), leaving COLUMN NULL; then `cutover` (COLUMN= may be left out with one "
        "--column; give one for every --column)",
    )
    p = commands.add_parser(
        "decrypt-column",
        parents=backfill,
        help="restore encrypted columns to plaintext (the rollback)",
    )
    p.add_argument(
        "--into",
        action="append",
        default=[],
        metavar="[COLUMN=]TARGET",
        help="decrypt COLUMN into the existing column TARGET, leaving COLUMN NULL (required for "
        "a binary, default-storage column; COLUMN= may be left out with one --column)",
    )
    commands.add_parser(
        "rewrap",
        parents=[target, batching, keys, one_tenant, budget, as_json],
        help="re-wrap data keys under each tenant's current primary key (no re-encryption)",
    )
    commands.add_parser(
        "rotate",  # one worker: a rotation walks the rows that exist when it starts, once
        parents=[target, every_column, batching, keys, tenant_column, one_tenant, budget, as_json],
        help="re-encrypt rows under fresh data keys (every encrypted column of the table)",
    )
    p = commands.add_parser(
        "verify",
        parents=[target, every_column, batching, keys, tenant_column, as_json],
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
    p = commands.add_parser(
        "cutover",
        parents=[target, columns, as_json],
        help="check that a move (--into) has finished: exit 0 when every moved column is "
        "empty, 1 naming the count left (SQL only; the drop belongs in a migration)",
    )
    p.add_argument(
        "--into",
        action="append",
        required=True,
        metavar="[COLUMN=]TARGET",
        help="the move to check, as given to encrypt-column or decrypt-column",
    )


@dataclass(frozen=True)
class _Run:
    """One backfill command, as every worker process runs it (picklable: spawned workers get a
    copy, whose Job holds no models and no progress callback)."""

    command: str
    url: str
    cmk: str
    app_dir: str
    job: Job


def _job(args: argparse.Namespace, models: Any = None) -> Job:
    """The Job of the command ``args`` names (its tenant column resolved by the caller), as an
    Alembic operation of the same options holds it."""
    from migrations_helpers import Job

    return Job(
        table=args.table,
        columns=getattr(args, "columns", None) or (),  # none: rotate/verify find them
        schema=args.schema,
        tenant_column=getattr(args, "tenant_column", None),
        # decrypt-column decodes each value as it was written, never as --metadata declares.
        metadata=None if args.command == "decrypt-column" else models,
        companion_column=args.companion_column,
        batch_size=args.batch_size,
        max_kms_rps=getattr(args, "max_kms_rps", None),
        into=dict(_into(args)),
        tenant=getattr(args, "tenant", None),
        sample=getattr(args, "sample", None),
    )


def _migration_engine(url: str) -> Engine:
    # hide_parameters: a failed statement's message must not carry the values (plaintext).
    return create_engine(make_url(url), hide_parameters=True)


def run_migration(args: argparse.Namespace, out: TextIO) -> int:
    """Run the migration command ``args`` names; returns the exit status."""
    from migrations_helpers import check_encryptable, ensure_companion, parallel_workers

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
        models: Any = None  # --metadata's models: rotate and verify find the columns in them
        workers: int = getattr(args, "workers", 1)
        if args.command not in _NO_KEYS:
            # Known once connected: the server's version decides (MariaDB 10.6+, MySQL 8.0+).
            if workers > 1 and not parallel_workers(engine):
                raise UsageError(
                    f"--workers {workers}: this {engine.dialect.name} database runs single-worker "
                    "(parallel workers partition the table with FOR UPDATE SKIP LOCKED: "
                    "PostgreSQL, MariaDB 10.6+, MySQL 8.0+); use --workers 1"
                )
            cmk = _load_cmk(args.cmk, args.app_dir)
            if hasattr(args, "tenant_column"):  # every command that seals or opens rows
                args.tenant_column, models = _tenant_column(args)
        with engine.connect():
            pass
        if args.command == "status":
            return _status(engine, args, out)
        if args.command == "cutover":
            return _cutover(engine, args, out)
        if args.command == "verify":
            return _verify_table(engine, cmk, models, args, out)
        job = _job(args, models)
        if job.max_kms_rps is not None:
            # One bucket per process: N workers each get 1/N of the budget, so that together
            # they stay within it (bursts included).
            job = replace(job, max_kms_rps=job.max_kms_rps / workers)
        added = False
        if args.command == "encrypt-column":  # before any worker starts: one ALTER, not N
            try:  # what refuses the columns must do so before the companion is added
                check_encryptable(
                    engine,
                    job.table,
                    job.columns,
                    schema=job.schema,
                    into=job.into,
                    metadata=models,
                )
            except ConfigurationError as exc:  # UniqueColumnError, a target unfit for --into
                raise UsageError(f"{type(exc).__name__}: {exc}") from None
            added = ensure_companion(
                engine, job.table, companion_column=job.companion_column, schema=job.schema
            )
        view = _progress_view(args, _VERBS[args.command][0] + " " + _fullname(args))
        problems: list[str] = []
        started = time.monotonic()
        try:
            if workers == 1:
                report = _run_job(
                    args.command, job, engine, cmk, lambda p: view.update(p.done, p.total)
                )
            else:
                # Workers run without the models, as they always have: a spawned worker
                # unpickles its copy before --app-dir is on its import path.
                run = _Run(
                    command=args.command,
                    url=url,
                    cmk=args.cmk,
                    app_dir=str(Path(args.app_dir).resolve()),
                    job=replace(job, metadata=None),
                )
                report, problems = _run_workers(run, workers, view)
        finally:
            view.close()
        report.seconds = time.monotonic() - started
        _print_report(report, args.command, job, workers, added, problems, args, out)
        return 1 if problems else 0
    finally:
        engine.dispose()


def _into(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """``--into [COLUMN=]TARGET`` (encrypt-column, decrypt-column, cutover) as (column, target)
    pairs; a bare TARGET belongs to the one ``--column``."""
    pairs: list[tuple[str, str]] = []
    columns: list[str] = getattr(args, "columns", None) or []
    for item in getattr(args, "into", None) or []:
        column, sep, target = item.rpartition("=")
        if not sep:
            if len(columns) != 1:
                raise UsageError(
                    f"--into {item}: with several --column, say which: --into COLUMN={item}"
                )
            column = columns[0]
        if not column or not target:
            raise UsageError(f"--into takes [COLUMN=]TARGET, got {item!r}")
        if column not in columns:
            raise UsageError(f"--into {item}: {column!r} is not one of the --column names")
        if column in dict(pairs):
            raise UsageError(f"--into {item}: {column!r} has another --into already")
        pairs.append((column, target))
    return tuple(pairs)


def _tenant_column(args: argparse.Namespace) -> tuple[str, Any]:
    """--tenant-column, or the tenant column the model given by --metadata declares; resolved
    here, once, so that a mistake stops the command before anything (even the schema) changes
    and spawned workers get a plain name. Returns it and the models (None without
    --metadata)."""
    from migrations_helpers import resolve_tenant_column

    models: Any = None
    if args.metadata is not None:
        path = _app_path(args.app_dir)
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
        name = resolve_tenant_column(
            args.table, args.tenant_column, metadata=models, schema=args.schema
        )
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None
    return name, models


def _load_cmk(spec: str, app_dir: str) -> Any:
    """The CMK ``--cmk`` names, imported from ``app_dir``; one that does not load is a usage
    error (exit 2), whatever its module does."""
    from migrations_helpers import load_cmk

    path = _app_path(app_dir)
    try:
        return load_cmk(spec)
    except ConfigurationError as exc:
        raise UsageError(f"--cmk {spec}: {exc} (imported from {path})") from None


def _fullname(args: argparse.Namespace) -> str:
    return f"{args.schema}.{args.table}" if args.schema else str(args.table)


def _run_job(
    command: str, job: Job, engine: Engine, cmk: Any, progress: Callable[[Progress], None]
) -> Report:
    """Run the command's backfill once, in this process."""
    from migrations_helpers import run_job

    return run_job(engine, cmk, _VERBS[command][0], replace(job, progress=progress))


def _worker(index: int, run: _Run, conn: Any) -> None:
    """Body of one ``--workers`` process: its own engine and CMK, the same backfill as the others.

    Runs in a spawned process, so it imports everything afresh (the CMK from ``run.cmk``).
    Everything it has to say goes to the parent through ``conn``, its own pipe: no lock is
    shared between workers, so one killed mid-message cannot block the others.
    """
    engine: Engine | None = None
    silenced = _driver_logs_silenced()
    silenced.__enter__()  # for the life of the process: it ends with the job
    try:
        engine = _migration_engine(run.url)
        cmk = _load_cmk(run.cmk, run.app_dir)
        report = _run_job(
            run.command, run.job, engine, cmk, lambda p: conn.send(("progress", p.done, p.total))
        )
        conn.send(("done", report))
    except BaseException as exc:  # reported to the parent, which decides
        with contextlib.suppress(OSError):  # unless the parent is gone
            conn.send(("error", _describe(exc)))
    finally:
        conn.close()
        if engine is not None:
            engine.dispose()


def _run_workers(run: _Run, count: int, view: _ProgressView) -> tuple[Report, list[str]]:
    """Run ``run`` in ``count`` spawned processes at once; merge their reports.

    No coordinator: each worker runs the whole backfill and PostgreSQL's ``SKIP LOCKED`` hands
    each batch to one of them. Returns the merged report and one line per worker that failed
    or died (the work it did is committed; running the command again finishes the rest).
    """
    import multiprocessing
    from multiprocessing.connection import wait

    from migrations_helpers import Report

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
                args=(i, run, writer),
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
        operation=reports[0].operation if reports else _VERBS[run.command][0],
        table=run.job.table,
        columns=tuple(run.job.columns),
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
    command: str,
    job: Job,
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
        columns = report.columns or tuple(job.columns)  # rotate: the columns it found
        if job.into:
            columns = tuple(f"{src} -> {dst}" for src, dst in job.into.items())
        what = f"{name} ({', '.join(columns)})" if columns else name
        rate = report.rows / report.seconds if report.seconds > 0 else 0.0
        print(
            f"{_VERBS[command][1]} {report.rows:,} row(s) of {what} in "
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


def _verify_table(
    engine: Engine, cmk: Any, models: Any, args: argparse.Namespace, out: TextIO
) -> int:
    from migrations_helpers import run_job

    view = _progress_view(args, "verify " + _fullname(args))
    sampled = args.sample is not None and args.sample < 1
    try:
        # The engine's total is the whole table's; a sample checks a share of it, so no total
        # (and no ETA) is shown rather than one the run will never reach.
        job = replace(
            _job(args, models), progress=lambda p: view.update(p.done, None if sampled else p.total)
        )
        report = run_job(engine, cmk, "verify", job)
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
        f"checked {report.checked:,} row(s) of {_fullname(args)} ({', '.join(report.columns)})"
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
    from migrations_helpers import status

    report = status(engine, args.table, args.columns, schema=args.schema)
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


def _cutover(engine: Engine, args: argparse.Namespace, out: TextIO) -> int:
    """Check a move's cutover: 0 when every moved column is empty (the next step is the
    migration that drops it: ``op.cutover_column``); MoveNotFinishedError (exit 1) names the
    count left. The DDL is left to Alembic, where the schema's history lives."""
    from migrations_helpers import check_cutover

    into = _into(args)
    if len(into) != len(args.columns):
        raise UsageError("cutover: give --into [COLUMN=]TARGET for every --column")
    try:
        moved = check_cutover(engine, args.table, dict(into), schema=args.schema)
    except ConfigurationError as exc:  # no such table or column, or no move it could be
        raise UsageError(f"{type(exc).__name__}: {exc}") from None
    if args.json:
        json.dump({"ok": True, "remaining": 0, "moved": moved, "into": dict(into)}, out, indent=2)
        print(file=out)
        return 0
    for src, dst in into:
        print(
            f"{_fullname(args)}.{src} is empty: ready to drop (op.cutover_column("
            f"{args.table!r}, {src!r}, {dst!r}, type_=...)); the model maps the attribute to "
            f"{dst!r}, which keeps its name",
            file=out,
        )
    print(f"{moved:,} row(s) hold the moved values", file=out)
    return 0
