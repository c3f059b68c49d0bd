"""Models, key setup and raw-database helpers shared by the adversarial suites.

The models cover the mapping shapes the library must get right: a plain model with one encrypted
column per common type and a declared tenant column, joined-table inheritance with encrypted
columns on both tables, single-table inheritance with an encrypted column on the subclass, and a
parent/child relationship whose child has no tenant column (its tenant is the one current when
it entered the session).

The tenant column is declared the way ``sqlalchemy_cmk.tenant_column()`` declares it (a
``mapped_column`` with ``info={"sqlalchemy_cmk": "tenant"}``), spelled out so that these models
import before that helper exists.
"""

from __future__ import annotations

import datetime
import decimal
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    LargeBinary,
    Numeric,
    String,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from sqlalchemy_cmk import CMK, EDEKType, EncryptedMixin, EncryptedType, TenantNotConfiguredError
from sqlalchemy_cmk.registry import TenantKeys
from sqlalchemy_cmk.testing import FakeKeyProvider, MemoryAuditSink

TENANTS = ("acme", "globex")
_TENANT_INFO = {"sqlalchemy_cmk": "tenant"}


def _tenant_column() -> Any:
    return mapped_column(String(50), nullable=True, info=_TENANT_INFO)


class Base(DeclarativeBase):
    pass


class Record(EncryptedMixin, Base):
    """A plain model: a declared tenant column, a plain column, six encrypted types."""

    __tablename__ = "adv_records"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str | None] = _tenant_column()
    label: Mapped[str | None] = mapped_column(String(100))
    s: Mapped[str | None] = mapped_column(EncryptedType(String(40)))
    doc: Mapped[Any] = mapped_column(EncryptedType(JSON), nullable=True)
    n: Mapped[int | None] = mapped_column(EncryptedType(Integer))
    amount: Mapped[decimal.Decimal | None] = mapped_column(EncryptedType(Numeric(12, 2)))
    at: Mapped[datetime.datetime | None] = mapped_column(EncryptedType(DateTime(timezone=True)))
    blob: Mapped[bytes | None] = mapped_column(EncryptedType(LargeBinary))


class Person(EncryptedMixin, Base):
    """Joined-table inheritance: the base table holds the tenant column and one value."""

    __tablename__ = "adv_people"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(20))
    tenant_id: Mapped[str | None] = _tenant_column()
    name: Mapped[str | None] = mapped_column(EncryptedType(String(60)))

    __mapper_args__: ClassVar[dict[str, Any]] = {
        "polymorphic_on": "kind",
        "polymorphic_identity": "person",
    }


class Employee(Person):
    """The subclass table has encrypted columns and a companion of its own."""

    __tablename__ = "adv_employees"

    id: Mapped[int] = mapped_column(ForeignKey("adv_people.id"), primary_key=True)
    employee_edek: Mapped[bytes | None] = mapped_column(EDEKType(), nullable=True)
    salary: Mapped[int | None] = mapped_column(EncryptedType(Integer))
    badge: Mapped[str | None] = mapped_column(EncryptedType(String(30)))

    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "employee"}


class Animal(EncryptedMixin, Base):
    """Single-table inheritance: the subclass adds an encrypted column to the same table."""

    __tablename__ = "adv_animals"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(20))
    tenant_id: Mapped[str | None] = _tenant_column()
    name: Mapped[str | None] = mapped_column(EncryptedType(String(60)))

    __mapper_args__: ClassVar[dict[str, Any]] = {
        "polymorphic_on": "kind",
        "polymorphic_identity": "animal",
    }


class Dog(Animal):
    chip: Mapped[str | None] = mapped_column(EncryptedType(String(40)), nullable=True)

    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "dog"}


class Folder(EncryptedMixin, Base):
    __tablename__ = "adv_folders"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str | None] = _tenant_column()
    title: Mapped[str | None] = mapped_column(EncryptedType(String(60)))
    # No expunge/refresh-expire cascade: the state machine models those per object.
    pages: Mapped[list[Page]] = relationship(
        back_populates="folder", cascade="save-update, merge, delete", order_by="Page.id"
    )


class Page(EncryptedMixin, Base):
    """A child without a tenant column: its tenant is the one current when it was added."""

    __tablename__ = "adv_pages"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    folder_id: Mapped[int] = mapped_column(ForeignKey("adv_folders.id"))
    body: Mapped[str | None] = mapped_column(EncryptedType(String(60)))
    folder: Mapped[Folder] = relationship(back_populates="pages")


@dataclass(frozen=True)
class Kind:
    """One mapped class as the state machine sees it."""

    name: str
    cls: type[Base]
    columns: tuple[str, ...]  # encrypted attributes
    tenant_attr: str | None  # the declared tenant column, if any
    family: str


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("record", Record, ("s", "doc", "n", "amount", "at", "blob"), "tenant_id", "plain"),
        Kind("person", Person, ("name",), "tenant_id", "joined"),
        Kind("employee", Employee, ("name", "salary", "badge"), "tenant_id", "joined"),
        Kind("animal", Animal, ("name",), "tenant_id", "single"),
        Kind("dog", Dog, ("name", "chip"), "tenant_id", "single"),
        Kind("folder", Folder, ("title",), "tenant_id", "tree"),
        Kind("page", Page, ("body",), None, "tree"),
    )
}

# Raw tables per family, children first (the order rows are deleted in).
TABLES: dict[str, tuple[str, ...]] = {
    "plain": ("adv_records",),
    "joined": ("adv_employees", "adv_people"),
    "single": ("adv_animals",),
    "tree": ("adv_pages", "adv_folders"),
}
# Companion column of each raw table.
COMPANIONS = {
    "adv_records": "cmk_edek",
    "adv_people": "cmk_edek",
    "adv_employees": "employee_edek",
    "adv_animals": "cmk_edek",
    "adv_folders": "cmk_edek",
    "adv_pages": "cmk_edek",
}
# Encrypted columns of each raw table (column names).
ENCRYPTED = {
    "adv_records": ("s", "doc", "n", "amount", "at", "blob"),
    "adv_people": ("name",),
    "adv_employees": ("salary", "badge"),
    "adv_animals": ("name", "chip"),
    "adv_folders": ("title",),
    "adv_pages": ("body",),
}


class RotatingRegistry:
    """A key registry whose tenants move to a new primary key (``rotate``) and later stop
    accepting the old ones (``retire``), as a tenant does when it rotates its master key."""

    def __init__(self, tenants: tuple[str, ...] = TENANTS) -> None:
        self.generation = dict.fromkeys(tenants, 1)
        self.oldest = dict.fromkeys(tenants, 1)  # oldest generation still accepted

    def ref(self, tenant: str, generation: int) -> str:
        return f"fake://{tenant}-{generation}"

    def primary(self, tenant: str) -> str:
        return self.ref(tenant, self.generation[tenant])

    def tenant_keys(self, tenant: str) -> TenantKeys:
        if tenant not in self.generation:
            raise TenantNotConfiguredError(f"tenant {tenant!r} is not configured", tenant=tenant)
        refs = [
            self.ref(tenant, g) for g in range(self.generation[tenant], self.oldest[tenant] - 1, -1)
        ]
        return TenantKeys(refs[0], frozenset(refs))

    def rotate(self, tenant: str) -> None:
        self.generation[tenant] += 1

    def retire(self, tenant: str) -> None:
        self.oldest[tenant] = self.generation[tenant]


@dataclass
class Keys:
    """A CMK on the fake KMS with a rotating registry, and what it audited."""

    cmk: CMK
    kms: FakeKeyProvider
    registry: RotatingRegistry
    audit: MemoryAuditSink = field(default_factory=MemoryAuditSink)


def make_keys() -> Keys:
    kms = FakeKeyProvider()
    registry = RotatingRegistry()
    audit = MemoryAuditSink()
    cmk = CMK(kms, registry=registry, audit_sinks=[audit])
    return Keys(cmk, kms, registry, audit)


def clear_tables(engine: Engine) -> None:
    with engine.begin() as conn:
        for tables in TABLES.values():
            for table in tables:
                conn.execute(text(f"DELETE FROM {table}"))


def as_bytes(value: Any) -> bytes:
    """A stored cell as the bytes a search for plaintext looks at."""
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode()


def plaintext_forms(value: Any) -> list[bytes]:
    """The byte strings whose presence in the database would mean ``value`` is stored in clear.

    Callers choose values distinctive enough (12+ random characters, 9-digit numbers) that a
    substring match cannot happen by chance in ciphertext or in the plain columns.
    """
    if value is None:
        return []
    if isinstance(value, bytes):
        return [value]
    if isinstance(value, str):
        return [value.encode(), value.encode("utf-16-le")]
    if isinstance(value, datetime.datetime):
        return [value.isoformat().encode(), str(value).encode()]
    if isinstance(value, (int, decimal.Decimal)):
        return [str(value).encode()]
    if isinstance(value, dict):
        out = [json.dumps(value).encode(), json.dumps(value, separators=(",", ":")).encode()]
        for v in value.values():
            if isinstance(v, str):
                out.append(v.encode())
        return out
    return [str(value).encode()]


def raw_tables(conn: Any, tables: tuple[str, ...]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of ``tables`` as read through ``conn`` (no hooks), ordered by id."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table in tables:
        rows = conn.execute(text(f"SELECT * FROM {table} ORDER BY id")).all()
        out[table] = [
            tuple(as_bytes(v) if isinstance(v, memoryview) else v for v in r) for r in rows
        ]
    return out


def raw_dicts(conn: Any, table: str) -> Iterator[dict[str, Any]]:
    for row in conn.execute(text(f"SELECT * FROM {table} ORDER BY id")):
        yield {k: bytes(v) if isinstance(v, memoryview) else v for k, v in row._mapping.items()}
