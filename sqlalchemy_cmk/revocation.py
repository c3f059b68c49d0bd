"""Revocation in seconds: every process drops a revoked tenant within about a second.

Without this module a tenant disabled in the key registry is still served by other processes
until their caches expire (the registry's ``cache_ttl`` plus ``CMK``'s, a minute and a half by
default). A :class:`RevocationWatcher`, started in every process, closes that gap:

* It watches one table: the :class:`~sqlalchemy_cmk.registry_db.DatabaseKeyRegistry` table
  when the ``CMK`` uses one, else a small revocations table (``cmk_revocations``) that
  :meth:`CMK.revoke <sqlalchemy_cmk.CMK.revoke>` writes for tenants configured in code.
* On PostgreSQL with psycopg it ``LISTEN``\\s on :data:`~sqlalchemy_cmk.registry_db.NOTIFY_CHANNEL`
  (every registry and revocation change ``NOTIFY``\\s in its transaction) and re-reads the table
  when notified; elsewhere (SQLite, MariaDB) it polls a cheap fingerprint of the table
  (``count``, ``sum(version)``, ``max(updated_at)``) every ``poll_interval``. Either way it also
  re-reads the whole table every ``resync_interval``, for changes no notification announced.
* For every tenant whose row changed it drops the registry's cached lookup and ``CMK``'s cached
  data keys (read and write); a key that a KMS call already under way fetches is not cached
  either (``CMK.forget_tenant`` is final). A revoked tenant's next read or write goes to the
  registry and is refused with :class:`~sqlalchemy_cmk.errors.TenantRevokedError`.

Nothing runs at import: the thread starts when the application calls :meth:`start`. It survives
``os.fork`` (gunicorn ``--preload``, Celery prefork, ``multiprocessing`` with fork): in the child,
the watcher abandons the parent's connection without closing it, replaces the engine's pool
(``engine.dispose(close=False)``, as SQLAlchemy recommends for a forked child) and starts a new
thread.

A tenant who disables its key in its *own* KMS is not announced here: that is noticed when a key
is next fetched from the KMS, within ``CMK(cache_ttl=...)``. ``revalidate={"acme": 5.0}`` makes a
watcher drop a tenant's cached keys every 5 seconds, so its KMS is asked again (one unwrap per
cached key in use, per interval, plus a wrap and a verifying unwrap for its next write).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    Table,
    func,
    insert,
    select,
    type_coerce,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.types import NullType

from ._dialects import ExactString, Timestamp, select_dialect
from .errors import ConfigurationError
from .registry import TENANT_ID_MAX, tenant_id_problem
from .registry_db import NOTIFY_CHANNEL, DatabaseKeyRegistry, notify_change

if TYPE_CHECKING:
    from ._cmk import CMK

__all__ = ["RevocationWatcher", "revocations_table"]

_log = logging.getLogger("sqlalchemy_cmk.revocation")

# Above this many tenants changed at once (a reseal bumps every row), all cached keys are
# dropped in one pass instead of one pass per tenant.
_FORGET_ALL_ABOVE = 64
# The longest a listening thread waits in one call, so that stop() returns promptly.
_LISTEN_SLICE = 0.5
_MAX_BACKOFF = 30.0


def revocations_table(
    metadata: MetaData, table_name: str = "cmk_revocations", schema: str | None = None
) -> Table:
    """The table :meth:`CMK.revoke <sqlalchemy_cmk.CMK.revoke>` records revocations of tenants
    configured in code in: one row per tenant ever revoked, never deleted (``reinstate`` sets
    ``revoked`` false), ``version`` bumped by every change."""
    return Table(
        table_name,
        metadata,
        Column("tenant_id", ExactString(TENANT_ID_MAX), primary_key=True),
        Column("revoked", Boolean, nullable=False),
        Column("version", Integer, nullable=False),
        Column("updated_at", Timestamp(), nullable=False),
        schema=schema,
        comment="sqlalchemy-cmk revocations of tenants configured in code",
    )


_Row = tuple[object, bool]  # (version as stored, refused)


class RevocationWatcher:
    """Applies every revocation and registry change to one ``CMK``, within about a second.

    Start one per process (and per ``CMK``), after building the ``CMK``::

        watcher = RevocationWatcher(cmk, engine)
        watcher.start()  # reads the table once, then watches it on a daemon thread

    Args:
        cmk: The ``CMK`` whose caches the watcher drops and whose revocations it applies.
        engine: The database holding the table; default: the ``DatabaseKeyRegistry``'s.
            The watcher holds one connection of its own, detached from the engine's pool,
            while it runs.
        table_name: The revocations table, used when ``cmk`` has tenants configured in code
            (with a ``DatabaseKeyRegistry`` the registry's own table is watched).
        schema: The revocations table's schema, when not the default one.
        metadata: A ``MetaData`` to define the revocations table in (e.g. the application's,
            for Alembic); default: a private one.
        listen: ``True`` to be notified (PostgreSQL with psycopg only), ``False`` to poll;
            default: listen where possible.
        poll_interval: Seconds between two polls when not listening: the revocation latency.
        resync_interval: Seconds between two full reads of the table, whatever the
            notifications said (for changes made without the library, or notifications lost
            while reconnecting).
        revalidate: Tenant -> seconds: drop that tenant's cached data keys this often, so
            that a key the tenant disabled in its own KMS is noticed within that time instead
            of ``CMK(cache_ttl=...)``. Costs one KMS unwrap per interval for each of the
            tenant's cached keys still in use, and one wrap plus one unwrap for its next write.
        clock: Monotonic seconds; a seam for tests.

    Raises:
        ConfigurationError: ``listen=True`` where notifications are not available, intervals
            out of range, or an invalid tenant id in ``revalidate``.
    """

    def __init__(
        self,
        cmk: CMK,
        engine: Engine | None = None,
        *,
        table_name: str = "cmk_revocations",
        schema: str | None = None,
        metadata: MetaData | None = None,
        listen: bool | None = None,
        poll_interval: float = 1.0,
        resync_interval: float = 30.0,
        revalidate: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        inner = cmk._revocations.inner
        self.registry = inner if isinstance(inner, DatabaseKeyRegistry) else None
        if engine is None:
            if self.registry is None:
                raise ConfigurationError(
                    "RevocationWatcher needs engine= (the database of the revocations table) "
                    "when the CMK's tenants are configured in code"
                )
            engine = self.registry._engine
        can_listen = select_dialect(engine.dialect).can_listen(engine.dialect)
        if listen and not can_listen:
            raise ConfigurationError(
                "listen=True needs PostgreSQL through psycopg (postgresql+psycopg://); "
                f"this engine is {engine.dialect.name}+{engine.dialect.driver}: poll instead"
            )
        if not 0 < poll_interval <= resync_interval:
            raise ConfigurationError("0 < poll_interval <= resync_interval is required")
        self._revalidate: dict[str, float] = {}
        for tenant, every in (revalidate or {}).items():
            problem = tenant_id_problem(tenant)
            if problem is not None:
                raise ConfigurationError(f"revalidate: tenant id {tenant!r} is refused: {problem}")
            if not every > 0:
                raise ConfigurationError(f"revalidate: {tenant!r} needs an interval > 0")
            self._revalidate[tenant] = float(every)
        self.cmk = cmk
        self.engine = engine
        self.listening = can_listen if listen is None else listen
        self.poll_interval = float(poll_interval)
        self.resync_interval = float(resync_interval)
        self._clock = clock
        self.table = revocations_table(
            metadata if metadata is not None else MetaData(), table_name, schema
        )
        self._watched = self.registry.table if self.registry is not None else self.table
        self._flag = "disabled" if self.registry is not None else "revoked"
        self._state: dict[str, _Row] | None = None
        self._fingerprint: tuple[object, ...] | None = None
        self._next_check: dict[str, float] = {}  # tenant -> next revalidation
        self._busy = threading.Lock()  # held while applying changes; taken before a fork
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Connection | None = None
        self.last_sync: float | None = None

    def __repr__(self) -> str:
        how = "listening" if self.listening else f"polling every {self.poll_interval:g}s"
        state = "running" if self.running else "stopped"
        return f"<RevocationWatcher {self._watched.fullname!r} {how}, {state}>"

    @property
    def running(self) -> bool:
        """True while the watching thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # -- schema and writes ---------------------------------------------------------------------

    def create_table(self) -> None:
        """Create the revocations table if it does not exist (tenants configured in code only;
        with a ``DatabaseKeyRegistry`` there is nothing to create)."""
        if self.registry is None:
            self.table.create(self.engine, checkfirst=True)

    def publish(self, tenant: str, revoked: bool) -> None:
        """Record ``tenant`` as revoked (or not) in the revocations table, and announce it.

        What :meth:`CMK.revoke <sqlalchemy_cmk.CMK.revoke>` and ``reinstate`` call for tenants
        configured in code once this watcher has started. Database errors propagate as
        SQLAlchemy's own.
        """
        t = self.table
        now = datetime.datetime.now(datetime.timezone.utc)
        for _ in range(3):  # an insert that loses a race to another process's insert retries
            try:
                with self.engine.begin() as conn:
                    done = conn.execute(
                        update(t)
                        .where(t.c.tenant_id == tenant)
                        .values(revoked=revoked, version=t.c.version + 1, updated_at=now)
                    ).rowcount
                    if not done:
                        conn.execute(
                            insert(t).values(
                                tenant_id=tenant, revoked=revoked, version=1, updated_at=now
                            )
                        )
                    notify_change(conn, t)
                return
            except IntegrityError:
                continue
        raise ConfigurationError(
            f"the revocation of tenant {tenant!r} kept conflicting with other writers",
            tenant=tenant,
        )

    # -- running -------------------------------------------------------------------------------

    def start(self) -> None:
        """Read the table once (so revocations made before apply from now on), then watch it.

        Attaches the watcher to its ``CMK`` (``CMK.revoke`` then publishes through it) and
        registers the fork handlers. Call it once per process; a forked child restarts it by
        itself.

        Raises:
            ConfigurationError: already running, or the table could not be read (the
                database error is the cause).
        """
        if self.running:
            raise ConfigurationError("this RevocationWatcher is already running")
        try:
            conn = self._connect(listen=False)
            try:
                with self._busy:
                    self._sync(conn, full=True)
            finally:
                conn.close()
        except SQLAlchemyError as exc:
            raise ConfigurationError(
                f"the revocation watcher cannot read {self._watched.fullname!r} "
                f"({type(exc).__name__}): create it first (registry.create_table() or "
                "watcher.create_table()) and check the database URL"
            ) from exc
        if self.registry is None:
            self.cmk._revocation_publisher = self.publish
        _install_fork_hooks()
        _active.add(self)
        self._stop = threading.Event()
        self._spawn()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching and close the connection (the ``CMK`` keeps what was applied)."""
        _active.discard(self)
        if self.cmk._revocation_publisher == self.publish:
            self.cmk._revocation_publisher = None
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def sync(self) -> set[str]:
        """Read the table now and apply what changed; returns the tenants that changed."""
        conn = self._connect(listen=False)
        try:
            with self._busy:
                return self._sync(conn, full=True)
        finally:
            conn.close()

    def _spawn(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="sqlalchemy-cmk-revocations", daemon=True
        )
        self._thread.start()

    def _connect(self, *, listen: bool) -> Connection:
        # Detached: the connection never returns to the pool, so the application never gets a
        # connection that LISTENs, and a fork never hands this one to the child's pool.
        conn = self.engine.connect()
        try:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.detach()
            if listen:
                conn.exec_driver_sql(f'LISTEN "{NOTIFY_CHANNEL}"')
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self) -> None:
        stop = self._stop
        backoff = self.poll_interval
        dirty = True
        next_resync = self._clock() + self.resync_interval
        next_poll = self._clock() + self.poll_interval
        while not stop.is_set():
            try:
                if self._conn is None:
                    self._conn = self._connect(listen=self.listening)
                    dirty = True  # anything announced while disconnected was missed
                now = self._clock()
                full = now >= next_resync
                if dirty or full:
                    with self._busy:
                        if stop.is_set():
                            break
                        self._sync(self._conn, full=full)
                    dirty = False
                    if full:
                        next_resync = self._clock() + self.resync_interval
                    backoff = self.poll_interval
                with self._busy:
                    wake = self._run_due(self._clock())
                wait = max(0.0, min(wake, next_resync) - self._clock())
                if self.listening:
                    dirty = self._wait_for_notification(self._conn, min(wait, _LISTEN_SLICE))
                else:
                    stop.wait(max(0.0, min(wait, next_poll - self._clock())))
                    if self._clock() >= next_poll:  # not a wake-up for re-validation
                        dirty = True
                        next_poll = self._clock() + self.poll_interval
            except Exception as exc:  # the database went away: reconnect, never die
                _log.warning(
                    "revocation watcher on %s: %s; reconnecting in %.1fs",
                    self._watched.fullname,
                    type(exc).__name__,
                    backoff,
                )
                self._drop_connection()
                stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
        self._drop_connection()

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already broken: nothing to release
                _log.debug("closing a broken revocation watcher connection failed")

    def _wait_for_notification(self, conn: Connection, timeout: float) -> bool:
        # psycopg is its own DBAPI connection (driver_connection is None once detached).
        driver: Any = conn.connection.dbapi_connection
        mine = self._watched.fullname
        seen = False
        gen = driver.notifies(timeout=timeout)
        try:
            for note in gen:
                if note.channel == NOTIFY_CHANNEL and note.payload == mine:
                    seen = True
                    break
        finally:
            gen.close()
        if seen:  # the rest of a burst costs no second read
            for _ in driver.notifies(timeout=0):
                pass
        return seen

    # -- applying changes (callers hold self._busy) ---------------------------------------------

    def _sync(self, conn: Connection, *, full: bool) -> set[str]:
        t = self._watched
        raw_version = type_coerce(t.c.version, NullType())
        fingerprint = tuple(
            conn.execute(
                select(
                    func.count(),
                    func.sum(raw_version),
                    func.max(type_coerce(t.c.updated_at, NullType())),
                )
            ).one()
        )
        if not full and fingerprint == self._fingerprint:
            self.last_sync = self._clock()
            return set()
        rows = conn.execute(
            select(
                type_coerce(t.c.tenant_id, NullType()),
                raw_version,
                type_coerce(t.c[self._flag], NullType()),
            )
        ).all()
        state: dict[str, _Row] = {}
        for tenant, version, flag in rows:
            if isinstance(tenant, bytes | bytearray | memoryview):
                try:
                    tenant = bytes(tenant).decode("utf-8")
                except UnicodeDecodeError:
                    continue  # not a tenant anyone can look up
            if isinstance(tenant, str):
                # Anything but a clean "not refused" counts as refused: the registry will say.
                state[tenant] = (version, not (flag is False or flag == 0))
        old, self._state = self._state, state
        self._fingerprint = fingerprint
        changed = self._apply(old, state)
        self.last_sync = self._clock()
        return changed

    def _apply(self, old: dict[str, _Row] | None, new: dict[str, _Row]) -> set[str]:
        revocations = self.cmk._revocations
        keys = self.cmk._keys
        if old is None:  # the first read: apply every refusal, drop no one else's keys
            changed = {t for t, (_, refused) in new.items() if refused}
            if self.registry is not None:
                self.registry.invalidate()
            elif changed:
                for tenant in changed:
                    revocations.revoke(tenant)
            if 0 < len(changed) <= _FORGET_ALL_ABOVE:
                for tenant in changed:
                    keys.forget(tenant)
            elif changed:
                keys.forget(None)
            return changed
        changed = {t for t in old.keys() | new.keys() if old.get(t) != new.get(t)}
        if not changed:
            return changed
        for tenant in changed:
            refused = new.get(tenant, (None, True))[1]
            if self.registry is not None:
                self.registry.invalidate(tenant)
                if not refused:
                    revocations.reinstate(tenant)  # the registry is the truth: lifts revoke()
            elif refused and tenant in new:
                revocations.revoke(tenant)
            elif not refused:
                revocations.reinstate(tenant)
        # Every change drops the tenant's keys: a removed key or a new primary bites at once.
        if len(changed) > _FORGET_ALL_ABOVE:
            keys.forget(None)
        else:
            for tenant in changed:
                keys.forget(tenant)
        _log.info("revocation watcher: %d tenant(s) changed in %s", len(changed), self._watched)
        return changed

    def _run_due(self, now: float) -> float:
        """Drop keys that are due to be re-validated; returns when the next drop is due."""
        keys = self.cmk._keys
        for tenant, every in self._revalidate.items():
            due = self._next_check.get(tenant)
            if due is None:
                self._next_check[tenant] = now + every
            elif due <= now:
                keys.forget(tenant)
                self._next_check[tenant] = now + every
        return min(self._next_check.values(), default=now + self.resync_interval)

    # -- fork ----------------------------------------------------------------------------------

    def _restart_in_child(self) -> None:
        # Only the forking thread exists in the child. The parent's connection is abandoned,
        # never closed (closing could end the parent's session); psycopg does not finish a
        # connection from another process when it is collected, and the list keeps it anyway.
        self._busy = threading.Lock()
        if self._conn is not None:
            _abandoned.append(self._conn)
            self._conn = None
        self.engine.dispose(close=False)
        if self._thread is not None:
            self._stop = threading.Event()
            self._spawn()


def _publish(cmk: CMK, tenant: str, *, revoked: bool) -> None:
    """Make ``cmk.revoke(tenant)`` (or ``reinstate``) durable and known to every process.

    With a ``DatabaseKeyRegistry`` the tenant is disabled (enabled) there; with tenants in code,
    recorded through the started watcher, if any.
    """
    inner = cmk._revocations.inner
    if isinstance(inner, DatabaseKeyRegistry):
        if revoked:
            inner.disable(tenant)
        else:
            inner.enable(tenant)
    elif cmk._revocation_publisher is not None:
        cmk._revocation_publisher(tenant, revoked)


# -- fork handlers: registered once, by the first start() ----------------------------------------

_active: weakref.WeakSet[RevocationWatcher] = weakref.WeakSet()
_held: list[tuple[RevocationWatcher, bool]] = []  # watchers at a fork, and whether locked
_abandoned: list[Connection] = []
_hooks_lock = threading.Lock()
_hooks_installed = False
# How long a fork waits for a watcher's thread to finish applying a change: bounded, so that a
# database that hangs a watcher's read cannot hang a gunicorn master's fork.
_FORK_WAIT = 5.0


def _before_fork() -> None:
    # A watcher's thread must not be applying a change (holding the CMK's or the registry's
    # lock) at the fork, or the child would inherit that lock held for ever.
    for watcher in list(_active):
        _held.append((watcher, watcher._busy.acquire(timeout=_FORK_WAIT)))


def _after_fork_in_parent() -> None:
    while _held:
        watcher, locked = _held.pop()
        if locked:
            watcher._busy.release()


def _after_fork_in_child() -> None:
    held, _held[:] = list(_held), []
    for watcher, _ in held:
        try:
            watcher._restart_in_child()
        except Exception:  # never break the child's start-up; the next start() reports
            _log.exception("revocation watcher: restart after fork failed")


def _install_fork_hooks() -> None:
    global _hooks_installed
    with _hooks_lock:
        if _hooks_installed or not hasattr(os, "register_at_fork"):
            return
        os.register_at_fork(
            before=_before_fork,
            after_in_parent=_after_fork_in_parent,
            after_in_child=_after_fork_in_child,
        )
        _hooks_installed = True
