"""A local Azure Key Vault that refuses what Key Vault refuses, so your tests can prove revocation.

HTTPS on loopback, the REST API the SDK speaks.

Enough of the Key Vault data plane (api-version 7.x) for ``azure-keyvault-keys``' ``KeyClient``
and ``CryptographyClient``, with the real wire shapes:

- the bearer challenge: a request without the expected token gets ``401`` and a
  ``WWW-Authenticate: Bearer authorization=..., resource=...`` header, as Key Vault answers the
  SDK's first, bodiless request to a vault;
- ``GET /keys/{name}[/{version}]``: the key bundle (public JWK for RSA keys; no ``k`` for
  ``oct-HSM`` keys, which never leave a Managed HSM);
- ``POST /keys/{name}/{version}/wrapkey`` and ``/unwrapkey``: RSA-OAEP-256 for RSA keys and
  ``A256KW`` (RFC 3394) for ``oct-HSM`` keys;
- ``POST /keys/{name}/create`` (``KeyClient.create_rsa_key``, ``create_key`` with ``RSA``,
  ``RSA-HSM`` or ``oct-HSM``: a new version of the name becomes current) and
  ``PATCH /keys/{name}[/{version}]`` (``KeyClient.update_key_properties``: ``enabled``, ``exp``,
  ``nbf``, ``key_ops``), so another process can make and revoke its keys through the SDK or
  ``az rest``;
- errors as Key Vault sends them: ``{"error": {"code", "message", "innererror": {"code"}}}``,
  e.g. a disabled key answers every operation with ``403 Forbidden`` / ``KeyDisabled``, a
  missing key ``404 KeyNotFound``, a ciphertext that does not decrypt ``400 BadParameter``.

Per-version attributes, as Key Vault keeps them: each version has its own ``enabled``, ``exp``,
``nbf`` and ``key_ops``. ``GET /keys/{name}`` answers with the latest version, and disabling "the
key" from the portal or ``az keyvault key set-attributes --enabled false`` without ``--version``
updates that latest version only; older versions keep their own state. A disabled version answers
``get``, ``wrapKey`` and ``unwrapKey`` with ``403 Forbidden`` / ``KeyDisabled``. ``exp`` and
``nbf`` stop wraps only (the service still lets expired keys decrypt, unwrap and verify); an
operation missing from ``key_ops`` is ``403 Forbidden`` / ``KeyOperationForbidden``. Key names
are case-insensitive: ``/keys/ACME`` is ``/keys/acme``, and the answers carry the name as created.

Test hooks: :meth:`KeyVaultServer.disable` / :meth:`enable` (the tenant disables its key: without
a version, the latest one, as the portal does), :meth:`set_attributes` (``exp``, ``nbf``,
``key_ops`` of one version), :meth:`deny` / :meth:`allow` (the tenant removes the app's role
assignment: ``403 ForbiddenByRbac``), :meth:`rotate` (a new key version becomes current),
:meth:`fail_next` (inject ``5xx`` / ``429``), ``stall_seconds`` (answer late, for read
timeouts) and per-operation
counters.

The TLS certificate is issued for the server's host by a throwaway CA made with
``cryptography``; :attr:`KeyVaultServer.ca_file` is what the client's ``connection_verify``
needs (the Key Vault SDK sends bearer tokens over HTTPS only). Clients authenticate with
:class:`StaticTokenCredential`, which hands out :data:`TOKEN`; the server challenges anything
else, as Key Vault challenges the SDK's first request.

In a test suite::

    from sqlalchemy_cmk.testing.azure_keyvault import KeyVaultServer

    with KeyVaultServer() as vault:                # https://127.0.0.1:<free port>
        vault.create_rsa_key("acme")
        provider = AzureKeyVaultProvider.from_credential(
            vault.credential(), **vault.client_options()
        )
        ref = f"azure-kv://{vault.host}/keys/acme"
        ...
        vault.disable("acme")                      # the tenant disables its key

From a shell or another language's test suite, on a port of your choice (0: any free one)::

    python -m sqlalchemy_cmk.testing.azure_keyvault --port 0 [--key acme ...]
    # prints https://127.0.0.1:<port> on its first line and the CA file to trust on the
    # second, serves until SIGINT/SIGTERM; send "Authorization: Bearer <TOKEN>"

Needs the ``azure-testing`` extra (``pip install 'sqlalchemy-cmk[azure-testing]'``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

from ._support import make_tls as make_tls
from ._support import missing

_MISSING = missing(("azure.core", "azure.keyvault.keys"))
if _MISSING:
    raise ImportError(
        f"the local Key Vault server needs {', '.join(_MISSING)}; install it with: "
        "pip install 'sqlalchemy-cmk[azure-testing]'",
        name=_MISSING[0],
    )

from azure.core.credentials import AccessToken  # noqa: E402

__all__ = [
    "ENTRA_TENANT",
    "TOKEN",
    "KeyVaultServer",
    "KeyVersion",
    "StaticTokenCredential",
    "StoredKey",
    "main",
    "make_tls",
]

#: The token the test credential hands out; anything else is challenged.
TOKEN = "test-token-for-the-local-key-vault"  # noqa: S105 - a test server's, known to all
#: The Entra tenant the challenge names (any GUID: the credential is static).
ENTRA_TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"


class StaticTokenCredential:
    """A ``TokenCredential`` handing out one token (:data:`TOKEN` by default); records the
    scopes and Entra tenants asked for, in :attr:`requests`."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.requests: list[tuple[tuple[str, ...], str | None]] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.requests.append((scopes, kwargs.get("tenant_id")))
        return AccessToken(self.token, int(time.time()) + 3600)


_OAEP256 = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_PATH = re.compile(
    r"^/keys/(?P<name>[0-9A-Za-z-]+)(?:/(?P<version>[0-9A-Za-z]*))?(?:/(?P<op>wrapkey|unwrapkey))?/?$"
)


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_b64u(n: int) -> str:
    return _b64u(n.to_bytes((n.bit_length() + 7) // 8, "big"))


@dataclass
class KeyVersion:
    version: str
    kty: str  # "RSA" or "oct-HSM"
    private: rsa.RSAPrivateKey | None = None
    secret: bytes | None = None
    key_ops: list[str] = field(default_factory=lambda: ["wrapKey", "unwrapKey"])
    enabled: bool = True
    exp: int | None = None  # seconds since the epoch, as Key Vault's attributes carry them
    nbf: int | None = None


@dataclass
class StoredKey:
    name: str  # as created; lookups are case-insensitive
    versions: list[KeyVersion]
    denied: bool = False

    @property
    def enabled(self) -> bool:
        """Whether the latest version is enabled (what the portal shows as the key's state)."""
        return self.versions[-1].enabled


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
    # Without TCP_NODELAY every small response waits for the client's delayed ACK (~40 ms).
    disable_nagle_algorithm = True
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _send(
        self, status: int, body: dict[str, Any] | None, headers: dict[str, str] | None = None
    ) -> None:
        payload = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, status: int, code: str, message: str, inner: str | None = None) -> None:
        error: dict[str, Any] = {"code": code, "message": message}
        if inner:
            error["innererror"] = {"code": inner}
        self._send(status, {"error": error})

    def _dispatch(self, method: str) -> None:
        vault: KeyVaultServer = self.server.vault
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.headers.get("Authorization") != f"Bearer {vault.token}":
            # The challenge the SDK elicits with its first, bodiless request to a vault.
            vault.count("challenge")
            self._send(
                401,
                {
                    "error": {
                        "code": "Unauthorized",
                        "message": "AKV10000: Request is missing a Bearer or PoP token.",
                    }
                },
                {
                    "WWW-Authenticate": (
                        f'Bearer authorization="https://login.microsoftonline.com/{ENTRA_TENANT}", '
                        'resource="https://vault.azure.net"'
                    )
                },
            )
            return
        if vault.stall_seconds:
            time.sleep(vault.stall_seconds)
        fault = vault.take_fault()
        if fault is not None:
            status, code = fault
            headers = {"Retry-After": "0"} if status == 429 else None
            self._send(status, {"error": {"code": code, "message": "injected fault"}}, headers)
            return
        match = _PATH.match(self.path.split("?", 1)[0])
        if match is None:
            self._error(404, "NotFound", "no such route")
            return
        name, version, op = match["name"], match["version"] or "", match["op"]
        if method == "POST" and op is None and version == "create":
            vault.count("create")
            self._create(vault, name, raw)
            return
        if method == "PATCH" and op is None:
            vault.count("update")
            self._update(vault, name, version, raw)
            return
        if (method == "GET") != (op is None):
            self._error(405, "MethodNotAllowed", "method not allowed")
            return
        operation = op or "get"
        vault.count(operation)
        op_name = {"get": "get", "wrapkey": "wrapKey", "unwrapkey": "unwrapKey"}[operation]
        with vault.lock:
            stored = vault.keys.get(name.lower())
            if stored is None:
                self._error(
                    404,
                    "KeyNotFound",
                    f"A key with (name/id) {name} was not found in this key vault.",
                )
                return
            if stored.denied:
                self._error(
                    403,
                    "Forbidden",
                    "Caller is not authorized to perform action on resource. Action: "
                    f"'Microsoft.KeyVault/vaults/keys/{operation}/action'",
                    "ForbiddenByRbac",
                )
                return
            if version:
                found = [v for v in stored.versions if v.version == version.lower()]
                if not found:
                    self._error(
                        404, "KeyNotFound", f"A key with (name/id) {name}/{version} was not found."
                    )
                    return
                key = found[0]
            else:
                key = stored.versions[-1]
            now = time.time()
            refusal = None
            if not key.enabled:
                refusal = (f"Operation {op_name} is not allowed on a disabled key.", "KeyDisabled")
            elif op is not None and op_name not in key.key_ops:
                refusal = (
                    f"Operation {op_name} is not permitted on this key.",
                    "KeyOperationForbidden",
                )
            elif op == "wrapkey" and key.exp is not None and key.exp <= now:
                refusal = ("Operation wrapKey is not allowed on an expired key.", "KeyExpired")
            elif op == "wrapkey" and key.nbf is not None and key.nbf > now:
                refusal = ("Operation wrapKey is not allowed before nbf.", "KeyNotYetValid")
            if refusal is not None:
                self._error(403, "Forbidden", refusal[0], refusal[1])
                return
            display = stored.name
        vault.count(f"{operation}:{key.version}")
        kid = f"{vault.url}/keys/{display}/{key.version}"
        if op is None:
            self._send(200, vault.bundle(kid, key))
            return
        try:
            params = json.loads(raw)
            alg, value = params["alg"], _unb64u(params["value"])
        except (ValueError, KeyError, TypeError):
            self._error(400, "BadParameter", "Property 'value' is required.")
            return
        wanted = "RSA-OAEP-256" if key.kty == "RSA" else "A256KW"
        if alg != wanted:
            self._error(400, "BadParameter", f"Invalid algorithm {alg} for key type {key.kty}.")
            return
        try:
            if op == "wrapkey":
                result = (
                    key.private.public_key().encrypt(value, _OAEP256)
                    if key.private is not None
                    else aes_key_wrap(key.secret or b"", value)
                )
            elif key.private is not None:
                result = key.private.decrypt(value, _OAEP256)
            else:
                result = aes_key_unwrap(key.secret or b"", value)
        except (ValueError, InvalidUnwrap):
            self._error(400, "BadParameter", "Bad Request")
            return
        self._send(200, {"kid": kid, "value": _b64u(result)})

    def _create(self, vault: KeyVaultServer, name: str, raw: bytes) -> None:
        try:
            params = json.loads(raw)
            kty = params["kty"]
            attributes = params.get("attributes") or {}
            key_ops = params.get("key_ops")
            size = int(params.get("key_size") or 2048)
        except (ValueError, KeyError, TypeError, AttributeError):
            self._error(400, "BadParameter", "Property 'kty' is required.")
            return
        if kty in ("RSA", "RSA-HSM") and size in (2048, 3072, 4096):
            key = KeyVersion(uuid.uuid4().hex, "RSA", private=_rsa_key(size))
        elif kty == "oct-HSM" and size in (2048, 256):  # 256 bits, the only size emulated
            key = KeyVersion(uuid.uuid4().hex, "oct-HSM", secret=os.urandom(32))
        else:
            self._error(400, "BadParameter", f"Key type {kty} of size {size} is not emulated.")
            return
        if isinstance(key_ops, list):
            key.key_ops = [str(o) for o in key_ops]
        if not _apply_attributes(key, attributes):
            self._error(400, "BadParameter", "Invalid attributes.")
            return
        vault._add(name, key)
        with vault.lock:
            display = vault.keys[name.lower()].name
        self._send(200, vault.bundle(f"{vault.url}/keys/{display}/{key.version}", key))

    def _update(self, vault: KeyVaultServer, name: str, version: str, raw: bytes) -> None:
        try:
            params = json.loads(raw) if raw else {}
            attributes = params.get("attributes") or {}
            key_ops = params.get("key_ops")
        except (ValueError, AttributeError):
            self._error(400, "BadParameter", "The request body is not valid JSON.")
            return
        with vault.lock:
            stored = vault.keys.get(name.lower())
            found = (
                [v for v in stored.versions if not version or v.version == version.lower()]
                if stored is not None
                else []
            )
            if not found:
                self._error(
                    404, "KeyNotFound", f"A key with (name/id) {name}/{version} was not found."
                )
                return
            assert stored is not None
            key = found[-1]  # no version: the latest, as the portal and the CLI pick it
            if isinstance(key_ops, list):
                key.key_ops = [str(o) for o in key_ops]
            if not _apply_attributes(key, attributes):
                self._error(400, "BadParameter", "Invalid attributes.")
                return
            kid = f"{vault.url}/keys/{stored.name}/{key.version}"
        self._send(200, vault.bundle(kid, key))


def _apply_attributes(key: KeyVersion, attributes: Any) -> bool:
    """Set ``enabled``, ``exp``, ``nbf`` from a request's ``attributes``; False if malformed.
    Caller holds the vault's lock for a stored key."""
    if not isinstance(attributes, dict):
        return False
    enabled, exp, nbf = attributes.get("enabled"), attributes.get("exp"), attributes.get("nbf")
    if enabled is not None and not isinstance(enabled, bool):
        return False
    if any(v is not None and not isinstance(v, int) for v in (exp, nbf)):
        return False
    if enabled is not None:
        key.enabled = enabled
    if exp is not None:
        key.exp = exp
    if nbf is not None:
        key.nbf = nbf
    return True


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    vault: KeyVaultServer
    tls: ssl.SSLContext

    def get_request(self) -> tuple[socket.socket, Any]:
        # TLS handshake in the handler thread (at first read), not in the accept loop.
        sock, address = super().get_request()
        return self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients closing keep-alive connections mid-read are normal here


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class KeyVaultServer:
    """A Key Vault on ``https://<host>:<port>``; :meth:`start` / :meth:`stop` it.

    Binds its port when made (an ``OSError`` if it cannot), serves from :meth:`start`.

    Args:
        directory: Where the CA and server certificates are written (``ca.pem``,
            ``server.pem``); None: a temporary directory, removed by :meth:`stop`.
        host: The address to listen on and to issue the certificate for; loopback by
            default.
        port: The port; 0 picks a free one.

    Attributes:
        url: ``https://<host>:<port>``, the vault URL (what key ids start with).
        host: ``<host>:<port>``, as it appears in ``azure-kv://`` key references.
        ca_file: The CA certificate clients must trust (``connection_verify``).
        counts: Requests per operation (``"get"``, ``"wrapkey"``, ``"unwrapkey"``,
            ``"create"``, ``"update"``, ``"challenge"``, and ``"<op>:<version>"``).
    """

    def __init__(
        self, directory: Path | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._tempdir = None if directory is not None else tempfile.mkdtemp(prefix="cmk-kv-")
        directory = Path(self._tempdir) if self._tempdir is not None else directory
        assert directory is not None
        self.token = TOKEN
        self.keys: dict[str, StoredKey] = {}
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.stall_seconds = 0.0
        self._faults: list[tuple[int, str]] = []
        try:
            context, self.ca_file = make_tls(directory, host)
            server_class = _HTTPServer6 if ":" in host else _HTTPServer
            self._server = server_class((host, port), _Handler)
        except BaseException:
            self._remove_tempdir()
            raise
        self._server.vault = self
        self._server.tls = context
        self.port = self._server.server_address[1]
        self.host = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.url = f"https://{self.host}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # so that stop() returns promptly
            name="azure-kv-test",
            daemon=True,
        )

    # -- lifecycle -------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"KeyVaultServer({self.url})"

    def __enter__(self) -> KeyVaultServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> KeyVaultServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()
        self._remove_tempdir()

    def _remove_tempdir(self) -> None:
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    # -- clients ---------------------------------------------------------------------------------

    def credential(self) -> StaticTokenCredential:
        """A credential the vault accepts (it hands out :data:`TOKEN`)."""
        return StaticTokenCredential(self.token)

    def client_options(self, **options: Any) -> dict[str, Any]:
        """Keyword arguments for ``KeyClient``, ``CryptographyClient`` or
        ``AzureKeyVaultProvider.from_credential``: trust the vault's CA only, and accept a
        challenge that names ``vault.azure.net`` (not this host). ``options`` override."""
        return {
            "connection_verify": str(self.ca_file),
            "verify_challenge_resource": False,
            "connection_timeout": 2.0,
            "read_timeout": 5.0,
            **options,
        }

    def key_client(self, **options: Any) -> Any:
        """An ``azure.keyvault.keys.KeyClient`` for this vault (the tenant's own tool)."""
        from azure.keyvault.keys import KeyClient

        return KeyClient(self.url, self.credential(), **self.client_options(**options))

    # -- keys ------------------------------------------------------------------------------------

    def create_rsa_key(self, name: str, key_ops: list[str] | None = None) -> str:
        """Create ``name`` (or add a version); returns the new version."""
        version = KeyVersion(uuid.uuid4().hex, "RSA", private=_rsa_key())
        if key_ops is not None:
            version.key_ops = key_ops
        return self._add(name, version)

    def create_oct_hsm_key(self, name: str) -> str:
        return self._add(name, KeyVersion(uuid.uuid4().hex, "oct-HSM", secret=os.urandom(32)))

    def import_rsa_key(self, name: str, private: rsa.RSAPrivateKey) -> str:
        return self._add(name, KeyVersion(uuid.uuid4().hex, "RSA", private=private))

    def rotate(self, name: str) -> str:
        """A new version of ``name`` becomes current (older versions still unwrap)."""
        with self.lock:
            kty = self.keys[name.lower()].versions[-1].kty
        return self.create_rsa_key(name) if kty == "RSA" else self.create_oct_hsm_key(name)

    def _add(self, name: str, version: KeyVersion) -> str:
        with self.lock:
            self.keys.setdefault(name.lower(), StoredKey(name, [])).versions.append(version)
        return version.version

    def _version(self, name: str, version: str | None) -> KeyVersion:
        # Caller holds self.lock. No version: the latest, as the portal and the CLI pick it.
        versions = self.keys[name.lower()].versions
        if version is None:
            return versions[-1]
        return next(v for v in versions if v.version == version)

    def public_key(self, name: str, version: str) -> rsa.RSAPublicKey:
        with self.lock:
            private = self._version(name, version).private
        assert private is not None
        return private.public_key()

    def disable(self, name: str, version: str | None = None) -> None:
        """``az keyvault key set-attributes --enabled false [--version v]``: without a version,
        the latest version only."""
        self.set_attributes(name, version, enabled=False)

    def enable(self, name: str, version: str | None = None) -> None:
        self.set_attributes(name, version, enabled=True)

    def set_attributes(
        self,
        name: str,
        version: str | None = None,
        *,
        enabled: bool | None = None,
        exp: int | None = None,
        nbf: int | None = None,
        key_ops: list[str] | None = None,
    ) -> None:
        """Update one version's attributes (the latest without ``version``), as Update Key does."""
        with self.lock:
            key = self._version(name, version)
            if enabled is not None:
                key.enabled = enabled
            if exp is not None:
                key.exp = exp
            if nbf is not None:
                key.nbf = nbf
            if key_ops is not None:
                key.key_ops = key_ops

    def deny(self, name: str) -> None:
        with self.lock:
            self.keys[name.lower()].denied = True

    def allow(self, name: str) -> None:
        with self.lock:
            self.keys[name.lower()].denied = False

    # -- faults and counters ---------------------------------------------------------------------

    def fail_next(self, count: int, status: int = 503, code: str = "ServiceUnavailable") -> None:
        with self.lock:
            self._faults.extend([(status, code)] * count)

    def take_fault(self) -> tuple[int, str] | None:
        with self.lock:
            return self._faults.pop(0) if self._faults else None

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def reset(self) -> None:
        """Forget faults, counters and stalls (keys stay)."""
        with self.lock:
            self._faults.clear()
            self.counts.clear()
            self.stall_seconds = 0.0
            for stored in self.keys.values():
                stored.denied = False
                for version in stored.versions:
                    version.enabled, version.exp, version.nbf = True, None, None

    def bundle(self, kid: str, key: KeyVersion) -> dict[str, Any]:
        jwk: dict[str, Any] = {"kid": kid, "kty": key.kty, "key_ops": key.key_ops}
        if key.private is not None:
            numbers = key.private.public_key().public_numbers()
            jwk.update(n=_int_b64u(numbers.n), e=_int_b64u(numbers.e))
        created = int(time.time()) - 60
        attributes: dict[str, Any] = {"exp": key.exp, "nbf": key.nbf}
        return {
            "key": jwk,
            "attributes": {
                **{k: v for k, v in attributes.items() if v is not None},
                "enabled": key.enabled,
                "created": created,
                "updated": created,
                "recoveryLevel": "Recoverable+Purgeable",
                "recoverableDays": 90,
            },
        }


def _rsa_key(size: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=size)


# -- the command ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sqlalchemy_cmk.testing.azure_keyvault [--host H] [--port P] [--key NAME ...]``.

    Prints the vault URL on the first line of standard output and the CA file to trust on the
    second, then serves until SIGINT or SIGTERM; exit status 0 after a signal, 1 if the server
    cannot start, 2 for bad arguments.
    """
    parser = argparse.ArgumentParser(
        prog="python -m sqlalchemy_cmk.testing.azure_keyvault",
        description="A local Azure Key Vault (HTTPS, keys API) that refuses disabled key "
        "versions, forbidden operations and callers without the role, as Key Vault does. "
        f"Clients send 'Authorization: Bearer {TOKEN}'. For tests only.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port, 0 for a free one (default)")
    parser.add_argument(
        "--ca-dir",
        type=Path,
        default=None,
        help="where to write ca.pem and server.pem (default: a temporary directory, removed "
        "on exit)",
    )
    parser.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="NAME",
        help="create an RSA key of this name (one enabled version); repeatable",
    )
    args = parser.parse_args(argv)
    for name in args.key:
        if not re.fullmatch(r"[0-9A-Za-z-]{1,127}", name):
            parser.error(f"--key {name!r} is not a Key Vault key name")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            if args.ca_dir is not None:
                args.ca_dir.mkdir(parents=True, exist_ok=True)
            server = KeyVaultServer(args.ca_dir, host=args.host, port=args.port)
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        try:
            server.start()
            for name in args.key:
                server.create_rsa_key(name)
            print(server.url, server.ca_file, sep="\n", flush=True)
            while not stop.wait(0.5):
                pass
        finally:
            server.stop()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
