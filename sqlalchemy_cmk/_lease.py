"""Leased tenant keys: data keys wrapped locally under a lease key the tenant's KMS wraps.

One tier of the tenant's key hierarchy (``docs/design.md``): the tenant's master key, in its
KMS, wraps the tenant's own keys (the search root key, persisted; lease keys, carried inline in
each row's companion), and a lease key wraps data keys locally with AES-256-GCM. With
``CMK(lease_period=...)`` a tenant's writes reuse one lease for ``lease_period`` seconds (one
KMS wrap, plus the verify unwrap), and each write window's new data key costs no KMS call. A
cold read unwraps each distinct lease once through the KMS and every data key under it locally,
so KMS calls grow with tenants x lease periods, not with data keys.

Lease keys live in the key manager's own read cache, keyed by :data:`LEASE_KEY` + the lease
envelope (a prefix no stored envelope starts with), so they share its ``cache_ttl``, its LRU
bound, ``forget``/``revoke``, the sweep and the "cached only once proven" rule of
``read_keys(fresh=...)``: a fresh lease goes into ``fresh`` beside the data keys it opened and
is cached with them by ``remember`` once a value authenticated, or wiped with them. A data key
opened under a lease is never used past the lease's own expiry, so revocation keeps its bound.

The format is in :mod:`sqlalchemy_cmk._format` (version 2). Only the key manager calls this
module, through small hooks in ``write_key``, ``read_keys``, ``_unwrap``, ``rewrap`` and
``forget``.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import _format
from .context import TenantContext
from .errors import ConfigurationError, DecryptionError

if TYPE_CHECKING:
    from ._keys import DataKey, KeyManager

#: Prefix of a lease key's entry in the read cache: never the first byte of a stored envelope
#: (a version-1 envelope starts with a tenant length <= 1024, a version-2 one with 0x0000).
LEASE_KEY = b"\xff"

_REWRAP_MEMO = 4096  # lease envelopes re-wrapped, remembered per key manager (no key bytes)


def check_period(period: float | None, ttl: float) -> None:
    """ConfigurationError unless ``period`` is None or finite seconds in ``(0, ttl]``."""
    if period is None:
        return
    if (
        isinstance(period, bool)
        or not isinstance(period, (int, float))
        or not math.isfinite(period)
        or period <= 0
    ):
        raise ConfigurationError("lease_period must be None or a finite number of seconds > 0")
    if period > ttl:
        raise ConfigurationError(
            "lease_period must not exceed cache_ttl: revocation is promised within cache_ttl, "
            "and a lease outliving it would keep writing and reading after a revocation"
        )


def kms_envelope(envelope: bytes) -> bytes:
    """The envelope the KMS unwraps for a read-cache entry (a lease's entry without its
    prefix)."""
    return envelope[1:] if envelope[:1] == LEASE_KEY else envelope


def is_lease(key: DataKey) -> bool:
    return key.envelope[:1] == LEASE_KEY


class Leases:
    """The lease tier of one :class:`~sqlalchemy_cmk._keys.KeyManager`."""

    def __init__(self, km: KeyManager, period: float | None) -> None:
        self._km = km
        self.period = period
        # tenant -> its write lease, least recently used first; guarded by km._lock. A write
        # lease is held here whatever the read cache does (see holds()), and found by its
        # envelope for reads: so with leases the cache's capacity counts tenants, and a load of
        # many data keys never evicts the lease they are wrapped under.
        self._write: OrderedDict[str, DataKey] = OrderedDict()
        self._by_envelope: dict[bytes, DataKey] = {}
        self._rewrapped: OrderedDict[bytes, bytes] = OrderedDict()

    # -- writing -------------------------------------------------------------------------------

    def new_write_key(self, tenant: str, ctx: TenantContext | None, generation: int) -> DataKey:
        """A new data key for ``tenant``, wrapped locally under the tenant's write lease (a new
        lease, wrapped and verified through the KMS, when none is current)."""
        from ._keys import DataKey

        km = self._km
        primary = km.tenant_keys(tenant).primary  # a revoked tenant raises here
        now = km._clock()
        with km._lock:
            lease = self._write.get(tenant)
            if (
                lease is not None
                and not lease.wiped  # forgotten, evicted or swept meanwhile
                and lease.write_until > now
                and lease.key_ref == primary  # the tenant moved keys: a new lease
                and km._current(lease)
            ):
                self._write.move_to_end(tenant)
            else:
                lease = None
        kept = True
        if lease is None:
            lease = km._wrap_new(tenant, primary, ctx, generation)
            lease.envelope = LEASE_KEY + lease.envelope
            lease.write_until = now + (self.period or 0.0)
            if km.verify_write_keys:
                try:
                    km._verify(lease, ctx)
                except BaseException:
                    lease.wipe()
                    raise
            with km._lock:
                kept = km._current(lease)
                if kept:
                    old = self._write.pop(tenant, None)
                    gone = [] if old is None else [old]
                    self._write[tenant] = lease
                    self._by_envelope[lease.envelope] = lease
                    while len(self._write) > km._cache_policy.max_entries:
                        gone.append(self._write.popitem(last=False)[1])
                    for victim in gone:
                        self._by_envelope.pop(victim.envelope, None)
                    km._remember(lease)
                    km._wipe_unless_cached(gone)
        # The lease's AESGCM works even if a forget wiped its bytes just now: this flush began
        # before the forget, as for a plain write key.
        material = bytearray(km.rng(_format.DEK_SIZE))
        local = _format.wrap_local(lease.aead, km.rng(_format.NONCE_SIZE), tenant, bytes(material))
        if not kept:  # forgotten while it was wrapped: it served this key, nothing later
            lease.wipe()
        return DataKey(
            tenant,
            lease.provider,
            lease.key_ref,
            _format.encode_leased(kms_envelope(lease.envelope), local),
            AESGCM(material),
            material,
            expires_at=lease.expires_at,
            # Within the lease's own period (so a lease period ends its data keys' writes too),
            # and never past the KMS answer's cache_ttl (lease.write_until <= expires_at).
            write_until=min(now + km._cache_policy.write_age, lease.write_until),
            generation=generation,
        )

    # -- reading -------------------------------------------------------------------------------

    def read(
        self,
        envelopes: list[bytes],
        ctx: TenantContext | None,
        fresh: list[DataKey] | None,
    ) -> dict[bytes, DataKey]:
        """Data keys of version-2 envelopes missing from the cache: their leases from the cache
        or the KMS (each distinct lease once, concurrently), then a local unwrap each."""
        km = self._km
        parts = {e: _format.split_leased(e) for e in envelopes}
        lease_fresh: list[DataKey] | None = None if fresh is None else []
        wanted = dict.fromkeys(LEASE_KEY + lease for lease, _ in parts.values())
        now = km._clock()
        leases: dict[bytes, DataKey] = {}
        with km._lock:  # this process's write leases: made here, verified, never from a KMS
            for e in wanted:
                lease = self._by_envelope.get(e)
                if (
                    lease is not None
                    and not lease.wiped
                    and lease.expires_at > now
                    and km._current(lease)
                ):
                    leases[e] = lease
        rest = [e for e in wanted if e not in leases]
        if rest:
            leases.update(km.read_keys(rest, ctx, fresh=lease_fresh))
        found: dict[bytes, DataKey] = {}
        try:
            for env, (lease_env, local) in parts.items():
                found[env] = self._open(env, leases[LEASE_KEY + lease_env], local)
        except BaseException:
            for key in [*found.values(), *(lease_fresh or [])]:
                key.wipe()
            raise
        if fresh is None:
            with km._lock:
                for key in found.values():
                    km._remember(key)
        else:
            fresh.extend(found.values())
            fresh.extend(lease_fresh or [])
        return found

    def unwrap(
        self,
        envelope: bytes,
        ctx: TenantContext | None,
        *,
        remember: bool,
        purpose: str | None,
    ) -> DataKey:
        """A version-2 envelope's data key, its lease unwrapped through the KMS now (a private
        copy, wiped after: for :meth:`KeyManager.own_key` and the verify/confirm round trips)."""
        km = self._km
        lease_env, local = _format.split_leased(envelope)
        lease = km._unwrap(LEASE_KEY + lease_env, ctx, remember=False, purpose=purpose or "lease")
        try:
            key = self._open(envelope, lease, local)
        finally:
            lease.wipe()
        if remember:
            with km._lock:
                km._remember(key)
        return key

    def _open(self, envelope: bytes, lease: DataKey, local: bytes) -> DataKey:
        from ._keys import DataKey

        material = bytearray(_format.unwrap_local(lease.aead, lease.tenant, local))
        return DataKey(
            lease.tenant,
            lease.provider,
            lease.key_ref,
            envelope,
            AESGCM(material),
            material,
            expires_at=lease.expires_at,  # never used past the KMS answer's own bound
            generation=lease.generation,
        )

    # -- rewrap and forget ---------------------------------------------------------------------

    def rewrap(self, envelope: bytes, ctx: TenantContext | None) -> bytes:
        """``envelope`` with its lease re-wrapped under the tenant's primary key; the local wrap
        is kept as is (it binds no KMS blob). One verified KMS round trip per lease, memoised."""
        km = self._km
        lease_env, local = _format.split_leased(envelope)
        env = _format.parse_envelope(lease_env)
        primary = km.tenant_keys(env.tenant).primary
        if env.key_ref == primary:
            return envelope
        with km._lock:
            new = self._rewrapped.get(lease_env)
        if new is None or _format.parse_envelope(new).key_ref != primary:

            def proof(lease: DataKey) -> None:
                # The lease key must open this envelope's data key before it is wrapped anew:
                # a wrong lease key re-wrapped would orphan every data key under the lease.
                try:
                    _format.unwrap_local(lease.aead, env.tenant, local)
                except DecryptionError:
                    raise DecryptionError(
                        "the KMS unwrapped a lease to a key that does not open a data key "
                        "wrapped under it (or that row's envelope was tampered with); the old "
                        "envelope was kept",
                        tenant=env.tenant,
                        key_ref=env.key_ref,
                        provider=env.provider,
                    ) from None

            new = km.rewrap(lease_env, ctx, proof=proof)
            with km._lock:
                self._rewrapped[lease_env] = new
                while len(self._rewrapped) > _REWRAP_MEMO:
                    self._rewrapped.popitem(last=False)
        return _format.encode_leased(new, local)

    def after_fork(self, held: bool) -> None:
        """In a forked child (the key manager's fork hook): fresh key locks, and no write
        leases if the key manager's lock was held at the fork (a change may be half done)."""
        if held:
            self._write = OrderedDict()
            self._by_envelope = {}
        for lease in self._write.values():
            lease.lock = threading.Lock()

    def holds(self, key: DataKey) -> bool:
        """Whether ``key`` is a tenant's current write lease (caller holds km._lock)."""
        return self._write.get(key.tenant) is key

    def expired(self, now: float) -> list[DataKey]:
        """Drop the write leases past their read bound, for the sweep (caller holds km._lock)."""
        gone = [lease for lease in self._write.values() if lease.expires_at <= now]
        for lease in gone:
            del self._write[lease.tenant]
            self._by_envelope.pop(lease.envelope, None)
        return gone

    def forget(self, tenant: str | None) -> list[DataKey]:
        """Drop write leases and return them (caller holds km._lock and wipes them)."""
        if tenant is None:
            gone = list(self._write.values())
            self._write.clear()
            self._by_envelope.clear()
            return gone
        lease = self._write.pop(tenant, None)
        if lease is None:
            return []
        self._by_envelope.pop(lease.envelope, None)
        return [lease]
