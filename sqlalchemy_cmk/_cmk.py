"""The :class:`CMK` object: configuration, row sealing and opening, and the low-level API."""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidTag
from sqlalchemy import LargeBinary, Table

from . import _codecs, _format
from ._keys import CachePolicy, DataKey, KeyManager, RetryPolicy
from ._mapping import ColumnSpec, TableSpec, table_spec
from .audit import AuditSink, LoggingAuditSink
from .context import TenantContext, require_context
from .errors import (
    ConfigurationError,
    DecryptionError,
    InvalidValueError,
    NoTenantError,
    TenantMismatchError,
)
from .providers import KeyProvider
from .registry import KeyRegistry, StaticKeyRegistry
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


class SealRow(NamedTuple):
    """One table row to encrypt: the values of ``columns`` in ``values`` (a dict by key)."""

    values: Mapping[str, Any]
    table: TableSpec
    columns: Sequence[ColumnSpec]
    companion: bytes | None  # the row's companion if it has one (an update), else None


class CMK:
    """Per-tenant envelope encryption for a SQLAlchemy application.

    Args:
        provider: The key provider, when there is one (shorthand for ``providers=[provider]``).
        providers: Providers, one per URI scheme; a tenant's key reference picks one.
        tenant_keys: Tenant id -> key reference, or a sequence of them whose first is the
            primary (encrypts new data) and the rest are still accepted for reading.
        registry: Instead of ``tenant_keys``, a :class:`~sqlalchemy_cmk.registry.KeyRegistry`
            (e.g. the database-backed one), consulted on every wrap and unwrap.
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
        tenant_keys: Mapping[str, str | Sequence[str]] | None = None,
        registry: KeyRegistry | None = None,
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
        if (tenant_keys is None) == (registry is None):
            raise ConfigurationError("give CMK exactly one of tenant_keys= or registry=")
        if registry is None:
            assert tenant_keys is not None
            registry = StaticKeyRegistry(tenant_keys)
        self._keys = KeyManager(
            by_scheme,
            registry,
            CachePolicy(cache_ttl, cache_max_entries, write_key_max_age, write_key_max_uses),
            RetryPolicy(retry_attempts, retry_backoff, kms_deadline, max_concurrency),
            [LoggingAuditSink()] if audit_sinks is None else audit_sinks,
        )
        self._installed: list[tuple[Any, list[tuple[str, Any]]]] = []
        if isinstance(registry, StaticKeyRegistry):
            for tenant in registry.tenants():  # fail at start-up, not at a tenant's first write
                self._keys.tenant_keys(tenant)

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

    def seal(
        self, rows: Sequence[SealRow], ctx: TenantContext
    ) -> list[tuple[bytes | None, list[bytes]]]:
        """Encrypt rows for the context tenant: one wrap at most per write window.

        Returns, per row, the new companion (``None`` if the row keeps its own) and the
        ciphertexts of its ``columns`` in order. Raises before returning anything if any row
        cannot be sealed.
        """
        if not rows:
            return []
        tenant = self._tenant_for_write(ctx)
        old = {r.companion[1 + _format.ROW_ID_SIZE :] for r in rows if r.companion is not None}
        keys: dict[bytes, DataKey] = {}
        if old:
            for r in rows:
                if r.companion is not None:
                    _format.split_companion(r.companion)
            self._check_tenants(old, ctx, rows[0].table.table, "encrypt")
            keys = self._keys.read_keys(old, ctx)
        # New rows take the tenant's write key; a batch larger than one key may serve is split
        # over as many keys as needed (one wrap each).
        write_keys: list[DataKey] = []
        chunk = 0
        for r in rows:
            if r.companion is None:
                if chunk and chunk + len(r.columns) > self._keys.max_uses:
                    write_keys.append(self._keys.write_key(tenant, chunk, ctx))
                    chunk = 0
                chunk += len(r.columns)
        if chunk:
            write_keys.append(self._keys.write_key(tenant, chunk, ctx))
        n_values = sum(len(r.columns) for r in rows)
        n_new = sum(1 for r in rows if r.companion is None)
        rng = self._keys.rng
        nonces = rng(_format.NONCE_SIZE * n_values)
        row_ids = rng(_format.ROW_ID_SIZE * n_new)
        version = _format.VERSION_BYTE
        n = r_i = k_i = key_uses = 0
        out: list[tuple[bytes | None, list[bytes]]] = []
        counts: dict[str, int] = defaultdict(int)
        cols: dict[str, set[str]] = defaultdict(set)
        for row in rows:
            t = row.table
            if row.companion is None:
                key = write_keys[k_i]
                if key_uses and key_uses + len(row.columns) > self._keys.max_uses:
                    k_i += 1
                    key, key_uses = write_keys[k_i], 0
                key_uses += len(row.columns)
                row_id = row_ids[r_i : r_i + _format.ROW_ID_SIZE]
                r_i += _format.ROW_ID_SIZE
                companion: bytes | None = version + row_id + key.envelope
            else:
                row_id = row.companion[1 : 1 + _format.ROW_ID_SIZE]
                key = keys[row.companion[1 + _format.ROW_ID_SIZE :]]
                companion = None
            encrypt = key.aead.encrypt
            values = row.values
            cts = []
            for c in row.columns:
                value = values[c.key]
                if c.max_length is not None and len(value) > c.max_length:
                    raise InvalidValueError(
                        f"{t.table}.{c.name} holds at most {c.max_length} characters, "
                        f"got {len(value)}",
                        table=t.table,
                        column=c.name,
                    )
                pt = _codecs.encode(c.codec, value, table=t.table, column=c.name)
                nonce = nonces[n : n + _format.NONCE_SIZE]
                n += _format.NONCE_SIZE
                aad = _aad_prefix(tenant, t.table, c.name) + row_id
                cts.append(version + nonce + encrypt(nonce, pt, aad))
            out.append((companion, cts))
            counts[t.table] += 1
            cols[t.table].update(c.name for c in row.columns)
        for table, count in counts.items():
            self._keys.emit(
                ctx,
                "encrypt",
                "ok",
                tenant,
                table=table,
                columns=tuple(sorted(cols[table])),
                rows=count,
            )
        return out

    def open(
        self,
        dicts: Sequence[dict[str, Any]],
        tables: Sequence[TableSpec],
        ctx: TenantContext | None,
    ) -> None:
        """Decrypt, in place, the ``EncryptedValue`` items of each row dict (``dicts[i]`` is a
        row of ``tables[i]``).

        Tenants are checked first: nothing is unwrapped for a row of another tenant. Distinct
        data keys are unwrapped once each, concurrently. On error, some rows may already be
        decrypted; callers discard or expire them.

        This is the hot path of every load: parallel lists instead of tuples, no per-value
        function calls but the cipher's, so that few objects the garbage collector tracks are
        allocated per row.
        """
        split = 1 + _format.ROW_ID_SIZE
        min_companion = split + 8
        envelopes: dict[bytes, None] = {}
        for d, t in zip(dicts, tables, strict=True):
            companion = d.get(t.companion_key)
            if companion is None:
                if any(type(d.get(c.key)) is EncryptedValue for c in t.columns):
                    raise DecryptionError(
                        f"a row of {t.table!r} holds encrypted values but its EDEK column is "
                        "NULL or was not loaded (do not defer the EDEK column)",
                        table=t.table,
                    )
                continue
            if type(companion) is not bytes or len(companion) < min_companion or companion[0] != 1:
                raise DecryptionError(
                    "stored companion value is malformed or of an unknown version"
                )
            envelopes[companion[split:]] = None
        if not envelopes:
            return
        if ctx is None:
            names = sorted({t.table for t in tables})
            raise NoTenantError(
                f"encrypted rows of {', '.join(names)} loaded with no tenant in context: wrap "
                "the work in `with tenant_context(tenant_id, ...)`",
                table=names[0],
            )
        started = time.monotonic()
        tenant_of = self._check_tenants(envelopes, ctx, tables[0].table, "decrypt")
        keys = self._keys.read_keys(envelopes, ctx)
        # envelope -> table -> ([(column, AAD prefix)], decrypt, [rows decrypted])
        plans: dict[bytes, dict[TableSpec, list[Any]]] = {}
        enc_value = EncryptedValue
        min_value = _format.MIN_VALUE
        for d, t in zip(dicts, tables, strict=True):
            companion = d.get(t.companion_key)
            if companion is None:
                continue
            env = companion[split:]
            by_table = plans.get(env)
            if by_table is None:
                by_table = plans[env] = {}
            plan = by_table.get(t)
            if plan is None:
                tenant = tenant_of[env]
                cols = [(c, _aad_prefix(tenant, t.table, c.name)) for c in t.columns]
                plan = by_table[t] = [cols, keys[env].aead.decrypt, 0]
            plan[2] += 1
            row_id = companion[1:split]
            decrypt = plan[1]
            for c, prefix in plan[0]:
                v = d.get(c.key)
                if type(v) is not enc_value:
                    continue
                if len(v) < min_value or v[0] != 1:
                    raise DecryptionError("stored value is malformed or of an unknown version")
                try:
                    pt = decrypt(v[1:13], v[13:], prefix + row_id)
                except InvalidTag:
                    raise DecryptionError(_format.AUTH_FAILED, table=t.table) from None
                codec = c.codec
                try:
                    if pt[0] != codec.tag:
                        raise ValueError
                    d[c.key] = codec.decode(pt[1:])
                except (ValueError, TypeError, ArithmeticError):
                    d[c.key] = _codecs.decode(codec, pt, table=t.table, column=c.name)
        ms = (time.monotonic() - started) * 1000
        per_tenant: dict[tuple[str, str], list[Any]] = {}
        for env, by_table in plans.items():
            for t, plan in by_table.items():
                entry = per_tenant.setdefault((tenant_of[env], t.table), [0, t.column_names])
                entry[0] += plan[2]
        for (tenant, table), (count, names) in per_tenant.items():
            self._keys.emit(
                ctx,
                "decrypt",
                "ok",
                tenant,
                table=table,
                rows=count,
                columns=names,
                duration_ms=ms,
            )

    def _check_tenants(
        self, envelopes: Iterable[bytes], ctx: TenantContext, table: str, operation: str
    ) -> dict[bytes, str]:
        tenant_of = {e: _format.parse_envelope(e).tenant for e in envelopes}
        if not ctx.cross_tenant:
            for tenant in set(tenant_of.values()):
                if tenant != ctx.tenant_id:
                    self._keys.emit(
                        ctx,
                        operation,
                        "mismatch",
                        tenant,
                        table=table,
                        error="TenantMismatchError",
                    )
                    raise TenantMismatchError(
                        f"a row of {table!r} belongs to tenant {tenant!r} but the context "
                        f"tenant is {ctx.tenant_id!r}: filter the query by tenant (or use "
                        "cross_tenant_context() for deliberate multi-tenant reads)",
                        row_tenant=tenant,
                        tenant=ctx.tenant_id,
                        table=table,
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
            InvalidValueError: a field value is not bytes.
        """
        ctx = require_context()
        rows = []
        for doc in documents:
            spec = _doc_spec(namespace, tuple(sorted(doc)))
            rows.append(SealRow(doc, spec, spec.columns, None))
        sealed = self.seal(rows, ctx)
        return [
            EncryptedDocument(companion or b"", dict(zip(row.table.column_names, cts, strict=True)))
            for row, (companion, cts) in zip(rows, sealed, strict=True)
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
            NoTenantError: no tenant in context.
            TenantMismatchError: a document belongs to another tenant.
            DecryptionError: an EDEK or field was altered, truncated or moved.
        """
        ctx = require_context()
        rows = []
        for doc in documents:
            spec = _doc_spec(namespace, tuple(sorted(doc.fields)))
            d: dict[str, Any] = {k: EncryptedValue(v) for k, v in doc.fields.items()}
            d[spec.companion_key] = doc.edek
            rows.append((d, spec))
        self.open([d for d, _ in rows], [spec for _, spec in rows], ctx)
        return [{c.name: d[c.key] for c in spec.columns} for d, spec in rows]

    def decrypt_document(
        self, document: EncryptedDocument, *, namespace: str = "document"
    ) -> dict[str, bytes]:
        """Decrypt one document; see :meth:`decrypt_documents`."""
        return self.decrypt_documents([document], namespace=namespace)[0]

    def decrypt_row(self, table: Table, row: Mapping[str, Any]) -> dict[str, Any]:
        """Decrypt the encrypted columns of a row read through Core, in the tenant's context.

        Args:
            table: The ``Table`` the row comes from.
            row: The row as a mapping by column name (``row._mapping``); it must include the
                companion EDEK column.

        Returns:
            A copy of ``row`` with each encrypted column decrypted.
        """
        out = dict(row)
        spec = table_spec(table)
        if spec is not None:
            self.open([out], [spec], require_context())
        return out


_BYTES_CODEC = _codecs.codec_for(LargeBinary())
_DOC_EDEK_KEY = "\x00edek"  # cannot clash with a field name a caller would choose


@functools.lru_cache(maxsize=1024)
def _doc_spec(namespace: str, fields: tuple[str, ...]) -> TableSpec:
    return TableSpec(
        namespace, _DOC_EDEK_KEY, "edek", tuple(ColumnSpec(f, f, _BYTES_CODEC) for f in fields)
    )
