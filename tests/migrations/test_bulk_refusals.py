"""Every bulk path of the migration tools audits what it refuses (issue 12): path x fault.

The runtime's matrix (``tests/db/_access_matrix.py``) for the operator's tools, which read every
tenant's rows in a cross-tenant context. A *cell* is one bulk path (backfill verify, rotate,
decrypt and encrypt in place, a move into binary storage, build and verify a blind index) run
under one fault (a tampered companion, another tenant's ciphertext and EDEK copied into a row,
the tenant's KMS denying, not knowing or not reaching the key, or none). Each cell starts from
four rows (acme's 1 and 3, globex's 2 and 4, one batch) and a cold key cache; the fault breaks both
of acme's rows.

What each tenant must get, and nobody else:

* a path that raises gives one refusal event for the batch, with the outcome the error stands
  for, before the error propagates;
* a checker that counts failures instead of raising (``verify``, ``verify_index``) gives one
  refusal event per batch, claimed tenant and error, with the rows refused in ``rows``;
* a refusal is the context's: ``tenant`` is ``None`` (the tool's cross-tenant context), so no
  tenant's delivery gets it, and the tenant the refused rows claim (unauthenticated) is only in
  ``row_tenant``, for the application's own sinks. A seal runs under its row's tenant context
  (``CMK.seal``), and is that tenant's;
* an event naming a tenant holds only that tenant's details (its key, never a row tenant).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, String, Text, delete, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from migrations_helpers import backfill, search_index
from sqlalchemy_cmk import CMK, EncryptedMixin, EncryptedType, tenant_column, tenant_context
from sqlalchemy_cmk.errors import (
    CMKError,
    KeyAccessDeniedError,
    KeyNotFoundError,
    KMSUnavailableError,
    TenantMismatchError,
)
from sqlalchemy_cmk.search import BlindIndex, search_tables
from sqlalchemy_cmk.testing import FakeKeyProvider, MemoryAuditSink

ACME, GLOBEX = "acme", "globex"
TENANT_KEYS = {ACME: "fake://acme", GLOBEX: "fake://globex"}
TABLE = "br_people"
INDEX = f"{TABLE}.email_bidx"
ROWS = {1: ACME, 2: GLOBEX, 3: ACME, 4: GLOBEX}
BROKEN = (1, 3)  # acme's rows, which every fault breaks
ACCESS_OPS = ("encrypt", "decrypt", "search")


class PlainBase(DeclarativeBase):
    pass


class PlainPerson(EncryptedMixin, PlainBase):
    """How the rows were written: before the email became searchable."""

    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = tenant_column(String(20))
    email: Mapped[str | None] = mapped_column(EncryptedType(String(100)), nullable=True)
    note: Mapped[str | None] = mapped_column(
        EncryptedType(Text, storage="text", allow_plaintext=True), nullable=True
    )
    note_bin: Mapped[str | None] = mapped_column(EncryptedType(Text), nullable=True)  # move target


class Base(DeclarativeBase):
    pass


class Person(EncryptedMixin, Base):
    """The model the tools are given: the email searchable."""

    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = tenant_column(String(20))
    email: Mapped[str | None] = mapped_column(
        EncryptedType(String(100), search=BlindIndex()), nullable=True
    )
    note: Mapped[str | None] = mapped_column(
        EncryptedType(Text, storage="text", allow_plaintext=True), nullable=True
    )
    note_bin: Mapped[str | None] = mapped_column(EncryptedType(Text), nullable=True)  # move target


STATES = search_tables(Base.metadata)[1]


class RefusingKMS(FakeKeyProvider):
    """Refuses every unwrap under the key references in ``refuse``, each time with a fresh
    error of the class given (as a KMS answers each call)."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse: dict[str, type[CMKError]] = {}

    def unwrap_key(self, key_ref: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        error = self.refuse.get(key_ref)
        if error is not None:
            raise error(f"key {key_ref!r} refused (test)", key_ref=key_ref, provider=self.scheme)
        return super().unwrap_key(key_ref, wrapped, context)


@dataclass
class Env:
    engine: Engine
    cmk: CMK
    kms: RefusingKMS
    audit: MemoryAuditSink

    def raw(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.begin() as conn:
            result = conn.execute(text(sql), params)
            return list(result.all()) if result.returns_rows else []


@pytest.fixture
def env(engine: Engine) -> Iterator[Env]:
    Base.metadata.create_all(engine)
    kms = RefusingKMS()
    audit = MemoryAuditSink()
    # One attempt: a KMS that is down fails at once instead of after the retry deadline.
    cmk = CMK(kms, tenant_keys=TENANT_KEYS, audit_sinks=[audit], retry_attempts=1)
    yield Env(engine, cmk, kms, audit)
    kms.refuse.clear()


# -- paths -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Path:
    operation: str  # of the access a refusal is audited as
    run: Callable[[Env], Any]
    checker: bool = False  # counts failures instead of raising
    seals: bool = False  # a KMS refusal meets the row's key in its tenant's seal
    prepare: Callable[[Env], None] | None = None  # after the rows are written
    skip: frozenset[str] = frozenset()  # faults that break nothing the path reads


def _plaintext_notes(env: Env) -> None:
    for pk in ROWS:
        env.raw(f"update {TABLE} set note = :n where id = :k", n=f"note {pk}", k=pk)


def _build(env: Env) -> None:
    search_index.build_index(env.engine, env.cmk, Base.metadata, INDEX, settle=0)


PATHS: dict[str, Path] = {
    "verify": Path(
        "decrypt",
        lambda env: backfill.verify(
            env.engine, env.cmk, TABLE, metadata=Base.metadata, batch_size=10
        ),
        checker=True,
    ),
    "rotate": Path(
        "decrypt",
        lambda env: backfill.rotate_data_keys(
            env.engine, env.cmk, TABLE, metadata=Base.metadata, batch_size=10
        ),
    ),
    "decrypt": Path(
        "decrypt",
        lambda env: backfill.decrypt_columns(
            env.engine, env.cmk, TABLE, ["note"], metadata=Base.metadata, batch_size=10
        ),
    ),
    # The notes in plaintext, the emails encrypted: the rows keep their EDEK, which is checked
    # against the row's tenant and unwrapped by the seal. The tampering is not read (the seal
    # proves the row's key by a second unwrap: the tampered row id is no value).
    "encrypt": Path(
        "encrypt",
        lambda env: backfill.encrypt_columns(
            env.engine, env.cmk, TABLE, ["note"], metadata=Base.metadata, batch_size=10
        ),
        seals=True,
        prepare=_plaintext_notes,
        skip=frozenset({"tampered"}),
    ),
    # The notes moved into binary storage: each opened under its row's key, sealed again.
    "move": Path(
        "decrypt",
        lambda env: backfill.encrypt_columns(
            env.engine,
            env.cmk,
            TABLE,
            ["note"],
            into={"note": "note_bin"},
            metadata=Base.metadata,
            batch_size=10,
        ),
    ),
    "build_index": Path(
        "decrypt",
        lambda env: search_index.build_index(
            env.engine, env.cmk, Base.metadata, INDEX, batch_size=10, settle=0
        ),
    ),
    "verify_index": Path(
        "decrypt",
        lambda env: search_index.verify_index(
            env.engine, env.cmk, Base.metadata, INDEX, batch_size=10
        ),
        checker=True,
        prepare=_build,
    ),
}

# -- faults ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    outcome: str
    error: str
    claimed: str  # the tenant the broken rows claim (their EDEK's)
    kms: type[CMKError] | None = None  # what acme's KMS answers every unwrap with


FAULTS: dict[str, Fault | None] = {
    "none": None,
    "tampered": Fault("tampered", "DecryptionError", ACME),
    "other_tenant": Fault("mismatch", "TenantMismatchError", GLOBEX),
    "kms_denied": Fault("denied", "KeyAccessDeniedError", ACME, KeyAccessDeniedError),
    "key_not_found": Fault("not_found", "KeyNotFoundError", ACME, KeyNotFoundError),
    "kms_unavailable": Fault("unavailable", "KMSUnavailableError", ACME, KMSUnavailableError),
}


def reset(env: Env, path: Path) -> None:
    """The four rows, written by the application; no index state; no fault."""
    env.kms.refuse.clear()
    with env.engine.begin() as conn:
        conn.execute(delete(Person))
        conn.execute(delete(STATES))
    maker = sessionmaker(env.engine)
    env.cmk.install(maker)
    try:
        for pk, tenant in ROWS.items():
            with tenant_context(tenant), maker.begin() as s:
                s.add(PlainPerson(id=pk, tenant_id=tenant, email=f"{pk}@{tenant}", note=f"n{pk}"))
    finally:
        env.cmk.uninstall(maker)
    if path.prepare is not None:
        path.prepare(env)


def apply_fault(env: Env, name: str) -> None:
    if name == "tampered":  # a byte of the row id: every value fails to authenticate
        for pk in BROKEN:
            (comp,) = env.raw(f"select cmk_edek from {TABLE} where id = :k", k=pk)[0]
            comp = bytearray(comp)
            comp[5] ^= 1
            env.raw(f"update {TABLE} set cmk_edek = :c where id = :k", c=bytes(comp), k=pk)
    elif name == "other_tenant":  # globex's ciphertexts and EDEK, in rows saying acme
        (email, note, comp) = env.raw(f"select email, note, cmk_edek from {TABLE} where id = 2")[0]
        for pk in BROKEN:
            env.raw(
                f"update {TABLE} set email = :e, note = :n, cmk_edek = :c where id = :k",
                e=email,
                n=note,
                c=comp,
                k=pk,
            )
    else:
        fault = FAULTS[name]
        if fault is not None and fault.kms is not None:
            env.kms.refuse[TENANT_KEYS[ACME]] = fault.kms
    env.cmk.forget_tenant()  # a cold cache: every path goes to the KMS


Event = tuple[str, str, str | None, str | None, int, str | None]


def expected(path_name: str, fault: Fault | None) -> list[Event]:
    """The access events of one cell: (operation, outcome, tenant, row_tenant, rows, error)."""
    path = PATHS[path_name]
    if fault is None:  # opened (every path but encrypt), sealed (encrypt, rotate)
        ops = {"encrypt": ["encrypt"], "rotate": ["decrypt", "encrypt"]}.get(path_name)
        if path_name == "move":
            ops = ["decrypt", "encrypt"]
        return [
            (op, "ok", tenant, None, rows, None)
            for op in ops or ["decrypt"]
            for tenant, rows in ((ACME, 2), (GLOBEX, 2))
        ]
    if path.checker:  # globex's rows opened, acme's refused: one event each, for the batch
        return [
            ("decrypt", "ok", GLOBEX, None, 2, None),
            ("decrypt", fault.outcome, None, fault.claimed, 2, fault.error),
        ]
    if path.seals and fault.kms is not None:  # the seal, under acme's context: acme's own
        return [("encrypt", fault.outcome, ACME, None, 0, fault.error)]
    return [(path.operation, fault.outcome, None, fault.claimed, 0, fault.error)]


def run_cell(env: Env, path_name: str, fault_name: str) -> None:
    path, fault = PATHS[path_name], FAULTS[fault_name]
    cell = f"{path_name} x {fault_name}"
    reset(env, path)
    apply_fault(env, fault_name)
    env.audit.events.clear()
    raised: CMKError | None = None
    result: Any = None
    try:
        result = path.run(env)
    except CMKError as exc:
        raised = exc
    if fault is None or path.checker:
        assert raised is None, (cell, raised)
    else:
        assert type(raised).__name__ == fault.error, (cell, raised)
    if path.checker and fault is not None:
        assert result.failed == {ACME: len(BROKEN)}, (cell, result)
    events = env.audit.events
    got = sorted(
        [
            (e.operation, e.outcome, e.tenant, e.row_tenant, e.rows, e.error)
            for e in events
            if e.operation in ACCESS_OPS
        ],
        key=str,
    )
    assert got == sorted(expected(path_name, fault), key=str), cell
    for e in events:
        assert e.operation not in ACCESS_OPS or e.table == TABLE, (cell, e)
        if e.tenant is not None:
            # A tenant's event holds only its own details: its own key, no row tenant.
            assert e.row_tenant is None, (cell, e)
            assert e.key_ref in (None, TENANT_KEYS[e.tenant]), (cell, e)


@pytest.mark.parametrize("path_name", list(PATHS))
def test_bulk_path_audits_every_refusal(env: Env, path_name: str) -> None:
    """Each fault the path reads, from a fresh start: exactly the events each tenant gets."""
    for fault_name in FAULTS:
        if fault_name not in PATHS[path_name].skip:
            run_cell(env, path_name, fault_name)


def test_decrypt_refuses_another_tenants_ciphertext(env: Env) -> None:
    """decrypt_columns checks each row's tenant against its EDEK, as a load does: globex's
    ciphertext and EDEK copied into a row saying acme were decrypted into that row, in
    plaintext, for acme's application to read. Now refused before any key is unwrapped for
    the batch (as a load checks tenants first), and nothing is written."""
    reset(env, PATHS["decrypt"])
    apply_fault(env, "other_tenant")
    before = env.raw(f"select id, note from {TABLE} order by id")
    env.kms.reset_counts()
    with pytest.raises(TenantMismatchError) as info:
        backfill.decrypt_columns(env.engine, env.cmk, TABLE, ["note"], metadata=Base.metadata)
    assert info.value.row_tenant == GLOBEX
    assert env.kms.unwrap_count == 0
    assert env.raw(f"select id, note from {TABLE} order by id") == before
