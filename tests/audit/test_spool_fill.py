"""Attacks on the zero-filled segment layout (frames written over zeros filled ahead, ``FILL``
bytes at a time), each kept as a regression test: what a power loss or a reader racing the
writer finds in the zeros, what reading and keeping them costs, and delivery across many rolls.
"""

from __future__ import annotations

import json
import os
import threading
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sqlalchemy_cmk import _spool
from sqlalchemy_cmk.audit import make_event
from sqlalchemy_cmk.context import TenantContext
from sqlalchemy_cmk.delivery import AuditDelivery, TenantAudit, spool_status, verify_chain
from tests.audit._disk import tear
from tests.audit.memory_kind import Receiver


def memory(receiver: str) -> TenantAudit:
    return TenantAudit([{"kind": "memory", "receiver": receiver}])


def record(delivery: AuditDelivery, tenant: str, rows: int) -> None:
    ctx = TenantContext(tenant, actor="a")
    delivery.record(make_event(ctx, "decrypt", "ok", tenant, table="t", rows=rows), ctx)


def rows_of(receiver: Receiver) -> list[int]:
    return [json.loads(r.body)["resources"][0]["data"]["rows"] for r in receiver.unique()]


def killed(delivery: AuditDelivery) -> str:
    """What SIGKILL leaves of a delivery that only recorded: its directory, zeros and all."""
    assert delivery._writer is not None
    wdir = delivery._writer.dir
    delivery._writer.abandon_after_fork()
    delivery._writer = None
    delivery.close()
    return wdir


def last_segment(wdir: str) -> str:
    return os.path.join(wdir, _spool.segment_name(_spool.segments(wdir)[-1]))


# -- a frame torn after its first bytes, over zeros ----------------------------------------------


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_a_frame_torn_after_its_first_bytes_is_not_read_as_an_empty_frame(
    tmp_path: Path, cut: int
) -> None:
    """Over the zero-filled tail, a frame cut after its version byte (a power loss that kept
    the page holding its first bytes, not the next; or a reader that copied that page while
    the writer was in the middle of the frame) reads as version 1, length 0, CRC 0, tenant
    length 0: and the CRC of nothing is 0. The reader took it for a whole frame of tenant ''
    (a frame of no tenant is now skipped: none is written)."""
    writer = _spool.Writer(str(tmp_path), segment_bytes=1 << 20, max_bytes=1 << 30)
    writer.append("acme", lambda: b'{"n":1}')
    path = last_segment(writer.dir)
    tear(path, _spool.frame("acme", b'{"n":2}')[:cut])
    assert [(t, b) for _, _, t, b in _spool.read_frames(path)] == [("acme", b'{"n":1}')]
    writer.close()


def test_a_dead_writers_frame_torn_after_its_first_byte_is_no_tenants_event(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """The same tear in a dead writer's directory: ``audit status`` showed a tenant '' with an
    undelivered event, and the shipper counted it undeliverable."""
    tenants = {"acme": memory("a")}
    dead = AuditDelivery(tmp_path, tenants, start=False)
    for i in range(3):
        record(dead, "acme", i)
    wdir = killed(dead)
    tear(last_segment(wdir), _spool.frame("acme", b'{"never":"acknowledged"}')[:1])
    assert {r["tenant"] for r in spool_status(tmp_path)} == {"acme"}
    d = AuditDelivery(tmp_path, tenants, poll=0.005, retention=0)
    try:
        assert d.flush(15)
        assert rows_of(memory_kind["a"]) == [0, 1, 2]
        assert d._shipper is not None and d._shipper.undeliverable == 0
    finally:
        d.close()


def test_a_later_page_kept_by_a_power_loss_is_not_read_past_a_lost_one(
    tmp_path: Path, memory_kind: dict[str, Receiver]
) -> None:
    """A power loss may keep a later page of the unsynced frames and lose an earlier one (the
    disk writes pages in any order): the zeros of the lost page end the frames, and the whole
    frame behind them (never acknowledged) is not delivered out of order after a gap."""
    tenants = {"acme": memory("a")}
    dead = AuditDelivery(tmp_path, tenants, start=False)
    for i in range(3):
        record(dead, "acme", i)
    wdir = killed(dead)
    path = last_segment(wdir)
    *_, (_, end, _, body) = _spool.read_frames(path)
    uid = json.loads(body)["metadata"]["uid"]
    body = body.replace(b'"rows":2', b'"rows":99').replace(uid.encode(), b"f" * len(uid))
    later = _spool.frame("acme", body)  # a real event, never acknowledged
    with open(path, "r+b") as f:
        f.seek(end + 4096)  # the lost page stays zeros, the next one holds a whole frame
        f.write(later)
    d = AuditDelivery(tmp_path, tenants, poll=0.005, retention=0)
    try:
        assert d.flush(15)
        got = memory_kind["a"].unique()
        assert rows_of(memory_kind["a"]) == [0, 1, 2]
        verify_chain([r.body for r in got])
        deadline = time.monotonic() + 10
        while os.path.exists(wdir):  # delivered, past retention: removed, zeros and all
            assert time.monotonic() < deadline, "the dead writer's directory stays"
            time.sleep(0.01)
    finally:
        d.close()


# -- what the zeros cost ------------------------------------------------------------------------


def _bytes_read() -> int:
    """Bytes this process has read by ``read`` and ``pread``, whatever the reader calls."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/self/io")
def test_a_reader_stops_in_the_zeros_instead_of_reading_all_of_them(tmp_path: Path) -> None:
    """Every reader read a segment to its size, zeros included: a shipper re-read each dead
    writer's last segment (a MiB of zeros after a SIGKILL) in every pass, 20 times a second,
    for the whole retention; ``audit status`` and ``tail`` read each live writer's MiB."""
    writer = _spool.Writer(str(tmp_path), segment_bytes=16 << 20, max_bytes=1 << 30)
    for i in range(10):
        writer.append("acme", lambda i=i: b'{"n":%d}' % i)
    path = last_segment(writer.dir)
    assert os.path.getsize(path) == _spool.FILL
    before = _bytes_read()
    assert len(list(_spool.read_frames(path))) == 10
    assert _bytes_read() - before <= 128 << 10
    # From the last frame, as a shipper re-reads a dead writer's last segment in every pass.
    before = _bytes_read()
    assert list(_spool.read_frames(path, writer.position.offset)) == []
    assert _bytes_read() - before <= 8192  # a page (and /proc/self/io itself)
    writer.close()


def test_the_zeros_filled_ahead_stay_within_max_spool_bytes(tmp_path: Path) -> None:
    """A spool sized below the fill (a small volume or tmpfs, ``max_spool_bytes`` 64 KiB) got
    a MiB of zeros at its first event: sixteen times what it was allowed."""
    writer = _spool.Writer(str(tmp_path), segment_bytes=16 << 20, max_bytes=64 << 10)
    writer.append("acme", lambda: b'{"n":1}')
    assert os.path.getsize(last_segment(writer.dir)) <= 64 << 10
    while True:
        try:
            writer.append("acme", lambda: b'{"n":%d}' % (1 << 40))
        except _spool.SpoolError:
            break
    assert os.path.getsize(last_segment(writer.dir)) <= (64 << 10) + 100
    writer.close()


# -- many rolls, read by the shipper while threads write ------------------------------------------


@pytest.mark.parametrize("segment_bytes", [1, 900, 3 * 4096 + 17])
def test_rolls_racing_the_shipper_lose_and_repeat_nothing(
    tmp_path: Path, memory_kind: dict[str, Receiver], segment_bytes: int
) -> None:
    """Four threads record while the shipper reads the live segment up to the writer's
    position and the writer rolls under it (segments smaller than a frame, than a page, than
    the fill): every event arrives once, each writer's in order, and the segments behind the
    scan are pruned by where their frames end."""
    d = AuditDelivery(
        tmp_path,
        {"acme": memory("a")},
        poll=0.001,
        segment_bytes=segment_bytes,
        retention=0,
    )
    errors: list[BaseException] = []

    def work(base: int) -> None:
        try:
            for i in range(60):
                record(d, "acme", base + i)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=work, args=(k * 1000,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert d.flush(30)
        got = memory_kind["a"].records
        assert len(got) == len({r.id for r in got}) == 240  # none lost, none twice
        verify_chain([r.body for r in got])
        assert d._writer is not None
        wdir = d._writer.dir
        deadline = time.monotonic() + 10
        while len(_spool.segments(wdir)) > 2:
            assert time.monotonic() < deadline, _spool.segments(wdir)
            time.sleep(0.01)
    finally:
        d.close()


# -- readers on a live, zero-filled segment ------------------------------------------------------


@pytest.mark.usefixtures("memory_kind")
def test_audit_status_and_tail_read_a_prefix_of_a_live_writer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``audit status``, ``tail`` and ``verify`` read the segments while the writer writes over
    the zeros and rolls (pages caught half-written, segments cut back at a roll): each read
    sees a prefix of every chain, events only, and no other tenant."""
    from sqlalchemy_cmk.delivery import spool_events

    d = AuditDelivery(tmp_path, {"acme": memory("a")}, start=False, segment_bytes=5000)
    done = threading.Event()

    def write() -> None:
        try:
            for i in range(400):
                record(d, "acme", i)
        finally:
            done.set()

    t = threading.Thread(target=write)
    t.start()
    reads = 0
    try:
        while not done.is_set() or reads < 3:
            rows = [
                json.loads(r.body)["resources"][0]["data"]["rows"]
                for _, r in spool_events(tmp_path)
            ]
            assert rows == list(range(len(rows)))
            verify_chain([r.body for _, r in spool_events(tmp_path)])
            assert {r["tenant"] for r in spool_status(tmp_path)} <= {"acme"}
            reads += 1
    finally:
        t.join()
        d.close()
    assert "not an event" not in caplog.text


def test_a_segment_whose_zeros_could_not_be_cut_counts_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed sync rolls to a new segment, and the old one is cut back to its frames; when
    that cut fails too (the disk is failing), its zeros stay on disk. The writer counted its
    frames only, and the shipper, pruning it, took its whole size off: ``max_spool_bytes``
    then undercounted what the other segments hold by up to a MiB each time."""
    real_sync, real_cut = os.fdatasync, os.ftruncate
    failing = {"sync": True}

    def fdatasync(fd: int) -> None:
        if failing["sync"]:
            failing["sync"] = False
            raise OSError(5, os.strerror(5))
        real_sync(fd)

    def ftruncate(fd: int, n: int) -> None:
        raise OSError(5, os.strerror(5))

    writer = _spool.Writer(str(tmp_path), segment_bytes=16 << 20, max_bytes=1 << 30)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "ftruncate", ftruncate)
    with pytest.raises(_spool.SpoolError):
        writer.append("acme", lambda: b'{"n":1}')
    writer.append("acme", lambda: b'{"n":2}')  # in a new segment
    monkeypatch.setattr(os, "ftruncate", real_cut)
    first = os.path.join(writer.dir, _spool.segment_name(1))
    assert os.path.getsize(first) == _spool.FILL  # the zeros stayed
    assert writer._closed_bytes == os.path.getsize(first)
    writer.forget_bytes(os.path.getsize(first))  # what the shipper takes off when it prunes it
    assert writer._closed_bytes == 0
    writer.close()


# -- the reader, against the simplest one --------------------------------------------------------


def _frames_of(data: bytes) -> list[tuple[int, int, str, bytes]]:
    """The whole frames at the start of ``data``: the reader, read in one piece."""
    out = []
    pos = 0
    head = 11
    while pos + head <= len(data):
        version, length = data[pos], int.from_bytes(data[pos + 1 : pos + 5], "big")
        crc = int.from_bytes(data[pos + 5 : pos + 9], "big")
        tlen = int.from_bytes(data[pos + 9 : pos + 11], "big")
        stop = pos + head + tlen + length
        if version != 1 or length > _spool.MAX_FRAME or stop > len(data):
            break
        if zlib.crc32(data[pos + head : stop]) != crc:
            break
        if tlen:  # else no event
            tenant = data[pos + head : pos + head + tlen].decode()
            out.append((pos, stop, tenant, data[pos + head + tlen : stop]))
        pos = stop
    return out


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(1, 300_000) | st.tuples(st.integers(0, 70_000)), max_size=8),
    cut=st.integers(0, 40),
    zeros=st.sampled_from([0, 1, 4096, 70_000]),
    start=st.integers(0, 10),
    stop=st.none() | st.integers(0, 1_000_000),
)
def test_the_reader_reads_what_one_read_of_the_file_shows(
    tmp_path: Path,
    sizes: list[int | tuple[int]],
    cut: int,
    zeros: int,
    start: int,
    stop: int | None,
) -> None:
    """Frames of any size across the reader's page and 64 KiB reads (one larger than both),
    frames of no tenant (a body of zeros, empty included: skipped, and read past), a torn
    frame, zeros, a start at any frame and an end anywhere: the reader reads as one read of the
    whole file does."""

    def one(i: int, n: int | tuple[int]) -> bytes:
        if isinstance(n, tuple):  # no tenant
            return _spool._HEAD.pack(1, n[0], zlib.crc32(bytes(n[0])), 0) + bytes(n[0])
        return _spool.frame(f"t{i}", b"x" * n)

    data = b"".join(one(i, n) for i, n in enumerate(sizes))
    data += _spool.frame("torn", b"y" * 50)[:cut] + bytes(zeros)
    path = tmp_path / "s.seg"
    path.write_bytes(data)
    whole = _frames_of(data)
    offset = whole[min(start, len(whole) - 1)][0] if whole else 0
    expect = [f for f in whole if f[0] >= offset and (stop is None or f[1] <= stop)]
    assert list(_spool.read_frames(str(path), offset, stop)) == expect


@pytest.mark.parametrize("over", [0, 1, 7])
def test_frames_and_a_torn_one_at_the_fill_boundary(tmp_path: Path, over: int) -> None:
    """The last frame of a fill ending exactly at its end (``over`` 0), or the next one
    straddling it; a power loss then tears the frame after it, where the next fill begins (or
    beyond the file's end, where no fill came): every whole frame is read, the torn one not,
    and the file is only extended by the next fill."""
    writer = _spool.Writer(str(tmp_path), segment_bytes=16 << 20, max_bytes=1 << 30)
    path = last_segment(writer.dir)
    body = b"x" * 40_000
    while writer.position.offset + len(_spool.frame("acme", body)) * 2 <= _spool.FILL:
        writer.append("acme", lambda: body)
    room = _spool.FILL - writer.position.offset - len(_spool.frame("acme", b"y")) + 1
    writer.append("acme", lambda: b"y" * (room + over))  # ends at FILL, or `over` past it
    n = len(list(_spool.read_frames(path)))
    assert os.path.getsize(path) == (_spool.FILL if over == 0 else 2 * _spool.FILL)
    writer.abandon_after_fork()  # killed
    tear(path, _spool.frame("acme", b'{"never":"acknowledged"}')[:20])
    assert len(list(_spool.read_frames(path))) == n
    assert [nxt for _, nxt, _, _ in _spool.read_frames(path)][-1] == _spool.FILL + over


def test_a_roll_between_the_shipper_listing_and_reading_its_segment(
    tmp_path: Path, memory_kind: dict[str, Receiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer rolls (every event here takes a segment of its own) right after the shipper
    listed the segments, before it asks where the writer is: the listed segment is then read
    whole (it was cut back at the roll), the new one at the next pass; nothing is read past a
    live segment's last frame, lost, or delivered twice."""
    d = AuditDelivery(tmp_path, {"acme": memory("a")}, poll=0.002, segment_bytes=1, retention=0)
    real = _spool.segments
    recorded = [1]

    def segments(wdir: str) -> list[int]:
        out = real(wdir)
        if threading.current_thread().name == "cmk-audit-shipper" and recorded[0] < 40:
            record(d, "acme", recorded[0])  # rolls: a segment the listing does not have
            recorded[0] += 1
        return out

    monkeypatch.setattr(_spool, "segments", segments)
    try:
        record(d, "acme", 0)  # the shipper has a directory to list
        deadline = time.monotonic() + 15
        while recorded[0] < 40:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert d.flush(15)
        got = memory_kind["a"].records
        assert rows_of(memory_kind["a"]) == list(range(40))
        assert len(got) == 40  # none twice
        verify_chain([r.body for r in got])
    finally:
        d.close()


@pytest.mark.parametrize("segment_bytes", [1, 100, 5000])
def test_a_segment_smaller_than_the_fill_is_filled_to_its_size_only(
    tmp_path: Path, segment_bytes: int
) -> None:
    """``segment_bytes`` below ``FILL`` (or below a frame): the zeros stop at the segment's
    size, a frame past it extends the file to its end, and every rolled segment ends at its
    last frame, so a previous release's shipper, which prunes at a segment's size, reads it."""
    writer = _spool.Writer(str(tmp_path), segment_bytes=segment_bytes, max_bytes=1 << 30)
    for i in range(60):
        writer.append("acme", lambda i=i: b'{"n":%d,"pad":"%s"}' % (i, b"x" * 300))
    segs = _spool.segments(writer.dir)
    assert len(segs) > 1
    for s in segs:
        path = os.path.join(writer.dir, _spool.segment_name(s))
        frames = list(_spool.read_frames(path))
        assert frames
        if s != segs[-1]:
            assert os.path.getsize(path) == frames[-1][1]
        else:
            assert os.path.getsize(path) <= max(segment_bytes, frames[-1][1])
    writer.close()


def test_an_event_of_no_tenant_is_refused(tmp_path: Path) -> None:
    """Readers skip a frame of no tenant (a torn one reads as such): none is written."""
    writer = _spool.Writer(str(tmp_path), segment_bytes=1 << 20, max_bytes=1 << 30)
    with pytest.raises(_spool.SpoolError):
        writer.append("", lambda: b'{"n":1}')
    assert writer.position.offset == 0
    writer.close()
