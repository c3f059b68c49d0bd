"""A destination kind for the delivery tests: batches land in an in-process receiver.

It stands in for a tenant's SIEM where the test is about the spool and the shipper (ordering,
outages, slow destinations, kills); each sink kind has its own tests against a real receiver.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy_cmk.errors import ConfigurationError, DeliveryError
from sqlalchemy_cmk.sinks import Record, SinkEnv


@dataclass
class Receiver:
    """What a tenant's SIEM received, with switchable faults."""

    records: list[Record] = field(default_factory=list)
    batches: int = 0
    down: bool = False
    delay: float = 0.0
    fail_after_accept: bool = False  # takes the batch, then the connection drops
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ids(self) -> list[str]:
        with self.lock:
            return [r.id for r in self.records]

    def unique(self) -> list[Record]:
        seen: set[str] = set()
        out = []
        with self.lock:
            for r in self.records:
                if r.id not in seen:
                    seen.add(r.id)
                    out.append(r)
        return out


RECEIVERS: dict[str, Receiver] = {}


class MemorySink:
    kind = "memory"
    max_batch = 100

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def send(self, records: Sequence[Record]) -> None:
        r = self.receiver
        if r.delay:
            time.sleep(r.delay)
        if r.down:
            raise DeliveryError("receiver down", retryable=True)
        with r.lock:
            r.records.extend(records)
            r.batches += 1
        if r.fail_after_accept:
            raise DeliveryError("connection reset after the receiver took the batch")

    def close(self) -> None:
        pass


def check(spec: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(spec.get("receiver"), str):
        raise ConfigurationError("memory destination needs 'receiver'")
    return dict(spec)


def build(spec: Mapping[str, Any], env: SinkEnv) -> MemorySink:
    # A slow set-up (a secret resolver that waits on its vault, a DNS lookup): test-only.
    time.sleep(float(spec.get("build_delay", 0)))
    return MemorySink(RECEIVERS.setdefault(spec["receiver"], Receiver()))
