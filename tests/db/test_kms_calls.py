"""KMS round-trips: what a flush and a load cost, counted at the fake KMS and checked in raw rows.

One flush of many rows shares one data key (one wrap); rows sharing a data key share an
envelope (the companion's bytes after the row id), so the raw companions show how many data
keys there are, independently of the KMS counters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, Integer, String, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_cmk import (
    CMK,
    EncryptedMixin,
    EncryptedType,
    TenantMismatchError,
    cross_tenant_context,
    tenant_context,
)
from sqlalchemy_cmk.testing import FakeKeyProvider, MemoryAuditSink


class Base(DeclarativeBase):
    pass


class Record(EncryptedMixin, Base):
    __tablename__ = "kc_records"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(50))
    value: Mapped[str | None] = mapped_column(EncryptedType(String))
    extra: Mapped[int | None] = mapped_column(EncryptedType(Integer))


ACME, GLOBEX = "acme", "globex"
ROW_ID = slice(1, 17)
ENVELOPE = slice(17, None)


@dataclass
class Env:
    engine: Engine
    session: sessionmaker[Session]
    cmk: CMK
    kms: FakeKeyProvider
    audit: MemoryAuditSink

    def calls(self) -> tuple[int, int]:
        return self.kms.wrap_count, self.kms.unwrap_count

    def write(self, tenant: str, values: list[str], extra: int | None = None) -> None:
        with tenant_context(tenant), self.session() as s:
            s.add_all(Record(tenant_id=tenant, value=v, extra=extra) for v in values)
            s.commit()

    def read(self, tenant: str) -> list[str | None]:
        with tenant_context(tenant), self.session() as s:
            stmt = select(Record).where(Record.tenant_id == tenant).order_by(Record.id)
            return [r.value for r in s.scalars(stmt)]

    def companions(self) -> list[bytes]:
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT cmk_edek FROM kc_records ORDER BY id"))
            return [bytes(e) for (e,) in rows]

    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(Record.__table__)).scalar_one()


@pytest.fixture
def make_env(engine: Engine) -> Iterator[Callable[..., Env]]:
    Base.metadata.create_all(engine)
    installed: list[tuple[CMK, sessionmaker[Session]]] = []

    def make(tenants: tuple[str, ...] = (ACME, GLOBEX), **options: Any) -> Env:
        # These tests count what caching saves; the unwrap that verifies each new write key
        # (verify_write_keys, on by default) is counted on its own below.
        options.setdefault("verify_write_keys", False)
        kms = FakeKeyProvider()
        audit = MemoryAuditSink()
        cmk = CMK(
            kms, tenant_keys={t: f"fake://{t}" for t in tenants}, audit_sinks=[audit], **options
        )
        factory = sessionmaker(engine)
        cmk.install(factory)
        installed.append((cmk, factory))
        return Env(engine, factory, cmk, kms, audit)

    yield make
    for cmk, factory in installed:
        cmk.uninstall(factory)


@pytest.fixture
def env(make_env: Callable[..., Env]) -> Env:
    return make_env()


VALUES = [f"pt:{i:04d}" for i in range(1000)]


def test_one_flush_of_1000_rows_costs_one_wrap(env: Env) -> None:
    env.write(ACME, VALUES)
    assert env.calls() == (1, 0)


def test_verifying_a_new_write_key_costs_one_unwrap_and_saves_the_first_load(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(verify_write_keys=True)
    env.write(ACME, VALUES)
    assert env.calls() == (1, 1)  # the wrap, and the unwrap that proves it
    assert env.read(ACME) == VALUES
    assert env.calls() == (1, 1)  # the proven key serves the load from the cache
    companions = env.companions()
    assert len(companions) == 1000
    assert len({c[ENVELOPE] for c in companions}) == 1  # one data key...
    assert len({c[ROW_ID] for c in companions}) == 1000  # ...but every row its own row id

    # A second flush within the write window reuses the key: no wrap at all.
    env.kms.reset_counts()
    env.write(ACME, ["pt:late-1", "pt:late-2"])
    assert env.calls() == (0, 0)
    assert len({c[ENVELOPE] for c in env.companions()}) == 1


def test_loading_1000_rows_costs_one_unwrap_cold_and_none_warm(env: Env) -> None:
    env.write(ACME, VALUES)
    env.kms.reset_counts()
    assert env.read(ACME) == VALUES  # the write key is also a read key: warm already
    assert env.calls() == (0, 0)

    assert env.cmk.forget_tenant() >= 1
    env.kms.reset_counts()
    assert env.read(ACME) == VALUES
    assert env.calls() == (0, 1)

    env.kms.reset_counts()
    assert env.read(ACME) == VALUES
    with tenant_context(ACME), env.session() as s:
        assert s.get(Record, 500).value == VALUES[499]  # type: ignore[union-attr]
    assert env.calls() == (0, 0)


def test_a_load_unwraps_each_distinct_data_key_once(env: Env) -> None:
    for window in range(3):
        env.write(ACME, [f"pt:w{window}-{i}" for i in range(50)])
        env.cmk.forget_tenant()  # ends the write window: the next flush wraps a new key
    assert env.calls() == (3, 0)
    assert len({c[ENVELOPE] for c in env.companions()}) == 3
    env.kms.reset_counts()
    assert len(env.read(ACME)) == 150
    assert env.calls() == (0, 3)


def test_updates_keep_the_row_key_and_cost_no_wrap(env: Env) -> None:
    env.write(ACME, VALUES[:10])
    before = env.companions()
    env.kms.reset_counts()
    with tenant_context(ACME), env.session() as s:
        rows = s.scalars(select(Record).order_by(Record.id)).all()
        env.cmk.forget_tenant()  # the update must unwrap the rows' (shared) key once
        for r in rows:
            r.value = r.value + "-new"  # type: ignore[operator]
        s.commit()
    assert env.calls() == (0, 1)
    assert env.companions() == before  # same row ids, same envelope
    assert env.read(ACME) == [v + "-new" for v in VALUES[:10]]


@pytest.mark.parametrize(
    ("batch", "per_key"),
    [
        (1, [5, 10, 10]),
        (4, [8, 8, 9]),  # 4+4, then 4 more would be 12 > 10: a new key; the last 1 fits
        (5, [5, 10, 10]),
        (6, [6, 6, 6, 7]),  # a flush is never split across keys, so 6+6 needs two
        (10, [5, 10, 10]),
    ],
)
def test_write_key_max_uses_bounds_values_per_key(
    make_env: Callable[..., Env], batch: int, per_key: list[int]
) -> None:
    env = make_env(write_key_max_uses=10)
    values = [f"pt:{i}" for i in range(25)]
    for start in range(0, 25, batch):
        env.write(ACME, values[start : start + batch])
    assert env.calls() == (len(per_key), 0)
    envelopes = Counter(c[ENVELOPE] for c in env.companions())
    assert sorted(envelopes.values()) == per_key
    assert env.read(ACME) == values


def test_write_key_uses_count_values_not_rows(make_env: Callable[..., Env]) -> None:
    env = make_env(write_key_max_uses=10)
    env.write(ACME, [f"pt:{i}" for i in range(5)], extra=7)  # 5 rows x 2 values = 10 uses
    assert env.calls() == (1, 0)
    env.write(ACME, ["pt:5"], extra=7)  # 2 more: a new key
    assert env.calls() == (2, 0)
    env.write(ACME, [f"pt:{i}" for i in range(6, 14)])  # 8 rows, NULL extra: 8 uses, fits
    assert env.calls() == (2, 0)


def test_one_flush_larger_than_write_key_max_uses_is_split_over_keys(
    make_env: Callable[..., Env],
) -> None:
    # 25 values with at most 10 per key: one flush, three wraps, 10 + 10 + 5 values per key.
    env = make_env(write_key_max_uses=10)
    values = [f"pt:{i}" for i in range(25)]
    env.write(ACME, values)
    assert env.calls() == (3, 0)
    envelopes = Counter(c[ENVELOPE] for c in env.companions())
    assert sorted(envelopes.values()) == [5, 10, 10]
    assert env.read(ACME) == values


def test_tenant_mismatch_is_raised_before_any_unwrap(env: Env) -> None:
    env.write(ACME, VALUES[:20])
    env.cmk.forget_tenant()
    env.kms.reset_counts()
    with tenant_context(GLOBEX), env.session() as s, pytest.raises(TenantMismatchError) as info:
        s.scalars(select(Record)).all()  # forgot WHERE tenant_id = ...
    assert (info.value.tenant, info.value.row_tenant) == (GLOBEX, ACME)
    assert env.calls() == (0, 0)
    # The refusal is the context tenant's event; the row's tenant only in row_tenant (issue 12).
    assert [(e.outcome, e.tenant, e.row_tenant) for e in env.audit.of("decrypt")] == [
        ("mismatch", GLOBEX, ACME)
    ]

    with cross_tenant_context(actor="job"), env.session() as s:
        assert [r.value for r in s.scalars(select(Record).order_by(Record.id))] == VALUES[:20]
    assert env.calls() == (0, 1)


def test_cache_ttl_zero_asks_the_kms_every_time(make_env: Callable[..., Env]) -> None:
    env = make_env(cache_ttl=0)
    env.write(ACME, VALUES[:10])
    env.write(ACME, VALUES[10:20])
    assert env.calls() == (2, 0)
    assert len({c[ENVELOPE] for c in env.companions()}) == 2
    env.kms.reset_counts()
    assert env.read(ACME) == VALUES[:20]
    assert env.read(ACME) == VALUES[:20]
    assert env.calls() == (0, 4)  # two keys, two loads, nothing kept


def test_cache_max_entries_evicts_least_recently_used(make_env: Callable[..., Env]) -> None:
    tenants = ("t0", "t1", "t2")
    env = make_env(tenants, cache_max_entries=2)
    for t in tenants:
        env.write(t, [f"pt:{t}"])
    env.cmk.forget_tenant()
    env.kms.reset_counts()
    for t in tenants:
        assert env.read(t) == [f"pt:{t}"]
    assert env.calls() == (0, 3)
    assert env.read("t2") == ["pt:t2"] and env.read("t1") == ["pt:t1"]
    assert env.calls() == (0, 3)  # the two most recent are cached
    assert env.read("t0") == ["pt:t0"]
    assert env.calls() == (0, 4)  # t0 was evicted
