"""Progress of a migration command on stderr: a redrawn bar on a terminal, a plain line every
few seconds otherwise (logs, CI)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

PROGRESS_EVERY = 5.0  # seconds between plain progress lines when stderr is not a terminal
_REDRAW_EVERY = 0.1  # seconds between redraws of the progress bar on a terminal


def _progress_view(args: argparse.Namespace, label: str) -> _ProgressView:
    return _ProgressView(
        label,
        sys.stderr,
        enabled=not args.no_progress,
        every=max(0.0, args.progress_every),
    )


class _ProgressView:
    """Rows done / total, rate and ETA on ``stream``: one line redrawn with ``\\r`` on a
    terminal, a plain line every ``every`` seconds otherwise (logs, CI), and a last line at the
    end."""

    def __init__(self, label: str, stream: TextIO, *, enabled: bool, every: float) -> None:
        self.label = label
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and stream.isatty()
        self.every = _REDRAW_EVERY if self.tty else every
        self.started = time.monotonic()
        self.last_shown = self.started
        self.done = 0
        self.total: int | None = None
        self.updated = False  # an update arrived since the last line was shown
        self.width = 0

    def update(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        # The total is counted when the call starts; rows the application inserts meanwhile
        # are done too. Never show more done than the total: raise the total instead.
        if total is not None:
            total = max(total, done)
        self.done, self.total, self.updated = done, total, True
        now = time.monotonic()
        if now - self.last_shown >= self.every:
            self._show(now)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.updated:
            self._show(time.monotonic())
        if self.tty and self.width:
            self._write("\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # stderr's reader went away: the work goes on, unseen
            self.enabled = False

    def _show(self, now: float) -> None:
        self.last_shown, self.updated = now, False
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        total = self.total
        if total is not None and total > 0:
            share = min(self.done / total, 1.0)
            left = max(total - self.done, 0)
            eta: str | None = _clock(left / rate) if rate > 0 else "?"
            counts = f"{self.done:,}/{total:,} rows ({share:.1%})"
        else:  # no total (a sample): no share, no ETA to promise
            share, eta, counts = 0.0, None, f"{self.done:,} rows"
        if self.tty:
            bar = ""
            if eta is not None:
                filled = round(share * 24)
                bar = f" [{'#' * filled}{'.' * (24 - filled)}]"
            line = f"{self.label}{bar} {counts} {rate:,.0f} rows/s" + (
                f" ETA {eta}" if eta is not None else ""
            )
            self._write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            self._write(
                f"{self.label}: {counts}, {rate:,.0f} rows/s, "
                + (f"ETA {eta}, " if eta is not None else "")
                + f"elapsed {_clock(elapsed)}\n"
            )


def _clock(seconds: float) -> str:
    whole = int(seconds + 0.5)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"
