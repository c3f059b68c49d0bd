"""A provider whose master keys live in a file or an environment variable.

For development, demos, tests and single-tenant installs where the operator holds the key. It is
not customer-managed: the master keys sit with the application. Use a cloud provider for CMK.

Key references are ``local://<name>``. The key file is JSON::

    {
      "keys": {"<name>": "<base64 of 32 random bytes>", ...},
      "tenants": {"<tenant>": ["<name>", ...], ...}
    }

``tenants`` is optional: each tenant's key names, the primary (which encrypts new data) first,
the others still accepted for reading; :attr:`LocalKeyProvider.tenant_keys` gives it in the
form ``CMK(tenant_keys=...)`` takes. ``sqlalchemy-cmk keys init|add|rotate|list`` keeps such a
file (atomically, mode 0600, never replacing a key);
:meth:`LocalKeyProvider.generate_key_file` writes one without ``tenants``.

:meth:`LocalKeyProvider.from_env` reads the same keys from one environment variable,
``name=base64,name2=base64`` (by default ``SQLALCHEMY_CMK_LOCAL_KEYS``).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import ConfigurationError, DecryptionError, KeyAccessDeniedError, KeyNotFoundError

__all__ = ["LocalKeyProvider"]

_SCHEME = "local"
_PREFIX = "local://"
_WRAP_VERSION = b"\x01"
_WRAP_AAD = b"sqlalchemy-cmk/local-wrap/v1"


def _aad(name: str, context: Mapping[str, str]) -> bytes:
    # Binds the key name and the tenant (the only binding entry of the context), as JSON: an
    # unambiguous encoding.
    return _WRAP_AAD + json.dumps([name, [["tenant", context.get("tenant", "")]]]).encode()


def _check_key(name: str, key: bytes) -> None:
    if len(key) != 32:
        raise ConfigurationError(
            f"local master key {name!r} must be 32 bytes (base64 of 32 random bytes), "
            f"got {len(key)}; generate one with LocalKeyProvider.generate_key_file()"
        )
    if len(set(key)) < 8:
        raise ConfigurationError(
            f"local master key {name!r} is weak (too few distinct bytes); generate a random one"
        )


class LocalKeyProvider:
    """Wraps data keys with AES-256-GCM under named master keys held in memory.

    ``revoke(name)`` makes the provider refuse that key as a KMS would when the tenant revokes
    it, so demos and tests can show revocation without a cloud account.
    """

    scheme = _SCHEME

    def __init__(
        self,
        keys: Mapping[str, bytes],
        tenant_keys: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Args:
            keys: Key name -> 32 random bytes.
            tenant_keys: Tenant id -> its key names, primary first (a key file's ``tenants``).

        Raises:
            ConfigurationError: no keys, a key of the wrong size or visibly not random, or a
                tenant naming no key or a key that is not there.
        """
        if not keys:
            raise ConfigurationError("LocalKeyProvider needs at least one master key")
        for name, key in keys.items():
            _check_key(name, key)
        self._tenant_keys: dict[str, list[str]] = {}
        for tenant, names in (tenant_keys or {}).items():
            if isinstance(names, str) or not names or any(n not in keys for n in names):
                raise ConfigurationError(
                    f"tenant {tenant!r} must name one or more of the provider's keys"
                )
            self._tenant_keys[tenant] = [_PREFIX + n for n in names]
        self._aeads = {name: AESGCM(key) for name, key in keys.items()}
        self._revoked: set[str] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalKeyProvider(keys={sorted(self._aeads)!r})"

    @property
    def tenant_keys(self) -> dict[str, list[str]]:
        """The key file's tenants as ``CMK(tenant_keys=...)`` takes them (a copy).

        Tenant id -> ``local://`` key references, the primary first; empty when the file has no
        ``tenants`` (or the keys came from :meth:`from_env`).
        """
        return {tenant: list(refs) for tenant, refs in self._tenant_keys.items()}

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> LocalKeyProvider:
        """Load master keys from a JSON key file (see the module docstring)."""
        p = Path(path)
        # Errors are raised outside the handlers: a JSONDecodeError keeps the whole file (the
        # master keys) in its ``doc``, and would ride along as ``__context__``.
        problem = None
        try:
            doc = json.loads(p.read_text())
        except FileNotFoundError:
            problem = (
                "does not exist; create one with `sqlalchemy-cmk keys init FILE --tenant T` or "
                "LocalKeyProvider.generate_key_file(path, [names])"
            )
        except (OSError, ValueError) as exc:
            problem = f"is unreadable or not JSON ({type(exc).__name__})"
        if problem is not None:
            raise ConfigurationError(f"key file {p} {problem}")
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), dict):
            raise ConfigurationError(f'key file {p} must hold {{"keys": {{"name": "base64"}}}}')
        tenants = doc.get("tenants", {})
        if not isinstance(tenants, dict) or not all(
            isinstance(names, list) and all(isinstance(n, str) for n in names)
            for names in tenants.values()
        ):
            raise ConfigurationError(f'key file {p}: "tenants" must map tenant ids to key names')
        return cls(_decode_keys(doc["keys"], str(p)), tenants)

    @classmethod
    def from_env(cls, variable: str = "SQLALCHEMY_CMK_LOCAL_KEYS") -> LocalKeyProvider:
        """Load master keys from an environment variable: ``name=base64,name2=base64``.

        Each name is a key reference's ``local://<name>``; each value the standard base64 of 32
        random bytes. Spaces around an entry are ignored.

        Raises:
            ConfigurationError: the variable is unset or empty, or an entry is not
                ``name=base64`` of a 32-byte key.
        """
        raw = os.environ.get(variable)
        if not raw:
            raise ConfigurationError(f"environment variable {variable} is not set or empty")
        pairs: dict[str, str] = {}
        for item in raw.split(","):
            name, sep, value = item.strip().partition("=")
            if not sep or not name:
                raise ConfigurationError(f"{variable} must be name=base64[,name=base64...]")
            pairs[name] = value
        return cls(_decode_keys(pairs, variable))

    @staticmethod
    def generate_key_file(path: str | os.PathLike[str], names: Iterable[str]) -> Path:
        """Write a key file with a fresh random key per name (mode 0600); refuse to overwrite."""
        p = Path(path)
        if isinstance(names, str):
            raise ConfigurationError("generate_key_file() takes a list of key names, not a str")
        keys = {n: base64.b64encode(os.urandom(32)).decode() for n in names}
        if not keys:
            raise ConfigurationError("generate_key_file() needs at least one key name")
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigurationError(
                f"key file {p} exists; refusing to overwrite master keys (data under them would "
                "become unreadable)"
            ) from None
        with os.fdopen(fd, "w") as fh:
            json.dump({"keys": keys}, fh, indent=2)
        return p

    def revoke(self, name: str) -> None:
        """Refuse the key from now on, as a KMS does after the tenant revokes it."""
        with self._lock:
            self._revoked.add(name)

    def restore(self, name: str) -> None:
        """Accept a revoked key again."""
        with self._lock:
            self._revoked.discard(name)

    def _aead(self, key_ref: str) -> tuple[str, AESGCM]:
        if not key_ref.startswith(_PREFIX):
            raise KeyNotFoundError(
                f"{key_ref!r} is not a local:// key reference", key_ref=key_ref, provider=_SCHEME
            )
        name = key_ref[len(_PREFIX) :]
        aead = self._aeads.get(name)
        if aead is None:
            raise KeyNotFoundError(
                f"no local master key named {name!r}", key_ref=key_ref, provider=_SCHEME
            )
        if name in self._revoked:
            raise KeyAccessDeniedError(
                f"local master key {name!r} is revoked", key_ref=key_ref, provider=_SCHEME
            )
        return name, aead

    def wrap_key(self, key_ref: str, data_key: bytes, context: Mapping[str, str]) -> bytes:
        name, aead = self._aead(key_ref)
        nonce = os.urandom(12)
        return _WRAP_VERSION + nonce + aead.encrypt(nonce, data_key, _aad(name, context))

    def unwrap_key(self, key_ref: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        name, aead = self._aead(key_ref)
        if len(wrapped) != 1 + 12 + 32 + 16 or wrapped[:1] != _WRAP_VERSION:
            raise DecryptionError("wrapped key is malformed", key_ref=key_ref, provider=_SCHEME)
        try:
            return aead.decrypt(wrapped[1:13], wrapped[13:], _aad(name, context))
        except InvalidTag:
            pass
        raise DecryptionError(
            "wrapped key failed authentication", key_ref=key_ref, provider=_SCHEME
        )


def _decode_keys(raw: Mapping[str, object], where: str) -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    for name, value in raw.items():
        if not isinstance(value, str):
            raise ConfigurationError(f"{where}: key {name!r} must be a base64 string")
        key: bytes | None
        try:
            key = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            key = None
        if key is None:  # raised here, not in the handler: nothing chained
            raise ConfigurationError(f"{where}: key {name!r} is not valid base64")
        keys[name] = key
    return keys
