"""Real HTTPS receivers on loopback for the HTTP audit sinks' tests.

* :func:`make_pki`: a CA and a server certificate for ``localhost`` and ``127.0.0.1``, made with
  ``cryptography`` into a directory (the sinks trust the CA through ``ca_file``).
* :class:`Receiver`: a threaded HTTPS server on 127.0.0.1 that records every request (with the
  TLS SNI it came with) and answers with a handler, after any scripted answers queued first
  (503 then 200, a 302 to elsewhere, a hang).
* Handlers that speak each protocol: :func:`webhook_handler` verifies the signature with the
  recipe of the docs (the very code block the tenant copies), :func:`hec_handler` checks the
  token and parses HEC's concatenated events (and plays a token's indexer acknowledgement:
  :class:`HecAck`), :func:`otlp_handler` decodes an ``ExportLogsServiceRequest``.
"""

from __future__ import annotations

import datetime
import gzip
import http.server
import ipaddress
import json
import socket
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docblocks
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2

# (status, headers, body); a header given a list is sent once per item (Set-Cookie).
Answer = tuple[int, Mapping[str, str | list[str]], bytes]


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_pki(directory: Path) -> Pki:
    """A CA and a server certificate signed by it, as PEM files: for localhost, 127.0.0.1 and
    siem.test (a name no DNS knows, reached only through an address a test's policy pins)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cmk-test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName("siem.test"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    pki.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


@dataclass
class Request:
    """One request a receiver took."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    sni: str | None


Handler = Callable[[Request], Answer]


def ok(_: Request) -> Answer:
    return 200, {}, b"{}"


@dataclass
class Receiver:
    """An HTTPS server on 127.0.0.1 (port chosen by the system) in a daemon thread.

    Attributes:
        handler: Answers each request not answered by ``script``.
        script: Answers given first, in order: an ``Answer``, or ``"hang"`` (no answer until
            the receiver closes).
        requests: Every request taken, in order (a hung one included).
    """

    pki: Pki
    handler: Handler = ok
    script: list[Answer | str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._closing = threading.Event()
        self._sni = threading.local()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.pki.cert_file, self.pki.key_file)
        sni_by_socket: dict[int, str | None] = {}

        def remember_sni(sock: Any, name: str | None, _ctx: Any) -> None:
            sni_by_socket[id(sock)] = name

        ctx.sni_callback = remember_sni
        receiver = self

        class _Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Headers and body are separate writes: without this, Nagle's algorithm holds
                # the body for the client's delayed ACK (~40 ms a request).
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                req = Request(
                    "POST",
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                    sni_by_socket.get(id(self.connection)),
                )
                receiver.requests.append(req)
                answer = receiver.script.pop(0) if receiver.script else receiver.handler(req)
                if answer == "hang":
                    receiver._closing.wait(10)
                    return
                assert not isinstance(answer, str)
                status, headers, body = answer
                self.send_response(status)
                for k, v in headers.items():
                    for item in v if isinstance(v, list) else [v]:
                        self.send_header(k, item)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: pytest shows what failed

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}{path}"

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()


def receiver(pki: Pki, handler: Handler = ok) -> Iterator[Receiver]:
    """A :class:`Receiver`, closed after use (for a fixture's ``yield from``)."""
    r = Receiver(pki, handler)
    try:
        yield r
    finally:
        r.close()


# -- webhook ----------------------------------------------------------------------------------


def docs_verifier() -> Callable[..., list[bytes]]:
    """``verify_cmk_signature`` from the docs: the code block a tenant copies, run as is."""
    for page in docblocks.pages():
        for block in docblocks.blocks(page):
            if block.lang == "python" and "def verify_cmk_signature" in block.code:
                namespace: dict[str, Any] = {}
                exec(compile(block.code, block.where, "exec"), namespace)
                fn: Callable[..., list[bytes]] = namespace["verify_cmk_signature"]
                return fn
    raise AssertionError("no docs page defines verify_cmk_signature")


def webhook_handler(keys: Mapping[str, Any], stored: list[bytes]) -> Handler:
    """Verify like a tenant (401 when the signature fails), then keep each event's bytes."""
    verify = docs_verifier()

    def handle(req: Request) -> Answer:
        try:
            events = verify(req.headers.get("cmk-signature", ""), req.body, keys)
        except ValueError as exc:
            return 401, {}, str(exc).encode()
        assert json.loads(req.body)["events"] == [json.loads(e) for e in events]
        stored.extend(events)
        return 204, {}, b""

    return handle


# -- Splunk HEC -------------------------------------------------------------------------------


def hec_events(body: bytes) -> list[dict[str, Any]]:
    """HEC's batch format: JSON objects one after another, whitespace allowed between."""
    text = body.decode("utf-8")
    decoder = json.JSONDecoder()
    out, i = [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)
    return out


def hec_raw_events(body: bytes) -> list[bytes]:
    """The exact bytes of each event's ``event`` member (to compare with the records')."""
    text = body.decode("utf-8")
    decoder = json.JSONDecoder()
    out = []
    start = 0
    while (at := text.find('"event":', start)) >= 0:
        _, end = decoder.raw_decode(text, at + len('"event":'))
        out.append(text[at + len('"event":') : end].encode())
        start = end
    return out


@dataclass
class HecAck:
    """A HEC token's indexer acknowledgement, as :func:`hec_handler` plays it.

    Attributes:
        enabled: The token has acknowledgement on: a request without a channel is refused
            (code 10), one whose channel is not a GUID too (code 11), and each batch taken is
            answered with an ``ackId`` (counted per channel from 0). Off: the event endpoint
            ignores any channel and answers without an ``ackId``; the ack endpoint answers
            code 14.
        after: Polls of an ackId before it is acknowledged (on that poll); None: never.
        never: AckIds never acknowledged (a batch the indexers lost).
        polls: Every poll, as ``(channel, ackId, answered true)``.
        channels: The channel of every event request taken.
    """

    enabled: bool = True
    after: int | None = 1
    never: set[int] = field(default_factory=set)
    polls: list[tuple[str, int, bool]] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)
    _pending: dict[tuple[str, int], int] = field(default_factory=dict)
    _next: dict[str, int] = field(default_factory=dict)

    def channel_error(self, req: Request) -> Answer | None:
        channel = req.headers.get("x-splunk-request-channel")
        if channel is None:
            return 400, {}, b'{"text":"Data channel is missing","code":10}'
        try:
            uuid.UUID(channel)
        except ValueError:
            return 400, {}, b'{"text":"Invalid data channel","code":11}'
        return None

    def take(self, channel: str) -> int:
        self.channels.append(channel)
        ack_id = self._next.get(channel, 0)
        self._next[channel] = ack_id + 1
        self._pending[(channel, ack_id)] = 0
        return ack_id

    def query(self, channel: str, ids: list[Any]) -> dict[str, bool]:
        out = {}
        for ack_id in ids:
            key = (channel, ack_id)
            done = False
            if key in self._pending:
                self._pending[key] += 1
                done = (
                    ack_id not in self.never
                    and self.after is not None
                    and self._pending[key] >= self.after
                )
                if done:
                    del self._pending[key]  # HEC forgets an ackId once it said true
            self.polls.append((channel, ack_id, done))
            out[str(ack_id)] = done
        return out


def hec_handler(
    token: str, stored: list[dict[str, Any]], raw: list[bytes], ack: HecAck | None = None
) -> Handler:
    """Speak HEC: 401 code 2 without a token, 403 code 4 for a wrong one, 400 code 6 for
    unparseable data, 200 code 0 otherwise; with ``ack``, HEC's indexer acknowledgement too
    (its channel, its ``ackId`` and its ``/services/collector/ack`` endpoint)."""

    def handle(req: Request) -> Answer:
        if req.path not in ("/services/collector/event", "/services/collector/ack"):
            return 404, {}, b'{"text":"The requested URL was not found","code":404}'
        auth = req.headers.get("authorization")
        if auth is None:
            return 401, {}, b'{"text":"Token is required","code":2}'
        if auth != f"Splunk {token}":
            return 403, {}, b'{"text":"Invalid token","code":4}'
        if req.path == "/services/collector/ack":
            if ack is None or not ack.enabled:
                return 400, {}, b'{"text":"ACK is disabled","code":14}'
            refused = ack.channel_error(req)
            if refused is not None:
                return refused
            try:
                ids = json.loads(req.body)["acks"]
                assert isinstance(ids, list)
            except (ValueError, KeyError, TypeError, AssertionError):
                return 400, {}, b'{"text":"Invalid data format","code":6}'
            answer = {"acks": ack.query(req.headers["x-splunk-request-channel"], ids)}
            return 200, {}, json.dumps(answer).encode()
        if ack is not None and ack.enabled:
            refused = ack.channel_error(req)
            if refused is not None:
                return refused
        try:
            events = hec_events(req.body)
        except ValueError:
            return 400, {}, b'{"text":"Invalid data format","code":6}'
        for e in events:
            if "event" not in e:
                return 400, {}, b'{"text":"Event field is required","code":12}'
        stored.extend(events)
        raw.extend(hec_raw_events(req.body))
        if ack is not None and ack.enabled:
            ack_id = ack.take(req.headers["x-splunk-request-channel"])
            return 200, {}, b'{"text":"Success","code":0,"ackId":%d}' % ack_id
        return 200, {}, b'{"text":"Success","code":0}'

    return handle


# -- OTLP/HTTP --------------------------------------------------------------------------------


def otlp_handler(headers: Mapping[str, str], stored: list[Any]) -> Handler:
    """Speak OTLP/HTTP (protobuf): 401 without the expected headers, else decode the
    ``ExportLogsServiceRequest`` and keep each ``(resource, scope, log_record)``."""

    def handle(req: Request) -> Answer:
        if req.path != "/v1/logs":
            return 404, {}, b""
        for k, v in headers.items():
            if req.headers.get(k.lower()) != v:
                return 401, {}, b""
        if req.headers.get("content-type") != "application/x-protobuf":
            return 415, {}, b""
        data = req.body
        if req.headers.get("content-encoding") == "gzip":
            data = gzip.decompress(data)
        msg = logs_service_pb2.ExportLogsServiceRequest()
        msg.ParseFromString(data)
        for rl in msg.resource_logs:
            for sl in rl.scope_logs:
                for lr in sl.log_records:
                    stored.append((rl.resource, sl.scope, lr))
        answer = logs_service_pb2.ExportLogsServiceResponse().SerializeToString()
        return 200, {"Content-Type": "application/x-protobuf"}, answer

    return handle
