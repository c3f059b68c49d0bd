"""Test doubles for applications that use sqlalchemy-cmk (and for its own tests).

:class:`FakeKeyProvider` really encrypts (AES-256-GCM under per-key random master keys held in
memory), counts its calls, and injects latency, transient failures and denials, so an
application's tests can check what its users would: that a revoked tenant cannot read, that a KMS
outage writes nothing, how many KMS round-trips a page load costs.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..audit import AuditEvent
from ..errors import CMKError, DecryptionError, KeyAccessDeniedError, KMSUnavailableError

__all__ = ["FakeKeyProvider", "KMSCall", "MemoryAuditSink"]


@dataclass(frozen=True)
class KMSCall:
    """One call that reached the fake KMS (failed or not)."""

    operation: str  # "wrap" or "unwrap"
    key_ref: str
    tenant: str | None


class FakeKeyProvider:
    """An in-memory KMS with fault injection.

    Args:
        scheme: The URI scheme to serve (``fake://anything``); any key name is accepted and gets
            its own random master key on first use.
        latency: Seconds each call sleeps, to model a KMS round-trip.
    """

    def __init__(self, scheme: str = "fake", *, latency: float = 0.0) -> None:
        self.scheme = scheme
        self.latency = latency
        self.calls: list[KMSCall] = []
        self._keys: dict[str, AESGCM] = {}
        self._denied: set[str] = set()
        self._failures: list[CMKError] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FakeKeyProvider(scheme={self.scheme!r})"

    @property
    def wrap_count(self) -> int:
        return sum(1 for c in self.calls if c.operation == "wrap")

    @property
    def unwrap_count(self) -> int:
        return sum(1 for c in self.calls if c.operation == "unwrap")

    def reset_counts(self) -> None:
        with self._lock:
            self.calls.clear()

    def deny(self, key_ref: str) -> None:
        """Refuse ``key_ref`` from now on, as a KMS does when the tenant revokes the key."""
        with self._lock:
            self._denied.add(key_ref)

    def allow(self, key_ref: str) -> None:
        """Accept ``key_ref`` again (the tenant re-granted access)."""
        with self._lock:
            self._denied.discard(key_ref)

    def fail_next(self, count: int = 1, error: CMKError | None = None) -> None:
        """Make the next ``count`` calls fail with ``error`` (default: a transient outage)."""
        with self._lock:
            self._failures.extend(
                [error or KMSUnavailableError("injected KMS outage", provider=self.scheme)] * count
            )

    def _enter(self, operation: str, key_ref: str, context: Mapping[str, str]) -> AESGCM:
        if self.latency:
            time.sleep(self.latency)
        with self._lock:
            self.calls.append(KMSCall(operation, key_ref, context.get("tenant")))
            if self._failures:
                raise self._failures.pop(0)
            if key_ref in self._denied:
                raise KeyAccessDeniedError(
                    f"key {key_ref!r} is revoked", key_ref=key_ref, provider=self.scheme
                )
            aead = self._keys.get(key_ref)
            if aead is None:
                aead = self._keys[key_ref] = AESGCM(AESGCM.generate_key(256))
            return aead

    @staticmethod
    def _aad(key_ref: str, context: Mapping[str, str]) -> bytes:
        return json.dumps([key_ref, context.get("tenant", "")]).encode()

    def wrap_key(self, key_ref: str, data_key: bytes, context: Mapping[str, str]) -> bytes:
        aead = self._enter("wrap", key_ref, context)
        nonce = os.urandom(12)
        return nonce + aead.encrypt(nonce, data_key, self._aad(key_ref, context))

    def unwrap_key(self, key_ref: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        aead = self._enter("unwrap", key_ref, context)
        try:
            return aead.decrypt(wrapped[:12], wrapped[12:], self._aad(key_ref, context))
        except (InvalidTag, ValueError):
            raise DecryptionError(
                "wrapped key failed authentication", key_ref=key_ref, provider=self.scheme
            ) from None


class MemoryAuditSink:
    """Keeps audit events in a list, for assertions."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self._lock = threading.Lock()

    def __call__(self, event: AuditEvent) -> None:
        with self._lock:
            self.events.append(event)

    def of(self, operation: str) -> list[AuditEvent]:
        return [e for e in self.events if e.operation == operation]
