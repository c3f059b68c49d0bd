"""Delivering each tenant's audit events to the tenant's own destinations, with nothing lost.

Every access event is written to a durable local spool before the access goes on, then shipped
in the background to the destinations the operator set for the tenant (``docs/audit.md``)::

    cmk = CMK(
        provider,
        tenant_keys={"acme": "local://acme"},
        audit_delivery=AuditDelivery(
            spool="/var/lib/myapp/cmk-audit",
            destinations={"acme": TenantAudit([{"kind": "webhook", "url": "https://...", ...}])},
        ),
    )

``destinations`` is a mapping in code, or any :class:`AuditDestinations` (the database key
registry is one, so destinations live beside the tenant's key references, under the same
integrity check).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from .errors import ConfigurationError
from .sinks import check_destination

__all__ = ["AuditDestinations", "StaticDestinations", "TenantAudit"]

SpoolPolicy = Literal["deny", "serve"]


@dataclass(frozen=True)
class TenantAudit:
    """Where one tenant's events go, and what happens when they cannot be recorded.

    Attributes:
        destinations: Destination specs (:func:`sqlalchemy_cmk.sinks.check_destination`);
            every event goes to each of them.
        on_spool_failure: ``"deny"`` (default, fail closed): an access whose event the spool
            cannot take (full, disk error) is refused with ``AuditError``. ``"serve"``: the
            access goes on and the dropped event is counted (metrics, ``audit status``).
        max_events_per_second: The shipper sends at most this many of the tenant's events per
            second (None: no limit); the rest wait in the spool.
    """

    destinations: Sequence[Mapping[str, Any]] = ()
    on_spool_failure: SpoolPolicy = "deny"
    max_events_per_second: float | None = None
    _checked: tuple[dict[str, Any], ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.destinations, Mapping):
            raise ConfigurationError("TenantAudit(destinations=...) is a list of destination specs")
        if self.on_spool_failure not in ("deny", "serve"):
            raise ConfigurationError(
                f"on_spool_failure must be 'deny' or 'serve', not {self.on_spool_failure!r}"
            )
        rate = self.max_events_per_second
        if rate is not None and not (isinstance(rate, (int, float)) and rate > 0):
            raise ConfigurationError("max_events_per_second must be a number > 0, or None")
        checked = tuple(check_destination(d) for d in self.destinations)
        object.__setattr__(self, "destinations", checked)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what the key registry stores)."""
        return {
            "destinations": [dict(d) for d in self.destinations],
            "on_spool_failure": self.on_spool_failure,
            "max_events_per_second": self.max_events_per_second,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TenantAudit:
        """The inverse of :meth:`to_dict`.

        Raises:
            ConfigurationError: unknown fields or bad values.
        """
        unknown = set(data) - {"destinations", "on_spool_failure", "max_events_per_second"}
        if unknown:
            raise ConfigurationError(f"unknown tenant audit field(s): {sorted(unknown)}")
        return cls(
            destinations=list(data.get("destinations", ())),
            on_spool_failure=data.get("on_spool_failure", "deny"),
            max_events_per_second=data.get("max_events_per_second"),
        )


@runtime_checkable
class AuditDestinations(Protocol):
    """Where the shipper and the access path look up a tenant's audit set-up."""

    def tenant_audit(self, tenant: str) -> TenantAudit | None:
        """The tenant's audit set-up, or None when it has no destination of its own (its
        events then go only to the application's sinks)."""
        ...


class StaticDestinations:
    """Destinations in code: ``{tenant: TenantAudit(...)}``."""

    def __init__(self, tenants: Mapping[str, TenantAudit]) -> None:
        for tenant, audit in tenants.items():
            if not isinstance(audit, TenantAudit):
                raise ConfigurationError(
                    f"destinations[{tenant!r}] must be a TenantAudit, not {type(audit).__name__}"
                )
        self._tenants = dict(tenants)

    def tenant_audit(self, tenant: str) -> TenantAudit | None:
        return self._tenants.get(tenant)
