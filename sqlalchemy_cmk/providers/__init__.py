"""Key providers: the boundary between sqlalchemy-cmk and a tenant's KMS.

A provider wraps and unwraps 32-byte data keys under a master key that stays in the KMS. Each
provider serves one URI scheme (``local://``, ``aws-kms://``...); the scheme of a tenant's key
reference picks the provider, so one application can route tenants to different KMSs.

Providers map their SDK's errors onto :mod:`sqlalchemy_cmk.errors` at one place, most specific
first, always ``raise Ours(...) from exc``: a refusal becomes ``KeyAccessDeniedError``, an unknown
key ``KeyNotFoundError``, a transient fault ``KMSUnavailableError`` (retried by the caller), a
wrapped key that does not authenticate ``DecryptionError``. A TLS or certificate failure is a
configuration problem, not a transient fault: it is mapped to ``KeyAccessDeniedError`` or to a
``KMSUnavailableError`` with ``retryable = False``, never retried.

Every provider call runs under the key manager's ``kms_deadline``; :func:`call_timeout` tells a
provider how much of it is left, so that it can hand its SDK a timeout that ends no later (an SDK
call abandoned at the deadline would otherwise keep a connection busy for its own, longer,
timeout).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol, runtime_checkable

__all__ = ["KeyProvider", "call_timeout", "tls_failure"]

# Absolute time.monotonic() at which the current provider call must have returned; set by the
# key manager around each attempt (provider calls run in a copy of the caller's context).
_DEADLINE: ContextVar[float | None] = ContextVar("sqlalchemy_cmk_kms_deadline", default=None)

#: The shortest timeout handed to an SDK: a call that starts this close to the deadline fails
#: fast instead of being given no time at all (which some SDKs read as "no timeout").
MIN_TIMEOUT = 0.05


def call_timeout(default: float) -> float:
    """Seconds the provider call in progress may still take, at most ``default``.

    Outside a key manager call (a provider used directly), ``default``.

    Args:
        default: The provider's own timeout for one SDK call, in seconds.

    Returns:
        ``min(default, time left before kms_deadline)``, and at least ``MIN_TIMEOUT``.
    """
    deadline = _DEADLINE.get()
    if deadline is None:
        return default
    return max(min(default, deadline - time.monotonic()), MIN_TIMEOUT)


# ssl errors that mean the connection broke, not that TLS refused: retried like a reset.
_TLS_TRANSIENT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The TLS refusal behind ``exc`` (its causes and contexts included), if there is one.

    A certificate that does not verify, a client certificate the server refuses, no common
    protocol version or cipher: configuration problems that no retry cures. Providers map
    them to a non-retryable error (``KMSUnavailableError`` with ``retryable = False``), all
    alike. A connection that merely broke mid-TLS (EOF, reset) is not one of them.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLError) and not isinstance(current, _TLS_TRANSIENT):
            return current
        # urllib3 and requests keep the underlying error in args or .reason, azure-core in
        # .inner_exception, not always as a cause.
        nested = [
            current.__cause__,
            current.__context__,
            getattr(current, "reason", None),
            getattr(current, "inner_exception", None),
        ]
        nested += list(current.args)
        todo.extend(e for e in nested if isinstance(e, BaseException))
    return None


@contextmanager
def _deadline(at: float) -> Iterator[None]:
    """Run the body with :func:`call_timeout` counting down to ``at`` (``time.monotonic()``)."""
    token = _DEADLINE.set(at)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


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
        that a wrapped key of one tenant never unwraps as another's. It may hold more
        (``"data_label"``). A provider that sends them to its KMS binds them there (AWS
        encryption context, GCP additional authenticated data, Vault's context), so it must
        record them in the bytes it returns, because :meth:`unwrap_key` only gets
        ``{"tenant": ...}``; a tenant decrypting with its own tools must send them back exactly
        (each page of ``docs/providers`` gives the command).
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
