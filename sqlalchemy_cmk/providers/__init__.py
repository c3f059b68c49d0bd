"""Key providers: the boundary between sqlalchemy-cmk and a tenant's KMS.

A provider wraps and unwraps 32-byte data keys under a master key that stays in the KMS. Each
provider serves one URI scheme (``local://``, ``aws-kms://``...); the scheme of a tenant's key
reference picks the provider, so one application can route tenants to different KMSs.

Providers map their SDK's errors onto :mod:`sqlalchemy_cmk.errors` at one place, most specific
first, always ``raise Ours(...) from exc``: a refusal becomes ``KeyAccessDeniedError``, an unknown
key ``KeyNotFoundError``, a transient fault ``KMSUnavailableError`` (retried by the caller), a
wrapped key that does not authenticate ``DecryptionError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

__all__ = ["KeyProvider"]


@runtime_checkable
class KeyProvider(Protocol):
    """What a KMS backend implements.

    Attributes:
        scheme: The URI scheme this provider serves, e.g. ``"local"`` for ``local://acme``.
    """

    scheme: str

    def wrap_key(self, key_ref: str, data_key: bytes, context: Mapping[str, str]) -> bytes:
        """Encrypt ``data_key`` under the master key ``key_ref``, bound to the tenant.

        ``context`` always holds ``"tenant"``, which the provider must bind (AWS
        EncryptionContext, GCP additional authenticated data, Vault derivation context...), so
        that a wrapped key of one tenant never unwraps as another's. It may hold more,
        informational entries (``"data_label"``); a provider that sends them to its KMS (for the
        tenant's audit log) must record them in the bytes it returns, because
        :meth:`unwrap_key` only gets ``{"tenant": ...}``.
        """
        ...

    def unwrap_key(self, key_ref: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        """Return the data key that :meth:`wrap_key` wrapped for ``context["tenant"]``.

        Raises (mapped at the provider's boundary, always ``from`` the SDK error):
            KeyAccessDeniedError: the KMS refused (revoked, disabled, forbidden).
            KeyNotFoundError: the KMS does not know ``key_ref``.
            KMSUnavailableError: network error, timeout, throttling, 5xx.
            DecryptionError: ``wrapped`` is corrupt or bound to another tenant.
        """
        ...
