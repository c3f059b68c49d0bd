"""Retries of transient KMS faults: backoff with jitter inside kms_deadline (issue 8)."""

from __future__ import annotations

import time
from collections.abc import Mapping

import pytest

from sqlalchemy_cmk import ConfigurationError, KMSUnavailableError
from sqlalchemy_cmk._keys import CachePolicy, KeyManager, RetryPolicy
from sqlalchemy_cmk.providers import call_timeout
from sqlalchemy_cmk.registry import TenantKeys
from sqlalchemy_cmk.testing import FakeKeyProvider


def manager(provider: object, retry: RetryPolicy) -> KeyManager:
    scheme = provider.scheme  # type: ignore[attr-defined]
    return KeyManager(
        {scheme: provider},  # type: ignore[dict-item]
        {"acme": TenantKeys(f"{scheme}://acme", frozenset({f"{scheme}://acme"}))},
        CachePolicy(),
        retry,
        [],
        clock=time.monotonic,
        verify_write_keys=False,
    )


def test_the_default_policy_retries_until_the_deadline_not_three_times() -> None:
    # A KMS throttling a cold start: six transient faults in a row. Before issue 8 the default
    # policy gave up after three attempts, about 0.15 s in, with nine seconds of deadline left.
    fake = FakeKeyProvider()
    fake.fail_next(6)
    started = time.monotonic()
    key = manager(fake, RetryPolicy()).write_key("acme", 1, None)
    assert key.tenant == "acme"
    assert fake.wrap_count == 7
    assert time.monotonic() - started < RetryPolicy().deadline


def test_backoff_grows_exponentially_with_full_jitter_and_a_cap() -> None:
    policy = RetryPolicy()
    ceilings = [policy.delay(n, draw=lambda low, high: high) for n in range(1, 10)]
    assert ceilings == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    assert {policy.delay(n, draw=lambda low, high: low) for n in range(1, 10)} == {0.0}
    # Drawn, not fixed: processes throttled together spread out.
    assert len({policy.delay(8) for _ in range(20)}) > 1
    assert policy.delay(10_000, draw=lambda low, high: high) == 2.0  # no overflow


def test_the_deadline_bounds_the_retries_in_real_time() -> None:
    fake = FakeKeyProvider()
    fake.fail_next(10_000)
    started = time.monotonic()
    with pytest.raises(KMSUnavailableError, match=r"attempt\(s\) in"):
        manager(fake, RetryPolicy(backoff=0.01, max_backoff=0.05, deadline=0.5)).write_key(
            "acme", 1, None
        )
    elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 0.7
    assert fake.wrap_count > 5


def test_attempts_still_caps_when_set() -> None:
    fake = FakeKeyProvider()
    fake.fail_next(5)
    with pytest.raises(KMSUnavailableError, match="3 attempt"):
        manager(fake, RetryPolicy(attempts=3, backoff=0)).write_key("acme", 1, None)
    assert fake.wrap_count == 3


@pytest.mark.parametrize("kwargs", [{"attempts": 0}, {"max_backoff": -1.0}, {"deadline": 0.0}])
def test_bad_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


class TimeoutRecorder:
    """Records what call_timeout() tells a provider, attempt by attempt."""

    scheme = "rec"

    def __init__(self) -> None:
        self.seen: list[float] = []

    def wrap_key(self, key_ref: str, data_key: bytes, context: Mapping[str, str]) -> bytes:
        self.seen.append(call_timeout(30.0))
        if len(self.seen) < 3:
            time.sleep(0.1)
            raise KMSUnavailableError("throttled")
        return b"w" + data_key

    def unwrap_key(self, key_ref: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        return wrapped[1:]


def test_providers_see_what_is_left_of_the_deadline() -> None:
    recorder = TimeoutRecorder()
    manager(recorder, RetryPolicy(backoff=0, deadline=1.0)).write_key("acme", 1, None)
    first, second, third = recorder.seen
    assert 0.9 < first <= 1.0  # not the provider's own 30 s
    assert second < first - 0.09 and third < second - 0.09
    assert call_timeout(30.0) == 30.0  # outside a key manager call: the provider's default


def test_cmk_defaults_retry_until_the_deadline() -> None:
    from sqlalchemy_cmk import CMK, tenant_context

    fake = FakeKeyProvider()
    cmk = CMK(fake, tenant_keys={"acme": "fake://acme"}, retry_backoff=0.001, audit_sinks=[])
    fake.fail_next(6)
    with tenant_context("acme"):
        cmk.encrypt_document({"f": b"x"})
    assert fake.wrap_count == 7
