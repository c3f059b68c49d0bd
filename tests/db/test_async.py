"""AsyncSession: installed on an ``async_sessionmaker``, over aiosqlite, psycopg's async driver
and asyncpg; KMS waits awaited on the event loop, never blocking it.

Each test runs its own event loop through ``asyncio.run`` (no pytest plugin): an async engine's
connections belong to the loop that opened them, so the engine is made and disposed inside it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import nullcontext as _nothing
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import String, Text, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_cmk import (
    CMK,
    ConfigurationError,
    DecryptionError,
    EncryptedMixin,
    EncryptedType,
    KMSUnavailableError,
    NoTenantError,
    PlaintextWriteError,
    TenantMismatchError,
    TenantRevokedError,
    UnsupportedQueryError,
    cross_tenant_context,
    current_context,
    tenant_column,
    tenant_context,
)
from sqlalchemy_cmk.providers.local import LocalKeyProvider
from sqlalchemy_cmk.testing import MemoryAuditSink

pytest.importorskip("greenlet")  # SQLAlchemy's asyncio needs it (sqlalchemy[asyncio])


class Base(DeclarativeBase):
    pass


class Note(EncryptedMixin, Base):
    __tablename__ = "async_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = tenant_column()
    body: Mapped[str] = mapped_column(EncryptedType(Text))
    title: Mapped[str] = mapped_column(String(50), default="")


TENANTS = tuple(f"tenant-{i:02d}" for i in range(12))


class SlowProvider:
    """The real local provider behind a fault-injection wrapper: every call waits ``latency``
    (as a remote KMS does) and, while ``down`` or for the next ``failures`` calls, fails as
    unavailable (retryable); while ``hang`` is set, a call waits until it is cleared."""

    scheme = "local"

    def __init__(self, inner: LocalKeyProvider, latency: float = 0.0) -> None:
        self.inner = inner
        self.latency = latency
        self.down = False
        self.failures = 0
        self.hang = threading.Event()
        self.calls = 0
        self._lock = threading.Lock()

    def _enter(self) -> None:
        with self._lock:
            self.calls += 1
            failing = self.failures > 0
            self.failures -= failing
        while self.hang.is_set():
            time.sleep(0.01)
        if self.latency:
            time.sleep(self.latency)
        if self.down or failing:
            raise KMSUnavailableError("injected outage")

    def wrap_key(self, key_ref: str, data_key: bytes, context: Mapping[str, str]) -> bytes:
        self._enter()
        return self.inner.wrap_key(key_ref, data_key, context)

    def unwrap_key(self, key_ref: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        self._enter()
        return self.inner.unwrap_key(key_ref, wrapped, context)


@dataclass
class Env:
    engine: AsyncEngine
    maker: async_sessionmaker[Any]
    cmk: CMK
    kms: SlowProvider
    audit: MemoryAuditSink

    async def write(self, tenant: str, bodies: list[str]) -> None:
        with tenant_context(tenant):
            async with self.maker() as s:
                s.add_all(Note(body=b) for b in bodies)
                await s.commit()

    async def read(self, tenant: str) -> list[str]:
        with tenant_context(tenant):
            async with self.maker() as s:
                rows = await s.scalars(
                    select(Note).where(Note.tenant_id == tenant).order_by(Note.id)
                )
                return [n.body for n in rows]

    async def raw_bodies(self) -> list[bytes]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(text("SELECT body FROM async_notes ORDER BY id"))
            return [bytes(r[0]) for r in rows]


ASYNC_DRIVERS = [
    "sqlite",
    pytest.param("postgresql-psycopg", marks=pytest.mark.postgresql),
    pytest.param("postgresql-asyncpg", marks=pytest.mark.postgresql),
]


@pytest.fixture(params=ASYNC_DRIVERS)
def async_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """An async URL for each driver; PostgreSQL's is the run's fresh database (each test
    creates and drops its own table)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/test.db"
    pytest.importorskip("asyncpg" if request.param.endswith("asyncpg") else "psycopg")
    url = make_url(request.getfixturevalue("postgres_url"))
    driver = "asyncpg" if request.param.endswith("asyncpg") else "psycopg_async"
    return url.set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)


def run(
    url: str, body: Callable[[Env], Awaitable[None]], *, latency: float = 0.0, **cmk_kw: Any
) -> None:
    """Run ``body`` in a fresh event loop, on an installed async_sessionmaker over ``url``."""

    async def main() -> None:
        engine = create_async_engine(url)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
            await conn.run_sync(Base.metadata.create_all)
        names = {t: os.urandom(32) for t in TENANTS}
        kms = SlowProvider(LocalKeyProvider(names), latency)
        audit = MemoryAuditSink()
        cmk = CMK(
            kms,  # type: ignore[arg-type]
            tenant_keys={t: f"local://{t}" for t in TENANTS},
            audit_sinks=[audit],
            **cmk_kw,
        )
        maker = async_sessionmaker(engine, expire_on_commit=False)
        cmk.install(maker)
        try:
            await body(Env(engine, maker, cmk, kms, audit))
        finally:
            cmk.uninstall(maker)
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.drop_all)
            await engine.dispose()

    asyncio.run(main())


# -- round trip, at rest, integrity --------------------------------------------------------------


def test_round_trip_stores_only_ciphertext(async_url: str) -> None:
    async def body(env: Env) -> None:
        secrets = [f"pt:async-secret-{i}" for i in range(5)]
        await env.write("tenant-00", secrets)
        assert await env.read("tenant-00") == secrets
        for raw in await env.raw_bodies():
            assert b"async-secret" not in raw
        # A cold read (cache dropped) goes to the KMS and back through the awaited wait.
        env.cmk.forget_tenant()
        assert await env.read("tenant-00") == secrets
        # The other ORM entry points: get, and a refresh after an update.
        with tenant_context("tenant-00"):
            async with env.maker() as s:
                note = await s.get(Note, 1)
                assert note is not None and note.body == secrets[0]
                note.body = "pt:changed"
                await s.commit()
                await s.refresh(note)
                assert note.body == "pt:changed"

    run(async_url, body)


def test_no_tenant_raises(async_url: str) -> None:
    async def body(env: Env) -> None:
        async with env.maker() as s:
            s.add(Note(body="pt:orphan"))
            with pytest.raises(NoTenantError):
                await s.flush()
        assert await env.raw_bodies() == []

    run(async_url, body)


def test_revoked_tenant_can_neither_read_nor_write(async_url: str) -> None:
    async def body(env: Env) -> None:
        await env.write("tenant-01", ["pt:before"])
        env.cmk.revoke("tenant-01")
        with pytest.raises(TenantRevokedError):
            await env.read("tenant-01")
        with pytest.raises(TenantRevokedError):
            await env.write("tenant-01", ["pt:after"])
        assert len(await env.raw_bodies()) == 1
        assert await env.read("tenant-02") == []  # other tenants unaffected

    run(async_url, body)


def test_tampered_row_raises(async_url: str) -> None:
    async def body(env: Env) -> None:
        await env.write("tenant-00", ["pt:intact"])
        (raw,) = await env.raw_bodies()
        flipped = raw[:-1] + bytes([raw[-1] ^ 1])
        async with env.engine.begin() as conn:
            await conn.execute(text("UPDATE async_notes SET body = :b"), {"b": flipped})
        with pytest.raises(DecryptionError) as info:
            await env.read("tenant-00")
        assert "intact" not in str(info.value)

    run(async_url, body)


def test_kms_outage_rolls_the_flush_back(async_url: str) -> None:
    async def body(env: Env) -> None:
        env.kms.down = True
        with tenant_context("tenant-03"):
            async with env.maker() as s:
                note = Note(body="pt:unsent")
                s.add(note)
                with pytest.raises(KMSUnavailableError):
                    await s.commit()
                assert note.body == "pt:unsent"  # the instance keeps its plaintext
        env.kms.down = False
        assert await env.raw_bodies() == []
        await env.write("tenant-03", ["pt:later"])  # healed: the next flush works
        assert await env.read("tenant-03") == ["pt:later"]

    run(async_url, body, retry_attempts=1)


def test_stream_and_yield_per(async_url: str) -> None:
    async def body(env: Env) -> None:
        bodies = [f"pt:row-{i}" for i in range(25)]
        await env.write("tenant-04", bodies)
        env.cmk.forget_tenant()
        with tenant_context("tenant-04"):
            async with env.maker() as s:
                stmt = select(Note).order_by(Note.id).execution_options(yield_per=10)
                result = await s.stream_scalars(stmt)
                assert [n.body async for n in result] == bodies

    run(async_url, body)


def test_bulk_update_of_an_encrypted_column_is_sealed(async_url: str) -> None:
    async def body(env: Env) -> None:
        await env.write("tenant-05", ["pt:old"])
        with tenant_context("tenant-05"):
            async with env.maker() as s:
                note = (await s.scalars(select(Note))).one()
                await s.execute(update(Note).where(Note.id == note.id).values(title="t2"))
                await s.commit()
        assert await env.read("tenant-05") == ["pt:old"]

    run(async_url, body)


# -- tenant_context across tasks ------------------------------------------------------------------


def test_gathered_tasks_each_read_only_their_tenant(async_url: str) -> None:
    async def body(env: Env) -> None:
        for t in TENANTS[:4]:
            await env.write(t, [f"pt:{t}:{i}" for i in range(3)])
        env.cmk.forget_tenant()
        all_in = asyncio.Event()
        entered: list[str] = []

        async def task(tenant: str) -> tuple[str, list[str]]:
            with tenant_context(tenant):
                entered.append(tenant)
                if len(entered) == 4:
                    all_in.set()
                await all_in.wait()  # the four contexts are open at the same time
                async with env.maker() as s:
                    # No tenant filter: the rows' tenant check alone keeps the others out.
                    rows = await s.scalars(select(Note).where(Note.tenant_id == tenant))
                    ctx = current_context()
                    assert ctx is not None
                    return ctx.tenant_id or "", [n.body for n in rows]

        results = await asyncio.gather(*(task(t) for t in TENANTS[:4]))
        assert results == [(t, [f"pt:{t}:{i}" for i in range(3)]) for t in TENANTS[:4]]
        assert current_context() is None  # nothing leaked out of the tasks

    run(async_url, body)


def test_a_context_entered_in_one_task_does_not_leak_into_a_sibling() -> None:
    async def main() -> None:
        entered = asyncio.Event()
        release = asyncio.Event()

        async def holder() -> None:
            with tenant_context("tenant-00"):
                entered.set()
                await release.wait()

        async def sibling() -> Any:
            await entered.wait()  # the holder's context is open now
            try:
                return current_context()
            finally:
                release.set()

        _, seen = await asyncio.gather(holder(), sibling())
        assert seen is None
        assert current_context() is None

    asyncio.run(main())


# -- install targets -----------------------------------------------------------------------------


def test_install_targets(tmp_path: Any) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/t.db")
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        kms = LocalKeyProvider({"k": os.urandom(32)})
        cmk = CMK(kms, tenant_keys={"acme": "local://k"})
        # One AsyncSession: its sync session is hooked, a sibling session is not.
        async with AsyncSession(engine) as hooked, AsyncSession(engine) as plain:
            cmk.install(hooked)
            with pytest.raises(ConfigurationError, match="already installed"):
                cmk.install(hooked)
            with tenant_context("acme"):
                hooked.add(Note(body="pt:one"))
                await hooked.commit()
                plain.add(Note(body="pt:two"))
                with pytest.raises(PlaintextWriteError) as info:  # unhooked: refused
                    await plain.commit()
                assert "pt:two" not in str(info.value)
            cmk.uninstall(hooked)

        # A sync_session_class, and the AsyncEngine's guard.
        class Hooked(Session):
            pass

        cmk.install(Hooked)
        cmk.install(engine)
        async with engine.connect() as conn:  # the guard on the AsyncEngine's Core execution
            with pytest.raises(UnsupportedQueryError):
                await conn.execute(select(Note.id).where(Note.body == "pt:one"))
        maker = async_sessionmaker(engine, sync_session_class=Hooked)
        with tenant_context("acme"):
            async with maker() as s:
                assert [n.body for n in await s.scalars(select(Note))] == ["pt:one"]
        cmk.uninstall(engine)
        cmk.uninstall(Hooked)
        # An async_sessionmaker: hooked through a subclass of its own, Session itself untouched.
        maker2 = async_sessionmaker(engine)
        cmk.install(maker2)
        sync_class = maker2.kw["sync_session_class"]
        assert sync_class is not Session and issubclass(sync_class, Session)
        cmk.uninstall(maker2)
        with pytest.raises(ConfigurationError, match="not installed"):
            cmk.uninstall(maker2)
        cmk.install(maker2)  # again, after an uninstall
        with tenant_context("acme"):
            async with maker2() as s:
                assert [n.body for n in await s.scalars(select(Note))] == ["pt:one"]
        cmk.uninstall(maker2)
        with pytest.raises(ConfigurationError, match="async_sessionmaker"):
            cmk.install(AsyncSession)
        await engine.dispose()

    asyncio.run(main())


# -- the event loop stays responsive -------------------------------------------------------------


class Heartbeat:
    """A task that sleeps 2 ms in a loop and records by how much each wake-up came late."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            started = loop.time()
            await asyncio.sleep(0.002)
            self.lags.append(loop.time() - started - 0.002)

    async def __aenter__(self) -> Heartbeat:
        self._task = asyncio.create_task(self._beat())
        await asyncio.sleep(0.01)  # beating before the work starts
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    @property
    def worst(self) -> float:
        return max(self.lags)


@pytest.fixture
def no_gc() -> Iterator[None]:
    """The collector off while the heartbeat runs: a full collection of the suite's heap is
    a pause of its own, not a KMS wait."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def cold_load_with_heartbeat(env: Env) -> tuple[Heartbeat, float]:
    """A cold cross-tenant load of every tenant's rows with 50 ms per KMS call."""
    with cross_tenant_context(actor="job"):
        async with env.maker() as s:  # warm: statement compilation is not the KMS's
            assert len((await s.scalars(select(Note))).all()) == 20 * len(TENANTS)
    env.cmk.forget_tenant()
    env.kms.latency, env.kms.calls = 0.05, 0
    async with Heartbeat() as beat:
        started = time.perf_counter()
        with cross_tenant_context(actor="job"):
            async with env.maker() as s:
                notes = (await s.scalars(select(Note).order_by(Note.id))).all()
        elapsed = time.perf_counter() - started
    assert env.kms.calls == len(TENANTS)  # one unwrap per tenant: the load was cold
    assert sorted({n.tenant_id for n in notes}) == list(TENANTS) and len(notes) == 240
    assert all(n.body.startswith(f"pt:{n.tenant_id}:") for n in notes)
    return beat, elapsed


def test_kms_waits_never_block_the_event_loop(async_url: str, no_gc: None) -> None:
    """12 tenants x 20 rows, 50 ms per KMS call: the heartbeat never lags more than 20 ms in
    the cold load (12 parallel unwraps; the issue's bound), nor 90 ms in the writes (a wrap
    and its check per tenant; see below).

    Blocking waits fail it: checked by hand with ``_aio.in_async_greenlet`` forced to False
    (worst lag 50-60 ms in the load, 137 ms in the writes), and kept for the load as
    ``test_the_heartbeat_catches_a_blocking_wait`` below."""

    async def body(env: Env) -> None:
        async with Heartbeat() as writes:
            for t in TENANTS:
                await env.write(t, [f"pt:{t}:{i}" for i in range(20)])
        assert env.kms.calls == 2 * len(TENANTS)
        # Looser than the load's bound (the issue's): a write that blocked would hold the loop
        # 100 ms at once (its wrap and the wrap's check; 137 ms measured with the await path
        # off). On this 2-core machine shared with other test runs (load average 8), 45 ms
        # was missed while the loop sat idle in select(), its thread not scheduled in time.
        assert writes.worst < 0.09, f"a write held the loop {writes.worst * 1000:.1f} ms"
        beat, elapsed = await cold_load_with_heartbeat(env)
        assert elapsed >= 0.05  # the KMS's time was spent, just not on the loop
        assert beat.worst < 0.020, f"the load held the loop {beat.worst * 1000:.1f} ms"

    run(async_url, body, latency=0.05)


def test_the_heartbeat_catches_a_blocking_wait(
    tmp_path: Any, no_gc: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat test can fail: with the await path off, the same load lags 50 ms."""
    from sqlalchemy_cmk import _aio

    async def body(env: Env) -> None:
        for t in TENANTS:
            await env.write(t, [f"pt:{t}:{i}" for i in range(20)])
        monkeypatch.setattr(_aio, "in_async_greenlet", lambda: False)
        beat, _ = await cold_load_with_heartbeat(env)
        assert beat.worst >= 0.040, f"worst lag {beat.worst * 1000:.1f} ms"

    run(f"sqlite+aiosqlite:///{tmp_path}/test.db", body)


def test_retries_and_deadlines_keep_the_loop_free(no_gc: None, tmp_path: Any) -> None:
    """A retry's backoff is awaited too, and a hung KMS is abandoned at ``kms_deadline`` as in
    a sync session, the loop ticking all along.

    Blocked, these waits would hold the loop for up to 200 + 400 ms (the backoffs, drawn with
    full jitter) and 1 s (the deadline); the 100 ms bound catches that and leaves room for a
    busy machine's scheduling (20 ms was missed here with a load average of 11 on 2 cores,
    the loop idle in select() when its tick came late)."""

    async def body(env: Env) -> None:
        await env.write("tenant-07", ["pt:warm"])  # compiles the statements, untimed
        assert await env.read("tenant-07") == ["pt:warm"]
        env.kms.calls = 0
        env.kms.failures = 2  # two transient errors, then the wrap works
        async with Heartbeat() as retried:
            await env.write("tenant-06", ["pt:retried"])
        assert env.kms.calls == 4  # 2 failed wraps, the wrap, its check
        assert retried.worst < 0.1, f"a backoff held the loop {retried.worst * 1000:.1f} ms"

        env.cmk.forget_tenant()
        env.kms.hang.set()
        try:
            async with Heartbeat() as hung:
                started = time.perf_counter()
                with pytest.raises(KMSUnavailableError, match="kms_deadline"):
                    await env.read("tenant-06")
                elapsed = time.perf_counter() - started
        finally:
            env.kms.hang.clear()
        assert 0.9 <= elapsed < 2.5, elapsed  # abandoned at the deadline, not at the answer
        assert hung.worst < 0.1, f"a hung call held the loop {hung.worst * 1000:.1f} ms"
        assert await env.read("tenant-06") == ["pt:retried"]  # the KMS is back

    run(
        f"sqlite+aiosqlite:///{tmp_path}/test.db",
        body,
        retry_backoff=0.2,
        kms_deadline=1.0,  # room for both backoffs (at most 0.2 + 0.4 s): retries share it
    )


# -- audit: one event per access, refused ones included (issue 12) -------------------------------


def test_concurrent_accesses_are_audited_each_once(async_url: str) -> None:
    """Loads of several tasks interleave on one loop (each cold unwrap awaits 20 ms): each
    access, refused or not, gives exactly one decrypt event, for its own context's tenant and
    with its own request id; a refusal's scope never joins another task's access."""

    async def body(env: Env) -> None:
        for tenant in TENANTS[:6]:
            await env.write(tenant, [f"pt:{tenant}"])
        env.cmk.forget_tenant()
        env.kms.latency = 0.02
        env.audit.events.clear()

        async def load(ctx: str | None, owner: str, request_id: str) -> str:
            guard: Any = tenant_context(ctx, request_id=request_id) if ctx else _nothing()
            with guard:
                async with env.maker() as s:
                    try:
                        stmt = select(Note).where(Note.tenant_id == owner)
                        (await s.scalars(stmt)).all()
                    except (NoTenantError, TenantMismatchError) as exc:
                        return type(exc).__name__
            return "ok"

        jobs = [(t, t, f"req-{t}") for t in TENANTS[:4]]  # each its own rows
        jobs.append((None, TENANTS[4], "req-none"))  # no tenant
        jobs.append((TENANTS[0], TENANTS[5], "req-other"))  # another tenant's rows
        got = await asyncio.gather(*(load(*job) for job in jobs))
        assert got == ["ok"] * 4 + ["NoTenantError", "TenantMismatchError"]

        decrypts = env.audit.of("decrypt")
        assert len(decrypts) == len(jobs)
        # No context, so no request id: the one event with no tenant.
        assert [e.outcome for e in decrypts if e.tenant is None] == ["no_tenant"]
        for ctx, _, request_id in jobs[:4] + jobs[5:]:
            (event,) = [e for e in decrypts if e.request_id == request_id]
            assert event.tenant == ctx, request_id
            assert event.outcome == ("mismatch" if request_id == "req-other" else "ok")
        # Every event with a request id went to that request's context tenant only.
        by_request = {rid: ctx for ctx, _, rid in jobs}
        for e in env.audit.events:
            if e.request_id is not None:
                assert e.tenant == by_request[e.request_id], e

    run(async_url, body)
