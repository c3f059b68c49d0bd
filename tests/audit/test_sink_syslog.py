"""The ``syslog_tls`` sink against a real rsyslogd (Debian's ``rsyslog`` + ``rsyslog-gnutls``).

Each test starts its own ``rsyslogd -n`` with imtcp over the gtls driver on a free loopback port,
with a certificate made for 127.0.0.1 by a throwaway CA, writing what it parsed to a file. With
``CI`` set, a missing rsyslogd fails the run instead of skipping.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

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
from sqlalchemy_cmk.testing._support import make_tls

RSYSLOGD = shutil.which("rsyslogd") or next(
    (p for p in ("/usr/sbin/rsyslogd", "/sbin/rsyslogd") if os.path.exists(p)), None
)
# Debian puts rsyslog's modules under /usr/lib/<multiarch>/rsyslog; other builds /usr/lib/rsyslog.
GTLS = bool(
    glob.glob("/usr/lib/*/rsyslog/lmnsd_gtls.so") + glob.glob("/usr/lib*/rsyslog/lmnsd_gtls.so")
)

if RSYSLOGD is None or not GTLS:
    if os.environ.get("CI"):
        pytest.fail(
            "rsyslogd with the gtls driver is needed (apt-get install rsyslog rsyslog-gnutls)"
        )
    pytest.skip("rsyslogd with the gtls driver is not installed", allow_module_level=True)

LOOPBACK = SinkEnv(policy=NetworkPolicy(allow_private=True))
# What rsyslog parsed, one line per message: fields split by a character JSON never holds raw.
TEMPLATE = (
    "%pri%\\t%protocol-version%\\t%timereported:::date-rfc3339%\\t%hostname%\\t%app-name%\\t"
    "%procid%\\t%msgid%\\t%structured-data%\\t%msg%\\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Rsyslog:
    """One rsyslogd on 127.0.0.1:<port>, TLS only, writing parsed messages to ``out``."""

    def __init__(self, directory: Path, client_ca: Path | None = None) -> None:
        self.dir = directory
        self.port = _free_port()
        self.out = directory / "received.log"
        _, self.ca_file = make_tls(directory, "127.0.0.1")
        pem = (directory / "server.pem").read_text()
        cut = pem.index("-----BEGIN PRIVATE KEY-----")
        (directory / "cert.pem").write_text(pem[:cut])
        (directory / "key.pem").write_text(pem[cut:])
        (directory / "work").mkdir()
        trusted = self.ca_file
        if client_ca is not None:  # mTLS: the collector also trusts the clients' CA
            trusted = directory / "trusted.pem"
            trusted.write_text(self.ca_file.read_text() + client_ca.read_text())
        self.conf = directory / "rsyslog.conf"
        self.conf.write_text(
            f'global(workDirectory="{directory / "work"}" maxMessageSize="64k"\n'
            f'  defaultNetstreamDriver="gtls"\n'
            f'  defaultNetstreamDriverCAFile="{trusted}"\n'
            f'  defaultNetstreamDriverCertFile="{directory / "cert.pem"}"\n'
            f'  defaultNetstreamDriverKeyFile="{directory / "key.pem"}")\n'
            'module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1"\n'
            f'  streamDriver.authMode="{"anon" if client_ca is None else "x509/certvalid"}")\n'
            f'input(type="imtcp" address="127.0.0.1" port="{self.port}")\n'
            f'template(name="parsed" type="string" string="{TEMPLATE}")\n'
            f'action(type="omfile" file="{self.out}" template="parsed" flushOnTXEnd="on"\n'
            '  asyncWriting="off")\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.dir / "rsyslogd.pid")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rsyslogd exited: {self.proc.stderr.read()!r}")  # type: ignore[union-attr]
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("rsyslogd does not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def received(self, count: int, timeout: float = 10.0) -> list[list[str]]:
        """The first ``count`` messages rsyslog wrote, split into their fields."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.out.read_text().splitlines() if self.out.exists() else []
            if len(lines) >= count or time.monotonic() > deadline:
                return [line.split("\t") for line in lines]
            time.sleep(0.05)

    def spec(self, **extra: object) -> dict[str, object]:
        return {
            "kind": "syslog_tls",
            "host": "127.0.0.1",
            "port": self.port,
            "ca_file": str(self.ca_file),
            "hostname": "app-1",
            "handshake_probe": 0.05,  # loopback: a refusal takes a few milliseconds
            "timeout": 5,
            **extra,
        }


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Rsyslog]:
    server = Rsyslog(tmp_path)
    server.start()
    yield server
    server.stop()


def _records(n: int, start: int = 0, tenant: str = "acme") -> list[Record]:
    out = []
    for i in range(start, start + n):
        body = json.dumps(
            {
                "api": {"operation": "decrypt"},  # the OCSF-shaped event (docs/audit.md)
                "metadata": {"uid": f"ev-{i}"},
                "unmapped": {"tenant": tenant, "note": 'q"]\\ é'},
            },
            separators=(",", ":"),
            ensure_ascii=False,
            sort_keys=True,
        ).encode()
        out.append(
            Record(
                id=f"ev-{i}",
                tenant=tenant,
                time_ns=1_780_000_000_123_456_789 + i * 1000,
                severity="warning" if i % 2 else "info",
                body=body,
            )
        )
    return out


def test_messages_arrive_in_order_as_rfc5424_with_the_body_intact(rsyslog: Rsyslog) -> None:
    sink = build_sink(rsyslog.spec(), LOOPBACK)
    assert isinstance(sink, Sink) and (sink.kind, sink.max_batch) == ("syslog_tls", 500)
    records = _records(120)
    try:
        sink.send(records[:60])
        sink.send(records[60:])  # the same connection
    finally:
        sink.close()
    got = rsyslog.received(120)
    assert len(got) == 120
    for i, (record, fields) in enumerate(zip(records, got, strict=True)):
        pri, version, ts, host, app, procid, msgid, sd, msg = fields
        assert int(pri) == 13 * 8 + (4 if record.severity == "warning" else 6)
        assert version == "1"
        assert ts == f"2026-05-28T20:26:40.{123456 + i:06d}Z"  # UTC, to the microsecond
        assert (host, app, procid, msgid) == (
            "app-1",
            "sqlalchemy-cmk",
            str(os.getpid()),
            "decrypt",
        )
        assert sd == f'[cmk@32473 id="{record.id}" tenant="acme"]'
        # rsyslog keeps the BOM in MSG; after it, the exact bytes of the body.
        assert msg.encode().removeprefix(b"\xef\xbb\xbf") == record.body


def test_the_structured_data_is_escaped(rsyslog: Rsyslog) -> None:
    sink = build_sink(rsyslog.spec(facility="local3"), LOOPBACK)
    record = Record(id='a"b]c\\d', tenant="t", time_ns=0, severity="info", body=b"{}")
    sink.send([record])
    sink.close()
    ((pri, *_, sd, msg),) = rsyslog.received(1)
    assert int(pri) == (16 + 3) * 8 + 6
    assert sd == '[cmk@32473 id="a\\"b\\]c\\\\d" tenant="t"]'
    assert msg.encode().removeprefix(b"\xef\xbb\xbf") == b"{}"


def test_collector_down_then_up(rsyslog: Rsyslog) -> None:
    sink = build_sink(rsyslog.spec(timeout=2), LOOPBACK)
    records = _records(6)
    sink.send(records[:2])
    assert len(rsyslog.received(2)) == 2
    rsyslog.stop()
    with pytest.raises(DeliveryError) as info:
        sink.send(records[2:4])
    assert info.value.retryable
    assert "ev-" not in str(info.value) and "decrypt" not in str(info.value)
    rsyslog.start()  # same port: the sink reconnects by itself
    sink.send(records[2:4])
    sink.send(records[4:])
    sink.close()
    got = rsyslog.received(6)
    assert [f[7] for f in got] == [f'[cmk@32473 id="ev-{i}" tenant="acme"]' for i in range(6)]


def test_an_untrusted_collector_is_not_retryable(rsyslog: Rsyslog, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    _, other_ca = make_tls(other, "127.0.0.1")
    sink = build_sink(rsyslog.spec(ca_file=str(other_ca)), LOOPBACK)
    with pytest.raises(DeliveryError) as info:
        sink.send(_records(1))
    assert not info.value.retryable
    sink.close()


def test_a_message_over_the_limit_is_not_retryable(rsyslog: Rsyslog) -> None:
    sink = build_sink(rsyslog.spec(max_message_bytes=480), LOOPBACK)
    big = Record(id="big", tenant="acme", time_ns=0, severity="info", body=b'"' + b"x" * 600 + b'"')
    with pytest.raises(DeliveryError) as info:
        sink.send([big])
    assert not info.value.retryable and "xxx" not in str(info.value)
    sink.close()


def test_loopback_is_refused_by_the_default_policy(rsyslog: Rsyslog) -> None:
    sink = build_sink(rsyslog.spec())
    with pytest.raises(DeliveryError, match="non-public address") as info:
        sink.send(_records(1))  # resolved when connecting, so refused there
    assert not info.value.retryable
    with pytest.raises(ConfigurationError, match="allowlist"):
        build_sink(
            rsyslog.spec(),
            SinkEnv(policy=NetworkPolicy(allowed_hosts=frozenset({"logs.example"}))),
        )


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({}, "host"),
        ({"host": "c.example", "port": 0}, "port"),
        ({"host": "c.example", "ca_file": "-----BEGIN CERTIFICATE-----"}, "ca_file"),
        ({"host": "c.example", "client_cert": "/c.pem"}, "client_key"),
        ({"host": "c.example", "client_key": "-----BEGIN PRIVATE KEY-----\nMII"}, "client_key"),
        ({"host": "c.example", "facility": "nope"}, "facility"),
        ({"host": "c.example", "hostname": "a b"}, "hostname"),
        ({"host": "c.example", "sd_id": 'x="y"'}, "sd_id"),
        ({"host": "c.example", "timeout": 0}, "timeout"),
        ({"host": "c.example", "password": "hunter2"}, "password"),
        ({"host": "c.example", "colour": "red"}, "colour"),
    ],
)
def test_check_refuses(spec: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        check_destination({"kind": "syslog_tls", **spec})
    assert field in str(info.value)
    assert "hunter2" not in str(info.value) and "MII" not in str(info.value)


def test_check_normalises() -> None:
    spec = check_destination({"kind": "syslog_tls", "host": "c.example", "facility": "local0"})
    assert spec == {
        "kind": "syslog_tls",
        "host": "c.example",
        "port": 6514,
        "facility": 16,
        "sd_id": "cmk@32473",
        "max_message_bytes": 65536,
        "handshake_probe": 0.5,
        "timeout": 10.0,
        "max_batch": 500,
    }
    assert check_destination(spec) == spec
    assert re.fullmatch(r"\S+", spec["sd_id"])


def _client_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A client certificate and key under their own throwaway CA: (ca, cert, key)."""
    directory.mkdir()
    _, ca = make_tls(directory, "app-1.example")
    pem = (directory / "server.pem").read_text()
    cut = pem.index("-----BEGIN PRIVATE KEY-----")
    (directory / "cert.pem").write_text(pem[:cut])
    (directory / "key.pem").write_text(pem[cut:])
    return ca, directory / "cert.pem", directory / "key.pem"


def test_mtls_with_the_client_certificate(tmp_path: Path) -> None:
    client_ca, cert, key = _client_cert(tmp_path / "client")
    (tmp_path / "server").mkdir()
    server = Rsyslog(tmp_path / "server", client_ca=client_ca)
    server.start()
    try:
        records = _records(3)
        spec = server.spec(client_cert=str(cert), client_key=str(key), handshake_probe=1.0)
        sink = build_sink(spec, LOOPBACK)
        sink.send(records)
        sink.close()
        assert [f[7] for f in server.received(3)] == [
            f'[cmk@32473 id="{r.id}" tenant="acme"]' for r in records
        ]
        # Without the certificate, TLS 1.3 ends the client's handshake before the collector
        # has checked (and refused) it. With the probe off, a batch written then is lost
        # without any error...
        bare = build_sink(server.spec(handshake_probe=0), LOOPBACK)
        bare.send(_records(1, start=10))
        bare.close()
        # ...with it on, the refusal is an error and nothing is written.
        sink = build_sink(server.spec(handshake_probe=1.0), LOOPBACK)
        with pytest.raises(DeliveryError, match="right after the TLS handshake"):
            sink.send(_records(2, start=20))
        sink.close()
        time.sleep(0.3)
        assert len(server.received(4, timeout=0.1)) == 3  # ev-10 was lost, silently
    finally:
        server.stop()
