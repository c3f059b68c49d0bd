"""The background shipper: reads the spool and delivers each tenant's events to its destinations.

One *lane* per (writer directory, tenant, destination): a lane sends its events in spool order,
one batch at a time, and only moves its cursor once the destination took the batch (at least
once; receivers drop duplicates by event id). Lanes are independent: a destination that fails
backs off (exponential, full jitter, honouring ``Retry-After``) or hangs in its own worker until
its sink's timeout, while the others go on. A lane that falls far behind stops holding its
events in memory and catches up from the files later.

The shipper ships its own process's directory and adopts any other whose lock is free: a process
that died (SIGKILL included) leaves its directory unlocked, and the next shipper to start
delivers what it recorded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import _spool
from .errors import DeliveryError
from .sinks import Record, Sink, SinkEnv, build_sink, destination_name

log = logging.getLogger("sqlalchemy_cmk.delivery")
SAVE_EVERY = 1.0  # seconds between saves of a directory's cursors

Pos = tuple[int, int]  # (segment, offset after the frame)
_REMOVED: Any = object()  # a lane's destination that the tenant no longer has


def record_of(tenant: str, body: bytes) -> Record | None:
    """The record of a frame's body; None (logged) for a body that is not an event.

    A frame whose CRC holds but whose body is not an event (a file of another tool or version
    copied in, a bug) is skipped: raising would stop every reader at it, for good, and with it
    every later event of that writer.
    """
    try:
        doc = json.loads(body)
        return Record(
            id=str(doc["metadata"]["uid"]),
            tenant=tenant,
            time_ns=int(doc["unmapped"]["time_ns"]),
            severity="info" if doc["status_id"] == 1 else "warning",
            body=body,
        )
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("audit spool frame skipped, not an event: %s", type(exc).__name__)
        return None


@dataclass
class Lane:
    """One destination of one tenant, for one writer directory."""

    tenant: str
    name: str
    cursor: Pos
    pending: deque[tuple[Pos, Record]] = field(default_factory=deque)
    overflow_from: Pos | None = None  # events from here on are only on disk
    in_flight: bool = False
    next_try: float = 0.0
    attempts: int = 0
    delivered: int = 0
    delivered_at: float | None = None  # wall clock
    failures: int = 0
    last_error: str | None = None
    last_error_at: float | None = None

    def state(self) -> dict[str, Any]:
        return {
            "cursor": list(self.cursor),
            "delivered": self.delivered,
            "delivered_at": self.delivered_at,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }


@dataclass
class WriterDir:
    path: str
    lock_fd: int | None  # None: our own writer holds the lock
    saved: dict[str, Any]
    scan: Pos = (0, 0)
    lanes: dict[tuple[str, str], Lane] = field(default_factory=dict)
    seg_tenants: dict[int, set[str]] = field(default_factory=dict)
    seg_end: dict[int, int] = field(default_factory=dict)  # where a left segment's frames end
    seg_last: dict[int, dict[str, int]] = field(default_factory=dict)  # a tenant's last frame
    seg_bytes: dict[int, int] = field(default_factory=dict)  # what a compacted segment holds
    dirty: bool = False
    saved_at: float = 0.0  # monotonic time of the last save
    held: bool = False  # the last scan stopped at a tenant whose destinations are unknown


def _one_line(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\n``, ``\\x1b``, ``\\u202e``).

    A sink's error may quote what its destination answered, and the destination is the
    tenant's: kept as is, a newline would forge a line of the operator's log and an escape
    sequence drive the terminal that shows ``audit status``.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Shipper:
    """Delivers spooled events; see the module docstring."""

    def __init__(
        self,
        root: str,
        audit_of: Callable[[str], Any],
        env: SinkEnv,
        writer: _spool.Writer | None,
        *,
        workers: int,
        batch_max: int,
        poll: float,
        retention: float,
        max_backoff: float,
        lane_cap: int,
        max_lag: float = 300.0,
        sink_factory: Callable[[dict[str, Any], SinkEnv], Sink] = build_sink,
    ) -> None:
        self.root = root
        # tenant -> TenantAudit | None (cached by the caller). It raises when it cannot tell
        # (the registry is down and the tenant was never seen): the tenant's events then wait.
        self._audit_of = audit_of
        self._env = env
        self._writer = writer
        self._workers = workers
        self._batch_max = batch_max
        self._poll = poll
        self._retention = retention
        self._max_backoff = max_backoff
        self._lane_cap = lane_cap
        self._max_lag_ns = max_lag * 1e9
        self._sink_factory = sink_factory
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._dirs: dict[str, WriterDir] = {}
        self._sinks: dict[tuple[str, str], tuple[str, Sink]] = {}  # (tenant, name) -> (spec, sink)
        self._tokens: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at)
        self._pool: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._next_adopt = 0.0
        self.undeliverable = 0  # events of tenants with no destination any more
        # Tenants refused new events: the spool is under pressure and holds theirs, undelivered
        # since their destinations fail (see step()).
        self.over_budget: frozenset[str] = frozenset()
        self.passes = 0

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="cmk-audit-send")
        self._thread = threading.Thread(target=self._run, name="cmk-audit-shipper", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def set_writer(self, writer: _spool.Writer) -> None:
        with self._lock:
            self._writer = writer
        self._next_adopt = 0.0  # pick its directory up at the next pass

    def notify(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the batches in flight (waits at most ``timeout``), saving cursors."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            dirs = list(self._dirs.values())
        for d in dirs:
            self._save(d)
        with self._lock:
            for d in dirs:
                if d.lock_fd is not None:
                    os.close(d.lock_fd)
                    d.lock_fd = None
            self._dirs.clear()
            for _, sink in self._sinks.values():
                with contextlib.suppress(Exception):
                    sink.close()
            self._sinks.clear()

    def abandon_after_fork(self) -> None:
        """In a forked child: forget the parent's threads and descriptors (never ship them)."""
        for d in self._dirs.values():
            if d.lock_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(d.lock_fd)
        self._dirs = {}
        self._sinks = {}
        self._thread = None
        self._pool = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()

    def drain(self, timeout: float) -> bool:
        """Wait until every known lane is delivered (tests, shutdown); True if it was."""
        deadline = time.monotonic() + timeout
        first = self.passes + 2  # a whole pass that began after this call (adoptions too)
        self._next_adopt = 0.0
        while time.monotonic() < deadline:
            self._wake.set()
            if self.passes < first:
                time.sleep(0.005)
                continue
            # In this order: frames join a lane's backlog only when scanned, so a scan at the
            # end followed by an empty backlog means all of them were delivered.
            if self._scanned_to_end() and self.backlog() == 0:
                return True
            time.sleep(0.01)
        return False

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("audit shipper pass failed; retrying")
                self._stop.wait(1.0)
            self._wake.wait(self._poll)
            self._wake.clear()

    def step(self) -> None:
        now = time.monotonic()
        if now >= self._next_adopt:
            self._adopt()
            self._next_adopt = now + 2.0
        with self._lock:
            dirs = list(self._dirs.values())
        for d in dirs:
            self._isolated(self._scan, d)
        self._schedule()
        for d in dirs:
            # At most once a second: each save is an fsync and a rename, which share the
            # file system's journal with the spool's own fdatasyncs (saving every pass halved
            # what the spool could record). A crash re-delivers up to a second of batches,
            # with their ids.
            if d.dirty and now - d.saved_at >= SAVE_EVERY:
                self._save(d)
        for d in dirs:
            self._isolated(self._prune, d)
        self.over_budget = self._over_budget(dirs)
        self.passes += 1

    def _over_budget(self, dirs: list[WriterDir]) -> frozenset[str]:
        """Once half of the spool is used, the tenants whose destinations are failing, or take
        their events slower than they come (a slow SIEM, ``max_events_per_second``: the oldest
        waits longer than ``max_lag``), and whose undelivered events reach back past a whole
        segment: their new events are refused (each tenant's ``on_spool_failure`` applies), so
        that one tenant's SIEM cannot fill the spool that every other tenant's events need."""
        w = self._writer
        if w is None or not w.under_pressure:
            return frozenset()
        out = set()
        now = time.time_ns()
        with self._lock:
            for d in dirs:
                for lane in d.lanes.values():
                    # Where its oldest undelivered event is (not its cursor: a lane that never
                    # delivered has it at the start), more than a whole segment before the
                    # scan's. One failed batch right after a roll is not.
                    oldest = lane.pending[0][0] if lane.pending else lane.overflow_from
                    if oldest is None or oldest[0] + 1 >= d.scan[0]:
                        continue
                    late = bool(lane.pending) and (
                        now - lane.pending[0][1].time_ns > self._max_lag_ns
                    )
                    if lane.attempts > 0 or late:
                        out.add(lane.tenant)
        return frozenset(out)

    def _isolated(self, work: Callable[[WriterDir], None], d: WriterDir) -> None:
        # One directory that cannot be read (a disk error in one segment, a file of a foreign
        # tool) must not stop the delivery of every other directory's events.
        try:
            work(d)
        except Exception:
            log.exception("audit shipper could not read %s; retrying", d.path)

    def _adopt(self) -> None:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return
        own = self._writer.dir if self._writer is not None else None
        for name in names:
            path = os.path.join(self.root, name)
            if not name.startswith("w-") or path in self._dirs:
                continue
            if path == own:
                fd = None
            else:
                fd = _spool.try_lock(path)
                if fd is None:
                    continue  # a live process owns it
            if fd is not None:
                _spool.remove_leftovers(path)  # its owner died: nobody writes them any more
            saved = _spool.load_state(path)
            segs = _spool.segments(path)
            d = WriterDir(path, fd, saved, scan=(segs[0], 0) if segs else (0, 0))
            with self._lock:
                self._dirs[path] = d

    def _audits(self, tenants: set[str]) -> dict[str, Any]:
        """Each tenant's audit set-up, looked up outside the shipper's lock (a registry query
        must not hold up ``health()`` or finished sends); a tenant whose set-up cannot be told
        is left out."""
        out: dict[str, Any] = {}
        for tenant in tenants:
            try:
                out[tenant] = self._audit_of(tenant)
            except Exception as exc:
                log.warning(  # the class only: a source's message may hold a connection URL
                    "audit destinations of tenant %r unknown, its events wait: %s",
                    tenant,
                    type(exc).__name__,
                )
        return out

    def _lanes_for(self, d: WriterDir, tenant: str, audit: Any) -> list[Lane]:
        if audit is None or not audit.destinations:
            return []
        out = []
        for spec in audit.destinations:
            name = destination_name(spec)
            lane = d.lanes.get((tenant, name))
            if lane is None:
                saved = d.saved.get("lanes", {}).get(_spool.lane_key(tenant, name), {})
                cur = saved.get("cursor") or [0, 0]
                lane = Lane(tenant, name, (int(cur[0]), int(cur[1])))
                for k in ("delivered", "failures"):
                    setattr(lane, k, int(saved.get(k) or 0))
                lane.delivered_at = saved.get("delivered_at")
                lane.last_error = saved.get("last_error")
                lane.last_error_at = saved.get("last_error_at")
                d.lanes[(tenant, name)] = lane
            out.append(lane)
        return out

    def _scan(self, d: WriterDir) -> None:
        """Read new frames into the lanes."""
        try:
            segs = _spool.segments(d.path)
        except FileNotFoundError:
            return
        if not segs:
            return
        seg, off = d.scan
        if seg < segs[0]:
            seg, off = segs[0], 0
        while True:
            path = os.path.join(d.path, _spool.segment_name(seg))
            end = off
            try:
                frames = list(_spool.read_frames(path, off, self._written_to(d, seg)))
            except FileNotFoundError:
                frames = []
            audits = self._audits({t for _, _, t, _ in frames})
            held = False
            with self._lock:
                tenants = d.seg_tenants.setdefault(seg, set())
                last = d.seg_last.setdefault(seg, {})
                for _, nxt, tenant, body in frames:
                    if tenant not in audits:
                        # Where its events go is unknown (the registry is down): the scan stops
                        # here and comes back, rather than skip them or count them undeliverable
                        # (their cursors would move past them, and prune delete them).
                        held = True
                        break
                    end = nxt
                    tenants.add(tenant)
                    last[tenant] = nxt
                    lanes = self._lanes_for(d, tenant, audits[tenant])
                    if not lanes:
                        self.undeliverable += 1
                        continue
                    rec: Record | None = None
                    for lane in lanes:
                        if (seg, nxt) <= lane.cursor:
                            continue  # delivered before a restart
                        if lane.overflow_from is not None or len(lane.pending) >= self._cap(lane):
                            if lane.overflow_from is None:
                                lane.overflow_from = (seg, nxt)
                            continue
                        if rec is None:
                            rec = record_of(tenant, body)
                            if rec is None:
                                break  # not an event (logged): skipped by every lane
                        lane.pending.append(((seg, nxt), rec))
                d.scan = (seg, end)
                # Lanes with nothing pending have seen every frame up to here.
                for lane in d.lanes.values():
                    idle = not lane.pending and lane.overflow_from is None and not lane.in_flight
                    if idle and lane.cursor < d.scan:
                        lane.cursor = d.scan
                        d.dirty = True
            later = [s for s in segs if s > seg]
            d.held = held
            if held:
                return
            if not later:
                return
            d.seg_end[seg] = end
            seg, off = later[0], 0  # listed before the read: the old segment was complete

    def _written_to(self, d: WriterDir, seg: int) -> int | None:
        """Where our own writer's frames end in ``seg``, if it is the one written to (its
        zero-filled tail is not read); None for any other."""
        if d.lock_fd is not None or self._writer is None:
            return None
        pos = self._writer.position  # after the listing: a segment listed later is complete
        return pos.offset if pos.segment == seg else None

    def _catch_up(self, d: WriterDir, lane: Lane) -> None:
        """Refill an overflowed lane from the files, up to the shared scan position."""
        assert lane.overflow_from is not None
        seg, _ = lane.overflow_from
        start = lane.cursor if lane.cursor[0] == seg else (seg, 0)
        added = 0
        for s in [x for x in _spool.segments(d.path) if x >= seg]:
            off = start[1] if s == start[0] else 0
            for _, nxt, tenant, body in _spool.read_frames(
                os.path.join(d.path, _spool.segment_name(s)), off
            ):
                if (s, nxt) > d.scan:
                    lane.overflow_from = None
                    return
                if tenant != lane.tenant or (s, nxt) <= lane.cursor:
                    continue
                if added >= self._cap(lane):
                    lane.overflow_from = (s, nxt)
                    return
                rec = record_of(tenant, body)
                if rec is not None:
                    lane.pending.append(((s, nxt), rec))
                    added += 1
        lane.overflow_from = None

    # -- sending -------------------------------------------------------------------------------

    def _take_tokens(self, tenant: str, want: int) -> int:
        try:
            audit = self._audit_of(tenant)
        except Exception:
            return 0  # unknown set-up: the lane waits
        rate = getattr(audit, "max_events_per_second", None)
        if not rate:
            return want
        now = time.monotonic()
        tokens, at = self._tokens.get(tenant, (float(max(rate, 1.0)), now))
        tokens = min(float(max(rate, 1.0)), tokens + (now - at) * rate)
        n = min(want, int(tokens))
        self._tokens[tenant] = (tokens - n, now)
        return n

    def _schedule(self) -> None:
        """Start a batch on every lane that is due, within the workers' share for failing lanes.

        Lanes whose last attempt failed may hold only half of the workers: as many hanging
        destinations as there are workers would otherwise take every worker, round after round
        of retries, and healthy tenants' events would wait a sink timeout each for a free one.
        Failing lanes take their share by who has been due longest, so that one recovering is
        not kept waiting by others that keep failing.

        Destination look-ups and sink set-ups (secret references resolved, maybe over the
        network) run outside the lock, which ``health()`` and finished sends take.
        """
        assert self._pool is not None or self._thread is None
        now = time.monotonic()
        share = max(1, self._workers // 2)
        with self._lock:
            idle = [
                (d, lane)
                for d in list(self._dirs.values())
                for lane in list(d.lanes.values())
                if not lane.in_flight
            ]
        specs = [(d, lane, self._spec(lane)) for d, lane in idle]
        sinks: dict[tuple[str, str], Sink | None] = {}
        for _, lane, spec in specs:
            wanted = lane.pending or lane.overflow_from is not None
            if spec is not None and spec is not _REMOVED and wanted and now >= lane.next_try:
                sinks[(lane.tenant, lane.name)] = self._sink(lane, spec)
        sends: list[tuple[WriterDir, Lane, Sink, list[tuple[Pos, Record]]]] = []
        with self._lock:
            failing_busy = sum(
                lane.attempts > 0
                for d in self._dirs.values()
                for lane in d.lanes.values()
                if lane.in_flight
            )
            due: list[tuple[WriterDir, Lane, Sink]] = []
            for d, lane, spec in specs:
                if lane.in_flight or d.lanes.get((lane.tenant, lane.name)) is not lane:
                    continue  # changed meanwhile: the next pass sees it
                if spec is _REMOVED:
                    self._drop(d, lane)
                    continue
                sink = sinks.get((lane.tenant, lane.name))
                if sink is not None:
                    due.append((d, lane, sink))
            due.sort(key=lambda dls: (dls[1].attempts > 0, dls[1].next_try))
            for d, lane, sink in due:
                if lane.attempts > 0 and failing_busy >= share:
                    break  # sorted: only failing lanes are left
                if not lane.pending and lane.overflow_from is not None:
                    self._catch_up(d, lane)
                if not lane.pending:
                    continue
                n = self._take_tokens(
                    lane.tenant, min(self._batch_max, sink.max_batch, len(lane.pending))
                )
                if n <= 0:
                    lane.next_try = now + 0.05
                    continue
                lane.in_flight = True
                failing_busy += lane.attempts > 0
                sends.append((d, lane, sink, [lane.pending[i] for i in range(n)]))
        for d, lane, sink, batch in sends:
            if self._pool is None:
                self._send(d, lane, sink, batch)  # no thread (a test's step()): here, unlocked
            else:
                self._pool.submit(self._send, d, lane, sink, batch)

    def _spec(self, lane: Lane) -> Any:
        """The lane's destination spec; None while the set-up is unknown (the registry is
        down: the lane waits), ``_REMOVED`` once the tenant no longer has it."""
        try:
            audit = self._audit_of(lane.tenant)
        except Exception:
            return None
        for s in getattr(audit, "destinations", ()):
            if destination_name(s) == lane.name:
                return s
        return _REMOVED

    def _drop(self, d: WriterDir, lane: Lane) -> None:
        """Forget a lane whose destination the operator removed (under _lock).

        Its events are no longer owed to it; kept, the lane would hold them in memory and count
        as backlog (and lag) for ever. Re-added, the destination starts from where the scan is
        (``replay`` fills the gap, as for any new destination).
        """
        del d.lanes[(lane.tenant, lane.name)]
        d.saved.get("lanes", {}).pop(_spool.lane_key(lane.tenant, lane.name), None)
        d.dirty = True
        have = self._sinks.pop((lane.tenant, lane.name), None)
        if have is not None:
            with contextlib.suppress(Exception):
                have[1].close()

    def _sink(self, lane: Lane, spec: Mapping[str, Any]) -> Sink | None:
        """The lane's sink, built anew when its spec changed (only the shipper's thread, not
        under _lock: building may wait on a secret store)."""
        text = json.dumps(spec, sort_keys=True)
        have = self._sinks.get((lane.tenant, lane.name))
        if have is not None and have[0] == text:
            return have[1]
        try:
            sink = self._sink_factory(dict(spec), self._env)
        except Exception as exc:
            with self._lock:
                self._failed(lane, f"{type(exc).__name__}: {exc}", None, retryable=False)
            return None
        if have is not None:
            with contextlib.suppress(Exception):
                have[1].close()
        self._sinks[(lane.tenant, lane.name)] = (text, sink)
        return sink

    def _send(self, d: WriterDir, lane: Lane, sink: Sink, batch: list[tuple[Pos, Record]]) -> None:
        try:
            sink.send([r for _, r in batch])
        except DeliveryError as exc:
            with self._lock:
                self._failed(lane, str(exc), exc.retry_after, retryable=exc.retryable)
                lane.in_flight = False
            self._wake.set()
            return
        except Exception as exc:
            with self._lock:
                self._failed(lane, f"{type(exc).__name__}: {exc}", None, retryable=True)
                lane.in_flight = False
            self._wake.set()
            return
        with self._lock:
            for _ in batch:
                lane.pending.popleft()
            lane.cursor = max(lane.cursor, batch[-1][0])
            lane.delivered += len(batch)
            lane.delivered_at = time.time()
            lane.attempts = 0
            lane.next_try = 0.0
            lane.in_flight = False
            d.dirty = True
        self._wake.set()

    def _cap(self, lane: Lane) -> int:
        """Events a lane holds in memory: a failing one needs only its next batch.

        A SIEM down for every tenant at once (many share one vendor) would otherwise pin
        ``lane_cap`` events per tenant in memory for as long as it stays down.
        """
        return min(self._batch_max, self._lane_cap) if lane.attempts else self._lane_cap

    def _failed(
        self, lane: Lane, error: str, retry_after: float | None, *, retryable: bool
    ) -> None:
        # Under _lock. The events past the next batch go back to the files: the lane catches
        # up from where the first of them is, once it delivers again.
        cap = min(self._batch_max, self._lane_cap)
        if len(lane.pending) > cap:
            lane.overflow_from = lane.pending[cap][0]
            while len(lane.pending) > cap:
                lane.pending.pop()
        lane.failures += 1
        lane.attempts += 1
        lane.last_error = _one_line(error[:500])
        lane.last_error_at = time.time()
        if retryable:
            delay = random.uniform(  # noqa: S311 - jitter, not a secret
                0, min(self._max_backoff, 0.2 * 2 ** min(lane.attempts, 20))
            )
        else:
            delay = self._max_backoff
        if retry_after is not None:
            delay = max(delay, min(retry_after, self._max_backoff))
        lane.next_try = time.monotonic() + delay
        log.warning(
            "audit delivery to %s of tenant %r failed (attempt %d), retrying in %.1fs: %s",
            lane.name,
            lane.tenant,
            lane.attempts,
            delay,
            lane.last_error,
        )

    # -- state ---------------------------------------------------------------------------------

    def _save(self, d: WriterDir) -> None:
        with self._lock:  # a snapshot; the fsync runs outside the lock the senders take
            lanes = dict(d.saved.get("lanes", {}))
            for (tenant, name), lane in d.lanes.items():
                lanes[_spool.lane_key(tenant, name)] = lane.state()
            d.saved = {"lanes": lanes, "scan": list(d.scan), "undeliverable": self.undeliverable}
            d.dirty = False
            saved = d.saved
        d.saved_at = time.monotonic()
        try:
            _spool.save_state(d.path, saved)
        except OSError as exc:
            d.dirty = True
            log.warning("audit shipper could not save its cursors in %s: %s", d.path, exc)

    def _prune(self, d: WriterDir) -> None:
        """Delete segments every lane has delivered, once older than the retention."""
        current = self._writer.position.segment if self._writer and d.lock_fd is None else None
        # Under pressure the retention gives way: delivered events kept for replay must not
        # make the spool refuse new ones (a deny tenant's accesses).
        w = self._writer if d.lock_fd is None else None
        retention = 0.0 if w is not None and w.under_pressure else self._retention
        try:
            segs = _spool.segments(d.path)
        except FileNotFoundError:
            return
        now = time.time()
        for s in segs:
            path = os.path.join(d.path, _spool.segment_name(s))
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            # Complete: the scan moved past it, or it is the last of a dead writer, read to its
            # last whole frame. That may be short of the file's size: a power loss tears the
            # frame it cut, and no writer will ever complete it.
            dead_last = (
                d.lock_fd is not None and not d.held and s == d.scan[0] == segs[-1] and s != current
            )
            complete = s < d.scan[0] or dead_last
            if not complete or now - st.st_mtime < retention:
                break
            if dead_last:
                end = (s, d.scan[1])
            elif s in d.seg_end:
                end = (s, d.seg_end[s])
            else:
                break  # not read by this shipper: where its frames end is unknown
            with self._lock:
                if s not in d.seg_tenants:
                    break  # not read by this shipper: its lanes are unknown
                seg_tenants = set(d.seg_tenants[s])
            audits = self._audits(seg_tenants)
            if len(audits) < len(seg_tenants):
                break  # a tenant's destinations are unknown: its lanes might still need it
            with self._lock:
                done = all(
                    lane.cursor >= end
                    for t in seg_tenants
                    for lane in self._lanes_for(d, t, audits[t])
                )
            if not done:
                break
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            held_bytes = d.seg_bytes.pop(s, st.st_size)
            if self._writer is not None and d.lock_fd is None:
                self._writer.forget_bytes(held_bytes)
            with self._lock:
                d.seg_tenants.pop(s, None)
                d.seg_end.pop(s, None)
                d.seg_last.pop(s, None)
        if self._writer is not None and self._writer.under_pressure:
            self._compact(d)
        if d.lock_fd is not None and not _spool.segments(d.path):
            # An adopted directory, fully delivered and past retention: remove it.
            with self._lock:
                self._dirs.pop(d.path, None)
            for name in os.listdir(d.path):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(d.path, name))
            with contextlib.suppress(OSError):
                os.rmdir(d.path)
            os.close(d.lock_fd)
            d.lock_fd = None

    def _mark_compacted(self, d: WriterDir) -> None:
        """Leave ``compacted`` in the directory, for :func:`pruned_writers`: a tenant's events
        there may now start past its first, though segment 1 is still there."""
        marker = os.path.join(d.path, "compacted")
        if not os.path.exists(marker):
            with open(marker, "wb"):
                pass
            _spool.fsync_dir(d.path)

    def _cursors(self, d: WriterDir, tenant: str, audit: Any) -> list[Pos]:
        return [lane.cursor for lane in self._lanes_for(d, tenant, audit)]

    def _compact(self, d: WriterDir) -> None:
        """Free the disk that delivered events hold only because they share segments with a
        tenant's undelivered ones (segments are deleted oldest first, whole: one tenant whose
        SIEM is down would otherwise keep every segment written since its oldest event).

        Each complete segment, oldest first, has the frames of a tenant replaced by padding
        (:func:`_spool.compact`) once every lane of the tenant delivered all of them, and no
        older segment still holds a frame of the tenant (lanes deliver in order, so this holds
        anyway; checked so that it holds whatever a lane does): what stays of each tenant is
        then the end of its sequence, as after deleting segments, so readers and ``audit
        verify`` read the spool as before. Cursors keep their meaning: the offsets do not
        change. A segment left with nothing owed to anyone is deleted instead, out of turn
        (readers list the segments there are; none expects them without gaps).
        """
        try:
            segs = [s for s in _spool.segments(d.path) if s < d.scan[0]]
        except FileNotFoundError:
            return
        older: set[str] = set()  # tenants with a frame in an older segment still there
        for s in segs:
            with self._lock:
                if s not in d.seg_tenants or s not in d.seg_last:
                    return  # not read by this shipper
                tenants = set(d.seg_tenants[s])
                last = dict(d.seg_last[s])
            audits = self._audits(tenants)
            if len(audits) < len(tenants):
                return  # a tenant's destinations are unknown: its lanes might need anything
            with self._lock:
                drop = {
                    t
                    for t in tenants - older
                    if t in last and all(c >= (s, last[t]) for c in self._cursors(d, t, audits[t]))
                }
            if not drop and tenants:
                older |= tenants
                continue
            path = os.path.join(d.path, _spool.segment_name(s))
            w = self._writer if d.lock_fd is None else None  # our own writer counts it
            try:
                # What the writer counts for it: the end of its frames (its size once the
                # writer rolled), or what an earlier compaction left.
                counted = d.seg_bytes.get(s, d.seg_end.get(s) or os.path.getsize(path))
                self._mark_compacted(d)
                if drop == tenants:
                    # Nothing in it is owed to anyone: deleted, out of turn. Compacted, it
                    # would keep a block per MAX_FRAME of padding (its headers) behind the
                    # segment that pins it, and enough of those fill the spool.
                    os.unlink(path)
                    if w is not None:
                        w.forget_bytes(counted)
                    with self._lock:
                        d.seg_tenants.pop(s, None)
                        d.seg_end.pop(s, None)
                        d.seg_last.pop(s, None)
                        d.seg_bytes.pop(s, None)
                    continue
                kept = _spool.compact(path, drop)
            except FileNotFoundError:
                return
            except OSError as exc:
                # The disk full, say: the segment stays as it was (compact() leaves nothing
                # half done), and the ones after it can still be deleted, which needs no space.
                log.warning("audit spool segment %s not compacted: %s", path, exc)
                older |= tenants
                continue
            if kept is not None and kept < counted:
                # Blocks can be more than the bytes counted (a small segment keeping a frame
                # takes a whole block): it is then counted as before, so that what is
                # forgotten now and when the segment goes adds up to what was counted.
                d.seg_bytes[s] = kept
                if w is not None:
                    w.forget_bytes(counted - kept)
            with self._lock:
                d.seg_tenants[s] -= drop
                for t in drop:
                    d.seg_last[s].pop(t, None)
            older |= tenants - drop

    # -- what the operator sees ----------------------------------------------------------------

    def backlog(self) -> int:
        with self._lock:
            return sum(
                len(lane.pending) + (1 if lane.overflow_from else 0) + (1 if lane.in_flight else 0)
                for d in self._dirs.values()
                for lane in d.lanes.values()
            )

    def _scanned_to_end(self) -> bool:
        with self._lock:
            dirs = list(self._dirs.values())
        for d in dirs:
            segs = _spool.segments(d.path) if os.path.isdir(d.path) else []
            if not segs:
                continue
            last = segs[-1]
            if d.lock_fd is not None and not d.held and d.scan[0] >= last:
                continue  # a dead writer's last segment, read to its last whole frame
            if d.lock_fd is None and self._writer is not None:
                if d.scan < self._writer.position.key():
                    return False
                continue
            try:
                size = os.path.getsize(os.path.join(d.path, _spool.segment_name(last)))
            except FileNotFoundError:
                continue  # pruned since the listing: it was delivered
            if d.scan < (last, size):
                return False
        return True

    def tenants(self) -> dict[str, dict[str, Any]]:
        """Per tenant and destination: backlog, oldest pending age, deliveries, failures."""
        out: dict[str, dict[str, Any]] = {}
        now = time.time_ns()
        with self._lock:
            for d in self._dirs.values():
                for lane in d.lanes.values():
                    t = out.setdefault(lane.tenant, {})
                    s = t.setdefault(
                        lane.name,
                        {
                            "backlog": 0,
                            "lag_seconds": 0.0,
                            "delivered": 0,
                            "delivered_at": None,
                            "failures": 0,
                            "last_error": None,
                        },
                    )
                    s["backlog"] += len(lane.pending) + (1 if lane.overflow_from else 0)
                    if lane.pending:
                        lag = (now - lane.pending[0][1].time_ns) / 1e9
                        s["lag_seconds"] = max(s["lag_seconds"], lag)
                    s["delivered"] += lane.delivered
                    if lane.delivered_at and (s["delivered_at"] or 0) < lane.delivered_at:
                        s["delivered_at"] = lane.delivered_at
                    s["failures"] += lane.failures
                    if lane.last_error and lane.pending:
                        s["last_error"] = lane.last_error
        return out
