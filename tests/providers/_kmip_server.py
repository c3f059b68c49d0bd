"""A real PyKMIP 0.11 server for the KMIP provider's tests, on 127.0.0.1 with TLS client auth.

The test makes its own PKI with ``cryptography`` (a CA, the server's certificate for 127.0.0.1,
and client certificates with the clientAuth extended key usage: PyKMIP takes the client identity
from the certificate's common name), writes a server config, a SQLite database path and an
operation-policy directory into a temporary folder, and runs ``pykmip-server`` as a subprocess
in its own process group (the server forks a policy monitor and a multiprocessing manager), so
stopping it kills the whole group and leaves nothing behind.

Operation policies are JSON files that the server's policy monitor re-reads every second. A key
created with ``operation_policy_name=<name>`` is usable by every authenticated client while its
policy says ``GET: ALLOW_ALL`` (PyKMIP checks the Get permission for Encrypt and Decrypt) and
only by its owner (the operator) when it says ``ALLOW_OWNER``: that is how the tests withdraw
and give back the application's access, as an operator of a KMIP appliance would.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

OPERATOR = "kmip-operator"
APPLICATION = "sqlalchemy-cmk-app"


@dataclass(frozen=True)
class ClientCert:
    cert: str
    key: str


@dataclass(frozen=True)
class Pki:
    ca: str
    server: ClientCert
    operator: ClientCert
    application: ClientCert
    #: Signed by another CA: the server must refuse it in the TLS handshake.
    stranger: ClientCert


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> str:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return str(path)


def _issue(
    directory: Path,
    stem: str,
    cn: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    *,
    server: bool,
) -> ClientCert:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if server:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path = directory / f"{stem}.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ClientCert(str(cert_path), _write_key(directory / f"{stem}.key", key))


def _make_ca(directory: Path, stem: str, cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Name]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(cn)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, name


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_name = _make_ca(directory, "ca", "sqlalchemy-cmk test KMIP CA")
    other_key, other_name = _make_ca(directory, "other-ca", "some other CA")
    return Pki(
        ca=str(directory / "ca.crt"),
        server=_issue(directory, "server", "127.0.0.1", ca_key, ca_name, server=True),
        operator=_issue(directory, "operator", OPERATOR, ca_key, ca_name, server=False),
        application=_issue(directory, "app", APPLICATION, ca_key, ca_name, server=False),
        stranger=_issue(directory, "stranger", APPLICATION, other_key, other_name, server=False),
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_command() -> list[str]:
    script = Path(sys.executable).with_name("pykmip-server")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from kmip.services.server.server import main; main()"]


class KmipTestServer:
    """A running ``pykmip-server``; use :meth:`start` and :meth:`stop`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pki = make_pki(directory / "pki")
        self.policy_dir = directory / "policies"
        self.policy_dir.mkdir()
        self.log_path = directory / "server.log"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def set_policy(self, name: str, *, application_allowed: bool) -> None:
        """Write the policy ``name``: the application may use its keys, or only their owner."""
        grant = "ALLOW_ALL" if application_allowed else "ALLOW_OWNER"
        owner_only = {
            op: "ALLOW_OWNER"
            for op in ("GET_ATTRIBUTES", "GET_ATTRIBUTE_LIST", "ACTIVATE", "REVOKE", "DESTROY")
        }
        policy = {name: {"preset": {"SYMMETRIC_KEY": {"GET": grant, **owner_only}}}}
        path = self.policy_dir / f"{name}.json"
        previous = path.stat().st_mtime if path.exists() else 0.0
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(policy))
        os.replace(tmp, path)
        # The monitor reloads a file whose mtime grew: make sure it does even within one tick.
        mtime = max(time.time(), previous + 0.01)
        os.utime(path, (mtime, mtime))

    def start(self, timeout: float = 20.0) -> None:
        last_error = "not started"
        for _attempt in range(3):  # a free port can be taken between probe and bind: retry
            self.port = free_port()
            config = self.directory / "server.conf"
            config.write_text(
                "[server]\n"
                "hostname=127.0.0.1\n"
                f"port={self.port}\n"
                f"certificate_path={self.pki.server.cert}\n"
                f"key_path={self.pki.server.key}\n"
                f"ca_path={self.pki.ca}\n"
                "auth_suite=TLS1.2\n"
                f"policy_path={self.policy_dir}\n"
                "enable_tls_client_auth=True\n"
                "logging_level=INFO\n"
                f"database_path={self.directory / 'pykmip.db'}\n"
            )
            with (self.directory / "server.stderr").open("ab") as stderr:
                self._proc = subprocess.Popen(
                    [*_server_command(), "-f", str(config), "-l", str(self.log_path)],
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    start_new_session=True,  # its own process group: stop() kills its children
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                        return
                except OSError:
                    time.sleep(0.1)
            last_error = self.describe_failure()
            self.stop()
        raise RuntimeError(f"pykmip-server did not start: {last_error}")

    def describe_failure(self) -> str:
        parts = []
        if self._proc is not None and self._proc.poll() is not None:
            parts.append(f"exit code {self._proc.returncode}")
        for path in (self.directory / "server.stderr", self.log_path):
            if path.exists():
                parts.append(path.read_text(errors="replace")[-2000:])
        return "; ".join(parts) or "no output"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        # SIGTERM makes the server stop its policy monitor and its manager and reap them, but
        # only once accept() returns (PEP 475 retries it after the handler): a connection
        # wakes it at once instead of at its 10-second timeout.
        proc.terminate()
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=1),
        ):
            pass
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        # The policy monitor and the multiprocessing manager may outlive the main process.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
