"""The provider contract, run against the providers that need no server: local and fake."""

from __future__ import annotations

import os

import pytest

from sqlalchemy_cmk.errors import KMSUnavailableError
from sqlalchemy_cmk.providers.local import LocalKeyProvider
from sqlalchemy_cmk.testing import FakeKeyProvider
from sqlalchemy_cmk.testing.contract import KeyProviderContract


class TestLocalProviderContract(KeyProviderContract):
    @pytest.fixture
    def provider(self) -> LocalKeyProvider:
        return LocalKeyProvider({"acme": os.urandom(32), "globex": os.urandom(32)})

    @pytest.fixture
    def key_ref(self) -> str:
        return "local://acme"

    @pytest.fixture
    def missing_key_ref(self) -> str:
        return "local://nobody"

    @pytest.fixture
    def revoke(self, provider: LocalKeyProvider):  # type: ignore[no-untyped-def]
        return lambda ref: provider.revoke(ref.removeprefix("local://"))

    @pytest.fixture
    def restore(self, provider: LocalKeyProvider):  # type: ignore[no-untyped-def]
        return lambda ref: provider.restore(ref.removeprefix("local://"))

    @pytest.fixture
    def unavailable_provider(self) -> FakeKeyProvider:
        pytest.skip("the local provider has no endpoint that could be down")


class TestFakeProviderContract(KeyProviderContract):
    @pytest.fixture
    def provider(self) -> FakeKeyProvider:
        return FakeKeyProvider()

    @pytest.fixture
    def key_ref(self) -> str:
        return "fake://acme"

    @pytest.fixture
    def missing_key_ref(self) -> str:
        pytest.skip("the fake KMS creates keys on first use")

    @pytest.fixture
    def revoke(self, provider: FakeKeyProvider):  # type: ignore[no-untyped-def]
        return provider.deny

    @pytest.fixture
    def restore(self, provider: FakeKeyProvider):  # type: ignore[no-untyped-def]
        return provider.allow

    @pytest.fixture
    def unavailable_provider(self) -> FakeKeyProvider:
        fake = FakeKeyProvider()
        fake.fail_next(1, KMSUnavailableError("endpoint down", provider="fake"))
        return fake
