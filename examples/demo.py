"""sqlalchemy-cmk in two minutes: SQLite, the local key provider, no cloud account.

Two tenants write patients; the raw database bytes are shown next to what the application reads;
then one tenant revokes its key and its reads fail with a typed error, while the other tenant
carries on; every key use is printed as an audit event.

Run: python examples/demo.py   (creates demo-keys.json and demo.sqlite in a temp folder)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from sqlalchemy import JSON, String, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_cmk import (
    CMK,
    AuditEvent,
    EncryptedMixin,
    EncryptedType,
    KeyAccessDeniedError,
    TenantMismatchError,
    tenant_context,
)
from sqlalchemy_cmk.providers.local import LocalKeyProvider


class Base(DeclarativeBase):
    pass


class Patient(EncryptedMixin, Base):  # EncryptedMixin adds the companion column cmk_edek
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(100))  # not secret: stays plaintext
    ssn: Mapped[str] = mapped_column(EncryptedType(String))
    notes: Mapped[dict[str, object] | None] = mapped_column(EncryptedType(JSON))


def print_event(event: AuditEvent) -> None:
    """An audit sink: any callable taking an AuditEvent (ship these to the tenant's SIEM)."""
    d = event.to_dict()
    fields = ("operation", "outcome", "tenant", "key_ref", "table", "rows", "actor", "request_id")
    print("    audit:", json.dumps({k: d[k] for k in fields if d[k] not in (None, 0, ())}))


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="sqlalchemy-cmk-demo-"))
    keyfile = LocalKeyProvider.generate_key_file(workdir / "demo-keys.json", ["acme", "globex"])
    provider = LocalKeyProvider.from_file(keyfile)

    engine = create_engine(f"sqlite:///{workdir / 'demo.sqlite'}")
    Base.metadata.create_all(engine)
    Session = sessionmaker(engine)

    cmk = CMK(
        provider,
        tenant_keys={"acme": "local://acme", "globex": "local://globex"},
        audit_sinks=[print_event],
    )
    cmk.install(Session)

    print("1. Each tenant writes patients under its own key")
    for tenant, people in {
        "acme": [("Ada", "123-45-6789"), ("Alan", "987-65-4321")],
        "globex": [("Grace", "555-12-3456")],
    }.items():
        with tenant_context(tenant, actor="demo-user", request_id=f"req-{tenant}"), Session() as s:
            s.add_all(
                Patient(tenant_id=tenant, name=n, ssn=ssn, notes={"allergies": ["penicillin"]})
                for n, ssn in people
            )
            s.commit()

    print("\n2. What the database holds vs what the application reads")
    with engine.connect() as conn:
        raw = {r.id: r for r in conn.execute(text("SELECT id, ssn, cmk_edek FROM patients"))}
    for tenant in ("acme", "globex"):
        with tenant_context(tenant, actor="demo-user"), Session() as s:
            for p in s.scalars(select(Patient).where(Patient.tenant_id == tenant)):
                print(f"   {tenant:7} {p.name:6} app reads ssn={p.ssn!r}")
                print(f"           stored ssn  = {raw[p.id].ssn.hex()[:48]}...")
                print(f"           stored EDEK = {raw[p.id].cmk_edek.hex()[:48]}...")

    print("\n3. A query that forgets to filter by tenant is stopped")
    try:
        with tenant_context("globex", actor="demo-user"), Session() as s:
            s.scalars(select(Patient)).all()
    except TenantMismatchError as exc:
        print(f"   {type(exc).__name__}: {exc}")

    print("\n4. acme revokes its key in its KMS")
    provider.revoke("acme")
    cmk.forget_tenant("acme")  # without this, revocation bites within cache_ttl (60 s)
    try:
        with tenant_context("acme", actor="demo-user"), Session() as s:
            s.scalars(select(Patient).where(Patient.tenant_id == "acme")).all()
    except KeyAccessDeniedError as exc:
        print(f"   {type(exc).__name__}: {exc}")
    with tenant_context("globex", actor="demo-user"), Session() as s:
        names = [p.name for p in s.scalars(select(Patient).where(Patient.tenant_id == "globex"))]
        print(f"   globex is unaffected and still reads {names}")

    print("\n5. acme restores access: nothing was lost")
    provider.restore("acme")
    with tenant_context("acme", actor="demo-user"), Session() as s:
        ssns = [p.ssn for p in s.scalars(select(Patient).where(Patient.tenant_id == "acme"))]
        print(f"   acme reads {ssns}")

    engine.dispose()
    print(f"\nFiles: {workdir}")


if __name__ == "__main__":
    main()
