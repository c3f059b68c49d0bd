"""How long an application keeps reading and writing after a tenant disables its AWS KMS key.

With the default settings the bound is ``cache_ttl`` (60 s): reads use cached data keys until
they expire, writes reuse the write key for ``write_key_max_age`` (= ``cache_ttl``). The fast
tests pin that bound with the ``clock=`` seam; ``cmk.forget_tenant()`` makes it one KMS round
trip. The real-time measurement that docs/providers/aws.md reports runs (about 65 s) with
``SQLALCHEMY_CMK_REVOCATION_LATENCY=1``:

    SQLALCHEMY_CMK_REVOCATION_LATENCY=1 .venv/bin/python -m pytest -s \\
        tests/providers/test_aws_revocation.py -k measured -p no:cacheprovider
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_cmk import CMK, EncryptedMixin, EncryptedType, KeyAccessDeniedError, tenant_context
from sqlalchemy_cmk.providers.aws import AwsKmsProvider
from sqlalchemy_cmk.testing.aws_kms import LocalKms

# The session's server, shared with the provider's tests.
from .test_aws import kms, kms_server  # noqa: F401


class Base(DeclarativeBase):
    pass


class Note(EncryptedMixin, Base):
    __tablename__ = "revocation_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(String(40), default="acme")
    body: Mapped[str] = mapped_column(EncryptedType(String))


class App:
    """An application with CMK's default settings, one tenant on the local AWS KMS."""

    def __init__(self, kms: LocalKms, clock: Callable[[], float] | None = None) -> None:  # noqa: F811
        self.key_ref = "aws-kms://" + kms.create_key()
        self.engine = create_engine("sqlite://")
        Base.metadata.create_all(self.engine)
        self.sessions = sessionmaker(self.engine)
        options: dict[str, Any] = {} if clock is None else {"clock": clock}
        self.cmk = CMK(
            AwsKmsProvider.from_session(kms.session(), endpoint_url=kms.endpoint_url),
            tenant_keys={"acme": self.key_ref},
            **options,
        )
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


@pytest.fixture
def app(kms: LocalKms) -> Iterator[App]:  # noqa: F811
    application = App(kms)
    yield application
    application.engine.dispose()


def test_forget_tenant_makes_revocation_bite_at_the_next_access(kms: LocalKms, app: App) -> None:  # noqa: F811
    assert app.write() and app.read()  # the data keys are cached
    kms.disable(app.key_ref)
    assert app.read() and app.write()  # cached: still working
    started = time.monotonic()
    app.cmk.forget_tenant("acme")
    assert not app.read()
    assert not app.write()
    assert time.monotonic() - started < 1.0  # one Decrypt, one Encrypt, each refused at once


def test_with_default_settings_revocation_bites_at_cache_ttl(kms: LocalKms) -> None:  # noqa: F811
    """Reads and writes go on until exactly cache_ttl (60 s) after the keys were fetched."""
    now = [1000.0]
    application = App(kms, clock=lambda: now[0])
    try:
        assert application.write() and application.read()  # keys fetched at t = 1000
        kms.disable(application.key_ref)
        now[0] += 59.9
        assert application.read() and application.write()
        now[0] += 0.2  # 60.1 s after: both cached keys have expired
        assert not application.read()
        assert not application.write()
        kms.enable(application.key_ref)
        assert application.read() and application.write()  # a refusal is not cached
    finally:
        application.engine.dispose()


@pytest.mark.skipif(
    not os.environ.get("SQLALCHEMY_CMK_REVOCATION_LATENCY"),
    reason="real-time measurement (about 65 s): set SQLALCHEMY_CMK_REVOCATION_LATENCY=1",
)
def test_measured_revocation_latency_with_default_settings(kms: LocalKms, app: App) -> None:  # noqa: F811
    """Keys fetched, then at once the tenant disables the key (the worst case): the time until
    the first refused read and write, with the application reading and writing every 50 ms."""
    assert app.write() and app.read()
    kms.disable(app.key_ref)
    started = time.monotonic()
    failed: dict[str, float] = {}
    while len(failed) < 2 and time.monotonic() - started < 90:
        for name, access in (("read", app.read), ("write", app.write)):
            if name not in failed and not access():
                failed[name] = time.monotonic() - started
        time.sleep(0.05)
    print(
        f"\ndefault settings: reads refused after {failed.get('read')!r} s, writes after "
        f"{failed.get('write')!r} s"
    )
    assert set(failed) == {"read", "write"}
    assert 59.0 < failed["read"] < 61.5 and 59.0 < failed["write"] < 61.5

    kms.enable(app.key_ref)
    assert app.write() and app.read()
    kms.disable(app.key_ref)
    started = time.monotonic()
    app.cmk.forget_tenant("acme")
    assert not app.read()
    read = time.monotonic() - started
    started = time.monotonic()
    assert not app.write()
    write = time.monotonic() - started
    print(
        f"after forget_tenant: the next read refused in {read * 1000:.1f} ms, the next write in "
        f"{write * 1000:.1f} ms"
    )
