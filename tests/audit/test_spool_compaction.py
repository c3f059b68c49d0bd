"""Attacks on the compaction of a pinned spool (one tenant's SIEM down, the others delivered),
each kept as a regression test.

The spool, the shipper and the files are real; the shipper is stepped by hand (no thread, sends
run inline) so that which batch fails, and where each segment ends, is exact.
"""

from __future__ import annotations

import errno
import json
import os
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from sqlalchemy_cmk import AuditError, _shipper, _spool
from sqlalchemy_cmk.delivery import TenantAudit, spool_events
from sqlalchemy_cmk.sinks import NetworkPolicy, SinkEnv
from tests.audit.memory_kind import Receiver

BODY = 200  # every event body is this long, so that every frame is too


def body(n: int) -> bytes:
    doc = {"metadata": {"uid": f"e{n:06d}"}, "unmapped": {"time_ns": n}, "status_id": 1}
    raw = json.dumps(doc).encode()
    return raw + b" " * (BODY - len(raw))


FRAME = len(_spool.frame("acme", body(0)))  # "acme", "glbx", "init": ids of one length


def append(w: _spool.Writer, tenant: str, n: int) -> None:
    w.append(tenant, lambda: body(n))


def shipper(root: Path, w: _spool.Writer, **kw: Any) -> _shipper.Shipper:
    tenants = {
        t: TenantAudit([{"kind": "memory", "receiver": t}]) for t in ("acme", "glbx", "init")
    }
    args: dict[str, Any] = dict(
        workers=1, batch_max=100, poll=0.01, retention=0.0, max_backoff=0.0, lane_cap=1000
    )
    args.update(kw)
    return _shipper.Shipper(str(root), tenants.get, SinkEnv(NetworkPolicy(), {}, {}), w, **args)


def uids(receiver: Receiver) -> list[int]:
    return [int(r.id[1:]) for r in receiver.unique()]


# -- a reader's cursor between two frames that compaction merges into one padding run -----------


def test_a_follow_cursor_between_two_dropped_frames_still_reads_the_rest(tmp_path: Path) -> None:
    """``spool_events(cursors=...)`` (``audit tail --follow``) resumes at the end of the last
    frame it read. Compaction merges adjacent dropped frames into one padding run, so that
    offset was no longer a frame start but the middle of a hole: the reader met a zero byte
    there, took it for the end of the segment, and every frame kept after it in the segment
    was never shown."""
    w = _spool.Writer(str(tmp_path), segment_bytes=3 * FRAME, max_bytes=1 << 30)
    append(w, "acme", 0)
    cursors: dict[str, tuple[int, int]] = {}
    assert [r.id for _, r in spool_events(tmp_path, cursors=cursors)] == ["e000000"]
    append(w, "acme", 1)
    append(w, "glbx", 2)  # segment 1: acme 0, acme 1, glbx 2
    append(w, "acme", 3)  # segment 2
    # The shipper delivered acme's frames of segment 1: they become one padding run.
    assert _spool.compact(os.path.join(w.dir, _spool.segment_name(1)), {"acme"}) is not None
    got = [r.id for _, r in spool_events(tmp_path, cursors=cursors)]
    assert got == ["e000002", "e000003"]
    w.close()


# -- the over-budget refusal -------------------------------------------------------------------


@pytest.mark.usefixtures("memory_kind")
def test_one_failed_batch_across_a_segment_boundary_does_not_refuse_a_tenant(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """A tenant is refused only when its undelivered events go back more than a whole segment
    (docs/audit.md). The check was that its oldest undelivered event is in an earlier segment
    than the scan: one failed batch right after a roll (a single 503) refused the accesses of a
    healthy ``deny`` tenant, one event behind, for as long as its back-off lasted."""
    memory_kind["acme"] = Receiver()
    memory_kind["glbx"] = Receiver(down=True)
    w = _spool.Writer(str(tmp_path), segment_bytes=3 * FRAME, max_bytes=12 * FRAME)
    s = shipper(tmp_path, w)
    for n, tenant in enumerate(("glbx", "acme", "acme") * 2 + ("acme",) * 3):
        append(w, tenant, n)  # segments 1, 2 and 3
    s.step()  # acme delivered; glbx failing since segment 1
    assert w.under_pressure
    assert s.over_budget == {"glbx"}
    memory_kind["acme"].down = True  # one batch fails ...
    append(w, "acme", 9)  # ... the first one of segment 4
    s.step()
    assert s.over_budget == {"glbx"}  # acme is one event behind, not a segment
    memory_kind["acme"].down = False
    s.step()
    assert uids(memory_kind["acme"]) == [1, 2, 4, 5, 6, 7, 8, 9]
    w.close()


# -- accounting: what compaction and deletion give back ----------------------------------------


@pytest.mark.usefixtures("memory_kind")
def test_compaction_then_deletion_gives_back_what_was_counted_once(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """The writer counts a segment by its size. Compaction counted it again as its allocated
    blocks, which for a small segment keeping a frame is more than its size (a whole block):
    the difference was not given back then (clamped at 0), but the blocks were given back
    when the segment went, so every compacted segment made the writer forget more than it had
    counted, and the spool held more than ``max_spool_bytes`` before it refused."""
    memory_kind["acme"] = Receiver()
    memory_kind["glbx"] = Receiver(down=True)
    w = _spool.Writer(str(tmp_path), segment_bytes=3 * FRAME, max_bytes=8 * FRAME)
    s = shipper(tmp_path, w, batch_max=1)
    for n, tenant in enumerate(("acme", "glbx", "acme", "acme", "glbx", "acme", "acme")):
        append(w, tenant, n)  # segments 1, 2 and 3
    for _ in range(4):
        s.step()
    seg1 = os.path.join(w.dir, _spool.segment_name(1))
    assert [f[2] for f in _spool.read_frames(seg1)] == ["glbx"]  # compacted
    assert os.stat(seg1).st_blocks * 512 > os.path.getsize(seg1)  # one block, more than it
    assert w._closed_bytes <= 6 * FRAME
    memory_kind["glbx"].down = False
    for _ in range(4):
        s.step()  # segment 1 goes first, then segment 2
        # What is left is still counted: at least its blocks, at most its size.
        left = [x for x in _spool.segments(w.dir) if x < w.position.segment]
        paths = [os.path.join(w.dir, _spool.segment_name(x)) for x in left]
        held = sum(min(os.path.getsize(p), os.stat(p).st_blocks * 512) for p in paths)
        assert held <= w._closed_bytes <= sum(os.path.getsize(p) for p in paths)
    assert uids(memory_kind["glbx"]) == [1, 4]
    w.close()


# -- frame sizes at the format's limit ---------------------------------------------------------


def _every_frame(path: str) -> list[tuple[int, bytes]]:
    """(offset, tenant) of every frame, padding included, as an earlier release's reader saw
    them; asserts that the file reads to its end."""
    with open(path, "rb") as f:
        data = f.read()
    pos, out = 0, []
    while pos + 11 <= len(data) and data[pos] == _spool.VERSION:
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        tlen = int.from_bytes(data[pos + 9 : pos + 11], "big")
        assert length <= _spool.MAX_FRAME
        end = pos + 11 + tlen + length
        crc = int.from_bytes(data[pos + 5 : pos + 9], "big")
        assert zlib.crc32(data[pos + 11 : end]) == crc
        out.append((pos, data[pos + 11 : pos + 11 + tlen]))
        pos = end
    assert pos == len(data)
    return out


@pytest.mark.parametrize("tenant", ["a", "acme-corp-1", "x" * 11, "y" * 300])
def test_frames_of_max_frame_and_runs_longer_than_it_compact_to_valid_padding(
    tmp_path: Path, tenant: str
) -> None:
    """A dropped frame whose body is exactly MAX_FRAME, and runs of several such frames, are
    cut into padding frames each within MAX_FRAME (a longer length reads as a torn file) and
    none shorter than a header, whatever the tenant id's length; the kept frames stay put."""
    w = _spool.Writer(str(tmp_path), segment_bytes=1 << 30, max_bytes=1 << 30)
    big = b"z" * _spool.MAX_FRAME
    for i, t in enumerate([tenant, tenant, "keep", tenant, "keep", tenant, tenant, tenant]):
        w.append(t, lambda i=i: big if i % 2 == 0 else b"q" * (_spool.MAX_FRAME - 10 + i))
    w.close()
    path = os.path.join(w.dir, _spool.segment_name(1))
    before = list(_spool.read_frames(path))
    assert _spool.compact(path, {tenant}) is not None
    assert list(_spool.read_frames(path)) == [f for f in before if f[2] == "keep"]
    frames = _every_frame(path)
    assert [t for _, t in frames if t] == [b"keep", b"keep"]


# -- segments left with nothing but padding ----------------------------------------------------


@pytest.mark.usefixtures("memory_kind")
def test_segments_of_nothing_but_padding_do_not_fill_the_spool(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """A segment whose every frame was delivered, behind the segment a failing tenant pins,
    was compacted into padding rather than deleted (segments went oldest first). Padding
    still takes a block per segment (its first header, one more per MAX_FRAME): with 16 kB
    segments, a quarter of what the healthy tenant wrote stayed counted, and its accesses
    were refused once four times the spool had gone through. Such a segment holds nothing
    that anyone reads: it is deleted, whatever its place."""
    memory_kind["acme"] = Receiver()
    memory_kind["glbx"] = Receiver(down=True)
    w = _spool.Writer(str(tmp_path), segment_bytes=16 << 10, max_bytes=64 << 10)
    s = shipper(tmp_path, w)
    append(w, "glbx", 0)  # pins segment 1
    n = 1
    for _ in range(40):  # 40 x 50 frames: 430 kB, near seven times the spool
        for _ in range(50):
            append(w, "acme", n)  # never refused (SpoolError)
            n += 1
        s.step()
    assert uids(memory_kind["acme"]) == list(range(1, n))
    assert _spool.segments(w.dir)[0] == 1  # glbx's event is still there
    assert [f[2] for f in _spool.read_frames(os.path.join(w.dir, _spool.segment_name(1)))] == [
        "glbx"
    ]
    memory_kind["glbx"].down = False
    s.step()
    assert uids(memory_kind["glbx"]) == [0]
    w.close()


@pytest.mark.usefixtures("memory_kind")
def test_a_tenants_first_failed_batch_late_in_the_spool_does_not_refuse_it(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """A lane starts at (0, 0) and its cursor moves only once a batch is taken: a tenant whose
    first event came in segment 3 and whose first batch failed (one 503) looked three
    segments behind, and under pressure its accesses were refused. How far behind a lane is
    is where its oldest undelivered event is, not where its cursor starts."""
    memory_kind["acme"] = Receiver(down=True)
    memory_kind["glbx"] = Receiver(down=True)
    w = _spool.Writer(str(tmp_path), segment_bytes=3 * FRAME, max_bytes=12 * FRAME)
    s = shipper(tmp_path, w, workers=4)  # failing lanes may hold two
    for n in range(7):
        append(w, "glbx", n)  # segments 1, 2 and 3
    append(w, "acme", 7)  # segment 3: acme's first event
    s.step()  # both fail
    assert w.under_pressure
    assert s.over_budget == {"glbx"}
    memory_kind["acme"].down = False
    s.step()
    assert uids(memory_kind["acme"]) == [7]
    w.close()


# -- a disk that fills while a segment is compacted --------------------------------------------


@contextmanager
def compact_writes(fault: Callable[[bytes], int | None]) -> Iterator[None]:
    """Route writes to ``.compact`` copies through ``fault(data)``: an int is what the write
    returns, after really writing that many bytes (a disk that fills mid-write returns short,
    without an error); None writes normally; it may raise."""
    real = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        try:
            copy = os.readlink(f"/proc/self/fd/{fd}").endswith(".compact")
        except OSError:
            copy = False
        if copy:
            n = fault(bytes(data))
            if n is not None:
                return real(fd, bytes(data)[:n], offset) if n else 0
        return real(fd, data, offset)

    os.pwrite = pwrite
    try:
        yield
    finally:
        os.pwrite = real


def test_a_short_write_of_the_copy_loses_no_kept_frame(tmp_path: Path) -> None:
    """A disk that fills while the copy is written makes ``pwrite`` return short, without an
    error. Compaction did not look at what it returned: the copy, synced and renamed over the
    segment, had a hole where the rest of the kept frames were, and the undelivered events of
    the failing tenant, the ones compaction exists to keep, were gone."""
    w = _spool.Writer(str(tmp_path), segment_bytes=1 << 30, max_bytes=1 << 30)
    for n, tenant in enumerate(("acme", "glbx", "glbx", "acme")):
        append(w, tenant, n)
    w.close()
    path = os.path.join(w.dir, _spool.segment_name(1))
    before = list(_spool.read_frames(path))
    short = [True]

    def full(data: bytes) -> int | None:
        if len(data) > _spool._HEAD.size and short:  # kept frames, not a padding header
            short.clear()
            return len(data) // 2
        return None  # a padding header, in a block already there

    with compact_writes(full):
        try:
            _spool.compact(path, {"acme"})
        except OSError:
            assert list(_spool.read_frames(path)) == before  # the segment as it was
        else:
            assert list(_spool.read_frames(path)) == [f for f in before if f[2] == "glbx"]
    assert not [n for n in os.listdir(w.dir) if n.endswith(".compact")]


@pytest.mark.usefixtures("memory_kind")
def test_a_segment_that_cannot_be_compacted_does_not_stop_the_ones_after_it(
    tmp_path: Path, memory_kind: dict[str, Receiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk full, the copy of the oldest pinned segment fails (ENOSPC) on every pass. The
    error left the whole pass of that directory: no later segment was compacted or deleted,
    though deleting one needs no space and gives some back (a segment of tenants that the
    failed one does not hold: the others' events must stay the end of their sequence)."""
    memory_kind["acme"] = Receiver()
    memory_kind["glbx"] = Receiver(down=True)
    memory_kind["init"] = Receiver()
    w = _spool.Writer(str(tmp_path), segment_bytes=3 * FRAME, max_bytes=12 * FRAME)
    s = shipper(tmp_path, w)

    def full(path: str, drop: Any) -> int | None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_spool, "compact", full)
    for n, tenant in enumerate(("glbx", "acme", "acme") + ("init",) * 4):
        append(w, tenant, n)  # segment 1 pinned, 2 delivered, 3 written to
    s.step()
    # 2 went, though 1 could not be compacted (acme's would have stayed: 1 still holds some).
    assert _spool.segments(w.dir) == [1, 3]
    seg1 = os.path.join(w.dir, _spool.segment_name(1))
    assert [f[2] for f in _spool.read_frames(seg1)] == ["glbx", "acme", "acme"]  # as it was
    w.close()


# -- a serve tenant over its share -------------------------------------------------------------


def test_a_serve_tenant_over_its_share_counts_its_drops_and_tells_them_in_its_chain(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """Past its share, a ``serve`` tenant's accesses go on and its events are dropped: each
    one counted, and announced in its chain (a ``dropped`` event with their number) before
    its next event, so that its SIEM sees the gap and the chain still verifies."""
    from sqlalchemy_cmk.audit import make_event
    from sqlalchemy_cmk.context import TenantContext
    from sqlalchemy_cmk.delivery import AuditDelivery, verify_chain

    memory_kind["a"] = Receiver()
    memory_kind["g"] = Receiver(down=True)
    tenants = {
        "acme": TenantAudit([{"kind": "memory", "receiver": "a"}]),
        "globex": TenantAudit([{"kind": "memory", "receiver": "g"}], on_spool_failure="serve"),
    }
    d = AuditDelivery(
        tmp_path,
        tenants,
        poll=0.005,
        max_backoff=0.05,
        retention=0,
        max_spool_bytes=200_000,
        segment_bytes=16_000,
    )

    def record(tenant: str, n: int) -> None:
        ctx = TenantContext(tenant, actor="a")
        d.record(make_event(ctx, "decrypt", "ok", tenant, table="t", rows=n), ctx)

    try:
        for i in range(1500):
            record("acme", i)
            if i % 5 == 0:
                record("globex", i)  # never raises: serve
            if i % 100 == 0:
                d.flush(0.05)
        dropped = d.dropped.get("globex", 0)
        assert dropped > 0
        memory_kind["g"].down = False
        assert d.flush(15)
        deadline = time.monotonic() + 10
        while d._shipper is not None and d._shipper.over_budget:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        record("globex", 9999)  # the drops are announced first
        assert d.flush(15)
    finally:
        d.close()
    got = [json.loads(r.body) for r in memory_kind["g"].unique()]
    notices = [g for g in got if g["status_code"] == "dropped"]
    assert sum(g["resources"][0]["data"]["rows"] for g in notices) == dropped
    assert got[-1]["resources"][0]["data"]["rows"] == 9999
    verify_chain([r.body for r in memory_kind["g"].unique()])
    rows = [g["resources"][0]["data"]["rows"] for g in got if g["status_code"] == "ok"]
    assert len(rows) + dropped == 1500 // 5 + 1


# -- a crash around a compaction, and the directory adopted ------------------------------------


def test_a_compacted_directory_adopted_after_a_crash_delivers_everything(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """The process dies (as SIGKILL leaves it) after compacting, with cursors saved from
    before the compaction and a half-written copy left beside a segment. The next process
    adopts the directory without knowing which tenant is in which segment: it re-delivers
    what the old cursors do not cover (same ids), skips the padding, never compacts from the
    stale cursors, and once the SIEM is back the failing tenant has every event it was told
    was recorded; ``audit verify`` passes on what is left."""
    from sqlalchemy_cmk.audit import make_event
    from sqlalchemy_cmk.cli import main
    from sqlalchemy_cmk.context import TenantContext
    from sqlalchemy_cmk.delivery import AuditDelivery, verify_chain
    from tests.audit.test_delivery_stateful import crash

    memory_kind["a"] = Receiver()
    memory_kind["g"] = Receiver(down=True)
    tenants = {
        "acme": TenantAudit([{"kind": "memory", "receiver": "a"}]),
        "globex": TenantAudit([{"kind": "memory", "receiver": "g"}]),
    }

    def new() -> AuditDelivery:
        return AuditDelivery(
            tmp_path,
            tenants,
            poll=0.005,
            max_backoff=0.05,
            retention=0,
            max_spool_bytes=200_000,
            segment_bytes=16_000,
        )

    def record(d: AuditDelivery, tenant: str, n: int) -> bool:
        ctx = TenantContext(tenant, actor="a")
        try:
            d.record(make_event(ctx, "decrypt", "ok", tenant, table="t", rows=n), ctx)
        except AuditError:
            return False
        return True

    d = new()
    kept: list[int] = []
    old_state = b""
    for i in range(1200):
        assert record(d, "acme", i)
        if i % 7 == 0 and record(d, "globex", i):
            kept.append(i)
        if i % 100 == 0:
            d.flush(0.05)
        if i == 100:
            assert d._writer is not None
            with open(os.path.join(d._writer.dir, "state.json"), "rb") as f:
                old_state = f.read()
    w = d._writer
    assert w is not None and os.path.exists(os.path.join(w.dir, "compacted"))
    crash(d)
    with open(os.path.join(w.dir, "state.json"), "wb") as f:
        f.write(old_state)  # the cursors of before the compaction
    seg = os.path.join(w.dir, _spool.segment_name(_spool.segments(w.dir)[0]))
    with open(seg, "rb") as f, open(seg + ".compact", "wb") as g:
        g.write(f.read()[:1000])  # a copy the crash cut
    memory_kind["g"].down = False
    d = new()
    try:
        d.start()
        assert d.flush(20)
    finally:
        d.close()
    assert [
        json.loads(r.body)["resources"][0]["data"]["rows"] for r in memory_kind["g"].unique()
    ] == kept
    acme = sorted(
        json.loads(r.body)["resources"][0]["data"]["rows"] for r in memory_kind["a"].unique()
    )
    assert acme == list(range(1200))
    for name in ("a", "g"):
        verify_chain([r.body for r in memory_kind[name].unique()])
    assert not os.path.exists(w.dir) or main(["audit", "verify", "--spool", str(tmp_path)]) == 0


# -- compaction while a batch is in flight and a lane catches up from the files ----------------


@pytest.mark.usefixtures("memory_kind")
def test_compaction_during_a_batch_in_flight_and_a_catch_up_loses_nothing(
    tmp_path: Path, memory_kind: dict[str, Receiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    """acme's lane holds one event in memory (the rest go back to the files); its batch fails
    while, in the middle of the send, the segments around its events are compacted (init's
    delivered ones, interleaved with acme's, become padding) and then deleted out of turn.
    The lane then catches up from the compacted files: every event of acme arrives, once, in
    order."""
    from tests.audit.memory_kind import MemorySink

    memory_kind["acme"] = Receiver()
    memory_kind["glbx"] = Receiver(down=True)
    memory_kind["init"] = Receiver()
    w = _spool.Writer(str(tmp_path), segment_bytes=4 * FRAME, max_bytes=24 * FRAME)
    s = shipper(tmp_path, w, batch_max=1, lane_cap=1, workers=4)
    append(w, "glbx", 0)  # pins segment 1
    for n in range(1, 4):
        append(w, "init", n)
    s.step()  # init delivered, glbx failing
    real = MemorySink.send
    fails = [True]

    def send(self: MemorySink, records: Any) -> None:
        if fails and records[0].tenant == "acme":
            fails.clear()
            d = next(iter(s._dirs.values()))
            s._compact(d)  # mid-send, as the shipper's thread could
            raise _shipper.DeliveryError("reset", retryable=True)
        real(self, records)

    monkeypatch.setattr(MemorySink, "send", send)
    for n in range(4, 40):
        append(w, "acme" if n % 2 else "init", n)
        s.step()  # one event per lane and pass (batch_max=1)
    for _ in range(60):
        s.step()
    assert not fails  # the send that compacted did happen
    assert os.path.exists(os.path.join(w.dir, "compacted"))
    assert uids(memory_kind["acme"]) == list(range(5, 40, 2))
    assert [r.id for r in memory_kind["acme"].records] == [
        r.id for r in memory_kind["acme"].unique()
    ]
    w.close()


# -- audit verify while a shipper delivers and removes what it reads ---------------------------


@pytest.mark.usefixtures("memory_kind")
def test_audit_verify_while_a_delivered_writer_goes_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``audit verify`` lists the pruned writers before and after reading. A writer whose
    first segment went while it was read, and whose directory was removed before the second
    listing (its shipper delivered everything), was in neither: its events, read from its
    second segment on, failed the chain ("event 1 is missing"). The state machine on a tight
    spool met this in its own check, compaction and out-of-turn deletion making it likely."""
    import shutil

    from sqlalchemy_cmk.audit import make_event
    from sqlalchemy_cmk.cli import audit as cli_audit
    from sqlalchemy_cmk.cli import main
    from sqlalchemy_cmk.context import TenantContext
    from sqlalchemy_cmk.delivery import AuditDelivery

    d = AuditDelivery(
        tmp_path,
        {"acme": TenantAudit([{"kind": "memory", "receiver": "a"}])},
        segment_bytes=1500,
        start=False,
    )
    ctx = TenantContext("acme", actor="a")
    for n in range(8):
        d.record(make_event(ctx, "decrypt", "ok", "acme", table="t", rows=n), ctx)
    d.close()
    (wdir,) = [p for p in tmp_path.iterdir() if p.name.startswith("w-")]
    assert len(_spool.segments(str(wdir))) > 2
    real = cli_audit.spool_events

    def shipper_meanwhile(spool: Any, tenant: Any = None, **kw: Any) -> Any:
        os.unlink(wdir / _spool.segment_name(1))  # delivered: pruned as the reading starts
        yield from real(spool, tenant, **kw)
        shutil.rmtree(wdir)  # all delivered: the directory goes

    monkeypatch.setattr(cli_audit, "spool_events", shipper_meanwhile)
    assert main(["audit", "verify", "--spool", str(tmp_path)]) == 0
    assert "chain intact" in capsys.readouterr().out


def test_compaction_keeps_the_segments_time(tmp_path: Path) -> None:
    """Retention is counted from a segment's modification time (its last event). The copy
    that compaction renames over the segment had the time of the compaction: the events it
    kept were then held a whole retention longer after they were delivered, and every later
    segment with them (pruning goes oldest first)."""
    w = _spool.Writer(str(tmp_path), segment_bytes=1 << 30, max_bytes=1 << 30)
    for n, tenant in enumerate(("acme", "glbx", "acme")):
        append(w, tenant, n)
    w.close()
    path = os.path.join(w.dir, _spool.segment_name(1))
    old = time.time_ns() - 7200 * 10**9
    os.utime(path, ns=(old, old))
    assert _spool.compact(path, {"acme"}) is not None
    assert os.stat(path).st_mtime_ns == old


@pytest.mark.usefixtures("memory_kind")
def test_a_copy_left_by_a_compaction_that_died_is_removed_on_adoption(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """A process killed between writing the copy and renaming it leaves ``<segment>.compact``:
    never read, but holding disk (and not counted) until the directory goes, which a pinned
    tenant can put off for as long as its SIEM is down. The shipper that adopts the directory
    removes it."""
    memory_kind["acme"] = Receiver(down=True)
    dead = _spool.Writer(str(tmp_path), segment_bytes=1 << 30, max_bytes=1 << 30)
    append(dead, "acme", 0)
    dead.close()  # its lock is free: the next shipper adopts the directory
    seg = os.path.join(dead.dir, _spool.segment_name(1))
    with open(seg + ".compact", "wb") as f:
        f.write(bytes(5000))
    w = _spool.Writer(str(tmp_path), segment_bytes=1 << 30, max_bytes=1 << 30)
    s = shipper(tmp_path, w)
    s.step()
    assert not os.path.exists(seg + ".compact")
    assert os.path.exists(seg)  # acme's event is still owed
    w.close()
