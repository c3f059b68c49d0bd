"""Which keys each tenant has: one primary (encrypts new data) and any accepted (still decrypt).

A tenant moves keys, or clouds, without downtime by making a new key its primary while the old
one stays accepted until every row has been rewrapped.

Backends implement :class:`KeyRegistry`. :class:`StaticKeyRegistry` is the in-code mapping that
``CMK(tenant_keys=...)`` builds; ``sqlalchemy_cmk.registry_db.DatabaseKeyRegistry`` keeps tenants
in an integrity-protected table.
"""

from __future__ import annotations

import threading
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .errors import ConfigurationError, TenantNotConfiguredError, TenantRevokedError

__all__ = [
    "TENANT_ID_MAX",
    "KeyRegistry",
    "RevocableRegistry",
    "StaticKeyRegistry",
    "TenantKeys",
    "parse_key_ref",
    "tenant_id_problem",
]

TENANT_ID_MAX = 255


@dataclass(frozen=True)
class TenantKeys:
    """A tenant's key references.

    Attributes:
        primary: The key reference that wraps new data keys.
        accepted: Every key reference whose data keys may be unwrapped (includes ``primary``).
        credentials: Provider-specific references to credentials (a role ARN, a client id, a
            secret name): never the credentials themselves.
    """

    primary: str
    accepted: frozenset[str]
    credentials: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.primary not in self.accepted:
            raise ConfigurationError("a tenant's primary key must be among its accepted keys")


@runtime_checkable
class KeyRegistry(Protocol):
    """Where ``CMK`` looks up a tenant's keys, on every wrap and unwrap (so cache if slow)."""

    def tenant_keys(self, tenant: str) -> TenantKeys:
        """Return the tenant's keys.

        Raises:
            TenantNotConfiguredError: unknown tenant.
            TenantRevokedError: disabled tenant (a TenantNotConfiguredError).
        """
        ...


def tenant_id_problem(tenant: object) -> str | None:
    """Why ``tenant`` is not a canonical tenant id, or None if it is one.

    A tenant id is a non-empty ``str`` of at most 255 characters, in Unicode NFC, made of
    printable characters only (``str.isprintable``: no control characters such as NUL, newline,
    DEL or C1, no format characters such as bidi overrides or zero-width spaces, no separators
    other than the ASCII space), not beginning or ending with a space. Ids are case-sensitive
    and compared code point by code point (bytewise in UTF-8) on every dialect. The same rule
    applies to ``registry_id``. :class:`~sqlalchemy_cmk.registry_db.DatabaseKeyRegistry` and
    :class:`StaticKeyRegistry` enforce it when a tenant is added.
    """
    if not isinstance(tenant, str) or not tenant:
        return "it must be a non-empty string"
    if len(tenant) > TENANT_ID_MAX:
        return f"it must be at most {TENANT_ID_MAX} characters long"
    if not tenant.isprintable():
        # Such characters make listings and log lines that look forged (a newline starts a new
        # line, U+202E reverses the text after it), and PostgreSQL refuses NUL outright.
        return (
            "it contains a character that is not printable (a control character such as NUL, "
            "newline or DEL, or a format character such as a bidi override or zero-width space)"
        )
    if tenant != tenant.strip(" "):
        return "it begins or ends with a space"
    nfc = unicodedata.normalize("NFC", tenant)
    if nfc != tenant:
        # Refused rather than normalized: the application looks tenants up with the exact id it
        # is given, so a silently normalized row would never be found under the spelling that
        # was added.
        return f"it is not in Unicode normalization form NFC; its NFC form is {nfc!r}"
    return None


def parse_key_ref(ref: object, tenant: str | None = None) -> tuple[str, str]:
    """Split ``scheme://rest``; ConfigurationError naming the tenant if it is not such a URI."""
    scheme, sep, rest = ref.partition("://") if isinstance(ref, str) else ("", "", "")
    if not sep or not rest or not scheme:
        raise ConfigurationError(
            f"key reference {ref!r} of tenant {tenant!r} is not a URI like local://name",
            tenant=tenant,
        )
    return scheme, rest


class StaticKeyRegistry:
    """Tenants defined in code: ``{"acme": "aws-kms://arn...", "globex": [primary, old, ...]}``."""

    def __init__(self, tenant_keys: Mapping[str, str | Sequence[str]]) -> None:
        self._tenants: dict[str, TenantKeys] = {}
        for tenant, refs in tenant_keys.items():
            ref_list = [refs] if isinstance(refs, str) else list(refs)
            if not ref_list:
                raise ConfigurationError(f"tenant {tenant!r} needs at least one key")
            problem = tenant_id_problem(tenant)
            if problem is not None:
                raise ConfigurationError(f"tenant id {tenant!r} is refused: {problem}")
            for ref in ref_list:
                parse_key_ref(ref, tenant)
            self._tenants[tenant] = TenantKeys(ref_list[0], frozenset(ref_list))

    def tenant_keys(self, tenant: str) -> TenantKeys:
        keys = self._tenants.get(tenant)
        if keys is None:
            raise TenantNotConfiguredError(
                f"tenant {tenant!r} has no key reference: add it to CMK(tenant_keys=...)",
                tenant=tenant,
            )
        return keys

    def tenants(self) -> list[str]:
        return sorted(self._tenants)


class RevocableRegistry:
    """A registry in front of another, refusing the tenants revoked in this process.

    ``CMK`` puts one in front of its registry: :meth:`CMK.revoke <sqlalchemy_cmk.CMK.revoke>`
    and a :class:`~sqlalchemy_cmk.revocation.RevocationWatcher` add tenants here, and every wrap
    and unwrap asks it first. It holds no cache, so a revoked tenant is refused from the next
    lookup on, whatever the registry behind it has cached.

    Args:
        inner: The registry that knows the tenants' keys.
    """

    def __init__(self, inner: KeyRegistry) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        # Replaced, never mutated: lookups read it without the lock.
        self._revoked: frozenset[str] = frozenset()

    def tenant_keys(self, tenant: str) -> TenantKeys:
        """The tenant's keys from the registry behind, unless the tenant is revoked.

        Raises:
            TenantRevokedError: the tenant is revoked.
            TenantNotConfiguredError: the registry behind refuses it.
        """
        if tenant in self._revoked:
            raise TenantRevokedError(
                f"tenant {tenant!r} is revoked (CMK.revoke, or a revocation another process "
                "published): CMK.reinstate lifts it",
                tenant=tenant,
            )
        return self.inner.tenant_keys(tenant)

    def revoke(self, tenant: str) -> bool:
        """Refuse ``tenant`` from now on; False if it already was."""
        with self._lock:
            if tenant in self._revoked:
                return False
            self._revoked = self._revoked | {tenant}
            return True

    def reinstate(self, tenant: str) -> bool:
        """Serve ``tenant`` again; False if it was not revoked."""
        with self._lock:
            if tenant not in self._revoked:
                return False
            self._revoked = self._revoked - {tenant}
            return True

    def revoked(self) -> frozenset[str]:
        """The tenants revoked in this process."""
        return self._revoked
