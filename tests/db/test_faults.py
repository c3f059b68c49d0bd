"""Fault injection at every KMS call of a multi-tenant, multi-table flush and load.

The test searches rather than lists: it runs each operation once against a healthy fake KMS to
count its provider calls, then, for every call index k and every fault, breaks the KMS from
call k on (so that retries cannot hide the fault) and checks what a user would:

* the operation raised a typed ``CMKError`` (no ``TypeError``, no hang past ``kms_deadline``);
* the transaction was rolled back: the raw database holds exactly what it held before (no new
  rows, no changed bytes, so no plaintext either);
* no instance attribute was left holding ciphertext (``EncryptedValue``) or sealed bytes;
* once the KMS is healed, the same operation succeeds and every row reads back.
"""

from __future__ import annotations

import decimal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import JSON, Engine, ForeignKey, Numeric, String, inspect, select, text
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

from sqlalchemy_cmk import (
    CMK,
    AuditError,
    CMKError,
    EncryptedMixin,
    EncryptedType,
    cross_tenant_context,
    tenant_context,
)
from sqlalchemy_cmk._mapping import mapper_spec
from sqlalchemy_cmk.audit import AuditEvent
from sqlalchemy_cmk.testing import FakeKeyProvider
from sqlalchemy_cmk.types import EncryptedValue, Sealed


class Base(DeclarativeBase):
    pass


class Account(EncryptedMixin, Base):
    __tablename__ = "fault_accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(50))
    name: Mapped[str] = mapped_column(EncryptedType(String(100)))
    balance: Mapped[decimal.Decimal | None] = mapped_column(EncryptedType(Numeric(12, 2)))
    tickets: Mapped[list[Ticket]] = relationship(back_populates="account", order_by="Ticket.id")


class Ticket(EncryptedMixin, Base):
    __tablename__ = "fault_tickets"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(50))
    account_id: Mapped[int] = mapped_column(ForeignKey("fault_accounts.id"))
    body: Mapped[Any] = mapped_column(EncryptedType(JSON))
    account: Mapped[Account] = relationship(back_populates="tickets")


TENANTS = ("acme", "globex")
# Long enough that a healthy call never misses it on a loaded 2-core CI machine running two
# test processes (0.2 s did: a KMSUnavailableError where the audit-sink test wanted AuditError).
DEADLINE = 0.5
# Each fault, and the class of what the hang/garbage may surface as is left to the library:
# any CMKError is right, as long as nothing was written.
FAULTS = ["unavailable", "denied", "error", "hang", "garbage", "wrong_length", "none", "str"]
# count=None: the KMS stays broken from call k on, so retries cannot hide the fault. count=1:
# one bad answer, which a retry may hide, and then everything must be written. A hang or a
# denial is never retried (the deadline is spent; the tenant said no): one count is enough.
COUNTS: dict[str, tuple[int | None, ...]] = {"hang": (None,), "denied": (None,)}
TABLES = ("fault_accounts", "fault_tickets")


class FlakySink:
    """An audit sink that raises from its ``fail_at``-th event on (a SIEM that went down)."""

    def __init__(self) -> None:
        self.events = 0
        self.fail_at: int | None = None

    def __call__(self, event: AuditEvent) -> None:
        index, self.events = self.events, self.events + 1
        if self.fail_at is not None and index >= self.fail_at:
            raise RuntimeError("SIEM unreachable")


@dataclass
class Env:
    engine: Engine
    Session: sessionmaker[Session]
    cmk: CMK
    kms: FakeKeyProvider
    sink: FlakySink

    seeded: dict[str, list[dict[str, Any]]] | None = None

    def reset(self) -> None:
        """Two write windows per tenant (so loads meet several keys), written once through the
        hooks and then put back byte for byte before each attempt: cheaper than writing again,
        and every attempt starts from the same state, so call k is the same call each time."""
        self.kms.heal()
        self.sink.fail_at = None
        self.cmk.forget_tenant()
        if self.seeded is None:
            self.seed()
            with self.engine.connect() as conn:
                self.seeded = {
                    table: [dict(r._mapping) for r in conn.execute(text(f"SELECT * FROM {table}"))]
                    for table in TABLES
                }
            return
        with self.engine.begin() as conn:
            for table in reversed(TABLES):
                conn.execute(text(f"DELETE FROM {table}"))
            for table in TABLES:
                rows = self.seeded[table]
                names = list(rows[0])
                conn.execute(
                    text(
                        f"INSERT INTO {table} ({', '.join(names)}) "
                        f"VALUES ({', '.join(':' + n for n in names)})"
                    ),
                    rows,
                )

    def seed(self) -> None:
        Base.metadata.drop_all(self.engine)
        Base.metadata.create_all(self.engine)
        for window in range(2):
            self.cmk.forget_tenant()  # a new write key per window
            for tenant in TENANTS:
                with tenant_context(tenant), self.Session() as s:
                    s.add(
                        Account(
                            tenant_id=tenant,
                            name=f"{tenant}-account-{window}",
                            balance=decimal.Decimal("10.50") * (window + 1),
                            tickets=[
                                Ticket(tenant_id=tenant, body={"text": f"{tenant}-t{window}-{i}"})
                                for i in range(2)
                            ],
                        )
                    )
                    s.commit()
        self.cmk.forget_tenant()

    def raw(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every stored row, bytes as bytes: what the database really holds."""
        out = {}
        with self.engine.connect() as conn:
            for table in TABLES:
                rows = conn.execute(text(f"SELECT * FROM {table} ORDER BY id"))
                out[table] = [
                    tuple(bytes(v) if isinstance(v, (bytes, memoryview)) else v for v in row)
                    for row in rows
                ]
        return out


@pytest.fixture
def env(engine: Engine) -> Iterator[Env]:
    kms = FakeKeyProvider()
    sink = FlakySink()
    cmk = CMK(
        kms,
        tenant_keys={t: f"fake://{t}" for t in TENANTS},
        audit_sinks=[sink],
        kms_deadline=DEADLINE,
        retry_backoff=0.0,
    )
    maker = sessionmaker(engine)
    cmk.install(maker)
    yield Env(engine, maker, cmk, kms, sink)
    kms.heal()
    cmk.uninstall(maker)


# -- the operations --------------------------------------------------------------------------


def write(env: Env, s: Session) -> None:
    """Per tenant, in one transaction: load, update a loaded row (its key unwrapped inside the
    flush, since the cache is cleared), add a new account with tickets (a new write key: one wrap
    and its verifying unwrap), flush; commit once at the end."""
    loaded: dict[str, list[Account]] = {}
    for tenant in TENANTS:
        with tenant_context(tenant):
            stmt = select(Account).where(Account.tenant_id == tenant).order_by(Account.id)
            loaded[tenant] = list(s.scalars(stmt))
    env.cmk.forget_tenant()
    for tenant in TENANTS:
        with tenant_context(tenant):
            for account in loaded[tenant]:
                account.name = account.name + " (edited)"
            account = loaded[tenant][-1]
            account.tickets[0].body = {"text": "edited", "n": 1}
            s.add(
                Account(
                    tenant_id=tenant,
                    name=f"{tenant}-new",
                    balance=decimal.Decimal("1.25"),
                    tickets=[Ticket(tenant_id=tenant, body={"text": f"{tenant}-new-ticket"})],
                )
            )
            s.flush()
    with tenant_context(TENANTS[-1]):
        s.commit()


def read(env: Env, s: Session) -> None:
    """One cross-tenant load of every account and ticket (each tenant's keys, concurrently)."""
    env.cmk.forget_tenant()
    with cross_tenant_context(actor="fault-test"):
        accounts = s.scalars(
            select(Account).options(selectinload(Account.tickets)).order_by(Account.id)
        ).all()
        assert len(accounts) >= 2 * len(TENANTS)
        for a in accounts:
            assert a.name.startswith(a.tenant_id)
            assert all(t.body["text"] for t in a.tickets)


OPERATIONS: dict[str, Callable[[Env, Session], None]] = {"flush": write, "load": read}


def assert_no_ciphertext_in_objects(s: Session) -> None:
    for obj in list(s.identity_map.values()) + list(s.new):
        for key, value in vars(obj).items():
            assert type(value) not in (EncryptedValue, Sealed), (
                f"{type(obj).__name__}.{key} holds {type(value).__name__}"
            )


def readable(env: Env) -> int:
    """Every stored row decrypts under its own tenant; returns how many accounts there are."""
    env.cmk.forget_tenant()
    with cross_tenant_context(actor="fault-test"), env.Session() as s:
        accounts = s.scalars(select(Account).options(selectinload(Account.tickets))).all()
        for a in accounts:
            assert a.name and a.name.startswith(a.tenant_id)
            for t in a.tickets:
                assert t.tenant_id == a.tenant_id and t.body["text"]
        return len(accounts)


def count_calls(env: Env, operation: Callable[[Env, Session], None]) -> int:
    env.reset()
    env.kms.reset_counts()
    with env.Session() as s:
        operation(env, s)
    return len(env.kms.calls)


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_a_fault_at_every_kms_call_writes_nothing_or_everything(env: Env, name: str) -> None:
    operation = OPERATIONS[name]
    n = count_calls(env, operation)
    assert n >= (4 if name == "load" else 10), "the operation should make several KMS calls"
    added = len(TENANTS) if name == "flush" else 0
    outcomes: dict[str, int] = {}
    for k in range(n):
        for fault in FAULTS:
            for count in COUNTS.get(fault, (None, 1)):
                env.reset()
                before = env.raw()
                env.kms.inject(fault, at=k, count=count)
                where = f"{name}: {fault} at call {k} of {n} (count={count})"
                started = time.monotonic()
                error: CMKError | None = None
                with env.Session() as s:
                    try:
                        operation(env, s)
                    except CMKError as exc:  # anything else fails the test
                        error = exc
                        assert_no_ciphertext_in_objects(s)
                        s.rollback()
                        assert_no_ciphertext_in_objects(s)
                elapsed = time.monotonic() - started
                assert elapsed < 5 * DEADLINE + 2, f"{where} took {elapsed:.1f} s"
                env.kms.heal()
                if error is None:
                    assert count == 1, f"{where}: a KMS that stays broken must fail the operation"
                    assert readable(env) == len(before["fault_accounts"]) + added, where
                    outcomes["ok"] = outcomes.get("ok", 0) + 1
                    continue
                outcomes[type(error).__name__] = outcomes.get(type(error).__name__, 0) + 1
                assert env.raw() == before, f"{where} raised {error!r} but the database changed"
                with env.Session() as s:
                    operation(env, s)  # works again once the KMS does
                assert readable(env) == len(before["fault_accounts"]) + added, where
    assert sum(outcomes.values()) == n * sum(len(COUNTS.get(f, (None, 1))) for f in FAULTS)
    assert outcomes.get("ok", 0) < sum(outcomes.values()) / 2, outcomes


def assert_no_plaintext_in_loaded_objects(s: Session) -> None:
    """After a failed load, the encrypted attributes of loaded objects are expired: neither
    ciphertext nor half a batch of plaintext is left for the application to use."""
    for obj in s.identity_map.values():
        keys = {c.key for t in mapper_spec(inspect(obj).mapper).tables for c in t.columns}
        assert not keys & set(vars(obj)), f"{type(obj).__name__} kept {keys & set(vars(obj))}"


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_a_failing_audit_sink_at_every_event_stops_the_access(env: Env, name: str) -> None:
    operation = OPERATIONS[name]
    env.reset()
    env.sink.events = 0
    with env.Session() as s:
        operation(env, s)
    n = env.sink.events
    assert n >= 4
    for k in range(n):
        env.reset()
        before = env.raw()
        env.sink.fail_at, env.sink.events = k, 0
        with env.Session() as s:
            with pytest.raises(AuditError) as info:
                operation(env, s)
            assert isinstance(info.value.__cause__, RuntimeError)
            assert_no_ciphertext_in_objects(s)
            if name == "load":
                assert_no_plaintext_in_loaded_objects(s)
            s.rollback()
        assert env.raw() == before, f"{name}: sink failing at event {k} of {n}: database changed"
        env.sink.fail_at = None
        with env.Session() as s:
            operation(env, s)
