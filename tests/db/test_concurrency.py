"""Concurrency: parallel unwraps in one load; tenant contexts isolated per thread and per task."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_cmk import (
    CMK,
    EncryptedMixin,
    EncryptedType,
    NoTenantError,
    TenantMismatchError,
    cross_tenant_context,
    current_context,
    tenant_context,
)
from sqlalchemy_cmk.testing import FakeKeyProvider, MemoryAuditSink


class Base(DeclarativeBase):
    pass


class Note(EncryptedMixin, Base):
    __tablename__ = "cc_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(50))
    body: Mapped[str] = mapped_column(EncryptedType(String))


TENANTS = tuple(f"tenant-{i:02d}" for i in range(10))


@dataclass
class Env:
    session: sessionmaker[Session]
    cmk: CMK
    kms: FakeKeyProvider
    audit: MemoryAuditSink

    def write(self, tenant: str, count: int) -> None:
        with tenant_context(tenant), self.session() as s:
            s.add_all(Note(tenant_id=tenant, body=f"pt:{tenant}:{i}") for i in range(count))
            s.commit()

    def read_current(self) -> tuple[str, list[str]]:
        """Read the rows of whatever tenant is in context here (nothing passed in)."""
        ctx = current_context()
        if ctx is None or ctx.tenant_id is None:
            raise AssertionError("no tenant context reached this code")
        with self.session() as s:
            stmt = select(Note).where(Note.tenant_id == ctx.tenant_id).order_by(Note.id)
            return ctx.tenant_id, [n.body for n in s.scalars(stmt)]


def expected(tenant: str, count: int) -> list[str]:
    return [f"pt:{tenant}:{i}" for i in range(count)]


@pytest.fixture
def make_env(engine: Engine) -> Iterator[Callable[..., Env]]:
    Base.metadata.create_all(engine)
    installed: list[tuple[CMK, sessionmaker[Session]]] = []

    def make(rows_per_tenant: int, tenants: tuple[str, ...] = TENANTS, **kms: Any) -> Env:
        provider = FakeKeyProvider(**kms)
        audit = MemoryAuditSink()
        cmk = CMK(provider, tenant_keys={t: f"fake://{t}" for t in tenants}, audit_sinks=[audit])
        factory = sessionmaker(engine)
        cmk.install(factory)
        installed.append((cmk, factory))
        env = Env(factory, cmk, provider, audit)
        for t in tenants:
            env.write(t, rows_per_tenant)
        return env

    yield make
    for cmk, factory in installed:
        cmk.uninstall(factory)


def test_cold_cross_tenant_load_unwraps_each_tenant_once_in_parallel(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(100, latency=0.05)  # every KMS call takes 50 ms
    env.cmk.forget_tenant()
    env.kms.reset_counts()
    # How many unwraps are in the KMS at once: the parallelism itself, which a machine busy
    # with other work (or a full garbage collection of the suite's heap) cannot fake or hide.
    in_flight, most = [0], [0]
    lock = threading.Lock()
    unwrap = env.kms.unwrap_key

    def counted(*args: Any, **kwargs: Any) -> bytes:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        try:
            return unwrap(*args, **kwargs)
        finally:
            with lock:
                in_flight[0] -= 1

    env.kms.unwrap_key = counted  # type: ignore[method-assign]
    with cross_tenant_context(actor="job"), env.session() as s:
        started = time.perf_counter()
        notes = s.scalars(select(Note).order_by(Note.id)).all()
        elapsed = time.perf_counter() - started
    # Serial unwraps would take 10 x 50 ms, one at a time; in parallel (16 at a time by
    # default) all ten overlap. The wall-clock bound is loose: it only catches a hang.
    assert most[0] >= 5, f"at most {most[0]} unwraps at once"
    assert elapsed < 2.0, f"cold load of 10 tenants took {elapsed:.3f} s"
    assert env.kms.unwrap_count == 10 and env.kms.wrap_count == 0
    assert {c.tenant for c in env.kms.calls} == set(TENANTS)
    by_tenant: dict[str, list[str]] = {}
    for n in notes:
        by_tenant.setdefault(n.tenant_id, []).append(n.body)
    assert by_tenant == {t: expected(t, 100) for t in TENANTS}
    decrypts = env.audit.of("decrypt")
    assert sorted(str(e.tenant) for e in decrypts) == sorted(TENANTS)  # one event per tenant
    assert {e.actor for e in decrypts} == {"job"} and all(e.rows == 100 for e in decrypts)


def test_tenant_contexts_are_isolated_across_threads(make_env: Callable[..., Env]) -> None:
    tenants = TENANTS[:4]
    env = make_env(20, tenants)
    barrier = threading.Barrier(len(tenants), timeout=10)  # a failing thread must not hang

    def work(tenant: str) -> tuple[str, list[str], str | None]:
        with tenant_context(tenant):
            barrier.wait()  # every thread now holds its own context at the same time
            seen, bodies = env.read_current()
            with env.session() as s, pytest.raises(TenantMismatchError) as info:
                s.scalars(select(Note)).all()  # unfiltered: other tenants' rows come back
            assert info.value.tenant == tenant
            barrier.wait()
            ctx = current_context()
            return seen, bodies, ctx.tenant_id if ctx else None

    with ThreadPoolExecutor(len(tenants)) as pool:
        results = list(pool.map(work, tenants))
    assert results == [(t, expected(t, 20), t) for t in tenants]


def test_a_thread_does_not_inherit_the_callers_context(make_env: Callable[..., Env]) -> None:
    env = make_env(3, TENANTS[:1])

    def work() -> None:
        assert current_context() is None
        with env.session() as s, pytest.raises(NoTenantError):
            s.scalars(select(Note)).all()

    with tenant_context(TENANTS[0]), ThreadPoolExecutor(1) as pool:
        pool.submit(work).result()
        assert env.read_current() == (TENANTS[0], expected(TENANTS[0], 3))


def test_tenant_contexts_are_isolated_across_asyncio_tasks(make_env: Callable[..., Env]) -> None:
    tenants = TENANTS[:4]
    env = make_env(20, tenants)

    async def task(tenant: str, all_in: asyncio.Event, entered: list[str]) -> Any:
        with tenant_context(tenant):
            entered.append(tenant)
            if len(entered) == len(tenants):
                all_in.set()
            await all_in.wait()  # every task now holds its own context at the same time
            # asyncio.to_thread copies the task's context into the worker thread.
            result = await asyncio.to_thread(env.read_current)
            ctx = current_context()
            return result, ctx.tenant_id if ctx else None

    async def main() -> list[Any]:
        all_in, entered = asyncio.Event(), list[str]()
        results = await asyncio.gather(*(task(t, all_in, entered) for t in tenants))
        assert current_context() is None  # nothing leaked out of the tasks
        return results

    assert asyncio.run(main()) == [((t, expected(t, 20)), t) for t in tenants]


def test_tenant_context_as_a_decorator(make_env: Callable[..., Env]) -> None:
    a, b, c = TENANTS[:3]
    env = make_env(5, (a, b, c))

    @tenant_context(a, actor="decorated-sync")
    def sync_read() -> tuple[str, list[str]]:
        return env.read_current()

    @tenant_context(b, actor="decorated-async")
    async def async_read() -> tuple[str, list[str]]:
        await asyncio.sleep(0)
        return await asyncio.to_thread(env.read_current)

    assert sync_read() == (a, expected(a, 5))
    assert current_context() is None  # reset after the call
    with tenant_context(c):
        assert sync_read() == (a, expected(a, 5))  # the innermost context wins...
        assert env.read_current() == (c, expected(c, 5))  # ...and the outer one comes back
        coro = async_read()  # created in c's context: the decorator applies when it runs
    assert current_context() is None

    async def main() -> list[Any]:
        first = await coro
        both = await asyncio.gather(async_read(), asyncio.to_thread(sync_read))
        return [first, *both]

    assert asyncio.run(main()) == [(b, expected(b, 5)), (b, expected(b, 5)), (a, expected(a, 5))]
    actors = {(e.tenant, e.actor) for e in env.audit.of("decrypt")}
    assert {(a, "decorated-sync"), (b, "decorated-async")} <= actors
