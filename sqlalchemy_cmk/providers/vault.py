"""A provider for HashiCorp Vault and OpenBao: the Transit secrets engine, with derived keys.

Key references are ``vault-transit://<mount>/<key-name>``: ``vault-transit://transit/acme`` is
the key ``acme`` of the Transit engine mounted at ``transit/``. A mount may be nested
(``vault-transit://tenants/acme/transit/cmk``: the last segment is the key). The Vault address,
the token or auth method and the namespace are not part of the reference: they live on the
``hvac.Client`` the provider is given (``client=``, or ``client_factory=`` for tenants on
different Vault servers).

Wrapping is Transit ``encrypt`` / ``decrypt`` of the 32-byte data key under a key created with
``derived=true``:

- ``context`` (the key-derivation context) is the tenant, so Vault derives a different AES key
  per tenant from the tenant's Transit key: a wrapped key of one tenant cannot unwrap as
  another's, even under the same Transit key.
- ``associated_data`` (additional authenticated data of AES-GCM or ChaCha20-Poly1305) is the JSON
  ``{"data_label": ..., "sqlalchemy_cmk": 1, "tenant": ...}``, so the data label is
  authenticated too and, with the tenant, binds even a key created without ``derived=true``.

``unwrap_key`` only gets the tenant, so the wrapped bytes record the tenant and the data label
next to Transit's ciphertext (layout below); unwrap checks the recorded tenant against the
context before it asks Vault. Vault versions that predate ``associated_data`` ignore it (with a
warning): the tenant still binds through the derivation context.

Wrapped key layout, version 1 (big-endian, every length checked on parse)::

    offset  size  field
    0       1     version, 0x01
    1       2     T: length of the tenant (1..1024)
    3       T     tenant, UTF-8
    3+T     2     L: length of the data label (0..1024; 0 = none)
    5+T     L     data label, UTF-8
    5+T+L   2     C: length of the Transit ciphertext (1..4096)
    7+T+L   C     Transit ciphertext, ASCII ``vault:v<N>:<base64>``

Never creating a key: Transit's ``encrypt`` creates ("upserts") a missing key when the token
has the ``create`` capability on ``<mount>/encrypt/<name>`` and the mount's
``config/keys`` does not set ``disable_upsert``. Then deleting the tenant's key would not stop
writes: the next wrap would silently make a new key the tenant never had. So before a wrap the
provider asks Vault what the token may do there (``sys/capabilities-self``, which Vault's
default policy allows; remembered for a minute per key): a token limited to ``update`` cannot
create, and Vault answers a missing key with 403 or "encryption key not found". A token that may
create gets an existence probe before every encrypt: a ``decrypt`` of a fixed probe ciphertext,
which Vault answers "encryption key not found" for a missing key (decrypt never creates) and
refuses otherwise; the tenant's audit device shows that failed decrypt. A key deleted between
the probe and the encrypt (one round trip) could still be recreated: grant ``update`` only, or
set ``disable_upsert``, to close that window; :meth:`VaultTransitProvider.check_key` reports a
token and mount that allow creation.

Errors are mapped in :meth:`VaultTransitProvider._call`, most specific first.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
import threading
import time
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any, NoReturn

try:
    import hvac  # type: ignore[import-untyped]
    import hvac.exceptions  # type: ignore[import-untyped]
    import requests
except ImportError as exc:  # pragma: no cover - exercised by a test with the import blocked
    raise ImportError(
        "the Vault/OpenBao Transit provider needs hvac; install it with: "
        "pip install 'sqlalchemy-cmk[vault]'"
    ) from exc

from ..errors import (
    CMKError,
    ConfigurationError,
    DecryptionError,
    KeyAccessDeniedError,
    KeyAccessError,
    KeyNotFoundError,
    KMSUnavailableError,
)
from . import call_timeout

__all__ = ["VaultTransitProvider"]

_SCHEME = "vault-transit"
_PREFIX = "vault-transit://"
_VERSION = 1
_MAX_TENANT = 1024
_MAX_LABEL = 1024
_MAX_CIPHERTEXT = 4096
_DATA_KEY_SIZE = 32

# Transit key names: Vault's GenericNameRegex. Mount segments: what ``bao secrets enable
# -path=`` accepts in practice, minus anything that could climb or escape the URL path.
_KEY_NAME = re.compile(r"\w(?:[\w.-]*\w)?", re.ASCII)
_MOUNT_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", re.ASCII)
_CIPHERTEXT = re.compile(rb"vault:v([1-9][0-9]{0,9}):([A-Za-z0-9+/]+={0,2})")

# Substrings of Vault's 400 messages, lower-cased. Vault reports most key states as 400 with a
# message, not a status of their own.
_NOT_FOUND = ("encryption key not found", "key not found")
_REFUSED = (
    "soft-deleted",  # OpenBao: DELETE transit/keys/<name>/soft-delete
    "soft deleted",
    "disallowed by policy",  # min_decryption_version raised past the ciphertext's version
    "not allowed",  # e.g. "encryption is not allowed" for managed or FIPS-restricted keys
    "permission denied",
)
_WRONG_KEY_TYPE = ("non-aead", "not supported for key type", "does not support")

# The existence probe: a well-formed Transit ciphertext no key ever produced (a zero nonce and
# tag), so that an existing key answers "message authentication failed" and never a plaintext.
_PROBE_CIPHERTEXT = "vault:v1:" + base64.b64encode(bytes(28)).decode()
# Capabilities that let a token create a Transit key through encrypt.
_CREATING = frozenset({"create", "root", "sudo"})


class VaultTransitProvider:
    """Wraps data keys with Vault/OpenBao Transit keys created with ``derived=true``.

    The client is used as given: its address, token (or auth method), namespace, TLS
    settings, timeouts and retries are the caller's. Keep its retries at 0 (the default of
    ``requests``): ``CMK`` retries :class:`~sqlalchemy_cmk.errors.KMSUnavailableError` itself,
    with backoff and a deadline. :meth:`from_url` builds one with short timeouts.

    The token needs the ``update`` capability on ``<mount>/encrypt/<key>`` and
    ``<mount>/decrypt/<key>`` for each tenant key it serves, nothing more (see
    ``docs/providers/vault.md`` for the policy a tenant writes).
    """

    scheme = _SCHEME

    def __init__(
        self,
        client: Any = None,
        *,
        client_factory: Callable[[str], Any] | None = None,
        capabilities_ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Args:
            client: An ``hvac.Client`` pointed at the Vault that holds the keys.
            client_factory: Instead of ``client``: key reference -> ``hvac.Client``, for
                tenants whose keys live in different Vaults (or namespaces). Called on every
                wrap and unwrap: return cached clients, not new ones.
            capabilities_ttl: Seconds the token's capabilities on a key's encrypt path are
                remembered (whether a wrap needs the existence probe first).
            clock: Monotonic seconds for ``capabilities_ttl`` (a seam for tests).

        Raises:
            ConfigurationError: neither or both of ``client`` and ``client_factory``.
        """
        if (client is None) == (client_factory is None):
            raise ConfigurationError(
                "VaultTransitProvider needs exactly one of client= (an hvac.Client) or "
                "client_factory= (key reference -> hvac.Client)"
            )
        if client is not None and not hasattr(client, "adapter"):
            raise ConfigurationError(
                f"VaultTransitProvider(client=...) expects an hvac.Client, got "
                f"{type(client).__name__}"
            )
        self._client = client
        self._client_factory = client_factory
        self._capabilities_ttl = capabilities_ttl
        self._clock = clock
        self._may_create: dict[tuple[int, str], tuple[bool, float]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        if self._client is None:
            return "VaultTransitProvider(client_factory=...)"
        # The URL only: never the token.
        url = getattr(getattr(self._client, "adapter", None), "base_uri", None)
        return f"VaultTransitProvider(url={url!r})"

    @classmethod
    def from_url(
        cls,
        url: str | None = None,
        *,
        token: str | None = None,
        namespace: str | None = None,
        verify: bool | str = True,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
    ) -> VaultTransitProvider:
        """Build a provider on a new ``hvac.Client`` with short timeouts and no retries.

        Args:
            url: The Vault address, e.g. ``https://vault.example.com:8200``; ``None`` takes
                ``VAULT_ADDR`` (hvac's default).
            token: A Vault token; ``None`` takes ``VAULT_TOKEN`` or ``~/.vault-token`` (hvac's
                default). For other auth methods, build the client yourself, log it in, and
                pass ``client=``.
            namespace: A Vault Enterprise / OpenBao namespace, sent as ``X-Vault-Namespace``.
            verify: ``True``, ``False`` or the path of a CA bundle, as in ``requests``.
            connect_timeout: Seconds to establish a connection.
            read_timeout: Seconds to wait for Vault's answer.
        """
        client = hvac.Client(
            url=url,
            token=token,
            namespace=namespace,
            verify=verify,
            timeout=(connect_timeout, read_timeout),
        )
        return cls(client)

    # -- KeyProvider ---------------------------------------------------------------------------

    def wrap_key(self, key_ref: str, data_key: bytes, context: Mapping[str, str]) -> bytes:
        mount, name = _parse_ref(key_ref)
        tenant = context.get("tenant") or ""
        label = context.get("data_label") or ""
        tenant_b, label_b = tenant.encode(), label.encode()
        if not 0 < len(tenant_b) <= _MAX_TENANT:
            raise ConfigurationError(
                f"the tenant must be 1..{_MAX_TENANT} bytes of UTF-8 to bind a Vault key",
                key_ref=key_ref,
                provider=_SCHEME,
            )
        if len(label_b) > _MAX_LABEL:
            raise ConfigurationError(
                f"the data label must be at most {_MAX_LABEL} bytes of UTF-8",
                key_ref=key_ref,
                provider=_SCHEME,
            )
        if self._token_may_create(key_ref, mount, name):
            self._probe_exists(key_ref, mount, name, tenant)
        body = self._call(
            key_ref,
            "encrypt",
            mount,
            name,
            {
                "plaintext": base64.b64encode(data_key).decode(),
                "context": base64.b64encode(tenant_b).decode(),
                "associated_data": _associated_data(tenant, label),
            },
        )
        ciphertext = _field(body, "ciphertext")
        raw = ciphertext.encode("ascii", "replace") if ciphertext is not None else b""
        if not 0 < len(raw) <= _MAX_CIPHERTEXT or _CIPHERTEXT.fullmatch(raw) is None:
            raise KeyAccessError(
                "Vault answered the encrypt request without a usable Transit ciphertext",
                key_ref=key_ref,
                provider=_SCHEME,
            )
        return (
            struct.pack(">BH", _VERSION, len(tenant_b))
            + tenant_b
            + struct.pack(">H", len(label_b))
            + label_b
            + struct.pack(">H", len(raw))
            + raw
        )

    def unwrap_key(self, key_ref: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        mount, name = _parse_ref(key_ref)
        parsed = _parse_wrapped(wrapped)
        if parsed is None or parsed[0] != (context.get("tenant") or ""):
            # Opaque, as everywhere: malformed and bound-to-another-tenant look the same.
            _bad(key_ref)
        tenant, label, ciphertext = parsed
        body = self._call(
            key_ref,
            "decrypt",
            mount,
            name,
            {
                "ciphertext": ciphertext,
                "context": base64.b64encode(tenant.encode()).decode(),
                "associated_data": _associated_data(tenant, label),
            },
        )
        plaintext = _field(body, "plaintext")
        try:
            data_key = base64.b64decode(plaintext or "", validate=True)
        except (binascii.Error, ValueError):
            _bad(key_ref)
        if len(data_key) != _DATA_KEY_SIZE:
            _bad(key_ref)
        return data_key

    # -- never creating a key ---------------------------------------------------------------

    def check_key(self, key_ref: str) -> list[str]:
        """Problems with how the application may use ``key_ref``, as sentences (none: fine).

        Reports a token that may create a Transit key at the key's encrypt path while the mount
        does not disable upserts (or its ``config/keys`` cannot be read): a deleted key could
        then be recreated by a write racing the deletion. Asks Vault; raises the provider's
        usual errors when it cannot.
        """
        mount, name = _parse_ref(key_ref)
        capabilities = self._capabilities(key_ref, mount, name)
        if capabilities is None:
            return [
                "the token may not ask Vault for its capabilities (sys/capabilities-self): "
                "every wrap is preceded by an existence probe; attach Vault's default policy "
                "or grant update on sys/capabilities-self"
            ]
        if not capabilities & _CREATING:
            return []
        upsert = self._upsert_disabled(key_ref, mount)
        if upsert is True:
            return []
        why = "does not set" if upsert is False else "cannot be read to check"
        return [
            f"the token has {sorted(capabilities & _CREATING)} on {mount}/encrypt/{name} and "
            f"the mount's config/keys {why} disable_upsert: Vault would create a missing key "
            "on encrypt (each wrap probes first, but a deletion racing a write is not "
            f"covered); grant only update, or run: bao write {mount}/config/keys "
            "disable_upsert=true"
        ]

    def _token_may_create(self, key_ref: str, mount: str, name: str) -> bool:
        client = self._client_for(key_ref)
        slot = (id(client), f"{mount}/encrypt/{name}")
        now = self._clock()
        with self._lock:
            known = self._may_create.get(slot)
        if known is not None and now - known[1] < self._capabilities_ttl:
            return known[0]
        capabilities = self._capabilities(key_ref, mount, name)
        may = capabilities is None or bool(capabilities & _CREATING)
        if may and capabilities is not None and self._upsert_disabled(key_ref, mount) is True:
            may = False  # the mount refuses to create keys on encrypt, whatever the token
        with self._lock:
            self._may_create[slot] = (may, now)
        return may

    def _capabilities(self, key_ref: str, mount: str, name: str) -> frozenset[str] | None:
        """The token's capabilities on the encrypt path; None when it may not ask."""
        path = f"{mount}/encrypt/{name}"
        try:
            body = self._request(
                key_ref, "capabilities", "sys/capabilities-self", {"paths": [path]}
            )
        except KeyAccessDeniedError:
            return None
        data = body.get("data") if isinstance(body, Mapping) else None
        found = (data if isinstance(data, Mapping) else body).get(path)
        if not isinstance(found, list):
            return None
        return frozenset(str(c) for c in found)

    def _upsert_disabled(self, key_ref: str, mount: str) -> bool | None:
        try:
            body = self._request(key_ref, "config", f"{mount}/config/keys", None)
        except (KeyAccessDeniedError, KeyNotFoundError):
            return None
        data = body.get("data") if isinstance(body, Mapping) else None
        value = data.get("disable_upsert") if isinstance(data, Mapping) else None
        return value if isinstance(value, bool) else None

    def _probe_exists(self, key_ref: str, mount: str, name: str, tenant: str) -> None:
        """Raise KeyNotFoundError unless the key exists; decrypt never creates a key."""
        try:
            self._call(
                key_ref,
                "decrypt",
                mount,
                name,
                {
                    "ciphertext": _PROBE_CIPHERTEXT,
                    "context": base64.b64encode(tenant.encode()).decode(),
                },
            )
        except (DecryptionError, ConfigurationError):
            return  # the key exists: it refused the probe ciphertext
        except KeyAccessDeniedError as exc:
            cause = exc.__cause__
            if isinstance(cause, hvac.exceptions.InvalidRequest) and "disallowed by policy" in (
                _reason(cause)
            ):
                return  # the key exists; its version 1 is retired (min_decryption_version)
            raise
        except KeyAccessError as exc:
            if type(exc) is KeyAccessError:  # "rejected the request (400)": it exists
                return
            raise

    # -- the one boundary with hvac ------------------------------------------------------------

    def _client_for(self, key_ref: str) -> Any:
        if self._client is not None:
            return self._client
        assert self._client_factory is not None
        return self._client_factory(key_ref)

    def _call(self, key_ref: str, op: str, mount: str, name: str, payload: dict[str, str]) -> Any:
        """POST ``/v1/<mount>/<op>/<name>`` and map every failure onto our errors."""
        return self._request(key_ref, op, f"{mount}/{op}/{name}", payload)

    def _request(self, key_ref: str, op: str, path: str, payload: dict[str, Any] | None) -> Any:
        """POST (or GET without a payload) ``/v1/<path>``; every failure mapped onto ours."""

        def fail(cls: type[CMKError], why: str, exc: BaseException) -> NoReturn:
            raise cls(
                f"Vault Transit {op} with {path!r}: {why}", key_ref=key_ref, provider=_SCHEME
            ) from exc

        client = self._client_for(key_ref)
        try:
            adapter = client.adapter
            options = _timeout(adapter)
            if payload is None:
                response = adapter.get(f"/v1/{path}", **options)
            else:
                response = adapter.post(f"/v1/{path}", json=payload, **options)
            # The JSONAdapter returns the decoded body; a RawAdapter the requests.Response.
            return response.json() if isinstance(response, requests.Response) else response
        except requests.exceptions.SSLError as exc:
            err = KMSUnavailableError(
                f"Vault Transit {op} with {path!r}: TLS to Vault failed (check the client's "
                "verify= CA bundle)",
                key_ref=key_ref,
                provider=_SCHEME,
            )
            err.retryable = False
            raise err from exc
        except requests.exceptions.Timeout as exc:
            fail(KMSUnavailableError, "Vault did not answer in time", exc)
        except requests.exceptions.ConnectionError as exc:
            fail(KMSUnavailableError, "could not connect to Vault", exc)
        except (
            requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema,
            requests.exceptions.InvalidURL,
        ) as exc:
            fail(ConfigurationError, "the client's Vault address is not a valid URL", exc)
        except requests.exceptions.RequestException as exc:
            fail(KMSUnavailableError, f"transport error ({type(exc).__name__})", exc)
        except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized) as exc:
            fail(
                KeyAccessDeniedError,
                "Vault refused (permission denied): the token's policy does not grant update "
                "on this path, or the token was revoked or expired",
                exc,
            )
        except hvac.exceptions.InvalidPath as exc:
            fail(KeyNotFoundError, "no Transit engine is mounted at this path", exc)
        except (
            hvac.exceptions.RateLimitExceeded,
            hvac.exceptions.InternalServerError,
            hvac.exceptions.BadGateway,
            hvac.exceptions.VaultDown,
            hvac.exceptions.VaultNotInitialized,
            hvac.exceptions.PreconditionFailed,
            # Any status hvac has no class for (a proxy's 504, ...): transient until proven
            # otherwise; the caller's retries are bounded.
            hvac.exceptions.UnexpectedError,
        ) as exc:
            fail(KMSUnavailableError, f"Vault is unavailable ({_status(exc)})", exc)
        except hvac.exceptions.InvalidRequest as exc:
            reason = _reason(exc)
            if any(s in reason for s in _NOT_FOUND):
                fail(KeyNotFoundError, "Vault has no Transit key of this name", exc)
            if any(s in reason for s in _REFUSED):
                fail(
                    KeyAccessDeniedError,
                    "Vault refused to use the key (soft-deleted, or its version retired by "
                    "min_decryption_version)",
                    exc,
                )
            if any(s in reason for s in _WRONG_KEY_TYPE):
                fail(
                    ConfigurationError,
                    "the Transit key cannot do authenticated encryption; create it with "
                    "'bao write -f <mount>/keys/<name> derived=true' (type aes256-gcm96)",
                    exc,
                )
            if op == "decrypt":
                fail(DecryptionError, "wrapped key failed authentication", exc)
            fail(KeyAccessError, "Vault rejected the request (400)", exc)
        except hvac.exceptions.VaultError as exc:
            fail(KeyAccessError, f"unexpected answer from Vault ({_status(exc)})", exc)


def _timeout(adapter: Any) -> dict[str, Any]:
    """A ``requests`` timeout ending with ``kms_deadline``, never longer than the client's."""
    left = call_timeout(math.inf)
    if math.isinf(left):
        return {}
    configured = getattr(adapter, "_kwargs", {}).get("timeout")
    if isinstance(configured, (int, float)):
        return {"timeout": min(float(configured), left)}
    if isinstance(configured, tuple) and len(configured) == 2:
        return {"timeout": tuple(left if t is None else min(float(t), left) for t in configured)}
    return {"timeout": left}


@lru_cache(maxsize=1024)
def _parse_ref(key_ref: str) -> tuple[str, str]:
    """``vault-transit://<mount>/<key>`` -> (mount, key name); KeyNotFoundError when malformed."""
    rest = key_ref[len(_PREFIX) :] if key_ref.startswith(_PREFIX) else None
    mount, _, name = (rest or "").rpartition("/")
    segments = mount.split("/")
    if (
        rest is None
        or _KEY_NAME.fullmatch(name) is None
        or not all(_MOUNT_SEGMENT.fullmatch(s) and s not in (".", "..") for s in segments)
    ):
        raise KeyNotFoundError(
            f"{key_ref!r} is not a Vault Transit key reference; expected "
            "vault-transit://<mount>/<key-name>, e.g. vault-transit://transit/acme",
            key_ref=key_ref,
            provider=_SCHEME,
        )
    return mount, name


def _associated_data(tenant: str, label: str) -> str:
    # Canonical JSON (sorted keys, no spaces, ASCII): the same bytes on wrap and unwrap, and
    # readable in the tenant's audit log when the mount does not HMAC it.
    doc = {"data_label": label or None, "sqlalchemy_cmk": _VERSION, "tenant": tenant}
    return base64.b64encode(
        json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    ).decode()


def _parse_wrapped(wrapped: bytes) -> tuple[str, str, str] | None:
    """Split a version-1 wrapped key; None when anything is off."""
    try:
        version, t_len = struct.unpack_from(">BH", wrapped, 0)
        if version != _VERSION or not 0 < t_len <= _MAX_TENANT:
            return None
        pos = 3
        tenant = wrapped[pos : pos + t_len].decode()
        pos += t_len
        (l_len,) = struct.unpack_from(">H", wrapped, pos)
        if l_len > _MAX_LABEL:
            return None
        pos += 2
        label = wrapped[pos : pos + l_len].decode()
        pos += l_len
        (c_len,) = struct.unpack_from(">H", wrapped, pos)
        pos += 2
        ciphertext = wrapped[pos:]
    except (struct.error, UnicodeDecodeError):
        return None
    if (
        len(tenant.encode()) != t_len
        or len(label.encode()) != l_len
        or not 0 < c_len <= _MAX_CIPHERTEXT
        or len(ciphertext) != c_len
    ):
        return None
    match = _CIPHERTEXT.fullmatch(ciphertext)
    if match is None:
        return None
    # Only canonical base64: a flipped padding bit must not decode to the same bytes.
    try:
        body = base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(body) != match.group(2):
        return None
    return tenant, label, ciphertext.decode("ascii")


def _field(body: Any, name: str) -> str | None:
    data = body.get("data") if isinstance(body, Mapping) else None
    value = data.get(name) if isinstance(data, Mapping) else None
    return value if isinstance(value, str) else None


def _bad(key_ref: str) -> NoReturn:
    raise DecryptionError("wrapped key failed authentication", key_ref=key_ref, provider=_SCHEME)


def _reason(exc: Any) -> str:
    errors = getattr(exc, "errors", None)
    if isinstance(errors, (list, tuple)):
        return " ".join(str(e) for e in errors).lower()
    return str(exc.args[0] if exc.args else "").lower()


def _status(exc: BaseException) -> str:
    # hvac keeps no status code; its exception class stands for it.
    return _STATUS.get(type(exc), type(exc).__name__)


_STATUS = {
    hvac.exceptions.RateLimitExceeded: "HTTP 429",
    hvac.exceptions.InternalServerError: "HTTP 500",
    hvac.exceptions.VaultNotInitialized: "HTTP 501",
    hvac.exceptions.BadGateway: "HTTP 502",
    hvac.exceptions.VaultDown: "HTTP 503",
}
