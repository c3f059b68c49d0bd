"""Group commit: appends from several threads share fdatasyncs, and each append returns only
after a sync that started after its frame was written."""

from __future__ import annotations

import os
import threading
import time
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
