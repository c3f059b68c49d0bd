"""The durable audit spool: fsync'd append-only segment files, one directory per writer process.

Layout of a spool directory::

    <spool>/
      w-<writer>/             one per process that wrote (a fork gets its own)
        lock                  flock'd by the process that writes or ships this directory
        00000001.seg ...      segments, appended to, rolled at ``segment_bytes``
        state.json            delivery cursors and status (the shipper's, replaced atomically)

A segment is a sequence of frames, version byte first::

    u8  version (1) | u32 length of body | u32 crc32(tenant + body) | u16 length of tenant
    tenant (UTF-8) | body (the event's canonical JSON)

The tenant is outside the JSON so that a reader catching one tenant up skips the others' frames
without parsing them.

:meth:`Writer.append` returns only once the frame is on disk (``fdatasync``). Appends from many
threads share syncs (group commit): the first thread to find no sync running does one for every
frame written so far, the others wait for it, and one of them leads the next. A leader that saw
several frames in the last sync waits a moment (at most ``GATHER``) for as many again: without
that, four threads appending got two frames per sync, with it nearly four.

Segments are zero-filled ahead of the frames, ``FILL`` bytes at a time, and frames written over
the zeros: an ``fdatasync`` then writes the frames' pages only. Appending to the end instead
changes the file's size, so each sync was also a journal commit (220-350 µs here against 115).
A closed writer cuts its segments back to their last frame.

A reader stops at the first frame that is short, fails its CRC, or starts with a zero byte (the
filled tail; no version is 0): that is where the frames end, or where a crash cut the file (only
a power loss can leave a torn frame; SIGKILL keeps every completed ``write``). It reads the file
a little at a time, so it stops in the zeros too. A frame with an empty tenant is no event (none
is written) and is skipped: over zeros, a frame cut after its first 1-3 bytes reads as one
(length 0, CRC 0, tenant length 0, and the CRC of nothing is 0), and the zeros after it end the
frames.

*Padding* frames have an empty tenant and a body of zeros: :func:`compact` puts them where
delivered frames were, in a copy of the segment whose bodies are holes (no disk blocks), so that
the frames it keeps stay at their offsets (the shipper's cursors) and any reader, of this
release or an earlier one, still reads the file from start to end. Readers skip them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_HEAD = struct.Struct(">BIIH")
VERSION = 1
MAX_FRAME = 1 << 20  # an event is a few hundred bytes; a larger length is a torn or foreign file
GATHER = 0.0005  # seconds a sync may wait for other threads' frames, see Writer._sync
FILL = 1 << 20  # bytes of a segment zero-filled at a time, see the module docstring
READ = 1 << 16  # bytes a reader reads at a time, see read_frames
SEGMENT_GLOB = ".seg"


class SpoolError(Exception):
    """The spool could not take an event (full, or the disk failed); internal."""


def new_writer_id() -> str:
    """``<host>-<pid>-<random>``: unique per process and per fork, readable by an operator."""
    host = socket.gethostname().split(".", 1)[0] or "host"
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in host)[:40]
    return f"{safe}-{os.getpid()}-{os.urandom(4).hex()}"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def segment_name(n: int) -> str:
    return f"{n:08d}{SEGMENT_GLOB}"


def segments(wdir: str) -> list[int]:
    """The segment numbers in a writer directory, oldest first; none once it is gone (a
    shipper removes a delivered directory while others, ``audit status`` say, read the spool)."""
    out = []
    try:
        names = os.listdir(wdir)
    except FileNotFoundError:
        return []
    for name in names:
        if name.endswith(SEGMENT_GLOB) and name[:-4].isdigit():
            out.append(int(name[:-4]))
    return sorted(out)


def read_frames(
    path: str, offset: int = 0, end: int | None = None
) -> Iterator[tuple[int, int, str, bytes]]:
    """``(offset, next_offset, tenant, body)`` of each whole frame from ``offset`` (to ``end``,
    if given: a live writer's position); stops at a torn tail or the zero-filled one.

    The file is read a page, then up to ``READ`` bytes, at a time, not to its size: a segment's
    size includes up to ``FILL`` bytes of zeros after its frames, and a shipper re-reads a dead
    writer's last segment from its last frame in every pass.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        data = b""
        at = offset  # the file offset of data[0]
        pos = 0
        more = True  # bytes may follow data in the file (before ``end``)
        step = 4096  # doubled up to READ: most reads find a few frames, or none, then zeros
        while True:
            need = _HEAD.size
            if pos + _HEAD.size <= len(data):
                version, length, crc, tlen = _HEAD.unpack_from(data, pos)
                if version != VERSION or length > MAX_FRAME:
                    return
                need = _HEAD.size + tlen + length
            if pos + need > len(data):
                if not more:
                    return
                want = max(step, pos + need - len(data))
                step = min(2 * step, READ)
                if end is not None:
                    want = min(want, end - at - len(data))
                chunk = os.pread(fd, want, at + len(data)) if want > 0 else b""
                more = len(chunk) == want and want > 0
                data, at, pos = data[pos:] + chunk, at + pos, 0
                continue
            start = pos + _HEAD.size
            stop = pos + need
            if zlib.crc32(data[start:stop]) != crc:
                return
            if tlen:  # else no event: a frame torn over zeros, see the module docstring
                tenant = data[start : start + tlen].decode("utf-8", "surrogatepass")
                yield at + pos, at + stop, tenant, data[start + tlen : stop]
            pos = stop
    finally:
        os.close(fd)


def _padding_header(length: int) -> bytes:
    """The header of a padding frame ``length`` bytes long in all (its body: zeros)."""
    body = length - _HEAD.size
    return _HEAD.pack(VERSION, body, _zero_crc(body), 0)


_zero_crcs: dict[int, int] = {}


def _zero_crc(n: int) -> int:
    crc = _zero_crcs.get(n)
    if crc is None:
        crc = zlib.crc32(bytes(n))
        if len(_zero_crcs) < 4096:
            _zero_crcs[n] = crc
    return crc


def remove_leftovers(wdir: str) -> None:
    """Remove the copies a compaction left when its process died before the rename (the
    directory's lock held: nobody else compacts it). They are never read, but hold disk."""
    try:
        names = os.listdir(wdir)
    except FileNotFoundError:
        return
    for name in names:
        if name.endswith(SEGMENT_GLOB + ".compact"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(wdir, name))


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset``. A disk that fills mid-write makes ``pwrite``
    return short without an error: the rest is written again, which then raises (ENOSPC), or
    a copy with a hole where kept frames were would replace the segment."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[n:], offset + n


def compact(path: str, drop: Any) -> int | None:
    """Replace the frames of the tenants in ``drop`` with padding, at unchanged offsets.

    The segment is rewritten into a new file (the kept frames copied, each dropped run one or
    more padding headers over a hole), synced and renamed over the old one: a reader sees
    either file whole, and both read alike but for the dropped frames. Returns the disk space
    the new file takes (its allocated blocks), or None if nothing was dropped.
    """
    with open(path, "rb") as f:
        data = f.read()
        st = os.fstat(f.fileno())
    runs: list[tuple[int, int]] = []  # [start, end) of dropped or padding frames, merged
    pos = 0
    changed = False
    while pos + _HEAD.size <= len(data):
        version, length, crc, tlen = _HEAD.unpack_from(data, pos)
        start = pos + _HEAD.size
        end = start + tlen + length
        if version != VERSION or length > MAX_FRAME or end > len(data):
            break
        if zlib.crc32(data[start:end]) != crc:
            break
        tenant = data[start : start + tlen].decode("utf-8", "surrogatepass")
        if not tlen or tenant in drop:
            changed = changed or bool(tlen)
            if runs and runs[-1][1] == pos:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((pos, end))
        pos = end
    if not changed:
        return None
    tmp = path + ".compact"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, len(data))  # a hole wherever nothing is written below
        at = 0
        for a, b in runs:
            if a > at:
                _pwrite_all(fd, data[at:a], at)  # the kept frames between two runs
            while a < b:
                n = min(b - a, MAX_FRAME + _HEAD.size)
                if 0 < b - a - n < _HEAD.size:
                    n = b - a - _HEAD.size  # the last piece must hold a header too
                _pwrite_all(fd, _padding_header(n), a)
                a += n
            at = b
        if at < pos:
            _pwrite_all(fd, data[at:pos], at)  # the kept frames after the last run
        if data[pos:].strip(b"\0"):
            _pwrite_all(fd, data[pos:], pos)  # a torn tail, as it was; zeros stay a hole
        # The segment's time, not the compaction's: retention counts from it.
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.fdatasync(fd)
        kept = os.fstat(fd).st_blocks * 512
        fd, done = -1, fd
        os.close(done)
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path))
    return kept


def frame(tenant: str, body: bytes) -> bytes:
    """One frame (see the module docstring).

    Raises:
        SpoolError: the tenant id or the body is too long for the format.
    """
    # Any str is a tenant id, lone surrogates included: they round-trip as their own code
    # points, so the reader's tenant is the writer's, byte for byte.
    t = tenant.encode("utf-8", "surrogatepass")
    if len(t) > 0xFFFF or len(body) > MAX_FRAME:
        raise SpoolError("the audit event is too large for the spool (tenant id or body)")
    return _HEAD.pack(VERSION, len(body), zlib.crc32(t + body), len(t)) + t + body


def try_lock(wdir: str) -> int | None:
    """Take the directory's lock without waiting; its fd (keep it open), or None if held (or
    the directory is gone)."""
    try:
        fd = os.open(os.path.join(wdir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def lane_key(tenant: str, name: str) -> str:
    """A lane's key in ``state.json``: a JSON pair, since a tenant id may hold any character
    (joined by a newline, a tenant id holding one was split in the wrong place)."""
    return json.dumps([tenant, name], ensure_ascii=False)


def parse_lane_key(key: str) -> tuple[str, str] | None:
    """The inverse of :func:`lane_key`; None for a key of another form (that lane starts over)."""
    try:
        pair = json.loads(key)
    except ValueError:
        return None
    if isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair):
        return pair[0], pair[1]
    return None


def _cursor(value: Any) -> list[int] | None:
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)
    ):
        return [value[0], value[1]]
    return None


def load_state(wdir: str) -> dict[str, Any]:
    """The saved state, with what does not have the expected shape left out.

    A state file cut by a crash, or valid JSON of another shape, starts those lanes over: that
    re-delivers (at least once, never lost), where trusting it could raise in every pass of
    the shipper, and stop every directory's delivery, or skip events.
    """
    try:
        with open(os.path.join(wdir, "state.json"), "rb") as f:
            raw = json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    lanes: dict[str, dict[str, Any]] = {}
    saved = raw.get("lanes")
    for key, st in saved.items() if isinstance(saved, dict) else ():
        if parse_lane_key(key) is None or not isinstance(st, dict):
            continue
        cursor = _cursor(st.get("cursor"))
        if cursor is None:
            continue
        clean: dict[str, Any] = {"cursor": cursor}
        for k in ("delivered", "failures"):
            v = st.get(k)
            clean[k] = v if isinstance(v, int) and not isinstance(v, bool) else 0
        for k in ("delivered_at", "last_error_at"):
            v = st.get(k)
            clean[k] = v if isinstance(v, (int, float)) and not isinstance(v, bool) else None
        v = st.get("last_error")
        clean["last_error"] = v if isinstance(v, str) else None
        lanes[key] = clean
    state: dict[str, Any] = {"lanes": lanes}
    scan = _cursor(raw.get("scan"))
    if scan is not None:
        state["scan"] = scan
    if isinstance(raw.get("undeliverable"), int):
        state["undeliverable"] = raw["undeliverable"]
    return state


def save_state(wdir: str, state: dict[str, Any]) -> None:
    """Replace ``state.json`` atomically (write, fsync, rename)."""
    tmp = os.path.join(wdir, f".state.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(json.dumps(state, sort_keys=True).encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(wdir, "state.json"))


@dataclass
class Position:
    """Where a frame ends: segment number and byte offset after it (orders frames of a writer)."""

    segment: int
    offset: int

    def key(self) -> tuple[int, int]:
        return (self.segment, self.offset)


class Writer:
    """Appends frames to this process's writer directory, durably (see the module docstring).

    Args:
        root: The spool directory (created if missing, mode 0700).
        segment_bytes: Roll to a new segment past this size.
        max_bytes: Refuse appends (SpoolError) once this writer's segments hold this much.
    """

    def __init__(self, root: str, *, segment_bytes: int, max_bytes: int) -> None:
        os.makedirs(root, mode=0o700, exist_ok=True)
        self.root = root
        self.writer_id = new_writer_id()
        self.dir = os.path.join(root, f"w-{self.writer_id}")
        # Locked under a name no shipper adopts, then renamed: a shipper that listed the root
        # in between would otherwise take the new directory's lock first.
        tmp = os.path.join(root, f".new-{self.writer_id}")
        os.makedirs(tmp, mode=0o700)
        lock = try_lock(tmp)
        assert lock is not None  # nobody else knows the name yet
        os.rename(tmp, self.dir)
        fsync_dir(root)
        self.lock_fd: int | None = lock
        self._segment_bytes = segment_bytes
        self._max_bytes = max_bytes
        self._lock = threading.Lock()  # frame order, the chain, and the sync counters
        self._work = threading.Condition(self._lock)  # a gathering leader waits for frames
        self._done = threading.Condition(self._lock)  # followers wait for the leader's sync
        self._syncing = False
        self._expect = 1  # frames the last sync covered
        self._segment = 0
        self._fd = -1
        self._size = 0  # bytes of frames in the current segment
        self._filled = 0  # bytes of the current segment written, zeros ahead of the frames
        self._fill_after = 0  # after a failed fill, frames are appended up to here
        self._closed_bytes = 0  # bytes in earlier segments still on disk (approx.)
        self._written = 0  # frames written
        self._synced = 0  # frames known on disk
        # Frames (first, last) that were written, not yet synced, when a sync failed.
        self._lost: list[tuple[int, int]] = []
        self._broken = False
        self._retired: list[int] = []
        self._roll()

    @property
    def position(self) -> Position:
        """The end of the last frame written (read under the lock: a segment number from before
        a roll with the new segment's size would tell a reader the old segment ends early)."""
        with self._lock:
            return Position(self._segment, self._size)

    def _roll(self) -> None:
        # Called under _lock. The old segment is synced and closed by the syncer's next pass:
        # closing it here could pull the descriptor from under a sync in flight.
        # The new file is opened before anything changes: if that fails (no inode left, too
        # many open files) the writer still owns exactly the descriptor it had, and never
        # retires it twice (a second close could hit a number the application reused).
        path = os.path.join(self.dir, segment_name(self._segment + 1))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        if self._fd >= 0:
            kept = self._size
            try:
                os.ftruncate(self._fd, self._size)  # its zero-filled tail
            except OSError:
                # The zeros stay on disk: counted, as the shipper takes the file's whole size
                # off when it prunes it.
                kept = max(self._filled, self._size)
            self._retired.append(self._fd)
            self._closed_bytes += kept
        self._segment += 1
        self._fd = fd
        self._size = self._filled = self._fill_after = 0
        fsync_dir(self.dir)  # the new name itself must survive a crash

    @property
    def under_pressure(self) -> bool:
        """Half of ``max_bytes`` is in use: delivered segments should go before retention."""
        return self._closed_bytes + self._size >= self._max_bytes // 2

    @property
    def full(self) -> bool:
        """``max_bytes`` is reached: appends are refused until the shipper prunes."""
        return self._closed_bytes + self._size >= self._max_bytes

    def forget_bytes(self, n: int) -> None:
        """The shipper deleted ``n`` bytes of old segments."""
        with self._lock:
            self._closed_bytes = max(0, self._closed_bytes - n)

    def append(self, tenant: str, build: Any, written: Any = None) -> tuple[bytes, Position]:
        """Write one frame and wait until it is on disk; return its body and end position.

        ``build()`` is called under the writer's lock (so chain order is file order) and returns
        the body bytes; ``written()``, if given, is called under the same lock once the whole
        frame is in the file, so that state derived from the body (the chain) advances only
        for frames that are there.

        Raises:
            SpoolError: the spool is full or the disk failed (nothing is half-recorded: a frame
                that was not synced is never reported as recorded).
        """
        if not tenant:
            raise SpoolError("an audit event needs a tenant")  # an empty one: padding, no event
        with self._lock:
            if self.full:
                raise SpoolError("the audit spool is full")
            try:
                if self._broken or self._size >= self._segment_bytes:
                    # After a failed sync the file's tail is unknown: start a new one.
                    self._roll()
                    self._broken = False
                body: bytes = build()
                data = frame(tenant, body)
            except OSError as exc:
                self._broken = True
                raise SpoolError(f"the audit spool could not write: {exc.strerror}") from None
            self._write(data)
            if written is not None:
                written()
            self._size += len(data)
            self._filled = max(self._filled, self._size)
            self._written += 1
            mine = self._written
            pos = Position(self._segment, self._size)
            self._work.notify()
            while self._synced < mine:
                if self._syncing:
                    self._done.wait()
                else:
                    self._sync()
            if self._was_lost(mine):
                raise SpoolError("the audit spool could not sync")
        return body, pos

    def _write(self, data: bytes) -> None:
        """Write one whole frame after the last, or none of it (under _lock).

        A disk that fills mid-frame makes ``write`` return short without an error. The torn
        bytes are cut off again: left in place, every frame appended after them (once space is
        back) would sit behind a frame that fails its CRC, where every reader stops.
        """
        end = self._size + len(data)
        if end > self._filled and end > self._fill_after:
            # Never more zeros than the segment, or the spool, has room for: a spool sized
            # below FILL would otherwise hold a MiB of zeros from its first event.
            room = min(self._segment_bytes, self._max_bytes - self._closed_bytes)
            self._fill(max(end, min(self._filled + FILL, room)))
        try:
            n = os.pwrite(self._fd, data, self._size)
            if n == len(data):
                return
            error = errno.ENOSPC
        except OSError as exc:
            error = exc.errno or errno.EIO
        try:
            os.ftruncate(self._fd, self._size)
            self._filled = self._size
        except OSError:
            self._broken = True  # tail unknown: the next append starts a new segment
        raise SpoolError(f"the audit spool could not write: {os.strerror(error)}")

    def _fill(self, to: int) -> None:
        """Zero-fill the segment up to ``to`` bytes (under _lock). A disk too full for the
        zeros is not full for the frame: it is then appended as it comes."""
        zeros = bytes(to - self._filled)
        try:
            n = os.pwrite(self._fd, zeros, self._filled)
        except OSError:
            n = -1
        if n == len(zeros):
            self._filled = to
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._filled)
        self._fill_after = self._filled + FILL  # not one failing megabyte per frame

    def _was_lost(self, mine: int) -> bool:
        return any(lo <= mine <= hi for lo, hi in self._lost)

    def _sync(self) -> None:
        """Lead one sync of every frame written so far (called, and returns, under _lock)."""
        self._syncing = True
        try:
            deadline = time.monotonic() + GATHER
            while self._written - self._synced < self._expect:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._work.wait(left)
            target = self._written
            self._expect = target - self._synced
            fd = self._fd
            retired, self._retired = self._retired, []
            self._lock.release()
            try:
                for old in retired:
                    try:
                        os.fdatasync(old)
                    finally:
                        os.close(old)
                os.fdatasync(fd)
                failed = False
            except OSError:
                failed = True
            finally:
                self._lock.acquire()
            if failed:
                self._broken = True  # the next append starts a new segment
                # Every frame already written may be lost, not only those this sync was for:
                # after a failed fsync Linux marks the pages clean, so the next sync of the
                # same file succeeds without writing them.
                self._lost = [*self._lost[-63:], (self._synced + 1, self._written)]
                self._synced = self._written
            else:
                self._synced = max(self._synced, target)
        finally:
            self._syncing = False
            self._done.notify_all()

    def close(self) -> None:
        with self._lock:
            while self._syncing:
                self._done.wait()
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._size)  # its zero-filled tail
            for fd in [*self._retired, self._fd]:
                if fd >= 0:
                    try:
                        os.fdatasync(fd)
                    finally:
                        os.close(fd)
            self._retired, self._fd = [], -1
            if self.lock_fd is not None:
                os.close(self.lock_fd)
                self.lock_fd = None

    def abandon_after_fork(self) -> None:
        """In a forked child: drop the parent's descriptors without touching its files.

        The child must not keep the parent's directory locked (flock locks belong to the open
        file, which the fork shares): if the parent died first, the lock would keep its
        unshipped events from being adopted for as long as the child lives.
        """
        for fd in (*self._retired, self._fd, self.lock_fd):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._retired, self._fd = [], -1
        self.lock_fd = None
