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

import contextlib
import hashlib
import itertools
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from . import _metrics, _shipper, _spool
from .audit import AuditEvent, make_event
from .context import TenantContext
from .errors import AuditError, CMKError, ConfigurationError
from .sinks import (
    NetworkPolicy,
    Record,
    SinkEnv,
    build_sink,
    check_destination,
    destination_name,
)

__all__ = [
    "AuditDelivery",
    "AuditDestinations",
    "ChainError",
    "StaticDestinations",
    "TenantAudit",
    "pruned_writers",
    "spool_events",
    "spool_status",
    "verify_chain",
]

log = logging.getLogger("sqlalchemy_cmk.delivery")

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
        names = [destination_name(d) for d in checked]
        if len(set(names)) != len(names):
            raise ConfigurationError(
                "two of a tenant's destinations have the same name: give each a distinct 'name'"
            )
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


# -- the runtime -------------------------------------------------------------------------------

SCHEMA = "sqlalchemy-cmk.audit/1"
OCSF_VERSION = "1.3.0"
_GENESIS = "0" * 64
# OCSF API Activity (class 6003): activity ids by operation.
_ACTIVITY = {"wrap": 1, "encrypt": 3, "decrypt": 2, "unwrap": 2, "search": 2}
_SEVERITY = {"ok": 1, "tampered": 4}  # Informational, High; every other refusal: Medium (3)


class _OverBudget(_spool.SpoolError):
    """The tenant's share of the spool is used up by events its failing destinations did not
    take (internal; the tenant's ``on_spool_failure`` applies)."""


def deliver_to(event: AuditEvent, ctx: TenantContext | None) -> str | None:
    """Which tenant an event is delivered to, if any.

    A served access (``ok``) is the tenant whose key was used: the KMS and the authenticated
    ciphertext vouch for it. A refused one goes to the context's tenant, never to a tenant named
    only by a stored envelope that did not authenticate (anyone able to write a row could name
    any tenant in it, and flood or probe that tenant's SIEM).
    """
    if event.outcome == "ok":
        return event.tenant
    if ctx is not None and not ctx.cross_tenant:
        return ctx.tenant_id
    return None


def event_body(
    event: AuditEvent,
    ctx: TenantContext | None,
    to: str,
    event_id: str,
    chain: tuple[str, int, str],
) -> bytes:
    """The event as delivered to tenant ``to``: OCSF API Activity JSON, canonical (sorted keys,
    no spaces, UTF-8), so a tenant can re-hash exactly what it received."""
    own = event.tenant == to
    # Another tenant's envelope named it: its key reference and provider are not ``to``'s.
    key_ref, provider = (event.key_ref, event.provider) if own else (None, None)
    # Whose request it was: only when the request was ``to``'s own (or a declared
    # cross-tenant operator's), never one tenant's actor and request details to another.
    mine = ctx is None or ctx.cross_tenant or ctx.tenant_id == to
    actor = event.actor if mine else None
    activity = _ACTIVITY.get(event.operation, 99)
    ok = event.outcome == "ok"
    time_ns = int(event.timestamp * 1e9)
    writer, seq, prev = chain
    doc: dict[str, Any] = {
        "activity_id": activity,
        "category_uid": 6,
        "class_uid": 6003,
        "type_uid": 600300 + activity,
        "time": time_ns // 1_000_000,
        "severity_id": _SEVERITY.get(event.outcome, 3),
        "status_id": 1 if ok else 2,
        "status": "Success" if ok else "Failure",
        "status_code": event.outcome,
        "metadata": {
            "version": OCSF_VERSION,
            "uid": event_id,
            "log_name": SCHEMA,
            "product": {"name": "sqlalchemy-cmk", "vendor_name": "sqlalchemy-cmk"},
        },
        "api": {"operation": event.operation},
        "unmapped": {
            "schema": SCHEMA,
            "tenant": to,
            "time_ns": time_ns,
            "writer": writer,
            "seq": seq,
            "prev": prev,
        },
    }
    if event.error:
        doc["status_detail"] = event.error
    if actor:
        doc["actor"] = {"user": {"name": actor}}
    if mine and event.source_ip:
        doc["src_endpoint"] = {"ip": event.source_ip}
    if mine and event.request_id:
        doc["api"]["request"] = {"uid": event.request_id}
        doc["metadata"]["correlation_uid"] = event.request_id
    resource: dict[str, Any] = {}
    if event.table or event.operation == "audit":
        # The spool's own notice (``dropped``) counts its events in ``data.rows`` too, as
        # docs/audit.md promises; it names no table.
        resource = {"type": "table", "name": event.table} if event.table else {"type": "spool"}
        data: dict[str, Any] = {"rows": event.rows}
        if event.columns:
            data["columns"] = list(event.columns)
        resource["data"] = data
    if mine and event.object_id:
        resource["uid"] = event.object_id
    if mine and event.data_label:
        resource["labels"] = [event.data_label]
    if resource:
        doc["resources"] = [resource]
    un = doc["unmapped"]
    if key_ref:
        un["key_ref"] = key_ref
    if provider:
        un["provider"] = provider
    if event.purpose:
        un["purpose"] = event.purpose
    if event.duration_ms:
        un["duration_ms"] = round(event.duration_ms, 3)
    if mine and event.extra:
        un["extra"] = dict(event.extra)
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # A lone surrogate (an actor or request id decoded with surrogateescape) cannot be UTF-8: it
    # is written as its JSON escape (``\udcff``, only ever inside a string, and json.dumps has
    # already doubled every backslash of the text), so the event is still recorded, as valid
    # UTF-8 JSON, instead of the access failing with UnicodeEncodeError.
    return text.encode("utf-8", "backslashreplace")


class AuditDelivery:
    """Records each tenant's events in a durable spool and ships them to its destinations.

    Args:
        spool: A directory on a persistent, local disk (created 0700). Every process of the
            application may share it: each writes its own subdirectory, and a process that
            starts adopts the subdirectories of processes that died.
        destinations: ``{tenant: TenantAudit}`` in code, or an :class:`AuditDestinations`
            (``DatabaseKeyRegistry``). Looked up again every ``destinations_ttl`` seconds.
        network: The policy every network destination passes (default: public addresses
            only, any host).
        secret_resolvers: Extra secret-reference schemes for destination credentials.
        clients: SDK clients by destination kind (tests, custom endpoints).
        max_spool_bytes: This process's spool refuses events past this size (then each
            tenant's ``on_spool_failure`` applies).
        retention: Seconds delivered events stay in the spool, for ``sqlalchemy-cmk audit
            replay`` (pruned earlier under ``max_spool_bytes`` pressure).
        workers: Batches sent at once (one per tenant destination at a time).
        batch_max: Most events per batch (a sink may allow fewer).
        poll: Seconds between the shipper's looks at the spool (delivery latency).
        max_backoff: Longest wait between retries of a failing destination.
        max_lag: ``health()`` reports ``degraded`` when a tenant's oldest undelivered event is
            older than this.
        start: Start the shipper now (default). False: only record; another process ships
            (``sqlalchemy-cmk audit ship``) or a later :meth:`start`.

    Raises:
        ConfigurationError: a bad destination or setting.
    """

    def __init__(
        self,
        spool: str | os.PathLike[str],
        destinations: Mapping[str, TenantAudit] | AuditDestinations,
        *,
        network: NetworkPolicy | None = None,
        secret_resolvers: Mapping[str, Callable[[str], bytes]] | None = None,
        clients: Mapping[str, Any] | None = None,
        max_spool_bytes: int = 1 << 30,
        segment_bytes: int = 16 << 20,
        retention: float = 3600.0,
        workers: int = 8,
        batch_max: int = 500,
        poll: float = 0.05,
        max_backoff: float = 60.0,
        destinations_ttl: float = 5.0,
        max_lag: float = 300.0,
        start: bool = True,
    ) -> None:
        self.root = os.fspath(spool)
        if isinstance(destinations, AuditDestinations):
            self._source: AuditDestinations = destinations
        elif isinstance(destinations, Mapping):
            self._source = StaticDestinations(destinations)
        else:
            raise ConfigurationError(
                "destinations must be {tenant: TenantAudit} or an AuditDestinations"
            )
        for name, value in (("workers", workers), ("batch_max", batch_max)):
            if not (isinstance(value, int) and value > 0):
                raise ConfigurationError(f"{name} must be an int > 0")
        self.env = SinkEnv(
            network or NetworkPolicy(), dict(secret_resolvers or {}), dict(clients or {})
        )
        self._max_bytes = max_spool_bytes
        self._segment_bytes = segment_bytes
        self._ttl = destinations_ttl
        self.max_lag = max_lag
        self._shipper_args = dict(
            workers=workers,
            batch_max=batch_max,
            poll=poll,
            retention=retention,
            max_backoff=max_backoff,
            lane_cap=10_000,
            max_lag=max_lag,
        )
        self._lock = threading.Lock()
        self._id_prefix, self._ids = os.urandom(8).hex(), itertools.count()
        self._writer: _spool.Writer | None = None
        self._chains: dict[str, tuple[int, str]] = {}  # tenant -> (seq, hash) of this writer
        self._audits: dict[str, tuple[float, TenantAudit | None]] = {}
        self.dropped: dict[str, int] = {}
        self._gaps: dict[str, int] = {}  # dropped events not yet announced in the chain
        self._spool_error: str | None = None
        self._ship = start
        self._shipper: _shipper.Shipper | None = None
        _live.add(self)
        _register_gauges()
        if start:
            self.start()

    def __repr__(self) -> str:
        return f"<AuditDelivery spool={self.root!r}>"

    # -- configuration -------------------------------------------------------------------------

    def tenant_audit(self, tenant: str) -> TenantAudit | None:
        """The tenant's audit set-up (cached ``destinations_ttl`` seconds)."""
        now = time.monotonic()
        hit = self._audits.get(tenant)
        if hit is not None and hit[0] > now:
            return hit[1]
        audit = self._source.tenant_audit(tenant)
        self._audits[tenant] = (now + self._ttl, audit)
        return audit

    def _audit_or_last_known(self, tenant: str) -> TenantAudit | None:
        """The tenant's set-up; the last one known while the source fails.

        Raises:
            Exception: the source failed and the tenant's set-up was never known. The shipper
                holds the tenant's events until it is (answering None would make them
                undeliverable, and their segments prunable); the access path refuses.
        """
        try:
            return self.tenant_audit(tenant)
        except Exception as exc:
            hit = self._audits.get(tenant)
            if hit is None:
                raise
            log.warning(
                "audit destinations of tenant %r unavailable, using the last known: %s",
                tenant,
                type(exc).__name__,
            )
            return hit[1]

    # -- recording (the access path) -----------------------------------------------------------

    def _current_writer(self) -> _spool.Writer:
        w = self._writer
        if w is None:
            with self._lock:
                w = self._writer
                if w is None:
                    w = self._writer = _spool.Writer(
                        self.root, segment_bytes=self._segment_bytes, max_bytes=self._max_bytes
                    )
                    self._chains = {}
                    if self._shipper is not None:
                        self._shipper.set_writer(w)
        return w

    def record(self, event: AuditEvent, ctx: TenantContext | None) -> None:
        """Record ``event`` for its tenant's destinations; returns once it is on disk.

        Raises:
            AuditError: the spool could not take it and the tenant's policy is ``deny``.
        """
        to = deliver_to(event, ctx)
        if to is None:
            return
        try:
            audit = self._audit_or_last_known(to)
        except Exception as exc:
            # Never known, so no policy to serve by: fail closed. The source's message may hold
            # a connection string; only its class is named.
            raise AuditError(
                f"the audit destinations of the tenant could not be looked up "
                f"({type(exc).__name__}): the access was stopped",
                tenant=to,
            ) from None
        if audit is None or not audit.destinations:
            return
        if self._ship and (self._shipper is None or not self._shipper.alive()):
            self.start()
        gap = 0
        try:
            if self._shipper is not None and to in self._shipper.over_budget:
                raise _OverBudget(
                    "the audit spool is half full and holds this tenant's undelivered events "
                    "(its destinations are failing): its new events are refused until they are "
                    "delivered"
                )
            writer = self._current_writer()
            with self._lock:
                gap = self._gaps.pop(to, 0)
            if gap:
                self._append(writer, to, make_event(None, "audit", "dropped", to, rows=gap), None)
                gap = 0  # announced: not to be put back if the event itself fails below
            self._append(writer, to, event, ctx)
            self._spool_error = None
        except (_spool.SpoolError, OSError) as exc:
            if not isinstance(exc, _OverBudget):  # the spool itself is fine
                self._spool_error = str(exc)
            serve = audit.on_spool_failure == "serve"
            with self._lock:  # threads dropping at once must not lose each other's counts
                if gap or serve:
                    self._gaps[to] = self._gaps.get(to, 0) + gap + int(serve)
                if serve:
                    self.dropped[to] = self.dropped.get(to, 0) + 1
            if serve:
                log.warning("audit event of tenant %r dropped (policy serve): %s", to, exc)
                return
            raise AuditError(
                f"the audit spool could not record a {event.operation!r} event ({exc}): the "
                "access was stopped, since the tenant's policy is to deny an access that "
                "cannot be audited",
                tenant=to,
            ) from None

    def _append(
        self, writer: _spool.Writer, to: str, event: AuditEvent, ctx: TenantContext | None
    ) -> None:
        # 64 random bits per process (a fork draws its own) and a counter: unique, and cheap
        # (os.urandom per event cost 20 µs here, a fifth of the whole append).
        event_id = f"{self._id_prefix}{next(self._ids):016x}"

        link: list[tuple[int, str]] = []

        def build() -> bytes:  # under the writer's lock: chain order is file order
            seq, prev = self._chains.get(to, (0, _GENESIS))
            body = event_body(event, ctx, to, event_id, (writer.writer_id, seq + 1, prev))
            link[:] = [(seq + 1, hashlib.sha256(body).hexdigest())]
            return body

        def written() -> None:
            # Only a frame in the file takes a place in the chain: one that failed to write
            # would otherwise show the tenant a gap that nobody withheld.
            self._chains[to] = link[0]

        writer.append(to, build, written)

    # -- shipping ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start (or restart, after a fork) the background shipper."""
        with self._lock:
            self._ship = True
            if self._shipper is None:
                self._shipper = _shipper.Shipper(
                    self.root,
                    self._audit_or_last_known,
                    self.env,
                    self._writer,
                    **self._shipper_args,  # type: ignore[arg-type]
                )
            try:
                os.makedirs(self.root, mode=0o700, exist_ok=True)
            except OSError as exc:
                # A volume not (yet) mounted or read-only: the shipper waits for the directory,
                # and each access meets the error in record(), where the tenant's policy applies
                # (an application whose tenants all serve must still start).
                self._spool_error = f"the audit spool cannot be created: {exc.strerror}"
            self._shipper.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every recorded event is delivered; True if all were within ``timeout``."""
        if self._shipper is None:
            return False
        return self._shipper.drain(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the shipper and close the spool (what is undelivered stays for the next start)."""
        with self._lock:
            shipper, self._shipper = self._shipper, None
            writer, self._writer = self._writer, None
        if shipper is not None:
            shipper.stop(timeout)
        if writer is not None:
            writer.close()
        _live.discard(self)

    def replay(
        self,
        tenant: str,
        *,
        since_ns: int | None = None,
        until_ns: int | None = None,
        destination: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Send the tenant's events still in the spool again (a range, one destination or all),
        in order, with their original ids (the tenant's SIEM drops what it already has).

        Returns:
            The number of events sent to each destination.

        Raises:
            ConfigurationError: the tenant has no such destination.
            DeliveryError: a destination refused a batch; events before it were sent.
        """
        audit = self.tenant_audit(tenant)
        specs = [
            s
            for s in (audit.destinations if audit else ())
            if destination is None or destination_name(s) == destination
        ]
        if not specs:
            raise ConfigurationError(
                f"tenant {tenant!r} has no audit destination"
                + (f" named {destination!r}" if destination else "")
            )
        built = [build_sink(s, self.env) for s in specs]
        sent = 0
        try:
            batch: list[Record] = []
            size = min([self._shipper_args["batch_max"], *(s.max_batch for s in built)])

            def flush() -> None:
                for sink in built:
                    sink.send(batch)
                batch.clear()

            for _, rec in spool_events(self.root, tenant, since_ns=since_ns, until_ns=until_ns):
                batch.append(rec)
                if len(batch) >= size:
                    n = len(batch)
                    flush()
                    sent += n
                    if progress is not None:
                        progress(sent)
            if batch:
                n = len(batch)
                flush()
                sent += n
                if progress is not None:
                    progress(sent)
        finally:
            for sink in built:
                with contextlib.suppress(Exception):
                    sink.close()
        return sent

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._id_prefix, self._ids = os.urandom(8).hex(), itertools.count()
        if self._writer is not None:
            self._writer.abandon_after_fork()
            self._writer = None  # a new writer (and chain) at the child's first event
        self._chains = {}
        if self._shipper is not None:
            self._shipper.abandon_after_fork()
            self._shipper = None  # restarted by the child's first event

    # -- the operator's side -------------------------------------------------------------------

    def _spool_recovered(self) -> bool:
        """Whether the spool could record again now. Asked by :meth:`health` while it reports
        ``failing``, by a synced write of a file beside the segments: otherwise only the next
        event could tell, and a process with no traffic stayed ``failing`` after its disk came
        back."""
        w = self._writer
        if w is not None and w.full:
            return False
        where = w.dir if w is not None else self.root
        try:
            os.makedirs(where, mode=0o700, exist_ok=True)
            path = os.path.join(where, ".probe")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                if os.write(fd, bytes(512)) != 512:
                    return False
                os.fdatasync(fd)
            finally:
                os.close(fd)
            os.unlink(path)
        except OSError:
            return False
        return True

    def health(self) -> dict[str, Any]:
        """A health report for an orchestrator's probe.

        ``status`` is ``failing`` when the spool cannot record (accesses of tenants with the
        ``deny`` policy are refused: restarting may help if the disk is the problem; each call
        checks the disk again while failing),
        ``degraded`` when a tenant's oldest undelivered event is older than ``max_lag`` (its
        SIEM is down: restarting does not help, alert instead), else ``ok``.
        """
        if self._spool_error is not None and self._spool_recovered():
            self._spool_error = None
        tenants = self._shipper.tenants() if self._shipper is not None else {}
        lagging = sorted(
            t
            for t, dests in tenants.items()
            if any(d["lag_seconds"] > self.max_lag for d in dests.values())
        )
        status = "failing" if self._spool_error else ("degraded" if lagging else "ok")
        return {
            "status": status,
            "spool": self.root,
            "spool_error": self._spool_error,
            "shipper_running": bool(self._shipper and self._shipper.alive()),
            "lagging_tenants": lagging,
            "dropped": dict(self.dropped),
            "tenants": tenants,
        }


_live: weakref.WeakSet[AuditDelivery] = weakref.WeakSet()
_gauges_registered = False


def _per_tenant(key: str) -> list[tuple[float, dict[str, str]]]:
    """One series per tenant over every live delivery: backlog (summed) or lag (the oldest)."""
    totals: dict[str, float] = {}
    for d in list(_live):
        shipper = d._shipper
        if shipper is None:
            continue
        for tenant, dests in shipper.tenants().items():
            values = [float(dest[key]) for dest in dests.values()]
            if key == "backlog":
                totals[tenant] = totals.get(tenant, 0.0) + sum(values)
            else:
                totals[tenant] = max(totals.get(tenant, 0.0), *values)
    return [(v, {"tenant": t}) for t, v in totals.items()]


def _dropped() -> list[tuple[float, dict[str, str]]]:
    totals: dict[str, int] = {}
    for d in list(_live):
        for tenant, n in d.dropped.items():
            totals[tenant] = totals.get(tenant, 0) + n
    return [(float(n), {"tenant": t}) for t, n in totals.items()]


def _register_gauges() -> None:
    global _gauges_registered
    if _gauges_registered:
        return
    _gauges_registered = True
    _metrics.register_gauge(
        "sqlalchemy_cmk.audit.backlog",
        "Audit events recorded in the spool and not yet delivered, per tenant",
        "{event}",
        lambda: _per_tenant("backlog"),
    )
    _metrics.register_gauge(
        "sqlalchemy_cmk.audit.lag",
        "Age of the tenant's oldest undelivered audit event",
        "s",
        lambda: _per_tenant("lag_seconds"),
    )
    _metrics.register_gauge(
        "sqlalchemy_cmk.audit.dropped",
        "Audit events dropped under the tenant's serve policy since the process started",
        "{event}",
        _dropped,
    )


def _after_fork() -> None:
    for d in list(_live):
        d._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork)


# -- reading a spool (the CLI, an operator's scripts) --------------------------------------------


def _writer_dirs(spool: str | os.PathLike[str]) -> list[str]:
    root = os.fspath(spool)
    if not os.path.isdir(root):
        raise ConfigurationError(f"no audit spool at {root!r}")
    return sorted(os.path.join(root, n) for n in os.listdir(root) if n.startswith("w-"))


def _frames_after(wdir: str, seg: int, offset: int) -> list[tuple[int, int, str, bytes]]:
    """The whole frames of a segment that end past ``offset``, the end of a frame read before.

    Compaction keeps the offsets of the frames it keeps, but a run of dropped frames becomes
    one padding frame: an offset between two of them is no longer where a frame starts, and
    read from there the segment seems to end (a hole reads as zeros). Only a complete
    segment is compacted: if reading from ``offset`` finds nothing and a later segment exists,
    the segment is read from its start instead.
    """
    path = os.path.join(wdir, _spool.segment_name(seg))
    frames = list(_spool.read_frames(path, offset))
    if offset and not frames and _spool.segments(wdir)[-1:] != [seg]:
        frames = [f for f in _spool.read_frames(path) if f[1] > offset]
    return frames


def spool_events(
    spool: str | os.PathLike[str],
    tenant: str | None = None,
    *,
    since_ns: int | None = None,
    until_ns: int | None = None,
    cursors: dict[str, tuple[int, int]] | None = None,
) -> Iterator[tuple[str, Record]]:
    """``(writer, record)`` of every event still in the spool (delivered ones until their
    retention ends), each writer's in the order written, writers one after another.

    ``cursors`` (writer -> segment and offset), if given, is where each writer was read to:
    reading starts there and moves it on, so that following a spool reads only what is new.
    """
    writers = _writer_dirs(spool)
    if cursors is not None:
        for gone in set(cursors) - {os.path.basename(w)[2:] for w in writers}:
            del cursors[gone]
    for wdir in writers:
        writer = os.path.basename(wdir)[2:]
        start = cursors.get(writer, (0, 0)) if cursors is not None else (0, 0)
        for seg in _spool.segments(wdir):
            if seg < start[0]:
                continue
            try:
                frames = _frames_after(wdir, seg, start[1] if seg == start[0] else 0)
            except FileNotFoundError:
                continue  # pruned meanwhile
            for _, nxt, t, body in frames:
                if cursors is not None:
                    cursors[writer] = (seg, nxt)
                if tenant is not None and t != tenant:
                    continue
                rec = _shipper.record_of(t, body)
                if rec is None:
                    continue  # not an event (logged)
                if since_ns is not None and rec.time_ns < since_ns:
                    continue
                if until_ns is not None and rec.time_ns >= until_ns:
                    continue
                yield writer, rec


def spool_status(spool: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One entry per writer, tenant and destination: backlog, oldest undelivered event's age,
    deliveries, failures and the last error, as the shipper last saved them; ``destination`` is
    None for a tenant whose events no shipper has picked up yet."""
    out: list[dict[str, Any]] = []
    now = time.time_ns()
    for wdir in _writer_dirs(spool):
        fd = _spool.try_lock(wdir)
        alive = fd is None
        if fd is not None:
            os.close(fd)
        lanes = _spool.load_state(wdir).get("lanes", {})
        by_tenant: dict[str, list[tuple[str | None, dict[str, Any]]]] = {}
        for key, st in lanes.items():
            pair = _spool.parse_lane_key(key)
            if pair is not None:
                by_tenant.setdefault(pair[0], []).append((pair[1], st))
        head = {"writer": os.path.basename(wdir)[2:], "writer_alive": alive}

        def row(t: str, name: str | None, st: Mapping[str, Any], head: Any = head) -> Any:
            return {
                **head,
                "tenant": t,
                "destination": name,
                "backlog": 0,
                "oldest_undelivered_seconds": None,
                "delivered": st.get("delivered", 0),
                "delivered_at": st.get("delivered_at"),
                "failures": st.get("failures", 0),
                "last_error": st.get("last_error"),
            }

        rows = {(t, name): row(t, name, st) for t, dests in by_tenant.items() for name, st in dests}
        for seg in _spool.segments(wdir):
            path = os.path.join(wdir, _spool.segment_name(seg))
            with contextlib.suppress(FileNotFoundError):
                for _, nxt, t, body in _spool.read_frames(path):
                    targets = by_tenant.get(t) or [(None, {})]
                    for name, st in targets:
                        cursor = tuple(st.get("cursor") or (0, 0))
                        if (seg, nxt) <= cursor:
                            continue
                        r = rows.setdefault((t, name), row(t, name, {}))
                        r["backlog"] += 1
                        if r["oldest_undelivered_seconds"] is None:
                            rec = _shipper.record_of(t, body)
                            if rec is not None:
                                age = (now - rec.time_ns) / 1e9
                                r["oldest_undelivered_seconds"] = round(age, 3)
        out.extend(rows.values())
    return out


def verify_chain(
    bodies: Iterable[bytes], *, pruned: Collection[str] = ()
) -> dict[tuple[str, str], int]:
    """Check the hash chains of delivered events, as a tenant does (``docs/audit.md``).

    Events may come in any order across writers but in order within one writer (as delivered).

    Args:
        bodies: The events' bytes.
        pruned: Writers whose oldest events are gone (a spool past its retention): their
            chains are checked from the first event present, which may have any ``seq``.

    Returns:
        The number of events per (tenant, writer).

    Raises:
        ChainError: a gap (an event missing), an edited event, or a reordering.
    """
    last: dict[tuple[str, str], tuple[int, str]] = {}
    counts: dict[tuple[str, str], int] = {}
    for body in bodies:
        un = json.loads(body)["unmapped"]
        key = (un["tenant"], un["writer"])
        if key not in last and un["writer"] in pruned:
            last[key] = (un["seq"] - 1, un["prev"])  # the events before it were pruned
        seq, prev = last.get(key, (0, _GENESIS))
        if un["seq"] != seq + 1:
            raise ChainError(
                f"writer {un['writer']}: event {seq + 1} is missing before {un['seq']}"
            )
        if un["prev"] != prev:
            raise ChainError(
                f"writer {un['writer']}: event {seq} was changed, or another took its place"
            )
        last[key] = (seq + 1, hashlib.sha256(body).hexdigest())
        counts[key] = counts.get(key, 0) + 1
    return counts


def pruned_writers(spool: str | os.PathLike[str], read: Iterable[str] = ()) -> set[str]:
    """The writers of a spool whose oldest segments retention has deleted (for
    :func:`verify_chain`'s ``pruned``): segments are numbered from 1 and deleted oldest first.
    Also those whose shipper compacted segments, which removes a tenant's oldest events the
    same way, before the segment goes.

    Args:
        spool: The spool directory.
        read: Writers whose events were read before this call (:func:`spool_events`). One
            whose directory is gone since counts as pruned: a shipper delivered its events
            and removed it, and its first segments may have gone while it was read. (Called
            only before the read, it was not pruned yet; only after, it is not there.)
    """
    out = set()
    present = set()
    for wdir in _writer_dirs(spool):
        writer = os.path.basename(wdir)[2:]
        segs = _spool.segments(wdir)
        if not segs and not os.path.isdir(wdir):
            continue  # removed since the listing
        present.add(writer)
        if (segs and segs[0] > 1) or os.path.exists(os.path.join(wdir, "compacted")):
            out.add(writer)
    return out | (set(read) - present)


class ChainError(CMKError):
    """A tenant's hash chain does not verify: an event is missing, edited or out of order."""
