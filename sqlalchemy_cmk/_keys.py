"""Data keys: creation, wrapping, unwrapping, and the bounded cache in between.

Two caches, both bounded in time by ``cache_ttl`` so that a revocation takes effect within it:

* the *write key* of each tenant, reused for at most ``write_key_max_uses`` value encryptions
  and ``write_key_max_age`` seconds, so that one flush of many rows costs one wrap. With random
  96-bit nonces, NIST SP 800-38D allows 2**32 encryptions per key; the default of 2**20 leaves the
  collision probability below 2**-57.
* the *read cache*: unwrapped data keys by envelope, at most ``cache_max_entries``, in a
  segmented LRU with a tenant index (see ``_cache`` for the capacity rule): a load of more keys
  than that keeps the keys other loads use again, and ``forget(tenant)`` costs O(its keys).

Lookups cost O(1) per key and hold the lock for one chunk of keys at a time (``_CHUNK``), so a
cached lookup in another thread never waits for the whole of a large load; a forked child gets
fresh locks and KMS slots (``_after_fork_in_child``).

What Python can wipe: the data key is kept in a ``bytearray`` that is overwritten with zeros on
eviction. What it cannot: the ``bytes`` the provider returned (immutable; dropped at once but
left to the allocator), and the copy inside the ``AESGCM`` object (held by the cryptography
library's Rust code, freed when the object is collected). The cache bounds how long a key is
*used*; it does not promise the memory is scrubbed.

Memory is bounded whatever the number of tenants: at most ``cache_max_entries`` read keys and as
many write keys are held, and expired ones are pruned (and zeroed) by a sweep that runs at most
every quarter of ``cache_ttl``, on the next call after that.

``forget(tenant)`` is final: a key that a KMS call fetched for the tenant while the forget ran is
used for the operation that asked for it, at most, and never cached. Every forget bumps a
generation counter and records it as the forgotten tenants' generation; each fetch notes the
counter *before* it looks the tenant up in the registry (so a revocation that the lookup missed
is a forget the fetch started under), and its key is cached only if no forget of its tenant
came since. Without this, an unwrap under way during ``forget_tenant()`` put its key back
afterwards, served for ``cache_ttl``.

Every provider call runs on a daemon thread, at most ``4 * max_concurrency`` at once per key
manager (room for several concurrent loads, each ``max_concurrency`` wide), so that a call
that hangs is abandoned at ``kms_deadline`` (a :class:`KMSUnavailableError`) instead of holding a
flush forever; a thread stuck in a provider keeps its slot until the provider returns.

A new write key is checked before it seals anything (``verify_write_keys``): its envelope is
unwrapped once through the provider and must give back the same key, so a provider whose wrap
returns an unusable blob fails the flush instead of writing rows that never decrypt again.
"""

from __future__ import annotations

import contextvars
import hmac
import math
import os
import random
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import _aio, _format, _lease, _metrics
from ._cache import SegmentedCache
from .audit import AuditEvent, AuditSink, make_event
from .context import TenantContext
from .errors import (
    AuditError,
    CMKError,
    ConfigurationError,
    DecryptionError,
    KeyAccessDeniedError,
    KeyAccessError,
    KeyNotFoundError,
    KMSUnavailableError,
    TenantNotConfiguredError,
)
from .providers import KeyProvider
from .providers import _deadline as _provider_deadline
from .registry import KeyRegistry, TenantKeys, parse_key_ref

_T = TypeVar("_T")
_A = TypeVar("_A")

#: Called (in the calling thread) before every provider call made in this context, each retry
#: included: the migration tools' KMS request budget (``max_kms_rps``) waits here for a token.
#: Unwraps that :meth:`KeyManager.read_keys` runs concurrently inherit the caller's context.
kms_call_gate: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "sqlalchemy_cmk_kms_call_gate", default=None
)


@dataclass(frozen=True)
class CachePolicy:
    """Limits on how long and how much a data key is used without asking the KMS again."""

    ttl: float = 60.0
    max_entries: int = 1000
    write_key_max_age: float | None = None
    write_key_max_uses: int = 2**20

    def __post_init__(self) -> None:
        if not math.isfinite(self.ttl) or (
            self.write_key_max_age is not None and not math.isfinite(self.write_key_max_age)
        ):
            # inf would cache a key for ever (no revocation bound); nan never compares.
            raise ConfigurationError("cache_ttl and write_key_max_age must be finite seconds")
        if self.ttl < 0 or self.max_entries < 1 or self.write_key_max_uses < 1:
            raise ConfigurationError(
                "cache_ttl >= 0, cache_max_entries >= 1, write_key_max_uses >= 1"
            )
        if self.write_key_max_uses > 2**32:
            raise ConfigurationError("write_key_max_uses above 2**32 breaks AES-GCM's nonce bound")
        if self.write_key_max_age is not None and self.write_key_max_age > self.ttl:
            raise ConfigurationError(
                "write_key_max_age must not exceed cache_ttl: revocation is promised within "
                "cache_ttl, and a write key outliving it would keep writing after a revocation"
            )

    @property
    def write_age(self) -> float:
        return self.ttl if self.write_key_max_age is None else self.write_key_max_age


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transient KMS errors: exponential backoff with full jitter, within a deadline.

    Attempt ``n`` (from 1) that fails transiently is followed by a sleep drawn uniformly from
    ``[0, min(max_backoff, backoff * 2 ** (n - 1))]`` (AWS's "full jitter", so that processes
    throttled together do not retry together), until ``deadline`` seconds have passed since the
    first attempt, or ``attempts`` attempts when that is set. With the defaults a KMS that
    throttles for a few seconds is retried about ten times over ``deadline`` instead of failing
    a cold load within a fraction of a second. Each attempt is itself bounded by what is left of
    ``deadline`` (the providers hand that to their SDK, see
    :func:`sqlalchemy_cmk.providers.call_timeout`).
    """

    attempts: int | None = None
    backoff: float = 0.05
    deadline: float = 10.0
    max_concurrency: int = 16
    max_backoff: float = 2.0

    def __post_init__(self) -> None:
        if (
            (self.attempts is not None and self.attempts < 1)
            or self.backoff < 0
            or self.max_backoff < 0
            or self.deadline <= 0
            or self.max_concurrency < 1
        ):
            raise ConfigurationError(
                "retry attempts >= 1 (or None: until the deadline), backoff >= 0, "
                "max_backoff >= 0, deadline > 0, concurrency >= 1"
            )

    def delay(self, attempt: int, draw: Callable[[float, float], float] = random.uniform) -> float:
        """Seconds to sleep after failed attempt number ``attempt`` (1-based)."""
        ceiling = min(self.max_backoff, self.backoff * 2 ** min(attempt - 1, 62))
        return draw(0.0, ceiling)


@dataclass(eq=False)
class DataKey:
    """An unwrapped data key and where it came from. Never logged, never persisted."""

    tenant: str
    provider: str
    key_ref: str
    envelope: bytes
    aead: AESGCM
    material: bytearray
    expires_at: float  # end of its use for reading (cache_ttl)
    write_until: float = 0.0  # end of its use for new rows (write_key_max_age)
    uses: int = 0
    # KeyManager's forget() generation when the fetch began: cached only if still current.
    generation: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    wiped: bool = False

    def __repr__(self) -> str:  # no key bytes, no EDEK bytes
        return f"DataKey(tenant={self.tenant!r}, key_ref={self.key_ref!r})"

    def wipe(self) -> None:
        # Under the key's lock, so that a reader of ``material`` (rewrap) sees the key or the
        # ``wiped`` flag, never half of each.
        with self.lock:
            self.material[:] = bytes(len(self.material))
            self.wiped = True

    def copy_material(self) -> bytearray | None:
        """A copy of the key bytes, or None if the key was wiped (evicted) meanwhile."""
        with self.lock:
            return None if self.wiped else bytearray(self.material)


_OUTCOMES: tuple[tuple[type[CMKError], str], ...] = (
    (KeyAccessDeniedError, "denied"),
    (KeyNotFoundError, "not_found"),
    (KMSUnavailableError, "unavailable"),
)


_HINTS: dict[type[CMKError], str] = {
    KeyAccessDeniedError: "the tenant's KMS refused (key revoked, disabled or access not "
    "granted); the tenant's data stays unreadable until the tenant restores access",
    KeyNotFoundError: "the tenant's KMS does not know this key; check the tenant's key reference",
}


def outcome_of(exc: BaseException) -> str:
    for cls, name in _OUTCOMES:
        if isinstance(exc, cls):
            return name
    return "error"


def _count_lookups(found: Mapping[bytes, DataKey], wanted: Sequence[bytes]) -> None:
    """Read-cache hits and misses per tenant, for the operator's metrics. A miss's tenant is
    the one its envelope names (unauthenticated, but only a label of the operator's own)."""
    hits: dict[str, int] = {}
    for key in found.values():
        hits[key.tenant] = hits.get(key.tenant, 0) + 1
    misses: dict[str, int] = {}
    if len(found) < len(wanted):
        for env in wanted:
            if env not in found:
                try:
                    inner = _format.split_leased(env)[0] if _format.is_leased(env) else env
                    tenant = _format.parse_envelope(_lease.kms_envelope(inner)).tenant
                except CMKError:
                    tenant = ""  # malformed: the unwrap refuses it
                misses[tenant] = misses.get(tenant, 0) + 1
    _metrics.cache_lookups(hits, misses)


class KeyManager:
    """Wraps and unwraps data keys through providers, with caching, retries and audit."""

    def __init__(
        self,
        providers: Mapping[str, KeyProvider],
        tenants: KeyRegistry | Mapping[str, TenantKeys],
        cache: CachePolicy,
        retry: RetryPolicy,
        audit: Sequence[AuditSink],
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[int], bytes] = os.urandom,
        verify_write_keys: bool = True,
        lease_period: float | None = None,
    ) -> None:
        _lease.check_period(lease_period, cache.ttl)
        self._providers = dict(providers)
        self._registry: KeyRegistry = (
            tenants if isinstance(tenants, KeyRegistry) else _MappingRegistry(dict(tenants))
        )
        self._cache_policy = cache
        self._retry = retry
        self._audit = tuple(audit)
        # Set by CMK(audit_delivery=...): records each event for the tenant's own destinations
        # (durably, before the access goes on); raises AuditError when it cannot.
        self.deliver: Callable[[AuditEvent, TenantContext | None], None] | None = None
        self._clock = clock
        self.rng = rng
        self.verify_write_keys = verify_write_keys
        self._lock = threading.Lock()
        # Segmented LRU with a tenant index: see _cache for the capacity rule.
        self._read: SegmentedCache[DataKey] = SegmentedCache(cache.max_entries)
        self._write: OrderedDict[str, DataKey] = OrderedDict()  # least recently used first
        # Bumped by every forget(); a tenant's generation is that of the last forget covering
        # it. One int per tenant forgotten since the last forget-all (which clears the map).
        self._generation = 0
        self._forgotten: dict[str, int] = {}
        self._all_forgotten = 0
        self._runner = _Runner(4 * retry.max_concurrency)
        # Expired keys are swept at most this often (a sweep walks both caches).
        self._prune_every = min(cache.ttl, cache.write_age) / 4
        self._next_prune = clock() + self._prune_every
        self._leases = _lease.Leases(self, lease_period)  # lease_period None: write version 1
        _track(self)

    def _after_fork_in_child(self) -> None:
        # A fork copies only the forking thread: a lock another thread held stays held for
        # ever in the child, and the runner's slots count threads the child does not have.
        # The cached keys are inherited with the parent's memory, and kept, unless the lock was
        # held at the fork: then another thread may have been half-way through a change of the
        # caches (an entry moved but its tenant index not yet, say), and a forget() in the
        # child could miss a key. The child starts with empty caches then, and asks the KMS.
        held = self._lock.locked()
        if held:
            self._read = SegmentedCache(self._cache_policy.max_entries)
            self._write = OrderedDict()
        self._lock = threading.Lock()
        self._runner = _Runner(4 * self._retry.max_concurrency)
        for _, key in self._read.snapshot():
            key.lock = threading.Lock()
        for key in self._write.values():
            key.lock = threading.Lock()
        self._leases.after_fork(held)

    # -- tenants -------------------------------------------------------------------------------

    def tenant_keys(self, tenant: str) -> TenantKeys:
        """The tenant's keys from the registry, each with a configured provider."""
        keys = self._registry.tenant_keys(tenant)
        for ref in keys.accepted:
            scheme, _ = parse_key_ref(ref, tenant)
            if scheme not in self._providers:
                raise ConfigurationError(
                    f"key reference {ref!r} of tenant {tenant!r} needs a provider for scheme "
                    f"{scheme!r}; configured: {sorted(self._providers)}",
                    tenant=tenant,
                    key_ref=ref,
                )
        return keys

    def emit(
        self,
        ctx: TenantContext | None,
        operation: str,
        outcome: str,
        tenant: str | None,
        **kw: object,
    ) -> None:
        """Send one event to every sink, then to the tenant's delivery; a sink that raises stops
        the access (AuditError)."""
        if self._audit or self.deliver is not None:
            event = make_event(ctx, operation, outcome, tenant, **kw)
            for sink in self._audit:
                try:
                    sink(event)
                except Exception as exc:
                    # The sink's error is the cause (operators need it); the message names only
                    # what was stopped, and no tenant, since it may reach an end user.
                    raise AuditError(
                        f"audit sink {type(sink).__name__} raised {type(exc).__name__} on a "
                        f"{operation!r} event: the access was stopped, since an access that "
                        "cannot be audited does not happen",
                        tenant=tenant,
                        key_ref=_str_or_none(kw.get("key_ref")),
                        provider=_str_or_none(kw.get("provider")),
                        table=_str_or_none(kw.get("table")),
                    ) from exc
            if self.deliver is not None:
                self.deliver(event, ctx)

    # -- write keys ----------------------------------------------------------------------------

    @property
    def max_uses(self) -> int:
        return self._cache_policy.write_key_max_uses

    def write_key(self, tenant: str, uses: int, ctx: TenantContext | None) -> DataKey:
        """The tenant's current write key, reserving ``uses`` (<= ``max_uses``) encryptions.

        A new key is wrapped, then (``verify_write_keys``) unwrapped once through the provider
        and compared with itself before anything is sealed under it.
        """
        return self.write_keys([(tenant, uses)], ctx)[tenant]

    def write_keys(
        self, requests: Sequence[tuple[str, int]], ctx: TenantContext | None
    ) -> dict[str, DataKey]:
        """The current write key of each tenant, reserving its ``uses`` encryptions.

        Like :meth:`read_keys` for unwraps: the tenants whose keys are not cached get new ones
        concurrently (at most ``max_concurrency`` wraps, each verified, at once), so a flush
        that needs the keys of 100 tenants waits for about ``100 / max_concurrency`` KMS round
        trips, not 100. Raises the first error (in request order) after every wrap has
        finished, so no thread is left running; the keys of a failed batch are wiped and none
        is cached.
        """
        now = self._clock()
        self._prune(now)
        found: dict[str, DataKey] = {}
        missing: list[tuple[str, int]] = []
        requests = list(requests)
        if len({tenant for tenant, _ in requests}) != len(requests):
            raise ConfigurationError("write_keys: one request per tenant")
        generation = self._generation  # before the registry lookups: see the module doc
        for i in range(0, len(requests), _CHUNK):  # bounded holds, as in read_keys
            with self._lock:
                for tenant, uses in requests[i : i + _CHUNK]:
                    key = self._write.get(tenant)
                    if (
                        key is not None
                        and key.write_until > now
                        and key.uses + uses <= self.max_uses
                    ):
                        key.uses += uses
                        self._write.move_to_end(tenant)
                        found[tenant] = key
                    else:
                        missing.append((tenant, uses))
        if not missing:
            return found
        for tenant, uses in missing:
            if uses > self.max_uses:
                raise ConfigurationError(
                    f"one row needs {uses} encryptions, more than write_key_max_uses",
                    tenant=tenant,
                )
        results: list[DataKey | BaseException]
        results = self._in_parallel(
            lambda r: self._new_write_key_or_error(r[0], ctx, generation), missing, "wrap"
        )
        error = next((r for r in results if isinstance(r, BaseException)), None)
        if error is not None:
            for res in results:
                if isinstance(res, DataKey):
                    res.wipe()
            raise error
        done = list(zip(missing, results, strict=True))
        for i in range(0, len(done), _CHUNK):
            with self._lock:
                for (tenant, uses), res in done[i : i + _CHUNK]:
                    assert isinstance(res, DataKey)
                    res.uses = uses
                    found[tenant] = res
                    self._cache_write_key(res)
        return {tenant: found[tenant] for tenant, _ in requests}  # in request order

    def _new_write_key_or_error(
        self, tenant: str, ctx: TenantContext | None, generation: int
    ) -> DataKey | BaseException:
        try:
            if self._leases.period is not None:  # wrapped locally: a KMS call per lease
                return self._leases.new_write_key(tenant, ctx, generation)
            key = self._wrap_new(tenant, self.tenant_keys(tenant).primary, ctx, generation)
            if self.verify_write_keys:
                try:
                    self._verify(key, ctx)
                except BaseException:
                    key.wipe()
                    raise
            return key
        except Exception as exc:  # CMKError mostly; an audit sink's error too
            return exc

    def _cache_write_key(self, key: DataKey) -> None:
        # Caller holds self._lock.
        if not self._current(key):
            # The tenant was forgotten while its key was wrapped: this flush seals with it
            # (it began before the forget), nothing later does. Its AESGCM keeps working.
            key.wipe()
            return
        victims: list[DataKey] = []
        old = self._write.pop(key.tenant, None)
        self._write[key.tenant] = key
        self._remember(key)
        if old is not None:
            victims.append(old)
        while len(self._write) > self._cache_policy.max_entries:
            victims.append(self._write.popitem(last=False)[1])
        self._wipe_unless_cached(victims)

    def _verify(self, key: DataKey, ctx: TenantContext | None) -> None:
        """Unwrap a new key's envelope through the provider; it must give back the same key.

        The unwrap is a KMS call the tenant sees, so it is audited like any other, with
        ``purpose="verify"``; what it proves is then kept (the write key enters the read cache).
        """
        self._round_trip(key, ctx, "verify", "the KMS unwrapped a different key than it wrapped")

    def confirm(self, key: DataKey, ctx: TenantContext | None) -> None:
        """Unwrap ``key``'s envelope again; the KMS must give the same key (audited as an
        unwrap with ``purpose="confirm"``). For a key about to seal values with nothing stored
        to check it against: a KMS that answered garbage once is caught."""
        self._round_trip(key, ctx, "confirm", "the KMS unwrapped one key twice, differently")

    def _round_trip(
        self,
        key: DataKey,
        ctx: TenantContext | None,
        purpose: str,
        problem: str,
        outcome: str = "nothing was encrypted under it",
    ) -> None:
        back = self._unwrap(key.envelope, ctx, remember=False, purpose=purpose)
        try:
            same = hmac.compare_digest(back.material, key.material)
        finally:
            back.wipe()
        if not same:
            raise DecryptionError(
                f"{problem}; {outcome}",
                tenant=key.tenant,
                key_ref=key.key_ref,
                provider=key.provider,
            )

    def _wrap_new(
        self, tenant: str, key_ref: str, ctx: TenantContext | None, generation: int = 0
    ) -> DataKey:
        material = bytearray(self.rng(_format.DEK_SIZE))
        started = self._clock()
        try:
            envelope = self._wrap(tenant, key_ref, material, ctx)
        except BaseException:
            material[:] = bytes(len(material))
            raise
        return DataKey(
            tenant,
            key_ref.partition("://")[0],
            key_ref,
            envelope,
            AESGCM(material),
            material,
            expires_at=started + self._cache_policy.ttl,
            write_until=started + self._cache_policy.write_age,
            generation=generation,
        )

    def _wrap(
        self, tenant: str, key_ref: str, material: bytearray, ctx: TenantContext | None
    ) -> bytes:
        """Wrap ``material`` under ``key_ref`` through its provider (retried, audited); return
        the envelope."""
        scheme = key_ref.partition("://")[0]
        provider = self._providers[scheme]
        started = self._clock()
        try:
            out = self._call(
                lambda: provider.wrap_key(key_ref, bytes(material), _wrap_context(tenant, ctx)),
                tenant,
                key_ref,
                scheme,
            )
            wrapped = _bytes_like(out)
            if wrapped is None or not 0 < len(wrapped) <= _format.MAX_WRAPPED:
                what = type(out).__name__ if wrapped is None else f"{len(wrapped)} bytes"
                raise KeyAccessError(
                    f"provider {scheme!r} returned {what} from wrap_key, not a wrapped key of "
                    f"1 to {_format.MAX_WRAPPED} bytes: the provider is broken",
                    tenant=tenant,
                    key_ref=key_ref,
                    provider=scheme,
                )
            envelope = _format.encode_envelope(tenant, scheme, key_ref, wrapped)
        except CMKError as exc:
            self.emit(
                ctx,
                "wrap",
                outcome_of(exc),
                tenant,
                key_ref=key_ref,
                provider=scheme,
                error=type(exc).__name__,
                duration_ms=(self._clock() - started) * 1000,
            )
            raise
        self.emit(
            ctx,
            "wrap",
            "ok",
            tenant,
            key_ref=key_ref,
            provider=scheme,
            duration_ms=(self._clock() - started) * 1000,
        )
        return envelope

    # -- read keys -----------------------------------------------------------------------------

    def read_keys(
        self,
        envelopes: Iterable[bytes],
        ctx: TenantContext | None,
        *,
        fresh: list[DataKey] | None = None,
    ) -> dict[bytes, DataKey]:
        """Data keys for the given envelopes: from the cache, else unwrapped, concurrently.

        Raises the first error met (in envelope order) after all unwraps have finished, so no
        thread is left running.

        With ``fresh``, the keys unwrapped now are not cached but appended to it: the caller
        proves them (a value authenticates) and then calls :meth:`remember`, so that a KMS that
        answered with a wrong key does not have it served from the cache for ``cache_ttl``.
        """
        now = self._clock()
        self._prune(now)
        found: dict[bytes, DataKey] = {}
        wanted = list(dict.fromkeys(envelopes))  # distinct, in order: O(1) per envelope
        # In chunks, each under the lock for O(chunk) dict operations, so that another
        # thread's cached lookup waits for one chunk, not for the whole of a large load.
        for i in range(0, len(wanted), _CHUNK):
            with self._lock:
                for env in wanted[i : i + _CHUNK]:
                    key = self._read.get(env)
                    if key is not None and key.expires_at > now:
                        self._read.hit(env)
                        found[env] = key
        if _metrics.available():
            _count_lookups(found, wanted)
        if len(found) == len(wanted):
            return found
        missing = [env for env in wanted if env not in found]
        leased = [e for e in missing if e[:2] == _format.LEASED_MARK]
        if leased:  # version 2: each distinct lease from the KMS once, then local unwraps
            found.update(self._leases.read(leased, ctx, fresh))
            missing = [e for e in missing if e[:2] != _format.LEASED_MARK]
            if not missing:
                return found
        keep = fresh is None
        results = self._in_parallel(
            lambda e: self._unwrap_or_error(e, ctx, keep), missing, "unwrap"
        )
        error = next((r for r in results if isinstance(r, CMKError)), None)
        if error is not None:
            if not keep:  # nothing proved these keys: they leave memory now
                for res in results:
                    if isinstance(res, DataKey):
                        res.wipe()
            raise error
        for env, res in zip(missing, results, strict=True):
            assert isinstance(res, DataKey)
            found[env] = res
            if fresh is not None:
                fresh.append(res)
        return found

    def _in_parallel(self, fn: Callable[[_A], _T], items: Sequence[_A], name: str) -> list[_T]:
        """``fn`` over ``items``, at most ``max_concurrency`` at once, each in a copy of the
        caller's context (its ``kms_call_gate``); ``fn`` returns its errors, never raises.

        The one pool of wraps and unwraps. Under an AsyncSession it runs off the event loop:
        starting the pool's threads alone held the loop 4-11 ms (each start waits for its
        thread to run).
        """
        if len(items) == 1:
            return [fn(items[0])]
        workers = min(len(items), self._retry.max_concurrency)
        parent = contextvars.copy_context()

        def run_all() -> list[_T]:
            with ThreadPoolExecutor(workers, thread_name_prefix=f"sqlalchemy-cmk-{name}") as pool:
                return list(pool.map(lambda item: parent.copy().run(fn, item), items))

        return _aio.off_loop(run_all)

    def remember(self, keys: Iterable[DataKey]) -> None:
        """Cache keys that :meth:`read_keys` returned as ``fresh``, once they are proven."""
        batch = list(keys)
        for i in range(0, len(batch), _CHUNK):  # a bounded hold per chunk, as in read_keys
            with self._lock:
                for key in batch[i : i + _CHUNK]:
                    if key.wiped:
                        continue
                    cached = self._read.get(key.envelope)
                    if cached is not None and cached is not key:
                        key.wipe()  # another thread cached the same key meanwhile
                        continue
                    self._remember(key)
                    if self._read.get(key.envelope) is not key:
                        key.wipe()  # not cached (cache_ttl=0): its use is over

    def _unwrap_or_error(
        self, envelope: bytes, ctx: TenantContext | None, remember: bool = True
    ) -> DataKey | CMKError:
        try:
            return self._unwrap(envelope, ctx, remember=remember)
        except CMKError as exc:
            return exc

    def rewrap(
        self,
        envelope: bytes,
        ctx: TenantContext | None,
        *,
        proof: Callable[[DataKey], None] | None = None,
    ) -> bytes:
        """The envelope of the same data key wrapped under its tenant's current primary key.

        Returns ``envelope`` itself if it already uses the primary. Otherwise the data key is
        unwrapped into a copy this call owns (:meth:`own_key`: never a cache entry, which
        another thread's ``forget_tenant()`` or an eviction could wipe while it is being
        wrapped) and proven, wrapped under the primary, and the new envelope is unwrapped again
        and must give back the same key. So a wrap that returns an unusable blob raises here,
        before the caller replaces a working envelope with it. The data key, and so every
        value encrypted under it, is unchanged.

        The proof comes first because the caller overwrites the old envelope, the only way
        back: a key the KMS unwrapped wrongly once, then faithfully wrapped and unwrapped
        again, would leave every row of the envelope unreadable for good. ``proof`` checks the
        key against something it opens (a lease against its local wrap: no KMS call); without
        one, a second unwrap must give the same key (four KMS calls in all; a KMS that always
        gives the same wrong key still passes, as there is nothing stored to check it with).

        A version-2 envelope has its lease envelope re-wrapped so (one round trip per lease,
        memoised, proven against the envelope's local wrap), its locally wrapped data key kept.

        Raises:
            DecryptionError: the new envelope unwraps to another key (a broken KMS or provider).
            KeyAccessError, TenantNotConfiguredError: as an unwrap or a wrap.
        """
        if _format.is_leased(envelope):
            return self._leases.rewrap(envelope, ctx)
        env = _format.parse_envelope(envelope)
        primary = self.tenant_keys(env.tenant).primary
        if env.key_ref == primary:
            return envelope
        key = self.own_key(envelope, ctx)
        try:
            if proof is not None:
                proof(key)
            else:
                self._round_trip(
                    key,
                    ctx,
                    "confirm",
                    "the KMS unwrapped the data key to re-wrap twice, differently",
                    "the old envelope was kept",
                )
            new = self._wrap(env.tenant, primary, key.material, ctx)
            back = self.own_key(new, ctx, purpose="verify")
            try:
                same = hmac.compare_digest(back.material, key.material)
            finally:
                back.wipe()
        finally:
            key.wipe()
        if not same:
            raise DecryptionError(
                "the KMS unwrapped the re-wrapped data key to a different key; the old "
                "envelope was kept",
                tenant=env.tenant,
                key_ref=primary,
                provider=primary.partition("://")[0],
            )
        return new

    def own_key(
        self, envelope: bytes, ctx: TenantContext | None, *, purpose: str | None = None
    ) -> DataKey:
        """A private copy of ``envelope``'s data key, unwrapped through the provider now.

        Never cached, so no other thread can evict or wipe it; the caller wipes it when done.
        For the migration tools, which must prove what they write with the KMS itself rather
        than with whatever the cache holds. One audited unwrap (with ``purpose``) per call.
        """
        return self._unwrap(envelope, ctx, remember=False, purpose=purpose)

    def probe(self, tenant: str, key_ref: str, ctx: TenantContext | None) -> float:
        """Wrap a fresh key under ``key_ref`` and unwrap it again, caching nothing; returns
        the milliseconds it took. Raises what a wrap or an unwrap would."""
        started = self._clock()
        key = self._wrap_new(tenant, key_ref, ctx)
        try:
            self._verify(key, ctx)
        finally:
            key.wipe()
        return (self._clock() - started) * 1000

    def _unwrap(
        self,
        envelope: bytes,
        ctx: TenantContext | None,
        *,
        remember: bool = True,
        purpose: str | None = None,
    ) -> DataKey:
        if _format.is_leased(envelope):
            return self._leases.unwrap(envelope, ctx, remember=remember, purpose=purpose)
        if envelope[:1] == _lease.LEASE_KEY and purpose is None:
            purpose = "lease"
        generation = self._generation  # before the registry lookup: see the module doc
        env = _format.parse_envelope(_lease.kms_envelope(envelope))
        keys = self.tenant_keys(env.tenant)
        if env.key_ref not in keys.accepted:
            raise TenantNotConfiguredError(
                f"a row of tenant {env.tenant!r} is wrapped under {env.key_ref!r}, which is not "
                "one of the tenant's configured keys: add it to the tenant's accepted keys if "
                "the tenant moved keys, otherwise treat the row as suspect",
                tenant=env.tenant,
                key_ref=env.key_ref,
                provider=env.provider,
            )
        provider = self._providers.get(env.provider)
        if provider is None or not env.key_ref.startswith(env.provider + "://"):
            raise ConfigurationError(
                f"no provider for scheme {env.provider!r} is configured",
                tenant=env.tenant,
                key_ref=env.key_ref,
                provider=env.provider,
            )
        started = self._clock()
        try:
            out = self._call(
                lambda: provider.unwrap_key(env.key_ref, env.wrapped, {"tenant": env.tenant}),
                env.tenant,
                env.key_ref,
                env.provider,
            )
            raw = _bytes_like(out)
            if raw is None:
                raise KeyAccessError(
                    f"provider {env.provider!r} returned {type(out).__name__} from unwrap_key, "
                    "not bytes: the provider is broken",
                    tenant=env.tenant,
                    key_ref=env.key_ref,
                    provider=env.provider,
                )
            if len(raw) != _format.DEK_SIZE:
                raise DecryptionError(
                    "unwrapped data key has the wrong size",
                    tenant=env.tenant,
                    key_ref=env.key_ref,
                    provider=env.provider,
                )
        except CMKError as exc:
            self.emit(
                ctx,
                "unwrap",
                outcome_of(exc),
                env.tenant,
                key_ref=env.key_ref,
                provider=env.provider,
                error=type(exc).__name__,
                duration_ms=(self._clock() - started) * 1000,
                purpose=purpose,
            )
            raise
        material = bytearray(raw)
        del raw, out
        try:
            self.emit(
                ctx,
                "unwrap",
                "ok",
                env.tenant,
                key_ref=env.key_ref,
                provider=env.provider,
                duration_ms=(self._clock() - started) * 1000,
                purpose=purpose,
            )
        except BaseException:
            material[:] = bytes(len(material))
            raise
        key = DataKey(
            env.tenant,
            env.provider,
            env.key_ref,
            envelope,
            AESGCM(material),
            material,
            expires_at=started + self._cache_policy.ttl,
            generation=generation,
        )
        if remember:
            with self._lock:
                self._remember(key)
        return key

    def _current(self, key: DataKey) -> bool:
        """Whether no forget() of ``key``'s tenant came since its fetch began (caller holds
        self._lock)."""
        forgotten = max(self._all_forgotten, self._forgotten.get(key.tenant, 0))
        return key.generation >= forgotten

    def _remember(self, key: DataKey) -> None:
        # Caller holds self._lock. Every path into the caches comes here or through _current.
        if self._cache_policy.ttl <= 0 or not self._current(key):
            return
        self._wipe_unless_cached(self._read.put(key.envelope, key))

    def _wipe_unless_cached(self, keys: Iterable[DataKey]) -> None:
        # Caller holds self._lock. A key leaves memory when neither cache holds it any more.
        for k in keys:
            if (
                self._read.get(k.envelope) is not k
                and self._write.get(k.tenant) is not k
                and not self._leases.holds(k)
            ):
                k.wipe()

    def _prune(self, now: float) -> None:
        """Drop and wipe expired keys, at most every ``_prune_every`` seconds."""
        if now < self._next_prune:
            return
        with self._lock:
            if now < self._next_prune:
                return
            self._next_prune = now + self._prune_every
            # Copies under the lock (C-level, about 2 ms per 100,000 entries); the filtering
            # runs outside it, and the removals in chunks, so cached lookups in other threads
            # wait for one chunk at most.
            read = self._read.snapshot()
            write = list(self._write.values())
        victims = [(e, k) for e, k in read if k.expires_at <= now]
        stale = [k for k in write if k.write_until <= now]
        for i in range(0, max(len(victims), len(stale)), _CHUNK):
            with self._lock:
                gone: list[DataKey] = []
                for e, k in victims[i : i + _CHUNK]:
                    if self._read.get(e) is k:  # not replaced or dropped meanwhile
                        self._read.pop(e)
                        gone.append(k)
                for k in stale[i : i + _CHUNK]:
                    if self._write.get(k.tenant) is k:
                        del self._write[k.tenant]
                        gone.append(k)
                self._wipe_unless_cached(gone)
        with self._lock:  # write leases: at most one per tenant, cache_max_entries in all
            self._wipe_unless_cached(self._leases.expired(now))

    def discard(self, envelope: bytes) -> None:
        """Drop (and zero) the cached key of ``envelope``: a value failed to authenticate under
        it, and a KMS that once returned a wrong key must not have it served from the cache
        until ``cache_ttl`` runs out. Costs a tampered row one more unwrap per read."""
        with self._lock:
            key = self._read.pop(envelope)
            if key is not None:
                if self._write.get(key.tenant) is key:
                    del self._write[key.tenant]
                key.wipe()

    def forget(self, tenant: str | None = None) -> int:
        """Drop (and zero) cached keys of one tenant, or of all; returns how many were dropped.

        Also keeps out every key whose fetch is under way now: it serves the operation that
        asked for it, at most, and is not cached.
        """
        with self._lock:
            self._generation += 1
            if tenant is None:
                self._all_forgotten = self._generation
                self._forgotten.clear()  # every tenant's generation is now _all_forgotten
            else:
                self._forgotten[tenant] = self._generation
            # O(keys of the tenant), through the cache's tenant index; the write cache is
            # keyed by tenant already.
            if tenant is None:
                keys = self._read.clear() + list(self._write.values())
                self._write.clear()
            else:
                keys = self._read.pop_tenant(tenant)
                write = self._write.pop(tenant, None)
                if write is not None:
                    keys.append(write)
            keys += self._leases.forget(tenant)  # write leases (also in _read, unless evicted)
            dropped = {id(k): k for k in keys}
        for k in dropped.values():
            k.wipe()
        return len(dropped)

    # -- retries -------------------------------------------------------------------------------

    def _call(self, fn: Callable[[], _T], tenant: str, key_ref: str, scheme: str) -> _T:
        gate = kms_call_gate.get()
        if gate is not None:
            gate()  # before the deadline starts: waiting for the budget is not the KMS's time
        started = self._clock()
        deadline = started + self._retry.deadline
        attempt = 0
        while True:
            attempt += 1
            if gate is not None and attempt > 1:
                gate()  # a retry is a request too
            left = deadline - self._clock()
            try:
                # The provider reads what is left through providers.call_timeout() and hands
                # it to its SDK, so an abandoned call does not hold a connection much longer.
                with _provider_deadline(time.monotonic() + left):
                    return self._runner.run(fn, left)
            except _Timeout:
                raise KMSUnavailableError(
                    f"KMS for tenant {tenant!r} did not answer within kms_deadline "
                    f"({self._retry.deadline:g} s, {attempt} attempt(s))",
                    tenant=tenant,
                    key_ref=key_ref,
                    provider=scheme,
                ) from None
            except KMSUnavailableError as exc:
                delay = self._retry.delay(attempt)
                if (
                    not exc.retryable
                    or (self._retry.attempts is not None and attempt >= self._retry.attempts)
                    or self._clock() + delay >= deadline
                ):
                    raise KMSUnavailableError(
                        f"KMS for tenant {tenant!r} unavailable after {attempt} attempt(s) in "
                        f"{self._clock() - started:.2f} s: {exc}",
                        tenant=tenant,
                        key_ref=key_ref,
                        provider=scheme,
                    ) from exc
                _aio.sleep(delay)  # awaited under an AsyncSession, as the calls are
            except (KeyAccessDeniedError, KeyNotFoundError) as exc:
                hint = _HINTS[type(exc) if type(exc) in _HINTS else KeyAccessDeniedError]
                raise type(exc)(
                    f"tenant {tenant!r}, key {key_ref!r}: {exc}; {hint}",
                    tenant=tenant,
                    key_ref=key_ref,
                    provider=scheme,
                ) from exc
            except CMKError as exc:
                if exc.tenant is None:
                    exc.tenant = tenant
                raise
            except Exception as exc:
                # A provider that leaks an unmapped SDK error still fails closed, typed.
                raise KeyAccessError(
                    f"provider {scheme!r} failed for tenant {tenant!r}: {type(exc).__name__}",
                    tenant=tenant,
                    key_ref=key_ref,
                    provider=scheme,
                ) from exc


#: Entries handled per acquisition of a key manager's lock by the walks over many keys.
_CHUNK = 256

#: Every live key manager, for the fork handler (weak: it keeps none of them alive).
_live_managers: weakref.WeakSet[KeyManager] = weakref.WeakSet()


_fork_hook_lock = threading.Lock()
_fork_hook_installed = False


def _reinit_after_fork() -> None:
    global _fork_hook_lock
    _fork_hook_lock = threading.Lock()
    for manager in list(_live_managers):
        manager._after_fork_in_child()


def _track(manager: KeyManager) -> None:
    """Track ``manager`` for the fork handler, registered by the first key manager (not at
    import: no import-time side effects)."""
    global _fork_hook_installed
    with _fork_hook_lock:
        _live_managers.add(manager)
        if not _fork_hook_installed and hasattr(os, "register_at_fork"):  # Windows: no fork
            os.register_at_fork(after_in_child=_reinit_after_fork)
            _fork_hook_installed = True


class _Timeout(Exception):
    """A provider call outlived its deadline (internal; becomes KMSUnavailableError)."""


class _Runner:
    """Runs provider calls on daemon threads, at most ``limit`` at once, each bounded in time.

    A thread cannot be killed: a call that hangs is abandoned at its deadline and its thread
    keeps its slot until the provider returns (its late answer is dropped). So threads stay
    bounded: when every slot is held by a hung call, further calls wait for a slot until their
    own deadline and then fail as unavailable. Daemon threads, so a hung KMS never blocks exit.
    """

    def __init__(self, limit: int) -> None:
        self._slots = threading.BoundedSemaphore(limit)

    def run(self, fn: Callable[[], _T], timeout: float) -> _T:
        end = time.monotonic() + max(timeout, 0.0)
        if not self._slots.acquire(timeout=max(timeout, 0.0)):
            raise _Timeout
        outcome: Future[_T] = Future()
        context = contextvars.copy_context()  # providers may read context variables

        def target() -> None:
            try:
                value = context.run(fn)
            except BaseException as exc:  # handed to the caller below
                self._slots.release()
                outcome.set_exception(exc)
            else:
                self._slots.release()
                outcome.set_result(value)

        def failed(exc: BaseException) -> None:  # the thread could not be started
            self._slots.release()
            outcome.set_exception(exc)

        _aio.start_thread(target, "sqlalchemy-cmk-kms", failed)
        # Blocks this thread, or under an AsyncSession awaits on its event loop (see _aio).
        if not _aio.wait([outcome], max(end - time.monotonic(), 0.0)):
            raise _Timeout
        return outcome.result()


def _bytes_like(value: object) -> bytes | None:
    """``value`` as bytes if it is bytes-like (bytes, bytearray, memoryview), else None."""
    if isinstance(value, bytes):
        return bytes(value)  # a subclass becomes plain bytes
    if isinstance(value, (bytearray, memoryview)):
        try:
            return bytes(memoryview(value).cast("B"))
        except (TypeError, ValueError):
            return None
    return None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _wrap_context(tenant: str, ctx: TenantContext | None) -> dict[str, str]:
    # The tenant binds; the data label is informational (AWS shows it in the tenant's
    # CloudTrail) and the providers that send it record it in their wrapped bytes.
    context = {"tenant": tenant}
    if ctx is not None and ctx.data_label:
        context["data_label"] = ctx.data_label
    return context


class _MappingRegistry:
    def __init__(self, tenants: dict[str, TenantKeys]) -> None:
        self._tenants = tenants

    def tenant_keys(self, tenant: str) -> TenantKeys:
        keys = self._tenants.get(tenant)
        if keys is None:
            raise TenantNotConfiguredError(f"tenant {tenant!r} has no key reference", tenant=tenant)
        return keys
