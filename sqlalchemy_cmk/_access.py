"""One audit event per access, refused ones included.

An *access* is one flush, one load (a streamed partition, a lazy column's first access), one
``encrypt_documents``/``decrypt_documents``/``decrypt_row`` call, one search. The code of an
access runs inside :func:`access`; it names the tables it touches as it learns them
(:meth:`Access.table`) and reports success per tenant and table (:func:`emit_ok`). If the
access raises instead, the scope emits, before the error propagates, one event per table it
named and had not yet reported, with the outcome the error stands for (:func:`outcome_of`).

Routing: an ``ok`` event is for ``event.tenant``, the tenant whose key authenticated the data.
A refusal is for the *context's* tenant only (``None`` in no or a cross-tenant context): a tenant
named by an envelope that did not authenticate (another tenant's row, a tampered value) is
unverified, so it goes in ``row_tenant``, which only the application's own sinks see, and never
carries this context's actor or request to that tenant.

A checker that counts refused rows instead of raising (the migration tools' ``verify`` and
``verify_index``) emits them itself with :func:`emit_refused`, by the same rule: one event per
batch, claimed tenant and error, with the rows refused in ``rows``.

Scopes nest: an inner scope of the same operation and key manager joins the outer one (a flush
calls ``CMK.seal``; a load calls ``CMK.open``), so one access gives one event per table. A scope
of another operation is an access of its own (a load run by a flush to check a tenant column).
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .context import TenantContext
from .errors import (
    CMKError,
    DecryptionError,
    KeyAccessDeniedError,
    KeyAccessError,
    KeyNotFoundError,
    KMSUnavailableError,
    NoTenantError,
    TenantMismatchError,
    TenantNotConfiguredError,
    TenantRevokedError,
)

if TYPE_CHECKING:
    from ._keys import KeyManager

__all__ = ["Access", "access", "claimed_tenant", "emit_ok", "emit_refused", "outcome_of"]

# Most specific first: the first class the error is an instance of gives the outcome.
_OUTCOMES: tuple[tuple[type[CMKError], str], ...] = (
    (NoTenantError, "no_tenant"),
    (TenantMismatchError, "mismatch"),
    (DecryptionError, "tampered"),
    (TenantRevokedError, "denied"),  # the operator said no
    (KeyAccessDeniedError, "denied"),  # the tenant's KMS said no
    (KeyNotFoundError, "not_found"),
    (KMSUnavailableError, "unavailable"),
)

# Set on an exception an access scope has recorded, so that an enclosing scope of another
# operation does not record it again under the table the error names (exceptions take no
# weak references, so an attribute rather than a weak set).
_AUDITED = "_cmk_access_audited"

_current: contextvars.ContextVar[Access | None] = contextvars.ContextVar(
    "sqlalchemy_cmk_access", default=None
)


def outcome_of(exc: BaseException | type[BaseException]) -> str:
    """The access outcome that ``exc`` (an error or its class) stands for: ``no_tenant``,
    ``mismatch``, ``tampered``, ``denied``, ``not_found``, ``unavailable``, or ``error`` for
    anything else."""
    typ = exc if isinstance(exc, type) else type(exc)
    for cls, name in _OUTCOMES:
        if issubclass(typ, cls):
            return name
    return "error"


class Access:
    """What one access has touched and reported so far (see the module docstring)."""

    __slots__ = ("ctx", "done", "fixed", "keys", "operation", "row_tenant", "started", "tables")

    def __init__(self, keys: KeyManager, ctx: TenantContext | None, operation: str) -> None:
        self.keys = keys
        self.ctx = ctx
        self.operation = operation
        # table -> column names, in the order learnt
        self.tables: dict[str, set[str]] = {}
        self.done: set[str] = set()  # tables whose event was emitted (or attempted)
        # True once every table of the access is named: an error's own table is then not
        # added (a search refused over its root-key table is a refusal of the searched table).
        self.fixed = False
        self.row_tenant: str | None = None  # an unauthenticated tenant, for the app's sinks
        self.started = time.monotonic()

    def table(self, name: str, columns: Iterable[str] = ()) -> None:
        """Name a table (and columns) this access touches."""
        cols = self.tables.get(name)
        if cols is None:
            self.tables[name] = set(columns)
        else:
            cols.update(columns)

    def refused(self, exc: BaseException) -> None:
        """Emit the refusal events for ``exc``; never raises (the access's own error wins)."""
        names = list(self.tables)
        table = getattr(exc, "table", None)
        inner = getattr(exc, _AUDITED, False)
        if (
            isinstance(exc, CMKError)
            and table
            and not self.fixed
            and not inner
            and table not in self.tables
        ):
            names.append(table)
        row_tenant = claimed_tenant(exc) or self.row_tenant
        ms = (time.monotonic() - self.started) * 1000
        for name in names:
            if name in self.done:
                continue
            self.done.add(name)
            try:
                emit_refused(
                    self.keys,
                    self.ctx,
                    self.operation,
                    exc,
                    table=name,
                    columns=self.tables.get(name, ()),
                    row_tenant=row_tenant,
                    duration_ms=ms,
                )
            except Exception as audit_exc:
                # The access is refused already; its own error is what the caller must see.
                # The note names the failure's type only (a sink's message may hold anything).
                add_note = getattr(exc, "add_note", None)  # Python 3.11+
                if add_note is not None:
                    add_note(
                        "sqlalchemy-cmk: the refusal could not be audited "
                        f"({type(audit_exc).__name__})"
                    )
        if names:
            # An exception type with __slots__ takes no mark: recorded anyway.
            with contextlib.suppress(AttributeError):
                setattr(exc, _AUDITED, True)


class access:
    """``with access(keys, ctx, "decrypt") as acc:`` - the scope of one access.

    Lower-case like contextlib's context managers. A class rather than ``@contextmanager``:
    it runs for every load and flush.
    """

    __slots__ = ("acc", "ctx", "keys", "operation", "token")

    def __init__(self, keys: KeyManager, ctx: TenantContext | None, operation: str) -> None:
        self.keys = keys
        self.ctx = ctx
        self.operation = operation
        self.acc: Access | None = None  # None: joined an outer scope, which records
        self.token: contextvars.Token[Access | None] | None = None

    def __enter__(self) -> Access:
        outer = _current.get()
        if outer is not None and outer.keys is self.keys and outer.operation == self.operation:
            return outer  # joined: the outer scope records
        acc = self.acc = Access(self.keys, self.ctx, self.operation)
        self.token = _current.set(acc)
        return acc

    def __exit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.acc is None or self.token is None:
            return  # joined: the outer scope records
        _current.reset(self.token)
        # Exception only: GeneratorExit and KeyboardInterrupt are no refusal.
        if isinstance(exc, Exception):
            self.acc.refused(exc)


def emit_ok(
    keys: KeyManager,
    ctx: TenantContext | None,
    operation: str,
    tenant: str,
    *,
    table: str,
    **kw: Any,
) -> None:
    """Emit an access's ``ok`` event for one tenant and table, marking it done in the scope
    (an error after this, in the same access, adds no second event for the table)."""
    acc = _current.get()
    if acc is not None and acc.keys is keys and acc.operation == operation:
        acc.done.add(table)
    keys.emit(ctx, operation, "ok", tenant, table=table, **kw)


def claimed_tenant(exc: BaseException) -> str | None:
    """The tenant a refused row claims, as far as ``exc`` says (unauthenticated): the row's
    own for a mismatch; for a key refused (by the operator or the KMS), the tenant whose key
    the envelope names."""
    row_tenant = getattr(exc, "row_tenant", None)
    if row_tenant is None and isinstance(exc, KeyAccessError | TenantNotConfiguredError):
        row_tenant = exc.tenant
    return row_tenant if isinstance(row_tenant, str) else None


def emit_refused(
    keys: KeyManager,
    ctx: TenantContext | None,
    operation: str,
    exc: BaseException | type[BaseException],
    *,
    table: str,
    columns: Iterable[str] = (),
    row_tenant: str | None = None,
    rows: int = 0,
    duration_ms: float = 0.0,
) -> None:
    """Emit one refusal event, routed by the module's rule: for the context's tenant only
    (``None`` in no or a cross-tenant context); ``row_tenant``, the tenant the refused rows
    claim, kept only where it is not the context's own. ``exc`` is the error, or its class
    (a checker that counts refusals by class rather than raising them)."""
    tenant = ctx.tenant_id if ctx is not None else None
    cls = exc if isinstance(exc, type) else type(exc)
    keys.emit(
        ctx,
        operation,
        outcome_of(cls),
        tenant,
        table=table,
        columns=tuple(sorted(columns)),
        error=cls.__name__,
        row_tenant=None if row_tenant == tenant else row_tenant,
        rows=rows,
        duration_ms=duration_ms,
    )


def note_row_tenant(keys: KeyManager, tenant: str) -> None:
    """Record the (unauthenticated) tenant of the row being refused in the current scope."""
    acc = _current.get()
    if acc is not None and acc.keys is keys:
        acc.row_tenant = tenant
