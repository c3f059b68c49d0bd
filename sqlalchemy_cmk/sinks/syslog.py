"""``syslog_tls``: RFC 5424 messages over TLS with RFC 5425 octet-counting framing.

Spec::

    {"kind": "syslog_tls",
     "host": "collector.acme.example",     # required; checked by the NetworkPolicy
     "port": 6514,                          # RFC 5425's port (default)
     "ca_file": "/etc/cmk/acme-ca.pem",     # CA bundle to verify the collector (default: system)
     "server_name": "collector.acme.example",  # name to verify, if not ``host``
     "client_cert": "/etc/cmk/acme-client.pem",  # mTLS: certificate file (optional)
     "client_key": "/etc/cmk/acme-client.key",   # mTLS: its private key file (optional)
     "facility": "audit",                   # a name or 0..23 (default 13, "log audit")
     "hostname": "app-1",                   # HOSTNAME (default: this host's name)
     "sd_id": "cmk@32473",                  # SD-ID of the structured data element
     "max_message_bytes": 65536,            # largest message the collector accepts
     "handshake_probe": 0.5,                # see below; 0 turns it off
     "timeout": 10, "max_batch": 500}

Each record is one message::

    <PRI>1 TIMESTAMP HOSTNAME sqlalchemy-cmk PROCID MSGID [cmk@32473 id="..." tenant="..."] BOM{...}

PRI is ``facility * 8 + severity`` (``info`` 6, ``warning`` 4), TIMESTAMP the access time in
UTC with microseconds, MSGID the event's operation (``api.operation``, else ``cmk-audit``),
and MSG the event's canonical JSON, unchanged, after the UTF-8 BOM RFC 5424 asks for.
``32473`` is the private enterprise number RFC 5612 reserves for examples: set ``sd_id`` to one
under your own number if the collector cares.

What "delivered" means: syslog over TLS has no application-level acknowledgement (RFC 5425
defines none; RELP would). ``send`` returns once every frame of the batch has been written to
the TLS connection and handed to the kernel. A collector that crashes after that, or a
connection that breaks while the bytes are in flight, loses them without either side knowing.
Three things narrow that window. Before reusing its connection the sink checks that the
collector has not closed it (collectors never write, so a readable socket is a closed one) and
reconnects. After a TLS 1.3 handshake it waits up to ``handshake_probe`` seconds before the
first write, because TLS 1.3 lets a client finish its handshake before the server has checked
the client certificate: a collector refusing it closes the connection a round trip later, and
without the wait the first batch would be written into a connection already being refused,
lost with no error (measured against rsyslog: the refusal came after 0.3 to 5 ms on
loopback; set the wait above the collector's round-trip time). And a failed write fails the
whole batch, which the shipper sends again: delivery is at least once, and the structured data
carries the event id to de-duplicate by. Tenants who need proof of receipt should pick a
destination that acknowledges (webhook, a cloud log service).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import select
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigurationError, DeliveryError
from . import NetworkPolicy, Record, SinkEnv, check_regular_file
from ._fields import Fields

KIND = "syslog_tls"
APP_NAME = "sqlalchemy-cmk"
DEFAULT_PORT = 6514
DEFAULT_SD_ID = "cmk@32473"
BOM = b"\xef\xbb\xbf"

FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "audit": 13,
    "alert": 14, "clock": 15, **{f"local{i}": 16 + i for i in range(8)},
}  # fmt: skip
SEVERITIES = {
    "emergency": 0, "alert": 1, "critical": 2, "error": 3, "warning": 4, "notice": 5,
    "info": 6, "debug": 7,
}  # fmt: skip

_HOST = r"[A-Za-z0-9.:_-]{1,253}"
_PRINTUSASCII = r"[!-~]{1,255}"
_SD_NAME = r"[!#-<>-\\^-~]{1,32}"  # printusascii except '=', ']', '"' and space


def check(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and normalise a ``syslog_tls`` spec (no I/O, no secret)."""
    f = Fields(spec, KIND)
    f.string("host", required=True, pattern=_HOST)
    f.number("port", default=DEFAULT_PORT, low=1, high=65535, integer=True)
    f.ca_file()
    f.string("server_name", pattern=_HOST)
    cert = f.file_path("client_cert")
    key = f.file_path("client_key")
    if (cert is None) != (key is None):
        raise ConfigurationError(
            f"{KIND} destination fields 'client_cert' and 'client_key' go together (mTLS)"
        )
    facility = spec.get("facility", "audit")
    f.seen.add("facility")
    if isinstance(facility, str) and facility in FACILITIES:
        f.out["facility"] = FACILITIES[facility]
    elif isinstance(facility, int) and not isinstance(facility, bool) and 0 <= facility <= 23:
        f.out["facility"] = facility
    else:
        raise ConfigurationError(
            f"{KIND} destination field 'facility' must be 0..23 or one of " + ", ".join(FACILITIES)
        )
    f.string("hostname", pattern=_PRINTUSASCII)
    f.string("sd_id", default=DEFAULT_SD_ID, pattern=_SD_NAME)
    f.number("max_message_bytes", default=65536, low=480, high=16 * 1024 * 1024, integer=True)
    f.number("handshake_probe", default=0.5, low=0, high=10)
    f.timeout()
    f.max_batch(500, high=10_000)
    return f.done()


def build(spec: Mapping[str, Any], env: SinkEnv) -> SyslogTlsSink:
    """The sink for a checked spec (reads the CA and client certificate files now)."""
    for name in ("ca_file", "client_cert", "client_key"):
        if spec.get(name):
            check_regular_file(spec[name], f"{KIND} destination field {name!r}")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if spec.get("ca_file"):
            context.load_verify_locations(cafile=spec["ca_file"])
        if spec.get("client_cert"):
            context.load_cert_chain(spec["client_cert"], spec["client_key"])
    except (OSError, ssl.SSLError) as exc:
        # Names the fields and the files, never their content.
        raise ConfigurationError(
            f"{KIND} destination: cannot load its CA or client certificate files "
            f"({getattr(exc, 'strerror', None) or type(exc).__name__})"
        ) from None
    env.policy.check_host(spec["host"], what=f"{KIND} host")  # the allowlist, now; DNS later
    return SyslogTlsSink(spec, env.policy, context)


def _sd_value(value: str) -> str:
    # RFC 5424 section 6.3.3: '"', '\' and ']' are escaped with a backslash.
    return re.sub(r'(["\\\]])', r"\\\1", value)


def _timestamp(time_ns: int) -> str:
    seconds, ns = divmod(time_ns, 1_000_000_000)
    t = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    t += datetime.timedelta(microseconds=ns // 1000)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _msgid(body: bytes) -> str:
    # The event's operation: ``api.operation`` in the OCSF-shaped schema (docs/audit.md).
    try:
        event = json.loads(body)
        api = event.get("api")
        operation = api.get("operation") if isinstance(api, dict) else event.get("operation")
    except (ValueError, AttributeError):
        operation = None
    if isinstance(operation, str) and re.fullmatch(r"[!-~]{1,32}", operation):
        return operation
    return "cmk-audit"


class SyslogTlsSink:
    """Sends records to one syslog collector over one TLS connection, reconnecting on failure.

    Not thread-safe: the shipper calls one sink from one thread at a time.
    """

    kind = KIND

    def __init__(
        self, spec: Mapping[str, Any], policy: NetworkPolicy, context: ssl.SSLContext
    ) -> None:
        self.host: str = spec["host"]
        self.port: int = spec["port"]
        self.server_name: str = spec.get("server_name") or self.host
        self.timeout: float = spec["timeout"]
        self.max_batch: int = spec["max_batch"]
        self.max_message_bytes: int = spec["max_message_bytes"]
        self.facility: int = spec["facility"]
        self.hostname: str = spec.get("hostname") or _local_hostname()
        self.sd_id: str = spec["sd_id"]
        self.handshake_probe: float = spec["handshake_probe"]
        self._policy = policy
        self._context = context
        self._sock: ssl.SSLSocket | None = None

    def __repr__(self) -> str:
        return f"SyslogTlsSink({self.host}:{self.port})"

    def format(self, record: Record) -> bytes:
        """One record as an RFC 5424 message (without the RFC 5425 length prefix)."""
        severity = SEVERITIES.get(record.severity, SEVERITIES["notice"])
        header = (
            f"<{self.facility * 8 + severity}>1 {_timestamp(record.time_ns)} {self.hostname} "
            f"{APP_NAME} {os.getpid()} {_msgid(record.body)} "
            f'[{self.sd_id} id="{_sd_value(record.id)}" tenant="{_sd_value(record.tenant)}"] '
        )
        return header.encode() + BOM + record.body

    def send(self, records: Sequence[Record]) -> None:
        """Write the batch, in order, to the collector (see the module docstring for what
        that promises).

        Raises:
            DeliveryError: retryable when the collector cannot be reached or the write fails;
                not retryable when a record is larger than ``max_message_bytes``.
        """
        if not records:
            return
        frames = []
        for record in records:
            message = self.format(record)
            if len(message) > self.max_message_bytes:
                raise DeliveryError(
                    f"{KIND}: event {record.id} is {len(message)} bytes as a syslog message, "
                    f"over the destination's max_message_bytes ({self.max_message_bytes})",
                    retryable=False,
                )
            frames.append(b"%d %s" % (len(message), message))  # RFC 5425 octet counting
        deadline = time.monotonic() + self.timeout
        sock = self._connection(deadline)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(b"".join(frames))
        except (OSError, ValueError) as exc:
            self._drop()
            raise DeliveryError(
                f"{KIND}: writing to {self.host}:{self.port} failed ({type(exc).__name__})"
            ) from None

    def _connection(self, deadline: float) -> ssl.SSLSocket:
        if self._sock is not None and not self._closed_by_peer(self._sock):
            return self._sock
        self._drop()
        try:
            addresses = self._policy.resolve(
                self.host, self.port, what=f"{KIND} host", timeout=deadline - time.monotonic()
            )
        except ConfigurationError as exc:
            # The name now resolves to an address the policy refuses: an operator must act.
            raise DeliveryError(str(exc), retryable=False) from None
        failure: BaseException | None = None
        for address in addresses:  # the checked addresses, never the name again
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            raw: socket.socket | None = None
            try:
                raw = socket.create_connection((address, self.port), timeout=remaining)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock = self._context.wrap_socket(raw, server_hostname=self.server_name)
            except ssl.SSLCertVerificationError as exc:
                if raw is not None:
                    raw.close()
                # An operator must fix the CA or the name: retrying the same cannot help.
                raise DeliveryError(
                    f"{KIND}: the collector {self.host}:{self.port} failed TLS verification "
                    f"({exc.verify_message})",
                    retryable=False,
                ) from None
            except (OSError, ValueError) as exc:
                if raw is not None:
                    raw.close()
                failure = exc
                continue
            self._refused_after_handshake(sock, deadline)
            self._sock = sock
            return sock
        raise DeliveryError(
            f"{KIND}: cannot connect to {self.host}:{self.port} "
            f"({type(failure).__name__ if failure else 'timed out'})"
        )

    def _refused_after_handshake(self, sock: ssl.SSLSocket, deadline: float) -> None:
        """Wait up to ``handshake_probe`` seconds for a TLS 1.3 collector to refuse us.

        In TLS 1.3 the client's handshake ends before the server has checked the client's
        certificate: a collector that refuses it closes the connection a round trip later, and
        whatever was written meanwhile is lost with no error on our side. Under TLS 1.2 the
        refusal is part of the handshake and already raised.
        """
        wait = min(self.handshake_probe, max(deadline - time.monotonic(), 0.0) / 2)
        if wait <= 0 or sock.version() != "TLSv1.3":
            return
        try:
            readable, _, _ = select.select([sock], [], [], wait)
            if not readable:
                return  # nothing said within the wait: taken as accepted
            sock.settimeout(wait)
            sock.recv(1)  # a collector never writes: this is its close or its alert
            reason, refused = "it closed the connection", False
        except ssl.SSLError as exc:
            reason = f"TLS alert {exc.reason or type(exc).__name__}"
            refused = "CERTIFICATE" in str(exc.reason or "").upper()
        except OSError as exc:
            reason, refused = type(exc).__name__, False
        sock.close()
        raise DeliveryError(
            f"{KIND}: the collector {self.host}:{self.port} refused the connection right after "
            f"the TLS handshake ({reason}): does it want a client certificate (client_cert) "
            "other than the one this sink presents?",
            retryable=not refused,
        )

    @staticmethod
    def _closed_by_peer(sock: ssl.SSLSocket) -> bool:
        # A collector never writes to us: anything readable is its close_notify or EOF (or an
        # error), so this connection is gone even though writing to it might still "succeed".
        try:
            readable, _, errored = select.select([sock], [], [sock], 0)
        except (OSError, ValueError):
            return True
        return bool(readable or errored)

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def close(self) -> None:
        self._drop()


def _local_hostname() -> str:
    name = socket.gethostname() or "-"
    return re.sub(r"[^!-~]", "-", name)[:255]
