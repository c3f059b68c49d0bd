"""Models of the searchable-column tests (issue 10), tables prefixed ``srch_``.

Their own metadata, so the shared models' tables are not created for these tests, and the two
tables searchable columns need (``cmk_tenant_keys``, ``cmk_search_indexes``).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, String, delete, insert, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_cmk import CMK, EncryptedMixin, EncryptedType, tenant_column
from sqlalchemy_cmk.search import BlindIndex, last_digits, search_tables
from sqlalchemy_cmk.testing import FakeKeyProvider, MemoryAuditSink

TENANT_KEYS = {"acme": "fake://acme", "globex": "fake://globex"}
#: The domain both e-mail columns share, so that they can be joined.
EMAIL_DOMAIN = "srch.email"


class SearchBase(DeclarativeBase):
    pass


class SrchUser(EncryptedMixin, SearchBase):
    """Exact unique e-mail (shared domain), a 2-bit SSN index (collisions are the rule) with a
    derived last-four index, and an NFKC-normalized exact name."""

    __tablename__ = "srch_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = tenant_column(String(50))
    email: Mapped[str | None] = mapped_column(
        EncryptedType(
            String(255), search=BlindIndex(normalize="email", unique=True, domain=EMAIL_DOMAIN)
        ),
        nullable=True,
    )
    ssn: Mapped[str | None] = mapped_column(
        EncryptedType(
            String(20),
            search=[
                BlindIndex(bits=2),
                BlindIndex(name="ssn_last4", transform=last_digits(4), bits=2),
            ],
        ),
        nullable=True,
    )
    name: Mapped[str | None] = mapped_column(
        EncryptedType(String(100), search=BlindIndex(normalize="nfkc", bits=128)), nullable=True
    )
    note: Mapped[str | None] = mapped_column(String(50), nullable=True)


class SrchContact(EncryptedMixin, SearchBase):
    """Another table whose e-mail shares SrchUser.email's domain (a join works between them)."""

    __tablename__ = "srch_contacts"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = tenant_column(String(50))
    email: Mapped[str | None] = mapped_column(
        EncryptedType(
            String(255), search=BlindIndex(normalize="email", bits=128, domain=EMAIL_DOMAIN)
        ),
        nullable=True,
    )
    label: Mapped[str | None] = mapped_column(String(50), nullable=True)


class SrchTiny(EncryptedMixin, SearchBase):
    """A 1-bit index: half of all values collide with any term."""

    __tablename__ = "srch_tiny"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = tenant_column(String(50))
    code: Mapped[str | None] = mapped_column(
        EncryptedType(String(50), search=BlindIndex(bits=1)), nullable=True
    )


class SrchProp(EncryptedMixin, SearchBase):
    """A 2-bit index with a normalizer, for the property tests: collisions at every step."""

    __tablename__ = "srch_props"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = tenant_column(String(50))
    code: Mapped[str | None] = mapped_column(
        EncryptedType(String(20), search=BlindIndex(normalize=("trim", "lower"), bits=2)),
        nullable=True,
    )


KEYS_TABLE, STATES_TABLE = search_tables(SearchBase.metadata)


def domains(*models: Any) -> dict[str, tuple[BlindIndex, int]]:
    """Each index domain of ``models``: its declaration and width."""
    out: dict[str, tuple[BlindIndex, int]] = {}
    for model in models:
        table = model.__table__
        for col in table.columns:
            for ix in getattr(col.type, "search", ()):
                name = ix.name or f"{col.name}_bidx"
                out[ix.domain or f"{table.name}.{name}"] = (ix, ix.width)
    return out


def set_phase(engine: Engine, cmk: CMK | None, *models: Any, phase: str = "ready") -> None:
    """Record every domain of ``models`` in ``phase`` (slot 0, version 1), as the build tool
    would, and drop ``cmk``'s cached states."""
    now = datetime.datetime.now(datetime.timezone.utc)
    with engine.begin() as conn:
        for domain, (ix, bits) in domains(*models).items():
            conn.execute(delete(STATES_TABLE).where(STATES_TABLE.c.domain == domain))
            conn.execute(
                insert(STATES_TABLE).values(
                    domain=domain,
                    phase=phase,
                    slot=0,
                    version=1,
                    bits=bits,
                    fingerprint=ix.fingerprint,
                    updated_at=now,
                )
            )
    if cmk is not None:
        cmk._search.forget()


@dataclass
class SearchEnv:
    engine: Engine
    Session: sessionmaker[Any]
    cmk: CMK
    kms: FakeKeyProvider
    audit: MemoryAuditSink

    def raw(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params))

    def ready(self) -> None:
        set_phase(self.engine, self.cmk, SrchUser, SrchContact, SrchTiny, SrchProp)


def make_search_env(engine: Engine, *, ready: bool = True, **cmk_kwargs: Any) -> SearchEnv:
    SearchBase.metadata.create_all(engine)
    kms = FakeKeyProvider()
    audit = MemoryAuditSink()
    cmk_kwargs.setdefault("audit_sinks", [audit])
    cmk = CMK(kms, tenant_keys=TENANT_KEYS, **cmk_kwargs)
    maker = sessionmaker(engine, expire_on_commit=False)
    cmk.install(maker)
    env = SearchEnv(engine, maker, cmk, kms, audit)
    if ready:
        env.ready()
    return env
