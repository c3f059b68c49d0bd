"""What a power loss leaves in a spool segment, for the delivery tests."""

from __future__ import annotations

from sqlalchemy_cmk import _spool


def tear(path: str, data: bytes) -> None:
    """Write ``data`` (a frame's first bytes) right after the segment's last whole frame, as a
    power loss in the middle of a write leaves it: over the zero-filled tail, not after it."""
    end = 0
    for _, nxt, _, _ in _spool.read_frames(path):
        end = nxt
    with open(path, "r+b") as f:
        f.seek(end)
        f.write(data)
