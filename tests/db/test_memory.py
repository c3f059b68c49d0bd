"""Bounded memory: the data keys held stay within the cache settings for any number of tenants,
and keys that expire or are evicted are zeroed.

The objects are counted, not RSS: a live ``DataKey`` is what holds key material, so counting the
live ones (with the garbage collector's view of the heap) is the exact measure, and it is
stable where RSS is not. The clock is the ``clock=`` seam of :class:`CMK`, advanced by hand, so
hours of cache time pass in seconds.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_cmk import CMK, EncryptedMixin, EncryptedType, tenant_context
from sqlalchemy_cmk._keys import DataKey
from sqlalchemy_cmk.testing import FakeKeyProvider

MAX_ENTRIES = 100
TTL = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def live_keys() -> list[DataKey]:
    """Every DataKey object in the process whose material is not zeroed."""
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is DataKey and not o.wiped]


def all_keys() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is DataKey)


def test_ten_thousand_tenants_hold_a_bounded_number_of_keys() -> None:
    tenants = [f"tenant-{i:05d}" for i in range(10_000)]
    clock = Clock()
    cmk = CMK(
        FakeKeyProvider(),
        tenant_keys={t: f"fake://{t}" for t in tenants},
        cache_max_entries=MAX_ENTRIES,
        cache_ttl=TTL,
        audit_sinks=[],
        clock=clock,
    )
    before = {id(k) for k in live_keys()}
    early: list[bytearray] = []  # the material of the first tenants' keys, to see it zeroed
    peak = 0
    for i, tenant in enumerate(tenants):
        with tenant_context(tenant):
            doc = cmk.encrypt_document({"f": b"value"})  # a write key (one wrap, one verify)
            assert cmk.decrypt_document(doc) == {"f": b"value"}  # the read cache
        if i == 19:
            early = [k.material for k in live_keys() if k.tenant in tenants[:20]]
        clock.now += 0.02  # 10,000 tenants: 200 s of cache time, more than three TTLs
        if i % 1000 == 999:
            held = [k for k in live_keys() if id(k) not in before]
            peak = max(peak, len(held))
            # At most cache_max_entries read keys and as many write keys, shared or not.
            assert len(held) <= 2 * MAX_ENTRIES, f"{len(held)} live keys after {i + 1} tenants"
    assert peak > MAX_ENTRIES // 2, "the caches were used"
    assert all_keys() <= 2 * MAX_ENTRIES + len(before)  # no wiped husks pile up either
    assert len(early) == 20 and all(m == bytearray(len(m)) for m in early), "evicted: zeroed"

    # Time passes with no traffic; the next call sweeps everything that expired, and zeroes it.
    held = [k for k in live_keys() if id(k) not in before]
    clock.now += TTL
    with tenant_context(tenants[0]):
        cmk.encrypt_document({"f": b"value"})
    assert [k.tenant for k in live_keys() if id(k) not in before] == [tenants[0]]
    assert all(k.wiped and k.material == bytearray(32) for k in held)


# -- the same through the ORM, on each dialect (fewer tenants: each is a transaction) ------------


class Base(DeclarativeBase):
    pass


class Note(EncryptedMixin, Base):
    __tablename__ = "memory_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(50))
    body: Mapped[str] = mapped_column(EncryptedType(String))


@pytest.fixture
def tables(engine: Engine) -> Iterator[Engine]:
    Base.metadata.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)


def test_orm_writes_and_loads_for_many_tenants_stay_bounded(tables: Engine) -> None:
    tenants = [f"orm-{i:03d}" for i in range(120)]
    clock = Clock()
    cmk = CMK(
        FakeKeyProvider(),
        tenant_keys={t: f"fake://{t}" for t in tenants},
        cache_max_entries=10,
        cache_ttl=TTL,
        audit_sinks=[],
        clock=clock,
    )
    maker = sessionmaker(tables)
    cmk.install(maker)
    before = {id(k) for k in live_keys()}
    try:
        for tenant in tenants:
            with tenant_context(tenant), maker() as s:
                s.add(Note(tenant_id=tenant, body=f"note of {tenant}"))
                s.commit()
                loaded = s.scalars(select(Note).where(Note.tenant_id == tenant)).one()
                assert loaded.body == f"note of {tenant}"
            clock.now += 2.0
            if tenants.index(tenant) % 20 == 19:
                assert len([k for k in live_keys() if id(k) not in before]) <= 2 * 10
    finally:
        cmk.uninstall(maker)
    cmk.forget_tenant()
    assert [k for k in live_keys() if id(k) not in before] == []
