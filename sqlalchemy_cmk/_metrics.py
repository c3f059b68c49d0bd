"""Operator metrics through the OpenTelemetry metrics API (the ``metrics`` extra).

Without ``opentelemetry-api`` installed every function here does nothing. With it, the
instruments live on the global ``MeterProvider`` (``opentelemetry.metrics.set_meter_provider``,
which the application configures with the SDK and its exporter), or on the one given to
:func:`use_meter_provider`. With the API alone (no SDK), the API's own provider drops them.

Instruments (meter ``sqlalchemy_cmk``):
    ``sqlalchemy_cmk.kms.calls`` (counter, ``{call}``): each wrap and unwrap sent to a tenant's
        KMS, by ``provider``, ``tenant``, ``operation`` (``wrap``/``unwrap``), ``outcome``.
    ``sqlalchemy_cmk.kms.duration`` (histogram, ``ms``): their latency, same attributes.
    ``sqlalchemy_cmk.key_cache.lookups`` (counter, ``{lookup}``): data-key cache lookups of
        reads, by ``tenant`` and ``result`` (``hit``/``miss``).
    ``sqlalchemy_cmk.access.events`` (counter, ``{event}``): access events (``encrypt``,
        ``decrypt``, ``search``) by ``operation``, ``tenant`` and ``outcome``, so an operator
        sees refusals (``no_tenant``, ``tampered``...) rise without reading the audit trail.

KMS calls and accesses are counted from the audit events (:class:`MetricsSink`, which every
``CMK`` puts first among its sinks), so a metric can never disagree with the audit trail. Tenant
attributes come from events and keys, never from a value; ``""`` stands for no tenant.
Other parts (the audit spool, the shipper) add observable gauges with :func:`register_gauge`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .audit import AuditEvent

_otel: Any
try:  # the metrics extra
    from opentelemetry import metrics as _otel
except ImportError:  # pragma: no cover - the no-op test sets _otel to None instead
    _otel = None

__all__ = [
    "MetricsSink",
    "available",
    "cache_lookups",
    "register_gauge",
    "use_meter_provider",
]

METER = "sqlalchemy_cmk"
_KMS_OPS = frozenset({"wrap", "unwrap"})
_ACCESS_OPS = frozenset({"encrypt", "decrypt", "search"})

# What a gauge callback returns: (value, attributes) pairs, one per series (e.g. per tenant).
GaugeCallback = Callable[[], Iterable[tuple[float, Mapping[str, str]]]]


class _Instruments:
    def __init__(self, meter: Any) -> None:
        self.kms_calls = meter.create_counter(
            "sqlalchemy_cmk.kms.calls", unit="{call}", description="Calls to tenants' KMS"
        )
        self.kms_duration = meter.create_histogram(
            "sqlalchemy_cmk.kms.duration", unit="ms", description="Latency of KMS calls"
        )
        self.cache = meter.create_counter(
            "sqlalchemy_cmk.key_cache.lookups",
            unit="{lookup}",
            description="Data-key cache lookups of reads, by result (hit, miss)",
        )
        self.access = meter.create_counter(
            "sqlalchemy_cmk.access.events",
            unit="{event}",
            description="Audited accesses (encrypt, decrypt, search) by outcome",
        )


_lock = threading.Lock()
_provider: Any = None  # None: the global provider
_instruments: _Instruments | None = None
_gauges: list[tuple[str, str, str, GaugeCallback]] = []


def available() -> bool:
    """Whether the OpenTelemetry metrics API is installed (else every call is a no-op)."""
    return _otel is not None


def _meter() -> Any:
    assert _otel is not None
    provider = _provider if _provider is not None else _otel.get_meter_provider()
    return provider.get_meter(METER)


def _get() -> _Instruments | None:
    global _instruments
    if _otel is None:
        return None
    found = _instruments
    if found is None:
        with _lock:
            if _instruments is None:
                _instruments = _Instruments(_meter())
            found = _instruments
    return found


def use_meter_provider(provider: Any) -> None:
    """Record on ``provider`` from now on (``None``: the global one again). For tests and for
    applications that keep a provider of their own rather than setting the global one. The
    gauges registered so far are registered again on it."""
    global _provider, _instruments
    with _lock:
        _provider = provider
        _instruments = None
        gauges = list(_gauges)
    if _otel is not None:
        for name, description, unit, callback in gauges:
            _create_gauge(name, description, unit, callback)


def register_gauge(name: str, description: str, unit: str, callback: GaugeCallback) -> None:
    """Register an observable gauge (e.g. the audit spool's backlog per tenant).

    Args:
        name: The instrument name, e.g. ``"sqlalchemy_cmk.audit.backlog"``.
        description: What it measures.
        unit: UCUM unit, e.g. ``"{event}"`` or ``"s"``.
        callback: Called at each collection; returns ``(value, attributes)`` pairs, one per
            series. An exception it raises is the SDK's to log; that collection skips it.
    """
    with _lock:
        _gauges.append((name, description, unit, callback))
    if _otel is not None:
        _create_gauge(name, description, unit, callback)


def _create_gauge(name: str, description: str, unit: str, callback: GaugeCallback) -> None:
    assert _otel is not None
    observation = _otel.Observation

    def observe(options: Any) -> Iterable[Any]:
        return [observation(value, dict(attrs)) for value, attrs in callback()]

    _meter().create_observable_gauge(name, callbacks=[observe], unit=unit, description=description)


def cache_lookups(hits: Mapping[str, int], misses: Mapping[str, int]) -> None:
    """Count read-cache lookups per tenant."""
    inst = _get()
    if inst is None:
        return
    for tenant, n in hits.items():
        inst.cache.add(n, {"tenant": tenant, "result": "hit"})
    for tenant, n in misses.items():
        inst.cache.add(n, {"tenant": tenant, "result": "miss"})


class MetricsSink:
    """An audit sink that turns KMS-call and access events into metrics; never raises (a
    metrics failure must not stop an access)."""

    def __call__(self, event: AuditEvent) -> None:
        inst = _get()
        if inst is None:
            return
        try:
            op = event.operation
            if op in _KMS_OPS:
                attrs = {
                    "provider": event.provider or "",
                    "tenant": event.tenant or "",
                    "operation": op,
                    "outcome": event.outcome,
                }
                inst.kms_calls.add(1, attrs)
                inst.kms_duration.record(event.duration_ms, attrs)
            elif op in _ACCESS_OPS:
                inst.access.add(
                    1, {"operation": op, "tenant": event.tenant or "", "outcome": event.outcome}
                )
        except Exception:  # noqa: S110 - metrics are best effort; the access goes on
            pass
