"""Attacks on the audit delivery that once lost or hid events, each kept as a regression test.

Faults the disk cannot be told to make on demand (a short write when the disk fills mid-frame, a
segment that cannot be created) are injected by wrapping ``os.pwrite`` / ``os.open`` for the
spool's segment files only; everything else is the real spool, shipper and files.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from sqlalchemy_cmk import AuditError
from sqlalchemy_cmk.audit import make_event
from sqlalchemy_cmk.context import TenantContext
from sqlalchemy_cmk.delivery import (
    AuditDelivery,
    TenantAudit,
    spool_events,
    spool_status,
    verify_chain,
)
from tests.audit._disk import tear
from tests.audit.memory_kind import Receiver


def memory(receiver: str, **kw: Any) -> TenantAudit:
    return TenantAudit([{"kind": "memory", "receiver": receiver}], **kw)


def record(delivery: AuditDelivery, tenant: str, rows: int) -> None:
    ctx = TenantContext(tenant, actor="a")
    delivery.record(make_event(ctx, "decrypt", "ok", tenant, table="t", rows=rows), ctx)


def rows_of(receiver: Receiver) -> list[int]:
    return [json.loads(r.body)["resources"][0]["data"]["rows"] for r in receiver.unique()]


def _is_segment(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith(".seg")
    except OSError:
        return False


@contextmanager
def segment_writes(fault: Callable[[int, bytes], int | None]) -> Iterator[None]:
    """Route frame writes to segment files through ``fault(fd, data)``: an int is returned as
    the count written (after really writing that many bytes), None writes normally; it may
    raise. (The zeros a segment is filled with ahead of its frames pass untouched.)"""
    real = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if _is_segment(fd) and bytes(data[:1]) != b"\0":
            n = fault(fd, bytes(data))
            if n is not None:
                return real(fd, bytes(data)[:n], offset) if n else 0
        return real(fd, data, offset)

    os.pwrite = pwrite
    try:
        yield
    finally:
        os.pwrite = real


# -- the disk fills in the middle of a frame ---------------------------------------------------


@pytest.mark.usefixtures("memory_kind")
def test_a_short_write_is_not_reported_as_recorded_and_hides_no_later_event(
    tmp_path: Path,
) -> None:
    """A full disk takes part of a frame (``write`` returns short, no error). The event must not
    be reported as recorded, and events appended once space is back must not end up behind the
    torn frame, where every reader stops."""
    tenants = {"acme": memory("a", on_spool_failure="serve")}
    d = AuditDelivery(tmp_path, tenants, start=False)
    try:
        record(d, "acme", 0)
        calls = {"n": 0}

        def half(fd: int, data: bytes) -> int | None:
            calls["n"] += 1
            return len(data) // 2 if calls["n"] == 1 else None

        with segment_writes(half):
            record(d, "acme", 1)  # torn on disk: dropped, counted
            record(d, "acme", 2)
            record(d, "acme", 3)
        assert d.dropped == {"acme": 1}
        got = [json.loads(r.body) for _, r in spool_events(tmp_path, "acme")]
        rows = [g["resources"][0]["data"]["rows"] for g in got if g["status_code"] == "ok"]
        assert rows == [0, 2, 3]
        assert [g["status_code"] for g in got] == ["ok", "dropped", "ok", "ok"]
        verify_chain([json.dumps(g, sort_keys=True, separators=(",", ":")).encode() for g in got])
    finally:
        d.close()


@pytest.mark.usefixtures("memory_kind")
def test_health_sees_the_disk_come_back_without_waiting_for_an_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``failing`` was cleared only by the next event recorded: a process with no traffic (or
    whose traffic the orchestrator had stopped because of it) stayed failing after its disk
    recovered."""
    d = AuditDelivery(tmp_path, {"acme": memory("a", on_spool_failure="serve")}, start=False)
    try:
        record(d, "acme", 0)

        def full(fd: int, data: bytes) -> int | None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        real_sync = os.fdatasync

        def failing_sync(fd: int) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        with segment_writes(full):
            record(d, "acme", 1)  # dropped: the disk is full
            monkeypatch.setattr(os, "fdatasync", failing_sync)
            assert d.health()["status"] == "failing"  # the probe cannot sync either
            monkeypatch.setattr(os, "fdatasync", real_sync)
        health = d.health()  # the disk is back; no event since
        assert health["status"] == "ok" and health["spool_error"] is None
        assert not [n for n in os.listdir(d._writer.dir) if n.startswith(".probe")]  # type: ignore[union-attr]
        record(d, "acme", 2)
        assert d.dropped == {"acme": 1}
    finally:
        d.close()


@pytest.mark.usefixtures("memory_kind")
def test_a_failed_write_does_not_break_the_chain(tmp_path: Path) -> None:
    """A refused event (deny) never reached the disk: it must not take a place in the chain, or
    the tenant sees a gap (an event 'withheld') that no one withheld."""
    d = AuditDelivery(tmp_path, {"acme": memory("a")}, start=False)
    try:
        record(d, "acme", 0)

        def full(fd: int, data: bytes) -> int | None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        with segment_writes(full), pytest.raises(AuditError):
            record(d, "acme", 1)
        record(d, "acme", 2)
        bodies = [r.body for _, r in spool_events(tmp_path, "acme")]
        assert verify_chain(bodies) and len(bodies) == 2
    finally:
        d.close()


@pytest.mark.usefixtures("memory_kind")
def test_a_segment_that_cannot_be_created_closes_no_other_descriptor(tmp_path: Path) -> None:
    """The roll to a new segment fails (no inode left): the writer must not keep, sync or close
    the descriptor it already retired. Its number may by then belong to another file of the
    application (here: one opened right after), which a double close would pull from under it."""
    d = AuditDelivery(tmp_path, {"acme": memory("a")}, start=False, segment_bytes=1)
    real_open = os.open
    other: list[int] = []

    def open_(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if str(path).endswith(".seg") and not other:
            # The failed roll: meanwhile the application opens a file of its own.
            other.append(real_open(os.devnull, os.O_RDONLY))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, flags, mode, **kw)

    try:
        record(d, "acme", 0)
        os.open = open_
        try:
            with pytest.raises(AuditError):
                record(d, "acme", 1)
        finally:
            os.open = real_open
        for i in (2, 3):
            record(d, "acme", i)
        os.fstat(other[0])  # still open: nobody closed the application's descriptor
        rows = [
            json.loads(r.body)["resources"][0]["data"]["rows"] for _, r in spool_events(tmp_path)
        ]
        assert rows == [0, 2, 3]
    finally:
        d.close()
        for fd in other:
            os.close(fd)


# -- the spool cannot be created at all (a read-only or missing volume) -------------------------


def test_a_spool_that_cannot_be_created_fails_closed_or_serves_by_policy(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """It raised UnboundLocalError from record() (deny and serve alike) and OSError from the
    constructor."""
    blocker = tmp_path / "volume"
    blocker.write_bytes(b"")  # the spool's parent is a file: every mkdir fails (ENOTDIR)
    tenants = {"acme": memory("a"), "globex": memory("g", on_spool_failure="serve")}
    d = AuditDelivery(blocker / "spool", tenants, poll=0.01)  # must not raise at start-up
    try:
        with pytest.raises(AuditError):
            record(d, "acme", 0)
        record(d, "globex", 0)  # served, counted
        assert d.dropped == {"globex": 1}
        health = d.health()
        assert health["status"] == "failing" and health["spool_error"]
        # The volume comes back: recording resumes, and globex hears of its drop.
        blocker.unlink()
        blocker.mkdir()
        record(d, "globex", 1)
        assert d.flush(15)
        assert d.health()["status"] == "ok"
        got = [json.loads(r.body) for r in memory_kind["g"].unique()]
        assert [(g["status_code"], g["resources"][0]["data"]["rows"]) for g in got] == [
            ("dropped", 1),
            ("ok", 1),
        ]
    finally:
        d.close()


# -- the destinations cannot be looked up for a while ------------------------------------------


class Flaky:
    """An AuditDestinations whose store (the key registry's database) is down for the shipper's
    lookups while the access path still gets answers (its own connection, a replica)."""

    def __init__(self, tenants: dict[str, TenantAudit]) -> None:
        self.tenants = tenants
        self.down = False
        self.failed = 0

    def tenant_audit(self, tenant: str) -> TenantAudit | None:
        if self.down and threading.current_thread().name.startswith("cmk-audit"):
            self.failed += 1
            raise ConnectionError("registry database unreachable")
        return self.tenants.get(tenant)


@pytest.mark.parametrize("known_before", [True, False])
def test_an_outage_of_the_destination_store_loses_no_event(
    tmp_path: Path, memory_kind: dict[str, Receiver], known_before: bool
) -> None:
    """While the registry is unreachable the shipper cannot tell where a tenant's events go. It
    must wait: not count them undeliverable, move the tenant's cursor past them, or prune their
    segment (retention 0)."""
    source = Flaky({"acme": memory("a")})
    d = AuditDelivery(
        tmp_path, source, poll=0.005, retention=0, segment_bytes=512, destinations_ttl=0
    )
    try:
        if known_before:
            record(d, "acme", 0)
            assert d.flush(15)
        source.down = True
        for i in range(1, 30):
            record(d, "acme", i)
        deadline = time.monotonic() + 10
        while source.failed < 20:  # the shipper met the outage many times
            assert time.monotonic() < deadline
            time.sleep(0.01)
        source.down = False
        assert d.flush(15)
        expected = list(range(0 if known_before else 1, 30))
        assert rows_of(memory_kind["a"]) == expected
        assert d._shipper is not None and d._shipper.undeliverable == 0
    finally:
        d.close()


# -- tenant ids are any non-empty string --------------------------------------------------------


def test_a_tenant_id_with_a_newline_keeps_its_own_status(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """``audit status`` split the saved lane key ``tenant\\nname`` at the first newline: a tenant
    id holding one was reported as another tenant, with another destination."""
    odd = "acme\nsiem"
    d = AuditDelivery(tmp_path, {odd: memory("a"), "acme": memory("b")}, poll=0.005)
    try:
        record(d, odd, 0)
        record(d, "acme", 1)
        assert d.flush(15)
        d.close()
        rows = {(r["tenant"], r["destination"]): r for r in spool_status(tmp_path)}
        assert set(rows) == {(odd, "memory"), ("acme", "memory")}
        assert all(r["backlog"] == 0 and r["delivered"] == 1 for r in rows.values())
    finally:
        d.close()


def test_a_state_file_of_the_wrong_shape_stops_no_delivery(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """A dead writer's ``state.json`` holds valid JSON of another shape (a foreign tool, a
    half-restored backup): that directory re-delivers from the start, and the others, the live
    process's own included, go on."""
    d = AuditDelivery(tmp_path, {"acme": memory("a")}, poll=0.005)
    record(d, "acme", 0)
    assert d.flush(15)
    d.close()
    (wdir,) = [p for p in tmp_path.iterdir() if p.name.startswith("w-")]
    (wdir / "state.json").write_text('{"lanes": [1, 2], "scan": "x"}')
    memory_kind["a"].records.clear()
    d = AuditDelivery(tmp_path, {"acme": memory("a")}, poll=0.005)
    try:
        record(d, "acme", 1)
        assert d.flush(15)
        assert sorted(rows_of(memory_kind["a"])) == [0, 1]
    finally:
        d.close()


@pytest.mark.parametrize(
    ("tenant", "actor"), [("acme", "bob\udcff"), ("ac\udcffme", "bob"), ("ac\\\udcffme", "b\\")]
)
def test_lone_surrogates_are_recorded_as_valid_utf8(
    tmp_path: Path, memory_kind: dict[str, Receiver], tenant: str, actor: str
) -> None:
    """A lone surrogate in an actor or a tenant id (text decoded with surrogateescape) made
    record() raise UnicodeEncodeError on the access path: no event, no policy applied."""
    d = AuditDelivery(tmp_path, {tenant: memory("a")}, poll=0.005)
    try:
        ctx = TenantContext(tenant, actor=actor, request_id="r\udc80")
        for i in range(3):
            d.record(make_event(ctx, "decrypt", "ok", tenant, table="t", rows=i), ctx)
        assert d.flush(15)
        got = memory_kind["a"].unique()
        assert [r.tenant for r in got] == [tenant] * 3
        for r in got:
            r.body.decode("utf-8")  # valid UTF-8, strict
            doc = json.loads(r.body)
            assert doc["unmapped"]["tenant"] == tenant and doc["actor"]["user"]["name"] == actor
        verify_chain([r.body for r in got])
    finally:
        d.close()


@pytest.mark.usefixtures("memory_kind")
def test_a_tenant_id_too_long_for_the_frame_applies_the_policy(tmp_path: Path) -> None:
    """It raised struct.error from the access path."""
    long = "t" * 70_000
    d = AuditDelivery(tmp_path, {long: memory("a")}, start=False)
    try:
        with pytest.raises(AuditError):
            record(d, long, 0)
    finally:
        d.close()


def test_hung_destinations_of_many_tenants_do_not_starve_a_healthy_one(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """As many hanging SIEMs as there are workers (each fails after its timeout, then retries)
    held every worker, so a healthy tenant's events waited behind them each round."""
    hung = [f"t{i}" for i in range(4)]
    tenants = {t: memory(t) for t in hung} | {"healthy": memory("ok")}
    for t in hung:
        memory_kind[t] = Receiver(delay=1.0, down=True)
    d = AuditDelivery(tmp_path, tenants, poll=0.005, workers=4, max_backoff=0.01)
    try:
        for t in hung:
            record(d, t, 0)
        time.sleep(1.5)  # every hung lane has failed once and is retrying
        worst = 0.0
        for i in range(4):
            started = time.monotonic()
            record(d, "healthy", i)
            deadline = started + 5
            while len(memory_kind.get("ok", Receiver()).records) <= i:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            worst = max(worst, time.monotonic() - started)
            time.sleep(0.2)
        assert worst < 0.5, f"a healthy tenant's event waited {worst:.2f}s for a worker"
    finally:
        for t in hung:
            memory_kind[t].delay = 0
        d.close(timeout=0.1)


def test_a_removed_destination_leaves_no_lane_behind(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """The operator removes a tenant's dead destination. Its lane kept its events in memory for
    good, so ``flush()`` never succeeded again and ``health()`` reported its lag for ever."""
    memory_kind["a"] = Receiver(down=True)
    source = Flaky({"acme": memory("a")})
    d = AuditDelivery(tmp_path, source, poll=0.005, destinations_ttl=0, max_lag=0.2)
    try:
        for i in range(5):
            record(d, "acme", i)
        assert not d.flush(0.5)
        source.tenants["acme"] = TenantAudit([{"kind": "memory", "receiver": "b", "name": "b"}])
        record(d, "acme", 5)
        assert d.flush(15)
        assert rows_of(memory_kind["b"]) == [5]
        assert d.health()["status"] == "ok"
        assert set(d.health()["tenants"]["acme"]) == {"b"}
    finally:
        d.close()


def test_reading_a_live_spool_while_the_shipper_prunes_it(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """``audit status`` / ``tail`` (and ``flush()``) list a directory's segments, then open
    them: the shipper may delete a delivered segment, or a whole adopted directory, in between.
    ``flush()`` raised FileNotFoundError (found by the state machine)."""
    tenants = {"acme": memory("a")}
    for _ in range(6):  # six dead processes' directories, to adopt, deliver and remove
        dead = AuditDelivery(tmp_path, tenants, start=False, segment_bytes=256)
        for i in range(20):
            record(dead, "acme", i)
        assert dead._writer is not None
        dead._writer.abandon_after_fork()  # what SIGKILL leaves: files, no lock
        dead._writer = None
        dead.close()
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                spool_status(tmp_path)
                for _ in spool_events(tmp_path, "acme"):
                    pass
            except BaseException as exc:
                errors.append(exc)
                return

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    d = AuditDelivery(tmp_path, tenants, poll=0.001, retention=0, segment_bytes=256)
    try:
        for i in range(200):
            record(d, "acme", 100 + i)
            if i % 20 == 0:
                d.flush(0.05)
        assert d.flush(15)
    finally:
        stop.set()
        for t in readers:
            t.join()
        d.close()
    assert not errors, errors[0]
    got = memory_kind["a"].unique()
    assert len(got) == 6 * 20 + 200  # every event of every writer, once by id
    assert sorted(rows_of(memory_kind["a"]))[-200:] == list(range(100, 300))


def test_a_siem_down_for_every_tenant_holds_one_batch_per_tenant_in_memory(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """Many tenants share one SIEM vendor, and it goes down: each lane kept up to ``lane_cap``
    (10,000) events in memory for the whole outage. A failing lane now keeps its next batch;
    the rest wait in the files and come back in order."""
    names = [f"t{i}" for i in range(20)]
    for t in names:
        memory_kind[t] = Receiver(down=True)
    d = AuditDelivery(
        tmp_path, {t: memory(t) for t in names}, poll=0.005, max_backoff=0.02, batch_max=5
    )
    try:
        for i in range(60):
            for t in names:
                record(d, t, i)
        time.sleep(0.3)
        assert d._shipper is not None
        held = max(
            len(lane.pending) for w in d._shipper._dirs.values() for lane in w.lanes.values()
        )
        assert held <= 5
        for t in names:
            memory_kind[t].down = False
        assert d.flush(30)
        for t in names:
            assert rows_of(memory_kind[t]) == list(range(60))
            verify_chain([r.body for r in memory_kind[t].unique()])
    finally:
        d.close()


def test_a_failed_sync_fails_every_frame_it_covered(tmp_path: Path) -> None:
    """Group commit: thread A syncs for A's and B's frames, and ``fdatasync`` fails (EIO). Linux
    then marks the pages clean, so B's own sync right after succeeds with B's frame possibly
    never on disk: B was told 'recorded'. Every frame written to the file before the failure
    must be reported as not recorded."""
    from sqlalchemy_cmk import _spool

    w = _spool.Writer(str(tmp_path), segment_bytes=1 << 20, max_bytes=1 << 30)
    real = os.fdatasync
    calls = {"n": 0}

    def fdatasync(fd: int) -> None:
        if _is_segment(fd):
            calls["n"] += 1
            if calls["n"] == 1:
                deadline = time.monotonic() + 5
                while w._written < 2:  # B's frame is in the file, B waits on this sync
                    assert time.monotonic() < deadline
                    time.sleep(0.001)
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    results: dict[str, str] = {}

    def append(name: str) -> None:
        try:
            w.append("acme", lambda: name.encode())
            results[name] = "recorded"
        except _spool.SpoolError:
            results[name] = "refused"

    os.fdatasync = fdatasync
    try:
        a = threading.Thread(target=append, args=("A",))
        a.start()
        while w._written < 1:
            time.sleep(0.001)
        b = threading.Thread(target=append, args=("B",))
        b.start()
        a.join()
        b.join()
    finally:
        os.fdatasync = real
        w.close()
    assert results == {"A": "refused", "B": "refused"}


@pytest.mark.usefixtures("memory_kind")
def test_each_dropped_event_is_announced_once(tmp_path: Path) -> None:
    """The drop notice was written, then the event after it failed: the notice's count was put
    back as if unannounced, and announced again with the next drop (3 announced for 2)."""
    d = AuditDelivery(tmp_path, {"acme": memory("a", on_spool_failure="serve")}, start=False)
    plan = iter(["fail", "ok", "fail"])  # event 1 fails; notice ok, event 2 fails; then all ok

    def fault(fd: int, data: bytes) -> int | None:
        if next(plan, "ok") == "fail":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return None

    try:
        record(d, "acme", 0)
        with segment_writes(fault):
            for i in (1, 2, 3):
                record(d, "acme", i)
        assert d.dropped == {"acme": 2}
        got = [json.loads(r.body) for _, r in spool_events(tmp_path, "acme")]
        announced = sum(
            g["resources"][0]["data"]["rows"] for g in got if g["status_code"] == "dropped"
        )
        assert announced == 2
        assert [g["resources"][0]["data"]["rows"] for g in got if g["status_code"] == "ok"] == [
            0,
            3,
        ]
        verify_chain([r.body for _, r in spool_events(tmp_path, "acme")])
    finally:
        d.close()


class Down:
    """An AuditDestinations whose store can be down for everyone, the access path included."""

    def __init__(self, tenants: dict[str, TenantAudit]) -> None:
        self.tenants = tenants
        self.down = False

    def tenant_audit(self, tenant: str) -> TenantAudit | None:
        if self.down:
            raise ConnectionError("registry database unreachable: postgresql://app:s3cret@db")
        return self.tenants.get(tenant)


def test_the_access_path_during_an_outage_of_the_destination_store(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """record() let the store's own exception (here ConnectionError, with whatever its message
    holds) out of every access once the cached set-up expired. A tenant seen before keeps its
    last known set-up (its events are recorded and shipped later); one never seen is refused
    with AuditError, as no policy is known to serve it by."""
    source = Down({"acme": memory("a"), "globex": memory("g", on_spool_failure="serve")})
    d = AuditDelivery(tmp_path, source, poll=0.005, destinations_ttl=0)
    try:
        record(d, "acme", 0)
        source.down = True
        record(d, "acme", 1)  # recorded under the last known set-up
        with pytest.raises(AuditError) as info:
            record(d, "globex", 0)
        assert "s3cret" not in str(info.value)
        source.down = False
        assert d.flush(15)
        assert rows_of(memory_kind["a"]) == [0, 1]
    finally:
        d.close()


def test_health_does_not_wait_for_a_sink_being_built(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """Sinks were built (secret references resolved) under the shipper's lock, which
    ``health()`` takes: a vault that answers slowly made the readiness probe time out."""
    slow = TenantAudit([{"kind": "memory", "receiver": "a", "build_delay": 1.5}])
    d = AuditDelivery(tmp_path, {"acme": slow}, poll=0.005)
    try:
        record(d, "acme", 0)
        time.sleep(0.2)  # the shipper is building the sink
        started = time.monotonic()
        d.health()
        took = time.monotonic() - started
        assert took < 0.3, f"health() waited {took:.2f}s"
        assert d.flush(15)
    finally:
        d.close()


def test_delivered_events_make_room_before_retention_under_pressure(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """``retention`` promises delivered events are 'pruned earlier under max_spool_bytes
    pressure'; they were not, so a spool whose every event was delivered filled up within the
    retention and refused a deny tenant's accesses."""
    d = AuditDelivery(
        tmp_path,
        {"acme": memory("a")},
        poll=0.005,
        max_spool_bytes=40_000,
        segment_bytes=4_000,
        retention=3600,
    )
    try:
        for i in range(400):  # ~280 KB in all, seven times the spool's size
            record(d, "acme", i)
            if i % 20 == 19:
                assert d.flush(15)
        assert d.flush(15)
        assert rows_of(memory_kind["a"]) == list(range(400))
    finally:
        d.close()


def test_a_dead_writers_torn_tail_is_adopted_delivered_and_cleaned_up(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """A power loss leaves the last frame of a dead writer torn. The shipper that adopted the
    directory waited for the segment to be read to its size, which never happens: ``flush()``
    never succeeded again, and the directory was never removed."""
    from sqlalchemy_cmk import _spool

    tenants = {"acme": memory("a")}
    dead = AuditDelivery(tmp_path, tenants, start=False)
    for i in range(5):
        record(dead, "acme", i)
    assert dead._writer is not None
    wdir = dead._writer.dir
    dead._writer.abandon_after_fork()
    dead._writer = None
    dead.close()
    seg = os.path.join(wdir, _spool.segment_name(_spool.segments(wdir)[-1]))
    tear(seg, _spool.frame("acme", b'{"torn": tr')[:20])  # the frame the power cut
    d = AuditDelivery(tmp_path, tenants, poll=0.005, retention=0)
    try:
        record(d, "acme", 5)
        assert d.flush(15)
        assert rows_of(memory_kind["a"]) == [0, 1, 2, 3, 4, 5]
        deadline = time.monotonic() + 10
        while os.path.exists(wdir):  # delivered, past retention: removed
            assert time.monotonic() < deadline, "the dead writer's directory stays"
            time.sleep(0.01)
    finally:
        d.close()


def test_a_whole_frame_that_is_not_an_event_is_skipped(
    tmp_path: Path, memory_kind: dict[str, Receiver], capsys: pytest.CaptureFixture[str]
) -> None:
    """A frame whose CRC holds but whose body is not an event (a file of another tool or
    version copied in): the shipper raised KeyError on it in every pass, so none of the
    writer's later events were delivered; ``audit tail``/``verify`` raised too. Found by the
    state machine's power-loss rule cutting a frame exactly at its end."""
    from sqlalchemy_cmk.cli import main

    tenants = {"acme": memory("a")}
    dead = AuditDelivery(tmp_path, tenants, start=False)
    record(dead, "acme", 0)
    assert dead._writer is not None
    dead._writer.append("acme", lambda: b'{"not":"an event"}')
    record(dead, "acme", 1)
    dead._writer.abandon_after_fork()
    dead._writer = None
    dead.close()
    d = AuditDelivery(tmp_path, tenants, poll=0.005)
    try:
        assert d.flush(15)
        assert rows_of(memory_kind["a"]) == [0, 1]
    finally:
        d.close()
    assert main(["audit", "tail", "--spool", str(tmp_path), "--tenant", "acme"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_one_tenants_siem_outage_does_not_fill_the_spool_for_the_others(
    tmp_path: Path, memory_kind: dict[str, Receiver], capsys: pytest.CaptureFixture[str]
) -> None:
    """Segments are deleted oldest first and whole, and hold every tenant's events: one event
    of a tenant whose SIEM was down kept every segment written after it, and with a 200 kB
    spool the healthy tenant's accesses were refused after about 300 events. Now the
    delivered frames of pinned segments are compacted away, and the failing tenant, past its
    share, has its own new events refused (its policy) instead of everyone's."""
    from sqlalchemy_cmk.cli import main
    from sqlalchemy_cmk.delivery import pruned_writers, spool_events

    memory_kind["g"] = Receiver(down=True)
    tenants = {"acme": memory("a"), "globex": memory("g")}
    d = AuditDelivery(
        tmp_path,
        tenants,
        poll=0.005,
        max_backoff=0.05,
        retention=0,
        max_spool_bytes=1_000_000,
        segment_bytes=64_000,
    )
    refused = 0
    kept: list[int] = []
    try:
        for i in range(3000):
            record(d, "acme", i)  # never refused
            if i % 10 == 0:
                try:
                    record(d, "globex", i)
                    kept.append(i)
                except AuditError as exc:
                    assert "failing" in str(exc)
                    refused += 1
            if i % 100 == 0:
                d.flush(0.05)
        assert not d.flush(1)  # globex's SIEM is still down
        assert rows_of(memory_kind["a"]) == list(range(3000))
        assert refused > 0 and kept  # globex was refused, past its share, not from the start
        assert d._writer is not None
        disk = sum(
            os.stat(os.path.join(d._writer.dir, n)).st_blocks * 512
            for n in os.listdir(d._writer.dir)
        )
        assert disk < 1_000_000, disk  # the delivered frames' blocks were given back
        # The spool reads as before: globex's events are all there, and every chain verifies.
        got = [r.body for _, r in spool_events(tmp_path, "globex")]
        assert [json.loads(b)["resources"][0]["data"]["rows"] for b in got] == kept
        verify_chain([r.body for _, r in spool_events(tmp_path)], pruned=pruned_writers(tmp_path))
        assert main(["audit", "verify", "--spool", str(tmp_path)]) == 0
        # The SIEM comes back: everything globex was told was recorded arrives, in order.
        memory_kind["g"].down = False
        assert d.flush(15)
        assert rows_of(memory_kind["g"]) == kept
        deadline = time.monotonic() + 10
        while d._shipper is not None and d._shipper.over_budget:  # the next pass lifts it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        record(d, "globex", 9999)  # no longer refused
    finally:
        d.close()
    capsys.readouterr()


def test_a_tenant_whose_siem_is_slower_than_its_events_does_not_fill_the_spool(
    tmp_path: Path, memory_kind: dict[str, Receiver], capsys: pytest.CaptureFixture[str]
) -> None:
    """Only failing destinations counted as over budget. A tenant held to
    ``max_events_per_second`` (or a slow SIEM) never fails, its backlog grew as fast as its
    events came, and once it filled the spool every other tenant's accesses were refused."""
    tenants = {"acme": memory("a"), "globex": memory("g", max_events_per_second=100)}
    d = AuditDelivery(
        tmp_path,
        tenants,
        poll=0.005,
        retention=0,
        max_lag=0.2,
        max_spool_bytes=1_000_000,
        segment_bytes=64_000,
    )
    kept: list[int] = []
    try:
        for i in range(2500):
            record(d, "acme", i)  # never refused
            try:
                record(d, "globex", i)
                kept.append(i)
            except AuditError:
                pass
        assert len(kept) < 2500  # globex was refused past its share...
        assert d.flush(60)  # ...and everything it was told was recorded arrives
        assert rows_of(memory_kind["a"]) == list(range(2500))
        assert rows_of(memory_kind["g"]) == kept
    finally:
        d.close()
    capsys.readouterr()
