"""A local Cloud KMS that refuses what Cloud KMS refuses, so your tests can prove revocation.

``google.cloud.kms.v1.KeyManagementService`` over gRPC, on loopback. It speaks the real wire
protocol with the client library's own message types, so the real
``KeyManagementServiceClient`` talks to it unchanged. What it implements, as Cloud KMS does:

- ``Encrypt`` under the key's primary version and ``Decrypt`` with the version recorded in the
  ciphertext: real AES-256-GCM under a random master key per version, with the request's
  additional authenticated data as the GCM AAD.
- The CRC32C integrity fields: request checksums are verified (INVALID_ARGUMENT on mismatch,
  with Cloud KMS's wording), the ``verified_*`` flags are set only for checksums that were sent,
  and responses carry ``ciphertext_crc32c``/``plaintext_crc32c``.
- Key version states: ``UpdateCryptoKeyVersion`` (ENABLED/DISABLED), ``DestroyCryptoKeyVersion``
  and ``RestoreCryptoKeyVersion``; a version that is not ENABLED gives FAILED_PRECONDITION.
- ``CreateKeyRing`` and ``CreateCryptoKey`` (``ENCRYPT_DECRYPT`` keys, with a first, primary
  version unless ``skip_initial_version_creation``), so another process can make its keys
  through the API. Key rings are not otherwise modelled: any well-formed parent is accepted.
- A key that does not exist and a key the caller may not use answer alike, as Cloud KMS does
  (it will not tell a caller without permission whether a key exists): PERMISSION_DENIED,
  "Permission 'cloudkms.cryptoKeyVersions.useToEncrypt' denied on resource '<name>' (or it may
  not exist)." :meth:`KmsServer.deny` is the tenant removing the IAM binding.
- Rotation as the service does it: ``CreateCryptoKeyVersion`` (and :meth:`KmsServer.rotate`)
  adds a version that is *not* primary; Encrypt keeps using the primary until
  ``UpdateCryptoKeyPrimaryVersion`` (``gcloud kms keys update --primary-version``) or a
  rotation schedule (``rotate(..., make_primary=True)``) moves it.
- Optionally TLS and a bearer token (``KmsServer(tls=..., token=...)``): each call must carry
  ``authorization: Bearer <token>``, else UNAUTHENTICATED, as from a real token source.

Faults, per key so that tests sharing the server stay independent: :meth:`KmsServer.corrupt`
tampers with one field of the next responses (a flipped ciphertext or plaintext bit, a wrong
checksum, a ``verified_*`` flag left false, another key's version name), :meth:`KmsServer.fail`
answers with a status code, :meth:`KmsServer.delay` answers late.

In a test suite::

    from sqlalchemy_cmk.testing.gcp_kms import KmsServer

    with KmsServer() as server:                   # 127.0.0.1:<free port>
        provider = GcpKmsProvider(server.client())
        ref = "gcp-kms://" + server.add_key(f"{RING}/cryptoKeys/acme")
        ...
        server.set_state(ref.removeprefix("gcp-kms://"), State.DISABLED)   # the tenant revokes

From a shell or another language's test suite, on a port of your choice (0: any free one)::

    python -m sqlalchemy_cmk.testing.gcp_kms --port 0 [--key projects/p/.../cryptoKeys/k ...]
    # prints the gRPC target 127.0.0.1:<port> on its first line, serves until SIGINT/SIGTERM

Clients reach it over an insecure channel (``grpc.insecure_channel(target)`` in a
``KeyManagementServiceGrpcTransport``; an ``api_endpoint`` alone would make the client use
TLS). Needs the ``gcp-testing`` extra (``pip install 'sqlalchemy-cmk[gcp-testing]'``).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import struct
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._support import make_tls as make_tls
from ._support import missing

_MISSING = missing(("google.cloud.kms", "grpc", "google_crc32c"))
if _MISSING:
    raise ImportError(
        f"the local Cloud KMS server needs {', '.join(_MISSING)}; install it with: "
        "pip install 'sqlalchemy-cmk[gcp-testing]'",
        name=_MISSING[0],
    )

import google_crc32c  # noqa: E402
import grpc  # type: ignore[import-untyped]  # noqa: E402
from google.cloud import kms  # noqa: E402
from google.cloud.kms_v1.services.key_management_service.transports import (  # noqa: E402
    KeyManagementServiceGrpcTransport,
)

__all__ = ["CORRUPTIONS", "SERVICE", "KmsServer", "State", "crc32c", "main", "make_tls"]

SERVICE = "google.cloud.kms.v1.KeyManagementService"
State = kms.CryptoKeyVersion.CryptoKeyVersionState
_CT_HEADER = struct.Struct(">BI")  # format byte, version id
_MAX_DATA = 64 * 1024

CORRUPTIONS = (
    "ciphertext",  # Encrypt: a bit of the ciphertext flips after its checksum was computed
    "ciphertext_crc32c",  # Encrypt: a wrong checksum
    "verified_plaintext_crc32c",  # Encrypt: the flag stays false
    "verified_additional_authenticated_data_crc32c",
    "name",  # Encrypt: the response names a version of another key
    "plaintext",  # Decrypt: a bit of the plaintext flips after its checksum was computed
    "plaintext_crc32c",  # Decrypt: a wrong checksum
)


def crc32c(data: bytes) -> int:
    return int(google_crc32c.value(data))


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Key:
    versions: dict[int, tuple[AESGCM, Any]] = field(default_factory=dict)  # id -> (aead, state)
    primary: int = 0
    denied: bool = False
    corrupt: str | None = None
    fail: tuple[grpc.StatusCode, str, int] | None = None  # code, message, remaining
    delay: float = 0.0


_KEY_NAME = re.compile(
    r"projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[A-Za-z0-9_-]{1,63}"
)


class KmsServer:
    """The server; ``start()`` binds ``host:port``, ``stop()`` ends every thread.

    Args:
        host: The address to listen on; loopback by default (the server has no authentication
            unless ``token`` is given).
        port: The port; 0 picks a free one (see :attr:`address` once started).
        workers: Handler threads.
        tls: (private key PEM, certificate chain PEM) to serve TLS; None for plaintext.
        token: The bearer token every call must carry; None accepts any caller.

    Attributes:
        address: The gRPC target, ``<host>:<port>``, once started.
        calls: ``"<RPC>:<key name>"`` -> how many Encrypt/Decrypt calls reached the key.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        workers: int = 8,
        tls: tuple[bytes, bytes] | None = None,
        token: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._tls = tls
        self.token = token
        self.tokens_seen: Counter[str] = Counter()
        self._keys: dict[str, _Key] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._workers = workers
        self._server: grpc.Server | None = None
        self._pool: futures.ThreadPoolExecutor | None = None
        self.address = ""
        self.calls: Counter[str] = Counter()  # "Encrypt:<key name>" -> count
        self.last_aad: dict[str, bytes] = {}  # key name -> AAD of its last Encrypt/Decrypt

    # -- lifecycle -----------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"KmsServer({self.address or 'not started'})"

    def __enter__(self) -> KmsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> str:
        """Start serving; returns :attr:`address`. RuntimeError if the port cannot be bound."""
        if self._server is not None:
            raise RuntimeError("this KmsServer is already serving")
        self._stopping.clear()
        self._pool = futures.ThreadPoolExecutor(self._workers, thread_name_prefix="fake-kms")
        # Without so_reuseport=0, gRPC would share a port another server already listens on.
        server = grpc.server(self._pool, options=[("grpc.so_reuseport", 0)])
        handlers: dict[str, tuple[Any, Any, Any]] = {
            "CreateKeyRing": (self._create_ring, kms.CreateKeyRingRequest, kms.KeyRing),
            "CreateCryptoKey": (self._create_key, kms.CreateCryptoKeyRequest, kms.CryptoKey),
            "Encrypt": (self._encrypt, kms.EncryptRequest, kms.EncryptResponse),
            "Decrypt": (self._decrypt, kms.DecryptRequest, kms.DecryptResponse),
            "UpdateCryptoKeyVersion": (
                self._update_version,
                kms.UpdateCryptoKeyVersionRequest,
                kms.CryptoKeyVersion,
            ),
            "DestroyCryptoKeyVersion": (
                self._destroy_version,
                kms.DestroyCryptoKeyVersionRequest,
                kms.CryptoKeyVersion,
            ),
            "RestoreCryptoKeyVersion": (
                self._restore_version,
                kms.RestoreCryptoKeyVersionRequest,
                kms.CryptoKeyVersion,
            ),
            "CreateCryptoKeyVersion": (
                self._create_version,
                kms.CreateCryptoKeyVersionRequest,
                kms.CryptoKeyVersion,
            ),
            "UpdateCryptoKeyPrimaryVersion": (
                self._update_primary,
                kms.UpdateCryptoKeyPrimaryVersionRequest,
                kms.CryptoKey,
            ),
        }
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        method: grpc.unary_unary_rpc_method_handler(
                            self._guard(fn),
                            request_deserializer=req.deserialize,
                            response_serializer=resp.serialize,
                        )
                        for method, (fn, req, resp) in handlers.items()
                    },
                ),
            )
        )
        host = f"[{self.host}]" if ":" in self.host else self.host
        try:
            if self._tls is not None:
                credentials = grpc.ssl_server_credentials([self._tls])
                port = server.add_secure_port(f"{host}:{self.port}", credentials)
            else:
                port = server.add_insecure_port(f"{host}:{self.port}")
        except RuntimeError:  # grpcio >= 1.60 raises where older versions returned 0
            port = 0
        if not port:
            self._pool.shutdown(wait=False)
            self._pool = None
            raise RuntimeError(f"could not bind {host}:{self.port} (in use, or no such address)")
        server.start()
        self._server = server
        self.address = f"{host}:{port}"
        return self.address

    def stop(self) -> None:
        self._stopping.set()  # wakes delayed handlers
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def client(self) -> Any:
        """A ``KeyManagementServiceClient`` for this server, over an insecure channel (plaintext
        servers only; close it with ``client.transport.close()``)."""
        if self._tls is not None:
            raise RuntimeError("a TLS server needs a client with its CA: build the channel")
        channel = grpc.insecure_channel(self.address)
        return kms.KeyManagementServiceClient(
            transport=KeyManagementServiceGrpcTransport(channel=channel)
        )

    # -- administration (what the tenant does in its project) ---------------------------------

    def add_key(self, name: str) -> str:
        """Create a CryptoKey with one ENABLED version; returns its resource name."""
        with self._lock:
            self._keys[name] = _Key()
        self.rotate(name, make_primary=True)
        return name

    def rotate(self, name: str, *, make_primary: bool = False) -> int:
        """Add an ENABLED version; it becomes primary only with ``make_primary`` (a rotation
        schedule does that) or :meth:`set_primary`, as in Cloud KMS."""
        with self._lock:
            key = self._keys[name]
            version = max(key.versions, default=0) + 1
            key.versions[version] = (AESGCM(os.urandom(32)), State.ENABLED)
            if make_primary:
                key.primary = version
            return version

    def set_primary(self, name: str, version: int) -> None:
        """``gcloud kms keys update <key> --primary-version=<version>``."""
        with self._lock:
            key = self._keys[name]
            if key.versions[version][1] != State.ENABLED:
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{name}/cryptoKeyVersions/{version} is not enabled.",
                )
            key.primary = version

    def primary(self, name: str) -> int:
        with self._lock:
            return self._keys[name].primary

    def set_state(self, name: str, state: Any, version: int | None = None) -> None:
        """Set the state of one version, or of every version when ``version`` is None."""
        with self._lock:
            key = self._keys[name]
            for v in [version] if version is not None else list(key.versions):
                key.versions[v] = (key.versions[v][0], state)

    def deny(self, name: str) -> None:
        """The tenant removed the application's IAM binding on the key."""
        with self._lock:
            self._keys[name].denied = True

    def allow(self, name: str) -> None:
        with self._lock:
            self._keys[name].denied = False

    # -- faults --------------------------------------------------------------------------------

    def corrupt(self, name: str, what: str | None) -> None:
        """Tamper with ``what`` (one of CORRUPTIONS) in every response for the key; None stops."""
        assert what is None or what in CORRUPTIONS, what
        with self._lock:
            self._keys[name].corrupt = what

    def fail(self, name: str, code: grpc.StatusCode, times: int = 1, message: str = "") -> None:
        """Answer the next ``times`` Encrypt/Decrypt calls for the key with ``code``."""
        with self._lock:
            self._keys[name].fail = (code, message or f"injected {code.name}", times)

    def delay(self, name: str, seconds: float) -> None:
        with self._lock:
            self._keys[name].delay = seconds

    # -- the RPCs ------------------------------------------------------------------------------

    def _guard(self, fn: Any) -> Any:
        def handler(request: Any, ctx: grpc.ServicerContext) -> Any:
            try:
                if self.token is not None:
                    metadata = dict(ctx.invocation_metadata())
                    sent = str(metadata.get("authorization", ""))
                    with self._lock:
                        self.tokens_seen[sent] += 1
                    if sent != f"Bearer {self.token}":
                        raise _Abort(
                            grpc.StatusCode.UNAUTHENTICATED,
                            "Request had invalid authentication credentials. Expected OAuth 2 "
                            "access token, login cookie or other valid authentication "
                            "credential.",
                        )
                return fn(request)
            except _Abort as exc:
                ctx.abort(exc.code, exc.message)

        return handler

    def _usable_key(self, method: str, name: str, permission: str) -> _Key:
        with self._lock:
            self.calls[f"{method}:{name}"] += 1
            key = self._keys.get(name)
            if key is None:
                # Cloud KMS checks IAM first and, without permission, will not say whether the
                # key exists; a caller with no key to be granted on never has permission.
                raise _Abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"Permission '{permission}' denied on resource '{name}' (or it may not exist).",
                )
            fail = key.fail
            if fail is not None:
                code, message, remaining = fail
                key.fail = (code, message, remaining - 1) if remaining > 1 else None
            delay = key.delay
        if delay:
            self._stopping.wait(delay)
        if fail is not None:
            raise _Abort(fail[0], fail[1])
        if key.denied:
            raise _Abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"Permission '{permission}' denied on resource '{name}' (or it may not exist).",
            )
        return key

    @staticmethod
    def _check_crc(data: bytes, crc: int | None, field_name: str, data_name: str) -> bool:
        if crc is None:
            return False
        if crc != crc32c(data):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"The checksum in field {field_name} did not match the data in field "
                f"{data_name}. Please check your data and try again.",
            )
        return True

    def _encrypt(self, req: kms.EncryptRequest) -> kms.EncryptResponse:
        key = self._usable_key("Encrypt", req.name, "cloudkms.cryptoKeyVersions.useToEncrypt")
        plaintext, aad = bytes(req.plaintext), bytes(req.additional_authenticated_data)
        if not 0 < len(plaintext) <= _MAX_DATA or len(aad) > _MAX_DATA:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "plaintext or AAD size out of range")
        pt_ok = self._check_crc(plaintext, req.plaintext_crc32c, "plaintext_crc32c", "plaintext")
        aad_ok = self._check_crc(
            aad,
            req.additional_authenticated_data_crc32c,
            "additional_authenticated_data_crc32c",
            "additional_authenticated_data",
        )
        with self._lock:
            version = key.primary
            aead, state = key.versions[version]
            corrupt = key.corrupt
            self.last_aad[req.name] = aad
        version_name = f"{req.name}/cryptoKeyVersions/{version}"
        if state != State.ENABLED:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{version_name} is not enabled, current state is: {State(state).name}.",
            )
        nonce = os.urandom(12)
        ciphertext = _CT_HEADER.pack(1, version) + nonce + aead.encrypt(nonce, plaintext, aad)
        resp = kms.EncryptResponse(
            name=version_name,
            ciphertext=ciphertext,
            ciphertext_crc32c=crc32c(ciphertext),
            verified_plaintext_crc32c=pt_ok,
            verified_additional_authenticated_data_crc32c=aad_ok,
            protection_level=kms.ProtectionLevel.SOFTWARE,
        )
        if corrupt == "ciphertext":
            resp.ciphertext = _flip(ciphertext)
        elif corrupt == "ciphertext_crc32c":
            resp.ciphertext_crc32c = (crc32c(ciphertext) + 1) % 2**32
        elif corrupt == "verified_plaintext_crc32c":
            resp.verified_plaintext_crc32c = False
        elif corrupt == "verified_additional_authenticated_data_crc32c":
            resp.verified_additional_authenticated_data_crc32c = False
        elif corrupt == "name":
            resp.name = f"{req.name}-other/cryptoKeyVersions/{version}"
        return resp

    def _decrypt(self, req: kms.DecryptRequest) -> kms.DecryptResponse:
        key = self._usable_key("Decrypt", req.name, "cloudkms.cryptoKeyVersions.useToDecrypt")
        ciphertext, aad = bytes(req.ciphertext), bytes(req.additional_authenticated_data)
        self._check_crc(ciphertext, req.ciphertext_crc32c, "ciphertext_crc32c", "ciphertext")
        self._check_crc(
            aad,
            req.additional_authenticated_data_crc32c,
            "additional_authenticated_data_crc32c",
            "additional_authenticated_data",
        )
        invalid = _Abort(
            grpc.StatusCode.INVALID_ARGUMENT, "Decryption failed: the ciphertext is invalid."
        )
        if len(ciphertext) < _CT_HEADER.size + 12 + 16:
            raise invalid
        fmt, version = _CT_HEADER.unpack_from(ciphertext)
        with self._lock:
            found = key.versions.get(version) if fmt == 1 else None
            corrupt = key.corrupt
            primary = key.primary
            self.last_aad[req.name] = aad
        if found is None:
            raise invalid
        aead, state = found
        if state != State.ENABLED:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{req.name}/cryptoKeyVersions/{version} is not enabled, current state is: "
                f"{State(state).name}.",
            )
        body = ciphertext[_CT_HEADER.size :]
        try:
            plaintext = aead.decrypt(body[:12], body[12:], aad)
        except InvalidTag:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Decryption failed: verify that 'name' refers to the correct CryptoKey.",
            ) from None
        resp = kms.DecryptResponse(
            plaintext=plaintext,
            plaintext_crc32c=crc32c(plaintext),
            used_primary=version == primary,
            protection_level=kms.ProtectionLevel.SOFTWARE,
        )
        if corrupt == "plaintext":
            resp.plaintext = _flip(plaintext)
        elif corrupt == "plaintext_crc32c":
            resp.plaintext_crc32c = (crc32c(plaintext) + 1) % 2**32
        return resp

    def _create_ring(self, req: kms.CreateKeyRingRequest) -> kms.KeyRing:
        if not re.fullmatch(r"projects/[^/]+/locations/[^/]+", req.parent) or not re.fullmatch(
            r"[A-Za-z0-9_-]{1,63}", req.key_ring_id
        ):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "invalid parent or key_ring_id")
        return kms.KeyRing(name=f"{req.parent}/keyRings/{req.key_ring_id}")

    def _create_key(self, req: kms.CreateCryptoKeyRequest) -> kms.CryptoKey:
        name = f"{req.parent}/cryptoKeys/{req.crypto_key_id}"
        if not _KEY_NAME.fullmatch(name):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "invalid parent or crypto_key_id")
        purpose = req.crypto_key.purpose
        if purpose != kms.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT, "only ENCRYPT_DECRYPT keys are emulated here"
            )
        with self._lock:
            if name in self._keys:
                raise _Abort(grpc.StatusCode.ALREADY_EXISTS, f"{name} already exists.")
            self._keys[name] = _Key()
        if req.skip_initial_version_creation:
            return kms.CryptoKey(name=name, purpose=purpose)
        version = self.rotate(name, make_primary=True)
        return kms.CryptoKey(name=name, primary=self._describe(name, version), purpose=purpose)

    def _version(self, version_name: str) -> tuple[str, int]:
        key_name, sep, version = version_name.rpartition("/cryptoKeyVersions/")
        with self._lock:
            key = self._keys.get(key_name)
            if not sep or key is None or not version.isdigit() or int(version) not in key.versions:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"{version_name} not found.")
        return key_name, int(version)

    def _describe(self, key_name: str, version: int) -> kms.CryptoKeyVersion:
        with self._lock:
            state = self._keys[key_name].versions[version][1]
        return kms.CryptoKeyVersion(
            name=f"{key_name}/cryptoKeyVersions/{version}",
            state=state,
            protection_level=kms.ProtectionLevel.SOFTWARE,
            algorithm=kms.CryptoKeyVersion.CryptoKeyVersionAlgorithm.GOOGLE_SYMMETRIC_ENCRYPTION,
        )

    def _update_version(self, req: kms.UpdateCryptoKeyVersionRequest) -> kms.CryptoKeyVersion:
        key_name, version = self._version(req.crypto_key_version.name)
        if list(req.update_mask.paths) != ["state"] or req.crypto_key_version.state not in (
            State.ENABLED,
            State.DISABLED,
        ):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "only state ENABLED/DISABLED")
        with self._lock:
            current = self._keys[key_name].versions[version][1]
        if current not in (State.ENABLED, State.DISABLED):
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{req.crypto_key_version.name} is in state {State(current).name}.",
            )
        self.set_state(key_name, req.crypto_key_version.state, version)
        return self._describe(key_name, version)

    def _create_version(self, req: kms.CreateCryptoKeyVersionRequest) -> kms.CryptoKeyVersion:
        with self._lock:
            known = req.parent in self._keys
        if not known:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"{req.parent} not found.")
        return self._describe(req.parent, self.rotate(req.parent))

    def _update_primary(self, req: kms.UpdateCryptoKeyPrimaryVersionRequest) -> kms.CryptoKey:
        key_name, version = self._version(
            f"{req.name}/cryptoKeyVersions/{req.crypto_key_version_id}"
        )
        self.set_primary(key_name, version)
        return kms.CryptoKey(
            name=key_name,
            primary=self._describe(key_name, version),
            purpose=kms.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT,
        )

    def _destroy_version(self, req: kms.DestroyCryptoKeyVersionRequest) -> kms.CryptoKeyVersion:
        key_name, version = self._version(req.name)
        self.set_state(key_name, State.DESTROY_SCHEDULED, version)
        return self._describe(key_name, version)

    def _restore_version(self, req: kms.RestoreCryptoKeyVersionRequest) -> kms.CryptoKeyVersion:
        key_name, version = self._version(req.name)
        with self._lock:
            current = self._keys[key_name].versions[version][1]
        if current != State.DESTROY_SCHEDULED:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"{req.name} is not scheduled.")
        self.set_state(key_name, State.DISABLED, version)
        return self._describe(key_name, version)


def _flip(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


# -- the command ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sqlalchemy_cmk.testing.gcp_kms [--host H] [--port P] [--key NAME ...]``.

    Prints the gRPC target (``host:port``) on the first line of standard output, then serves
    until SIGINT or SIGTERM; exit status 0 after a signal, 1 if the server cannot start, 2 for
    bad arguments.
    """
    parser = argparse.ArgumentParser(
        prog="python -m sqlalchemy_cmk.testing.gcp_kms",
        description="A local Cloud KMS (gRPC, plaintext) that refuses disabled or destroyed key "
        "versions and keys the caller may not use, as Cloud KMS does. For tests only.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port, 0 for a free one (default)")
    parser.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="NAME",
        help="create this CryptoKey (projects/P/locations/L/keyRings/R/cryptoKeys/K) with one "
        "enabled, primary version; repeatable",
    )
    args = parser.parse_args(argv)
    for name in args.key:
        if not _KEY_NAME.fullmatch(name):
            parser.error(f"--key {name!r} is not a CryptoKey resource name")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    server = KmsServer(args.host, args.port)
    try:
        try:
            if args.port:
                # Bind it once ourselves: a port in use is then one line of ours, not gRPC's
                # C-core log on stderr followed by ours.
                family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
                socket.create_server((args.host, args.port), family=family).close()
            server.start()
        except (RuntimeError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for name in args.key:
            server.add_key(name)
        print(server.address, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
