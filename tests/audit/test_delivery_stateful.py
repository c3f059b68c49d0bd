"""A state machine over the spool and the shipper: events recorded by several tenants, receivers
that go down and come back or lose acknowledgements, processes that crash (their shipper
stopped without saving, their files left as a SIGKILL leaves them) and new ones that start on
the same spool. Whatever the sequence, once every receiver is up each tenant has every recorded
event exactly once after de-duplication by id, in order per writer, with the chains intact."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sqlalchemy_cmk import _spool
from sqlalchemy_cmk.audit import make_event
from sqlalchemy_cmk.context import TenantContext
from sqlalchemy_cmk.delivery import AuditDelivery, TenantAudit, spool_status, verify_chain
from sqlalchemy_cmk.errors import AuditError
from tests.audit import memory_kind
from tests.audit._disk import tear
from tests.audit.memory_kind import Receiver

TENANTS = ("acme", "globex", "initech")
# acme has two destinations: each must get every event, whatever the other does.
RECEIVERS = {"acme": ("acme", "acme-2"), "globex": ("globex",), "initech": ("initech",)}
RECEIVER_NAMES = sorted(r for rs in RECEIVERS.values() for r in rs)


class Registry:
    """The tenants' set-ups, as a key registry serves them: it can be unreachable from the
    shipper (its lookups raise) while the access path still has answers."""

    def __init__(self, audits: dict[str, TenantAudit]) -> None:
        self.audits = audits
        self.down = False

    def tenant_audit(self, tenant: str) -> TenantAudit | None:
        if self.down and threading.current_thread().name.startswith("cmk-audit"):
            raise ConnectionError("registry unreachable")
        return self.audits.get(tenant)


def _is_segment(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith(_spool.SEGMENT_GLOB)
    except OSError:
        return False


EXAMPLES = int(os.environ.get("SQLALCHEMY_CMK_STATEFUL_EXAMPLES", "60")) // 4 or 1


def crash(d: AuditDelivery) -> None:
    """What SIGKILL leaves: no shipper thread, no saved cursors, no locks held."""
    sh = d._shipper
    if sh is not None:
        sh._stop.set()
        sh._wake.set()
        if sh._thread is not None:
            sh._thread.join(5)
        if sh._pool is not None:
            sh._pool.shutdown(wait=True)
        sh.abandon_after_fork()
    if d._writer is not None:
        d._writer.abandon_after_fork()
    d._writer = d._shipper = None


class Spool(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        memory_kind.RECEIVERS.clear()
        self.dir = tempfile.mkdtemp(prefix="cmk-spool-sm-")
        self.registry = Registry(
            {
                t: TenantAudit([{"kind": "memory", "receiver": r, "name": r} for r in rs])
                for t, rs in RECEIVERS.items()
            }
        )
        for rs in RECEIVERS.values():
            for r in rs:
                memory_kind.RECEIVERS[r] = Receiver()
        self.segment_bytes = 4096
        self.delivery = self.new()
        self.recorded: dict[str, list[int]] = {t: [] for t in TENANTS}
        self.drops: dict[str, int] = {t: 0 for t in TENANTS}  # events a serve tenant lost
        self.n = 0
        self.disk = "ok"
        self.real_pwrite = os.pwrite
        os.pwrite = self.pwrite  # restored in teardown

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        """The spool's writes, through the disk's current state (see the ``disk`` rule)."""
        if self.disk != "ok" and _is_segment(fd):
            if not any(bytes(data[:64])):  # the zeros filled ahead of the frames
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if self.disk == "full mid-frame":
                return self.real_pwrite(fd, bytes(data)[: len(data) // 2], offset)
        return self.real_pwrite(fd, data, offset)

    def new(self, **overrides: Any) -> AuditDelivery:
        # Tiny segments, no retention (prune runs right behind the slowest lane), lanes that
        # overflow after 3 events (catch-up from the files), lookups never cached.
        d = AuditDelivery(
            self.dir,
            self.registry,
            poll=0.005,
            max_backoff=0.02,
            segment_bytes=self.segment_bytes,
            retention=0,
            destinations_ttl=0,
            batch_max=2,  # a failing lane holds 2 in memory, the rest go back to the files
            start=False,
            **overrides,
        )
        d._shipper_args["lane_cap"] = 3
        d.start()
        return d

    @rule(tenant=st.sampled_from(TENANTS), k=st.integers(1, 30))
    def record(self, tenant: str, k: int) -> None:
        ctx = TenantContext(tenant, actor="a")
        for _ in range(k):
            try:
                self.delivery.record(
                    make_event(ctx, "decrypt", "ok", tenant, table="t", rows=self.n), ctx
                )
            except AuditError:
                assert self.disk == "full mid-frame"  # refused: never to be delivered
            else:
                self.recorded[tenant].append(self.n)
            self.n += 1

    @rule(disk=st.sampled_from(["ok", "no room for zeros", "full mid-frame"]))
    def disk_fills(self, disk: str) -> None:
        """The disk has no room for the zeros filled ahead (frames are appended), or none
        for a whole frame either (a write stops halfway; the access is refused)."""
        self.disk = disk

    @rule(
        receiver=st.sampled_from(RECEIVER_NAMES),
        down=st.booleans(),
    )
    def receiver_down(self, receiver: str, down: bool) -> None:
        memory_kind.RECEIVERS[receiver].down = down

    @rule(receiver=st.sampled_from(RECEIVER_NAMES), lose=st.booleans())
    def lose_acks(self, receiver: str, lose: bool) -> None:
        memory_kind.RECEIVERS[receiver].fail_after_accept = lose

    @rule(down=st.booleans())
    def registry_down(self, down: bool) -> None:
        self.registry.down = down

    @rule(segment_bytes=st.sampled_from([1, 300, 4096, 1 << 20]))
    def crash_and_restart(self, segment_bytes: int) -> None:
        """The next process rolls its segments at another size: smaller than a frame, than a
        page, or as large as the zeros filled ahead (``FILL``)."""
        crash(self.delivery)
        self.segment_bytes = segment_bytes
        self.delivery = self.new()

    @rule(cut=st.integers(1, 38))  # the whole frame is 39 bytes
    def power_loss(self, cut: int) -> None:
        """A crash in the middle of a frame nobody was told was recorded: its first bytes are
        at the end of the dead writer's last segment."""
        w = self.delivery._writer
        crash(self.delivery)
        if w is not None:
            segs = _spool.segments(w.dir)
            torn = _spool.frame("acme", b'{"never":"acknowledged"}')[:cut]
            tear(os.path.join(w.dir, _spool.segment_name(segs[-1])), torn)
        self.delivery = self.new()

    @rule(cut=st.integers(0, 38), gap=st.sampled_from([1, 4096, 4096 * 3 + 5]))
    def power_loss_later_page(self, cut: int, gap: int) -> None:
        """A power loss that kept a later page of the unsynced frames and lost an earlier one:
        after the dead writer's last whole frame, a torn frame over zeros, and ``gap`` bytes
        on a whole frame nobody was told was recorded (a real event's, with its own id)."""
        w = self.delivery._writer
        crash(self.delivery)
        if w is not None:
            path = os.path.join(w.dir, _spool.segment_name(_spool.segments(w.dir)[-1]))
            frames = list(_spool.read_frames(path))
            end = frames[-1][1] if frames else 0
            torn = _spool.frame("acme", b'{"never":"acknowledged"}')[:cut]
            with open(path, "r+b") as f:
                f.seek(end)
                f.write(torn)
                if frames:
                    tenant, body = frames[-1][2], frames[-1][3]
                    doc = json.loads(body)
                    doc["metadata"]["uid"] += "-never"
                    doc["resources"][0]["data"]["rows"] = -1
                    f.seek(end + len(torn) + gap)
                    f.write(_spool.frame(tenant, json.dumps(doc).encode()))
        self.delivery = self.new()

    @precondition(lambda self: self.n > 0)
    @rule()
    def settle(self) -> None:
        for r in memory_kind.RECEIVERS.values():
            r.down = r.fail_after_accept = False
        self.registry.down = False
        self.disk = "ok"
        assert self.delivery.flush(20)
        self.check()
        self.pruned()

    def pruned(self) -> None:
        """Everything delivered, no retention: dead writers' directories are removed and the
        live one keeps its current segment only (each pruned where its frames ended)."""
        w = self.delivery._writer
        deadline = time.monotonic() + 20
        while True:
            dirs = [os.path.join(self.dir, n) for n in os.listdir(self.dir) if n[:2] == "w-"]
            left = {p: _spool.segments(p) for p in dirs}
            if w is not None:
                left = {p: s for p, s in left.items() if p != w.dir or len(s) > 1}
            if not left:
                return
            assert time.monotonic() < deadline, left
            time.sleep(0.01)

    def check(self) -> None:
        for t, receivers in RECEIVERS.items():
            for name in receivers:
                got = memory_kind.RECEIVERS[name].unique()
                docs = [json.loads(r.body) for r in got]
                ok = [doc for doc in docs if doc["status_code"] == "ok"]  # not drop notices
                rows = sorted(doc["resources"][0]["data"]["rows"] for doc in ok)
                assert rows == self.recorded[t], name
                notices = [doc for doc in docs if doc["status_code"] == "dropped"]
                assert sum(n["resources"][0]["data"]["rows"] for n in notices) <= self.drops[t]
                verify_chain([r.body for r in got])  # per writer: in order, no gap, no edit
        # Every frame read is one of these tenants' events: a torn frame is not read as a
        # frame (of tenant '', say, which has no destination).
        sh = self.delivery._shipper
        assert sh is None or sh.undeliverable == 0
        assert {r["tenant"] for r in spool_status(self.dir)} <= set(TENANTS)

    @invariant()
    def never_wrong_tenant(self) -> None:
        for t, receivers in RECEIVERS.items():
            for name in receivers:
                for r in list(memory_kind.RECEIVERS[name].records):
                    assert r.tenant == t and json.loads(r.body)["unmapped"]["tenant"] == t

    def teardown(self) -> None:
        try:
            for r in memory_kind.RECEIVERS.values():
                r.down = r.fail_after_accept = False
            self.registry.down = False
            self.disk = "ok"
            if self.n:
                assert self.delivery.flush(20)
                self.check()
        finally:
            os.pwrite = self.real_pwrite
            self.delivery.close()
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.usefixtures("memory_kind")
def test_spool_state_machine() -> None:
    Spool.TestCase.settings = settings(
        max_examples=EXAMPLES,
        stateful_step_count=12,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    Spool.TestCase().runTest()


class TightSpool(Spool):
    """The same, on a spool so small that it is under pressure most of the time: a tenant whose
    SIEM is down gets its events refused (over its share), segments are compacted while
    readers and lanes use them, and still every event recorded arrives, in order, once
    de-duplicated, and the spool's own chains verify."""

    def __init__(self) -> None:
        super().__init__()
        self.cursors: dict[str, tuple[int, int]] = {}  # an ``audit tail --follow``
        self.followed: set[str] = set()
        # initech serves its accesses when its events cannot be recorded: they are counted,
        # and announced in its chain before its next event.
        audit = self.registry.audits["initech"]
        self.registry.audits["initech"] = TenantAudit(
            list(audit.destinations), on_spool_failure="serve"
        )

    def new(self, **overrides: Any) -> AuditDelivery:
        return super().new(max_spool_bytes=40_000, **overrides)

    @rule()
    def follow(self) -> None:
        """A follower of the spool sees every event still there: the shipper only takes
        events away (compaction, pruning) while it reads, and only this machine adds them."""
        from sqlalchemy_cmk.delivery import spool_events

        self.followed.update(r.id for _, r in spool_events(self.dir, cursors=self.cursors))
        missed = {r.id for _, r in spool_events(self.dir)} - self.followed
        assert not missed

    @rule(tenant=st.sampled_from(TENANTS), k=st.integers(1, 30))
    def record(self, tenant: str, k: int) -> None:
        from sqlalchemy_cmk import AuditError

        ctx = TenantContext(tenant, actor="a")
        for _ in range(k):
            dropped = self.delivery.dropped.get(tenant, 0)
            try:
                self.delivery.record(
                    make_event(ctx, "decrypt", "ok", tenant, table="t", rows=self.n), ctx
                )
            except AuditError:
                continue  # refused (spool full, or the tenant over its share): not recorded
            finally:
                self.n += 1
            if self.delivery.dropped.get(tenant, 0) > dropped:
                self.drops[tenant] += 1  # served, its event dropped: not recorded
                continue
            self.recorded[tenant].append(self.n - 1)

    def check(self) -> None:
        super().check()
        from sqlalchemy_cmk.delivery import pruned_writers, spool_events

        # As audit verify does: the shipper may prune, compact or remove what is read.
        pruned = pruned_writers(self.dir)
        read = list(spool_events(self.dir))
        pruned |= pruned_writers(self.dir, read={w for w, _ in read})
        verify_chain([r.body for _, r in read], pruned=pruned)


@pytest.mark.usefixtures("memory_kind")
def test_tight_spool_state_machine() -> None:
    TightSpool.TestCase.settings = settings(
        max_examples=EXAMPLES,
        stateful_step_count=12,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    TightSpool.TestCase().runTest()
