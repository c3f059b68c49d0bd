"""One CMK, tenants in different KMSs at once: AWS KMS (moto) and Vault Transit (OpenBao)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import String, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_cmk import CMK, EncryptedMixin, EncryptedType, KeyAccessDeniedError, tenant_context
from sqlalchemy_cmk._format import parse_envelope, split_companion
from sqlalchemy_cmk.providers.aws import AwsKmsProvider
from sqlalchemy_cmk.providers.vault import VaultTransitProvider

# The servers' session fixtures, shared with the providers' own test modules.
from .test_aws import kms, kms_server  # noqa: F401
from .test_vault import Tenant, bao, root  # noqa: F401


class Base(DeclarativeBase):
    pass


class Secret(EncryptedMixin, Base):
    __tablename__ = "routing_secrets"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(20))
    value: Mapped[str] = mapped_column(EncryptedType(String))


@pytest.fixture
def vault_tenant(root: Any, bao: Any) -> Iterator[Tenant]:  # noqa: F811
    t = Tenant(root, bao)
    yield t
    t.close()


def test_tenants_routed_to_different_kms_at_once(kms: Any, vault_tenant: Tenant) -> None:  # noqa: F811
    aws_ref = f"aws-kms://{kms.create_key()}"
    cmk = CMK(
        providers=[AwsKmsProvider(kms.client()), VaultTransitProvider(vault_tenant.client)],
        tenant_keys={"acme": aws_ref, "globex": vault_tenant.key_ref},
        audit_sinks=[],
    )
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    sessions = sessionmaker(engine)
    cmk.install(sessions)
    for tenant in ("acme", "globex"):
        with tenant_context(tenant), sessions() as s:
            s.add_all([Secret(tenant_id=tenant, value=f"{tenant}-{i}") for i in range(3)])
            s.commit()

    with engine.connect() as conn:
        stored = conn.execute(text("SELECT tenant_id, cmk_edek FROM routing_secrets")).all()
    seen = {t: parse_envelope(split_companion(edek)[1]) for t, edek in stored}
    assert (seen["acme"].provider, seen["acme"].key_ref) == ("aws-kms", aws_ref)
    assert (seen["globex"].provider, seen["globex"].key_ref) == (
        "vault-transit",
        vault_tenant.key_ref,
    )

    def read(tenant: str) -> list[str]:
        with tenant_context(tenant), sessions() as s:
            q = select(Secret).where(Secret.tenant_id == tenant).order_by(Secret.id)
            return [r.value for r in s.scalars(q)]

    assert read("acme") == ["acme-0", "acme-1", "acme-2"]
    assert read("globex") == ["globex-0", "globex-1", "globex-2"]

    # acme revokes in AWS; globex, in Vault, is unaffected.
    kms.disable(aws_ref)
    try:
        cmk.forget_tenant()
        with pytest.raises(KeyAccessDeniedError) as info:
            read("acme")
        assert (info.value.tenant, info.value.provider) == ("acme", "aws-kms")
        assert read("globex") == ["globex-0", "globex-1", "globex-2"]
    finally:
        kms.enable(aws_ref)
    assert read("acme") == ["acme-0", "acme-1", "acme-2"]
    engine.dispose()
