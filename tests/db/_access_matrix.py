"""Every access gives exactly one access event, refused ones included (issue 12): access path x
fault, for the write and read matrices (``test_write_matrix.py``, ``test_mapping_and_audit.py``).

A *cell* is one access path (a flush of a new row, a load, a lazy first access, a search...)
run under one fault (no tenant, another tenant's row, a tampered value or companion, a revoked
tenant, the tenant's KMS denying or down, or none). Each cell starts from the same two rows
(one of acme, one of globex) and a cold key cache, so every path reaches its KMS; the recording
sink must then hold exactly one ``encrypt``/``decrypt``/``search`` event for the access, with
the outcome the fault stands for, the *context's* tenant, the row's claimed tenant only in
``row_tenant``, and no event at all for any other tenant than the context's (so no actor or
request id crosses to another tenant). Tables are prefixed ``acc_``.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, String, delete, insert, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_cmk import (
    CMK,
    CMKError,
    EncryptedDocument,
    EncryptedMixin,
    EncryptedType,
    tenant_column,
    tenant_context,
)
from sqlalchemy_cmk.audit import AuditEvent
from sqlalchemy_cmk.search import BlindIndex, search_tables
from sqlalchemy_cmk.testing import FakeKeyProvider, MemoryAuditSink

ACME, GLOBEX = "acme", "globex"
TENANT_KEYS = {ACME: "fake://acme", GLOBEX: "fake://globex"}
TABLE = "acc_records"
NAMESPACE = "acc_docs"
ACCESS_OPS = ("encrypt", "decrypt", "search")
# The context's audit metadata: it must never reach another tenant's events.
META = {"actor": "actor-of-the-context", "request_id": "req-of-the-context"}


class AccBase(DeclarativeBase):
    pass


class AccRec(EncryptedMixin, AccBase):
    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = tenant_column(String(50))
    ssn: Mapped[str | None] = mapped_column(EncryptedType(String(50)), nullable=True)
    email: Mapped[str | None] = mapped_column(
        EncryptedType(String(100), search=BlindIndex(bits=128)), nullable=True
    )


KEYS_TABLE, STATES_TABLE = search_tables(AccBase.metadata)
ROWS = {1: ACME, 2: GLOBEX}


@dataclass
class AccEnv:
    engine: Engine
    Session: sessionmaker[Session]
    cmk: CMK
    kms: FakeKeyProvider
    audit: MemoryAuditSink
    docs: dict[str, EncryptedDocument] = field(default_factory=dict)

    def raw(self, sql: str, **params: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(sql), params)

    def reset(self, *, cold: bool = True) -> None:
        """Two rows (acme's id 1, globex's id 2), a document of each, no fault; nothing cached
        unless ``cold`` is False (then what the writes cached stays)."""
        self.kms.heal()
        for ref in TENANT_KEYS.values():
            self.kms.allow(ref)
        self.cmk.reinstate(ACME)
        with self.engine.begin() as conn:
            conn.execute(delete(AccRec.__table__))
        for row_id, tenant in ROWS.items():
            with tenant_context(tenant), self.Session() as s:
                # A searchable value: the tenant gets a search root key, which a search reads.
                s.add(
                    AccRec(
                        id=row_id, tenant_id=tenant, ssn=f"ssn-{tenant}", email=f"{tenant}@x.org"
                    )
                )
                s.commit()
            with tenant_context(tenant):
                self.docs[tenant] = self.cmk.encrypt_document(
                    {"ssn": f"doc-{tenant}".encode()}, namespace=NAMESPACE
                )
        if cold:
            self.cmk.forget_tenant()
        self.audit.events.clear()


def make_acc_env(engine: Engine) -> AccEnv:
    AccBase.metadata.create_all(engine)
    now = datetime.datetime.now(datetime.timezone.utc)
    with engine.begin() as conn:  # the blind index is built (no rows predate it)
        conn.execute(delete(STATES_TABLE))
        for col in AccRec.__table__.columns:
            for ix in getattr(col.type, "search", ()):
                conn.execute(
                    insert(STATES_TABLE).values(
                        domain=f"{TABLE}.{col.name}_bidx",
                        phase="ready",
                        slot=0,
                        version=1,
                        bits=ix.width,
                        fingerprint=ix.fingerprint,
                        updated_at=now,
                    )
                )
    kms = FakeKeyProvider()
    audit = MemoryAuditSink()
    # One attempt: a KMS that is down fails at once instead of after the retry deadline.
    cmk = CMK(kms, tenant_keys=TENANT_KEYS, audit_sinks=[audit], retry_attempts=1)
    maker = sessionmaker(engine, expire_on_commit=False)
    cmk.install(maker)
    return AccEnv(engine, maker, cmk, kms, audit)


# -- faults ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    outcome: str  # the access event's outcome
    error: str  # the exception class the access raises ("" for none)
    target: int = 1  # the row the path accesses
    tenant: str | None = ACME  # the context's tenant (None: no context)


FAULTS: dict[str, Fault] = {
    "none": Fault("ok", ""),
    "no_tenant": Fault("no_tenant", "NoTenantError", tenant=None),
    "other_tenant": Fault("mismatch", "TenantMismatchError", target=2),
    "tampered_value": Fault("tampered", "DecryptionError"),
    "tampered_companion": Fault("tampered", "DecryptionError"),
    "revoked": Fault("denied", "TenantRevokedError"),
    "kms_denied": Fault("denied", "KeyAccessDeniedError"),
    "kms_down": Fault("unavailable", "KMSUnavailableError"),
}


def _flip_last(value: bytes) -> bytes:
    return value[:-1] + bytes([value[-1] ^ 1])


def apply_fault(env: AccEnv, fault: str, *, cold: bool = True) -> None:
    """Break what ``fault`` breaks, after the path's preparation (a pre-load must not fail)."""
    if fault in ("tampered_value", "tampered_companion"):
        column = "ssn" if fault == "tampered_value" else "cmk_edek"
        # In SQL text: the column's type would refuse a value not sealed by the hooks.
        with env.engine.begin() as conn:
            (stored,) = conn.execute(text(f"select {column} from {TABLE} where id = 1")).one()
            stored = bytes(stored)
            bad = _flip_last(stored) if column == "ssn" else b"\x07" + stored[1:]
            conn.execute(text(f"update {TABLE} set {column} = :v where id = 1"), {"v": bad})
        doc = env.docs[ACME]
        env.docs[ACME] = (
            EncryptedDocument(doc.edek, {"ssn": _flip_last(doc.fields["ssn"])})
            if column == "ssn"
            else EncryptedDocument(b"\x07" + doc.edek[1:], doc.fields)
        )
    elif fault == "revoked":
        env.cmk.revoke(ACME)
    elif fault == "kms_denied":
        env.kms.deny(TENANT_KEYS[ACME])
    elif fault == "kms_down":
        env.kms.inject("unavailable", count=None)
    if cold:
        env.cmk.forget_tenant()  # every path goes to the KMS


# -- access paths --------------------------------------------------------------------------------

Prepared = Callable[[], Any]  # runs the access under the cell's context


@dataclass(frozen=True)
class Path:
    operation: str
    table: str
    prepare: Callable[[AccEnv, Fault, list[Any]], Prepared]
    # Faults that do not apply: nothing of what they break is read by the path.
    skip: frozenset[str] = frozenset()


def _ctx(fault: Fault) -> AbstractContextManager[Any]:
    return nullcontext() if fault.tenant is None else tenant_context(fault.tenant, **META)


def _session(env: AccEnv, cleanup: list[Any]) -> Session:
    s = env.Session()
    cleanup.append(s)
    return s


def _orm_add(env: AccEnv, fault: Fault, cleanup: list[Any]) -> Prepared:
    s = _session(env, cleanup)
    tenant = GLOBEX if fault.target == 2 else ACME
    # Another tenant's row: added under globex's context, flushed under acme's.
    with tenant_context(tenant):
        s.add(AccRec(id=3, tenant_id=tenant, ssn="new"))
    return s.commit


def _orm_attribute(env: AccEnv, fault: Fault, cleanup: list[Any]) -> Prepared:
    s = _session(env, cleanup)
    with tenant_context(ROWS[fault.target]):
        rec = s.get(AccRec, fault.target)
    assert rec is not None

    def run() -> None:
        rec.ssn = "changed"
        s.commit()

    return run


def _orm_bulk_insert(env: AccEnv, fault: Fault, cleanup: list[Any]) -> Prepared:
    s = _session(env, cleanup)
    tenant = GLOBEX if fault.target == 2 else ACME
    return lambda: s.execute(insert(AccRec), [{"id": 3, "tenant_id": tenant, "ssn": "new"}])


def _encrypt_document(env: AccEnv, fault: Fault, cleanup: list[Any]) -> Prepared:
    return lambda: env.cmk.encrypt_document({"ssn": b"new"}, namespace=NAMESPACE)


def _orm_get(env: AccEnv, fault: Fault, cleanup: list[Any]) -> Prepared:
    s = _session(env, cleanup)
    return lambda: s.get(AccRec, fault.target)


def _streamed(env: AccEnv, fault: Fault, cleanup: list[Any]) -> Prepared:
    s = _session(env, cleanup)
    stmt = select(AccRec).where(AccRec.id == fault.target).execution_options(yield_per=1)
    return lambda: [r.ssn for part in s.execute(stmt).scalars().partitions() for r in part]


def _lazy(env: AccEnv, fault: Fault, cleanup: list[Any]) -> Prepared:
    s = _session(env, cleanup)
    stmt = select(AccRec).where(AccRec.id == fault.target).execution_options(cmk_lazy=True)

    def run() -> Any:
        (rec,) = s.scalars(stmt).all()  # checks only: the first access decrypts
        return rec.ssn

    return run


def _decrypt_row(env: AccEnv, fault: Fault, cleanup: list[Any]) -> Prepared:
    t = AccRec.__table__

    def run() -> Any:
        with env.engine.connect() as conn:  # not installed: the raw stored row
            row = conn.execute(select(t).where(t.c.id == fault.target)).one()._mapping
        return env.cmk.decrypt_row(t, row)

    return run


def _decrypt_document(env: AccEnv, fault: Fault, cleanup: list[Any]) -> Prepared:
    def run() -> Any:
        return env.cmk.decrypt_document(env.docs[ROWS[fault.target]], namespace=NAMESPACE)

    return run


def _search(env: AccEnv, fault: Fault, cleanup: list[Any]) -> Prepared:
    s = _session(env, cleanup)
    return lambda: s.execute(select(AccRec.id).where(AccRec.email == "acme@x.org")).all()


_NEW_ROWS = frozenset({"tampered_value", "tampered_companion"})  # nothing stored is read
WRITE_PATHS: dict[str, Path] = {
    "orm_add": Path("encrypt", TABLE, _orm_add, _NEW_ROWS),
    "orm_attribute": Path("encrypt", TABLE, _orm_attribute),
    "orm_bulk_insert": Path("encrypt", TABLE, _orm_bulk_insert, _NEW_ROWS),
    "encrypt_document": Path("encrypt", NAMESPACE, _encrypt_document, _NEW_ROWS | {"other_tenant"}),
}
READ_PATHS: dict[str, Path] = {
    "orm_get": Path("decrypt", TABLE, _orm_get),
    "streamed": Path("decrypt", TABLE, _streamed),
    "lazy_first_access": Path("decrypt", TABLE, _lazy),
    "decrypt_row": Path("decrypt", TABLE, _decrypt_row),
    "decrypt_document": Path("decrypt", NAMESPACE, _decrypt_document),
    # A search's own access (the ids only: no value decrypted). It reads the tenant's search
    # root key, not the rows: another tenant's rows are simply not found.
    "search": Path("search", TABLE, _search, _NEW_ROWS | {"other_tenant"}),
}
PATHS = {**WRITE_PATHS, **READ_PATHS}


def cells(paths: dict[str, Path]) -> list[tuple[str, str]]:
    return [(p, f) for p, path in paths.items() for f in FAULTS if f not in path.skip]


def run_cell(env: AccEnv, path_name: str, fault_name: str) -> None:
    """Run one cell from a fresh start and a cold cache, and check its events exactly."""
    path, fault = PATHS[path_name], FAULTS[fault_name]
    raised = run_access(env, path_name, fault_name)
    if fault.outcome == "ok":
        assert raised is None, (path_name, fault_name, raised)
    else:
        assert type(raised).__name__ == fault.error, (path_name, fault_name, raised)
    check_events(env.audit.events, path, fault, f"{path_name} x {fault_name}")


def run_access(
    env: AccEnv, path_name: str, fault_name: str, *, cold: bool = True
) -> CMKError | None:
    """Reset, prepare the path, break what the fault breaks, run the access; return what it
    raised (None if it did not)."""
    path, fault = PATHS[path_name], FAULTS[fault_name]
    env.reset(cold=cold)
    cleanup: list[Any] = []
    try:
        run = path.prepare(env, fault, cleanup)
        apply_fault(env, fault_name, cold=cold)
        env.audit.events.clear()
        with _ctx(fault):
            try:
                run()
            except CMKError as exc:
                return exc
        return None
    finally:
        for s in cleanup:
            s.close()


# The outcome each refusal stands for, by the exception class the caller saw.
OUTCOME_OF = {f.error: f.outcome for f in FAULTS.values() if f.error}


def check_agrees(env: AccEnv, path_name: str, fault_name: str, raised: CMKError | None) -> None:
    """Whatever happened, the one access event says it: ``ok`` if the caller got the data,
    else the outcome of the error the caller got; for the context's tenant only."""
    path, fault = PATHS[path_name], FAULTS[fault_name]
    cell = f"{path_name} x {fault_name}"
    access = [e for e in env.audit.events if e.operation in ACCESS_OPS]
    assert len(access) == 1, (cell, access)
    (event,) = access
    assert (event.operation, event.table, event.tenant) == (
        path.operation,
        path.table,
        fault.tenant,
    )
    if raised is None:
        assert (event.outcome, event.error) == ("ok", None), cell
    else:
        assert event.error == type(raised).__name__, cell
        assert event.outcome == OUTCOME_OF.get(event.error, "error"), cell
    for e in env.audit.events:
        assert e.tenant == fault.tenant, (cell, e)


def check_events(events: list[AuditEvent], path: Path, fault: Fault, cell: str) -> None:
    access = [e for e in events if e.operation in ACCESS_OPS]
    got = [(e.operation, e.outcome, e.tenant, e.table, e.row_tenant) for e in access]
    row_tenant = GLOBEX if fault.outcome == "mismatch" else None
    assert got == [(path.operation, fault.outcome, fault.tenant, path.table, row_tenant)], cell
    assert access[0].error == (fault.error or None), cell
    for e in events:
        # Nothing for another tenant than the context's: no actor or request id crosses over.
        assert e.tenant == fault.tenant, (cell, e)
        if fault.tenant is not None:
            assert (e.actor, e.request_id) == (META["actor"], META["request_id"]), (cell, e)


def acc_env_fixture(engine: Engine) -> Iterator[AccEnv]:
    env = make_acc_env(engine)
    yield env
    env.kms.heal()


def faults_of(path: str) -> list[str]:
    return [f for f in FAULTS if f not in PATHS[path].skip]
