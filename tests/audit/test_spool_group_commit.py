"""Group commit: appends from several threads share fdatasyncs, and each append returns only
after a sync that started after its frame was written."""

from __future__ import annotations

import os
import threading
import time
import zlib
from pathlib import Path

import pytest

from sqlalchemy_cmk import _spool


def test_four_threads_share_syncs_and_none_returns_before_its_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = _spool.Writer(str(tmp_path), segment_bytes=1 << 20, max_bytes=1 << 30)
    real = os.fdatasync
    syncs: list[tuple[float, float]] = []  # (started, ended) of each sync

    def slow_sync(fd: int) -> None:
        started = time.monotonic()
        time.sleep(0.005)  # a slow disk: the threads' CPU work is small beside it
        real(fd)
        syncs.append((started, time.monotonic()))

    monkeypatch.setattr(_spool.os, "fdatasync", slow_sync)
    returned: list[tuple[float, float]] = []  # (written, returned) of each append
    lock = threading.Lock()

    def work() -> None:
        for _ in range(40):
            written: list[float] = []
            writer.append("acme", lambda: b"{}", lambda w=written: w.append(time.monotonic()))
            with lock:
                returned.append((written[0], time.monotonic()))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    assert len(returned) == 160
    # Shared: far fewer syncs than frames (one each, or two when threads took turns).
    assert len(syncs) <= 160 / 2.5, len(syncs)
    # Durable before returning: some sync began after the frame was written and ended before
    # the append returned.
    for w, r in returned:
        assert any(w <= s and e <= r for s, e in syncs), (w, r)


def test_frames_are_written_over_zeros_and_the_tail_is_cut_at_close(tmp_path: Path) -> None:
    """A sync must not change the file's size (that is a journal commit per sync): frames go
    over zeros filled ahead, ``FILL`` at a time. Readers see exactly the frames, live or not,
    and a closed writer leaves no zeros behind."""
    writer = _spool.Writer(str(tmp_path), segment_bytes=4 * _spool.FILL, max_bytes=1 << 30)
    path = os.path.join(writer.dir, _spool.segment_name(1))
    sizes = set()
    for i in range(500):
        writer.append("acme", lambda i=i: b'{"n":%d}' % i)
        sizes.add(os.path.getsize(path))
    assert sizes == {_spool.FILL}  # one fill, never extended by a frame
    bodies = [b for _, _, _, b in _spool.read_frames(path)]
    assert bodies == [b'{"n":%d}' % i for i in range(500)]
    end = writer.position.offset
    assert [n for _, n, _, _ in _spool.read_frames(path, 0, end)][-1] == end
    writer.close()
    assert os.path.getsize(path) == end
    assert len(list(_spool.read_frames(path))) == 500


def test_a_disk_too_full_for_the_zeros_still_takes_the_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Filling ahead is an optimisation: when the disk cannot take the zeros, the frame is
    appended as it comes, recorded and readable, and nothing half-filled is left between."""
    import errno

    real = os.pwrite
    fills: list[int] = []

    def no_room_for_zeros(fd: int, data: bytes, offset: int) -> int:
        if len(data) > 1000 and not any(data[:64]):
            fills.append(len(data))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(_spool.os, "pwrite", no_room_for_zeros)
    writer = _spool.Writer(str(tmp_path), segment_bytes=1 << 20, max_bytes=1 << 30)
    for i in range(20):
        writer.append("acme", lambda i=i: b'{"n":%d}' % i)
    path = os.path.join(writer.dir, _spool.segment_name(1))
    assert os.path.getsize(path) == writer.position.offset  # no zeros: appended
    assert len(list(_spool.read_frames(path))) == 20
    assert len(fills) == 1  # not tried again for every frame
    writer.close()


def test_compaction_keeps_offsets_and_reads_as_before(tmp_path: Path) -> None:
    """Dropped frames become padding over a hole: the kept frames stay at their offsets (the
    shipper's cursors), every reader goes on past the padding (an earlier release's too: a
    padding frame is an ordinary version-1 frame), and the blocks are given back."""
    writer = _spool.Writer(str(tmp_path), segment_bytes=1 << 30, max_bytes=1 << 30)
    for i in range(3000):
        tenant = "globex" if i % 500 == 0 else "acme"
        writer.append(tenant, lambda i=i: b'{"n":%d,"pad":"%s"}' % (i, b"x" * 300))
    writer.close()
    path = os.path.join(writer.dir, _spool.segment_name(1))
    before = list(_spool.read_frames(path))
    size, blocks = os.path.getsize(path), os.stat(path).st_blocks
    held = _spool.compact(path, {"acme"})
    after = list(_spool.read_frames(path))
    assert after == [f for f in before if f[2] == "globex"]  # same offsets, same bytes
    assert os.path.getsize(path) == size
    assert held is not None and held == os.stat(path).st_blocks * 512 < blocks * 512 // 10
    assert _spool.compact(path, {"acme"}) is None  # nothing left to drop
    # A reader that yields every frame, padding included, as the previous release's did.
    with open(path, "rb") as f:
        data = f.read()
    pos, seen = 0, []
    while pos + 11 <= len(data) and data[pos] == _spool.VERSION:
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        tlen = int.from_bytes(data[pos + 9 : pos + 11], "big")
        end = pos + 11 + tlen + length
        assert zlib.crc32(data[pos + 11 : end]) == int.from_bytes(data[pos + 5 : pos + 9], "big")
        seen.append(data[pos + 11 : pos + 11 + tlen])
        pos = end
    assert pos == size  # read to the end, past every padding frame
    assert seen.count(b"globex") == 6 and set(seen) == {b"", b"globex"}
