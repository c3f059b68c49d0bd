"""Operator metrics through the OpenTelemetry metrics API (issue 12), read back with the SDK's
InMemoryMetricReader: KMS calls and latency per provider, tenant, operation and outcome; cache
hits and misses per tenant; access events by outcome; gauges registered by other parts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from sqlalchemy_cmk import (
    CMK,
    DecryptionError,
    EncryptedDocument,
    KMSUnavailableError,
    NoTenantError,
    _metrics,
    tenant_context,
)
from sqlalchemy_cmk.testing import FakeKeyProvider, MemoryAuditSink


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    _metrics.use_meter_provider(provider)
    yield reader
    _metrics.use_meter_provider(None)
    provider.shutdown()


def points(reader: InMemoryMetricReader, name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
    """The instrument's data points by their attributes: a sum's value, a histogram's count, a
    gauge's value."""
    data = reader.get_metrics_data()
    out: dict[tuple[tuple[str, Any], ...], Any] = {}
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name != name:
                    continue
                for p in metric.data.data_points:
                    key = tuple(sorted(p.attributes.items()))
                    out[key] = p.count if hasattr(p, "bucket_counts") else p.value
    return out


def attrs(**kw: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kw.items()))


def test_kms_calls_cache_and_accesses(reader: InMemoryMetricReader) -> None:
    kms = FakeKeyProvider()
    cmk = CMK(kms, tenant_keys={"acme": "fake://acme"}, audit_sinks=[])
    with tenant_context("acme"):
        doc = cmk.encrypt_document({"f": b"v"})  # a wrap, and the unwrap that verifies it
        for _ in range(3):
            assert cmk.decrypt_document(doc) == {"f": b"v"}  # cached: hits
    cmk.forget_tenant()
    kms.inject("unavailable", count=None)
    with tenant_context("acme"), pytest.raises(KMSUnavailableError):
        cmk.decrypt_document(doc)  # a miss, an unwrap the KMS fails
    kms.heal()
    with pytest.raises(NoTenantError):
        cmk.decrypt_document(doc)

    calls = points(reader, "sqlalchemy_cmk.kms.calls")
    kms_attrs = {"provider": "fake", "tenant": "acme"}
    assert calls[attrs(**kms_attrs, operation="wrap", outcome="ok")] == 1
    assert calls[attrs(**kms_attrs, operation="unwrap", outcome="ok")] == 1
    # One attempt per retry counts once: the event is per KMS operation, after its retries.
    assert calls[attrs(**kms_attrs, operation="unwrap", outcome="unavailable")] == 1
    latency = points(reader, "sqlalchemy_cmk.kms.duration")
    assert latency[attrs(**kms_attrs, operation="wrap", outcome="ok")] == 1

    cache = points(reader, "sqlalchemy_cmk.key_cache.lookups")
    assert cache[attrs(tenant="acme", result="hit")] == 3
    assert cache[attrs(tenant="acme", result="miss")] == 1

    access = points(reader, "sqlalchemy_cmk.access.events")
    assert access[attrs(operation="encrypt", tenant="acme", outcome="ok")] == 1
    assert access[attrs(operation="decrypt", tenant="acme", outcome="ok")] == 3
    assert access[attrs(operation="decrypt", tenant="acme", outcome="unavailable")] == 1
    assert access[attrs(operation="decrypt", tenant="", outcome="no_tenant")] == 1


def test_metrics_agree_with_the_audit_trail(reader: InMemoryMetricReader) -> None:
    """Counted from the events: a refused access is counted once, as its event says."""
    audit = MemoryAuditSink()
    cmk = CMK(FakeKeyProvider(), tenant_keys={"acme": "fake://acme"}, audit_sinks=[audit])
    with tenant_context("acme"):
        doc = cmk.encrypt_document({"f": b"v"})
        bad = EncryptedDocument(doc.edek, {"f": doc.fields["f"][:-1] + b"\x00"})
        with pytest.raises(DecryptionError):
            cmk.decrypt_document(bad)
    access = points(reader, "sqlalchemy_cmk.access.events")
    by_outcome = {(e.operation, e.outcome) for e in audit.events if e.operation != "wrap"}
    assert ("decrypt", "tampered") in by_outcome
    assert access[attrs(operation="decrypt", tenant="acme", outcome="tampered")] == 1


def test_register_gauge(reader: InMemoryMetricReader, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_metrics, "_gauges", [])  # registered for this test only
    backlog = {"acme": 3, "globex": 0}
    _metrics.register_gauge(
        "sqlalchemy_cmk.test.backlog",
        "Events waiting in the spool",
        "{event}",
        lambda: [(n, {"tenant": t}) for t, n in backlog.items()],
    )
    assert points(reader, "sqlalchemy_cmk.test.backlog") == {
        attrs(tenant="acme"): 3,
        attrs(tenant="globex"): 0,
    }
    backlog["acme"] = 1
    assert points(reader, "sqlalchemy_cmk.test.backlog")[attrs(tenant="acme")] == 1


def test_without_the_api_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without opentelemetry-api (the metrics extra) nothing is recorded and nothing fails."""
    monkeypatch.setattr(_metrics, "_otel", None)
    monkeypatch.setattr(_metrics, "_instruments", None)
    assert not _metrics.available()
    _metrics.register_gauge("x", "y", "1", lambda: [(1, {})])
    _metrics.cache_lookups({"acme": 1}, {})
    cmk = CMK(FakeKeyProvider(), tenant_keys={"acme": "fake://acme"}, audit_sinks=[])
    assert not any(isinstance(s, _metrics.MetricsSink) for s in cmk._keys._audit)
    with tenant_context("acme"):
        assert cmk.decrypt_document(cmk.encrypt_document({"f": b"v"})) == {"f": b"v"}
