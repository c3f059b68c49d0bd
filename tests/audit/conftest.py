"""Fixtures of the audit delivery tests."""

from __future__ import annotations

import pytest

from sqlalchemy_cmk import sinks
from tests.audit import memory_kind as _memory
from tests.audit.memory_kind import Receiver


@pytest.fixture
def memory_kind(monkeypatch: pytest.MonkeyPatch) -> dict[str, Receiver]:
    """Registers the ``memory`` kind; yields the receivers by name (fresh per test)."""
    monkeypatch.setitem(sinks._KINDS, "memory", (_memory.__name__, None))
    _memory.RECEIVERS.clear()
    return _memory.RECEIVERS
