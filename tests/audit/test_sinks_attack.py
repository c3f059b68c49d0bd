"""Attacks on the sinks' contract that once succeeded, each kept as a regression test.

Redirects through an SDK client, secrets echoed by reference errors, ``file:`` references that
hang or exhaust the shipper, and text a tenant's receiver controls reaching the operator's logs.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from sqlalchemy_cmk.errors import ConfigurationError, DeliveryError
from sqlalchemy_cmk.sinks import SinkEnv, build_sink, check_destination, resolve_secret
from sqlalchemy_cmk.sinks._http import HttpsClient, Response, raise_for_status
from tests.audit.test_sinks_cloud import LOOPBACK, _az_rows, _az_spec, _records
from tests.audit.test_sinks_cloud import az_env as az_env  # a fixture, used by name
from tests.audit.test_sinks_cloud import dce as dce  # a fixture, used by name
from tests.audit.test_sinks_cloud import moto_logs as moto_logs  # a fixture, used by name

# -- redirects through an SDK client ------------------------------------------------------------


def test_azure_does_not_follow_a_redirect(dce: Any, az_env: SinkEnv) -> None:
    """azure-core's pipeline follows up to 30 redirects by default, to any host: the policy,
    checked on the endpoint only, would never see where the rows (and the bearer token) go."""
    from tests.audit._azure_dce import RULE, STREAM

    tenant = f"t-{uuid.uuid4().hex[:6]}"
    sink = build_sink(_az_spec(dce), az_env)
    # Back to the same server (another host is as easily named): followed, the rows would land.
    location = f"{dce.url}/dataCollectionRules/{RULE}/streams/{STREAM}?api-version=2023-01-01"
    dce.faults.append((307, {"Location": location}))
    try:
        with pytest.raises(DeliveryError) as info:
            sink.send(_records(1, tenant=tenant))
    finally:
        dce.faults.clear()
        sink.close()
    assert not info.value.retryable and "307" in str(info.value)
    assert _az_rows(dce, tenant) == []


# -- secret references --------------------------------------------------------------------------

LITERAL = "Bearer s3cr3t-t0ken:abcdef0123456789"


@pytest.mark.parametrize(
    ("kind", "where"),
    [
        ("webhook", ("signing", "key")),
        ("splunk_hec", ("token",)),
        ("otlp_http", ("headers", "Authorization")),
    ],
)
def test_a_literal_secret_with_a_colon_is_not_taken_for_a_reference(
    kind: str, where: tuple[str, ...]
) -> None:
    """The HTTP kinds took any string with a colon for a reference; building then failed with
    "unknown scheme" and a message that repeated the whole value, secret included, into the
    shipper's last_error, its log and ``audit status``."""
    spec: dict[str, Any] = {"kind": kind, "url": "https://siem.example/x"}
    if kind == "webhook":
        spec["signing"] = {"alg": "hmac-sha256", "key": LITERAL}
    elif kind == "splunk_hec":
        spec["token"] = LITERAL
    else:
        spec["headers"] = {"Authorization": LITERAL}
    with pytest.raises(ConfigurationError) as info:
        check_destination(spec)
    assert "s3cr3t" not in str(info.value) and "reference" in str(info.value)


@pytest.mark.parametrize("ref", ["hunter2:s3cr3t-value", "Basic dXNlcjpwYXNz:x", "file:rel/path"])
def test_resolve_secret_never_repeats_a_reference_it_cannot_use(ref: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve_secret(ref)
    text = str(info.value)
    assert ref.partition(":")[2] not in text and "s3cr3t" not in text


def test_a_file_reference_to_a_fifo_or_device_is_refused_at_once(tmp_path: Path) -> None:
    """``file:`` read the whole file: a FIFO blocked the shipper's thread for good, and
    ``/dev/zero`` filled its memory."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException | bytes] = []

    def resolve() -> None:
        try:
            outcome.append(resolve_secret(f"file:{fifo}"))
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    t = threading.Thread(target=resolve, daemon=True)
    t.start()
    t.join(2)
    if t.is_alive():  # unblock it before failing
        with open(fifo, "wb"):
            pass
        t.join(2)
        pytest.fail("a file: reference to a FIFO blocked")
    assert isinstance(outcome[0], ConfigurationError) and "regular file" in str(outcome[0])
    with pytest.raises(ConfigurationError, match="regular file"):
        resolve_secret("file:/dev/zero")


def test_a_file_reference_to_a_huge_file_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(64 * 1024 * 1024)  # sparse: no disk, and no read either
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match="larger than"):
        resolve_secret(f"file:{big}")
    assert time.monotonic() - started < 1


# -- what a tenant's receiver controls ----------------------------------------------------------


def test_a_receivers_reason_phrase_cannot_write_control_characters_into_the_error() -> None:
    """The reason phrase is the tenant's (its webhook, its collector): it went verbatim into
    last_error, the shipper's log line and ``audit status``, escape sequences and all."""
    client = HttpsClient("https://siem.example/hook", policy=LOOPBACK, what="webhook")
    reason = "Bad\x1b[2J\x1b[31m forged\rlog line " + "x" * 500
    with pytest.raises(DeliveryError) as info:
        raise_for_status(Response(400, reason, {}, b""), client)
    text = str(info.value)
    assert text.isprintable() and "\x1b" not in text
    assert len(text) < 200 and "400" in text


# -- a tenant id in a header ----------------------------------------------------------------


@pytest.mark.parametrize("tenant", ["租户-1", "Zoë & co", "100%"])
def test_a_webhook_carries_any_tenant_id_in_its_header(tenant: str, tmp_path: Path) -> None:
    """Tenant ids are printable Unicode: "租户-1" made http.client raise UnicodeEncodeError on
    every send (the tenant's webhook never delivered again), and "Zoë" went out as a Latin-1
    byte no receiver decodes as the id. The header is the id, UTF-8 percent-encoded."""
    from urllib.parse import unquote

    from tests.audit.receivers_http import make_pki, receiver, webhook_handler
    from tests.audit.test_sinks_http import HMAC_KEY, records, spec

    os.environ["T_ATTACK_WEBHOOK_KEY"] = HMAC_KEY  # removed below
    pki = make_pki(tmp_path)
    stored: list[bytes] = []
    try:
        for rx in receiver(pki, webhook_handler({"acme-1": HMAC_KEY.encode()}, stored)):
            s = spec("webhook", rx.url("/hook"), pki)
            s["signing"]["key"] = "env:T_ATTACK_WEBHOOK_KEY"
            build_sink(s, SinkEnv(policy=LOOPBACK)).send(records(2, tenant=tenant))
            (req,) = rx.requests
            assert req.headers["cmk-tenant"].isascii()
            assert unquote(req.headers["cmk-tenant"]) == tenant
    finally:
        del os.environ["T_ATTACK_WEBHOOK_KEY"]
    assert len(stored) == 2


# -- addresses that embed another -----------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::a9fe:a9fe",  # NAT64 (RFC 6052) of 169.254.169.254: what DNS64 answers
        "64:ff9b::a00:5",  # NAT64 of 10.0.0.5: an IPv6-only pod reaches the private network
        "64:ff9b:1::a9fe:a9fe",  # the local-use NAT64 prefix (RFC 8215)
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "::169.254.169.254",  # IPv4-compatible (deprecated, still parsed)
        "fec0::1",  # site-local (deprecated, still routed on some networks)
    ],
)
def test_an_address_embedding_a_non_public_ipv4_is_refused(address: str) -> None:
    """``ipaddress`` calls these global; each one reaches a non-public IPv4 address through a
    translator or tunnel the network may run."""
    from sqlalchemy_cmk.sinks import NetworkPolicy

    with pytest.raises(ConfigurationError, match="non-public"):
        NetworkPolicy().resolve(address, 443)
    assert NetworkPolicy(allow_private=True).resolve(address, 443) == [address]


# -- where an SDK's credentials go ------------------------------------------------------------


@pytest.mark.parametrize(
    "token_uri",
    [
        "http://169.254.169.254/computeMetadata/v1/instance/service-accounts/default/token",
        "https://collector.attacker.example/token",
        "https://127.0.0.1:8443/token",
    ],
)
def test_a_gcp_key_cannot_send_its_token_request_elsewhere(token_uri: str, tmp_path: Path) -> None:
    """google-auth POSTs the signed token request to the key file's own ``token_uri``, by its
    own DNS and with no NetworkPolicy: a key file handed over by a tenant could aim the
    application at its metadata service or an admin port, or collect signed assertions."""
    import json

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    # Any PEM will do: the key is refused before it is loaded.
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    sa = tmp_path / "writer.json"
    info = {
        "type": "service_account",
        "private_key": pem,
        "client_email": "w@p.iam.gserviceaccount.com",
        "token_uri": token_uri,
    }
    sa.write_text(json.dumps(info))
    spec = {"kind": "gcp_logging", "project": "acme-audit", "credentials": f"file:{sa}"}
    with pytest.raises(ConfigurationError, match="token_uri") as exc_info:
        build_sink(spec)
    assert "PRIVATE KEY" not in str(exc_info.value)


# -- a URL http.client cannot send --------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["https://siem.example/a b", "https://siem.example/äudit", "https://siem.example/?q=\x7f"],
)
@pytest.mark.parametrize("kind", ["webhook", "splunk_hec", "otlp_http"])
def test_a_url_http_cannot_carry_is_refused_at_check(kind: str, url: str) -> None:
    """Such a URL passed the check, then http.client refused it on every send (InvalidURL, or
    an UnicodeEncodeError that escaped the client): retried for ever as a network error."""
    spec: dict[str, Any] = {"kind": kind, "url": url}
    if kind == "webhook":
        spec["signing"] = {"alg": "hmac-sha256", "key": "env:X"}
    elif kind == "splunk_hec":
        spec["token"] = "env:X"
    with pytest.raises(ConfigurationError, match="url"):
        check_destination(spec)


def test_a_sinks_error_text_cannot_forge_the_shippers_log_line(
    tmp_path: Path, memory_kind: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """Whatever a sink raises is logged and kept as last_error: an SDK's message that quotes
    an answer could start a forged log line or drive the operator's terminal."""
    import logging

    from sqlalchemy_cmk.audit import make_event
    from sqlalchemy_cmk.context import TenantContext
    from sqlalchemy_cmk.delivery import AuditDelivery, TenantAudit
    from tests.audit import memory_kind as memory

    def send(self: Any, records: Any) -> None:
        raise RuntimeError("said\x1b[2J\nERROR forged line\r\u202e" + "y" * 2000)

    monkeypatch.setattr(memory.MemorySink, "send", send)
    audits = {"acme": TenantAudit([{"kind": "memory", "receiver": "a", "name": "siem"}])}
    d = AuditDelivery(tmp_path / "spool", audits, poll=0.01, max_backoff=0.05)
    ctx = TenantContext("acme", actor="ops")
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_cmk"):
        d.record(make_event(ctx, "decrypt", "ok", "acme", table="t"), ctx)
        d.flush(0.3)
        d.close()
    lines = [r.getMessage() for r in caplog.records if "forged" in r.getMessage()]
    assert lines and all(line.isprintable() and len(line) < 700 for line in lines)


# -- the policy at send, for SDKs that resolve names themselves ---------------------------------


def test_cloudwatchs_default_endpoint_passes_the_allowlist(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``endpoint_url`` the sink went to logs.<region>.amazonaws.com whatever the
    allowlist said (gcp_logging checks its fixed endpoint; cloudwatch checked nothing)."""
    from sqlalchemy_cmk.sinks import NetworkPolicy

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTTESTTEST")  # no credential lookup
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    spec = {"kind": "cloudwatch", "region": "eu-west-1", "log_group": "g", "log_stream": "s"}
    policy = NetworkPolicy(allowed_hosts=frozenset({"siem.example"}))
    sink = build_sink(spec, SinkEnv(policy=policy))
    with pytest.raises(DeliveryError, match="allowlist") as info:
        sink.send(_records(1))  # refused before any request
    assert not info.value.retryable
    sink.close()


class _Rebinding(LOOPBACK.__class__):
    """Answers like loopback until ``turned``, then like a name moved to the metadata service."""

    turned = False

    def resolve(
        self, host: str, port: int, *, what: str = "destination host", timeout: float = 10.0
    ) -> list[str]:
        if self.turned:
            raise ConfigurationError(f"{what} {host!r} resolves to the non-public address x")
        return super().resolve(host, port, what=what, timeout=timeout)


def test_cloudwatch_checks_the_endpoints_addresses_at_send(
    moto_logs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The policy resolved ``endpoint_url`` once, at build: a later DNS change (a dangling name
    taken over) reached whatever it pointed at for the life of the sink."""
    from tests.audit._moto_logs import CREDS
    from tests.audit.test_sinks_cloud import _cw_group, _cw_read

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDS["aws_secret_access_key"])
    monkeypatch.setenv("AWS_CA_BUNDLE", str(moto_logs.ca_file))
    spec, logs = _cw_group(moto_logs)
    spec["endpoint_url"] = moto_logs.url
    policy = _Rebinding(allow_private=True)
    sink = build_sink(spec, SinkEnv(policy=policy))
    sink.send(_records(1))
    policy.turned = True
    with pytest.raises(DeliveryError, match="non-public") as info:
        sink.send(_records(2, start=1))
    assert not info.value.retryable
    sink.close()
    assert len(_cw_read(logs, spec)) == 1


def test_azure_checks_the_endpoints_addresses_at_send(
    dce: Any, az_env: SinkEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for CloudWatch: the endpoint's addresses were checked once, at build."""
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    policy = _Rebinding(allow_private=True)
    sink = build_sink(_az_spec(dce), SinkEnv(policy=policy, clients=az_env.clients))
    try:
        sink.send(_records(1, tenant=tenant))
        policy.turned = True
        with pytest.raises(DeliveryError, match="non-public") as info:
            sink.send(_records(2, start=1, tenant=tenant))
    finally:
        sink.close()
    assert not info.value.retryable
    assert len(_az_rows(dce, tenant)) == 1


# -- certificate files ---------------------------------------------------------------------------


def _build_in_thread(spec: dict[str, Any], fifo: Path) -> BaseException | None:
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            build_sink(spec, SinkEnv(policy=LOOPBACK))
            outcome.append(None)
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(2)
    if t.is_alive():  # unblock it before failing
        with open(fifo, "wb"):
            pass
        t.join(2)
        pytest.fail("building the sink blocked on a FIFO")
    return outcome[0]


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "webhook", "url": "https://siem.example/", "ca_file": "{fifo}"},
        {"kind": "syslog_tls", "host": "siem.example", "ca_file": "{fifo}"},
        {"kind": "syslog_tls", "host": "siem.example", "client_cert": "{fifo}", "client_key": "/k"},
    ],
    ids=["webhook-ca", "syslog-ca", "syslog-cert"],
)
def test_a_certificate_file_that_is_a_fifo_is_refused_at_once(
    spec: dict[str, Any], tmp_path: Path
) -> None:
    """OpenSSL reads a CA or certificate file whole: a FIFO blocked the build (the shipper's
    thread) for good, as a ``file:`` reference did."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    s = {k: (str(fifo) if v == "{fifo}" else v) for k, v in spec.items()}
    if s["kind"] == "webhook":
        s["signing"] = {"alg": "hmac-sha256", "key": "env:T_ATTACK_KEY"}
    os.environ["T_ATTACK_KEY"] = "k" * 40
    try:
        exc = _build_in_thread(s, fifo)
    finally:
        del os.environ["T_ATTACK_KEY"]
    assert isinstance(exc, ConfigurationError) and "regular file" in str(exc)


# -- malformed URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://a.example\uff03@b.example/",  # urlsplit: invalid under NFKC
        "https://[::1/",  # urlsplit: invalid IPv6 URL
        "https://a.example:99999/",  # .port: out of range, at build
        "https://a.example:x/",
    ],
)
@pytest.mark.parametrize("kind", ["cloudwatch", "azure_monitor", "webhook"])
def test_a_malformed_url_is_a_configuration_error(kind: str, url: str) -> None:
    """urlsplit's ValueError escaped check_destination (whose contract is ConfigurationError
    naming the field), and a bad port of an SDK endpoint passed the check to fail at build."""
    spec: dict[str, Any] = {
        "cloudwatch": {
            "kind": "cloudwatch",
            "region": "eu-west-1",
            "log_group": "g",
            "log_stream": "s",
            "endpoint_url": url,
        },
        "azure_monitor": {
            "kind": "azure_monitor",
            "endpoint": url,
            "rule_id": "dcr-" + "0" * 32,
            "stream_name": "Custom-X",
        },
        "webhook": {
            "kind": "webhook",
            "url": url,
            "signing": {"alg": "hmac-sha256", "key": "env:X"},
        },
    }[kind]
    with pytest.raises(ConfigurationError):
        check_destination(spec)


# -- the tenant's verification recipe ------------------------------------------------------------


def test_the_recipe_refuses_an_ed25519_public_key_given_as_bytes() -> None:
    """The recipe picks the algorithm by the key's type: a tenant that stored its Ed25519
    public key as raw bytes (as it was handed over) had it taken for an HMAC secret, so anyone
    holding the public key, which is public, could sign batches the tenant accepted."""
    import hashlib
    import hmac

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sqlalchemy_cmk.sinks.webhook import public_key_id
    from tests.audit.receivers_http import docs_verifier

    raw = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    kid = public_key_id(raw)
    body = b'{"events":[\n{"id":"forged"}\n]}'
    t = int(time.time())
    forged = hmac.new(raw, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    with pytest.raises(ValueError, match="Ed25519"):
        docs_verifier()(f"t={t},kid={kid},v1={forged}", body, {kid: raw})
    # And the sink never names an HMAC key as the recipe would take for an Ed25519 one.
    with pytest.raises(ConfigurationError, match="key_id"):
        check_destination(
            {
                "kind": "webhook",
                "url": "https://siem.example/",
                "signing": {"alg": "hmac-sha256", "key": "env:X", "key_id": "ed25519-x"},
            }
        )


def test_a_failing_resolver_is_named_by_its_error_type_only() -> None:
    """A secret manager's client may put what it read (or its own token) in its message: that
    text reached last_error, the shipper's log and ``audit status``."""

    def vault(path: str) -> bytes:
        raise RuntimeError(f"vault answered 403 for {path} with token=hvs.S3CR3T")

    with pytest.raises(ConfigurationError, match="RuntimeError") as info:
        resolve_secret("vault:kv/acme#hec", {"vault": vault})
    assert "S3CR3T" not in str(info.value) and info.value.__cause__ is None


def test_an_azure_client_secret_that_is_not_utf8_is_a_configuration_error(
    dce: Any, az_env: SinkEnv, tmp_path: Path
) -> None:
    """UnicodeDecodeError escaped the build, its message quoting a byte of the secret."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"abc\xfe\xffdef")
    with pytest.raises(ConfigurationError, match="client_secret") as info:
        build_sink(_az_spec(dce, client_secret=f"file:{secret}"), az_env)
    assert "0xfe" not in str(info.value)


def test_a_tenants_slow_dns_holds_a_send_no_longer_than_its_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``getaddrinfo`` has no timeout a caller can set: a tenant's DNS that never answers held
    a send worker (and the tenant's lane) for as long as the system resolver liked, past the
    destination's ``timeout``. Now the send fails, retryable, within it."""
    import socket

    from sqlalchemy_cmk.sinks import NetworkPolicy

    real = socket.getaddrinfo
    release = threading.Event()

    def hanging(host: str, *args: Any, **kw: Any) -> Any:
        if host.endswith(".slow.test"):
            release.wait(30)
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    try:
        client = HttpsClient(
            "https://siem.slow.test/in",
            policy=NetworkPolicy(allow_private=True),
            timeout=0.3,
        )
        started = time.monotonic()
        with pytest.raises(DeliveryError, match="did not resolve within") as info:
            client.post(b"{}", {})
        assert time.monotonic() - started < 2
        assert info.value.retryable
        # An address is not looked up in a thread: it needs no DNS.
        assert NetworkPolicy(allow_private=True).resolve("127.0.0.1", 443, timeout=0) == [
            "127.0.0.1"
        ]
    finally:
        release.set()
