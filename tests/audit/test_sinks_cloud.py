"""The cloud log sinks with their real SDK clients against local servers on loopback.

- ``cloudwatch``: boto3 against moto's server (HTTPS), events read back with ``get_log_events``.
- ``gcp_logging``: google-cloud-logging's GAPIC client against a local ``LoggingServiceV2``
  gRPC server (``tests/audit/_gcp_logging.py``).
- ``azure_monitor``: azure-monitor-ingestion's ``LogsIngestionClient`` against a local HTTPS
  data collection endpoint (``tests/audit/_azure_dce.py``) that checks the bearer token.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sqlalchemy_cmk.errors import ConfigurationError, DeliveryError
from sqlalchemy_cmk.sinks import (
    NetworkPolicy,
    Record,
    Sink,
    SinkEnv,
    build_sink,
    check_destination,
)

LOOPBACK = NetworkPolicy(allow_private=True)


def _records(n: int, start: int = 0, tenant: str = "acme", t0: int | None = None) -> list[Record]:
    t0 = time.time_ns() if t0 is None else t0
    return [
        Record(
            id=f"ev-{i}",
            tenant=tenant,
            time_ns=t0 + i * 1_000_000,
            severity="warning" if i % 3 == 2 else "info",
            body=json.dumps(
                {"id": f"ev-{i}", "operation": "decrypt", "tenant": tenant, "n": 'é"\\'},
                separators=(",", ":"),
                ensure_ascii=False,
                sort_keys=True,
            ).encode(),
        )
        for i in range(start, start + n)
    ]


def _refused(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        check_destination(spec)
    assert field in str(info.value)
    assert "hunter2" not in str(info.value)


# -- cloudwatch ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_logs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.audit._moto_logs import MotoLogs

    server = MotoLogs(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


def _cw_group(moto_logs: Any, stream: bool = True) -> tuple[dict[str, Any], Any]:
    from tests.audit._moto_logs import REGION

    logs = moto_logs.client()
    group = f"/acme/cmk-audit-{uuid.uuid4().hex[:8]}"
    logs.create_log_group(logGroupName=group)
    if stream:
        logs.create_log_stream(logGroupName=group, logStreamName="prod")
    spec = {
        "kind": "cloudwatch",
        "region": REGION,
        "log_group": group,
        "log_stream": "prod",
        "timeout": 5,
    }
    return spec, logs


def _cw_read(logs: Any, spec: dict[str, Any]) -> list[dict[str, Any]]:
    answer = logs.get_log_events(
        logGroupName=spec["log_group"], logStreamName=spec["log_stream"], startFromHead=True
    )
    return list(answer["events"])


def test_cloudwatch_events_arrive_intact_and_in_order(moto_logs: Any) -> None:
    spec, logs = _cw_group(moto_logs)
    sink = build_sink(spec, SinkEnv(policy=LOOPBACK, clients={"cloudwatch": logs}))
    assert isinstance(sink, Sink) and (sink.kind, sink.max_batch) == ("cloudwatch", 1000)
    records = _records(50)
    sink.send(records[:20])
    sink.send(records[20:])
    events = _cw_read(logs, spec)
    assert [e["message"].encode() for e in events] == [r.body for r in records]
    assert [e["timestamp"] for e in events] == [r.time_ns // 1_000_000 for r in records]


def test_cloudwatch_builds_its_own_client_and_assumes_the_role(
    moto_logs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.audit._moto_logs import CREDS

    # The standard chain (here: the environment) and the CA of the local endpoint.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDS["aws_secret_access_key"])
    monkeypatch.setenv("AWS_CA_BUNDLE", str(moto_logs.ca_file))
    spec, logs = _cw_group(moto_logs)
    spec |= {
        "endpoint_url": moto_logs.url,
        "sts_endpoint_url": moto_logs.url,
        # moto keeps the group under the account of the credentials: its default one.
        "role_arn": "arn:aws:iam::123456789012:role/cmk-audit-writer",
        "external_id": "acme-7f3a",
    }
    sink = build_sink(spec, SinkEnv(policy=LOOPBACK))
    records = _records(3)
    sink.send(records)
    sink.close()
    assert [e["message"].encode() for e in _cw_read(logs, spec)] == [r.body for r in records]
    # The events went in under the role's temporary credentials (moto's start with ASIA),
    # not under the caller's own key.
    (put_key,) = {key for op, key in moto_logs.targets[-3:] if op == "PutLogEvents"}
    assert put_key.startswith("ASIA")


def test_cloudwatch_missing_stream_is_not_retryable_unless_created(moto_logs: Any) -> None:
    spec, logs = _cw_group(moto_logs, stream=False)
    env = SinkEnv(policy=LOOPBACK, clients={"cloudwatch": logs})
    with pytest.raises(DeliveryError) as info:
        build_sink(spec, env).send(_records(1))
    assert not info.value.retryable
    assert "ResourceNotFoundException" in str(info.value) and "ev-" not in str(info.value)
    records = _records(2)
    build_sink({**spec, "create_stream": True}, env).send(records)
    assert [e["message"].encode() for e in _cw_read(logs, spec)] == [r.body for r in records]


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        (400, "ThrottlingException", True),
        (503, "ServiceUnavailableException", True),
        (500, "InternalFailure", True),
        (400, "AccessDeniedException", False),
        (400, "UnrecognizedClientException", False),
    ],
)
def test_cloudwatch_failures(moto_logs: Any, status: int, code: str, retryable: bool) -> None:
    spec, logs = _cw_group(moto_logs)
    sink = build_sink(spec, SinkEnv(policy=LOOPBACK, clients={"cloudwatch": logs}))
    moto_logs.faults.append((status, code))
    with pytest.raises(DeliveryError) as info:
        sink.send(_records(2))
    assert info.value.retryable is retryable
    records = _records(2)
    sink.send(records)  # the fault was for one call
    assert [e["message"].encode() for e in _cw_read(logs, spec)] == [r.body for r in records]


def test_cloudwatch_down_then_up(moto_logs: Any) -> None:
    spec, logs = _cw_group(moto_logs)
    sink = build_sink(spec, SinkEnv(policy=LOOPBACK, clients={"cloudwatch": logs}))
    records = _records(4)
    sink.send(records[:2])
    moto_logs.stop()
    try:
        with pytest.raises(DeliveryError) as info:
            sink.send(records[2:])
        assert info.value.retryable
    finally:
        moto_logs.start()
    sink.send(records[2:])
    assert [e["message"].encode() for e in _cw_read(logs, spec)] == [r.body for r in records]


def test_cloudwatch_batches_within_the_limits() -> None:
    from sqlalchemy_cmk.sinks.cloudwatch import MAX_BYTES, CloudWatchSink

    t0 = 1_780_000_000_000_000_000
    big = b'"' + b"x" * 400_000 + b'"'
    records = [Record(f"b{i}", "acme", t0 + i, "info", big) for i in range(5)]
    assert [len(c) for c in CloudWatchSink.chunks(records)] == [2, 2, 1]
    for chunk in CloudWatchSink.chunks(records):
        assert sum(len(e["message"].encode()) + 26 for e in chunk) <= MAX_BYTES
    small = [Record(f"s{i}", "acme", t0, "info", b"{}") for i in range(10_001)]
    assert [len(c) for c in CloudWatchSink.chunks(small)] == [10_000, 1]
    day = 24 * 3600 * 10**9
    # Out of time order across a day: a new call wherever the span would exceed 24 hours;
    # within a call, sorted by time (stable for equal times).
    spread = [
        Record("a", "acme", t0 + 5 * 10**6, "info", b"1"),
        Record("b", "acme", t0, "info", b"2"),
        Record("c", "acme", t0 + 5 * 10**6, "info", b"3"),
        Record("d", "acme", t0 + day + 10**6, "info", b"4"),
    ]
    assert [[e["message"] for e in c] for c in CloudWatchSink.chunks(spread)] == [
        ["2", "1", "3"],
        ["4"],
    ]
    with pytest.raises(DeliveryError) as info:
        CloudWatchSink.chunks([Record("huge", "acme", t0, "info", b"x" * (1 << 20))])
    assert not info.value.retryable


def test_cloudwatch_check_and_policy() -> None:
    base = {"kind": "cloudwatch", "region": "eu-west-1", "log_group": "/g", "log_stream": "s"}
    assert check_destination(base) == {
        **base,
        "create_stream": False,
        "timeout": 10.0,
        "max_batch": 1000,
    }
    for field in ("region", "log_group", "log_stream"):
        _refused({k: v for k, v in base.items() if k != field}, field)
    _refused({**base, "aws_secret_access_key": "hunter2"}, "aws_secret_access_key")
    _refused({**base, "endpoint_url": "http://logs.example"}, "endpoint_url")
    _refused({**base, "endpoint_url": "https://AKIA:hunter2@logs.example"}, "endpoint_url")
    _refused({**base, "role_arn": "hunter2"}, "role_arn")
    _refused({**base, "external_id": "x-1"}, "external_id")
    _refused({**base, "max_batch": 10_001}, "max_batch")
    spec = {**base, "endpoint_url": "https://127.0.0.1:1"}
    with pytest.raises(ConfigurationError, match="non-public"):
        build_sink(spec)
    with pytest.raises(ConfigurationError, match="allowlist"):
        build_sink(spec, SinkEnv(policy=NetworkPolicy(allowed_hosts=frozenset({"*.aws"}))))


# -- gcp_logging ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gcp_logging() -> Iterator[Any]:
    from tests.audit._gcp_logging import LoggingServer

    server = LoggingServer({"acme-audit"}).start()
    yield server
    server.stop()


def _gcp_spec(**extra: Any) -> dict[str, Any]:
    return {
        "kind": "gcp_logging",
        "project": "acme-audit",
        "log_id": f"cmk-{uuid.uuid4().hex[:8]}",
        "labels": {"env": "test"},
        "timeout": 5,
        **extra,
    }


@pytest.fixture(scope="module")
def gcp_client(gcp_logging: Any) -> Iterator[Any]:
    client = gcp_logging.client()
    yield client
    client.transport.close()


def test_gcp_entries_arrive_intact_in_order_with_ids(gcp_logging: Any, gcp_client: Any) -> None:
    spec = _gcp_spec()
    sink = build_sink(spec, SinkEnv(policy=LOOPBACK, clients={"gcp_logging": gcp_client}))
    assert isinstance(sink, Sink) and (sink.kind, sink.max_batch) == ("gcp_logging", 500)
    records = _records(30)
    sink.send(records[:10])
    sink.send(records[10:])
    sink.send(records[5:10])  # a re-delivery: Cloud Logging drops it by insert_id
    entries = gcp_logging.logged(f"projects/acme-audit/logs/{spec['log_id']}")
    assert [e.text_payload.encode() for e in entries] == [r.body for r in records]
    assert [e.insert_id for e in entries] == [r.id for r in records]
    for entry, record in zip(entries, records, strict=True):
        assert dict(entry.labels) == {"env": "test", "event_id": record.id, "tenant": "acme"}
        ts = entry.timestamp
        assert int(ts.timestamp()) * 10**9 + ts.nanosecond == record.time_ns
        assert entry.severity == (400 if record.severity == "warning" else 200)
        assert entry.resource.type == "global"
        assert dict(entry.resource.labels) == {"project_id": "acme-audit"}
    assert not gcp_logging.requests[-1].partial_success


def test_gcp_json_payload(gcp_logging: Any, gcp_client: Any) -> None:
    spec = _gcp_spec(payload="json", resource_type="k8s_container", resource_labels={"a": "b"})
    sink = build_sink(spec, SinkEnv(policy=LOOPBACK, clients={"gcp_logging": gcp_client}))
    records = _records(2)
    sink.send(records)
    entries = gcp_logging.logged(f"projects/acme-audit/logs/{spec['log_id']}")
    assert [dict(e.json_payload) for e in entries] == [json.loads(r.body) for r in records]
    assert entries[0].resource.type == "k8s_container"


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        ("UNAVAILABLE", True),
        ("RESOURCE_EXHAUSTED", True),
        ("INTERNAL", True),
        ("DEADLINE_EXCEEDED", True),
        ("PERMISSION_DENIED", False),
        ("UNAUTHENTICATED", False),
        ("INVALID_ARGUMENT", False),
    ],
)
def test_gcp_failures(gcp_logging: Any, gcp_client: Any, code: str, retryable: bool) -> None:
    import grpc

    spec = _gcp_spec()
    sink = build_sink(spec, SinkEnv(policy=LOOPBACK, clients={"gcp_logging": gcp_client}))
    gcp_logging.fail(getattr(grpc.StatusCode, code))
    with pytest.raises(DeliveryError) as info:
        sink.send(_records(2))
    assert info.value.retryable is retryable
    assert "injected" not in str(info.value)  # the service's message is not repeated
    records = _records(2)
    sink.send(records)  # the client library did not retry: the fault took one call
    entries = gcp_logging.logged(f"projects/acme-audit/logs/{spec['log_id']}")
    assert [e.insert_id for e in entries] == ["ev-0", "ev-1"]


def test_gcp_project_refused_is_not_retryable(gcp_logging: Any, gcp_client: Any) -> None:
    spec = _gcp_spec(project="other-project")
    sink = build_sink(spec, SinkEnv(policy=LOOPBACK, clients={"gcp_logging": gcp_client}))
    with pytest.raises(DeliveryError) as info:
        sink.send(_records(1))
    assert not info.value.retryable and "PermissionDenied" in str(info.value)


def test_gcp_down_then_up(gcp_logging: Any, gcp_client: Any) -> None:
    spec = _gcp_spec()
    sink = build_sink(spec, SinkEnv(policy=LOOPBACK, clients={"gcp_logging": gcp_client}))
    records = _records(4)
    sink.send(records[:2])
    gcp_logging.stop()
    try:
        with pytest.raises(DeliveryError) as info:
            sink.send(records[2:])
        assert info.value.retryable
    finally:
        gcp_logging.start()  # the same port
    deadline = time.monotonic() + 5
    while True:  # as the shipper does: retry until the channel has reconnected
        try:
            sink.send(records[2:])
            break
        except DeliveryError as exc:
            assert exc.retryable and time.monotonic() < deadline
            time.sleep(0.05)
    entries = gcp_logging.logged(f"projects/acme-audit/logs/{spec['log_id']}")
    assert [e.insert_id for e in entries] == [r.id for r in records]


def test_gcp_check_and_credentials(tmp_path: Path) -> None:
    base = {"kind": "gcp_logging", "project": "acme-audit"}
    assert check_destination(base) == {
        **base,
        "log_id": "sqlalchemy-cmk-audit",
        "resource_type": "global",
        "resource_labels": {"project_id": "acme-audit"},
        "labels": {},
        "payload": "text",
        "timeout": 10.0,
        "max_batch": 500,
    }
    assert check_destination(check_destination(base)) == check_destination(base)
    _refused({"kind": "gcp_logging"}, "project")
    _refused({**base, "payload": "xml"}, "payload")
    _refused({**base, "labels": {"tenant": "x"}}, "labels")
    _refused({**base, "credentials": '{"private_key": "hunter2"}'}, "credentials")
    _refused({**base, "private_key": "hunter2"}, "private_key")
    _refused({**base, "max_batch": 5000}, "max_batch")
    not_a_key = tmp_path / "sa.json"
    not_a_key.write_text('{"type": "service_account", "private_key": "hunter2"}')
    with pytest.raises(ConfigurationError) as info:
        build_sink({**base, "credentials": f"file:{not_a_key}"})
    assert "credentials" in str(info.value) and "hunter2" not in str(info.value)
    with pytest.raises(ConfigurationError, match="allowlist"):
        build_sink(base, SinkEnv(policy=NetworkPolicy(allowed_hosts=frozenset({"x.example"}))))


# -- azure_monitor -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dce() -> Iterator[Any]:
    from tests.audit._azure_dce import DceServer

    server = DceServer().start()
    yield server
    server.close()


def _az_spec(dce: Any, **extra: Any) -> dict[str, Any]:
    from tests.audit._azure_dce import CLIENT_ID, RULE, STREAM, TENANT

    return {
        "kind": "azure_monitor",
        "endpoint": dce.url,
        "rule_id": RULE,
        "stream_name": STREAM,
        "tenant_id": TENANT,
        "client_id": CLIENT_ID,
        "client_secret": "env:CMK_TEST_AZ_SECRET",
        "authority_host": dce.url,
        "timeout": 5,
        **extra,
    }


@pytest.fixture
def az_env(dce: Any, monkeypatch: pytest.MonkeyPatch) -> SinkEnv:
    from tests.audit._azure_dce import CLIENT_SECRET

    monkeypatch.setenv("CMK_TEST_AZ_SECRET", CLIENT_SECRET)
    # The sink's own client and ClientSecretCredential, trusting the local CA; instance
    # discovery off because the authority is not one Entra knows.
    return SinkEnv(
        policy=LOOPBACK,
        clients={
            "azure_monitor": {
                "connection_verify": dce.ca_file,
                "disable_instance_discovery": True,
            }
        },
    )


def _az_rows(dce: Any, tenant: str) -> list[dict[str, Any]]:
    with dce.lock:
        return [r for r in dce.rows if r["Tenant"] == tenant]


def test_azure_rows_arrive_intact_and_in_order(dce: Any, az_env: SinkEnv) -> None:
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    sink = build_sink(_az_spec(dce), az_env)
    assert isinstance(sink, Sink) and (sink.kind, sink.max_batch) == ("azure_monitor", 500)
    records = _records(40, tenant=tenant)
    try:
        sink.send(records[:15])
        sink.send(records[15:])
    finally:
        sink.close()
    rows = _az_rows(dce, tenant)
    assert [r["Body"].encode() for r in rows] == [r.body for r in records]
    assert [r["EventId"] for r in rows] == [r.id for r in records]
    assert rows[0]["Severity"] == "info" and rows[2]["Severity"] == "warning"
    assert rows[0]["TimeGenerated"].endswith("Z")
    # The token came from the secret the reference names, for the ingestion scope.
    assert dce.token_requests[-1].startswith("https://monitor.azure.com")


@pytest.mark.parametrize(
    ("status", "headers", "retryable", "retry_after"),
    [
        (429, {"Retry-After": "7"}, True, 7.0),
        (503, {}, True, None),
        (500, {}, True, None),
        (403, {}, False, None),
        (400, {}, False, None),
    ],
)
def test_azure_failures(
    dce: Any,
    az_env: SinkEnv,
    status: int,
    headers: dict[str, str],
    retryable: bool,
    retry_after: float | None,
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    sink = build_sink(_az_spec(dce), az_env)
    dce.faults.append((status, headers))
    with pytest.raises(DeliveryError) as info:
        sink.send(_records(2, tenant=tenant))
    assert (info.value.retryable, info.value.retry_after) == (retryable, retry_after)
    records = _records(2, tenant=tenant)
    sink.send(records)  # the SDK did not retry: the fault took one call
    sink.close()
    assert [r["EventId"] for r in _az_rows(dce, tenant)] == ["ev-0", "ev-1"]


def test_azure_wrong_rule_stream_or_secret_is_not_retryable(
    dce: Any, az_env: SinkEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    for spec in (
        _az_spec(dce, rule_id="dcr-" + "f" * 32),  # no role on it: 403
        _az_spec(dce, stream_name="Custom-Other"),  # not declared: 400
    ):
        sink = build_sink(spec, az_env)
        with pytest.raises(DeliveryError) as info:
            sink.send(_records(1))
        assert not info.value.retryable
        sink.close()
    monkeypatch.setenv("CMK_TEST_AZ_SECRET", "a-wrong-secret")
    sink = build_sink(_az_spec(dce), az_env)
    with pytest.raises(DeliveryError) as info:
        sink.send(_records(1))
    assert not info.value.retryable and "a-wrong-secret" not in str(info.value)
    sink.close()


def test_azure_injected_client_and_down_then_up(dce: Any) -> None:
    from azure.monitor.ingestion import LogsIngestionClient

    from sqlalchemy_cmk.testing.azure_keyvault import StaticTokenCredential

    client = LogsIngestionClient(
        endpoint=dce.url,
        credential=StaticTokenCredential(dce.token),
        connection_verify=dce.ca_file,
        retry_total=0,
        connection_timeout=2,
    )
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    sink = build_sink(
        {
            k: v
            for k, v in _az_spec(dce).items()
            if k not in ("tenant_id", "client_id", "client_secret")
        },
        SinkEnv(policy=LOOPBACK, clients={"azure_monitor": client}),
    )
    records = _records(4, tenant=tenant)
    sink.send(records[:2])
    dce.stop()
    try:
        with pytest.raises(DeliveryError) as info:
            sink.send(records[2:])
        assert info.value.retryable
    finally:
        dce.start()
    sink.send(records[2:])
    sink.close()
    client.close()
    assert [r["EventId"] for r in _az_rows(dce, tenant)] == [r.id for r in records]


def test_azure_check_and_policy(dce: Any) -> None:
    from tests.audit._azure_dce import RULE

    base = {
        "kind": "azure_monitor",
        "endpoint": "https://acme-dce.westeurope-1.ingest.monitor.azure.com/",
        "rule_id": RULE,
        "stream_name": "Custom-CmkAudit",
    }
    assert check_destination(base) == {
        **base,
        "endpoint": base["endpoint"].rstrip("/"),
        "timeout": 10.0,
        "max_batch": 500,
    }
    for field in ("endpoint", "rule_id", "stream_name"):
        _refused({k: v for k, v in base.items() if k != field}, field)
    _refused({**base, "endpoint": "http://dce.example"}, "endpoint")
    _refused({**base, "client_secret": "hunter2"}, "client_secret")
    sp = {
        **base,
        "tenant_id": "72f988bf-86f1-41af-91ab-2d7cd011db47",
        "client_id": "0b2c3d4e-0000-4000-8000-00000000c0de",
    }
    _refused({**sp, "client_secret": "hunter2"}, "client_secret")
    _refused({**base, "client_secret": "env:X"}, "client_secret")
    _refused({**base, "tenant_id": sp["tenant_id"]}, "tenant_id")
    _refused({**base, "rule_id": "dcr-XYZ"}, "rule_id")
    spec = {**base, "endpoint": dce.url}
    with pytest.raises(ConfigurationError, match="non-public"):
        build_sink(spec)
    with pytest.raises(ConfigurationError, match="allowlist"):
        build_sink(spec, SinkEnv(policy=NetworkPolicy(allowed_hosts=frozenset({"*.azure.com"}))))
    with pytest.raises(ConfigurationError, match="CMK_TEST_UNSET"):
        build_sink(
            {**sp, "endpoint": dce.url, "client_secret": "env:CMK_TEST_UNSET"},
            SinkEnv(policy=LOOPBACK),
        )


def test_gcp_builds_its_client_from_a_key_reference(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    sa = tmp_path / "writer.json"
    sa.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "operator-prod",
                "private_key_id": "0" * 40,
                "private_key": pem,
                "client_email": "cmk-audit@operator-prod.iam.gserviceaccount.com",
                "client_id": "1" * 21,
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    # Built offline: the client connects (and the key signs a token request) on first send.
    sink = build_sink(
        {"kind": "gcp_logging", "project": "acme-audit", "credentials": f"file:{sa}"},
        SinkEnv(policy=NetworkPolicy(allowed_hosts=frozenset({"*.googleapis.com"}))),
    )
    try:
        credentials = sink._client.transport._credentials  # type: ignore[attr-defined]
        assert credentials.service_account_email.startswith("cmk-audit@")
        assert list(credentials.scopes) == ["https://www.googleapis.com/auth/logging.write"]
    finally:
        sink.close()


@pytest.mark.parametrize(
    ("kind", "module", "extra"),
    [
        ("cloudwatch", "boto3", "audit-aws"),
        ("gcp_logging", "google.api_core", "audit-gcp"),  # its first import
        ("azure_monitor", "azure.monitor.ingestion", "audit-azure"),
        ("azure_monitor", "azure.identity", "audit-azure"),
    ],
)
def test_a_missing_extra_is_named(
    monkeypatch: pytest.MonkeyPatch, kind: str, module: str, extra: str
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    monkeypatch.delitem(sys.modules, f"sqlalchemy_cmk.sinks.{kind}", raising=False)
    with pytest.raises(ConfigurationError, match=f"sqlalchemy-cmk\\[{extra}\\]"):
        check_destination({"kind": kind})
