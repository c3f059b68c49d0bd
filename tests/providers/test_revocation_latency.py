"""How long an application keeps reading and writing after a tenant revokes its key, for the
Azure Key Vault, Cloud KMS, Vault/OpenBao and KMIP providers against their local servers.

With the default settings the bound is ``cache_ttl`` (60 s): reads use cached data keys until
they expire (Azure rows under a key version older than the disabled one included), writes reuse
the write key for ``write_key_max_age`` (= ``cache_ttl``). The fast tests pin those bounds with
the ``clock=`` seam. The real-time measurement that the provider pages
report runs (about 65 s per provider) with ``SQLALCHEMY_CMK_REVOCATION_LATENCY=1``:

    SQLALCHEMY_CMK_REVOCATION_LATENCY=1 .venv/bin/python -m pytest -s \\
        tests/providers/test_revocation_latency.py -k measured -p no:cacheprovider
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_cmk import CMK, EncryptedMixin, EncryptedType, KeyAccessDeniedError, tenant_context
from sqlalchemy_cmk.providers import KeyProvider

# The session's servers, shared with each provider's own tests.
from .test_azure import azure_vault, make_provider  # noqa: F401
from .test_gcp import RING, State, kms_client, kms_server  # noqa: F401
from .test_kmip import Kmip, kmip  # noqa: F401
from .test_vault import Tenant, bao, root  # noqa: F401

PROVIDERS = ["azure", "gcp", "vault", "kmip"]


class Base(DeclarativeBase):
    pass


class Note(EncryptedMixin, Base):
    __tablename__ = "provider_revocation_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(String(40), default="acme")
    body: Mapped[str] = mapped_column(EncryptedType(String))


@dataclass
class Setup:
    """A tenant key on one provider's local server and how the tenant revokes it."""

    provider: KeyProvider
    key_ref: str
    revoke: Callable[[], None]
    before_revoke: Callable[[], None] = lambda: None
    close: Callable[[], None] = lambda: None


def azure(request: pytest.FixtureRequest, clock: Callable[[], float]) -> Setup:
    server = request.getfixturevalue("azure_vault")
    name = f"rev-{uuid.uuid4().hex[:8]}"
    server.create_rsa_key(name)
    provider = make_provider(server, clock=clock)
    # Rows are written under version 1; the tenant then rotates and disables "the key" from the
    # portal, which disables the new current version only.
    return Setup(
        provider,
        f"azure-kv://{server.host}/keys/{name}",
        revoke=lambda: server.disable(name),
        before_revoke=lambda: server.rotate(name),
        close=provider.close,
    )


def gcp(request: pytest.FixtureRequest, clock: Callable[[], float]) -> Setup:
    from sqlalchemy_cmk.providers.gcp import GcpKmsProvider

    server = request.getfixturevalue("kms_server")
    name = server.add_key(f"{RING}/cryptoKeys/rev-{uuid.uuid4().hex[:8]}")
    provider = GcpKmsProvider(request.getfixturevalue("kms_client"), timeout=5)
    # gcloud kms keys versions disable 1 --key ...
    return Setup(
        provider, f"gcp-kms://{name}", revoke=lambda: server.set_state(name, State.DISABLED)
    )


def vault(request: pytest.FixtureRequest, clock: Callable[[], float]) -> Setup:
    from sqlalchemy_cmk.providers.vault import VaultTransitProvider

    tenant = Tenant(request.getfixturevalue("root"), request.getfixturevalue("bao"))
    # The tenant's policy turned to deny, as `bao policy write` would.
    return Setup(
        VaultTransitProvider(tenant.client), tenant.key_ref, tenant.deny, close=tenant.close
    )


def kmip_setup(request: pytest.FixtureRequest, clock: Callable[[], float]) -> Setup:
    from kmip.core import enums

    from sqlalchemy_cmk.providers.kmip import KmipProvider

    server: Kmip = request.getfixturevalue("kmip")
    uid = server.new_key()
    provider = KmipProvider(server.app_factory(), pool_size=2)

    def revoke() -> None:  # the operator revokes the key (final in KMIP)
        server.operator.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid)

    return Setup(provider, f"kmip://{uid}", revoke, close=provider.close)


SETUPS = {"azure": azure, "gcp": gcp, "vault": vault, "kmip": kmip_setup}


class App:
    """An application with CMK's default settings and one tenant."""

    def __init__(self, setup: Setup, clock: Callable[[], float] | None = None) -> None:
        self.setup = setup
        self.engine = create_engine("sqlite://")
        Base.metadata.create_all(self.engine)
        self.sessions = sessionmaker(self.engine)
        options: dict[str, Any] = {} if clock is None else {"clock": clock}
        self.cmk = CMK(setup.provider, tenant_keys={"acme": setup.key_ref}, **options)
        self.cmk.install(self.sessions)

    def read(self) -> bool:
        """True if the tenant's rows read; False once refused (KeyAccessDeniedError)."""
        try:
            with tenant_context("acme"), self.sessions() as s:
                return bool(list(s.scalars(select(Note))))
        except KeyAccessDeniedError:
            return False

    def write(self) -> bool:
        try:
            with tenant_context("acme"), self.sessions() as s:
                s.add(Note(body="more"))
                s.commit()
            return True
        except KeyAccessDeniedError:
            return False

    def close(self) -> None:
        self.engine.dispose()
        self.setup.close()


@pytest.fixture(params=PROVIDERS)
def make_app(request: pytest.FixtureRequest) -> Iterator[Callable[..., App]]:
    apps: list[App] = []

    def make(clock: Callable[[], float] = time.monotonic, *, seam: bool = False) -> App:
        app = App(SETUPS[request.param](request, clock), clock if seam else None)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def test_with_default_settings_revocation_bites_at_cache_ttl(make_app: Callable[..., App]) -> None:
    now = [1000.0]
    app = make_app(lambda: now[0], seam=True)
    assert app.write()  # rows and the write key, at t = 1000
    app.setup.before_revoke()
    assert app.read()  # read keys cached at t = 1000
    app.setup.revoke()
    now[0] += 59.9
    assert app.read() and app.write()  # cached: still working
    now[0] += 0.2  # past cache_ttl
    assert not app.read()
    assert not app.write()


def test_forget_tenant_makes_revocation_bite_at_the_next_access(
    make_app: Callable[..., App],
) -> None:
    app = make_app()
    assert app.write()
    app.setup.before_revoke()
    assert app.read()
    app.setup.revoke()
    started = time.monotonic()
    app.cmk.forget_tenant("acme")
    assert not app.read()  # the next read asks the KMS, which refuses
    assert not app.write()
    assert time.monotonic() - started < 1.0


@pytest.mark.skipif(
    not os.environ.get("SQLALCHEMY_CMK_REVOCATION_LATENCY"),
    reason="real-time measurement (about 65 s per provider): set "
    "SQLALCHEMY_CMK_REVOCATION_LATENCY=1",
)
def test_measured_revocation_latency_with_default_settings(
    make_app: Callable[..., App], request: pytest.FixtureRequest
) -> None:
    """Keys fetched, then at once the tenant revokes (the worst case): the time until the first
    refused read and write, with the application reading and writing every 50 ms."""
    app = make_app()
    assert app.write()
    app.setup.before_revoke()
    assert app.read()
    app.setup.revoke()
    started = time.monotonic()
    failed: dict[str, float] = {}
    while len(failed) < 2 and time.monotonic() - started < 90:
        for name, access in (("read", app.read), ("write", app.write)):
            if name not in failed and not access():
                failed[name] = time.monotonic() - started
        time.sleep(0.05)
    print(
        f"\n{request.node.callspec.id}: default settings: reads refused after "
        f"{failed.get('read', 0):.1f} s, writes after {failed.get('write', 0):.1f} s"
    )
    assert set(failed) == {"read", "write"}
    assert 59.0 < failed["read"] < 61.5
    assert 59.0 < failed["write"] < 61.5

    other = make_app()  # a fresh key: KMIP's revocation is final
    assert other.write()
    other.setup.before_revoke()
    assert other.read()
    other.setup.revoke()
    started = time.monotonic()
    other.cmk.forget_tenant("acme")
    while other.read() and time.monotonic() - started < 10:
        time.sleep(0.01)
    read = time.monotonic() - started
    started = time.monotonic()
    assert not other.write()
    write = time.monotonic() - started
    print(
        f"{request.node.callspec.id}: after forget_tenant: reads refused after "
        f"{read * 1000:.0f} ms, the next write in {write * 1000:.0f} ms"
    )
