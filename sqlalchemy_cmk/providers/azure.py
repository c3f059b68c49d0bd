"""Azure Key Vault and Managed HSM keys as tenants' master keys.

Install with ``pip install 'sqlalchemy-cmk[azure]'``.

Key references are ``azure-kv://<vault host>/keys/<name>[/<version>]``, e.g.
``azure-kv://contoso.vault.azure.net/keys/app-cmk`` or, pinned to a version,
``azure-kv://contoso-hsm.managedhsm.azure.net/keys/app-cmk/4387e9f3d6e14c459867679a90fd0f79``.
Without a version, each wrap uses the key's current version (so a tenant rotates by adding a
version); every wrapped key records the version it was made with, and unwrap uses that version.
Key names are case-insensitive in Key Vault, and so are they here.

Revocation: Key Vault keeps ``enabled`` (and ``exp``, ``nbf``, ``key_ops``) per key *version*,
and a tenant who disables "the key" in the portal, or with ``az keyvault key set-attributes
--enabled false`` without ``--version``, disables its latest version only. An unwrap at the
vault addresses the version recorded in the wrapped key, which may be an older, still enabled
one; so before unwrapping, the provider also reads the key's current version (``get``) and
refuses when it is disabled. Every unwrap waits for a read that began after it was asked for;
concurrent unwraps of one key share it (a cold load of many rows costs one or two ``get``), and
a wrap's own read counts. So an unwrap costs at most one extra ``get``, and unwraps are already
bounded by the key manager's cache (one per data key per ``cache_ttl`` per process). A disabled
key therefore stops every read within ``cache_ttl``, whatever version a row was written under,
and at once after ``forget_tenant``. ``key_state_ttl`` trusts a read longer, for fewer reads
and a looser bound (``cache_ttl + key_state_ttl``).

Design: Key Vault's wrapKey (RSA-OAEP-256 for RSA keys, AES key wrap ``A256KW`` for Managed HSM
``oct-HSM`` keys) takes no additional authenticated data, so the vault cannot bind the tenant.
The provider therefore has the vault wrap a fresh random 32-byte key-encryption key (KEK) and
stores next to it ``AES-256-GCM(KEK, nonce, DEK, aad=layout header || tenant)``. A wrapped key
copied to another tenant unwraps its KEK at the vault (the vault does not know tenants) and then
fails the GCM tag, because the tenant is in the AAD; the header (format version, algorithm, the
key id with its version, the wrapped KEK) is in the AAD too, so no field can be swapped. Wrapping
the DEK directly and adding a tag keyed from the DEK would also detect the copy, but then the
vault-wrapped part is the DEK itself and any mistake in checking the tag (or a caller that uses
the unwrapped bytes before checking) releases another tenant's DEK; with the KEK, the only way to
the DEK is through the tenant-bound GCM layer.

What this does not give: RSA wrapping is a public-key operation, so anyone holding the tenant's
public key could mint a wrapped key of their own choosing (they cannot read one). An attacker who
can also write to the database could plant such a key for new rows of theirs; they still cannot
read the tenant's data. ``oct-HSM`` keys (Managed HSM) wrap inside the HSM and have no such gap.

Calls, per the SDK: wrap first reads the key (``KeyClient.get_key``: the key's state, its
current version and, for RSA, its public key), so a disabled key or a removed role stops new
writes at once; RSA keys then wrap locally with the public key (``CryptographyClient.wrap_key``),
``oct-HSM`` keys at the vault. Unwrap is always at the vault (``CryptographyClient.unwrap_key``
for RSA). For ``oct-HSM`` keys both go through the client's ``send_request``: the SDK's
``CryptographyClient`` builds a local AES provider from a key bundle without key bytes, which
wraps locally with a random key instead of asking the HSM (azure-keyvault-keys 4.11).

Wrapped key layout, version 1 (integers big-endian)::

    offset   size  field
    0        1     format version, 0x01
    1        1     algorithm: 0x01 RSA-OAEP-256, 0x02 A256KW
    2        2     K, length of the key id (1..1024)
    4        K     key id the vault answered with, versioned: https://<host>/keys/<name>/<version>
    4+K      2     W, length of the wrapped KEK (1..1024)
    6+K      W     the KEK wrapped by the tenant's key
    6+K+W    12    GCM nonce
    18+K+W   48    AES-256-GCM(KEK, nonce, DEK) ciphertext and 16-byte tag
    AAD = b"sqlalchemy-cmk/azure-kv/v1" || bytes[0 : 6+K+W] || JSON ["tenant", <tenant>]
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NoReturn

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
    from azure.core.credentials import TokenCredential
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
        ServiceRequestError,
        ServiceResponseError,
    )
    from azure.core.rest import HttpRequest
    from azure.keyvault.keys import KeyClient, KeyVaultKey
    from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm
except ImportError as exc:  # pragma: no cover - exercised by a test that hides the SDK
    raise ImportError(
        "the Azure Key Vault provider needs azure-keyvault-keys (and azure-identity for "
        "credentials); install them with: pip install 'sqlalchemy-cmk[azure]'"
    ) from exc

__all__ = ["AzureKeyVaultProvider"]

_SCHEME = "azure-kv"
_FORMAT_VERSION = 1
_ALG_RSA_OAEP_256 = 1
_ALG_A256KW = 2
_ALGORITHMS = {_ALG_RSA_OAEP_256: "RSA-OAEP-256", _ALG_A256KW: "A256KW"}
_AAD_LABEL = b"sqlalchemy-cmk/azure-kv/v1"
_NONCE = 12
_SEALED = 32 + 16  # a 32-byte DEK and the GCM tag
_MAX_FIELD = 1024
_RSA_KTYS = frozenset({"RSA", "RSA-HSM"})
_OCT_KTYS = frozenset({"oct", "oct-HSM"})

# azure-kv://<host[:port]>/keys/<name>[/<version>]; Key Vault names are 1..127 letters, digits
# and dashes; versions are 32 hex digits (a little slack for Managed HSM and test servers).
_REF = re.compile(
    r"azure-kv://(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?(?::[0-9]{1,5})?)"
    r"/keys/(?P<name>[0-9A-Za-z-]{1,127})(?:/(?P<version>[0-9A-Za-z]{1,64}))?"
)
_KID = re.compile(
    r"https://(?P<host>[^/?#]+)/keys/(?P<name>[0-9A-Za-z-]{1,127})/(?P<version>[0-9A-Za-z]{1,64})"
)
_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class _Ref:
    host: str
    name: str
    version: str | None

    @property
    def vault_url(self) -> str:
        return f"https://{self.host}"

    def key_id(self, version: str) -> str:
        return f"https://{self.host}/keys/{self.name}/{version}"


def _parse_ref(key_ref: str) -> _Ref:
    match = _REF.fullmatch(key_ref)
    if match is None:
        raise KeyNotFoundError(
            f"{key_ref!r} is not an azure-kv://<vault host>/keys/<name>[/<version>] key reference",
            key_ref=key_ref,
            provider=_SCHEME,
        )
    return _Ref(match["host"].lower(), match["name"], match["version"])


def _version_of(ref: _Ref, kid: str | None) -> str | None:
    """The version in a key id the vault sent, when the id names the key ``ref`` names."""
    match = _KID.fullmatch(kid or "")
    # Key Vault names (and the hex versions) are case-insensitive: the vault answers with the
    # name as it was created, which may differ in case from the tenant's reference.
    if (
        match is None
        or match["host"].lower() != ref.host
        or match["name"].lower() != ref.name.lower()
    ):
        return None
    if ref.version is not None and match["version"].lower() != ref.version.lower():
        return None
    return match["version"]


def _aad(header: bytes, tenant: str) -> bytes:
    return _AAD_LABEL + header + json.dumps(["tenant", tenant]).encode()


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64u(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not base64url text")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class _Parsed:
    algorithm: int
    kid: str
    wrapped_kek: bytes
    header: bytes
    nonce: bytes
    sealed: bytes


def _parse_wrapped(wrapped: bytes) -> _Parsed | None:
    """Split a version-1 wrapped key; None when it is malformed in any way."""
    if len(wrapped) < 4 or wrapped[0] != _FORMAT_VERSION or wrapped[1] not in _ALGORITHMS:
        return None
    (kid_len,) = struct.unpack_from(">H", wrapped, 2)
    at = 4 + kid_len
    if not 1 <= kid_len <= _MAX_FIELD or len(wrapped) < at + 2:
        return None
    (kek_len,) = struct.unpack_from(">H", wrapped, at)
    end = at + 2 + kek_len
    if not 1 <= kek_len <= _MAX_FIELD or len(wrapped) != end + _NONCE + _SEALED:
        return None
    try:
        kid = wrapped[4:at].decode("ascii")
    except UnicodeDecodeError:
        return None
    return _Parsed(
        algorithm=wrapped[1],
        kid=kid,
        wrapped_kek=wrapped[at + 2 : end],
        header=wrapped[:end],
        nonce=wrapped[end : end + _NONCE],
        sealed=wrapped[end + _NONCE :],
    )


KeyClientFactory = Callable[[str], KeyClient]
"""Builds a ``KeyClient`` for a vault URL (``https://<host>``)."""
CryptographyClientFactory = Callable[[str], CryptographyClient]
"""Builds a ``CryptographyClient`` for a versioned key id (``https://<host>/keys/<name>/<v>``)."""


class AzureKeyVaultProvider:
    """Wraps data keys with tenants' keys in Azure Key Vault or Managed HSM.

    Build it with :meth:`from_credential` (short timeouts, one SDK retry), or give it your own
    client factories to configure endpoints, transports, proxies and retries. Clients are made
    once per vault and per key version and reused; :meth:`close` closes them.

    The application's identity needs, on each tenant's key, ``get``, ``wrapKey`` and
    ``unwrapKey`` (the built-in role "Key Vault Crypto Service Encryption User"); see
    ``docs/providers/azure.md``.
    """

    scheme = _SCHEME

    def __init__(
        self,
        *,
        key_client_factory: KeyClientFactory,
        crypto_client_factory: CryptographyClientFactory,
        key_state_ttl: float = 0.0,
        read_timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Args:
        key_client_factory: Vault URL -> ``azure.keyvault.keys.KeyClient``.
        crypto_client_factory: Versioned key id ->
            ``azure.keyvault.keys.crypto.CryptographyClient``.
        key_state_ttl: Seconds a read of a key's current version (checked enabled before an
            unwrap) is trusted. 0 (default): every unwrap waits for a read that began after it
            was asked for (shared by concurrent unwraps). More saves reads but adds to
            ``cache_ttl`` in the time a disabled key takes to stop reads, and makes
            ``forget_tenant`` take up to ``cache_ttl + key_state_ttl`` for rows under older
            versions (a read trusted after the forget caches a data key again).
        read_timeout: The clients' read timeout, so that a per-call timeout derived from
            ``kms_deadline`` never lengthens it (None: the deadline alone bounds each call).
        clock: Monotonic seconds for ``key_state_ttl`` (a seam for tests).
        """
        if key_state_ttl < 0:
            raise ConfigurationError("key_state_ttl >= 0", provider=_SCHEME)
        self._key_client_factory = key_client_factory
        self._crypto_client_factory = crypto_client_factory
        self._key_state_ttl = key_state_ttl
        self._read_timeout = read_timeout
        self._clock = clock
        # (host, lower-case name) -> when the last read of the current version that found it
        # enabled began; and one lock per key, so that concurrent unwraps share a read.
        self._state_checked: dict[tuple[str, str], float] = {}
        self._state_locks: dict[tuple[str, str], threading.Lock] = {}
        self._key_clients: dict[str, KeyClient] = {}
        self._crypto_clients: dict[str, CryptographyClient] = {}
        self._public_wrappers: dict[str, CryptographyClient] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_credential(
        cls,
        credential: TokenCredential,
        *,
        connection_timeout: float = 3.0,
        read_timeout: float = 10.0,
        retry_total: int = 1,
        key_state_ttl: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        **client_kwargs: Any,
    ) -> AzureKeyVaultProvider:
        """A provider whose clients use ``credential`` and short timeouts.

        Args:
            credential: An azure-identity credential (``ManagedIdentityCredential``,
                ``WorkloadIdentityCredential``, ``ClientAssertionCredential``...) or any
                ``TokenCredential``. The vault's challenge names the tenant's Entra tenant, and
                the SDK asks the credential for a token there: a multi-tenant app credential
                needs ``additionally_allowed_tenants``.
            connection_timeout: Seconds to connect (the SDK default is 300).
            read_timeout: Seconds to wait for an answer (the SDK default is 300).
            retry_total: SDK retries per call; the key manager retries on top, so keep it small.
            key_state_ttl: See the constructor: how long a read of the key's current version
                is trusted before an unwrap.
            clock: Monotonic seconds for ``key_state_ttl`` (a seam for tests).
            **client_kwargs: More azure-core client options (``connection_verify``,
                ``transport``, ``proxies``, ``retry_backoff_factor``...).
        """
        options: dict[str, Any] = {
            "connection_timeout": connection_timeout,
            "read_timeout": read_timeout,
            "retry_total": retry_total,
            "retry_backoff_factor": 0.2,
            "retry_backoff_max": 2,
            **client_kwargs,
        }

        def key_client(vault_url: str) -> KeyClient:
            return KeyClient(vault_url, credential, **options)

        def crypto_client(key_id: str) -> CryptographyClient:
            return CryptographyClient(key_id, credential, **options)

        return cls(
            key_client_factory=key_client,
            crypto_client_factory=crypto_client,
            key_state_ttl=key_state_ttl,
            read_timeout=read_timeout,
            clock=clock,
        )

    def __repr__(self) -> str:
        with self._lock:
            vaults = sorted(self._key_clients)
        return f"AzureKeyVaultProvider(vaults={vaults!r})"

    def close(self) -> None:
        """Close the clients' connections (new calls open new clients)."""
        with self._lock:
            clients: list[Any] = [*self._key_clients.values(), *self._crypto_clients.values()]
            self._key_clients.clear()
            self._crypto_clients.clear()
            self._public_wrappers.clear()
            self._state_checked.clear()
        for client in clients:
            client.close()

    def __enter__(self) -> AzureKeyVaultProvider:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- clients ----------------------------------------------------------------------------------

    def _key_client(self, vault_url: str) -> KeyClient:
        with self._lock:
            client = self._key_clients.get(vault_url)
            if client is None:
                client = self._key_clients[vault_url] = self._key_client_factory(vault_url)
            return client

    def _crypto_client(self, key_id: str) -> CryptographyClient:
        with self._lock:
            client = self._crypto_clients.get(key_id)
            if client is None:
                client = self._crypto_clients[key_id] = self._crypto_client_factory(key_id)
            return client

    def _public_wrapper(self, key: KeyVaultKey) -> CryptographyClient:
        # A local-only client for the public key of one version: versions are immutable.
        kid = str(key.id)
        with self._lock:
            client = self._public_wrappers.get(kid)
            if client is None:
                client = self._public_wrappers[kid] = CryptographyClient.from_jwk(key.key)
            return client

    # -- the protocol ------------------------------------------------------------------------------

    def wrap_key(self, key_ref: str, data_key: bytes, context: Mapping[str, str]) -> bytes:
        ref = _parse_ref(key_ref)
        if len(data_key) != 32:
            raise ConfigurationError("data keys are 32 bytes", key_ref=key_ref, provider=_SCHEME)
        kek = os.urandom(32)
        with self._boundary(key_ref, "wrap"):
            checked_at = self._clock()
            key = self._key_client(ref.vault_url).get_key(ref.name, ref.version, **_timeouts(self))
            version = _version_of(ref, key.id)
            if version is None:
                raise KeyNotFoundError(
                    "the vault answered with a key id that is not the requested key's",
                    key_ref=key_ref,
                    provider=_SCHEME,
                )
            kty = _value(key.key_type)
            _check_usable(key, key_ref)
            if ref.version is None:
                self._state_ok(ref, checked_at)  # this read was of the current version
            else:
                self._check_current(ref, key_ref)
            if kty in _RSA_KTYS:
                algorithm = _ALG_RSA_OAEP_256
                wrapped_kek = (
                    self._public_wrapper(key)
                    .wrap_key(KeyWrapAlgorithm.rsa_oaep_256, kek)
                    .encrypted_key
                )
            elif kty in _OCT_KTYS:
                algorithm = _ALG_A256KW
                wrapped_kek = self._at_vault(ref, version, "wrapkey", kek)
            else:
                raise ConfigurationError(
                    f"Azure key type {kty!r} cannot wrap keys; use an RSA or oct-HSM key",
                    key_ref=key_ref,
                    provider=_SCHEME,
                )
        kid = ref.key_id(version).encode("ascii")
        if not 1 <= len(wrapped_kek) <= _MAX_FIELD:
            raise KMSUnavailableError(
                "the vault returned a wrapped key of an unexpected size",
                key_ref=key_ref,
                provider=_SCHEME,
            )
        header = (
            struct.pack(">BBH", _FORMAT_VERSION, algorithm, len(kid))
            + kid
            + struct.pack(">H", len(wrapped_kek))
            + wrapped_kek
        )
        nonce = os.urandom(_NONCE)
        sealed = AESGCM(kek).encrypt(nonce, data_key, _aad(header, context.get("tenant", "")))
        return header + nonce + sealed

    def unwrap_key(self, key_ref: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        ref = _parse_ref(key_ref)
        parsed = _parse_wrapped(wrapped)
        version = _version_of(ref, parsed.kid) if parsed is not None else None
        if parsed is None or version is None:
            # Malformed, or made with another key than key_ref names: the same opaque error.
            raise DecryptionError("wrapped key is malformed", key_ref=key_ref, provider=_SCHEME)
        with self._boundary(key_ref, "unwrap"):
            self._check_current(ref, key_ref)
            if parsed.algorithm == _ALG_RSA_OAEP_256:
                kek = (
                    self._crypto_client(ref.key_id(version))
                    .unwrap_key(
                        KeyWrapAlgorithm.rsa_oaep_256, parsed.wrapped_kek, **_timeouts(self)
                    )
                    .key
                )
            else:
                kek = self._at_vault(ref, version, "unwrapkey", parsed.wrapped_kek)
        if len(kek) != 32:
            self._fail_authentication(key_ref)
        try:
            return AESGCM(kek).decrypt(
                parsed.nonce, parsed.sealed, _aad(parsed.header, context.get("tenant", ""))
            )
        except InvalidTag:
            self._fail_authentication(key_ref)

    def _state_ok(self, ref: _Ref, checked_at: float) -> None:
        with self._lock:
            self._state_checked[(ref.host, ref.name.lower())] = checked_at

    def _check_current(self, ref: _Ref, key_ref: str) -> None:
        """Refuse when the key's current version is disabled (how a tenant disables "the key").

        One ``get`` of the unversioned key. A read that *began after this call arrived* is as
        fresh as one of its own, so concurrent unwraps of one key share it (they queue on a
        per-key lock; a cold load costs one or two reads, not one per row); with
        ``key_state_ttl`` a read is trusted that long. A disabled current version answers
        ``403 KeyDisabled`` (mapped by the boundary); a vault that answers with the bundle
        instead says ``enabled: false``.
        """
        slot = (ref.host, ref.name.lower())
        arrived = self._clock()
        with self._lock:
            lock = self._state_locks.setdefault(slot, threading.Lock())
        left = call_timeout(math.inf)
        if not lock.acquire(timeout=-1 if math.isinf(left) else left):
            raise KMSUnavailableError(
                "the key's state could not be read within kms_deadline",
                key_ref=key_ref,
                provider=_SCHEME,
            )
        try:
            with self._lock:
                checked_at = self._state_checked.get(slot)
            if checked_at is not None and (
                checked_at >= arrived or arrived - checked_at < self._key_state_ttl
            ):
                return
            self._read_current(ref, key_ref)
        finally:
            lock.release()

    def _read_current(self, ref: _Ref, key_ref: str) -> None:
        now = self._clock()
        current = self._key_client(ref.vault_url).get_key(ref.name, **_timeouts(self))
        if _version_of(_Ref(ref.host, ref.name, None), current.id) is None:
            raise KeyNotFoundError(
                "the vault answered with a key id that is not the requested key's",
                key_ref=key_ref,
                provider=_SCHEME,
            )
        if current.properties.enabled is False:
            raise KeyAccessDeniedError(
                "the Azure key's current version is disabled; the tenant disabled the key",
                key_ref=key_ref,
                provider=_SCHEME,
            )
        self._state_ok(ref, now)

    @staticmethod
    def _fail_authentication(key_ref: str) -> NoReturn:
        raise DecryptionError(
            "wrapped key failed authentication", key_ref=key_ref, provider=_SCHEME
        ) from None

    def _at_vault(self, ref: _Ref, version: str, operation: str, value: bytes) -> bytes:
        """POST keys/<name>/<version>/<wrapkey|unwrapkey> with A256KW through the SDK pipeline."""
        request = HttpRequest(
            "POST",
            f"/keys/{ref.name}/{version}/{operation}",
            json={"alg": "A256KW", "value": _b64u(value)},
        )
        response = self._key_client(ref.vault_url).send_request(request, **_timeouts(self))
        response.raise_for_status()
        try:
            return _unb64u(response.json()["value"])
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise KMSUnavailableError(
                f"the vault's {operation} answer was not understood",
                key_ref=f"azure-kv://{ref.host}/keys/{ref.name}",
                provider=_SCHEME,
            ) from exc

    # -- the error boundary ------------------------------------------------------------------------

    @contextmanager
    def _boundary(self, key_ref: str, operation: str) -> Iterator[None]:
        """Map the SDK's errors onto ours, most specific first."""
        where = f"Azure Key Vault {operation} with {key_ref}"
        try:
            yield
        except CMKError:
            raise
        except ResourceNotFoundError as exc:
            raise KeyNotFoundError(
                f"{where}: the vault does not know this key ({_code(exc)})",
                key_ref=key_ref,
                provider=_SCHEME,
            ) from exc
        except ClientAuthenticationError as exc:
            raise KeyAccessDeniedError(
                f"{where}: authentication failed ({_code(exc)}); check the credential and that "
                "the app may sign in to the key's Entra tenant",
                key_ref=key_ref,
                provider=_SCHEME,
            ) from exc
        except HttpResponseError as exc:
            raise _from_status(exc, where, key_ref, operation) from exc
        except (ServiceRequestError, ServiceResponseError) as exc:
            tls = tls_failure(exc)
            if tls is not None:
                # A certificate or protocol refusal: no retry cures it (as with Vault, KMIP).
                error = KMSUnavailableError(
                    f"{where}: TLS to the vault failed ({type(tls).__name__}); check "
                    "connection_verify and the vault host",
                    key_ref=key_ref,
                    provider=_SCHEME,
                )
                error.retryable = False
                raise error from exc
            raise KMSUnavailableError(
                f"{where}: the vault could not be reached or did not answer ({type(exc).__name__})",
                key_ref=key_ref,
                provider=_SCHEME,
            ) from exc
        except AzureError as exc:
            raise KMSUnavailableError(
                f"{where}: {type(exc).__name__}", key_ref=key_ref, provider=_SCHEME
            ) from exc
        except ValueError as exc:
            # The SDK's challenge policy refuses a challenge naming another resource than the
            # vault (a token would go to the wrong place), and refuses plain-http vault URLs.
            raise KeyAccessDeniedError(
                f"{where}: the Azure SDK refused the request ({type(exc).__name__}); check the "
                "vault host and its authentication challenge",
                key_ref=key_ref,
                provider=_SCHEME,
            ) from exc


def _timeouts(provider: AzureKeyVaultProvider) -> dict[str, Any]:
    """azure-core per-call options ending the call with ``kms_deadline``.

    ``timeout`` bounds the SDK's retries and connection time, ``read_timeout`` each read; the
    clients' own read timeout is kept when it is shorter. Outside a key manager call: none.
    """
    left = call_timeout(math.inf)
    if math.isinf(left):
        return {}
    read = left if provider._read_timeout is None else min(provider._read_timeout, left)
    return {"timeout": left, "read_timeout": read}


def _check_usable(key: KeyVaultKey, key_ref: str) -> None:
    """Refuse a key the vault returned but would not let us use (as the service would)."""
    props = key.properties
    now = datetime.now(timezone.utc)
    reason = None
    if props.enabled is False:
        reason = "is disabled"
    elif props.not_before is not None and props.not_before > now:
        reason = "is not yet valid (not-before)"
    elif props.expires_on is not None and props.expires_on <= now:
        reason = "has expired"
    elif key.key_operations is not None and "wrapKey" not in [
        _value(o) for o in key.key_operations
    ]:
        reason = "does not permit wrapKey"
    if reason is not None:
        raise KeyAccessDeniedError(f"the Azure key {reason}", key_ref=key_ref, provider=_SCHEME)


def _value(item: object) -> str:
    # The SDK's enums are str subclasses whose str() is "KeyType.RSA"; their value is "RSA".
    return str(getattr(item, "value", item) or "")


def _code(exc: HttpResponseError) -> str:
    """HTTP status and the service's error codes: short identifiers, never the message body."""
    parts = [str(exc.status_code)] if exc.status_code is not None else []
    error = getattr(exc, "error", None)
    for code in (
        getattr(error, "code", None),
        (getattr(error, "innererror", None) or {}).get("code"),
    ):
        if isinstance(code, str) and _CODE.fullmatch(code):
            parts.append(code)
    return " ".join(parts) or type(exc).__name__


def _from_status(exc: HttpResponseError, where: str, key_ref: str, operation: str) -> CMKError:
    status = exc.status_code or 0
    detail = _code(exc)
    if status in (401, 403):
        return KeyAccessDeniedError(
            f"{where}: the vault refused ({detail}); the key is disabled or the app's access "
            "was removed",
            key_ref=key_ref,
            provider=_SCHEME,
        )
    if status == 404:
        return KeyNotFoundError(
            f"{where}: the vault does not know this key ({detail})",
            key_ref=key_ref,
            provider=_SCHEME,
        )
    if status in (408, 429) or status >= 500:
        return KMSUnavailableError(
            f"{where}: the vault is unavailable or throttling ({detail})",
            key_ref=key_ref,
            provider=_SCHEME,
        )
    if status == 400 and operation == "unwrap":
        return DecryptionError(
            "wrapped key failed authentication", key_ref=key_ref, provider=_SCHEME
        )
    if status == 400:
        return KeyAccessDeniedError(
            f"{where}: the vault would not wrap with this key ({detail})",
            key_ref=key_ref,
            provider=_SCHEME,
        )
    error = KMSUnavailableError(
        f"{where}: unexpected answer from the vault ({detail})", key_ref=key_ref, provider=_SCHEME
    )
    error.retryable = False
    return error
