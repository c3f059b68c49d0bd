"""KeyManager (_keys.py): caches, write-key reuse, retries, concurrency, forgetting."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Mapping
from typing import Any

import pytest

from sqlalchemy_cmk import (
    CMK,
    CMKError,
    ConfigurationError,
    DecryptionError,
    KeyAccessDeniedError,
    KeyAccessError,
    KeyNotFoundError,
    KMSUnavailableError,
    TenantNotConfiguredError,
    tenant_context,
)
from sqlalchemy_cmk._keys import CachePolicy, DataKey, KeyManager, RetryPolicy
from sqlalchemy_cmk.registry import TenantKeys
from sqlalchemy_cmk.testing import FakeKeyProvider, MemoryAuditSink

ZERO = bytearray(32)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def manager(
    provider: object,
    *,
    clock: Clock | None = None,
    ttl: float = 60.0,
    max_entries: int = 1000,
    max_age: float | None = None,
    max_uses: int = 2**20,
    attempts: int = 3,
    deadline: float = 10.0,
    concurrency: int = 8,
    tenants: tuple[str, ...] = ("acme", "globex"),
    verify: bool = False,
    audit: list[Any] | None = None,
) -> KeyManager:
    # verify=False by default: the cache tests count KMS calls, and the verification unwrap of
    # each new write key is tested on its own below.
    scheme = provider.scheme  # type: ignore[attr-defined]
    return KeyManager(
        {scheme: provider},  # type: ignore[dict-item]
        {t: TenantKeys(f"{scheme}://{t}", frozenset({f"{scheme}://{t}"})) for t in tenants},
        CachePolicy(ttl, max_entries, max_age, max_uses),
        RetryPolicy(attempts, 0.0, deadline, concurrency),  # no backoff: no sleeping in tests
        audit or [],
        clock=clock or Clock(),
        verify_write_keys=verify,
    )


def envelopes(provider: FakeKeyProvider, n: int, tenant: str = "acme") -> list[bytes]:
    """n distinct envelopes of ``tenant``, written by another process's key manager."""
    writer = manager(provider, max_uses=1)
    out = [writer.write_key(tenant, 1, None).envelope for _ in range(n)]
    assert len(set(out)) == n
    provider.reset_counts()
    return out


@pytest.fixture
def fake() -> FakeKeyProvider:
    return FakeKeyProvider()


# -- read cache ---------------------------------------------------------------------------------


def test_read_cache_serves_within_ttl_and_refetches_after(fake: FakeKeyProvider):
    (env,) = envelopes(fake, 1)
    clock = Clock()
    km = manager(fake, clock=clock, ttl=10)
    first = km.read_keys([env], None)[env]
    assert fake.unwrap_count == 1
    clock.advance(9.9)
    assert km.read_keys([env, env], None)[env] is first
    assert fake.unwrap_count == 1
    clock.advance(0.1)  # exactly ttl: expired
    second = km.read_keys([env], None)[env]
    assert fake.unwrap_count == 2
    assert second is not first
    assert first.material == ZERO  # the replaced entry was wiped
    assert second.material != ZERO


def test_ttl_zero_disables_caching(fake: FakeKeyProvider):
    (env,) = envelopes(fake, 1)
    km = manager(fake, ttl=0)
    km.read_keys([env], None)
    km.read_keys([env], None)
    assert fake.unwrap_count == 2
    km.write_key("acme", 1, None)
    km.write_key("acme", 1, None)
    assert fake.wrap_count == 2


def test_lru_bound_evicts_and_zeroes_the_oldest(fake: FakeKeyProvider):
    e1, e2, e3 = envelopes(fake, 3)
    km = manager(fake, max_entries=2)
    k1 = km.read_keys([e1], None)[e1]
    k2 = km.read_keys([e2], None)[e2]
    k3 = km.read_keys([e3], None)[e3]
    assert fake.unwrap_count == 3
    assert k1.material == ZERO
    assert k2.material != ZERO and k3.material != ZERO
    km.read_keys([e2, e3], None)
    assert fake.unwrap_count == 3  # still cached
    km.read_keys([e1], None)
    assert fake.unwrap_count == 4  # evicted, so unwrapped again


def test_lru_keeps_the_recently_used(fake: FakeKeyProvider):
    e1, e2, e3 = envelopes(fake, 3)
    km = manager(fake, max_entries=2)
    k1 = km.read_keys([e1], None)[e1]
    k2 = km.read_keys([e2], None)[e2]
    km.read_keys([e1], None)  # e1 is now the most recent
    km.read_keys([e3], None)
    assert k2.material == ZERO and k1.material != ZERO
    fake.reset_counts()
    km.read_keys([e1, e3], None)
    assert fake.unwrap_count == 0


def test_read_keys_unwraps_each_distinct_envelope_once(fake: FakeKeyProvider):
    e1, e2 = envelopes(fake, 2)
    km = manager(fake)
    keys = km.read_keys([e1, e2, e1, e2, e1], None)
    assert set(keys) == {e1, e2}
    assert fake.unwrap_count == 2


def test_write_key_is_readable_from_the_cache(fake: FakeKeyProvider):
    km = manager(fake)
    wk = km.write_key("acme", 1, None)
    assert km.read_keys([wk.envelope], None)[wk.envelope] is wk
    assert fake.unwrap_count == 0


# -- write keys ---------------------------------------------------------------------------------


def test_write_key_reuse_is_bounded_by_uses(fake: FakeKeyProvider):
    km = manager(fake, max_uses=3)
    keys = [km.write_key("acme", 1, None) for _ in range(3)]
    assert keys[0] is keys[1] is keys[2]
    assert fake.wrap_count == 1
    fourth = km.write_key("acme", 1, None)
    assert fourth is not keys[0] and fourth.envelope != keys[0].envelope
    assert fake.wrap_count == 2
    assert km.write_key("acme", 2, None) is fourth  # 1 + 2 = 3 uses
    assert km.write_key("acme", 1, None) is not fourth
    assert fake.wrap_count == 3


def test_batch_larger_than_max_uses_is_refused(fake: FakeKeyProvider):
    km = manager(fake, max_uses=3)
    with pytest.raises(ConfigurationError, match="write_key_max_uses"):
        km.write_key("acme", 4, None)
    assert fake.wrap_count == 0


def test_write_key_reuse_is_bounded_by_age(fake: FakeKeyProvider):
    clock = Clock()
    km = manager(fake, clock=clock, ttl=60, max_age=5)
    first = km.write_key("acme", 1, None)
    clock.advance(4.9)
    assert km.write_key("acme", 1, None) is first
    clock.advance(0.1)
    second = km.write_key("acme", 1, None)
    assert second is not first
    assert fake.wrap_count == 2


def test_write_key_age_defaults_to_ttl(fake: FakeKeyProvider):
    clock = Clock()
    km = manager(fake, clock=clock, ttl=10)
    first = km.write_key("acme", 1, None)
    clock.advance(9.9)
    assert km.write_key("acme", 1, None) is first
    clock.advance(0.1)
    assert km.write_key("acme", 1, None) is not first


def test_write_keys_are_per_tenant(fake: FakeKeyProvider):
    km = manager(fake)
    a, g = km.write_key("acme", 1, None), km.write_key("globex", 1, None)
    assert (a.tenant, g.tenant) == ("acme", "globex")
    assert [c.key_ref for c in fake.calls] == ["fake://acme", "fake://globex"]


def test_write_key_max_age_above_ttl_is_rejected(fake: FakeKeyProvider):
    with pytest.raises(ConfigurationError, match="write_key_max_age must not exceed cache_ttl"):
        CMK(fake, tenant_keys={"acme": "fake://acme"}, cache_ttl=10, write_key_max_age=11)
    CMK(fake, tenant_keys={"acme": "fake://acme"}, cache_ttl=10, write_key_max_age=10)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cache_ttl": -1},
        {"cache_max_entries": 0},
        {"write_key_max_uses": 0},
        {"write_key_max_uses": 2**32 + 1},
        {"retry_attempts": 0},
        {"retry_backoff": -0.1},
        {"kms_deadline": 0},
        {"max_concurrency": 0},
    ],
    ids=lambda k: next(iter(k)),
)
def test_limits_out_of_range_are_rejected(fake: FakeKeyProvider, kwargs: dict[str, float]):
    with pytest.raises(ConfigurationError):
        CMK(fake, tenant_keys={"acme": "fake://acme"}, **kwargs)


def test_unknown_tenant(fake: FakeKeyProvider):
    km = manager(fake)
    with pytest.raises(TenantNotConfiguredError) as info:
        km.write_key("initech", 1, None)
    assert info.value.tenant == "initech"
    assert fake.calls == []


# -- retries ------------------------------------------------------------------------------------


def cmk_for(fake: FakeKeyProvider, **kwargs: object) -> CMK:
    kwargs.setdefault("retry_backoff", 0)
    return CMK(fake, tenant_keys={"acme": "fake://acme"}, audit_sinks=[], **kwargs)  # type: ignore[arg-type]


def test_transient_failures_are_retried(fake: FakeKeyProvider):
    cmk = cmk_for(fake, retry_attempts=3)
    fake.fail_next(2)
    with tenant_context("acme"):
        doc = cmk.encrypt_document({"f": b"x"})
        assert fake.wrap_count == 3
        cmk.forget_tenant()
        fake.reset_counts()
        fake.fail_next(2)
        assert cmk.decrypt_document(doc) == {"f": b"x"}
        assert fake.unwrap_count == 3


def test_retries_are_bounded(fake: FakeKeyProvider):
    cmk = cmk_for(fake, retry_attempts=3)
    fake.fail_next(3)
    with tenant_context("acme"), pytest.raises(KMSUnavailableError) as info:
        cmk.encrypt_document({"f": b"x"})
    assert fake.wrap_count == 3
    err = info.value
    assert (err.tenant, err.key_ref, err.provider) == ("acme", "fake://acme", "fake")
    assert err.retryable is True
    assert isinstance(err.__cause__, KMSUnavailableError)
    assert "3 attempt" in str(err)


def test_one_attempt_means_no_retry(fake: FakeKeyProvider):
    cmk = cmk_for(fake, retry_attempts=1)
    fake.fail_next(1)
    with tenant_context("acme"), pytest.raises(KMSUnavailableError):
        cmk.encrypt_document({"f": b"x"})
    assert fake.wrap_count == 1


class SlowFailingProvider:
    """Each call takes 0.6 s on the injected clock and fails transiently."""

    scheme = "fake"

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls = 0

    def wrap_key(self, key_ref: str, data_key: bytes, context: Mapping[str, str]) -> bytes:
        self.calls += 1
        self.clock.advance(0.6)
        raise KMSUnavailableError("throttled")

    unwrap_key = wrap_key  # type: ignore[assignment]


@pytest.mark.parametrize(("deadline", "calls"), [(1.0, 2), (2.0, 4), (100.0, 10)])
def test_deadline_bounds_retries(deadline: float, calls: int):
    clock = Clock()
    provider = SlowFailingProvider(clock)
    km = manager(provider, clock=clock, attempts=10, deadline=deadline)
    with pytest.raises(KMSUnavailableError):
        km.write_key("acme", 1, None)
    assert provider.calls == calls


@pytest.mark.parametrize(
    "error",
    [
        KeyAccessDeniedError("no"),
        KeyNotFoundError("no such key"),
        DecryptionError("bad wrapped key"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_permanent_errors_are_not_retried(fake: FakeKeyProvider, error: Exception):
    cmk = cmk_for(fake, retry_attempts=5)
    fake.fail_next(1, error=error)  # type: ignore[arg-type]
    with tenant_context("acme"), pytest.raises(type(error)) as info:
        cmk.encrypt_document({"f": b"x"})
    assert fake.wrap_count == 1
    assert info.value.tenant == "acme"  # filled in when the provider did not say


def test_denied_key_is_not_retried(fake: FakeKeyProvider):
    cmk = cmk_for(fake, retry_attempts=5)
    fake.deny("fake://acme")
    with tenant_context("acme"), pytest.raises(KeyAccessDeniedError):
        cmk.encrypt_document({"f": b"x"})
    assert fake.wrap_count == 1


def test_non_retryable_unavailable_is_not_retried(fake: FakeKeyProvider):
    cmk = cmk_for(fake, retry_attempts=5)
    error = KMSUnavailableError("quota exhausted for the day")
    error.retryable = False
    fake.fail_next(1, error=error)
    with tenant_context("acme"), pytest.raises(KMSUnavailableError):
        cmk.encrypt_document({"f": b"x"})
    assert fake.wrap_count == 1


class LeakyProvider:
    """A provider that lets an unmapped SDK error escape."""

    scheme = "fake"

    def __init__(self) -> None:
        self.calls = 0

    def wrap_key(self, key_ref: str, data_key: bytes, context: Mapping[str, str]) -> bytes:
        self.calls += 1
        raise RuntimeError("sdk exploded; token=hunter2")

    unwrap_key = wrap_key  # type: ignore[assignment]


def test_unmapped_provider_error_surfaces_as_key_access_error():
    provider = LeakyProvider()
    cmk = CMK(provider, tenant_keys={"acme": "fake://acme"}, audit_sinks=[])  # type: ignore[arg-type]
    with tenant_context("acme"), pytest.raises(KeyAccessError) as info:
        cmk.encrypt_document({"f": b"x"})
    err = info.value
    assert type(err) is KeyAccessError
    assert isinstance(err.__cause__, RuntimeError)
    assert (err.tenant, err.key_ref, err.provider) == ("acme", "fake://acme", "fake")
    assert "RuntimeError" in str(err) and "hunter2" not in str(err)
    assert provider.calls == 1


# -- concurrency --------------------------------------------------------------------------------


class CountingProvider:
    """Wraps a FakeKeyProvider; records how many unwraps run at once.

    With ``rendezvous``, each unwrap waits until that many unwraps are in flight together, so
    the test fails (by a broken barrier) if the manager does not run them concurrently.
    """

    scheme = "fake"

    def __init__(self, inner: FakeKeyProvider, rendezvous: int | None = None) -> None:
        self.inner = inner
        self.barrier = threading.Barrier(rendezvous, timeout=10) if rendezvous else None
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0

    def wrap_key(self, key_ref: str, data_key: bytes, context: Mapping[str, str]) -> bytes:
        return self.inner.wrap_key(key_ref, data_key, context)

    def unwrap_key(self, key_ref: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.barrier is not None:
                self.barrier.wait()
            return self.inner.unwrap_key(key_ref, wrapped, context)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_unwraps_of_distinct_envelopes_run_in_parallel_up_to_max_concurrency():
    fake = FakeKeyProvider(latency=0.02)
    envs = envelopes(fake, 8)
    provider = CountingProvider(fake, rendezvous=4)
    km = manager(provider, concurrency=4)
    keys = km.read_keys(envs, None)
    assert set(keys) == set(envs)
    assert fake.unwrap_count == 8
    assert provider.max_in_flight == 4


def test_max_concurrency_one_unwraps_one_at_a_time():
    fake = FakeKeyProvider(latency=0.01)
    envs = envelopes(fake, 3)
    provider = CountingProvider(fake)
    km = manager(provider, concurrency=1)
    km.read_keys(envs, None)
    assert fake.unwrap_count == 3
    assert provider.max_in_flight == 1


def test_a_failed_unwrap_raises_after_the_others_and_they_stay_cached(fake: FakeKeyProvider):
    (a,) = envelopes(fake, 1, "acme")
    (g,) = envelopes(fake, 1, "globex")
    km = manager(fake)
    fake.deny("fake://globex")
    with pytest.raises(KeyAccessDeniedError) as info:
        km.read_keys([a, g], None)
    assert info.value.tenant == "globex"
    assert fake.unwrap_count == 2
    fake.reset_counts()
    km.read_keys([a], None)
    assert fake.unwrap_count == 0


# -- forgetting ---------------------------------------------------------------------------------


def test_forget_tenant_zeroes_and_drops_only_that_tenant(fake: FakeKeyProvider):
    (acme_env,) = envelopes(fake, 1, "acme")
    (globex_env,) = envelopes(fake, 1, "globex")
    km = manager(fake)
    acme_write, globex_write = km.write_key("acme", 1, None), km.write_key("globex", 1, None)
    acme_read = km.read_keys([acme_env], None)[acme_env]
    globex_read = km.read_keys([globex_env], None)[globex_env]
    fake.reset_counts()

    assert km.forget("acme") == 2
    assert acme_write.material == ZERO and acme_read.material == ZERO
    assert globex_write.material != ZERO and globex_read.material != ZERO

    assert km.write_key("globex", 1, None) is globex_write
    km.read_keys([globex_env], None)
    assert fake.calls == []
    assert km.write_key("acme", 1, None) is not acme_write
    km.read_keys([acme_env], None)
    assert (fake.wrap_count, fake.unwrap_count) == (1, 1)


def test_forget_all(fake: FakeKeyProvider):
    km = manager(fake)
    keys = [km.write_key("acme", 1, None), km.write_key("globex", 1, None)]
    assert km.forget() == 2
    assert all(k.material == ZERO for k in keys)
    assert km.forget() == 0


def test_forget_tenant_through_cmk(fake: FakeKeyProvider):
    cmk = CMK(fake, tenant_keys={"acme": "fake://acme", "globex": "fake://globex"}, audit_sinks=[])
    with tenant_context("acme"):
        acme_doc = cmk.encrypt_document({"f": b"a"})
    with tenant_context("globex"):
        globex_doc = cmk.encrypt_document({"f": b"g"})
    fake.reset_counts()
    assert cmk.forget_tenant("acme") == 1
    with tenant_context("globex"):
        assert cmk.decrypt_document(globex_doc) == {"f": b"g"}
    assert fake.unwrap_count == 0
    with tenant_context("acme"):
        assert cmk.decrypt_document(acme_doc) == {"f": b"a"}
    assert fake.unwrap_count == 1


# -- hygiene ------------------------------------------------------------------------------------


def test_data_key_repr_has_no_key_bytes(fake: FakeKeyProvider):
    km = manager(fake)
    key = km.write_key("acme", 1, None)
    text = repr(key)
    assert "acme" in text and "fake://acme" in text
    material = bytes(key.material)
    for form in (material.hex(), repr(material), repr(material)[2:-1], key.envelope.hex()):
        assert form not in text
    assert repr(key.envelope)[2:-1] not in text


# -- verifying new write keys (issue 7) ----------------------------------------------------------


def test_a_new_write_key_is_unwrapped_and_checked_before_use(fake: FakeKeyProvider):
    audit = MemoryAuditSink()
    km = manager(fake, verify=True, audit=[audit])
    wk = km.write_key("acme", 1, None)
    assert [c.operation for c in fake.calls] == ["wrap", "unwrap"]
    verify = audit.of("unwrap")
    assert [(e.outcome, e.purpose, e.tenant) for e in verify] == [("ok", "verify", "acme")]
    # What the unwrap proved is kept: reading the new rows costs nothing more.
    assert km.read_keys([wk.envelope], None)[wk.envelope] is wk
    assert km.write_key("acme", 1, None) is wk
    assert (fake.wrap_count, fake.unwrap_count) == (1, 1)


@pytest.mark.parametrize("fault", ["garbage", "wrong_length"])
def test_a_wrap_that_returns_an_unusable_blob_seals_nothing(fake: FakeKeyProvider, fault: str):
    cmk = cmk_for(fake)
    fake.inject(fault, operation="wrap")
    with tenant_context("acme"), pytest.raises(DecryptionError) as info:
        cmk.encrypt_document({"f": b"x"})
    assert (info.value.tenant, info.value.key_ref) == ("acme", "fake://acme")
    with tenant_context("acme"):  # the KMS healed (one bad answer): the next write works
        doc = cmk.encrypt_document({"f": b"x"})
        cmk.forget_tenant()
        assert cmk.decrypt_document(doc) == {"f": b"x"}


def test_an_unwrap_that_returns_another_key_fails_the_verification(fake: FakeKeyProvider):
    cmk = cmk_for(fake)
    fake.inject("garbage", operation="unwrap")
    with tenant_context("acme"), pytest.raises(DecryptionError, match="different key"):
        cmk.encrypt_document({"f": b"x"})


def test_verification_can_be_turned_off(fake: FakeKeyProvider):
    cmk = cmk_for(fake, verify_write_keys=False)
    fake.inject("garbage", operation="wrap")
    with tenant_context("acme"):
        doc = cmk.encrypt_document({"f": b"x"})  # nothing checks: the document is lost
        cmk.forget_tenant()
        with pytest.raises(DecryptionError):
            cmk.decrypt_document(doc)
    assert (fake.wrap_count, fake.unwrap_count) == (1, 1)


def test_a_failed_verification_wipes_the_key_and_caches_nothing(fake: FakeKeyProvider):
    km = manager(fake, verify=True)
    fake.inject("garbage", operation="unwrap")
    before = {id(k) for k in live_keys()}
    with pytest.raises(DecryptionError):
        km.write_key("acme", 1, None)
    assert [k for k in live_keys() if id(k) not in before] == []
    assert km.forget() == 0


# -- bad provider output is a typed error (issue 7) --------------------------------------------


@pytest.mark.parametrize("fault", ["none", "str", "wrong_length", "garbage"])
@pytest.mark.parametrize("operation", ["wrap", "unwrap"])
def test_bad_provider_output_is_a_typed_error(fake: FakeKeyProvider, fault: str, operation: str):
    cmk = cmk_for(fake)
    with tenant_context("acme"):
        doc = cmk.encrypt_document({"f": b"x"})
        cmk.forget_tenant()
        fake.inject(fault, operation=operation, count=None)
        with pytest.raises(CMKError) as info:
            if operation == "wrap":
                cmk.encrypt_document({"f": b"y"})
            else:
                cmk.decrypt_document(doc)
    assert isinstance(info.value, (KeyAccessError, DecryptionError))
    if isinstance(info.value, KeyAccessError):
        assert info.value.tenant == "acme"


@pytest.mark.parametrize("operation", ["wrap", "unwrap"])
def test_bytes_like_provider_output_is_accepted(fake: FakeKeyProvider, operation: str):
    cmk = cmk_for(fake)
    fake.inject("bytearray", operation=operation, count=None)
    with tenant_context("acme"):
        doc = cmk.encrypt_document({"f": b"x"})
        cmk.forget_tenant()
        assert cmk.decrypt_document(doc) == {"f": b"x"}


@pytest.mark.parametrize(
    "error", [RuntimeError("boom"), TypeError("x"), AttributeError("y"), KeyError("z")]
)
def test_any_provider_exception_is_a_key_access_error(fake: FakeKeyProvider, error: Exception):
    cmk = cmk_for(fake)
    fake.inject("error", error=error)
    with tenant_context("acme"), pytest.raises(KeyAccessError) as info:
        cmk.encrypt_document({"f": b"x"})
    assert info.value.__cause__ is error


# -- a hung KMS call is bounded by kms_deadline (issues 7 and 8) -------------------------------


def test_a_hung_call_becomes_unavailable_at_the_deadline(fake: FakeKeyProvider):
    cmk = cmk_for(fake, kms_deadline=0.2)
    fake.inject("hang", hang=5.0)
    started = time.monotonic()
    with tenant_context("acme"), pytest.raises(KMSUnavailableError, match="kms_deadline"):
        cmk.encrypt_document({"f": b"x"})
    assert time.monotonic() - started < 1.0
    fake.heal()  # the hung call answers now, too late; nothing uses its answer
    with tenant_context("acme"):
        doc = cmk.encrypt_document({"f": b"x"})
        assert cmk.decrypt_document(doc) == {"f": b"x"}


def test_hung_calls_hold_a_bounded_number_of_threads(fake: FakeKeyProvider):
    cmk = cmk_for(fake, kms_deadline=0.1, max_concurrency=1, retry_attempts=1)
    before = threading.active_count()
    fake.inject("hang", count=None, hang=5.0)
    for _ in range(7):
        with tenant_context("acme"), pytest.raises(KMSUnavailableError):
            cmk.encrypt_document({"f": b"x"})
    assert threading.active_count() - before <= 4  # 4 * max_concurrency
    fake.heal()
    deadline = time.monotonic() + 2
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= before  # released: no thread leaked


# -- bounded memory: expired keys are pruned and wiped (issue 7) -------------------------------


def live_keys() -> list[DataKey]:
    gc.collect()
    return [k for k in gc.get_objects() if type(k) is DataKey and not k.wiped]


def test_write_keys_are_bounded_by_cache_max_entries(fake: FakeKeyProvider):
    tenants = tuple(f"t{i}" for i in range(50))
    km = manager(fake, tenants=tenants, max_entries=10)
    keys = [km.write_key(t, 1, None) for t in tenants]
    held = {id(k) for k in km._read.values()} | {id(k) for k in km._write.values()}
    assert len(held) <= 20
    wiped = [k for k in keys if id(k) not in held]
    assert wiped and all(k.wiped and k.material == ZERO for k in wiped)
    assert km.write_key("t49", 1, None) is keys[-1]  # recent ones still serve


def test_expired_keys_are_pruned_and_wiped(fake: FakeKeyProvider):
    clock = Clock()
    km = manager(fake, clock=clock, ttl=60)
    wk = km.write_key("acme", 1, None)
    env = envelopes(fake, 1, "globex")[0]
    rk = km.read_keys([env], None)[env]
    clock.advance(60)
    km.read_keys([], None)  # any call sweeps
    assert wk.wiped and rk.wiped
    assert wk.material == ZERO and rk.material == ZERO
    assert km.forget() == 0


def test_a_sweep_runs_at_most_every_quarter_ttl(fake: FakeKeyProvider):
    clock = Clock()
    km = manager(fake, clock=clock, ttl=60)
    clock.advance(15)
    km.read_keys([], None)  # sweeps now (nothing to sweep)...
    wk = km.write_key("acme", 1, None)
    clock.advance(60)
    km.read_keys([], None)  # ...and again: 60 s later
    assert wk.wiped


def test_rewrap_of_a_key_evicted_meanwhile_does_not_wrap_zeros(fake: FakeKeyProvider):
    km = manager(fake, max_entries=1)
    env = envelopes(fake, 1)[0]
    key = km.read_keys([env], None)[env]
    key.wipe()  # as an eviction by another thread between read_keys and the wrap would
    assert key.copy_material() is None


@pytest.mark.parametrize("field", ["cache_ttl", "write_key_max_age"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_cache_times_must_be_finite(fake: FakeKeyProvider, field: str, value: float):
    # inf would keep a key for ever, past any revocation; nan passed every comparison.
    with pytest.raises(ConfigurationError, match="must be finite"):
        CMK(fake, tenant_keys={"acme": "fake://acme"}, **{field: value})
