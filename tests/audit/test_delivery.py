"""The spool and the shipper: every recorded event reaches its tenant, in order, whatever fails.

The destination here is the in-process ``memory`` kind (tests/audit/memory_kind.py), so that
outages, slow receivers and kills can be switched on; each real sink is tested against its own
receiver in the other files of this folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from sqlalchemy_cmk import AuditError, NoTenantError, TenantMismatchError, tenant_context
from sqlalchemy_cmk.audit import make_event
from sqlalchemy_cmk.context import TenantContext
from sqlalchemy_cmk.delivery import AuditDelivery, TenantAudit
from tests.audit.memory_kind import Receiver
from tests.db.models import Patient, make_env

ROOT = Path(__file__).resolve().parents[2]


def audits(**receivers: str) -> dict[str, TenantAudit]:
    return {t: TenantAudit([{"kind": "memory", "receiver": r}]) for t, r in receivers.items()}


def verify_chains(bodies: list[bytes]) -> dict[tuple[str, str], int]:
    """The tenant's check (docs/audit.md): per writer, seq counts up by one from 1 and each
    event names the hash of the one before. Returns events per (tenant, writer)."""
    last: dict[tuple[str, str], tuple[int, str]] = {}
    for body in bodies:
        u = json.loads(body)["unmapped"]
        key = (u["tenant"], u["writer"])
        seq, prev = last.get(key, (0, "0" * 64))
        assert u["seq"] == seq + 1, f"gap before {key} #{u['seq']}"
        assert u["prev"] == prev, f"chain broken at {key} #{u['seq']}"
        last[key] = (u["seq"], hashlib.sha256(body).hexdigest())
    return {k: v[0] for k, v in last.items()}


def wait_for(cond: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_orm_accesses_reach_each_tenant_in_order(
    engine: Engine, tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    delivery = AuditDelivery(tmp_path / "spool", audits(acme="a", globex="g"), poll=0.01)
    env = make_env(engine, audit_delivery=delivery)
    try:
        for tenant in ("acme", "globex", "acme"):
            with tenant_context(tenant, actor=f"user-of-{tenant}", request_id=f"r-{tenant}"):
                with env.Session.begin() as s:
                    s.add(Patient(tenant_id=tenant, ssn="123-45-6789"))
                with env.Session() as s:
                    rows = s.scalars(select(Patient).where(Patient.tenant_id == tenant)).all()
                    assert all(r.ssn == "123-45-6789" for r in rows)
        assert delivery.flush(15)
        a, g = memory_kind["a"].unique(), memory_kind["g"].unique()
        # Every event the application's sink saw for a tenant, the tenant got, in order.
        for tenant, got in (("acme", a), ("globex", g)):
            expected = [(e.operation, e.outcome) for e in env.audit.events if e.tenant == tenant]
            docs = [json.loads(r.body) for r in got]
            assert [(d["api"]["operation"], d["status_code"]) for d in docs] == expected
            assert all(d["unmapped"]["tenant"] == tenant for d in docs)
            assert all(d["actor"]["user"]["name"] == f"user-of-{tenant}" for d in docs)
            assert {"encrypt", "decrypt", "wrap"} <= {d["api"]["operation"] for d in docs}
        assert sum(verify_chains([r.body for r in a]).values()) == len(a)
        assert sum(verify_chains([r.body for r in g]).values()) == len(g)
        # Nothing secret in what is shipped.
        for r in a + g:
            assert b"123-45-6789" not in r.body
    finally:
        delivery.close()


def test_refusals_go_to_the_context_tenant_only(
    engine: Engine, tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    delivery = AuditDelivery(tmp_path / "spool", audits(acme="a", globex="g"), poll=0.01)
    env = make_env(engine, audit_delivery=delivery)
    try:
        with (
            tenant_context("globex", actor="globex-admin", request_id="g-1"),
            env.Session.begin() as s,
        ):
            s.add(Patient(id=7, tenant_id="globex", ssn="x"))
        # acme's user reads globex's row by id: refused, and only acme hears of it.
        acme = tenant_context("acme", actor="acme-user", request_id="a-1")
        with acme, env.Session() as s, pytest.raises(TenantMismatchError):
            s.get(Patient, 7)
        assert delivery.flush(15)
        a = [json.loads(r.body) for r in memory_kind["a"].unique()]
        g = [json.loads(r.body) for r in memory_kind["g"].unique()]
        mismatch = [d for d in a if d["status_code"] == "mismatch"]
        assert len(mismatch) == 1
        assert mismatch[0]["actor"]["user"]["name"] == "acme-user"
        assert mismatch[0]["status_id"] == 2
        assert "globex" not in json.dumps(mismatch[0])  # not even the other tenant's name
        # globex got only its own accesses, none with acme's actor or request.
        assert all("acme" not in json.dumps(d) for d in g)
        assert not [d for d in g if d["status_code"] != "ok"]
        # No tenant in context: the application's sink only.
        before = len(memory_kind["a"].records) + len(memory_kind["g"].records)
        with env.Session() as s, pytest.raises(NoTenantError):
            s.scalars(select(Patient)).all()
        assert delivery.flush(5)
        assert len(memory_kind["a"].records) + len(memory_kind["g"].records) == before
    finally:
        delivery.close()


def record_many(delivery: AuditDelivery, tenant: str, n: int) -> None:
    ctx = TenantContext(tenant, actor="a")
    for i in range(n):
        delivery.record(make_event(ctx, "decrypt", "ok", tenant, table="t", rows=i), ctx)


def rows_of(receiver: Receiver) -> list[int]:
    return [json.loads(r.body)["resources"][0]["data"]["rows"] for r in receiver.unique()]


def test_outage_then_back_delivers_everything_in_order(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    memory_kind["a"] = Receiver(down=True)
    memory_kind["a"].fail_after_accept = False
    delivery = AuditDelivery(tmp_path, audits(acme="a"), poll=0.01, max_backoff=0.2)
    try:
        record_many(delivery, "acme", 300)
        time.sleep(0.5)
        assert memory_kind["a"].records == []
        assert delivery.health()["tenants"]["acme"]["memory"]["failures"] > 0
        memory_kind["a"].down = False
        assert delivery.flush(15)
        assert rows_of(memory_kind["a"]) == list(range(300))
    finally:
        delivery.close()


def test_a_lost_acknowledgement_redelivers_and_ids_remove_the_duplicates(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    memory_kind["a"] = Receiver(fail_after_accept=True)
    delivery = AuditDelivery(tmp_path, audits(acme="a"), poll=0.01, max_backoff=0.05)
    try:
        record_many(delivery, "acme", 50)
        wait_for(lambda: len(memory_kind["a"].records) >= 100)
        memory_kind["a"].fail_after_accept = False
        assert delivery.flush(15)
        assert len(memory_kind["a"].records) > 50  # duplicates arrived
        assert rows_of(memory_kind["a"]) == list(range(50))  # de-duplicated by id: exact
    finally:
        delivery.close()


def test_a_slow_tenant_does_not_hold_up_a_healthy_one(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    memory_kind["slow"] = Receiver(delay=3.0)
    delivery = AuditDelivery(tmp_path, audits(acme="slow", globex="fast"), poll=0.01)
    try:
        record_many(delivery, "acme", 10)
        time.sleep(0.1)  # the slow tenant's batch is in flight
        started = time.monotonic()
        record_many(delivery, "globex", 10)
        wait_for(lambda: len(memory_kind.get("fast", Receiver()).records) == 10, timeout=2.5)
        assert time.monotonic() - started < 2.0
        assert len(memory_kind["slow"].records) < 10 or memory_kind["slow"].batches <= 1
    finally:
        delivery.close(timeout=0.1)


def test_a_full_spool_denies_by_default_and_serves_when_told(
    engine: Engine, tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    tenants = {
        "acme": TenantAudit([{"kind": "memory", "receiver": "a"}]),
        "globex": TenantAudit([{"kind": "memory", "receiver": "g"}], on_spool_failure="serve"),
    }
    delivery = AuditDelivery(tmp_path, tenants, max_spool_bytes=1, start=False)
    env = make_env(engine, audit_delivery=delivery)
    try:
        with tenant_context("acme"), pytest.raises(AuditError), env.Session.begin() as s:
            s.add(Patient(id=1, tenant_id="acme", ssn="s"))
        assert env.raw("select count(*) from patients")[0][0] == 0  # rolled back
        with tenant_context("globex"), env.Session.begin() as s:
            s.add(Patient(id=2, tenant_id="globex", ssn="s"))
        assert env.raw("select count(*) from patients")[0][0] == 1
        assert delivery.dropped["globex"] > 0
        assert delivery.health()["status"] == "failing"
    finally:
        delivery.close()


CHILD = textwrap.dedent(
    """
    import sys, os
    sys.path.insert(0, {root!r})
    from sqlalchemy_cmk import sinks
    sinks._KINDS["memory"] = ("tests.audit.memory_kind", None)
    from sqlalchemy_cmk.audit import make_event
    from sqlalchemy_cmk.context import TenantContext
    from sqlalchemy_cmk.delivery import AuditDelivery, TenantAudit
    d = AuditDelivery({spool!r}, {{"acme": TenantAudit([{{"kind": "memory", "receiver": "a"}}])}},
                      start=False)
    ctx = TenantContext("acme", actor="a")
    i = 0
    while True:
        d.record(make_event(ctx, "decrypt", "ok", "acme", table="t", rows=i), ctx)
        print(i, flush=True)  # told: recorded
        i += 1
    """
)


def test_sigkill_after_recording_loses_nothing(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    spool = str(tmp_path / "spool")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=str(ROOT), spool=spool)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    told = -1
    while told < 200:
        line = child.stdout.readline()
        assert line, "the child died"
        told = int(line)
    child.send_signal(signal.SIGKILL)
    child.wait()
    # Anything it printed before the kill was recorded: read the rest of the pipe.
    for line in child.stdout.read().split():
        told = max(told, int(line))
    child.stdout.close()
    # A new process (here: this one) adopts the dead writer's directory and ships it.
    delivery = AuditDelivery(spool, audits(acme="a"), poll=0.01)
    try:
        assert delivery.flush(20)
        rows = rows_of(memory_kind["a"])
        assert rows[: told + 1] == list(range(told + 1))  # everything told, in order
        verify_chains([r.body for r in memory_kind["a"].unique()])
    finally:
        delivery.close()


def test_a_forked_child_gets_its_own_writer_and_chain(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    delivery = AuditDelivery(tmp_path, audits(acme="a"), poll=0.01, start=False)
    record_many(delivery, "acme", 5)
    pid = os.fork()
    if pid == 0:  # the child: record, and exit without shipping
        try:
            record_many(delivery, "acme", 7)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    record_many(delivery, "acme", 3)
    delivery.start()  # the parent ships its own directory and adopts the child's
    try:
        assert delivery.flush(20)
        got = memory_kind["a"].unique()
        chains = verify_chains([r.body for r in got])
        assert sorted(chains.values()) == [7, 8]  # child 7; parent 5 + 3, chains unbroken
        assert len({w for _, w in chains}) == 2
    finally:
        delivery.close()


def test_throughput_from_four_threads_is_recorded_durably(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """Not a timing test (benchmarks time it): four threads at once, nothing lost or reordered."""
    delivery = AuditDelivery(tmp_path, audits(acme="a", globex="g"), poll=0.01)
    try:
        threads = [
            threading.Thread(target=record_many, args=(delivery, t, 500))
            for t in ("acme", "acme", "globex", "globex")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert delivery.flush(30)
        for name in ("a", "g"):
            got = memory_kind[name].unique()
            assert len(got) == 1000
            verify_chains([r.body for r in got])
    finally:
        delivery.close()


def test_backlog_lag_and_drops_are_gauges(tmp_path: Path, memory_kind: dict[str, Receiver]) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from sqlalchemy_cmk import _metrics
    from tests.unit.test_metrics import attrs, points

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    _metrics.use_meter_provider(provider)
    memory_kind["a"] = Receiver(down=True)
    delivery = AuditDelivery(tmp_path, audits(acme="a"), poll=0.01, max_backoff=0.05)
    try:
        record_many(delivery, "acme", 7)
        wait_for(
            lambda: delivery.health()["tenants"].get("acme", {}).get("memory", {}).get("failures")
        )
        time.sleep(0.05)
        assert points(reader, "sqlalchemy_cmk.audit.backlog")[attrs(tenant="acme")] == 7
        assert points(reader, "sqlalchemy_cmk.audit.lag")[attrs(tenant="acme")] > 0
        memory_kind["a"].down = False
        assert delivery.flush(10)
        assert points(reader, "sqlalchemy_cmk.audit.backlog")[attrs(tenant="acme")] == 0
    finally:
        delivery.close()
        _metrics.use_meter_provider(None)
        provider.shutdown()


def test_destinations_from_the_key_registry(
    engine: Engine, tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """The registry is an AuditDestinations: a CMK on it delivers to what the operator set
    there, and a change reaches the shipper within the lookup caches' time."""
    from sqlalchemy_cmk import CMK
    from sqlalchemy_cmk.registry_db import DatabaseKeyRegistry
    from sqlalchemy_cmk.testing import FakeKeyProvider

    registry = DatabaseKeyRegistry(engine, os.urandom(32), registry_id="audit-test", cache_ttl=0)
    registry.create_table()
    registry.add_tenant("acme", "fake://acme")
    registry.set_audit("acme", TenantAudit([{"kind": "memory", "receiver": "a"}]))
    delivery = AuditDelivery(tmp_path, registry, poll=0.01, destinations_ttl=0)
    cmk = CMK(FakeKeyProvider(), registry=registry, audit_sinks=[], audit_delivery=delivery)
    try:
        with tenant_context("acme", actor="u"):
            cmk.decrypt_document(cmk.encrypt_document({"f": b"v"}))
        assert delivery.flush(10)
        ops = [json.loads(r.body)["api"]["operation"] for r in memory_kind["a"].unique()]
        assert "encrypt" in ops and "decrypt" in ops
        registry.set_audit("acme", TenantAudit([{"kind": "memory", "receiver": "b"}]))
        with tenant_context("acme", actor="u"):
            cmk.encrypt_document({"f": b"w"})
        assert delivery.flush(10)
        assert memory_kind["b"].unique()  # the new destination (a new name starts afresh)
    finally:
        delivery.close()
        registry.table.drop(engine)


def test_drops_from_many_threads_are_all_counted(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    audit = {"acme": TenantAudit([{"kind": "memory", "receiver": "a"}], on_spool_failure="serve")}
    delivery = AuditDelivery(tmp_path, audit, max_spool_bytes=1, start=False)
    try:
        threads = [
            threading.Thread(target=record_many, args=(delivery, "acme", 300)) for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        from sqlalchemy_cmk.delivery import spool_events

        recorded = len(list(spool_events(tmp_path, "acme")))  # the first fits in one byte's room
        assert recorded >= 1
        assert delivery.dropped["acme"] == 2400 - recorded
        # Each drop is to be announced once the spool takes events again.
        assert delivery._gaps["acme"] == 2400 - recorded
    finally:
        delivery.close()
