"""The :class:`CMK` object: configuration, row sealing and opening, and the low-level API."""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import LargeBinary, Table

from . import _codecs, _format
from ._keys import CachePolicy, DataKey, KeyManager, RetryPolicy, TenantKeys
from ._mapping import ColumnSpec, table_spec
from .audit import AuditSink, LoggingAuditSink
from .context import TenantContext, require_context
from .errors import (
    ConfigurationError,
    DecryptionError,
    NoTenantError,
    TenantMismatchError,
)
from .providers import KeyProvider
from .types import EncryptedValue

__all__ = ["CMK", "EncryptedDocument"]

_aad_prefix = functools.lru_cache(maxsize=65536)(_format.aad_prefix)


@dataclass(frozen=True)
class EncryptedDocument:
    """The output of :meth:`CMK.encrypt_document`: store ``edek`` next to ``fields``.

    Attributes:
        edek: The wrapped data key with the document's binding (tenant, row id); not secret.
        fields: Field name -> encrypted bytes.
    """

    edek: bytes
    fields: Mapping[str, bytes]

    def __repr__(self) -> str:
        return f"EncryptedDocument(fields={sorted(self.fields)!r})"


@dataclass
class SealJob:
    """One table row to encrypt: its values by column, and its companion if it has one."""

    table: str
    values: dict[ColumnSpec, Any]
    companion: bytes | None = None
    # Filled by CMK.seal():
    new_companion: bytes | None = None
    sealed: dict[ColumnSpec, bytes] | None = None


@dataclass
class OpenJob:
    """One table row to decrypt: its companion and ciphertexts by column."""

    table: str
    companion: bytes
    values: dict[ColumnSpec, bytes]
    # Filled by CMK.open():
    plain: dict[ColumnSpec, Any] | None = None


class CMK:
    """Per-tenant envelope encryption for a SQLAlchemy application.

    Args:
        provider: The key provider, when there is one (shorthand for ``providers=[provider]``).
        providers: Providers, one per URI scheme; a tenant's key reference picks one.
        tenant_keys: Tenant id -> key reference, or a sequence of them whose first is the
            primary (encrypts new data) and the rest are still accepted for reading.
        cache_ttl: Seconds an unwrapped data key is used without asking the KMS again; the bound
            on how long a revocation takes to bite. 0 disables caching (one KMS call per flush
            and per load).
        cache_max_entries: Most unwrapped data keys held at once (LRU).
        write_key_max_age: Seconds a tenant's write key is reused; defaults to ``cache_ttl``
            and may not exceed it.
        write_key_max_uses: Most values encrypted under one write key.
        retry_attempts: Attempts at a KMS call that fails transiently (1 = no retry).
        retry_backoff: Base of the exponential backoff between attempts, seconds.
        kms_deadline: Overall seconds allowed for one KMS call with its retries.
        max_concurrency: Most KMS calls in flight at once for one load.
        audit_sinks: Where audit events go; default: JSON lines to the ``sqlalchemy_cmk.audit``
            logger. Pass ``[]`` to disable (not recommended).

    Raises:
        ConfigurationError: no provider, a key reference whose scheme has no provider, a tenant
            with no key, or limits out of range.
    """

    def __init__(
        self,
        provider: KeyProvider | None = None,
        *,
        providers: Sequence[KeyProvider] = (),
        tenant_keys: Mapping[str, str | Sequence[str]],
        cache_ttl: float = 60.0,
        cache_max_entries: int = 1000,
        write_key_max_age: float | None = None,
        write_key_max_uses: int = 2**20,
        retry_attempts: int = 3,
        retry_backoff: float = 0.05,
        kms_deadline: float = 10.0,
        max_concurrency: int = 8,
        audit_sinks: Sequence[AuditSink] | None = None,
    ) -> None:
        all_providers = ([provider] if provider is not None else []) + list(providers)
        if not all_providers:
            raise ConfigurationError("CMK needs a provider, e.g. LocalKeyProvider.from_file(...)")
        by_scheme: dict[str, KeyProvider] = {}
        for p in all_providers:
            if p.scheme in by_scheme:
                raise ConfigurationError(f"two providers serve the scheme {p.scheme!r}")
            by_scheme[p.scheme] = p
        tenants = {t: _tenant_keys(t, refs, by_scheme) for t, refs in tenant_keys.items()}
        self._keys = KeyManager(
            by_scheme,
            tenants,
            CachePolicy(cache_ttl, cache_max_entries, write_key_max_age, write_key_max_uses),
            RetryPolicy(retry_attempts, retry_backoff, kms_deadline, max_concurrency),
            [LoggingAuditSink()] if audit_sinks is None else audit_sinks,
        )
        self._installed: list[tuple[Any, list[tuple[str, Any]]]] = []

    def __repr__(self) -> str:
        return f"<CMK providers={sorted(self._keys._providers)!r}>"

    # -- session integration -------------------------------------------------------------------

    def install(self, target: Any) -> None:
        """Attach the encrypt-on-flush and decrypt-on-load hooks to the user's sessions.

        Args:
            target: A ``sessionmaker``, a ``Session`` subclass, or one ``Session``.

        Raises:
            ConfigurationError: already installed on ``target``.
        """
        from ._session import install

        if any(t is target for t, _ in self._installed):
            raise ConfigurationError("CMK is already installed on this target")
        self._installed.append((target, install(self, target)))

    def uninstall(self, target: Any) -> None:
        """Detach the hooks that :meth:`install` attached to ``target``."""
        from ._session import uninstall

        for i, (t, listeners) in enumerate(self._installed):
            if t is target:
                uninstall(target, listeners)
                del self._installed[i]
                return
        raise ConfigurationError("CMK is not installed on this target")

    def forget_tenant(self, tenant: str | None = None) -> int:
        """Drop a tenant's cached data keys now (all tenants' if ``None``); returns the count.

        Call it when a tenant revokes its key to make the revocation bite at once instead of
        within ``cache_ttl``; the next access goes to the tenant's KMS.
        """
        return self._keys.forget(tenant)

    # -- sealing and opening rows (shared by the ORM hooks and the low-level API) -------------

    def _tenant_for_write(self, ctx: TenantContext) -> str:
        if ctx.tenant_id is None:
            raise NoTenantError(
                "cannot write encrypted data in a cross-tenant context: open "
                "tenant_context(tenant_id) for the tenant that owns the new rows"
            )
        return ctx.tenant_id

    def seal(self, jobs: Sequence[SealJob], ctx: TenantContext) -> None:
        """Encrypt every job in place, for the context tenant: one wrap at most per window."""
        if not jobs:
            return
        tenant = self._tenant_for_write(ctx)
        rng = self._keys.rng
        new = [j for j in jobs if j.companion is None]
        old = [j for j in jobs if j.companion is not None]
        keys: dict[bytes, DataKey] = {}
        if old:
            splits = [_format.split_companion(j.companion) for j in old]  # type: ignore[arg-type]
            self._check_tenants({e for _, e in splits}, ctx, [j.table for j in old])
            keys = self._keys.read_keys([e for _, e in splits], ctx)
        n_values = sum(len(j.values) for j in jobs)
        write_key = (
            self._keys.write_key(tenant, sum(len(j.values) for j in new), ctx) if new else None
        )
        nonces = rng(_format.NONCE_SIZE * n_values)
        row_ids = rng(_format.ROW_ID_SIZE * len(new))
        n = r = 0
        rows_by_table: dict[str, int] = defaultdict(int)
        cols_by_table: dict[str, set[str]] = defaultdict(set)
        for job in jobs:
            if job.companion is None:
                assert write_key is not None
                key = write_key
                row_id = row_ids[r : r + _format.ROW_ID_SIZE]
                r += _format.ROW_ID_SIZE
                job.new_companion = _format.encode_companion(row_id, key.envelope)
            else:
                row_id, env = _format.split_companion(job.companion)
                key = keys[env]
            sealed = {}
            for col, value in job.values.items():
                pt = _codecs.encode(col.codec, value, table=job.table, column=col.name)
                aad = _aad_prefix(tenant, job.table, col.name) + row_id
                sealed[col] = _format.seal(key.aead, nonces[n : n + _format.NONCE_SIZE], aad, pt)
                n += _format.NONCE_SIZE
            job.sealed = sealed
            rows_by_table[job.table] += 1
            cols_by_table[job.table].update(c.name for c in job.values)
        for table, count in rows_by_table.items():
            self._keys.emit(
                ctx,
                "encrypt",
                "ok",
                tenant,
                table=table,
                columns=tuple(sorted(cols_by_table[table])),
                rows=count,
            )

    def open(self, jobs: Sequence[OpenJob], ctx: TenantContext | None) -> None:
        """Decrypt every job in place. Checks tenants first: nothing is unwrapped for a row of
        another tenant. Distinct data keys are unwrapped once each, concurrently."""
        if not jobs:
            return
        if ctx is None:
            tables = sorted({j.table for j in jobs})
            raise NoTenantError(
                f"encrypted rows of {', '.join(tables)} loaded with no tenant in context: wrap "
                "the work in `with tenant_context(tenant_id, ...)`",
                table=tables[0],
            )
        started = time.monotonic()
        splits = [_format.split_companion(j.companion) for j in jobs]
        tenant_of = self._check_tenants({e for _, e in splits}, ctx, [j.table for j in jobs])
        keys = self._keys.read_keys([e for _, e in splits], ctx)
        counts: dict[tuple[str, str], int] = defaultdict(int)
        cols: dict[tuple[str, str], set[str]] = defaultdict(set)
        for job, (row_id, env) in zip(jobs, splits, strict=True):
            key = keys[env]
            tenant = tenant_of[env]
            plain = {}
            for col, ct in job.values.items():
                aad = _aad_prefix(tenant, job.table, col.name) + row_id
                pt = _format.open_(key.aead, aad, ct)
                plain[col] = _codecs.decode(col.codec, pt, table=job.table, column=col.name)
            job.plain = plain
            counts[(tenant, job.table)] += 1
            cols[(tenant, job.table)].update(c.name for c in job.values)
        ms = (time.monotonic() - started) * 1000
        for (tenant, table), count in counts.items():
            self._keys.emit(
                ctx,
                "decrypt",
                "ok",
                tenant,
                table=table,
                rows=count,
                columns=tuple(sorted(cols[(tenant, table)])),
                duration_ms=ms,
            )

    def _check_tenants(
        self, envelopes: set[bytes], ctx: TenantContext, tables: Sequence[str]
    ) -> dict[bytes, str]:
        tenant_of = {e: _format.parse_envelope(e).tenant for e in envelopes}
        if not ctx.cross_tenant:
            for tenant in set(tenant_of.values()):
                if tenant != ctx.tenant_id:
                    self._keys.emit(
                        ctx,
                        "decrypt",
                        "mismatch",
                        tenant,
                        table=tables[0],
                        error="TenantMismatchError",
                    )
                    raise TenantMismatchError(
                        f"a row of {tables[0]!r} belongs to tenant {tenant!r} but the context "
                        f"tenant is {ctx.tenant_id!r}: filter the query by tenant (or use "
                        "cross_tenant_context() for deliberate multi-tenant reads)",
                        row_tenant=tenant,
                        tenant=ctx.tenant_id,
                        table=tables[0],
                    )
        return tenant_of

    # -- low-level API -------------------------------------------------------------------------

    def encrypt_documents(
        self, documents: Sequence[Mapping[str, bytes]], *, namespace: str = "document"
    ) -> list[EncryptedDocument]:
        """Encrypt documents (field -> bytes) for the context tenant, under one data key.

        The tenant and audit metadata come from the enclosing :func:`tenant_context`. Each
        document gets its own EDEK value (its own row id), so fields cannot be moved between
        documents; ``namespace`` is bound too, like a table name.

        Raises:
            NoTenantError: no tenant in context.
            KeyAccessDeniedError, KMSUnavailableError: the tenant's KMS refused or failed.
        """
        ctx = require_context()
        jobs = [
            SealJob(namespace, {_field(name): value for name, value in doc.items()})
            for doc in documents
        ]
        self.seal(jobs, ctx)
        return [
            EncryptedDocument(
                j.new_companion or b"", {c.name: ct for c, ct in (j.sealed or {}).items()}
            )
            for j in jobs
        ]

    def encrypt_document(
        self, fields: Mapping[str, bytes], *, namespace: str = "document"
    ) -> EncryptedDocument:
        """Encrypt one document; see :meth:`encrypt_documents`."""
        return self.encrypt_documents([fields], namespace=namespace)[0]

    def decrypt_documents(
        self, documents: Sequence[EncryptedDocument], *, namespace: str = "document"
    ) -> list[dict[str, bytes]]:
        """Decrypt documents written by :meth:`encrypt_documents`, for the context tenant.

        Raises:
            TenantMismatchError: a document belongs to another tenant.
            DecryptionError: an EDEK or field was altered, truncated or moved.
        """
        ctx = require_context()
        jobs = [
            OpenJob(namespace, doc.edek, {_field(k): v for k, v in doc.fields.items()})
            for doc in documents
        ]
        self.open(jobs, ctx)
        return [{c.name: v for c, v in (j.plain or {}).items()} for j in jobs]

    def decrypt_document(
        self, document: EncryptedDocument, *, namespace: str = "document"
    ) -> dict[str, bytes]:
        """Decrypt one document; see :meth:`decrypt_documents`."""
        return self.decrypt_documents([document], namespace=namespace)[0]

    def decrypt_row(self, table: Table, row: Mapping[str, Any]) -> dict[str, Any]:
        """Decrypt the encrypted columns of a row read through Core.

        Args:
            table: The ``Table`` the row comes from.
            row: The row as a mapping by column name (``row._mapping``); it must include the
                companion EDEK column.

        Returns:
            A copy of ``row`` with each encrypted column decrypted.
        """
        spec = table_spec(table)
        out = dict(row)
        if spec is None:
            return out
        values = {
            c: out[c.name].ciphertext
            for c in spec.columns
            if isinstance(out.get(c.name), EncryptedValue)
        }
        if not values:
            return out
        companion = out.get(spec.companion_name)
        if companion is None:
            raise DecryptionError(
                f"row of {spec.table!r} has encrypted values but no EDEK", table=spec.table
            )
        job = OpenJob(spec.table, companion, values)
        self.open([job], require_context())
        out.update({c.name: v for c, v in (job.plain or {}).items()})
        return out


_BYTES_CODEC = _codecs.codec_for(LargeBinary())


@functools.lru_cache(maxsize=4096)
def _field(name: str) -> ColumnSpec:
    return ColumnSpec(name, name, _BYTES_CODEC)


def _tenant_keys(
    tenant: str, refs: str | Sequence[str], providers: Mapping[str, KeyProvider]
) -> TenantKeys:
    ref_list = [refs] if isinstance(refs, str) else list(refs)
    if not isinstance(tenant, str) or not tenant or not ref_list:
        raise ConfigurationError(f"tenant {tenant!r} needs a non-empty id and at least one key")
    for ref in ref_list:
        scheme, sep, rest = ref.partition("://") if isinstance(ref, str) else ("", "", "")
        if not sep or not rest:
            raise ConfigurationError(
                f"key reference {ref!r} of tenant {tenant!r} is not a URI like local://name",
                tenant=tenant,
            )
        if scheme not in providers:
            raise ConfigurationError(
                f"key reference {ref!r} of tenant {tenant!r} needs a provider for scheme "
                f"{scheme!r}; configured: {sorted(providers)}",
                tenant=tenant,
                key_ref=ref,
            )
    return TenantKeys(ref_list[0], frozenset(ref_list))
