"""The errors sqlalchemy-cmk raises.

Every error derives from :class:`CMKError`, so ``except CMKError`` catches all of them. They mix
in SQLAlchemy's ``DontWrapMixin``: raised while a statement executes, they reach the caller as
themselves, not wrapped in ``sqlalchemy.exc.StatementError``.

The tree::

    CMKError
    ├── ConfigurationError          the application is set up wrongly; fix code or config
    │   ├── TenantNotConfiguredError    no key reference for the tenant (or key not allowed)
    │   │   └── TenantRevokedError          revoked by the operator (CMK.revoke, registry)
    │   └── RegistryIntegrityError      a key-registry row failed its integrity check
    ├── TenantContextError
    │   ├── NoTenantError               encrypted data touched with no tenant in context
    │   └── TenantMismatchError         a row of tenant A read or written under tenant B
    ├── KeyAccessError              the tenant's KMS refused or could not serve a key
    │   ├── KeyAccessDeniedError        revoked, disabled, forbidden: the tenant said no
    │   ├── KeyNotFoundError            the KMS does not know the key reference
    │   └── KMSUnavailableError         network, throttling, 5xx, after bounded retries
    ├── DecryptionError             stored bytes failed to parse or authenticate (opaque)
    ├── PlaintextWriteError         a write path that would store plaintext; nothing was sent
    ├── UnsupportedQueryError       a read that cannot work on ciphertext; nothing was sent
    │   └── IndexNotReadyError          a blind index not built yet: searching would miss rows
    ├── AuditError                  an audit sink failed, so the access did not happen
    ├── DeliveryError               an audit destination did not take a batch (the shipper retries)
    ├── RegistryConflictError       a concurrent registry change won; nothing was written
    └── InvalidValueError           a value that the column's underlying type cannot hold

A web application answers each with :func:`http_status`: 403 for a revocation, 503 for a KMS
outage, 409 for a registry conflict, 422 for a value the column cannot hold, 500 for the rest.

Messages and attributes name the tenant, table, column, key reference and provider where they
are known, and what to do; they never carry plaintext, key bytes or ciphertext.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import DontWrapMixin

__all__ = [
    "AuditError",
    "CMKError",
    "ConfigurationError",
    "DecryptionError",
    "DeliveryError",
    "IndexNotReadyError",
    "InvalidValueError",
    "KMSUnavailableError",
    "KeyAccessDeniedError",
    "KeyAccessError",
    "KeyNotFoundError",
    "NoTenantError",
    "PlaintextWriteError",
    "RegistryConflictError",
    "RegistryIntegrityError",
    "TenantContextError",
    "TenantMismatchError",
    "TenantNotConfiguredError",
    "TenantRevokedError",
    "UnsupportedQueryError",
    "http_status",
]


class CMKError(DontWrapMixin, Exception):
    """Root of every error raised by sqlalchemy-cmk.

    Attributes:
        tenant: The tenant concerned, when known.
        key_ref: The key reference (a URI such as ``local://acme``), when known.
        provider: The provider scheme (``local``, ``aws-kms``...), when known.
        table: The table concerned, when known.
        column: The column concerned, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        tenant: str | None = None,
        key_ref: str | None = None,
        provider: str | None = None,
        table: str | None = None,
        column: str | None = None,
    ) -> None:
        super().__init__(message)
        self.tenant = tenant
        self.key_ref = key_ref
        self.provider = provider
        self.table = table
        self.column = column

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only attributes are not in args: rebuild from the message and the state, so
        # errors survive pickling (multiprocessing, task queues) and copying.
        return (_rebuild, (type(self), str(self), self.__dict__.copy()))


class ConfigurationError(CMKError):
    """The application is configured wrongly (a model, a key file, a limit)."""


class TenantNotConfiguredError(ConfigurationError):
    """The tenant has no key reference, or a stored key reference is not one of its keys."""


class TenantRevokedError(TenantNotConfiguredError):
    """The operator revoked the tenant: :meth:`CMK.revoke <sqlalchemy_cmk.CMK.revoke>`, here or
    published by another process, or the tenant disabled in the database key registry.

    The tenant's own KMS refusing its key is :class:`KeyAccessDeniedError` instead.
    """


class TenantContextError(CMKError):
    """The tenant context does not allow the operation."""


class NoTenantError(TenantContextError):
    """Encrypted data was read or written with no tenant in context."""


class TenantMismatchError(TenantContextError):
    """A row that belongs to one tenant was read or written in another tenant's context.

    Usually a query that forgot ``WHERE tenant_id = ...``. Attributes: ``tenant`` is the context
    tenant, ``row_tenant`` the tenant the row is bound to.
    """

    def __init__(self, message: str, *, row_tenant: str, **kwargs: str | None) -> None:
        super().__init__(message, **kwargs)
        self.row_tenant = row_tenant


class KeyAccessError(CMKError):
    """The tenant's key could not be used."""


class KeyAccessDeniedError(KeyAccessError):
    """The KMS refused: the key is revoked, disabled, or the caller is not allowed to use it."""


class KeyNotFoundError(KeyAccessError):
    """The KMS does not know the key reference."""


class KMSUnavailableError(KeyAccessError):
    """The KMS could not be reached or answered with a transient error, after bounded retries.

    Attributes:
        retryable: True when trying again later may succeed (always True unless a provider
            knows better).
    """

    retryable = True


class DecryptionError(CMKError):
    """Stored bytes failed to parse or authenticate.

    Deliberately opaque, as in Fernet: a truncated value, a flipped bit, a value copied from
    another row, column or tenant, and a wrong key all raise this same error, so that the error
    does not tell an attacker which check failed.
    """


class PlaintextWriteError(CMKError):
    """A statement would have written a value into an encrypted column without encrypting it.

    Nothing was sent to the database. Write through the ORM unit of work (``session.add``,
    attribute changes, ``session.execute(insert(Model), [...])``), which encrypts.
    """


class UnsupportedQueryError(CMKError):
    """A query uses an encrypted column where only plaintext could give an answer.

    Comparisons, ``LIKE``, ``IN``, ``ORDER BY``, ``GROUP BY``, ``DISTINCT`` over the column,
    aggregates and functions or casts of it would run on randomized ciphertext and silently
    return wrong rows or a wrong order. Nothing was sent. Supported: selecting the column (the
    hooks decrypt it), ``IS NULL`` / ``IS NOT NULL``, and entity-level ``DISTINCT``; and on a
    column with a blind index, equality, ``IN`` and joins (``docs/search.md``).
    """


class IndexNotReadyError(UnsupportedQueryError):
    """A search on a blind index that is not built yet for every row: it would miss rows.

    Raised until ``sqlalchemy-cmk search build`` (or the Alembic operation) has indexed the
    rows written before the index existed; nothing was sent.
    """


class AuditError(CMKError):
    """An audit sink raised: an access that cannot be audited does not happen.

    The sink's own exception is the ``__cause__``; audit events carry no plaintext.
    """


class DeliveryError(CMKError):
    """An audit destination did not take a batch; the events stay in the spool.

    Attributes:
        retryable: False when retrying cannot help until an operator acts (a 4xx answer, a
            credential the destination refuses); the shipper still keeps the events and retries
            at its longest backoff.
        retry_after: Seconds the destination asked to wait, if it said.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = True,
        retry_after: float | None = None,
        **kwargs: str | None,
    ) -> None:
        super().__init__(message, **kwargs)
        self.retryable = retryable
        self.retry_after = retry_after


class RegistryIntegrityError(ConfigurationError):
    """A registry row failed its integrity check: it was changed outside the registry API.

    Either the row was tampered with (a key reference, the accepted list, the disabled flag or
    the tenant id edited, rows swapped, an older row put back), the row comes from another
    deployment (another ``registry_id``, schema or table), it is malformed, it carries a
    version-1 MAC while ``allow_v1_macs`` is off, or the registry secret is not the one the rows
    were written with. The tenant is unusable until an operator with the secret
    checks the row and writes it again through the API or the CLI.
    """


class RegistryConflictError(CMKError):
    """Another writer changed the tenant's row between this writer's read and its write.

    Nothing was written. Read the tenant again and retry the change if it still makes sense.
    """


class InvalidValueError(CMKError):
    """A value does not fit the encrypted column's underlying type (a ``str`` for an Integer)."""


# Most specific first: the first class the error is an instance of gives the status.
_HTTP_STATUS: tuple[tuple[type[CMKError], int], ...] = (
    (TenantRevokedError, 403),  # the operator said no
    (KeyAccessDeniedError, 403),  # the tenant's KMS said no: revoked, disabled, forbidden
    (KMSUnavailableError, 503),  # transient: the client may retry later
    (RegistryConflictError, 409),  # another writer won: read again, then retry
    (InvalidValueError, 422),  # the value does not fit the column's type
)


def http_status(exc: BaseException) -> int:
    """The HTTP status code a web application should answer for ``exc``.

    403 when the tenant's access is revoked (:class:`TenantRevokedError`, or
    :class:`KeyAccessDeniedError` from the tenant's KMS), 503 when its KMS is unavailable
    (:class:`KMSUnavailableError`, worth a ``Retry-After``), 409 for a
    :class:`RegistryConflictError`, 422 for an :class:`InvalidValueError`, and 500 for every
    other error, of this library or not: those are the application's bugs or misconfiguration
    (no tenant in context, a query that forgot the tenant filter, a key reference the KMS does
    not know, tampered data), which the client cannot fix. See ``docs/frameworks.md``.

    Args:
        exc: Any exception; only instances of :class:`CMKError` get a status other than 500.

    Returns:
        The status code.
    """
    for cls, status in _HTTP_STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def _rebuild(cls: type[CMKError], message: str, state: dict[str, Any]) -> CMKError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err
