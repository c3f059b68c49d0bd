"""A provider for on-premises key managers that speak KMIP (PyKMIP client, ``[kmip]`` extra).

Key references are ``kmip://<unique identifier>`` (the KMIP Unique Identifier of an AES key on
the provider's default server) or ``kmip://<server>/<unique identifier>`` where ``<server>`` is a
name given in ``servers=`` (by convention ``host:port``), so that one provider serves tenants
whose keys live in different key managers. The connection (host, port, client certificate and
key, CA) lives in a *client factory*: PyKMIP clients hold one TLS connection each and are not
thread-safe, so the provider keeps a small pool per server and replaces a connection that broke.

The envelope. PyKMIP's client offers Encrypt/Decrypt but no authenticated encryption with
associated data, so the tenant cannot be bound by the KMS as AWS's EncryptionContext does. We
bind it in our own envelope instead:

1. draw a fresh random 32-byte key-encryption key (KEK) and a random 16-byte counter block;
2. have the KMIP server encrypt the KEK under the tenant's key with AES-CTR (the KMIP Encrypt
   operation; the server never sees the data key);
3. seal the data key with AES-256-GCM under the KEK, with associated data that covers the whole
   header (version, data label, counter block, encrypted KEK), the key's unique identifier and
   the tenant.

Wrapped layout, version 1 (all lengths checked on parse)::

    offset  size  field
    0       1     version            0x01
    1       1     label length L     0..255
    2       L     data label         UTF-8, informational (for audits), authenticated
    2+L     16    counter block      AES-CTR initial counter the KMIP server used
    18+L    32    encrypted KEK      AES-CTR(tenant's KMIP key, counter block, KEK)
    50+L    12    nonce              AES-GCM nonce
    62+L    48    sealed data key    AES-256-GCM(KEK, nonce, DEK, aad): 32 bytes + 16-byte tag

Why this is sound: only the KMIP server can turn the encrypted KEK back into the KEK, so only
a caller the server lets Decrypt with the tenant's key can open the GCM seal, and the seal
authenticates the tenant: a wrapped key of tenant A presented as tenant B's fails with
``DecryptionError`` even when both tenants share one KMIP key, and any changed byte either
changes the KEK or breaks the tag. The KEK is used for exactly one seal, so nonce reuse cannot
happen. AES-CTR (not CBC) is deliberate: PyKMIP's server always pads CBC, and a server that
checks padding on Decrypt would turn a tampered wrapped key into a padding oracle on the KEK;
CTR decrypts any 32 bytes without a check, so the only verdict an attacker gets is our GCM
tag's. CTR is malleable and needs a unique counter block per encryption: the block is 16 random
bytes per wrap (a collision is a 2**-64 event per pair) and stored, and malleability only yields
a wrong KEK, which the tag rejects. The binding is enforced by this library, not by the KMS:
the KMIP server's audit log shows which client identity encrypted or decrypted with which key
and when, not the tenant or the data label.
"""

from __future__ import annotations

import contextlib
import math
import os
import ssl
import struct
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import (
    CMKError,
    ConfigurationError,
    DecryptionError,
    KeyAccessDeniedError,
    KeyNotFoundError,
    KMSUnavailableError,
)
from . import call_timeout, tls_failure

try:
    with warnings.catch_warnings():
        # PyKMIP 0.11 calls SQLAlchemy's legacy declarative_base() while it is imported; the
        # warning is PyKMIP's to fix and says nothing to our users, so it is silenced here only.
        warnings.filterwarnings(
            "ignore",
            message=r".*declarative_base\(\)",
            category=DeprecationWarning,
        )
        from kmip.core import enums as _kmip_enums  # type: ignore[import-untyped]
        from kmip.core import exceptions as _kmip_core_errors
        from kmip.pie import exceptions as _kmip_pie_errors  # type: ignore[import-untyped]
        from kmip.pie.client import ProxyKmipClient  # type: ignore[import-untyped]
        from kmip.services.kmip_protocol import (  # type: ignore[import-untyped]
            RequestLengthMismatch,
        )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the KMIP provider needs PyKMIP; install it with: pip install 'sqlalchemy-cmk[kmip]'"
    ) from exc

__all__ = ["KmipProvider"]

_SCHEME = "kmip"
_PREFIX = "kmip://"
_VERSION = 1
_AAD_DOMAIN = b"sqlalchemy-cmk/kmip-wrap/v1\x00"
_DEK_SIZE = 32
_KEK_SIZE = 32
_COUNTER_SIZE = 16
_NONCE_SIZE = 12
_TAG_SIZE = 16
_MAX_LABEL = 255
# version, label length, [label], counter block, encrypted KEK, nonce, sealed data key.
_FIXED_SIZE = 2 + _COUNTER_SIZE + _KEK_SIZE + _NONCE_SIZE + _DEK_SIZE + _TAG_SIZE
_DEFAULT_SERVER = ""

#: What the KMIP server is asked to do with the tenant's key: AES-CTR over the 32-byte KEK.
_CTR_PARAMETERS = {
    "cryptographic_algorithm": _kmip_enums.CryptographicAlgorithm.AES,
    "block_cipher_mode": _kmip_enums.BlockCipherMode.CTR,
}


def _reasons(*names: str) -> frozenset[Any]:
    # Looked up by name: PyKMIP versions differ in which KMIP 1.x/2.0 reasons they define.
    return frozenset(
        getattr(_kmip_enums.ResultReason, n) for n in names if hasattr(_kmip_enums.ResultReason, n)
    )


#: The server refused: key revoked, deactivated, destroyed-but-known, compromised, not granted.
_DENIED = _reasons(
    "PERMISSION_DENIED",
    "NOT_AUTHORISED",
    "AUTHENTICATION_NOT_SUCCESSFUL",
    "WRONG_KEY_LIFECYCLE_STATE",
    "OBJECT_ARCHIVED",
    "OBJECT_DESTROYED",
    "USAGE_LIMIT_EXCEEDED",
    "INCOMPATIBLE_CRYPTOGRAPHIC_USAGE_MASK",
    "ATTESTATION_REQUIRED",
    "ATTESTATION_FAILED",
)
#: The server does not know the unique identifier.
_NOT_FOUND = _reasons("ITEM_NOT_FOUND", "OBJECT_NOT_FOUND")
#: The server failed in a way that trying again may cure (the KMIP equivalents of a 5xx).
_TRANSIENT = _reasons(
    "GENERAL_FAILURE",
    "INTERNAL_SERVER_ERROR",
    "SERVER_LIMIT_EXCEEDED",
    "OPERATION_CANCELED_BY_REQUESTER",
    "PROTECTION_STORAGE_UNAVAILABLE",
)
#: The connection failed or the byte stream cannot be trusted any more: drop the connection.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, socket timeouts, ssl.SSLError (TLS failures)
    EOFError,  # the server closed the connection
    RequestLengthMismatch,
    _kmip_pie_errors.ClientConnectionFailure,
    _kmip_pie_errors.ClientConnectionNotOpen,
    _kmip_core_errors.ConnectionClosed,
    _kmip_core_errors.InvalidKmipEncoding,
    _kmip_core_errors.InvalidPrimitiveLength,
    _kmip_core_errors.StreamNotEmptyError,
    _kmip_core_errors.ReadValueError,
)

_T = TypeVar("_T")
ClientFactory = Callable[[], Any]


def _brief(text: object, limit: int = 200) -> str:
    s = str(text)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _length_prefixed(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack(">I", len(raw)) + raw


def _aad(header: bytes, uid: str, tenant: str) -> bytes:
    # The header (version, label, counter block, encrypted KEK) verbatim, then the key and the
    # tenant length-prefixed: an unambiguous encoding.
    return _AAD_DOMAIN + header + _length_prefixed(uid) + _length_prefixed(tenant)


def _label_bytes(label: str) -> bytes:
    raw = label.encode("utf-8")
    if len(raw) <= _MAX_LABEL:
        return raw
    # Informational only: keep the first 255 bytes, cut at a character boundary.
    return raw[:_MAX_LABEL].decode("utf-8", errors="ignore").encode("utf-8")


class _Pool:
    """Up to ``size`` open clients for one server; a broken one is closed, not reused."""

    def __init__(self, factory: ClientFactory, size: int) -> None:
        self._factory = factory
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)

    def acquire(self, *, fresh: bool = False) -> tuple[Any, bool]:
        """An open client and whether it was reused (it may have gone stale while idle).

        Waits for a free connection no longer than what is left of ``kms_deadline``.
        """
        left = call_timeout(math.inf)
        if not self._slots.acquire(timeout=None if math.isinf(left) else left):
            raise TimeoutError("every pooled KMIP connection stayed busy until the deadline")
        if not fresh:
            with self._lock:
                if self._idle:
                    return self._idle.pop(), True
        try:
            client = self._factory()
            client.open()
        except BaseException:
            self._slots.release()
            raise
        return client, False

    def release(self, client: Any, *, healthy: bool) -> None:
        try:
            if healthy:
                with self._lock:
                    self._idle.append(client)
            else:
                _close_quietly(client)
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for client in idle:
            _close_quietly(client)


def _close_quietly(client: Any) -> None:
    # PyKMIP forgets its socket without closing it when shutdown() fails on a broken
    # connection, leaking the descriptor: close the socket ourselves as well.
    sock = getattr(getattr(client, "proxy", None), "socket", None)
    with contextlib.suppress(Exception):
        client.close()
    if sock is not None:
        with contextlib.suppress(Exception):
            sock.close()


class KmipProvider:
    """Wraps data keys under AES keys held by KMIP key managers (see the module docstring).

    Build it with :meth:`connect` (one server, short timeouts, TLS with client certificate), or
    give client factories yourself::

        provider = KmipProvider(servers={
            "kms.acme.example:5696": KmipProvider.tls_client_factory(
                "kms.acme.example", 5696, cert="app.crt", key="app.key", ca="acme-ca.crt"),
            "hsm.globex.example:5696": KmipProvider.tls_client_factory(...),
        })
        # tenant keys: "kmip://kms.acme.example:5696/8c1f...", "kmip://hsm.globex.example:5696/42"

    A factory returns a new, *unopened* client with the ``ProxyKmipClient`` interface
    (``open``, ``close``, ``encrypt``, ``decrypt``); the provider opens, pools and closes them.
    """

    scheme = _SCHEME

    def __init__(
        self,
        client_factory: ClientFactory | None = None,
        *,
        servers: Mapping[str, ClientFactory] | None = None,
        pool_size: int = 4,
    ) -> None:
        """Args:
            client_factory: Makes clients for the default server, which serves
                ``kmip://<uid>`` references.
            servers: Server name -> client factory, serving ``kmip://<name>/<uid>``. Names
                must not contain ``/``; ``host:port`` is the recommended convention.
            pool_size: Connections kept per server (also the cap on concurrent calls to it).

        Raises:
            ConfigurationError: no server at all, a bad server name, or a pool size below 1.
        """
        if pool_size < 1:
            raise ConfigurationError("KmipProvider pool_size must be at least 1")
        factories: dict[str, ClientFactory] = {}
        if client_factory is not None:
            factories[_DEFAULT_SERVER] = client_factory
        for name, factory in (servers or {}).items():
            if not name or "/" in name:
                raise ConfigurationError(
                    f"KMIP server name {name!r} must be non-empty and contain no '/'"
                )
            factories[name] = factory
        if not factories:
            raise ConfigurationError(
                "KmipProvider needs a client_factory or servers={name: factory}; "
                "KmipProvider.connect(host, port, cert=..., key=..., ca=...) builds one"
            )
        self._pools = {name: _Pool(f, pool_size) for name, f in factories.items()}
        self._pool_size = pool_size

    def __repr__(self) -> str:
        names = ["<default>" if n == _DEFAULT_SERVER else n for n in sorted(self._pools)]
        return f"KmipProvider(servers={names!r}, pool_size={self._pool_size})"

    @classmethod
    def connect(
        cls,
        host: str,
        port: int = 5696,
        *,
        cert: str | os.PathLike[str],
        key: str | os.PathLike[str],
        ca: str | os.PathLike[str],
        timeout: float = 5.0,
        pool_size: int = 4,
    ) -> KmipProvider:
        """A provider for one KMIP server: keys are ``kmip://<uid>``.

        Args:
            host: The KMIP server's host name (checked against its certificate) or address.
            port: The KMIP port, 5696 by default.
            cert: PEM file of the application's client certificate (the server derives the
                client identity from it).
            key: PEM file of that certificate's private key.
            ca: PEM file of the CA that signed the server's certificate.
            timeout: Seconds allowed for connecting (TCP and TLS handshake) and for each
                read; PyKMIP's default is 30.
            pool_size: Connections kept open to the server.
        """
        factory = cls.tls_client_factory(host, port, cert=cert, key=key, ca=ca, timeout=timeout)
        return cls(factory, pool_size=pool_size)

    @staticmethod
    def tls_client_factory(
        host: str,
        port: int = 5696,
        *,
        cert: str | os.PathLike[str],
        key: str | os.PathLike[str],
        ca: str | os.PathLike[str],
        timeout: float = 5.0,
    ) -> ClientFactory:
        """A factory of ``ProxyKmipClient`` for one server, with short timeouts and strict TLS.

        PyKMIP builds its TLS context from a deprecated protocol constant and does not check
        the server's host name; the clients made here use an ``ssl.create_default_context``
        context instead: TLS 1.2 or later, the server's certificate verified against ``ca``
        *and* ``host``, the client certificate presented.

        Raises:
            ConfigurationError: a certificate, key or CA file cannot be loaded.
        """
        if timeout <= 0:
            raise ConfigurationError("the KMIP timeout must be positive")
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=os.fspath(ca))
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(os.fspath(cert), os.fspath(key))
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"cannot load the KMIP TLS files (cert={os.fspath(cert)!r}, "
                f"key={os.fspath(key)!r}, ca={os.fspath(ca)!r}): {type(exc).__name__}: "
                f"{_brief(exc)}"
            ) from None

        def factory() -> Any:
            client = ProxyKmipClient(
                hostname=host,
                port=port,
                cert=os.fspath(cert),
                key=os.fspath(key),
                ca=os.fspath(ca),
            )
            proxy = client.proxy

            def create_socket(sock: Any) -> None:
                # Replaces KMIPProxy._create_socket (called by open() for each connection).
                proxy.socket = context.wrap_socket(sock, server_hostname=host)
                # The handshake ends with kms_deadline when that comes first.
                proxy.socket.settimeout(call_timeout(timeout))

            proxy._create_socket = create_socket
            proxy.timeout = timeout
            return client

        return factory

    def close(self) -> None:
        """Close the pooled connections (new calls open new ones)."""
        for pool in self._pools.values():
            pool.close()

    # -- the protocol ---------------------------------------------------------------------------

    def wrap_key(self, key_ref: str, data_key: bytes, context: Mapping[str, str]) -> bytes:
        pool, uid = self._resolve(key_ref)
        if len(data_key) != _DEK_SIZE:
            raise ConfigurationError(
                f"the KMIP provider wraps {_DEK_SIZE}-byte data keys, got {len(data_key)} bytes",
                key_ref=key_ref,
                provider=_SCHEME,
            )
        kek = os.urandom(_KEK_SIZE)
        counter = os.urandom(_COUNTER_SIZE)

        def encrypt(client: Any) -> tuple[bytes, bytes | None]:
            data, generated = client.encrypt(
                kek,
                uid=uid,
                cryptographic_parameters=dict(_CTR_PARAMETERS),
                iv_counter_nonce=counter,
            )
            return data, generated

        encrypted_kek, generated = self._call(pool, key_ref, "Encrypt", encrypt)
        if generated is not None:  # a server may choose the counter block itself
            counter = generated
        if len(encrypted_kek) != _KEK_SIZE or len(counter) != _COUNTER_SIZE:
            raise KeyAccessDeniedError(
                f"the KMIP server returned {len(encrypted_kek)} bytes and a "
                f"{len(counter)}-byte counter block for AES-CTR over {_KEK_SIZE} bytes; the key "
                "must be an AES key usable for Encrypt and Decrypt",
                key_ref=key_ref,
                provider=_SCHEME,
            )
        label = _label_bytes(context.get("data_label", ""))
        header = bytes([_VERSION, len(label)]) + label + counter + encrypted_kek
        nonce = os.urandom(_NONCE_SIZE)
        sealed = AESGCM(kek).encrypt(nonce, data_key, _aad(header, uid, context.get("tenant", "")))
        return header + nonce + sealed

    def unwrap_key(self, key_ref: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        pool, uid = self._resolve(key_ref)
        if (
            len(wrapped) < _FIXED_SIZE
            or wrapped[0] != _VERSION
            or len(wrapped) != _FIXED_SIZE + wrapped[1]
        ):
            raise DecryptionError("wrapped key is malformed", key_ref=key_ref, provider=_SCHEME)
        end_header = 2 + wrapped[1] + _COUNTER_SIZE + _KEK_SIZE
        header = wrapped[:end_header]
        counter = header[-(_COUNTER_SIZE + _KEK_SIZE) : -_KEK_SIZE]
        encrypted_kek = header[-_KEK_SIZE:]
        nonce = wrapped[end_header : end_header + _NONCE_SIZE]
        sealed = wrapped[end_header + _NONCE_SIZE :]

        def decrypt(client: Any) -> bytes:
            kek: bytes = client.decrypt(
                encrypted_kek,
                uid=uid,
                cryptographic_parameters=dict(_CTR_PARAMETERS),
                iv_counter_nonce=counter,
            )
            return kek

        kek = self._call(pool, key_ref, "Decrypt", decrypt)
        try:
            if len(kek) != _KEK_SIZE:
                raise InvalidTag
            return AESGCM(kek).decrypt(nonce, sealed, _aad(header, uid, context.get("tenant", "")))
        except InvalidTag:
            raise DecryptionError(
                "wrapped key failed authentication (corrupt, or bound to another tenant or key)",
                key_ref=key_ref,
                provider=_SCHEME,
            ) from None

    # -- plumbing -------------------------------------------------------------------------------

    def _resolve(self, key_ref: str) -> tuple[_Pool, str]:
        if not key_ref.startswith(_PREFIX):
            raise KeyNotFoundError(
                f"{key_ref!r} is not a kmip:// key reference", key_ref=key_ref, provider=_SCHEME
            )
        rest = key_ref[len(_PREFIX) :]
        server, sep, uid = rest.partition("/")
        if not sep:
            server, uid = _DEFAULT_SERVER, rest
        pool = self._pools.get(server)
        if pool is None:
            where = (
                f"no KMIP server named {server!r} is configured (servers=...)"
                if server
                else "this provider has no default KMIP server; use kmip://<server>/<uid>"
            )
            raise KeyNotFoundError(where, key_ref=key_ref, provider=_SCHEME)
        if not uid:
            raise KeyNotFoundError(
                "the KMIP key reference names no unique identifier",
                key_ref=key_ref,
                provider=_SCHEME,
            )
        return pool, uid

    def _call(self, pool: _Pool, key_ref: str, operation: str, fn: Callable[[Any], _T]) -> _T:
        """Run ``fn`` on a pooled client: the one place where PyKMIP's errors are mapped."""
        try:
            client, reused = pool.acquire()
            try:
                return _run(pool, client, fn)
            except _TRANSPORT_ERRORS:
                if not reused:
                    raise
            # A reused connection may have been closed by the server while idle: one more try
            # on a fresh connection. Not more: the key manager retries unavailability with
            # backoff.
            client, _ = pool.acquire(fresh=True)
            return _run(pool, client, fn)
        except _kmip_pie_errors.KmipOperationFailure as exc:
            raise _map_failure(exc, key_ref, operation) from exc
        except _TRANSPORT_ERRORS as exc:
            tls = tls_failure(exc)
            if tls is not None:
                # A certificate or protocol refusal: no retry cures it (as with Vault, Azure).
                err = KMSUnavailableError(
                    f"KMIP {operation} failed: TLS to the KMIP server failed "
                    f"({type(tls).__name__}: {_brief(tls)}); check the CA, the client "
                    "certificate and key",
                    key_ref=key_ref,
                    provider=_SCHEME,
                )
                err.retryable = False
                raise err from exc
            raise KMSUnavailableError(
                f"KMIP {operation} failed: the server could not be reached or the connection "
                f"broke ({type(exc).__name__}: {_brief(exc)})",
                key_ref=key_ref,
                provider=_SCHEME,
            ) from exc


def _run(pool: _Pool, client: Any, fn: Callable[[Any], _T]) -> _T:
    """``fn(client)``, then give the client back; a transport error closes it instead."""
    healthy = False
    try:
        proxy = getattr(client, "proxy", None)
        sock, own = getattr(proxy, "socket", None), getattr(proxy, "timeout", None)
        if sock is not None and isinstance(own, (int, float)):
            # This call's reads end with kms_deadline (the next call sets its own).
            sock.settimeout(call_timeout(float(own)))
        result = fn(client)
        healthy = True
        return result
    except _kmip_pie_errors.KmipOperationFailure:
        healthy = True  # a complete KMIP response: the connection is fine
        raise
    finally:
        pool.release(client, healthy=healthy)


def _map_failure(exc: Any, key_ref: str, operation: str) -> CMKError:
    reason = getattr(exc, "reason", None)
    name = getattr(reason, "name", str(reason))
    detail = f"KMIP {operation} refused: {name}: {_brief(getattr(exc, 'message', ''))}"
    if reason in _NOT_FOUND:
        return KeyNotFoundError(
            f"{detail} (no such key, or it was destroyed)", key_ref=key_ref, provider=_SCHEME
        )
    if reason in _TRANSIENT:
        return KMSUnavailableError(detail, key_ref=key_ref, provider=_SCHEME)
    if reason in _DENIED:
        return KeyAccessDeniedError(
            f"{detail} (the key is revoked, deactivated or not granted to this client)",
            key_ref=key_ref,
            provider=_SCHEME,
        )
    # INVALID_FIELD, CRYPTOGRAPHIC_FAILURE, OPERATION_NOT_SUPPORTED...: the server cannot use
    # this key for AES-CTR Encrypt/Decrypt. Not transient: retrying would not help.
    return KeyAccessDeniedError(
        f"{detail} (the key must be an active AES key with Encrypt and Decrypt in its usage "
        "mask, on a server that supports AES-CTR)",
        key_ref=key_ref,
        provider=_SCHEME,
    )
