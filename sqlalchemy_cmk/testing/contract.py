"""The contract every key provider keeps, as a pytest class to subclass (needs pytest).

Use it for our providers and for your own::

    from sqlalchemy_cmk.testing.contract import KeyProviderContract

    class TestMyKmsContract(KeyProviderContract):
        @pytest.fixture
        def provider(self): return MyKmsProvider(client=...)          # a working provider
        @pytest.fixture
        def key_ref(self): return "mykms://keys/acme"                 # a key it may use
        @pytest.fixture
        def missing_key_ref(self): return "mykms://keys/nope"         # a key the KMS lacks
        @pytest.fixture
        def revoke(self): return lambda ref: ...                      # make the KMS deny ref
        @pytest.fixture
        def restore(self): return lambda ref: ...                     # and accept it again
        @pytest.fixture
        def unavailable_provider(self): return MyKmsProvider(...)     # pointed at a dead endpoint

The contract: round trip; the tenant binds (another tenant's context fails); the
other context entries (``data_label``) are recorded by the provider (the KMS may bind them)
and do not have to be repeated on unwrap; a corrupted wrapped key
raises ``DecryptionError``; an unknown key ``KeyNotFoundError``; a revoked key
``KeyAccessDeniedError`` for wrap and unwrap, and access comes back when restored; a dead
endpoint ``KMSUnavailableError`` (promptly: timeouts, not the SDK's minute-long defaults);
concurrent use from threads; no key bytes in wrapped keys, errors or reprs; and revocation end to
end through ``CMK`` on an ORM model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from .._cmk import CMK
from ..context import tenant_context
from ..errors import (
    CMKError,
    DecryptionError,
    KeyAccessDeniedError,
    KeyNotFoundError,
    KMSUnavailableError,
)
from ..providers import KeyProvider
from ..types import EncryptedMixin, EncryptedType

__all__ = ["KeyProviderContract"]

ACME = {"tenant": "acme"}
GLOBEX = {"tenant": "globex"}
#: How long a dead endpoint may take to be reported, with the provider's own timeouts and retries.
UNAVAILABLE_WITHIN_SECONDS = 15.0


def _secret_free(exc: BaseException, *secrets: bytes) -> None:
    text = f"{exc!s} {exc!r}"
    for secret in secrets:
        assert secret.hex() not in text
        assert repr(secret) not in text


class _Base(DeclarativeBase):
    pass


class _Record(EncryptedMixin, _Base):
    __tablename__ = "contract_records"
    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[str] = mapped_column(EncryptedType(String))


class KeyProviderContract:
    """Subclass as ``Test...`` and provide the fixtures named in the module docstring."""

    # -- round trip and binding ----------------------------------------------------------------

    def test_round_trip(self, provider: KeyProvider, key_ref: str) -> None:
        dek = os.urandom(32)
        wrapped = provider.wrap_key(key_ref, dek, ACME)
        assert isinstance(wrapped, bytes) and wrapped
        assert dek not in wrapped
        assert provider.unwrap_key(key_ref, wrapped, ACME) == dek

    def test_each_wrap_is_fresh(self, provider: KeyProvider, key_ref: str) -> None:
        dek = os.urandom(32)
        assert provider.wrap_key(key_ref, dek, ACME) != provider.wrap_key(key_ref, dek, ACME)

    def test_data_label_is_not_needed_to_unwrap(self, provider: KeyProvider, key_ref: str) -> None:
        dek = os.urandom(32)
        wrapped = provider.wrap_key(key_ref, dek, {"tenant": "acme", "data_label": "PHI"})
        assert provider.unwrap_key(key_ref, wrapped, ACME) == dek

    def test_the_tenant_binds(self, provider: KeyProvider, key_ref: str) -> None:
        dek = os.urandom(32)
        wrapped = provider.wrap_key(key_ref, dek, ACME)
        with pytest.raises(DecryptionError) as info:
            provider.unwrap_key(key_ref, wrapped, GLOBEX)
        _secret_free(info.value, dek)

    def test_corrupted_wrapped_key(self, provider: KeyProvider, key_ref: str) -> None:
        dek = os.urandom(32)
        wrapped = provider.wrap_key(key_ref, dek, ACME)
        for bad in (
            wrapped[:-1],
            wrapped + b"\x00",
            bytes([wrapped[0] ^ 1]) + wrapped[1:],
            wrapped[:-1] + bytes([wrapped[-1] ^ 1]),
            b"",
        ):
            with pytest.raises(DecryptionError) as info:
                provider.unwrap_key(key_ref, bad, ACME)
            _secret_free(info.value, dek)

    # -- error mapping -------------------------------------------------------------------------

    def test_unknown_key(self, provider: KeyProvider, missing_key_ref: str) -> None:
        with pytest.raises(KeyNotFoundError) as info:
            provider.wrap_key(missing_key_ref, os.urandom(32), ACME)
        assert info.value.__cause__ is not None or info.value.__context__ is None

    def test_revoked_key_is_denied_then_restored(
        self,
        provider: KeyProvider,
        key_ref: str,
        revoke: Callable[[str], None],
        restore: Callable[[str], None],
    ) -> None:
        dek = os.urandom(32)
        wrapped = provider.wrap_key(key_ref, dek, ACME)
        revoke(key_ref)
        try:
            with pytest.raises(KeyAccessDeniedError) as info:
                provider.unwrap_key(key_ref, wrapped, ACME)
            _secret_free(info.value, dek, wrapped)
            with pytest.raises(KeyAccessDeniedError):
                provider.wrap_key(key_ref, os.urandom(32), ACME)
        finally:
            restore(key_ref)
        assert provider.unwrap_key(key_ref, wrapped, ACME) == dek

    def test_unavailable_endpoint(self, unavailable_provider: KeyProvider, key_ref: str) -> None:
        started = time.monotonic()
        with pytest.raises(KMSUnavailableError):
            unavailable_provider.wrap_key(key_ref, os.urandom(32), ACME)
        assert time.monotonic() - started < UNAVAILABLE_WITHIN_SECONDS

    def test_errors_are_cmk_errors(self, provider: KeyProvider, key_ref: str) -> None:
        with pytest.raises(CMKError):
            provider.unwrap_key(key_ref, b"\x00" * 64, ACME)

    # -- concurrency and hygiene ---------------------------------------------------------------

    def test_concurrent_use(self, provider: KeyProvider, key_ref: str) -> None:
        deks = [os.urandom(32) for _ in range(16)]

        def round_trip(dek: bytes) -> bytes:
            return provider.unwrap_key(key_ref, provider.wrap_key(key_ref, dek, ACME), ACME)

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(round_trip, deks)) == deks

    def test_repr_has_no_secrets(self, provider: KeyProvider) -> None:
        text = repr(provider)
        assert "secret" not in text.lower() or "***" in text

    # -- end to end ----------------------------------------------------------------------------

    @pytest.fixture
    def contract_cmk(self, provider: KeyProvider, key_ref: str) -> Iterator[tuple[CMK, Any]]:
        engine = create_engine("sqlite://")
        _Base.metadata.create_all(engine)
        sessions = sessionmaker(engine)
        cmk = CMK(provider, tenant_keys={"acme": key_ref}, audit_sinks=[])
        cmk.install(sessions)
        yield cmk, sessions
        engine.dispose()

    def test_revocation_end_to_end(
        self,
        contract_cmk: tuple[CMK, Any],
        key_ref: str,
        revoke: Callable[[str], None],
        restore: Callable[[str], None],
    ) -> None:
        cmk, sessions = contract_cmk
        with tenant_context("acme", actor="contract"):
            with sessions() as s:
                s.add_all([_Record(value=f"v{i}") for i in range(5)])
                s.commit()
            revoke(key_ref)
            try:
                cmk.forget_tenant("acme")
                with sessions() as s, pytest.raises(KeyAccessDeniedError):
                    s.scalars(select(_Record)).all()
                with sessions() as s, pytest.raises(KeyAccessDeniedError):
                    s.add(_Record(value="new"))
                    s.commit()
            finally:
                restore(key_ref)
            with sessions() as s:
                values = sorted(r.value for r in s.scalars(select(_Record)))
        assert values == [f"v{i}" for i in range(5)]

    def test_check_tenant(self, contract_cmk: tuple[CMK, Any]) -> None:
        cmk, _ = contract_cmk
        result = cmk.check_tenant("acme")
        assert result.ok, str(result)
