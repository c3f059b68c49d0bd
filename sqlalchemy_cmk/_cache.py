"""The key manager's read cache: a segmented LRU with a per-tenant index.

The store only; the policy (TTL, the forget() generations, wiping) stays in ``_keys``. The
caller holds the key manager's lock around every method; each one costs O(1) per entry it
touches (a dict or OrderedDict operation), never a walk of the whole cache, except
:meth:`snapshot`, a C-level copy the sweep of expired keys filters outside the lock.

Capacity rule: at most ``capacity`` entries in all. An entry enters *probation*; a hit there
promotes it to *protected*, which holds at most ``capacity - capacity // 5`` entries (the
least recently used protected entry drops back to probation when it is full). A new entry
evicts the least recently used probation entry first, and a protected one only when probation
is empty. So one load that needs more keys than the capacity churns probation and leaves the
keys other loads keep hitting in place, instead of flushing the whole hot set as a plain LRU
does; and repeated loads of N > capacity keys keep about ``capacity / N`` of them cached
(the protected ones, hit each time), not 0.

Entries are keyed by bytes (a data key's envelope) and carry their tenant, so other kinds of
tenant keys can live in the same store under keys of their own (for example a prefix no
envelope starts with) and follow the same forget, revocation and TTL rules.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Protocol, TypeVar


class Entry(Protocol):
    """What the cache needs of a value: the tenant it belongs to."""

    @property
    def tenant(self) -> str: ...


V = TypeVar("V", bound=Entry)


class SegmentedCache(Generic[V]):
    """Probation and protected LRU segments plus a tenant -> keys index, kept in step."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # A fifth at least for newcomers, so a hot set never starves every new key.
        self.protected_capacity = max(capacity - capacity // 5, 0) if capacity > 1 else 0
        self._probation: OrderedDict[bytes, V] = OrderedDict()  # least recently used first
        self._protected: OrderedDict[bytes, V] = OrderedDict()
        self._by_tenant: dict[str, dict[bytes, None]] = {}

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)

    def __contains__(self, key: bytes) -> bool:
        return key in self._protected or key in self._probation

    def move_to_end(self, key: bytes) -> None:
        """Record ``key`` as used (OrderedDict's name for it, as the lease code calls it)."""
        self.hit(key)

    def get(self, key: bytes) -> V | None:
        """The entry, with no bookkeeping (a peek)."""
        value = self._protected.get(key)
        return self._probation.get(key) if value is None else value

    def hit(self, key: bytes) -> V | None:
        """The entry, recorded as used: promoted to protected, or made most recent there."""
        value = self._protected.get(key)
        if value is not None:
            self._protected.move_to_end(key)
            return value
        value = self._probation.pop(key, None)
        if value is None:
            return None
        if self.protected_capacity == 0:
            self._probation[key] = value
            return value
        self._protected[key] = value
        if len(self._protected) > self.protected_capacity:
            # Demoted, not evicted: it stays cached, first in line if newcomers need room.
            old_key, old = self._protected.popitem(last=False)
            self._probation[old_key] = old
        return value

    def put(self, key: bytes, value: V) -> list[V]:
        """Insert ``value`` (on probation); returns what left the cache for it."""
        out: list[V] = []
        old = self.pop(key)
        if old is not None and old is not value:
            out.append(old)
        self._probation[key] = value
        self._by_tenant.setdefault(value.tenant, {})[key] = None
        while len(self) > self.capacity:
            segment = self._probation if self._probation else self._protected
            victim_key, victim = segment.popitem(last=False)
            self._unindex(victim_key, victim)
            out.append(victim)
        return out

    def pop(self, key: bytes) -> V | None:
        value = self._probation.pop(key, None)
        if value is None:
            value = self._protected.pop(key, None)
        if value is not None:
            self._unindex(key, value)
        return value

    def pop_tenant(self, tenant: str) -> list[V]:
        """Remove every entry of ``tenant``: O(entries of that tenant)."""
        keys = self._by_tenant.pop(tenant, None)
        if not keys:
            return []
        out: list[V] = []
        for key in keys:
            value = self._probation.pop(key, None)
            if value is None:
                value = self._protected.pop(key, None)
            if value is not None:
                out.append(value)
        return out

    def clear(self) -> list[V]:
        out = [*self._probation.values(), *self._protected.values()]
        self._probation.clear()
        self._protected.clear()
        self._by_tenant.clear()
        return out

    def values(self) -> list[V]:
        """Every entry, copied."""
        return [*self._probation.values(), *self._protected.values()]

    def snapshot(self) -> list[tuple[bytes, V]]:
        """Every entry, copied (for a sweep that filters outside the lock)."""
        return [*self._probation.items(), *self._protected.items()]

    def _unindex(self, key: bytes, value: V) -> None:
        keys = self._by_tenant.get(value.tenant)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._by_tenant[value.tenant]
