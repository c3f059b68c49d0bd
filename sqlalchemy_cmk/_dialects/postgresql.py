"""PostgreSQL: SKIP LOCKED, LISTEN/NOTIFY through psycopg, asynchronous batch commits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import Connection, func, select
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError

from . import DialectSupport


class PostgreSQLSupport(DialectSupport):
    """PostgreSQL (9.5+ has SKIP LOCKED; the library is tested on 12+)."""

    set_based_update = True

    def skip_locked(self, dialect: Dialect) -> bool:
        return True

    def can_listen(self, dialect: Dialect) -> bool:
        # LISTEN needs the driver's notification API: the watcher uses psycopg 3's.
        return dialect.driver == "psycopg"

    def notify(self, conn: Connection, channel: str, payload: str) -> None:
        # Delivered at commit and dropped on rollback: listeners never re-read for nothing.
        conn.execute(select(func.pg_notify(channel, payload)))

    @contextlib.contextmanager
    def fast_commits(self, conn: Connection) -> Iterator[None]:
        """The walk's batches commit without waiting for the WAL flush
        (``synchronous_commit = off``), and the walk ends with one commit that waits for it.

        A batch is still one atomic transaction, visible to everyone at its commit; what
        changes is only that a crash of the database server (not of this process) may undo the
        last fraction of a second of committed batches, each whole, leaving their rows as they
        were before, which the next run picks up: the same as batches that never ran. The final
        commit flushes the WAL up to it, so every batch is durable before the walk returns.
        The connection's setting is restored before it goes back to the pool.
        """
        with conn.begin():
            conn.exec_driver_sql("SET synchronous_commit TO OFF")
        try:
            yield
            with conn.begin():
                conn.exec_driver_sql("SET synchronous_commit TO ON")
                # A transaction id makes the commit write a record, and wait for the WAL flush
                # up to it: every earlier batch's commit is then durable too.
                conn.exec_driver_sql("SELECT txid_current()")
        finally:
            try:
                with conn.begin():
                    conn.exec_driver_sql("RESET synchronous_commit")
            except DBAPIError:
                conn.invalidate()  # never hand the pool a connection with the setting changed


POSTGRESQL = PostgreSQLSupport()
