"""Benchmark of the online backfill: encrypting an existing text column of a big PostgreSQL table.

Run from the repository root::

    python -m benchmarks.migrate                        # 1,000,000 rows, 1 and 2 workers
    python -m benchmarks.migrate --rows 100000 --workers 1
    python -m benchmarks.migrate --json migrate.json
    python -m benchmarks.migrate --workers 1 --memory-rows 0 --repeat 3   # best and median

Method:

* a scratch database (``cmk_bench_migrate_<random>``) on the server at ``--postgres-url`` (default
  ``$SQLALCHEMY_CMK_BENCH_POSTGRES_URL``, else the local server), dropped at the end;
* the table ``bench_notes (id bigint primary key, tenant_id text, body text)``: ``body`` 40
  characters, ``tenant_id`` over 10 tenants, loaded with ``INSERT ... SELECT generate_series``,
  then ``VACUUM ANALYZE`` and ``CHECKPOINT``; dropped and loaded again before every run, so each
  run starts from the same plaintext table;
* the companion column is added (``ensure_companion``, a catalog-only change) before the clock
  starts; then N worker processes (multiprocessing, spawn) each run
  :func:`migrations_helpers.backfill.encrypt_columns` on the whole table with their own engine,
  and PostgreSQL's ``SKIP LOCKED`` partitions the batches among them, as ``sqlalchemy-cmk
  encrypt-column --workers N`` does;
* then the final verify: :func:`migrations_helpers.backfill.verify` decrypts every row in one
  process (as ``sqlalchemy-cmk verify`` does after ``encrypt-column --workers N``), and must
  find every row encrypted and readable;
* **end-to-end rows/s = rows / (encrypt + final verify)**, where encrypt is the last worker's
  end - the first worker's start of ``encrypt_columns``, so process start-up and imports are
  not counted (the wall time with them is reported too); encrypt-only and verify-only rates are
  reported beside it;
* peak RSS: each worker reads its own high-water mark (``VmHWM`` in ``/proc/self/status``) when
  it is done, and its RSS before the backfill (``VmRSS``), so the growth is visible; memory
  independence is checked by running the same with ``--memory-rows`` rows (default 250,000);
* KMS: :class:`~sqlalchemy_cmk.providers.local.LocalKeyProvider` (in-memory AES-GCM, no
  latency) with master keys drawn once per run and shared by the workers and the verify, so
  this measures the library and the database, not a KMS; with a real KMS one wrap per tenant
  per ``write_key_max_age`` is added, and each new envelope's proof unwrap (a few per run).
  Audit: ``audit_sinks=[]``. The result is also checked with ``status`` (every value carries
  the ``cmk:`` marker, none is plaintext).

The machine's load average is printed with the results: the benchmark shares the cores with
whatever else runs, the database server included.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy
from sqlalchemy import Engine, create_engine, make_url, text

LOCAL_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PG_ENV = "SQLALCHEMY_CMK_BENCH_POSTGRES_URL"
TABLE = "bench_notes"
TENANTS = 10
TARGET_ROWS_PER_SECOND = 30_000  # one worker, end to end with the final verify (issue 8)


@dataclass
class Result:
    rows: int
    workers: int
    batch_size: int
    encrypted: int  # rows the workers report as encrypted
    seconds: float  # first worker's start of encrypt_columns to the last one's end
    verify_seconds: float  # the final verify of every row, one process
    verified_ok: int  # rows the final verify found encrypted and readable
    wall_seconds: float  # including process start-up and imports, without the verify
    rows_per_second: float  # end to end: rows / (seconds + verify_seconds)
    encrypt_rows_per_second: float  # rows / seconds
    verify_rows_per_second: float  # rows / verify_seconds
    peak_rss_mib: list[float]  # per worker: VmHWM at the end
    start_rss_mib: list[float]  # per worker: VmRSS before the backfill
    cpu_seconds: list[float]  # per worker: user + system
    batches: int
    passes: int
    conflicts: int
    load_seconds: float
    plaintext_left: int
    table_mib_before: float  # pg_total_relation_size: heap, TOAST, indexes
    table_mib_after: float
    loadavg_before: tuple[float, float, float]


def _proc_status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmHWM, VmRSS); ru_maxrss where there is no /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _cmk(keys: dict[str, str]) -> Any:
    """The CMK of a worker and of the verify: the same master keys in every process."""
    from sqlalchemy_cmk import CMK
    from sqlalchemy_cmk.providers.local import LocalKeyProvider

    provider = LocalKeyProvider({name: bytes.fromhex(k) for name, k in keys.items()})
    tenants = {f"tenant-{i}": f"local://tenant-{i}" for i in range(TENANTS)}
    return CMK(provider, tenant_keys=tenants, audit_sinks=[])


def _worker(url: str, batch_size: int, keys: dict[str, str], queue: Any) -> None:
    """One worker process: its own engine and CMK, the whole backfill (SKIP LOCKED shares it)."""
    try:
        from migrations_helpers.backfill import encrypt_columns

        engine = create_engine(url)
        cmk = _cmk(keys)
        with engine.connect() as conn:  # connect and warm up outside the timed part
            conn.execute(text("SELECT 1"))
        start_rss = _proc_status_kib("VmRSS")
        started = time.time()
        report = encrypt_columns(
            engine, cmk, TABLE, ["body"], tenant_column="tenant_id", batch_size=batch_size
        )
        ended = time.time()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        engine.dispose()
        queue.put(
            {
                "started": started,
                "ended": ended,
                "rows": report.rows,
                "batches": report.batches,
                "passes": report.passes,
                "conflicts": report.conflicts,
                "peak_rss_kib": _proc_status_kib("VmHWM"),
                "start_rss_kib": start_rss,
                "cpu": usage.ru_utime + usage.ru_stime,
            }
        )
    except BaseException as exc:  # reported to the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


@contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    name = f"cmk_bench_migrate_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def load(engine: Engine, rows: int) -> float:
    """(Re)create the plaintext table with ``rows`` rows; returns the seconds it took."""
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))
        conn.execute(
            text(
                f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, tenant_id text NOT NULL, body text)"
            )
        )
        conn.execute(
            text(
                f"INSERT INTO {TABLE} (id, tenant_id, body) "
                f"SELECT g, 'tenant-' || (g % {TENANTS}), "
                "left(md5(g::text) || md5((-g)::text), 40) "
                "FROM generate_series(1, :rows) AS g"
            ),
            {"rows": rows},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f"VACUUM ANALYZE {TABLE}"))
        conn.execute(text("CHECKPOINT"))
    return time.perf_counter() - started


def _size_mib(engine: Engine) -> float:
    with engine.connect() as conn:
        size: int = conn.execute(text(f"SELECT pg_total_relation_size('{TABLE}')")).scalar_one()
    return round(size / 2**20, 1)


def run_once(url: str, rows: int, workers: int, batch_size: int) -> Result:
    from migrations_helpers.backfill import ensure_companion, status, verify

    keys = {f"tenant-{i}": os.urandom(32).hex() for i in range(TENANTS)}
    engine = create_engine(url)
    try:
        load_seconds = load(engine, rows)
        size_before = _size_mib(engine)
        ensure_companion(engine, TABLE)
        loadavg = os.getloadavg()
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        processes = [
            context.Process(target=_worker, args=(url, batch_size, keys, queue))
            for _ in range(workers)
        ]
        wall_started = time.perf_counter()
        for p in processes:
            p.start()
        outcomes = [queue.get() for _ in processes]
        for p in processes:
            p.join()
            p.close()
        wall = time.perf_counter() - wall_started
        queue.close()
        queue.join_thread()
        errors = [o["error"] for o in outcomes if "error" in o]
        if errors:
            raise RuntimeError("; ".join(errors))
        # The final verify, timed on its own (the workers' clocks stop when they are done).
        checker = _cmk(keys)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        verify_started = time.perf_counter()
        checked = verify(engine, checker, TABLE, ["body"], tenant_column="tenant_id")
        verify_seconds = time.perf_counter() - verify_started
        verified_ok = sum(checked.encrypted_ok.values()) if checked.ok else 0
        counts = status(engine, TABLE, ["body"]).counts["body"]
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"VACUUM {TABLE}"))  # the size of the live data, not dead rows
        size_after = _size_mib(engine)
    finally:
        engine.dispose()
    seconds = max(o["ended"] for o in outcomes) - min(o["started"] for o in outcomes)
    encrypted = sum(o["rows"] for o in outcomes)
    return Result(
        rows=rows,
        workers=workers,
        batch_size=batch_size,
        encrypted=encrypted,
        seconds=round(seconds, 2),
        verify_seconds=round(verify_seconds, 2),
        verified_ok=verified_ok,
        wall_seconds=round(wall, 2),
        rows_per_second=round(rows / (seconds + verify_seconds)),
        encrypt_rows_per_second=round(encrypted / seconds),
        verify_rows_per_second=round(rows / verify_seconds),
        peak_rss_mib=[round(o["peak_rss_kib"] / 1024, 1) for o in outcomes],
        start_rss_mib=[round(o["start_rss_kib"] / 1024, 1) for o in outcomes],
        cpu_seconds=[round(o["cpu"], 1) for o in outcomes],
        batches=sum(o["batches"] for o in outcomes),
        passes=max(o["passes"] for o in outcomes),
        conflicts=sum(o["conflicts"] for o in outcomes),
        load_seconds=round(load_seconds, 1),
        plaintext_left=counts.get("plaintext", 0),
        table_mib_before=size_before,
        table_mib_after=size_after,
        loadavg_before=loadavg,
    )


def environment(url: str) -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], capture_output=True, text=True, check=True, timeout=10
            )
            return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            server = conn.execute(text("SHOW server_version")).scalar_one()
    finally:
        engine.dispose()
    return {
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "postgresql": server,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "commit": git("rev-parse", "--short", "HEAD")
        + (" + local changes" if git("status", "--porcelain") else ""),
        "kms": "LocalKeyProvider (in memory), audit_sinks=[]",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.migrate",
        description="Encrypt an existing text column of a big PostgreSQL table, 1 and 2 workers.",
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="default: %(default)s")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="default: %(default)s"
    )
    parser.add_argument(
        "--memory-rows",
        type=int,
        default=250_000,
        help="also run 1 worker on this many rows, for memory independence (0: skip; "
        "default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=1000, help="default: %(default)s")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each configuration this many times, interleaved (the machine is shared: "
        "report the best and the median; default: %(default)s)",
    )
    parser.add_argument("--postgres-url", default=os.environ.get(PG_ENV, LOCAL_PG))
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    env = environment(args.postgres_url)
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    plan = [(args.rows, w) for _ in range(args.repeat) for w in args.workers]
    if args.memory_rows:
        plan.insert(0, (args.memory_rows, 1))
    results: list[Result] = []
    with scratch_database(args.postgres_url) as url:
        for rows, workers in plan:
            print(f"running: {rows:,} rows, {workers} worker(s) ...", flush=True)
            result = run_once(url, rows, workers, args.batch_size)
            results.append(result)
            print(f"  {json.dumps(asdict(result))}", flush=True)

    print()
    print(
        "| rows | workers | encrypt s | verify s | end-to-end rows/s | encrypt rows/s "
        "| verify rows/s | peak RSS per worker (MiB) | worker CPU s | table MiB before / after "
        "| load avg before |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|")
    for r in results:
        print(
            f"| {r.rows:,} | {r.workers} | {r.seconds:.1f} | {r.verify_seconds:.1f} "
            f"| {r.rows_per_second:,} | {r.encrypt_rows_per_second:,} "
            f"| {r.verify_rows_per_second:,} "
            f"| {', '.join(f'{m:.0f}' for m in r.peak_rss_mib)} "
            f"| {', '.join(f'{c:.0f}' for c in r.cpu_seconds)} "
            f"| {r.table_mib_before:.0f} / {r.table_mib_after:.0f} "
            f"| {' '.join(f'{x:.2f}' for x in r.loadavg_before)} |"
        )
    ok = all(
        r.plaintext_left == 0 and r.encrypted == r.rows and r.verified_ok == r.rows for r in results
    )
    print(f"\nevery row encrypted exactly once and verified, none left: {'yes' if ok else 'NO'}")
    single = [r for r in results if r.workers == 1 and r.rows == args.rows]
    if single:
        rates = sorted(r.rows_per_second for r in single)
        best, median = rates[-1], statistics.median(rates)
        verdict = "met" if median >= TARGET_ROWS_PER_SECOND else "MISSED"
        print(
            f"target >= {TARGET_ROWS_PER_SECOND:,} rows/s end to end (encrypt + final verify) "
            f"with 1 worker: {verdict} on the median of {len(rates)} run(s): best {best:,}, "
            f"median {median:,.0f} rows/s ({median / TARGET_ROWS_PER_SECOND - 1:+.0%})"
        )
        small = [r for r in results if r.rows == args.memory_rows and r.workers == 1]
        if small:
            big_peak, small_peak = max(single[0].peak_rss_mib), max(small[0].peak_rss_mib)
            print(
                f"peak RSS, 1 worker: {small_peak:.0f} MiB at {args.memory_rows:,} rows, "
                f"{big_peak:.0f} MiB at {args.rows:,} rows ({big_peak - small_peak:+.0f} MiB)"
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": env, "results": [asdict(r) for r in results]}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
