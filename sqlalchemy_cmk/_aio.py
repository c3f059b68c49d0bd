"""Waiting for provider threads without blocking an event loop.

An ``AsyncSession`` runs the ORM's synchronous code (flush, load, and so our hooks) inside a
greenlet that SQLAlchemy bridges to the event loop: whenever that code hands an awaitable to
``sqlalchemy.util.await_only``, the greenlet pauses and the loop runs other tasks until the
awaitable is done. Provider calls already run on threads of their own (``_keys._Runner``, the
unwrap pool of ``KeyManager.read_keys``); :func:`wait` is the one place their callers wait for
them, and :func:`off_loop` (the pool) goes through it; :func:`sleep` is a retry's backoff.
Inside such a greenlet they await (the threads' futures, the backoff), so a 50 ms KMS call
costs the loop nothing; anywhere else (sync sessions, scripts, a plain thread) they block as
before.

Native async SDK clients would save the thread, not loop time: the wait is already off the
loop, and one mechanism serves every provider (including those with no async SDK: AWS's
boto3, Vault's hvac, PyKMIP) with the same deadline and concurrency limits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import importlib
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["in_async_greenlet", "off_loop", "sleep", "start_thread", "wait"]

_T = TypeVar("_T")


def in_async_greenlet() -> bool:
    """Whether this code runs inside SQLAlchemy's asyncio greenlet, with a loop to await on."""
    getcurrent, legacy_class = _greenlet_probe()
    if getcurrent is None:  # no greenlet, no AsyncSession
        return False
    current = getcurrent()
    # SQLAlchemy 2.1 marks its greenlet with this attribute; 2.0.0 only by its class.
    if not getattr(current, "__sqlalchemy_greenlet_provider__", False) and not (
        legacy_class is not None and isinstance(current, legacy_class)
    ):
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # a greenlet driven by something other than a running loop
        return False
    return True


def sleep(seconds: float) -> None:
    """``time.sleep``, or inside SQLAlchemy's asyncio greenlet an ``asyncio.sleep`` awaited:
    a retry's backoff is a KMS wait too."""
    if not in_async_greenlet():
        time.sleep(seconds)
        return
    from sqlalchemy.util import await_only

    await_only(asyncio.sleep(seconds))


@functools.cache
def _greenlet_probe() -> tuple[Any, Any]:
    """greenlet's ``getcurrent`` (None without greenlet), and SQLAlchemy 2.0's greenlet class."""
    try:
        getcurrent = importlib.import_module("greenlet").getcurrent
    except ImportError:
        return None, None
    try:
        legacy_class = importlib.import_module("sqlalchemy.util._concurrency_py3k")._AsyncIoGreenlet
    except (ImportError, AttributeError):  # SQLAlchemy 2.1
        legacy_class = None
    return getcurrent, legacy_class


def wait(futures: Sequence[concurrent.futures.Future[Any]], timeout: float | None) -> bool:
    """Wait until every future is done or ``timeout`` seconds pass; True if all are done.

    Never cancels a future: a provider call that outlives its deadline is abandoned, not
    stopped (a thread cannot be), exactly as a blocking wait abandons it.
    """
    if not futures:
        return True
    if not in_async_greenlet():
        _, pending = concurrent.futures.wait(futures, timeout)
        return not pending
    from sqlalchemy.util import await_only

    return bool(await_only(_all_done(futures, timeout)))


def off_loop(fn: Callable[[], _T]) -> _T:
    """``fn()``; inside SQLAlchemy's asyncio greenlet, run on a thread of its own and awaited.

    For work that starts threads and waits for them (the unwrap pool): its every step, thread
    starts included, then happens off the loop. ``fn`` must end on its own (each provider
    call in it has its deadline): this waits for it without a timeout.
    """
    if not in_async_greenlet():
        return fn()
    future: concurrent.futures.Future[_T] = concurrent.futures.Future()
    context = contextvars.copy_context()

    def target() -> None:
        try:
            value = context.run(fn)
        except BaseException as exc:  # handed to the caller below
            future.set_exception(exc)
        else:
            future.set_result(value)

    start_thread(target, "sqlalchemy-cmk-off-loop", future.set_exception)
    wait([future], None)
    return future.result()


def start_thread(
    target: Callable[[], None], name: str, failed: Callable[[BaseException], None]
) -> None:
    """Start a daemon thread running ``target``; ``failed(exc)`` if it cannot be started.

    ``Thread.start()`` waits until the new thread runs: on a loaded machine that held the
    loop 50-650 ms per KMS call (2 cores, a load average of 8). So inside SQLAlchemy's
    asyncio greenlet the start is handed to a starter thread of the library's (started
    once per process, the only start the loop waits for), and the caller's wait, which is
    awaited, covers it. Elsewhere the thread is started here, and a failure also raised.
    """
    if not in_async_greenlet():
        try:
            threading.Thread(target=target, name=name, daemon=True).start()
        except BaseException as exc:
            failed(exc)
            raise
        return
    _starter().put((target, name, failed))


_Start = tuple[Callable[[], None], str, Callable[[BaseException], None]]
_starter_queue: tuple[int, queue.SimpleQueue[_Start]] | None = None
_starter_lock = threading.Lock()


def _starter() -> queue.SimpleQueue[_Start]:
    global _starter_queue
    with _starter_lock:
        # By process: a child made by fork() has the queue but not the thread.
        if _starter_queue is None or _starter_queue[0] != os.getpid():
            starts: queue.SimpleQueue[_Start] = queue.SimpleQueue()
            threading.Thread(
                target=_run_starter, args=(starts,), name="sqlalchemy-cmk-starter", daemon=True
            ).start()
            _starter_queue = (os.getpid(), starts)
        return _starter_queue[1]


def _run_starter(starts: queue.SimpleQueue[_Start]) -> None:
    while True:
        target, name, failed = starts.get()
        try:
            threading.Thread(target=target, name=name, daemon=True).start()
        except BaseException as exc:  # handed to the thread's waiter
            failed(exc)


async def _all_done(
    futures: Sequence[concurrent.futures.Future[Any]], timeout: float | None
) -> bool:
    # wrap_future completes an asyncio future from the thread through call_soon_threadsafe;
    # asyncio.wait (unlike wait_for) leaves what is still pending at the timeout running.
    wrapped = [asyncio.wrap_future(f) for f in futures]
    for w in wrapped:
        # The caller reads the original future's outcome; marking the copy's as retrieved
        # keeps asyncio from logging "exception never retrieved" for it.
        w.add_done_callback(_retrieve)
    _, pending = await asyncio.wait(wrapped, timeout=timeout)
    return not pending


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
