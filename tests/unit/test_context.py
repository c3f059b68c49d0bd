"""The tenant context: scoping, nesting, decorators, and isolation across threads and tasks."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import inspect
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from sqlalchemy_cmk import (
    ConfigurationError,
    NoTenantError,
    TenantContext,
    cross_tenant_context,
    current_context,
    tenant_context,
)
from sqlalchemy_cmk.context import require_context


def tenant() -> str | None:
    ctx = current_context()
    return None if ctx is None else ctx.tenant_id


@pytest.fixture(autouse=True)
def _no_context_leaks():
    assert current_context() is None
    yield
    assert current_context() is None


# -- context manager -------------------------------------------------------------------------


def test_no_context_by_default():
    assert current_context() is None
    with pytest.raises(NoTenantError, match="tenant_context"):
        require_context()


def test_enter_returns_the_context_in_force():
    with tenant_context(
        "acme",
        actor="user-42",
        data_label="PHI",
        source_ip="10.0.0.1",
        object_id="patient/17",
        request_id="req-1",
        extra={"k": "v"},
    ) as ctx:
        assert current_context() is ctx
        assert require_context() is ctx
        assert ctx == TenantContext(
            "acme",
            actor="user-42",
            data_label="PHI",
            source_ip="10.0.0.1",
            object_id="patient/17",
            request_id="req-1",
            extra={"k": "v"},
        )
        assert ctx.cross_tenant is False


def test_context_is_immutable_and_copies_extra():
    extra = {"k": "v"}
    with tenant_context("acme", extra=extra) as ctx:
        extra["k"] = "changed"
        assert ctx.extra == {"k": "v"}
        with pytest.raises(TypeError):
            ctx.extra["k"] = "x"  # type: ignore[index]
        with pytest.raises(dataclasses.FrozenInstanceError):
            ctx.tenant_id = "globex"  # type: ignore[misc]


def test_nesting_innermost_wins_and_outer_is_restored():
    with tenant_context("acme", actor="a"):
        assert tenant() == "acme"
        with tenant_context("globex", actor="g"):
            assert tenant() == "globex"
            with tenant_context("initech"):
                assert tenant() == "initech"
            assert tenant() == "globex"
            assert current_context().actor == "g"
        assert tenant() == "acme"
        assert current_context().actor == "a"
    assert current_context() is None


def test_outer_is_restored_when_the_block_raises():
    with tenant_context("acme"):
        with pytest.raises(RuntimeError), tenant_context("globex"):
            assert tenant() == "globex"
            raise RuntimeError("boom")
        assert tenant() == "acme"
    with pytest.raises(RuntimeError), tenant_context("acme"):
        raise RuntimeError("boom")
    assert current_context() is None


def test_one_manager_object_can_be_reentered():
    cm = tenant_context("acme")
    with cm:
        with tenant_context("globex"), cm:
            assert tenant() == "acme"
        assert tenant() == "acme"
    assert current_context() is None


# -- decorator ---------------------------------------------------------------------------------


def test_decorator_on_sync_function():
    @tenant_context("acme", actor="svc")
    def work(x: int) -> tuple[str | None, int]:
        """Docstring kept."""
        return tenant(), x

    assert work(1) == ("acme", 1)
    assert current_context() is None
    assert work.__name__ == "work" and work.__doc__ == "Docstring kept."
    with tenant_context("globex"):
        assert work(2) == ("acme", 2)  # the decorator's tenant wins inside the call
        assert tenant() == "globex"  # and the caller's is back after it


def test_decorator_restores_on_exception():
    @tenant_context("acme")
    def fails() -> None:
        assert tenant() == "acme"
        raise KeyError("x")

    with tenant_context("globex"):
        with pytest.raises(KeyError):
            fails()
        assert tenant() == "globex"
    with pytest.raises(KeyError):
        fails()


def test_decorator_is_reentrant():
    @tenant_context("acme")
    def recurse(n: int) -> list[str | None]:
        return [tenant()] + (recurse(n - 1) if n else [])

    assert recurse(3) == ["acme"] * 4


def test_decorator_on_async_function_sets_context_when_it_runs():
    @tenant_context("acme")
    async def work() -> str | None:
        await asyncio.sleep(0)
        return tenant()

    # Frameworks (FastAPI, Starlette) inspect this to decide whether to await.
    assert inspect.iscoroutinefunction(work)

    async def main() -> tuple[str | None, str | None, str | None]:
        coro = work()  # created here, with no context...
        with tenant_context("globex"):
            inner = await coro  # ...run here, under the decorator's tenant
            after = tenant()
        return inner, after, tenant()

    assert asyncio.run(main()) == ("acme", "globex", None)


def test_decorator_on_async_function_restores_on_exception():
    @tenant_context("acme")
    async def fails() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    async def main() -> str | None:
        with tenant_context("globex"):
            with pytest.raises(ValueError):
                await fails()
            return tenant()

    assert asyncio.run(main()) == "globex"


def test_decorator_on_generator_function_is_refused():
    # The body of a generator runs under its consumer's context, so decorating one would
    # protect nothing: refuse it at decoration time and say what to do instead.
    def gen():
        yield tenant()

    async def agen():
        yield tenant()

    for func in (gen, agen):
        with pytest.raises(ConfigurationError, match="inside its body"):
            tenant_context("acme")(func)


# -- isolation ----------------------------------------------------------------------------------


def test_new_threads_start_without_context():
    with tenant_context("acme"), ThreadPoolExecutor(1) as pool:
        assert pool.submit(tenant).result() is None
        assert tenant() == "acme"


def test_threads_are_isolated():
    barrier = threading.Barrier(2, timeout=5)
    seen: dict[str, list[str | None]] = {}

    def worker(name: str) -> None:
        with tenant_context(name):
            barrier.wait()  # both threads are inside their own block now
            seen[name] = [tenant()]
            barrier.wait()
        seen[name].append(tenant())

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("acme", "globex")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"acme": ["acme", None], "globex": ["globex", None]}


def test_asyncio_tasks_are_isolated():
    async def worker(name: str, entered: asyncio.Event, other: asyncio.Event) -> list[str | None]:
        with tenant_context(name):
            entered.set()
            await other.wait()  # the other task is inside its own block now
            inside = tenant()
        return [inside, tenant()]

    async def main() -> tuple[list[list[str | None]], str | None]:
        a, b = asyncio.Event(), asyncio.Event()
        with tenant_context("parent"):
            results = await asyncio.gather(worker("acme", a, b), worker("globex", b, a))
            return results, tenant()

    results, parent = asyncio.run(main())
    # Each task saw its own tenant while both were inside, then the creator's context again.
    assert results == [["acme", "parent"], ["globex", "parent"]]
    assert parent == "parent"


def test_task_inherits_creator_context_and_its_changes_stay_inside():
    async def child() -> str | None:
        inherited = tenant()
        with tenant_context("child"):
            await asyncio.sleep(0)
        return inherited

    async def main() -> tuple[str | None, str | None]:
        with tenant_context("acme"):
            task = asyncio.create_task(child())
        # The task was created inside the block: it keeps acme even though the block is over.
        return await task, tenant()

    assert asyncio.run(main()) == ("acme", None)


def test_shared_manager_object_across_tasks():
    acme = tenant_context("acme", actor="svc:nightly")  # e.g. a module-level constant

    async def job(delay: float) -> str | None:
        with acme:
            await asyncio.sleep(delay)
            return tenant()

    async def main() -> list[str | None]:
        return await asyncio.gather(job(0.01), job(0.02))

    assert asyncio.run(main()) == ["acme", "acme"]


# -- an exit that cannot undo its enter ------------------------------------------------------
# FastAPI runs a sync dependency's code before and after `yield` in two worker threads, each in
# a copy of the request's context (see tests/test_frameworks.py for the real thing). These
# tests do the same with contextvars directly.


def test_exit_in_a_copy_of_the_context_is_a_configuration_error():
    cm = tenant_context("acme")
    contextvars.copy_context().run(cm.__enter__)  # the enter's change is lost with its copy
    assert current_context() is None
    with pytest.raises(ConfigurationError, match=r"docs/frameworks\.md") as info:
        contextvars.copy_context().run(cm.__exit__, None, None, None)
    assert "async def" in str(info.value) and info.value.tenant == "acme"
    assert info.value.__context__ is None


def test_exit_where_the_enter_is_visible_but_its_token_is_not_is_refused():
    # The enter ran here; its exit runs in a copy that still sees the entry (a thread started
    # inside the block), where the token cannot be reset.
    cm = tenant_context("acme")
    with cm:
        ctx = contextvars.copy_context()
        with pytest.raises(ConfigurationError, match="another context"):
            ctx.run(cm.__exit__, None, None, None)
        assert tenant() == "acme"  # the block itself is intact


def test_sync_generator_with_halves_in_copied_contexts_fails_clearly():
    # The shape of `def dep(): with tenant_context(t): yield` under FastAPI.
    def dep():
        with tenant_context("acme"):
            yield

    gen = dep()
    contextvars.copy_context().run(next, gen)
    with pytest.raises(ConfigurationError, match="FastAPI"):
        contextvars.copy_context().run(next, gen, None)


def test_an_exception_from_the_block_is_chained_not_lost():
    def dep():
        with tenant_context("acme"):
            yield

    gen = dep()
    contextvars.copy_context().run(next, gen)
    original = NoTenantError("no tenant in context")
    with pytest.raises(ConfigurationError, match="NoTenantError raised inside") as info:
        contextvars.copy_context().run(gen.throw, original)
    assert info.value.__context__ is original


def test_direct_exit_call_chains_the_exception_too():
    cm = tenant_context("acme")
    contextvars.copy_context().run(cm.__enter__)
    original = KeyError("x")
    with pytest.raises(ConfigurationError) as info:
        cm.__exit__(KeyError, original, None)
    assert info.value.__context__ is original


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), asyncio.CancelledError(), GeneratorExit()])
def test_cancellation_and_shutdown_are_not_replaced(exc: BaseException):
    cm = tenant_context("acme")
    contextvars.copy_context().run(cm.__enter__)
    assert cm.__exit__(type(exc), exc, None) is None  # not suppressed: the caller re-raises it
    assert current_context() is None


def test_abandoned_generator_closed_elsewhere_does_not_raise():
    def gen():
        with tenant_context("acme"):
            yield tenant()

    g = gen()
    assert contextvars.copy_context().run(next, g) == "acme"
    g.close()  # GeneratorExit at the yield, in another context: nothing to report
    assert current_context() is None


def test_out_of_order_exit_is_refused_and_leaves_the_inner_block_in_force():
    outer, inner = tenant_context("acme"), tenant_context("globex")
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(ConfigurationError, match="out of order"):
        outer.__exit__(None, None, None)
    assert tenant() == "globex"
    inner.__exit__(None, None, None)
    outer.__exit__(None, None, None)
    assert current_context() is None


def test_exit_without_enter_is_refused():
    with pytest.raises(ConfigurationError, match="another context"):
        tenant_context("acme").__exit__(None, None, None)


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", None, 42, b"acme"])
def test_tenant_id_must_be_a_non_empty_str(bad: object):
    with pytest.raises(ConfigurationError, match="non-empty str"):
        tenant_context(bad)  # type: ignore[arg-type]
    assert current_context() is None


def test_cross_tenant_context_requires_an_actor():
    with pytest.raises(TypeError):
        cross_tenant_context()  # type: ignore[call-arg]
    for bad in ("", None):
        with pytest.raises(ConfigurationError, match="actor"):
            cross_tenant_context(actor=bad)  # type: ignore[arg-type]


def test_cross_tenant_context():
    with tenant_context("acme"):
        with cross_tenant_context(actor="svc:export", data_label="PHI", request_id="r1") as ctx:
            assert current_context() is ctx
            assert ctx.tenant_id is None
            assert ctx.cross_tenant is True
            assert (ctx.actor, ctx.data_label, ctx.request_id) == ("svc:export", "PHI", "r1")
        assert tenant() == "acme"


@pytest.mark.parametrize("tenant", ["acme\nforged", "", " acme", "ac\u202eme", "e\u0301"])
def test_tenant_ids_configured_in_code_follow_the_registry_rules(tenant: str) -> None:
    from sqlalchemy_cmk import CMK, ConfigurationError
    from sqlalchemy_cmk.testing import FakeKeyProvider

    with pytest.raises(ConfigurationError, match="tenant id"):
        CMK(FakeKeyProvider(), tenant_keys={tenant: "fake://k"})
