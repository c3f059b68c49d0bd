"""The tenant context: who the current work is for, and who is doing it.

The context lives in a :class:`contextvars.ContextVar`, so it follows the code that set it: each
thread starts empty, and each asyncio task sees the context of the code that created it (and
changes made inside a task stay inside it).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, TypeVar, cast

from .errors import ConfigurationError, NoTenantError

__all__ = ["TenantContext", "cross_tenant_context", "current_context", "tenant_context"]

_F = TypeVar("_F", bound=Callable[..., Any])

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class TenantContext:
    """Who the work is for and who does it; every field but ``tenant_id`` is audit metadata.

    Attributes:
        tenant_id: The tenant whose data is read or written; ``None`` in a cross-tenant context.
        actor: The requesting user or service (``"user-42"``, ``"svc:billing"``).
        data_label: What kind of data is accessed (``"PHI"``, ``"payroll"``).
        source_ip: Where the request came from.
        object_id: The business object concerned (``"patient/17"``).
        request_id: The request or trace id, to join audit events with application logs.
        extra: Free-form string fields, copied into every audit event.
        cross_tenant: True in :func:`cross_tenant_context`: rows of any configured tenant may be
            read, each under its own tenant's key; nothing new can be written.
    """

    tenant_id: str | None
    actor: str | None = None
    data_label: str | None = None
    source_ip: str | None = None
    object_id: str | None = None
    request_id: str | None = None
    extra: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    cross_tenant: bool = False


_current: contextvars.ContextVar[TenantContext | None] = contextvars.ContextVar(
    "sqlalchemy_cmk_tenant", default=None
)


def current_context() -> TenantContext | None:
    """Return the tenant context in force here, or ``None``."""
    return _current.get()


def require_context() -> TenantContext:
    """Return the context in force, or raise :class:`NoTenantError` naming what to do."""
    ctx = _current.get()
    if ctx is None:
        raise NoTenantError(
            "no tenant in context: wrap the work in `with tenant_context(tenant_id, actor=...)`"
        )
    return ctx


# What undoes each open `with`: the manager that was entered and the token of its set(). Kept in
# a context variable, like the context itself, so that an exit can tell whether it runs in the
# context its enter ran in.
_Entry = tuple["_ContextManager", contextvars.Token[TenantContext | None]]
_entries: contextvars.ContextVar[tuple[_Entry, ...]] = contextvars.ContextVar(
    "sqlalchemy_cmk_entries", default=()
)

_ELSEWHERE = (
    "tenant_context() was exited in another context than the one it was entered in (or out of "
    "order), so the tenant it set was never in force for the code in between. A sync (`def`) "
    "FastAPI dependency with `yield` does this: FastAPI runs the code before and after its "
    "`yield` in two threads, each in a copy of the request's context. Open the tenant context "
    "in an `async def` dependency with `yield`, or in a middleware (docs/frameworks.md)"
)


class _ContextManager:
    """Sets a :class:`TenantContext` for a ``with`` block or for each call of a function.

    One object may be entered by many threads and tasks at once: the tokens that undo each
    ``with`` live in a context variable, not on the object.
    """

    def __init__(self, ctx: TenantContext) -> None:
        self._ctx = ctx

    @property
    def context(self) -> TenantContext:
        return self._ctx

    def __enter__(self) -> TenantContext:
        token = _current.set(self._ctx)
        _entries.set((*_entries.get(), (self, token)))
        return self._ctx

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Restore the context in force before :meth:`__enter__`.

        Raises:
            ConfigurationError: this exit does not run in the context the enter ran in, or
                another ``with`` is still open inside it. An exception raised inside the block
                is chained as ``__context__``; a ``BaseException`` that is not an ``Exception``
                (a cancellation, ``KeyboardInterrupt``, ``GeneratorExit``) goes on unreplaced.
        """
        stack = _entries.get()
        if stack and stack[-1][0] is self:
            try:
                _current.reset(stack[-1][1])
            except (ValueError, RuntimeError):
                # ValueError: the token was made in another Context (this one is a copy of it);
                # RuntimeError: it was already used there. Either way not ours to undo here.
                pass
            else:
                _entries.set(stack[:-1])
                return
        # Nothing here to restore: the enter changed another context, which this code cannot
        # reach. Say so, rather than fail later with "no tenant in context" or restore the
        # wrong tenant.
        if exc is not None and not isinstance(exc, Exception):
            return  # a cancellation or shutdown must not turn into a configuration error
        err = ConfigurationError(
            _ELSEWHERE
            if exc is None
            else f"{_ELSEWHERE}; the {type(exc).__name__} raised inside the block is chained",
            tenant=self._ctx.tenant_id,
        )
        err.__context__ = exc
        raise err

    def __call__(self, func: _F) -> _F:
        ctx = self._ctx
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            # A generator's body runs on each resumption, under its consumer's context; setting
            # ours only while the generator object is created would protect nothing.
            raise ConfigurationError(
                f"tenant_context() cannot decorate the generator function {func.__qualname__}: "
                "open `with tenant_context(...)` inside its body instead"
            )
        # A coroutine function must set the context when it runs, not when it is called.
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                token = _current.set(ctx)
                try:
                    return await func(*args, **kwargs)
                finally:
                    _current.reset(token)

            return cast(_F, async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            token = _current.set(ctx)
            try:
                return func(*args, **kwargs)
            finally:
                _current.reset(token)

        return cast(_F, wrapper)


def tenant_context(
    tenant_id: str,
    *,
    actor: str | None = None,
    data_label: str | None = None,
    source_ip: str | None = None,
    object_id: str | None = None,
    request_id: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> _ContextManager:
    """Run a block, or each call of a function, on behalf of one tenant.

    Usable as ``with tenant_context("acme", actor="user-42"):`` and as a decorator on plain and
    ``async`` functions. Contexts nest; the innermost wins.

    Args:
        tenant_id: The tenant; must be a non-empty string.
        actor: The requesting user or service, recorded in audit events.
        data_label: The kind of data, recorded in audit events.
        source_ip: The client address, recorded in audit events.
        object_id: The business object, recorded in audit events.
        request_id: The request id, recorded in audit events.
        extra: More string fields for audit events.

    Raises:
        ConfigurationError: ``tenant_id`` is empty or not a string.
    """
    if not isinstance(tenant_id, str) or not tenant_id:
        raise ConfigurationError(
            f"tenant_context() needs a non-empty str tenant id, got {type(tenant_id).__name__}"
        )
    return _ContextManager(
        TenantContext(
            tenant_id=tenant_id,
            actor=actor,
            data_label=data_label,
            source_ip=source_ip,
            object_id=object_id,
            request_id=request_id,
            extra=MappingProxyType(dict(extra or {})),
        )
    )


def cross_tenant_context(
    *,
    actor: str,
    data_label: str | None = None,
    request_id: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> _ContextManager:
    """Read rows of many tenants at once, each under its own tenant's key.

    For back-office jobs, exports and migrations. Each row is still decrypted with its own
    tenant's key (through that tenant's KMS, so each tenant sees the access in its own audit
    log), and each tenant gets its own audit event. New rows cannot be written here, since they
    would have no tenant: open a :func:`tenant_context` for that. ``actor`` is required, since
    such access should always be attributable.
    """
    if not actor:
        raise ConfigurationError("cross_tenant_context() needs an actor, for the audit trail")
    return _ContextManager(
        TenantContext(
            tenant_id=None,
            actor=actor,
            data_label=data_label,
            request_id=request_id,
            extra=MappingProxyType(dict(extra or {})),
            cross_tenant=True,
        )
    )
