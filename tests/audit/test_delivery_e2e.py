"""Delivery end to end through a real receiver: ORM accesses, a signed HTTPS webhook on loopback
that verifies each batch the way the docs tell a tenant to, and the faults of issue 12 (the
receiver down for a while, the shipper killed mid-batch, a slow tenant beside a healthy one)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from sqlalchemy_cmk import tenant_context
from sqlalchemy_cmk.delivery import AuditDelivery, TenantAudit, verify_chain
from sqlalchemy_cmk.sinks import NetworkPolicy
from tests.audit.receivers_http import Answer, Pki, Receiver, Request, make_pki, webhook_handler
from tests.db.models import Patient, make_env

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"acme": "k" * 40, "globex": "g" * 40}
LOOPBACK = NetworkPolicy(allow_private=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for tenant, key in KEYS.items():
        monkeypatch.setenv(f"HOOK_KEY_{tenant.upper()}", key)


class Siem:
    """A tenant's webhook endpoint: verifies signatures, keeps each event's bytes; can be down
    (503) or slow."""

    def __init__(self, pki: Pki, tenant: str) -> None:
        self.tenant = tenant
        self.stored: list[bytes] = []
        self.down = False
        self.delay = 0.0
        verify = webhook_handler({tenant: KEYS[tenant].encode()}, self.stored)

        def handle(req: Request) -> Answer:
            if self.delay:
                time.sleep(self.delay)
            if self.down:
                return 503, {"Retry-After": "0"}, b""
            return verify(req)

        self.rx = Receiver(pki, handle)

    def spec(self, pki: Pki) -> dict[str, Any]:
        return {
            "kind": "webhook",
            "url": self.rx.url(f"/{self.tenant}"),
            "ca_file": str(pki.ca_file),
            "timeout": 5,
            "signing": {
                "alg": "hmac-sha256",
                "key": f"env:HOOK_KEY_{self.tenant.upper()}",
                "key_id": self.tenant,
            },
        }

    def unique(self) -> list[bytes]:
        seen: set[str] = set()
        out = []
        for body in list(self.stored):
            uid = json.loads(body)["metadata"]["uid"]
            if uid not in seen:
                seen.add(uid)
                out.append(body)
        return out


@pytest.fixture
def siems(pki: Pki) -> Iterator[dict[str, Siem]]:
    s = {t: Siem(pki, t) for t in KEYS}
    yield s
    for siem in s.values():
        siem.rx.close()


def audits(siems: dict[str, Siem], pki: Pki) -> dict[str, TenantAudit]:
    return {t: TenantAudit([s.spec(pki)]) for t, s in siems.items()}


def wait_for(cond: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_orm_accesses_survive_a_siem_outage_in_order(
    engine: Engine, tmp_path: Path, pki: Pki, siems: dict[str, Siem]
) -> None:
    delivery = AuditDelivery(
        tmp_path / "spool", audits(siems, pki), network=LOOPBACK, poll=0.01, max_backoff=0.2
    )
    env = make_env(engine, audit_delivery=delivery)
    try:
        siems["acme"].down = True
        for i in range(6):
            for tenant in KEYS:
                with tenant_context(tenant, actor=f"{tenant}-user"):
                    with env.Session.begin() as s:
                        s.add(Patient(tenant_id=tenant, ssn=f"{i}-secret"))
                    with env.Session() as s:
                        s.scalars(select(Patient).where(Patient.tenant_id == tenant)).all()
        # globex is delivered while acme's SIEM is down.
        wait_for(lambda: len(siems["globex"].unique()) >= 12, 10)
        assert siems["acme"].stored == []
        siems["acme"].down = False
        assert delivery.flush(20)
        for tenant, siem in siems.items():
            got = siem.unique()
            expected = [(e.operation, e.outcome) for e in env.audit.events if e.tenant == tenant]
            assert [
                (json.loads(b)["api"]["operation"], json.loads(b)["status_code"]) for b in got
            ] == expected
            assert sum(verify_chain(got).values()) == len(got)
            assert all(b"secret" not in b for b in got)
    finally:
        delivery.close()


def test_a_slow_siem_does_not_slow_a_healthy_one(
    tmp_path: Path, pki: Pki, siems: dict[str, Siem]
) -> None:
    from tests.audit.test_delivery import record_many

    siems["acme"].delay = 3.0
    delivery = AuditDelivery(tmp_path, audits(siems, pki), network=LOOPBACK, poll=0.01)
    try:
        record_many(delivery, "acme", 20)
        time.sleep(0.2)  # acme's batch is stuck in its receiver
        started = time.monotonic()
        record_many(delivery, "globex", 20)
        wait_for(lambda: len(siems["globex"].unique()) == 20, 2.5)
        assert time.monotonic() - started < 2.0
    finally:
        siems["acme"].delay = 0
        delivery.close(timeout=0.1)


SHIPPER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from sqlalchemy_cmk.delivery import AuditDelivery, TenantAudit
    from sqlalchemy_cmk.sinks import NetworkPolicy
    d = AuditDelivery({spool!r}, {{"acme": TenantAudit([{spec!r}])}},
                      network=NetworkPolicy(allow_private=True), poll=0.01)
    print("shipping", flush=True)
    time.sleep(60)
    """
)


def test_a_shipper_killed_mid_batch_loses_nothing(
    tmp_path: Path, pki: Pki, siems: dict[str, Siem]
) -> None:
    from tests.audit.test_delivery import record_many

    spool = str(tmp_path / "spool")
    siem = siems["acme"]
    # The application records 300 events and stops (no shipper of its own).
    app = AuditDelivery(spool, audits(siems, pki), network=LOOPBACK, start=False)
    record_many(app, "acme", 300)
    app.close()
    # A shipper process sends the first batch, which the receiver takes and never answers.
    siem.rx.script.append("hang")
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            SHIPPER.format(root=str(ROOT), spool=spool, spec=siem.spec(pki)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        wait_for(lambda: len(siem.rx.requests) >= 1, 20)
        child.send_signal(signal.SIGKILL)
        child.wait()
    # The next shipper (any process, here this one) adopts the dead one's work.
    delivery = AuditDelivery(spool, audits(siems, pki), network=LOOPBACK, poll=0.01)
    try:
        assert delivery.flush(30)
        got = siem.unique()
        rows = [json.loads(b)["resources"][0]["data"]["rows"] for b in got]
        assert rows == list(range(300))
        assert sum(verify_chain(got).values()) == 300
    finally:
        delivery.close()


def test_a_forked_worker_ships_its_own_events(
    tmp_path: Path, pki: Pki, siems: dict[str, Siem]
) -> None:
    """gunicorn --preload: the parent made the delivery (and shipped); each worker records and
    ships its own events while the parent lives (the parent cannot adopt a live worker's)."""
    from tests.audit.test_delivery import record_many

    delivery = AuditDelivery(tmp_path, audits(siems, pki), network=LOOPBACK, poll=0.01)
    try:
        record_many(delivery, "acme", 3)
        assert delivery.flush(10)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                record_many(delivery, "acme", 4)
                code = 0 if delivery.flush(15) else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        record_many(delivery, "acme", 2)
        assert delivery.flush(10)
        got = siems["acme"].unique()
        assert sorted(verify_chain(got).values()) == [4, 5]  # the worker's 4; the parent's 3 + 2
    finally:
        delivery.close()
