"""Leased tenant keys (``CMK(lease_period=...)``, stored format version 2), end to end on SQLite.

The provider is the real LocalKeyProvider behind a wrapper that counts its calls: what the
tenant's KMS would see.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from sqlalchemy import Engine, Integer, String, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_cmk import (
    CMK,
    ConfigurationError,
    DecryptionError,
    EncryptedMixin,
    EncryptedType,
    KeyAccessDeniedError,
    TenantRevokedError,
    cross_tenant_context,
    tenant_context,
)
from sqlalchemy_cmk import _format as fmt
from sqlalchemy_cmk.providers.local import LocalKeyProvider
from sqlalchemy_cmk.testing import MemoryAuditSink

ACME, GLOBEX = "acme", "globex"
SPLIT = 1 + fmt.ROW_ID_SIZE


class Counting:
    """The real local KMS, counting the calls it answers."""

    scheme = "local"

    def __init__(self, inner: LocalKeyProvider) -> None:
        self.inner = inner
        self.wraps = self.unwraps = 0

    def wrap_key(self, key_ref: str, data_key: bytes, context: Mapping[str, str]) -> bytes:
        self.wraps += 1
        return self.inner.wrap_key(key_ref, data_key, context)

    def unwrap_key(self, key_ref: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        self.unwraps += 1
        return self.inner.unwrap_key(key_ref, wrapped, context)

    @property
    def calls(self) -> int:
        return self.wraps + self.unwraps


class Base(DeclarativeBase):
    pass


class Patient(EncryptedMixin, Base):
    __tablename__ = "lease_patients"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ssn: Mapped[str | None] = mapped_column(EncryptedType(String()))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Env:
    def __init__(self, engine: Engine, kms: Counting, clock: Clock, **options: Any) -> None:
        self.engine, self.kms, self.clock = engine, kms, clock
        self.sink = MemoryAuditSink()
        options.setdefault("lease_period", 100.0)
        options.setdefault("cache_max_entries", 5000)
        self.cmk = CMK(
            kms,  # type: ignore[arg-type]
            tenant_keys={ACME: ["local://acme", "local://acme2"], GLOBEX: "local://globex"},
            cache_ttl=120.0,
            audit_sinks=[self.sink],
            clock=clock,
            **options,
        )
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.cmk.install(self.sessions)

    def write(self, tenant: str, ids: range, windows: int = 1, step: float = 0.06) -> None:
        """Rows ``ids`` of ``tenant``, spread over ``windows`` write windows."""
        per = math.ceil(len(ids) / windows)
        with tenant_context(tenant), self.sessions() as s:
            for w in range(windows):
                s.add_all(Patient(id=i, ssn=f"ssn-{i}") for i in ids[w * per : (w + 1) * per])
                s.flush()
                self.clock.now += step
            s.commit()

    def read(self, tenant: str) -> dict[int, str | None]:
        with tenant_context(tenant), self.sessions() as s:
            return {p.id: p.ssn for p in s.scalars(select(Patient))}

    def companions(self) -> dict[int, bytes]:
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT id, cmk_edek FROM lease_patients")).all()
        return {i: bytes(c) for i, c in rows}

    def set_companion(self, row: int, companion: bytes) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                text("UPDATE lease_patients SET cmk_edek = :c WHERE id = :i"),
                {"c": companion, "i": row},
            )


@pytest.fixture
def local() -> LocalKeyProvider:
    return LocalKeyProvider({n: os.urandom(32) for n in ("acme", "acme2", "globex")})


@pytest.fixture
def make_env(local: LocalKeyProvider) -> Iterator[Callable[..., Env]]:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    kms, clock = Counting(local), Clock()
    yield lambda **options: Env(engine, kms, clock, **options)
    engine.dispose()


@pytest.fixture
def env(make_env: Callable[..., Env]) -> Env:
    return make_env(write_key_max_age=0.05)


def test_cold_load_of_10000_rows_in_1000_write_windows_costs_one_kms_call(env: Env) -> None:
    env.write(ACME, range(10_000), windows=1000)
    assert (env.kms.wraps, env.kms.unwraps) == (1, 1)  # one lease: its wrap and verify unwrap
    envelopes = {c[SPLIT:] for c in env.companions().values()}
    assert len(envelopes) == 1000  # 1,000 data keys, all under one lease
    assert {fmt.split_leased(e)[0] for e in envelopes} == {fmt.split_leased(min(envelopes))[0]}
    env.cmk.forget_tenant(ACME)
    before = env.kms.calls
    rows = env.read(ACME)
    assert len(rows) == 10_000 and rows[4242] == "ssn-4242"
    assert env.kms.calls - before <= 2  # the target; today (version 1): 1,000
    assert env.kms.calls - before == 1
    assert env.read(ACME)[7] == "ssn-7" and env.kms.calls - before == 1  # warm: none


def test_version_1_costs_an_unwrap_per_write_window(make_env: Callable[..., Env]) -> None:
    env = make_env(lease_period=None, write_key_max_age=0.05)
    env.write(ACME, range(1000), windows=100)
    assert env.kms.wraps == 100
    env.cmk.forget_tenant()
    before = env.kms.unwraps
    assert len(env.read(ACME)) == 1000
    assert env.kms.unwraps - before == 100


def test_rows_are_version_2_and_hold_no_plaintext(env: Env) -> None:
    env.write(ACME, range(3))
    with env.engine.connect() as conn:
        raw = conn.execute(text("SELECT cmk_edek, ssn FROM lease_patients")).all()
    for companion, value in raw:
        assert companion[0] == 2 and fmt.is_leased(companion[SPLIT:])
        assert b"ssn-" not in bytes(value) and b"ssn-" not in bytes(companion)
        assert fmt.parse_envelope(companion[SPLIT:]).tenant == ACME


def test_a_new_lease_after_lease_period_and_a_new_data_key_per_window(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(lease_period=1.0, write_key_max_age=0.5)
    env.write(ACME, range(10), windows=10, step=0.3)  # 3 s: three or four leases
    leases = {fmt.split_leased(c[SPLIT:])[0] for c in env.companions().values()}
    assert env.kms.wraps == len(leases) and 3 <= len(leases) <= 4
    assert len({c[SPLIT:] for c in env.companions().values()}) >= 5  # 0.5 s windows
    env.cmk.forget_tenant()
    before = env.kms.unwraps
    assert len(env.read(ACME)) == 10
    assert env.kms.unwraps - before == len(leases)


def test_versions_1_and_2_mixed_in_one_table_and_one_load(make_env: Callable[..., Env]) -> None:
    old = make_env(lease_period=None)
    old.write(ACME, range(0, 50))
    new = make_env()
    new.write(ACME, range(50, 100))
    assert {c[0] for c in new.companions().values()} == {1, 2}
    for reader in (old, new):  # the release reads both, whichever it writes
        reader.cmk.forget_tenant()
        assert reader.read(ACME) == {i: f"ssn-{i}" for i in range(100)}
    with tenant_context(ACME), new.sessions() as s:  # an update keeps each row's own format
        for p in s.scalars(select(Patient).where(Patient.id.in_([3, 77]))):
            p.ssn = f"new-{p.id}"
        s.commit()
    comps = new.companions()
    assert (comps[3][0], comps[77][0]) == (1, 2)
    assert old.read(ACME)[3] == "new-3" and old.read(ACME)[77] == "new-77"


def test_forget_and_revoke_stop_reads_and_writes(env: Env) -> None:
    env.write(ACME, range(10))
    env.read(ACME)
    before = env.kms.calls
    env.cmk.forget_tenant(ACME)  # drops the lease too: the next read and write ask the KMS
    env.read(ACME)
    assert env.kms.unwraps > before - env.kms.wraps
    wraps = env.kms.wraps
    env.write(ACME, range(10, 11))
    assert env.kms.wraps == wraps + 1  # a new lease, not the forgotten one
    env.cmk.revoke(ACME)
    with pytest.raises(TenantRevokedError):
        env.read(ACME)
    with pytest.raises(TenantRevokedError):
        env.write(ACME, range(20, 21))


def test_a_revoked_kms_key_stops_the_lease_unwrap(env: Env, local: LocalKeyProvider) -> None:
    env.write(ACME, range(10))
    local.revoke("acme")
    env.cmk.forget_tenant(ACME)
    with pytest.raises(KeyAccessDeniedError):
        env.read(ACME)
    with pytest.raises(KeyAccessDeniedError):
        env.write(ACME, range(10, 11))
    local.restore("acme")
    assert env.read(ACME)[3] == "ssn-3"


def test_cached_lease_bounded_by_cache_ttl(env: Env, local: LocalKeyProvider) -> None:
    env.write(ACME, range(10))
    env.read(ACME)
    local.revoke("acme")
    env.read(ACME)  # within cache_ttl: served from the cache, as for version 1
    env.clock.now += 121
    with pytest.raises(KeyAccessDeniedError):
        env.read(ACME)  # the lease and every data key under it expired with it
    with pytest.raises(KeyAccessDeniedError):
        env.write(ACME, range(10, 11))


def _tamper(env: Env, row: int, change: Callable[[bytes], bytes]) -> None:
    env.set_companion(row, change(env.companions()[row]))
    env.cmk.forget_tenant()


def test_a_tampered_local_wrap_raises(env: Env) -> None:
    env.write(ACME, range(3))
    _tamper(env, 1, lambda c: c[:-1] + bytes([c[-1] ^ 1]))
    with pytest.raises(DecryptionError) as info:
        env.read(ACME)
    assert "ssn-" not in str(info.value)


def test_a_lease_envelope_from_another_lease_raises(make_env: Callable[..., Env]) -> None:
    env = make_env(lease_period=1.0)
    env.write(ACME, range(1))
    env.clock.now += 2  # a new lease
    env.write(ACME, range(1, 2))
    comps = env.companions()
    lease_a, _ = fmt.split_leased(comps[0][SPLIT:])
    lease_b, local_b = fmt.split_leased(comps[1][SPLIT:])
    assert lease_a != lease_b
    env.set_companion(1, comps[1][:SPLIT] + fmt.encode_leased(lease_a, local_b))
    env.cmk.forget_tenant()
    with pytest.raises(DecryptionError):
        env.read(ACME)


def test_a_lease_envelope_from_another_tenant_raises(env: Env) -> None:
    env.write(ACME, range(1))
    env.write(GLOBEX, range(1, 2))
    comps = env.companions()
    _, local_acme = fmt.split_leased(comps[0][SPLIT:])
    lease_globex, _ = fmt.split_leased(comps[1][SPLIT:])
    env.set_companion(0, comps[0][:SPLIT] + fmt.encode_leased(lease_globex, local_acme))
    env.cmk.forget_tenant()
    with (
        cross_tenant_context(actor="test"),
        env.sessions() as s,
        pytest.raises(DecryptionError),
    ):
        s.scalars(select(Patient)).all()


def test_a_version_byte_not_matching_the_envelope_raises(env: Env) -> None:
    env.write(ACME, range(1))
    _tamper(env, 0, lambda c: b"\x01" + c[1:])
    with pytest.raises(DecryptionError):
        env.read(ACME)


def test_a_failed_value_keeps_a_fresh_lease_out_of_the_cache(env: Env) -> None:
    env.write(ACME, range(2))
    with env.engine.begin() as conn:
        conn.execute(text("UPDATE lease_patients SET ssn = :v WHERE id = 0"), {"v": b"\x01" * 40})
    env.cmk.forget_tenant()
    before = env.kms.unwraps
    with pytest.raises(DecryptionError):
        env.read(ACME)
    with env.engine.begin() as conn:
        conn.execute(text("DELETE FROM lease_patients WHERE id = 0"))
    assert env.read(ACME) == {1: "ssn-1"}
    assert env.kms.unwraps - before == 2  # the unproven lease was not cached


def test_audit_records_a_lease_unwrap_and_the_decrypts(env: Env) -> None:
    env.write(ACME, range(100), windows=10)
    env.cmk.forget_tenant()
    env.sink.events.clear()
    env.read(ACME)
    unwraps = env.sink.of("unwrap")
    assert [(e.tenant, e.purpose, e.outcome) for e in unwraps] == [(ACME, "lease", "ok")]
    decrypts = env.sink.of("decrypt")
    assert sum(e.rows or 0 for e in decrypts) == 100


def test_rewrap_moves_the_lease_and_keeps_the_local_wraps(env: Env) -> None:
    env.write(ACME, range(20), windows=10)
    envelopes = sorted({c[SPLIT:] for c in env.companions().values()})
    km = env.cmk._keys
    km._registry = _Swapped(km._registry, ACME, ["local://acme2", "local://acme"])
    calls = env.kms.calls
    new = [km.rewrap(e, None) for e in envelopes]
    assert env.kms.calls - calls == 3  # one verified round trip for the one lease
    for old, moved in zip(envelopes, new, strict=True):
        assert fmt.split_leased(old)[1] == fmt.split_leased(moved)[1]
        assert fmt.parse_envelope(moved).key_ref == "local://acme2"
    keys = km.read_keys(new, None)
    olds = km.read_keys(envelopes, None)
    for old, moved in zip(envelopes, new, strict=True):
        assert keys[moved].material == olds[old].material


class _Swapped:
    """A registry that gives one tenant other keys (its primary first)."""

    def __init__(self, inner: Any, tenant: str, refs: list[str]) -> None:
        from sqlalchemy_cmk.registry import TenantKeys

        self.inner, self.tenant = inner, tenant
        self.keys = TenantKeys(refs[0], frozenset(refs))

    def tenant_keys(self, tenant: str) -> Any:
        return self.keys if tenant == self.tenant else self.inner.tenant_keys(tenant)


@pytest.mark.parametrize("period", [0, -1.0, math.nan, math.inf, 121.0, "60"])
def test_lease_period_must_be_finite_positive_and_within_cache_ttl(
    local: LocalKeyProvider, period: Any
) -> None:
    with pytest.raises(ConfigurationError, match="lease_period"):
        CMK(local, tenant_keys={ACME: "local://acme"}, cache_ttl=120.0, lease_period=period)


@pytest.mark.parametrize("mask", [0x01, 0x80])
def test_flipping_any_byte_of_a_version_2_companion_fails_closed(env: Env, mask: int) -> None:
    from sqlalchemy_cmk import CMKError

    env.write(ACME, range(1))
    original = env.companions()[0]
    for pos in range(len(original)):
        tampered = original[:pos] + bytes([original[pos] ^ mask]) + original[pos + 1 :]
        env.set_companion(0, tampered)
        env.cmk.forget_tenant()
        with pytest.raises(CMKError) as info:
            env.read(ACME)
        assert "ssn-" not in str(info.value), pos
    env.set_companion(0, original)
    assert env.read(ACME) == {0: "ssn-0"}


def test_a_leased_envelope_is_never_a_search_root_key(env: Env) -> None:
    from sqlalchemy_cmk._search import _check_owner

    env.write(ACME, range(1))
    with pytest.raises(DecryptionError):
        _check_owner(env.companions()[0][SPLIT:], ACME)


def test_a_forget_during_the_lease_wrap_keeps_that_lease_out(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrap = env.kms.wrap_key

    def forgetting_wrap(key_ref: str, data_key: bytes, context: Mapping[str, str]) -> bytes:
        env.cmk.forget_tenant(ACME)  # e.g. a revocation arriving while the KMS answers
        return wrap(key_ref, data_key, context)

    monkeypatch.setattr(env.kms, "wrap_key", forgetting_wrap)
    env.write(ACME, range(1))  # the flush that began before the forget still writes
    monkeypatch.setattr(env.kms, "wrap_key", wrap)
    wraps = env.kms.wraps
    env.clock.now += 1  # a new write window: the forgotten lease must not serve it
    env.write(ACME, range(1, 2))
    assert env.kms.wraps == wraps + 1
    assert env.read(ACME) == {0: "ssn-0", 1: "ssn-1"}


def test_capacity_counts_tenants_not_data_keys(make_env: Callable[..., Env]) -> None:
    """A cache smaller than the data keys in use: a tenant's lease is neither re-wrapped per
    data key on writes nor lost to them on reads (it was: one KMS wrap and verify per data key,
    as in version 1, once the cache held fewer than about two entries per tenant)."""
    env = make_env(write_key_max_age=0.05, cache_max_entries=3)
    ids = iter(range(10_000))
    for _ in range(30):  # two tenants' writes interleaved, a new data key each time
        for tenant in (ACME, GLOBEX):
            env.write(tenant, range(next(ids), next(ids) + 1))
    assert (env.kms.wraps, env.kms.unwraps) == (2, 2)  # one lease each: wrap, verify unwrap
    before = env.kms.calls
    for _ in range(3):  # 60 data keys per load, capacity 3: the writer's leases serve them
        with cross_tenant_context(actor="test"), env.sessions() as s:
            assert len(s.scalars(select(Patient)).all()) == 120
    assert env.kms.calls == before


def test_a_write_lease_evicted_from_the_read_cache_still_obeys_forget_and_ttl(
    make_env: Callable[..., Env], local: LocalKeyProvider
) -> None:
    env = make_env(write_key_max_age=0.05, cache_max_entries=2)
    env.write(ACME, range(40), windows=20)
    env.cmk.forget_tenant(ACME)
    local.revoke("acme")
    with pytest.raises(KeyAccessDeniedError):
        env.read(ACME)
    with pytest.raises(KeyAccessDeniedError):
        env.write(ACME, range(100, 101))
    local.restore("acme")
    env.write(ACME, range(200, 240), windows=20)
    env.clock.now += 121  # past cache_ttl: the write lease is no longer used, even if held
    local.revoke("acme")
    with pytest.raises(KeyAccessDeniedError):
        env.read(ACME)
    with pytest.raises(KeyAccessDeniedError):
        env.write(ACME, range(300, 301))
