"""forget() racing a KMS call under way: the key it fetches is never cached (issue 8).

Each test holds a provider call inside the KMS (``FakeKeyProvider``'s ``"hang"`` fault, released
by ``heal()``), forgets the tenant meanwhile, lets the call answer, and then checks what a user
would: whether the next access goes to the KMS (so a key the tenant revoked is refused) or is
served from the cache.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from sqlalchemy_cmk import CMK, KeyAccessDeniedError, tenant_context
from sqlalchemy_cmk._keys import CachePolicy, DataKey, KeyManager, RetryPolicy
from sqlalchemy_cmk.registry import TenantKeys
from sqlalchemy_cmk.testing import FakeKeyProvider

from .test_key_manager import ZERO, envelopes, manager


@pytest.fixture
def fake() -> FakeKeyProvider:
    return FakeKeyProvider()


def _wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the provider call never started"
        time.sleep(0.005)


class _InFlight:
    """Runs ``fn`` on a thread whose KMS call (``operation``) hangs until :meth:`answer`."""

    def __init__(self, fake: FakeKeyProvider, operation: str, fn: Callable[[], Any]) -> None:
        self.fake = fake
        self.result: list[Any] = []
        before = len(fake.calls)
        fake.inject("hang", operation=operation, hang=10.0)
        self.thread = threading.Thread(target=lambda: self.result.append(fn()), daemon=True)
        self.thread.start()
        _wait_until(lambda: len(fake.calls) > before)  # inside the KMS now

    def answer(self) -> Any:
        self.fake.heal()
        self.thread.join(10)
        assert not self.thread.is_alive()
        (out,) = self.result
        return out


def test_an_unwrap_under_way_during_forget_is_used_once_and_not_cached(fake: FakeKeyProvider):
    (env,) = envelopes(fake, 1)
    km = manager(fake)
    call = _InFlight(fake, "unwrap", lambda: km.read_keys([env], None))
    assert km.forget("acme") == 0  # nothing cached yet: the key is still in the KMS call
    keys = call.answer()
    assert env in keys  # the read that asked for it gets it
    fake.reset_counts()
    km.read_keys([env], None)
    assert fake.unwrap_count == 1  # not served from the cache: the KMS was asked again
    km.read_keys([env], None)
    assert fake.unwrap_count == 1  # a key fetched after the forget is cached as usual


def test_a_proven_fresh_key_fetched_before_forget_is_wiped_not_remembered(
    fake: FakeKeyProvider,
):
    (env,) = envelopes(fake, 1)
    km = manager(fake)
    fresh: list[DataKey] = []
    call = _InFlight(fake, "unwrap", lambda: km.read_keys([env], None, fresh=fresh))
    km.forget("acme")
    key = call.answer()[env]
    assert fresh == [key]
    km.remember(fresh)  # the caller proved it: it would be cached but for the forget
    assert key.material == ZERO
    fake.reset_counts()
    km.read_keys([env], None)
    assert fake.unwrap_count == 1


def test_forgetting_another_tenant_does_not_keep_a_key_out(fake: FakeKeyProvider):
    (env,) = envelopes(fake, 1, "acme")
    km = manager(fake)
    call = _InFlight(fake, "unwrap", lambda: km.read_keys([env], None))
    km.forget("globex")
    call.answer()
    fake.reset_counts()
    km.read_keys([env], None)
    assert fake.unwrap_count == 0


def test_forget_all_keeps_out_every_tenant_under_way(fake: FakeKeyProvider):
    (env,) = envelopes(fake, 1, "acme")
    km = manager(fake)
    call = _InFlight(fake, "unwrap", lambda: km.read_keys([env], None))
    km.forget()
    call.answer()
    fake.reset_counts()
    km.read_keys([env], None)
    assert fake.unwrap_count == 1
    # A later forget of one tenant does not undo the forget-all's generation for others.
    km.forget("globex")
    km.read_keys([env], None)
    assert fake.unwrap_count == 1


def test_a_write_key_wrapped_during_forget_seals_its_flush_and_is_not_reused(
    fake: FakeKeyProvider,
):
    km = manager(fake, verify=True)
    call = _InFlight(fake, "wrap", lambda: km.write_key("acme", 1, None))
    km.forget("acme")
    key = call.answer()
    assert key.material == ZERO  # not kept in memory ...
    nonce = b"\0" * 12
    sealed = key.aead.encrypt(nonce, b"row", None)  # ... but this flush can still seal with it
    fake.reset_counts()
    again = km.write_key("acme", 1, None)
    assert again is not key
    assert fake.wrap_count == 1  # a new write key, not the one wrapped before the forget
    opened = km.read_keys([key.envelope], None)[key.envelope]
    assert fake.unwrap_count == 2  # verify of the new key, then the old envelope: not cached
    assert opened.aead.decrypt(nonce, sealed, None) == b"row"


def test_a_revoked_key_is_refused_right_after_an_unwrap_under_way(fake: FakeKeyProvider):
    """What a user sees: the tenant disables its key, the operator calls forget_tenant()
    while a page load's unwrap is in the KMS; once it returns, the next read is refused
    (before the fix it was served from the cache for cache_ttl)."""
    cmk = CMK(fake, tenant_keys={"acme": "fake://acme"}, audit_sinks=[])
    with tenant_context("acme"):
        doc = cmk.encrypt_document({"f": b"secret"})
    cmk.forget_tenant("acme")

    def read() -> object:
        with tenant_context("acme"):
            return cmk.decrypt_document(doc)

    call = _InFlight(fake, "unwrap", read)
    assert cmk.forget_tenant("acme") == 0
    assert call.answer() == {"f": b"secret"}  # began before the revocation: served once
    fake.deny("fake://acme")
    with pytest.raises(KeyAccessDeniedError):
        read()


class _ForgetsAfterLookup:
    """A registry after whose next lookup the tenant is forgotten at once: a revocation that
    lands between the registry lookup and the KMS call."""

    def __init__(self) -> None:
        self.km: KeyManager | None = None
        self.armed = False

    def tenant_keys(self, tenant: str) -> TenantKeys:
        keys = TenantKeys(f"fake://{tenant}", frozenset({f"fake://{tenant}"}))
        if self.armed and self.km is not None:
            self.armed = False
            self.km.forget(tenant)
        return keys


@pytest.mark.parametrize("operation", ["unwrap", "wrap"])
def test_a_forget_between_the_registry_lookup_and_the_kms_call_counts(
    fake: FakeKeyProvider, operation: str
):
    (env,) = envelopes(fake, 1)
    registry = _ForgetsAfterLookup()
    km = registry.km = KeyManager(
        {"fake": fake},
        registry,
        CachePolicy(60.0, 1000, None, 2**20),
        RetryPolicy(3, 0.0, 10.0, 8),
        [],
        verify_write_keys=False,
    )
    registry.armed = True
    if operation == "unwrap":
        km.read_keys([env], None)
        fake.reset_counts()
        km.read_keys([env], None)
        assert fake.unwrap_count == 1
    else:
        first = km.write_key("acme", 1, None)
        fake.reset_counts()
        assert km.write_key("acme", 1, None) is not first
        assert fake.wrap_count == 1
