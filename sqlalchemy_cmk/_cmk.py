"""The :class:`CMK` object: configuration, row sealing and opening, and the low-level API."""

from __future__ import annotations

import functools
import importlib
import math
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidTag
from sqlalchemy import LargeBinary, Table

from . import _codecs, _format, _lease, _metrics
from ._access import access, emit_ok, note_row_tenant
from ._keys import CachePolicy, DataKey, KeyManager, RetryPolicy
from ._mapping import ColumnSpec, TableSpec, table_spec
from ._metrics import MetricsSink
from .audit import AuditSink, LoggingAuditSink
from .context import TenantContext, current_context, require_context, tenant_context
from .delivery import AuditDelivery
from .errors import (
    CMKError,
    ConfigurationError,
    DecryptionError,
    InvalidValueError,
    KeyAccessDeniedError,
    KeyNotFoundError,
    KMSUnavailableError,
    NoTenantError,
    TenantMismatchError,
)
from .providers import KeyProvider
from .registry import KeyRegistry, RevocableRegistry, StaticKeyRegistry, tenant_id_problem
from .types import EncryptedValue

__all__ = ["CMK", "EncryptedDocument", "TenantCheck", "load_cmk"]


def _weak(target: Any) -> Callable[[], Any]:
    """A weak reference to ``target``, or a strong one if it takes none."""
    try:
        return weakref.ref(target)
    except TypeError:
        return lambda: target


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


class CheckStep(NamedTuple):
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class TenantCheck:
    """What :meth:`CMK.check_tenant` found. ``ok`` is true when every step passed."""

    tenant: str
    key_ref: str | None
    steps: tuple[CheckStep, ...]

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)

    def __str__(self) -> str:
        lines = [f"tenant {self.tenant}: {'OK' if self.ok else 'FAILED'}"]
        lines += [f"  [{'ok' if s.ok else 'FAIL'}] {s.name}: {s.detail}" for s in self.steps]
        return "\n".join(lines)


_DIAGNOSES: tuple[tuple[type[CMKError], str], ...] = (
    (
        KeyAccessDeniedError,
        "the tenant's KMS refused: the key is disabled, scheduled for deletion, or this "
        "application's identity is not granted encrypt/decrypt on it (key policy, IAM role, "
        "access policy); ask the tenant to check the grant described in docs/providers",
    ),
    (
        KeyNotFoundError,
        "the tenant's KMS does not know this key: check the key reference (region, project, "
        "vault, version) the tenant gave",
    ),
    (
        KMSUnavailableError,
        "the tenant's KMS could not be reached or kept failing: check network egress, the "
        "endpoint, credentials and throttling",
    ),
    (
        DecryptionError,
        "the KMS answered but the probe key did not round-trip: wrong key version or "
        "algorithm, or an intercepting proxy",
    ),
)


def _diagnose(exc: CMKError, key_ref: str) -> str:
    # The provider's own words too: only it knows what its KMS can tell apart (Cloud KMS answers
    # a missing key and a missing grant alike). Messages never carry key material.
    said = exc.__cause__ if isinstance(exc.__cause__, CMKError) else None
    tail = f" (the provider said: {said})" if said is not None else ""
    for cls, hint in _DIAGNOSES:
        if isinstance(exc, cls):
            return f"{type(exc).__name__} for {key_ref}: {hint}{tail}"
    return f"{type(exc).__name__} for {key_ref}: {exc}"


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
        retry_attempts: Most attempts at a KMS call that fails transiently (1 = no retry);
            None (default): as many as fit in ``kms_deadline``, with exponential backoff and
            full jitter between them (at most 2 s apart).
        retry_backoff: Base of the exponential backoff between attempts, seconds.
        kms_deadline: Overall seconds allowed for one KMS call with its retries. A call that
            hangs is abandoned at the deadline (``KMSUnavailableError``); its thread is a daemon.
        max_concurrency: Most KMS calls in flight at once for one load; at most four times as
            many provider calls run at once per CMK (hung calls keep their slot until they
            return).
        audit_sinks: Where audit events go; default: JSON lines to the ``sqlalchemy_cmk.audit``
            logger at INFO, which Python's default logging drops (configure logging to see or
            ship them). Pass ``[]`` to disable (not recommended). A sink that raises stops the
            access with :class:`~sqlalchemy_cmk.errors.AuditError`.
        verify_write_keys: Before a new write key encrypts anything, unwrap its EDEK once
            through the provider and check that the same key comes back (default). Costs one
            KMS unwrap per write window; it keeps a provider whose wrap returns an unusable blob
            from writing rows that can never be decrypted. Turn off only for a provider you
            trust to round-trip (the flush then fails at the first load instead).
        search_state_ttl: Seconds a blind index's state (built, rotating...) and a tenant's
            search root-key envelope are cached; the rotation tool waits twice this between
            phases, so keep it the same in every process (``docs/search.md``).
        clock: Monotonic seconds, for the cache's time limits; a seam for tests (default
            ``time.monotonic``). KMS call deadlines always use real time.
        lease_period: None (default): every write window's data key is wrapped by the
            tenant's KMS (stored format version 1). Seconds, at most ``cache_ttl``: a tenant's
            data keys are wrapped locally under a *lease key* that its KMS wraps once per
            lease period (format version 2), so KMS calls grow with tenants x lease periods,
            not with data keys (``docs/key-rotation.md``). Every release from 0.x reads both
            versions: in a rolling deploy, set this only once every process runs one.
        lazy_decrypt: Default of the ``cmk_lazy`` execution option. False (default): every
            loaded value is decrypted before the query returns. True: a query's encrypted
            values are checked (format, tenant) at load and decrypted on first access of each
            column, for every row of the query at once (``docs/performance.md``).
        audit_delivery: Deliver each tenant's events to the tenant's own destinations (its
            SIEM), through a durable spool: an
            :class:`~sqlalchemy_cmk.delivery.AuditDelivery` (``docs/audit.md``). The
            ``audit_sinks`` still get every event.

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
        retry_attempts: int | None = None,
        retry_backoff: float = 0.05,
        kms_deadline: float = 10.0,
        max_concurrency: int = 16,
        audit_sinks: Sequence[AuditSink] | None = None,
        verify_write_keys: bool = True,
        search_state_ttl: float = 5.0,
        clock: Callable[[], float] | None = None,
        lease_period: float | None = None,
        lazy_decrypt: bool = False,
        audit_delivery: AuditDelivery | None = None,
    ) -> None:
        self.lazy_decrypt = lazy_decrypt
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
        # Every lookup passes the revocations first (revoke(), a RevocationWatcher).
        self._revocations = RevocableRegistry(registry)
        # Where revoke() persists and publishes, set by a started RevocationWatcher.
        self._revocation_publisher: Callable[[str, bool], None] | None = None
        self._keys = KeyManager(
            by_scheme,
            self._revocations,
            CachePolicy(cache_ttl, cache_max_entries, write_key_max_age, write_key_max_uses),
            RetryPolicy(retry_attempts, retry_backoff, kms_deadline, max_concurrency),
            # The metrics sink first: a KMS call counts even if a later sink stops the access.
            [
                *([MetricsSink()] if _metrics.available() else []),
                *([LoggingAuditSink()] if audit_sinks is None else audit_sinks),
            ],
            clock=time.monotonic if clock is None else clock,
            verify_write_keys=verify_write_keys,
            lease_period=lease_period,
        )
        if audit_delivery is not None:
            if not isinstance(audit_delivery, AuditDelivery):
                raise ConfigurationError("audit_delivery must be an AuditDelivery")
            self._keys.deliver = audit_delivery.record
        self.audit_delivery = audit_delivery
        # Targets by weak reference: their listeners hold this CMK, so a strong reference
        # back kept both alive for ever (SQLAlchemy keeps a Session class's listeners in a
        # WeakKeyDictionary whose values, through us, held its key). Now the CMK lives as long
        # as something it is installed on, or the caller's own reference.
        self._installed: list[tuple[Callable[[], Any], list[tuple[str, Any]]]] = []
        # Finite: a process caching states for ever never follows a rotation (it searches a
        # slot the others stop writing), and NaN never caches and makes the tools' wait NaN.
        if not (math.isfinite(search_state_ttl) and search_state_ttl >= 0):
            raise ConfigurationError("search_state_ttl must be a finite number of seconds >= 0")
        from ._search import SearchStore

        self._search = SearchStore(
            self, search_state_ttl, time.monotonic if clock is None else clock
        )
        if isinstance(registry, StaticKeyRegistry):
            for tenant in registry.tenants():  # fail at start-up, not at a tenant's first write
                self._keys.tenant_keys(tenant)

    def __repr__(self) -> str:
        return f"<CMK providers={sorted(self._keys._providers)!r}>"

    # -- session integration -------------------------------------------------------------------

    def install(self, target: Any) -> None:
        """Attach the encrypt-on-flush and decrypt-on-load hooks to the user's sessions.

        Every statement executed through an installed session first passes the statement
        guard: a SQL expression as the value of an encrypted column raises
        ``PlaintextWriteError``, a read that cannot work on ciphertext (comparison, ``LIKE``,
        ``ORDER BY``, a function of the column...) raises ``UnsupportedQueryError``, both before
        anything is sent. Install on the ``Engine`` too to guard Core execution on its
        connections (``engine.connect()``); Core cannot encrypt, so there only bound values
        the hooks sealed and NULL can be written. Raw ``text()`` and ``exec_driver_sql`` are
        out of the guard's reach.

        Asyncio: install on an ``async_sessionmaker`` (before it makes the sessions to hook;
        it is given a ``sync_session_class`` subclass of its own to listen on), one
        ``AsyncSession``, or the ``Session`` subclass you pass as ``sync_session_class``; an
        ``AsyncEngine`` gets the statement guard like an ``Engine``. KMS calls made from an
        ``AsyncSession`` are awaited on its event loop, never waited for while blocking it.

        The CMK keeps ``target`` by weak reference and the hooks keep the CMK: it lives as
        long as something it is installed on (or your own reference) and is freed, cached
        keys included, when the last of them is dropped.

        Args:
            target: A ``sessionmaker``, a ``Session`` subclass, one ``Session``, or an
                ``Engine`` or ``Connection`` (the statement guard only); or their asyncio
                counterparts: ``async_sessionmaker``, ``AsyncSession``, ``AsyncEngine``,
                ``AsyncConnection``.

        Raises:
            ConfigurationError: already installed on ``target``.
        """
        from ._session import install

        self._installed = [(ref, ls) for ref, ls in self._installed if ref() is not None]
        if any(ref() is target for ref, _ in self._installed):
            raise ConfigurationError("CMK is already installed on this target")
        self._installed.append((_weak(target), install(self, target)))

    def uninstall(self, target: Any) -> None:
        """Detach the hooks that :meth:`install` attached to ``target``."""
        from ._session import uninstall

        for i, (ref, listeners) in enumerate(self._installed):
            if ref() is target:
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

    def revoke(self, tenant: str) -> None:
        """Refuse a tenant, reads and writes, at once here and within about a second everywhere.

        In this process, from the next wrap or unwrap on: the tenant's lookups raise
        :class:`~sqlalchemy_cmk.errors.TenantRevokedError` and its cached data keys are
        dropped (and zeroed); a KMS call already under way serves its own operation but does not
        cache its key. Then the revocation is made durable and
        published:

        * with a :class:`~sqlalchemy_cmk.registry_db.DatabaseKeyRegistry`, the tenant is
          disabled in it, which every process's
          :class:`~sqlalchemy_cmk.revocation.RevocationWatcher` applies within about a second;
        * with tenants in code and a started ``RevocationWatcher``, it is recorded in the
          watcher's revocations table, which every watcher applies likewise;
        * otherwise in this process only: call ``revoke`` in every process yourself (from
          your own pub/sub), and take the tenant out of the configuration.

        Raises:
            ConfigurationError: ``tenant`` is not a valid tenant id.
            CMKError: the revocation could not be made durable (e.g. a tenant unknown to the
                registry); the tenant stays revoked in this process.
        """
        from .revocation import _publish

        self._check_revocable(tenant)
        self._revocations.revoke(tenant)
        self._keys.forget(tenant)
        _publish(self, tenant, revoked=True)

    def reinstate(self, tenant: str) -> None:
        """Undo :meth:`revoke`: serve the tenant again, here and (published as ``revoke`` is)
        in every process. The tenant's KMS still decides whether its keys unwrap."""
        from .revocation import _publish

        self._check_revocable(tenant)
        _publish(self, tenant, revoked=False)
        self._revocations.reinstate(tenant)

    def _check_revocable(self, tenant: object) -> None:
        problem = tenant_id_problem(tenant)
        if problem is not None:
            raise ConfigurationError(f"cannot revoke tenant {tenant!r}: {problem}")

    def check_tenant(self, tenant: str, *, actor: str = "sqlalchemy-cmk check") -> TenantCheck:
        """Prove a tenant's key works end to end, for onboarding and support.

        Looks the tenant up, then wraps a random probe key under its primary key and unwraps it
        again through the tenant's KMS (each step audited, nothing cached). Never raises for a
        tenant-side problem: the result says what failed and what to do.
        """
        steps: list[CheckStep] = []
        with tenant_context(tenant, actor=actor, data_label="onboarding-check") as ctx:
            try:
                keys = self._keys.tenant_keys(tenant)
            except CMKError as exc:
                steps.append(CheckStep("registry", False, f"{exc}"))
                return TenantCheck(tenant, None, tuple(steps))
            others = sorted(keys.accepted - {keys.primary})
            steps.append(
                CheckStep(
                    "registry",
                    True,
                    f"primary {keys.primary}"
                    + (f"; also accepted: {', '.join(others)}" if others else ""),
                )
            )
            try:
                ms = self._keys.probe(tenant, keys.primary, ctx)
            except CMKError as exc:
                steps.append(CheckStep("wrap+unwrap", False, _diagnose(exc, keys.primary)))
            else:
                steps.append(CheckStep("wrap+unwrap", True, f"probe key round trip in {ms:.0f} ms"))
            # A provider may know set-ups that work today and fail the tenant later (a Vault
            # token that could recreate a deleted key): its check_key() lists them.
            scheme = keys.primary.partition("://")[0]
            check_key = getattr(self._keys._providers.get(scheme), "check_key", None)
            if callable(check_key):
                try:
                    problems = list(check_key(keys.primary))
                except CMKError as exc:
                    problems = [_diagnose(exc, keys.primary)]
                steps.append(
                    CheckStep("key configuration", not problems, "; ".join(problems) or "ok")
                )
        return TenantCheck(tenant, keys.primary, tuple(steps))

    # -- sealing and opening rows (shared by the ORM hooks and the low-level API) -------------

    def _tenant_for_write(self, ctx: TenantContext) -> str:
        if ctx.tenant_id is None:
            raise NoTenantError(
                "cannot write encrypted data in a cross-tenant context: open "
                "tenant_context(tenant_id) for the tenant that owns the new rows"
            )
        return ctx.tenant_id

    def seal(
        self,
        dicts: Sequence[Mapping[str, Any]],
        tables: Sequence[TableSpec],
        columns: Sequence[Sequence[ColumnSpec]],
        companions: Sequence[bytes | None],
        ctx: TenantContext,
        witnesses: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> tuple[list[bytes | None], list[bytes]]:
        """Encrypt rows for the context tenant: one wrap at most per write window.

        Row ``i`` is ``dicts[i]`` (values by attribute key), a row of ``tables[i]``; the values
        of ``columns[i]`` that are not ``None`` are encrypted, under the row's own key if
        ``companions[i]`` is given (an update), else under the tenant's write key.

        ``witnesses[i]``, for an update, holds the row's stored encrypted values (attribute key
        -> stored bytes, as read with the companion). A key the KMS unwrapped for this seal is
        checked against one of them before anything is sealed under it, so that a KMS answering
        with a wrong key fails the flush instead of making the updated values unreadable. A key
        with no witness (none given, or all the row's values NULL) is unwrapped a second time
        and must come back the same: weaker (a KMS that always gives the same wrong key passes)
        and one KMS call dearer, so callers should pass witnesses.

        Returns the new companion of each row (``None`` where the row keeps its own) and the
        ciphertexts, flat, in row and column order. Raises before returning anything if any
        value cannot be sealed. Parallel lists and flat results, because this runs for every
        row of a flush and objects kept alive per row make the garbage collector run more.
        """
        with access(self._keys, ctx, "encrypt") as acc:
            if not acc.tables:  # called on its own, not by a flush that named them
                for t in {id(t): t for t in tables}.values():
                    acc.table(t.table, t.column_names)
            acc.fixed = True
            return self._seal(dicts, tables, columns, companions, ctx, witnesses)

    def _seal(
        self,
        dicts: Sequence[Mapping[str, Any]],
        tables: Sequence[TableSpec],
        columns: Sequence[Sequence[ColumnSpec]],
        companions: Sequence[bytes | None],
        ctx: TenantContext,
        witnesses: Sequence[Mapping[str, Any] | None] | None,
    ) -> tuple[list[bytes | None], list[bytes]]:
        tenant = self._tenant_for_write(ctx)
        split = 1 + _format.ROW_ID_SIZE
        old = {comp[split:] for comp in companions if comp is not None}
        keys: dict[bytes, DataKey] = {}
        if old:
            for comp in companions:
                if comp is not None:
                    _format.split_companion(comp)
            self._check_tenants(old, ctx, tables[0].table)
            fresh: list[DataKey] = []
            keys = self._keys.read_keys(old, ctx, fresh=fresh)
            if fresh:
                try:
                    proven = self._prove(fresh, tables, companions, witnesses, tenant, ctx)
                except BaseException:
                    for key in fresh:
                        key.wipe()
                    raise
                self._keys.remember(proven)
        # Count the values; new rows share the tenant's write key, and a batch larger than one
        # key may serve is split over as many keys as needed (one wrap each).
        max_uses = self._keys.max_uses
        write_keys: list[DataKey] = []
        uses: list[int] = []
        chunk = n_values = n_new = 0
        for d, cols, comp in zip(dicts, columns, companions, strict=True):
            k = 0
            for c in cols:
                if d.get(c.key) is not None:
                    k += 1
            uses.append(k)
            n_values += k
            if comp is None:
                n_new += 1
                if chunk and chunk + k > max_uses:
                    write_keys.append(self._keys.write_key(tenant, chunk, ctx))
                    chunk = 0
                chunk += k
        if chunk or n_new:
            write_keys.append(self._keys.write_key(tenant, chunk, ctx))
        heads = [_format.companion_version(k.envelope) for k in write_keys]
        rng = self._keys.rng
        nonces = rng(_format.NONCE_SIZE * n_values)
        row_ids = rng(_format.ROW_ID_SIZE * n_new)
        version = _format.VERSION_BYTE
        str_codec = _codecs.STR
        plans: dict[TableSpec, dict[ColumnSpec, tuple[bytes, bytes]]] = {}
        counts: dict[TableSpec, int] = defaultdict(int)
        used: set[ColumnSpec] = set()
        new_companions: list[bytes | None] = []
        cts: list[bytes] = []
        n = r_i = k_i = key_uses = 0
        for d, t, cols, comp, k in zip(dicts, tables, columns, companions, uses, strict=True):
            plan = plans.get(t)
            if plan is None:
                plan = plans[t] = {
                    c: (bytes([c.codec.tag]), _aad_prefix(tenant, t.table, c.name))
                    for c in t.columns
                }
            if comp is None:
                key = write_keys[k_i]
                if key_uses and key_uses + k > max_uses:
                    k_i += 1
                    key, key_uses = write_keys[k_i], 0
                key_uses += k
                row_id = row_ids[r_i : r_i + _format.ROW_ID_SIZE]
                r_i += _format.ROW_ID_SIZE
                new_companions.append(heads[k_i] + row_id + key.envelope)
            else:
                row_id = comp[1:split]
                key = keys[comp[split:]]
                new_companions.append(None)
            encrypt = key.aead.encrypt
            for c in cols:
                v = d.get(c.key)
                if v is None:
                    continue
                tag, prefix = plan[c]
                used.add(c)
                if type(v) is str and c.codec is str_codec:
                    if c.max_length is not None and len(v) > c.max_length:
                        _check_length(len(v), c.max_length, t.table, c.name)
                    try:
                        pt = tag + v.encode()
                    except UnicodeEncodeError:  # a lone surrogate: refused just below, outside
                        pt = b""  # the handler, so no exception holding the value is chained
                    if not pt:
                        pt = _codecs.encode(c.codec, v, table=t.table, column=c.name)
                else:
                    pt = _codecs.encode(c.codec, v, table=t.table, column=c.name)
                    if c.max_length is not None and isinstance(v, str):
                        # str.__len__: a str subclass may not override what is checked.
                        _check_length(str.__len__(v), c.max_length, t.table, c.name)
                nonce = nonces[n : n + _format.NONCE_SIZE]
                n += _format.NONCE_SIZE
                cts.append(version + nonce + encrypt(nonce, pt, prefix + row_id))
            counts[t] += 1
        for t, count in counts.items():
            names = tuple(sorted(c.name for c in t.columns if c in used))
            emit_ok(self._keys, ctx, "encrypt", tenant, table=t.table, columns=names, rows=count)
        return new_companions, cts

    def _prove(
        self,
        fresh: list[DataKey],
        tables: Sequence[TableSpec],
        companions: Sequence[bytes | None],
        witnesses: Sequence[Mapping[str, Any] | None] | None,
        tenant: str,
        ctx: TenantContext,
    ) -> list[DataKey]:
        """Check each freshly unwrapped key against a stored value of a row it serves, else by
        a second unwrap; return the keys proven. Raises DecryptionError for a wrong key."""
        # A fresh lease key is proven by the data keys it opened (remember() caches it with
        # them), never confirmed on its own.
        todo = {k.envelope: k for k in fresh if not _lease.is_lease(k)}
        proven: list[DataKey] = []
        split = 1 + _format.ROW_ID_SIZE
        for t, comp, witness in zip(
            tables, companions, witnesses or [None] * len(companions), strict=True
        ):
            if comp is None or not witness or comp[split:] not in todo:
                continue
            for c in t.columns:
                stored = witness.get(c.key)
                if not isinstance(stored, (bytes, bytearray, memoryview)):
                    continue  # NULL, or plaintext of a column being encrypted in place
                value = bytes(stored)
                key = todo.pop(comp[split:])
                aad = _aad_prefix(tenant, t.table, c.name) + comp[1:split]
                try:
                    _format.open_(key.aead, aad, value)
                except DecryptionError:
                    self._keys.discard(key.envelope)
                    raise DecryptionError(
                        "the KMS unwrapped a key that does not open the row's stored values; "
                        "nothing was written",
                        tenant=tenant,
                        key_ref=key.key_ref,
                        provider=key.provider,
                        table=t.table,
                    ) from None
                proven.append(key)
                break
            if not todo:
                break
        for key in todo.values():
            self._keys.confirm(key, ctx)
            proven.append(key)
        # Every data key is proven (else this raised), and so the leases that opened them.
        proven += [k for k in fresh if _lease.is_lease(k)]
        return proven

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
        started = time.monotonic()
        with access(self._keys, ctx, "decrypt") as acc:
            if not acc.tables:  # called on its own, not by a load that named them
                for t in {id(t): t for t in tables}.values():
                    acc.table(t.table, t.column_names)
            acc.fixed = True
            checked = self._check_open(dicts, tables, ctx)
            if checked is None:
                return
            ctx, tenant_of, needed = checked
            self._open_checked(dicts, tables, ctx, started, tenant_of, needed)

    def _open_checked(
        self,
        dicts: Sequence[dict[str, Any]],
        tables: Sequence[TableSpec],
        ctx: TenantContext,
        started: float,
        tenant_of: dict[bytes, str],
        needed: dict[bytes, None],
    ) -> None:
        """:meth:`open` once :meth:`_check_open` has passed: keys looked up, values opened."""
        # Keys unwrapped now are cached only once this load has proven them (every value
        # authenticated): a KMS that answered with a wrong key must not poison the cache.
        fresh: list[DataKey] = []
        keys = self._keys.read_keys(needed, ctx, fresh=fresh) if needed else {}
        try:
            self._open(dicts, tables, ctx, started, tenant_of, keys)
        except BaseException:
            for key in fresh:
                key.wipe()
            raise
        if fresh:
            self._keys.remember(fresh)

    def _check_open(
        self,
        dicts: Sequence[dict[str, Any]],
        tables: Sequence[TableSpec],
        ctx: TenantContext | None,
    ) -> tuple[TenantContext, dict[bytes, str], dict[bytes, None]] | None:
        """Everything :meth:`open` checks before it unwraps a key: companions well formed and
        of a known version, a tenant in context, every row's key bound to it.

        Returns:
            None if there is nothing to decrypt; else the context, the tenant of each
            envelope, and the envelopes of rows holding a value to decrypt.
        """
        split = 1 + _format.ROW_ID_SIZE
        min_companion = split + 8
        envelopes: dict[bytes, None] = {}
        # Envelopes of rows that hold a value to decrypt: only their keys are unwrapped. A key
        # that would decrypt nothing (values deferred or NULL) could not be proven, and an
        # unproven key must never reach the cache, where an update would seal under it.
        needed: dict[bytes, None] = {}
        last_needed = False
        last = b"\x00"  # never an envelope (too short), so the first row always misses
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
            if (
                type(companion) is not bytes
                or len(companion) < min_companion
                # the version byte matches the envelope's kind (version 2: leased, 0x0000)
                or companion[0] != (2 if companion[split] == 0 == companion[split + 1] else 1)
            ):
                raise DecryptionError(
                    "stored companion value is malformed or of an unknown version"
                )
            # Rows of one write window share an envelope and usually come in a run: compare in
            # place rather than slice and hash the envelope of every row.
            if not (len(companion) - split == len(last) and companion.endswith(last)):
                last = companion[split:]
                envelopes[last] = None
                last_needed = last in needed
            if not last_needed and any(type(d.get(c.key)) is EncryptedValue for c in t.columns):
                needed[last] = None
                last_needed = True
        if not envelopes:
            return None
        if ctx is None:
            names = sorted({t.table for t in tables})
            raise NoTenantError(
                f"encrypted rows of {', '.join(names)} loaded with no tenant in context: wrap "
                "the work in `with tenant_context(tenant_id, ...)`",
                table=names[0],
            )
        tenant_of = self._check_tenants(envelopes, ctx, tables[0].table)
        return ctx, tenant_of, needed

    def _open(
        self,
        dicts: Sequence[dict[str, Any]],
        tables: Sequence[TableSpec],
        ctx: TenantContext,
        started: float,
        tenant_of: dict[bytes, str],
        keys: dict[bytes, DataKey],
    ) -> None:
        split = 1 + _format.ROW_ID_SIZE
        # envelope -> table -> ([(column, AAD prefix)], decrypt, [rows decrypted])
        plans: dict[bytes, dict[TableSpec, list[Any]]] = {}
        enc_value = EncryptedValue
        min_value = _format.MIN_VALUE
        last, last_t, plan = b"\x00", None, None
        for d, t in zip(dicts, tables, strict=True):
            companion = d.get(t.companion_key)
            if companion is None:
                continue
            if (
                plan is None
                or t is not last_t
                or len(companion) - split != len(last)
                or not companion.endswith(last)
            ):
                env = last = companion[split:]
                last_t = t
                by_table = plans.get(env)
                if by_table is None:
                    by_table = plans[env] = {}
                plan = by_table.get(t)
                if plan is None:
                    tenant = tenant_of[env]
                    cols = [(c, _aad_prefix(tenant, t.table, c.name)) for c in t.columns]
                    key = keys.get(env)  # None: no row of this envelope has a value
                    plan = by_table[t] = [cols, key.aead.decrypt if key else None, 0]
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
                    self._keys.discard(last)  # perhaps a wrong key: never serve it again
                    note_row_tenant(self._keys, tenant_of[last])
                    raise DecryptionError(_format.AUTH_FAILED, table=t.table) from None
                codec = c.codec
                try:
                    if pt[0] != codec.tag:
                        raise ValueError
                    d[c.key] = codec.decode(pt[1:])
                    continue
                except (ValueError, TypeError, ArithmeticError, RecursionError):
                    pass
                # Outside the handler: its exception may hold the plaintext (JSONDecodeError
                # keeps the document), and must not become the __context__ of ours.
                d[c.key] = _codecs.decode(codec, pt, table=t.table, column=c.name)
        ms = (time.monotonic() - started) * 1000
        per_tenant: dict[tuple[str, str], list[Any]] = {}
        for env, by_table in plans.items():
            for t, plan in by_table.items():
                entry = per_tenant.setdefault((tenant_of[env], t.table), [0, t.column_names])
                entry[0] += plan[2]
        for (tenant, table), (count, names) in per_tenant.items():
            emit_ok(
                self._keys,
                ctx,
                "decrypt",
                tenant,
                table=table,
                rows=count,
                columns=names,
                duration_ms=ms,
            )

    def _check_tenants(
        self, envelopes: Iterable[bytes], ctx: TenantContext, table: str
    ) -> dict[bytes, str]:
        tenant_of = {e: _format.parse_envelope(e).tenant for e in envelopes}
        if not ctx.cross_tenant:
            for tenant in set(tenant_of.values()):
                if tenant != ctx.tenant_id:
                    # The access scope (``_access``) audits the refusal for the context's
                    # tenant. The message may reach an end user: it names no tenant but the
                    # context's own; the row's tenant is in ``row_tenant``, for logs and
                    # operators.
                    raise TenantMismatchError(
                        f"a row of {table!r} belongs to another tenant than the context tenant "
                        f"{ctx.tenant_id!r}: filter the query by tenant (or use "
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
        _check_namespace(namespace)
        with access(self._keys, current_context(), "encrypt") as acc:
            acc.table(namespace)
            return self._encrypt_documents(documents, namespace, require_context())

    def _encrypt_documents(
        self, documents: Sequence[Mapping[str, bytes]], namespace: str, ctx: TenantContext
    ) -> list[EncryptedDocument]:
        if isinstance(documents, Mapping) or not isinstance(documents, Sequence):
            raise InvalidValueError(
                "encrypt_documents() takes a list of documents (field name -> bytes); for one "
                "document use encrypt_document()",
                table=namespace,
            )
        plain: list[dict[str, bytes]] = [_doc_fields(doc, namespace, "bytes") for doc in documents]
        specs = [_doc_spec(namespace, tuple(sorted(doc))) for doc in plain]
        companions, cts = self.seal(
            plain, specs, [t.columns for t in specs], [None] * len(specs), ctx
        )
        out, n = [], 0
        for spec, companion in zip(specs, companions, strict=True):
            k = len(spec.columns)
            fields = dict(zip(spec.column_names, cts[n : n + k], strict=True))
            out.append(EncryptedDocument(companion or b"", fields))
            n += k
        return out

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
        _check_namespace(namespace)
        with access(self._keys, current_context(), "decrypt") as acc:
            acc.table(namespace)
            return self._decrypt_documents(documents, namespace, require_context())

    def _decrypt_documents(
        self, documents: Sequence[EncryptedDocument], namespace: str, ctx: TenantContext
    ) -> list[dict[str, bytes]]:
        if isinstance(documents, EncryptedDocument) or not isinstance(documents, Sequence):
            raise InvalidValueError(
                "decrypt_documents() takes a list of EncryptedDocument; for one use "
                "decrypt_document()",
                table=namespace,
            )
        rows = []
        for doc in documents:
            if not isinstance(doc, EncryptedDocument):
                raise InvalidValueError(
                    f"decrypt_documents() takes EncryptedDocument items, not {type(doc).__name__}",
                    table=namespace,
                )
            fields = _doc_fields(doc.fields, namespace, "encrypted bytes")
            edek = _as_bytes(doc.edek)
            if edek is None:
                raise InvalidValueError(
                    f"an EncryptedDocument's edek must be bytes, not {type(doc.edek).__name__}",
                    table=namespace,
                )
            spec = _doc_spec(namespace, tuple(sorted(fields)))
            d: dict[str, Any] = {k: EncryptedValue(v) for k, v in fields.items()}
            d[spec.companion_key] = edek
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
            with access(self._keys, current_context(), "decrypt") as acc:
                acc.table(spec.table, spec.column_names)
                self.open([out], [spec], require_context())
        return out


def _check_length(length: int, max_length: int, table: str, column: str) -> None:
    if length > max_length:
        raise InvalidValueError(
            f"{table}.{column} holds at most {max_length} characters, got {length}",
            table=table,
            column=column,
        )


_BYTES_CODEC = _codecs.codec_for(LargeBinary())
_DOC_EDEK_KEY = "\x00edek"  # cannot clash with a field name a caller would choose


def _as_bytes(value: object) -> bytes | None:
    """Bytes-like (bytes, bytearray, memoryview) as bytes; anything else as None."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, memoryview):
        try:
            return value.tobytes()
        except (TypeError, ValueError):
            return None
    return None


def _check_namespace(namespace: object) -> None:
    if not isinstance(namespace, str) or not namespace:
        raise InvalidValueError("namespace must be a non-empty str")


def _doc_fields(doc: object, namespace: str, what: str) -> dict[str, bytes]:
    """A document's fields as a plain dict of str -> bytes, or InvalidValueError.

    Field names are checked before anything is sorted or encrypted; values are never named
    in the error, only their type.
    """
    if not isinstance(doc, Mapping):
        raise InvalidValueError(
            f"a document must be a mapping of field name -> {what}, not {type(doc).__name__}",
            table=namespace,
        )
    out: dict[str, bytes] = {}
    for name, value in doc.items():
        if type(name) is not str or not name or name == _DOC_EDEK_KEY:
            raise InvalidValueError(
                f"document field names must be non-empty str, not {type(name).__name__}",
                table=namespace,
            )
        data = _as_bytes(value)
        if data is None:
            raise InvalidValueError(
                f"document field {name!r} must be {what}, not {type(value).__name__}",
                table=namespace,
                column=name,
            )
        out[name] = data
    return out


@functools.lru_cache(maxsize=1024)
def _doc_spec(namespace: str, fields: tuple[str, ...]) -> TableSpec:
    return TableSpec(
        namespace, _DOC_EDEK_KEY, "edek", tuple(ColumnSpec(f, f, _BYTES_CODEC) for f in fields)
    )


def load_cmk(spec: CMK | str) -> CMK:
    """A CMK given as itself or as ``"module:attribute"`` (an attribute that is a CMK, or a
    function of no arguments returning one), as the CLI and the Alembic operations take it.

    Whatever the module or the function does wrong (raises on import, calls ``sys.exit()``,
    needs arguments, returns something else) ends as one :class:`ConfigurationError`, so a
    caller such as the CLI can report it in a line and stop before touching anything.

    Raises:
        ConfigurationError: the string does not name an importable CMK; says what to write.
    """
    import inspect  # local: only this loader needs it

    def why(exc: BaseException) -> str:
        # SystemExit is no error to the module that raised it, but it must not end a caller
        # (the CLI) with status 0 having done nothing. Only the first line of a message: a
        # failing import of the user's code should read as one line, not a page.
        if isinstance(exc, SystemExit):
            return f"called sys.exit({exc.code!r})"
        lines = str(exc).strip().splitlines()
        first = lines[0][:200] if lines else ""
        return f"{type(exc).__name__}: {first}" if first else type(exc).__name__

    if isinstance(spec, CMK):
        return spec
    if not isinstance(spec, str):
        raise ConfigurationError(
            f"cmk must be a CMK or a 'module:attribute' string, not {type(spec).__name__}"
        )
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(
            f"cmk takes 'module:attribute', e.g. 'myapp.crypto:cmk'; got {spec!r}"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r} for {spec!r}: {exc}") from None
    except (Exception, SystemExit) as exc:  # the module's own code failed while importing
        raise ConfigurationError(
            f"importing {module_name!r} for {spec!r} failed: {why(exc)}"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(f"{module_name!r} has no attribute {attr!r}") from None
    if isinstance(obj, type):  # a class is never called: it would not build a configured CMK
        raise ConfigurationError(
            f"{spec!r} is the class {obj.__name__}, not a CMK: name a CMK object, or a function "
            "of no arguments that returns one"
        )
    if not isinstance(obj, CMK) and callable(obj):
        try:
            inspect.signature(obj).bind()
        except TypeError:
            raise ConfigurationError(
                f"{spec!r} is a function that needs arguments: name a CMK object, or a "
                "function of no arguments that returns one"
            ) from None
        except ValueError:  # no signature to inspect (some builtins): calling will tell
            pass
        try:
            obj = obj()  # a factory that builds the CMK
        except (Exception, SystemExit) as exc:
            raise ConfigurationError(f"calling {spec!r} failed: {why(exc)}") from exc
        if not isinstance(obj, CMK):
            raise ConfigurationError(f"{spec!r} returned a {type(obj).__name__}, not a CMK")
    if not isinstance(obj, CMK):
        raise ConfigurationError(f"{spec!r} is a {type(obj).__name__}, not a CMK")
    return obj
