"""The HTTP audit sinks (webhook, Splunk HEC, OTLP/HTTP) against real receivers on loopback,
over real TLS (a CA made for the test, trusted through the spec's ``ca_file``).

Each receiver speaks its protocol: the webhook receiver verifies signatures with the docs'
recipe, the HEC receiver checks the token and parses concatenated events, the OTLP receiver
decodes ``ExportLogsServiceRequest``. Faults are the receivers' scripted answers.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sqlalchemy_cmk.audit import make_event
from sqlalchemy_cmk.context import TenantContext
from sqlalchemy_cmk.delivery import AuditDelivery, TenantAudit
from sqlalchemy_cmk.errors import ConfigurationError, DeliveryError
from sqlalchemy_cmk.sinks import (
    NetworkPolicy,
    Record,
    Sink,
    SinkEnv,
    build_sink,
    check_destination,
    splunk,
)
from sqlalchemy_cmk.sinks._http import HttpsClient
from sqlalchemy_cmk.sinks.webhook import public_key_id

from .receivers_http import (
    HecAck,
    Pki,
    Receiver,
    Request,
    docs_verifier,
    hec_handler,
    make_pki,
    otlp_handler,
    receiver,
    webhook_handler,
)

HMAC_KEY = "whsec-test-" + "k" * 40
HEC_TOKEN = "11111111-2222-3333-4444-555555555555"
OTLP_AUTH = "Bearer otlp-secret-token-0123456789"
SECRETS = (HMAC_KEY, HEC_TOKEN, OTLP_AUTH, "otlp-secret-token")
LOOPBACK = NetworkPolicy(allow_private=True)
KINDS = ["webhook", "splunk_hec", "otlp_http"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_WEBHOOK_KEY", HMAC_KEY)
    monkeypatch.setenv("T_HEC_TOKEN", HEC_TOKEN)
    monkeypatch.setenv("T_OTLP_AUTH", OTLP_AUTH)


def records(n: int, tenant: str = "acme", start: int = 0) -> list[Record]:
    """Records whose bodies are canonical JSON with non-ASCII text and escapes: they must
    arrive byte for byte."""
    out = []
    for i in range(start, start + n):
        rid = f"01JTEST{i:019d}"
        body = {
            "id": rid,
            "tenant": tenant,
            "op": "decrypt",
            "outcome": "ok" if i % 3 else "tampered",
            "actor": 'Zoë \u2028 "quoted" \\ tab\t',
            "rows": i,
        }
        out.append(
            Record(
                id=rid,
                tenant=tenant,
                time_ns=1_764_763_200_123_456_789 + i * 1_000_000_007,
                severity="info" if i % 3 else "warning",
                body=json.dumps(
                    body, sort_keys=True, separators=(",", ":"), ensure_ascii=False
                ).encode(),
            )
        )
    return out


def spec(kind: str, url: str, pki: Pki, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"kind": kind, "url": url, "ca_file": str(pki.ca_file), "timeout": 5}
    if kind == "webhook":
        base["signing"] = {"alg": "hmac-sha256", "key": "env:T_WEBHOOK_KEY", "key_id": "acme-1"}
    elif kind == "splunk_hec":
        base["token"] = "env:T_HEC_TOKEN"
    else:
        base["headers"] = {"Authorization": "env:T_OTLP_AUTH"}
    base.update(extra)
    return base


def path_of(kind: str) -> str:
    return {"webhook": "/hook", "splunk_hec": "", "otlp_http": ""}[kind]


@pytest.fixture
def rx(pki: Pki) -> Iterator[Receiver]:
    yield from receiver(pki)


@pytest.fixture
def rx2(pki: Pki) -> Iterator[Receiver]:
    yield from receiver(pki)


def no_secret(exc: BaseException) -> None:
    text = f"{exc} {exc!r}"
    for s in SECRETS:
        assert s not in text
    assert "Zo\u00eb" not in text and "decrypt" not in text  # no event body either


# -- webhook --------------------------------------------------------------------------------


def test_webhook_hmac_batches_arrive_verified_in_order_byte_identical(rx: Receiver, pki: Pki):
    stored: list[bytes] = []
    rx.handler = webhook_handler({"acme-1": HMAC_KEY.encode()}, stored)
    sink = build_sink(spec("webhook", rx.url("/hook?src=cmk"), pki), SinkEnv(policy=LOOPBACK))
    assert isinstance(sink, Sink) and sink.kind == "webhook"
    recs = records(7)
    for batch in (recs[:3], recs[3:4], recs[4:]):
        sink.send(batch)
    sink.send([])  # nothing to send: no request
    sink.close()
    assert stored == [r.body for r in recs]
    assert [json.loads(b)["id"] for b in stored] == [r.id for r in recs]
    assert [q.path for q in rx.requests] == ["/hook?src=cmk"] * 3
    first = rx.requests[0]
    assert first.headers["content-type"] == "application/json"
    assert first.headers["cmk-tenant"] == "acme"
    assert first.headers["cmk-event-count"] == "3"
    assert first.headers["cmk-signature"].startswith("t=")
    assert ",kid=acme-1,v1=" in first.headers["cmk-signature"]


def test_webhook_ed25519_verified_with_the_public_key_only(rx: Receiver, pki: Pki, tmp_path):
    private = Ed25519PrivateKey.generate()
    pem = tmp_path / "acme-webhook.pem"
    pem.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # The tenant holds only the public key, and computes the default key id from it.
    public = serialization.load_pem_public_key(public_pem)
    kid = public_key_id(private.public_key().public_bytes_raw())
    stored: list[bytes] = []
    rx.handler = webhook_handler({kid: public}, stored)
    s = spec("webhook", rx.url("/hook"), pki)
    s["signing"] = {"alg": "ed25519", "private_key": f"file:{pem}"}
    sink = build_sink(s, SinkEnv(policy=LOOPBACK))
    recs = records(5)
    sink.send(recs[:2])
    sink.send(recs[2:])
    assert stored == [r.body for r in recs]
    assert f"kid={kid},v1-ed25519=" in rx.requests[0].headers["cmk-signature"]


def test_webhook_signed_with_another_key_is_rejected_by_the_receiver(rx: Receiver, pki: Pki):
    stored: list[bytes] = []
    rx.handler = webhook_handler({"acme-1": b"the-tenants-key-" + b"x" * 32}, stored)
    sink = build_sink(spec("webhook", rx.url("/hook"), pki), SinkEnv(policy=LOOPBACK))
    with pytest.raises(DeliveryError) as err:
        sink.send(records(2))
    assert not err.value.retryable and "401" in str(err.value)
    assert stored == [] and len(rx.requests) == 1
    no_secret(err.value)


def test_the_docs_recipe_refuses_replays_and_edits(rx: Receiver, pki: Pki):
    sink = build_sink(spec("webhook", rx.url("/hook"), pki), SinkEnv(policy=LOOPBACK))
    sink.send(records(2))
    req = rx.requests[0]
    verify = docs_verifier()
    keys = {"acme-1": HMAC_KEY.encode()}
    sig = req.headers["cmk-signature"]
    t = int(sig.split(",")[0].removeprefix("t="))
    assert len(verify(sig, req.body, keys, now=t + 299)) == 2
    for bad in (
        lambda: verify(sig, req.body, keys, now=t + 301),  # replayed later
        lambda: verify(sig, req.body.replace(b"tampered", b"ok"), keys, now=t),
        lambda: verify(sig.replace(f"t={t}", f"t={t + 1}"), req.body, keys, now=t),
        lambda: verify(sig.replace("kid=acme-1", "kid=other"), req.body, keys, now=t),
        lambda: verify("", req.body, keys, now=t),
    ):
        with pytest.raises(ValueError):
            bad()


def test_webhook_check_and_build_refuse_bad_signing(pki: Pki, monkeypatch):
    url = "https://siem.example/hook"
    bad: list[tuple[dict[str, Any], str]] = [
        ({}, "'signing' is required"),
        ({"alg": "rsa", "key": "env:X"}, "signing.alg"),
        ({"alg": "hmac-sha256", "key": HMAC_KEY}, "secret reference"),
        ({"alg": "ed25519", "key": "env:X"}, "signing.private_key"),
        ({"alg": "hmac-sha256", "key": "env:X", "key_id": "a,b"}, "key_id"),
    ]
    for signing, words in bad:
        s = {"kind": "webhook", "url": url, **({"signing": signing} if signing else {})}
        with pytest.raises(ConfigurationError, match=words) as err:
            check_destination(s)
        no_secret(err.value)
    monkeypatch.setenv("T_SHORT", "short-key")
    s = {"kind": "webhook", "url": url, "signing": {"alg": "hmac-sha256", "key": "env:T_SHORT"}}
    with pytest.raises(ConfigurationError, match="shorter than 32 bytes") as err:
        build_sink(s)
    assert "short-key" not in str(err.value)


# -- Splunk HEC -----------------------------------------------------------------------------


def test_hec_events_arrive_with_token_metadata_and_exact_bodies(rx: Receiver, pki: Pki):
    stored: list[dict[str, Any]] = []
    raw: list[bytes] = []
    rx.handler = hec_handler(HEC_TOKEN, stored, raw)
    s = spec("splunk_hec", rx.url(""), pki, index="cmk_audit", host="app-1")
    assert check_destination(s)["url"].endswith("/services/collector/event")
    sink = build_sink(s, SinkEnv(policy=LOOPBACK))
    recs = records(6)
    sink.send(recs[:4])
    sink.send(recs[4:])
    assert raw == [r.body for r in recs]
    assert [e["event"]["id"] for e in stored] == [r.id for r in recs]
    first = stored[0]
    assert first["source"] == "sqlalchemy-cmk" and first["sourcetype"] == "sqlalchemy_cmk:audit"
    assert first["index"] == "cmk_audit" and first["host"] == "app-1"
    assert first["time"] == pytest.approx(recs[0].time_ns / 1e9, abs=1e-6)
    assert rx.requests[0].headers["authorization"] == f"Splunk {HEC_TOKEN}"


def test_hec_wrong_token_is_not_retryable_and_names_hecs_code(rx: Receiver, pki: Pki):
    rx.handler = hec_handler("another-token", [], [])
    sink = build_sink(spec("splunk_hec", rx.url(""), pki), SinkEnv(policy=LOOPBACK))
    with pytest.raises(DeliveryError) as err:
        sink.send(records(1))
    assert not err.value.retryable
    assert "403" in str(err.value) and "HEC code 4: invalid token" in str(err.value)
    no_secret(err.value)


# -- OTLP/HTTP ------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_otlp_log_records_decode_with_body_time_severity_and_ids(
    rx: Receiver, pki: Pki, monkeypatch, compression: str
):
    # The application's own collector settings must not leak to a tenant's collector.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-app-secret=app-collector-token")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_HEADERS", "x-app-secret=app-collector-token")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.secret=internal")
    stored: list[Any] = []
    rx.handler = otlp_handler({"Authorization": OTLP_AUTH}, stored)
    s = spec("otlp_http", rx.url(""), pki, compression=compression, service_name="acme-app")
    sink = build_sink(s, SinkEnv(policy=LOOPBACK))
    recs = records(5)
    sink.send(recs[:3])
    sink.send(recs[3:])
    sink.close()
    assert len(rx.requests) == 2
    assert all("x-app-secret" not in q.headers for q in rx.requests)
    assert [lr.body.string_value.encode() for _, _, lr in stored] == [r.body for r in recs]
    for (resource, scope, lr), r in zip(stored, recs, strict=True):
        attrs = {a.key: a.value.string_value for a in lr.attributes}
        assert attrs == {"cmk.event.id": r.id, "cmk.tenant": "acme"}
        assert lr.time_unix_nano == r.time_ns
        assert lr.severity_text == ("INFO" if r.severity == "info" else "WARN")
        assert lr.event_name == "sqlalchemy_cmk.audit"
        assert scope.name == "sqlalchemy_cmk.audit"
        res = {a.key: a.value.string_value for a in resource.attributes}
        assert res == {"service.name": "acme-app"}


def test_otlp_missing_auth_is_not_retryable(rx: Receiver, pki: Pki):
    rx.handler = otlp_handler({"Authorization": "Bearer something-else"}, [])
    sink = build_sink(spec("otlp_http", rx.url(""), pki), SinkEnv(policy=LOOPBACK))
    with pytest.raises(DeliveryError) as err:
        sink.send(records(1))
    assert not err.value.retryable and "401" in str(err.value)
    no_secret(err.value)


def test_otlp_header_values_must_be_references(pki: Pki):
    with pytest.raises(ConfigurationError, match="secret reference") as err:
        check_destination(spec("otlp_http", "https://o.example", pki, headers={"A": OTLP_AUTH}))
    no_secret(err.value)
    with pytest.raises(ConfigurationError, match="set by the sink"):
        check_destination(spec("otlp_http", "https://o.example", pki, headers={"Host": "env:X"}))


# -- what all three share -------------------------------------------------------------------


def handler_for(kind: str) -> Any:
    if kind == "webhook":
        return webhook_handler({"acme-1": HMAC_KEY.encode()}, [])
    if kind == "splunk_hec":
        return hec_handler(HEC_TOKEN, [], [])
    return otlp_handler({"Authorization": OTLP_AUTH}, [])


@pytest.mark.parametrize("kind", KINDS)
def test_host_and_sni_are_the_name_while_the_checked_address_is_dialled(
    kind: str, rx: Receiver, pki: Pki
):
    rx.handler = handler_for(kind)
    url = rx.url(path_of(kind), host="localhost")
    build_sink(spec(kind, url, pki), SinkEnv(policy=LOOPBACK)).send(records(1))
    (req,) = rx.requests
    assert req.sni == "localhost"
    assert req.headers["host"] == f"localhost:{rx.port}"


class PinnedDns(NetworkPolicy):
    """A policy whose DNS answers siem.test with 127.0.0.1 (no real resolver knows the name)."""

    def resolve(
        self, host: str, port: int, *, what: str = "destination host", timeout: float = 10.0
    ) -> list[str]:
        self.check_host(host, what=what)
        assert host == "siem.test"
        return ["127.0.0.1"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_address_the_policy_returned_is_dialled_not_the_name(kind: str, rx: Receiver, pki: Pki):
    rx.handler = handler_for(kind)
    policy = PinnedDns(allowed_hosts=frozenset({"siem.test"}), allow_private=True)
    url = rx.url(path_of(kind), host="siem.test")
    build_sink(spec(kind, url, pki), SinkEnv(policy=policy)).send(records(1))
    (req,) = rx.requests
    assert req.sni == "siem.test" and req.headers["host"] == f"siem.test:{rx.port}"


@pytest.mark.parametrize("kind", KINDS)
def test_a_redirect_is_not_followed(kind: str, rx: Receiver, rx2: Receiver, pki: Pki):
    rx2.handler = handler_for(kind)
    elsewhere = {"Location": rx2.url(path_of(kind) or "/")}
    rx.script = [(302, elsewhere, b""), (307, elsewhere, b"")]
    sink = build_sink(spec(kind, rx.url(path_of(kind)), pki), SinkEnv(policy=LOOPBACK))
    for status in ("302", "307"):
        with pytest.raises(DeliveryError, match=f"answered {status}.*not followed") as err:
            sink.send(records(2))
        assert not err.value.retryable
        no_secret(err.value)
    assert len(rx.requests) == 2
    assert rx2.requests == []


@pytest.mark.parametrize("kind", KINDS)
def test_503_is_retryable_with_retry_after_then_200_delivers(kind: str, rx: Receiver, pki: Pki):
    rx.handler = handler_for(kind)
    busy = b'{"text":"Server is busy","code":9}' if kind == "splunk_hec" else b""
    rx.script = [(503, {"Retry-After": "7"}, busy), (429, {}, b"")]
    sink = build_sink(spec(kind, rx.url(path_of(kind)), pki), SinkEnv(policy=LOOPBACK))
    batch = records(3)
    with pytest.raises(DeliveryError) as err:
        sink.send(batch)
    assert err.value.retryable and err.value.retry_after == 7
    if kind == "splunk_hec":
        assert "HEC code 9: server is busy" in str(err.value)
    with pytest.raises(DeliveryError) as err:
        sink.send(batch)
    assert err.value.retryable and err.value.retry_after is None
    sink.send(batch)
    assert len(rx.requests) == 3
    if kind != "otlp_http":  # OTLP's observed_timestamp differs between attempts
        assert rx.requests[0].body == rx.requests[2].body


@pytest.mark.parametrize("kind", KINDS)
def test_400_is_not_retryable(kind: str, rx: Receiver, pki: Pki):
    said = b'{"text":"Invalid data format","code":6}' if kind == "splunk_hec" else b"nope"
    rx.script = [(400, {"Retry-After": "3"}, said)]
    sink = build_sink(spec(kind, rx.url(path_of(kind)), pki), SinkEnv(policy=LOOPBACK))
    with pytest.raises(DeliveryError, match="answered 400") as err:
        sink.send(records(1))
    assert not err.value.retryable
    no_secret(err.value)


@pytest.mark.parametrize("kind", KINDS)
def test_a_receiver_that_hangs_times_out_retryably(kind: str, rx: Receiver, pki: Pki):
    rx.script = ["hang"]
    s = spec(kind, rx.url(path_of(kind)), pki, timeout=0.4)
    sink = build_sink(s, SinkEnv(policy=LOOPBACK))
    started = time.monotonic()
    with pytest.raises(DeliveryError, match=r"did not answer within 0\.4 s") as err:
        sink.send(records(1))
    elapsed = time.monotonic() - started
    assert err.value.retryable and 0.35 < elapsed < 1.5
    assert len(rx.requests) == 1


def test_a_trickling_receiver_is_cut_at_the_deadline(pki: Pki):
    # Headers one byte at a time, each well within a socket timeout: only the deadline stops it.
    import socket
    import ssl
    import threading

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.cert_file, pki.key_file)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
                if stop.wait(0.05):
                    return
                tls.sendall(bytes([byte]))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    s = spec("webhook", f"https://127.0.0.1:{port}/hook", pki, timeout=0.5)
    sink = build_sink(s, SinkEnv(policy=LOOPBACK))
    started = time.monotonic()
    try:
        with pytest.raises(DeliveryError, match="did not answer") as err:
            sink.send(records(1))
    finally:
        stop.set()
        thread.join(2)
        listener.close()
    assert err.value.retryable and time.monotonic() - started < 1.5


@pytest.mark.parametrize("kind", KINDS)
def test_network_and_tls_failures_are_retryable(kind: str, rx: Receiver, pki: Pki, tmp_path):
    # Nobody listening.
    port = rx.port
    rx.close()
    s = spec(kind, f"https://127.0.0.1:{port}{path_of(kind)}", pki)
    with pytest.raises(DeliveryError, match="network error") as err:
        build_sink(s, SinkEnv(policy=LOOPBACK)).send(records(1))
    assert err.value.retryable
    no_secret(err.value)


@pytest.mark.parametrize("kind", KINDS)
def test_an_untrusted_certificate_is_refused(kind: str, rx: Receiver, pki: Pki, tmp_path):
    other = make_pki(tmp_path)  # another CA: the receiver's certificate is not signed by it
    s = spec(kind, rx.url(path_of(kind)), pki, ca_file=str(other.ca_file))
    with pytest.raises(DeliveryError, match="TLS certificate not trusted"):
        build_sink(s, SinkEnv(policy=LOOPBACK)).send(records(1))
    assert rx.requests == []


@pytest.mark.parametrize("kind", KINDS)
def test_the_network_policy_is_enforced_at_check_build_and_send(kind: str, rx: Receiver, pki: Pki):
    path = path_of(kind)
    # check: https only, no credentials in the URL.
    for url, words in (
        (f"http://127.0.0.1:{rx.port}{path}", "must be an https:// URL"),
        (f"https://user:pw@127.0.0.1:{rx.port}{path}", "carries credentials"),
    ):
        with pytest.raises(ConfigurationError, match=words):
            check_destination(spec(kind, url, pki))
    # build: a host the allowlist does not name.
    allow = NetworkPolicy(allowed_hosts=frozenset({"siem.example"}), allow_private=True)
    with pytest.raises(ConfigurationError, match="not in the allowlist"):
        build_sink(spec(kind, rx.url(path), pki), SinkEnv(policy=allow))
    # send: loopback without allow_private (the address is only known once resolved).
    sink = build_sink(spec(kind, rx.url(path, host="localhost"), pki), SinkEnv())
    with pytest.raises(DeliveryError, match="non-public address") as err:
        sink.send(records(1))
    assert not err.value.retryable
    assert rx.requests == []


@pytest.mark.parametrize("kind", KINDS)
def test_check_names_the_field(kind: str, pki: Pki):
    url = "https://siem.example/x"
    for extra, words in (
        ({"timeout": 0}, "'timeout'"),
        ({"timeout": "5"}, "'timeout'"),
        ({"max_batch": 0}, "'max_batch'"),
        ({"max_batch": 10**6}, "'max_batch'"),
        ({"color": "red"}, "unknown field"),
        ({"url": "https://siem.example/x#frag"}, "#fragment"),
    ):
        with pytest.raises(ConfigurationError, match=words):
            check_destination({**spec(kind, url, pki), **extra})
    checked = check_destination(spec(kind, url, pki))
    assert check_destination(checked) == checked  # normalising twice changes nothing


def test_unresolvable_secret_reference_names_the_reference_only(pki: Pki):
    s = spec("splunk_hec", "https://hec.example", pki, token="env:T_NOT_SET")
    with pytest.raises(ConfigurationError, match="env:T_NOT_SET"):
        build_sink(s, SinkEnv(policy=LOOPBACK))


def test_file_references_and_ca_file_errors(pki: Pki, tmp_path: Path):
    token = tmp_path / "hec-token"
    token.write_text(HEC_TOKEN + "\n")
    s = spec("splunk_hec", "https://hec.example", pki, token=f"file:{token}")
    assert build_sink(s, SinkEnv(policy=LOOPBACK)).kind == "splunk_hec"
    s = spec("splunk_hec", "https://hec.example", pki, ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigurationError, match="cannot load ca_file"):
        build_sink(s, SinkEnv(policy=LOOPBACK))


# -- Splunk HEC indexer acknowledgement -----------------------------------------------------


class FakeTime:
    """The sink's clock and sleep: each wait moves the clock instead of the test waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def hec_ack_sink(
    url: str, pki: Pki, t: FakeTime, policy: NetworkPolicy = LOOPBACK, **extra: Any
) -> splunk.SplunkHecSink:
    checked = check_destination(spec("splunk_hec", url, pki, ack=True, **extra))
    return splunk.build(checked, SinkEnv(policy=policy), clock=t.clock, sleep=t.sleep)


def test_hec_ack_a_batch_is_delivered_only_once_the_indexers_acknowledge_it(rx: Receiver, pki: Pki):
    stored: list[dict[str, Any]] = []
    raw: list[bytes] = []
    ack = HecAck(after=3)
    rx.handler = hec_handler(HEC_TOKEN, stored, raw, ack)
    t = FakeTime()
    sink = hec_ack_sink(rx.url(""), pki, t)
    recs = records(5)
    sink.send(recs[:3])
    # Returned only after the third poll said true: two "not yet" before it.
    assert ack.polls == [
        (sink.channel, 0, False),
        (sink.channel, 0, False),
        (sink.channel, 0, True),
    ]
    sink.send(recs[3:])
    assert [p[2] for p in ack.polls[3:]] == [False, False, True]
    assert [p[1] for p in ack.polls[3:]] == [1, 1, 1]
    assert raw == [r.body for r in recs]
    event, poll = "/services/collector/event", "/services/collector/ack"
    assert [q.path for q in rx.requests] == [event, poll, poll, poll] * 2
    assert [json.loads(q.body) for q in rx.requests if q.path == poll] == [{"acks": [0]}] * 3 + [
        {"acks": [1]}
    ] * 3
    # One channel, a random UUID, on every request; the same token on every request.
    assert str(uuid.UUID(sink.channel)) == sink.channel
    assert {q.headers["x-splunk-request-channel"] for q in rx.requests} == {sink.channel}
    assert {q.headers["authorization"] for q in rx.requests} == {f"Splunk {HEC_TOKEN}"}
    # Growing waits between polls, the first short.
    assert t.waits == [0.25, 0.5, 1.0] * 2
    # Another sink (a rebuilt one) opens another channel.
    other = hec_ack_sink(rx.url(""), pki, t)
    other.send(records(1))
    assert other.channel != sink.channel and ack.channels[-1] == other.channel


def test_hec_ack_polls_grow_to_ten_seconds_and_stop_at_ack_timeout_retryably(
    rx: Receiver, pki: Pki
):
    ack = HecAck(after=None)  # the indexers never acknowledge
    stored: list[dict[str, Any]] = []
    rx.handler = hec_handler(HEC_TOKEN, stored, [], ack)
    t = FakeTime()
    sink = hec_ack_sink(rx.url(""), pki, t, ack_timeout=45)
    with pytest.raises(DeliveryError) as err:
        sink.send(records(2))
    assert err.value.retryable
    assert "did not acknowledge within 45 s" in str(err.value) and "ackId 0" in str(err.value)
    no_secret(err.value)
    # HEC took the events, but they are not delivered until indexed: the send failed.
    assert len(stored) == 2
    assert t.waits[:7] == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0]
    assert max(t.waits) == 10.0
    # The deadline is kept to the poll: the last one is at 45 s, none after it.
    assert sum(t.waits) == pytest.approx(45.0)
    assert len(ack.polls) == len(t.waits) and not any(p[2] for p in ack.polls)


def test_hec_ack_polls_again_through_a_busy_or_failing_ack_endpoint(rx: Receiver, pki: Pki):
    ack = HecAck(after=2)
    inner = hec_handler(HEC_TOKEN, [], [], ack)
    polls = 0

    def handler(req: Request) -> Any:
        nonlocal polls
        if req.path.endswith("/ack"):
            polls += 1
            if polls == 1:  # HEC busy: the ackId is still pending, asked again after 3 s
                return 503, {"Retry-After": "3"}, b'{"text":"Server is busy","code":9}'
            if polls == 2:  # not HEC's answer (a proxy's page): asked again
                return 200, {}, b"<html>maintenance</html>"
        return inner(req)

    rx.handler = handler
    t = FakeTime()
    hec_ack_sink(rx.url(""), pki, t, ack_timeout=30).send(records(1))
    assert t.waits == [0.25, 3.0, 6.0, 10.0]  # growing on from the wait HEC asked for
    assert [p[2] for p in ack.polls] == [False, True]


def test_hec_ack_disabled_on_the_token_is_not_retryable_and_names_code_14(rx: Receiver, pki: Pki):
    ack = HecAck(enabled=False)
    stored: list[dict[str, Any]] = []
    rx.handler = hec_handler(HEC_TOKEN, stored, [], ack)
    t = FakeTime()
    sink = hec_ack_sink(rx.url(""), pki, t)
    with pytest.raises(DeliveryError) as err:
        sink.send(records(2))
    assert not err.value.retryable
    text = str(err.value)
    assert "HEC code 14: ACK is disabled" in text
    assert "turn it on for the token" in text and 'remove "ack"' in text
    no_secret(err.value)
    assert [q.path for q in rx.requests] == ["/services/collector/event", "/services/collector/ack"]


def test_hec_ack_an_answer_without_an_ack_id_is_not_taken_for_delivered(rx: Receiver, pki: Pki):
    # A 200 without an ackId although the ack endpoint works (a proxy's, or a HEC look-alike's):
    # nothing confirms that the batch is indexed.
    rx.handler = hec_handler(HEC_TOKEN, [], [], HecAck())
    rx.script = [(200, {}, b'{"text":"Success","code":0}')]
    with pytest.raises(DeliveryError, match="took the batch without an ackId") as err:
        hec_ack_sink(rx.url(""), pki, FakeTime()).send(records(1))
    assert not err.value.retryable
    assert "turn it on for the token" in str(err.value)


def test_hec_ack_turned_off_on_the_token_while_polling_is_not_retryable(rx: Receiver, pki: Pki):
    ack = HecAck(after=5)
    rx.handler = hec_handler(HEC_TOKEN, [], [], ack)
    t = FakeTime()
    sink = hec_ack_sink(rx.url(""), pki, t)

    def sleep(seconds: float) -> None:
        t.sleep(seconds)
        if len(t.waits) == 2:
            ack.enabled = False  # the Splunk admin unticks "Enable indexer acknowledgement"

    sink = splunk.build(
        check_destination(spec("splunk_hec", rx.url(""), pki, ack=True)),
        SinkEnv(policy=LOOPBACK),
        clock=t.clock,
        sleep=sleep,
    )
    with pytest.raises(DeliveryError, match="HEC code 14: ACK is disabled") as err:
        sink.send(records(1))
    assert not err.value.retryable and len(t.waits) == 2


def test_hec_token_with_ack_on_and_a_spec_without_it_names_code_10_and_the_fix(
    rx: Receiver, pki: Pki
):
    rx.handler = hec_handler(HEC_TOKEN, [], [], HecAck())
    sink = build_sink(spec("splunk_hec", rx.url(""), pki), SinkEnv(policy=LOOPBACK))
    with pytest.raises(DeliveryError) as err:
        sink.send(records(1))
    assert not err.value.retryable
    assert "HEC code 10: data channel is missing" in str(err.value)
    assert 'set "ack": true in the destination spec' in str(err.value)
    assert "x-splunk-request-channel" not in rx.requests[0].headers
    # With "ack", the same token takes the batch.
    t = FakeTime()
    hec_ack_sink(rx.url(""), pki, t).send(records(1))


def test_hec_refused_channel_names_code_11_and_is_not_retryable(rx: Receiver, pki: Pki):
    rx.script = [(400, {}, b'{"text":"Invalid data channel","code":11}')]
    sink = hec_ack_sink(rx.url(""), pki, FakeTime())
    with pytest.raises(DeliveryError) as err:
        sink.send(records(1))
    assert not err.value.retryable
    assert "HEC code 11: invalid data channel" in str(err.value)
    assert "X-Splunk-Request-Channel" in str(err.value)


class RebindingDns(NetworkPolicy):
    """siem.test is 127.0.0.1 for the first ``good`` look-ups, then 10.0.0.1 (refused: this
    policy allows loopback only), as a name the tenant re-points between requests would be."""

    good: int = 1
    lookups: list[str]

    def resolve(
        self, host: str, port: int, *, what: str = "destination host", timeout: float = 10.0
    ) -> list[str]:
        self.check_host(host, what=what)
        self.lookups.append(host)
        if len(self.lookups) <= self.good:
            return ["127.0.0.1"]
        raise ConfigurationError(f"{what} {host!r} resolves to the non-public address 10.0.0.1")


def rebinding(good: int) -> RebindingDns:
    policy = RebindingDns(allowed_hosts=frozenset({"siem.test"}), allow_private=True)
    object.__setattr__(policy, "good", good)
    object.__setattr__(policy, "lookups", [])
    return policy


def test_hec_ack_every_poll_goes_to_the_checked_origin_through_the_policy(rx: Receiver, pki: Pki):
    ack = HecAck(after=2)
    rx.handler = hec_handler(HEC_TOKEN, [], [], ack)
    policy = rebinding(good=100)
    sink = hec_ack_sink(rx.url("", host="siem.test"), pki, FakeTime(), policy=policy)
    sink.send(records(1))
    # The event POST and both polls: each looked up through the policy, dialled at the checked
    # address, with the name for SNI and Host.
    assert len(rx.requests) == 3 and policy.lookups == ["siem.test"] * 3
    assert {(q.sni, q.headers["host"]) for q in rx.requests} == {
        ("siem.test", f"siem.test:{rx.port}")
    }
    # The name re-pointed after the event POST: the poll is refused, not sent, not retried.
    policy = rebinding(good=1)
    sink = hec_ack_sink(rx.url("", host="siem.test"), pki, FakeTime(), policy=policy)
    with pytest.raises(DeliveryError, match="non-public address") as err:
        sink.send(records(1))
    assert not err.value.retryable
    assert len(rx.requests) == 4  # the event POST only


def test_hec_ack_a_redirect_from_the_ack_endpoint_is_not_followed(
    rx: Receiver, rx2: Receiver, pki: Pki
):
    ack = HecAck()
    inner = hec_handler(HEC_TOKEN, [], [], ack)
    rx2.handler = hec_handler(HEC_TOKEN, [], [], HecAck())

    def handler(req: Request) -> Any:
        if req.path.endswith("/ack"):
            return 307, {"Location": rx2.url("/services/collector/ack")}, b""
        return inner(req)

    rx.handler = handler
    with pytest.raises(DeliveryError, match=r"answered 307.*not followed") as err:
        hec_ack_sink(rx.url(""), pki, FakeTime()).send(records(1))
    assert not err.value.retryable
    no_secret(err.value)
    assert rx2.requests == [] and len(rx.requests) == 2


def test_hec_ack_endpoint_is_beside_the_event_endpoint_under_a_proxy_prefix(rx: Receiver, pki: Pki):
    ack = HecAck(after=1)
    inner = hec_handler(HEC_TOKEN, [], [], ack)

    def handler(req: Request) -> Any:
        assert req.path.startswith("/splunk/")
        path = req.path.removeprefix("/splunk").partition("?")[0]
        return inner(dataclasses.replace(req, path=path))

    rx.handler = handler
    url = rx.url("/splunk/services/collector/event?source=x")
    hec_ack_sink(url, pki, FakeTime()).send(records(1))
    assert [q.path for q in rx.requests] == [
        "/splunk/services/collector/event?source=x",
        "/splunk/services/collector/ack",
    ]


def test_hec_ack_polls_stay_on_the_indexer_a_load_balancer_cookie_names(rx: Receiver, pki: Pki):
    # Two indexers behind a balancer that keeps a client on one by a cookie (AWS's AWSALB): an
    # ack poll without it lands on the other indexer, which never acknowledges.
    ack = HecAck(after=2)
    indexer = hec_handler(HEC_TOKEN, [], [], ack)

    def balancer(req: Request) -> Any:
        cookie = req.headers.get("cookie")
        if req.path.endswith("/event"):
            status, headers, body = indexer(req)
            sticky = {
                "Set-Cookie": "AWSALB=idx-2; Expires=Tue, 01 Jan 2030 00:00:00 GMT; Path=/",
            }
            return status, {**headers, **sticky}, body
        if cookie != "AWSALB=idx-2":
            ids = json.loads(req.body)["acks"]
            return 200, {}, json.dumps({"acks": {str(i): False for i in ids}}).encode()
        return indexer(req)

    rx.handler = balancer
    t = FakeTime()
    sink = hec_ack_sink(rx.url(""), pki, t)
    sink.send(records(1))
    sink.send(records(1))
    assert [q.headers.get("cookie") for q in rx.requests] == [None] + ["AWSALB=idx-2"] * 5
    assert [p[2] for p in ack.polls] == [False, True] * 2


def test_hec_ack_keeps_only_well_formed_cookies_and_drops_expired_ones(rx: Receiver, pki: Pki):
    ack = HecAck(after=1)
    indexer = hec_handler(HEC_TOKEN, [], [], ack)
    set_cookies = iter(
        [
            [
                "a=1",
                "b=2; Path=/",
                "bad name=x",
                "c=has space",
                'd="quoted"',
                "e",
                "f=" + "x" * 5000,
            ],
            ["a=; Path=/", "b=2; Max-Age=0"],
            [],
        ]
    )

    def handler(req: Request) -> Any:
        status, headers, body = indexer(req)
        if req.path.endswith("/event"):
            return status, {**headers, "Set-Cookie": next(set_cookies)}, body
        return status, headers, body

    rx.handler = handler
    sink = hec_ack_sink(rx.url(""), pki, FakeTime())
    for _ in range(3):
        sink.send(records(1))
    kept = 'a=1; b=2; d="quoted"'
    assert [q.headers.get("cookie") for q in rx.requests] == [None, kept, kept, 'd="quoted"'] + [
        'd="quoted"'
    ] * 2


def test_a_request_path_must_stay_on_the_origin(pki: Pki):
    client = HttpsClient("https://127.0.0.1:9/x", policy=LOOPBACK, ca_file=str(pki.ca_file))
    for path in ("//elsewhere.example/x", "https://elsewhere.example/x", "x", "/a b", "/a\r\n"):
        with pytest.raises(ValueError, match="absolute path"):
            client.post(b"", {}, path=path)


def test_hec_ack_through_the_shipper_every_event_is_indexed_and_ids_remove_duplicates(
    rx: Receiver, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    # The indexers lose the first batch (its ackId is never acknowledged): the send times out,
    # the shipper sends the batch again, and the cursor moves only once a batch is indexed.
    stored: list[dict[str, Any]] = []
    ack = HecAck(after=1, never={0})
    rx.handler = hec_handler(HEC_TOKEN, stored, [], ack)
    dest = spec("splunk_hec", rx.url(""), pki, ack=True, ack_timeout=1, max_batch=10)
    delivery = AuditDelivery(
        tmp_path,
        {"acme": TenantAudit([dest])},
        network=LOOPBACK,
        poll=0.01,
        max_backoff=0.05,
    )
    try:
        ctx = TenantContext("acme", actor="a")
        for i in range(25):
            delivery.record(make_event(ctx, "decrypt", "ok", "acme", table="t", rows=i), ctx)
        assert delivery.flush(30)
        assert delivery.health()["tenants"]["acme"]["splunk_hec"]["failures"] >= 1
        assert "did not acknowledge within 1 s that it indexed the batch (ackId 0)" in caplog.text
    finally:
        delivery.close()
    uids = [e["event"]["metadata"]["uid"] for e in stored]
    assert len(uids) > 25  # the lost batch arrived twice
    unique = list(dict.fromkeys(uids))
    assert len(unique) == 25
    rows = {
        e["event"]["metadata"]["uid"]: e["event"]["resources"][0]["data"]["rows"] for e in stored
    }
    assert [rows[u] for u in unique] == list(range(25))
    # Every ackId but the lost one was acknowledged, each batch's before the next was sent.
    acked = [p[1] for p in ack.polls if p[2]]
    assert 0 not in acked and acked == sorted(acked) and len(acked) == len(ack.channels) - 1
