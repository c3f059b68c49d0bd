"""Audit events: one for every use of a tenant's key, for the tenant's SIEM.

Operations:
    ``wrap``: a new data key was wrapped by the tenant's KMS (a KMS round-trip).
    ``unwrap``: a stored data key was unwrapped by the tenant's KMS (a KMS round-trip).
        ``purpose="verify"`` marks the unwrap that checks a new write key right after its wrap
        (``verify_write_keys``): one per write window, seen by the tenant's KMS like any other.
    ``encrypt``: rows were encrypted for the tenant (``rows`` says how many, ``columns`` which).
    ``decrypt``: rows were decrypted for the tenant, whether the key came from the KMS or the
        cache, so that every access is recorded, not only the KMS calls.
    ``search``: a search on blind-indexed columns ran for the tenant (``table``, ``columns``;
        never the term), also one that matched nothing.

Every access (a flush, a load, a streamed partition, a lazy column's first access,
``encrypt_documents``/``decrypt_documents``/``decrypt_row``, a search) gives exactly one
``encrypt``, ``decrypt`` or ``search`` event per tenant and table, refused ones included,
emitted before the error reaches the caller. ``wrap``/``unwrap`` events are the KMS calls
beneath, as the tenant's KMS sees them.

Outcomes:
    ``ok``: the access happened; ``tenant`` is the tenant whose key authenticated the data.
    ``no_tenant``: no tenant in context (``NoTenantError``).
    ``mismatch``: a row of another tenant than the context's (``TenantMismatchError``).
    ``tampered``: a stored value, companion or envelope failed to parse or authenticate
        (``DecryptionError``).
    ``denied``: the tenant's KMS refused the key, or the operator revoked the tenant.
    ``not_found``: the tenant's KMS does not know the key.
    ``unavailable``: the tenant's KMS could not be reached, after retries.
    ``error``: any other failure; ``error`` names the exception class, never a value.

A refused access's event names the *context's* tenant (``None`` with no tenant or in a
cross-tenant context), never one read from the refused row: that name did not authenticate,
and the context's actor and request must not reach another tenant. The row's claimed tenant is
in ``row_tenant``, for the application's own sinks only (per-tenant delivery drops it).

A sink is any callable taking an :class:`AuditEvent`. A sink that raises stops the access: an
access that cannot be audited does not happen, and the caller gets
:class:`~sqlalchemy_cmk.errors.AuditError` with the sink's exception as ``__cause__``. Events
carry no plaintext, key or EDEK bytes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from .context import TenantContext

__all__ = ["AuditEvent", "AuditSink", "LoggingAuditSink"]

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class AuditEvent:
    """One audited use of a tenant's key. Field meanings follow :class:`TenantContext`;
    ``row_tenant`` is the unauthenticated tenant a refused row claims (module docstring)."""

    operation: str
    outcome: str
    tenant: str | None
    key_ref: str | None = None
    provider: str | None = None
    table: str | None = None
    columns: tuple[str, ...] = ()
    rows: int = 0
    duration_ms: float = 0.0
    error: str | None = None
    purpose: str | None = None
    actor: str | None = None
    data_label: str | None = None
    source_ip: str | None = None
    object_id: str | None = None
    request_id: str | None = None
    row_tenant: str | None = None
    extra: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    timestamp: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the event."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["extra"] = dict(self.extra)
        d["columns"] = list(self.columns)
        return d


AuditSink = Callable[[AuditEvent], None]


class LoggingAuditSink:
    """Writes each event as one JSON line to a stdlib logger (default ``sqlalchemy_cmk.audit``).

    It adds no handler: where the lines go is the application's logging configuration. Under
    Python's default one (no handler, root logger at WARNING) events at INFO are dropped;
    ``logging.basicConfig(level=logging.INFO)`` shows them on stderr (``docs/usage.md#audit``).
    """

    def __init__(
        self, logger: str | logging.Logger = "sqlalchemy_cmk.audit", level: int = logging.INFO
    ):
        self._logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self._level = level

    def __call__(self, event: AuditEvent) -> None:
        if self._logger.isEnabledFor(self._level):
            self._logger.log(self._level, json.dumps(event.to_dict(), sort_keys=True))


def make_event(
    ctx: TenantContext | None, operation: str, outcome: str, tenant: str | None, **fields: Any
) -> AuditEvent:
    """Build an event, copying the audit metadata of the tenant context."""
    if ctx is not None:
        fields.setdefault("actor", ctx.actor)
        fields.setdefault("data_label", ctx.data_label)
        fields.setdefault("source_ip", ctx.source_ip)
        fields.setdefault("object_id", ctx.object_id)
        fields.setdefault("request_id", ctx.request_id)
        fields.setdefault("extra", ctx.extra)
    return AuditEvent(operation=operation, outcome=outcome, tenant=tenant, **fields)
