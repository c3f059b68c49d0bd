"""Test doubles for applications that use sqlalchemy-cmk (and for its own tests).

:class:`FakeKeyProvider` really encrypts (AES-256-GCM under per-key random master keys held in
memory), counts its calls, and injects latency, transient failures, denials and the faults of a
broken KMS (hangs, garbage, wrong lengths, ``None``) at a chosen call index, so an application's
tests can check what its users would: that a revoked tenant cannot read, that a KMS outage writes
nothing, how many KMS round-trips a page load costs.

Searching every call index for a fault, the way ``tests/db/test_faults.py`` does::

    kms = FakeKeyProvider()
    run_the_operation()                     # once, healthy, to count its calls
    n = len(kms.calls)
    for k in range(n):
        reset_the_data()
        kms.inject("garbage", at=k, count=None)   # call k and every later call is broken
        with pytest.raises(CMKError):
            run_the_operation()
        kms.heal()
        run_the_operation()                 # works again once the KMS does

Local KMS servers, for tests that run the real cloud SDK and the real provider against a KMS
that refuses what the service refuses (a disabled key, a removed grant), so an application's
suite can prove its revocation handling. Each is a module of its own, imported on demand, with
the SDK in an extra named by its ImportError, and a command that serves on loopback until
SIGINT/SIGTERM and prints where on its first line:

* :mod:`sqlalchemy_cmk.testing.aws_kms` (``LocalKms``: moto's KMS, made to refuse disabled
  keys, keys pending deletion and denying key policies); prints ``http://127.0.0.1:<port>``;
  extra ``aws-testing``.
* :mod:`sqlalchemy_cmk.testing.gcp_kms` (``KmsServer``: Cloud KMS over gRPC, refusing disabled
  or destroyed key versions and removed IAM bindings); prints the gRPC target
  ``127.0.0.1:<port>`` (plaintext); extra ``gcp-testing``.
* :mod:`sqlalchemy_cmk.testing.azure_keyvault` (``KeyVaultServer``: Key Vault's keys API over
  HTTPS, refusing disabled key versions, forbidden operations and removed role assignments);
  prints ``https://127.0.0.1:<port>``, then the CA file to trust; extra ``azure-testing``.

For example ``python -m sqlalchemy_cmk.testing.gcp_kms --port 0``; ``--port`` picks the port
(0: any free one).
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..audit import AuditEvent
from ..errors import CMKError, DecryptionError, KeyAccessDeniedError, KMSUnavailableError

__all__ = ["FAULTS", "FakeKeyProvider", "KMSCall", "MemoryAuditSink"]

#: The faults :meth:`FakeKeyProvider.inject` knows, and what the faulty call does:
FAULTS = {
    "unavailable": "raises KMSUnavailableError (transient: the caller retries)",
    "denied": "raises KeyAccessDeniedError (the tenant revoked the key)",
    "error": "raises the given exception, by default a RuntimeError (an unmapped SDK error)",
    "hang": "blocks until heal() or `hang` seconds pass, then answers normally (too late)",
    "garbage": "returns random bytes: a blob that unwraps to nothing, or a wrong 32-byte key",
    "wrong_length": "returns the right answer minus its last byte",
    "none": "returns None",
    "str": "returns the right answer as a base64 str",
    "bytearray": "returns the right answer as a bytearray (bytes-like: must be accepted)",
}


@dataclass
class _Fault:
    kind: str
    operation: str | None
    at: int
    count: int | None
    error: BaseException | None
    hang: float
    seen: int = 0

    def hits(self, operation: str) -> bool:
        """Count this call if it matches; true if the fault applies to it."""
        if self.operation is not None and operation != self.operation:
            return False
        index, self.seen = self.seen, self.seen + 1
        return index >= self.at and (self.count is None or index < self.at + self.count)


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
        self._faults: list[_Fault] = []
        self._release = threading.Event()
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

    def inject(
        self,
        fault: str,
        *,
        at: int = 0,
        count: int | None = 1,
        operation: str | None = None,
        error: BaseException | None = None,
        hang: float = 30.0,
    ) -> None:
        """Break calls from the ``at``-th on, as a faulty KMS or provider would.

        Args:
            fault: One of :data:`FAULTS`: ``"unavailable"``, ``"denied"``, ``"error"``,
                ``"hang"``, ``"garbage"``, ``"wrong_length"``, ``"none"``, ``"str"``,
                ``"bytearray"``.
            at: Index of the first faulty call, counted from now among the calls that match
                ``operation`` (0: the next one).
            count: How many calls from there are faulty; ``None``: all of them, until
                :meth:`heal` (a KMS that stays broken, so retries cannot hide the fault).
            operation: ``"wrap"`` or ``"unwrap"`` to break only those; ``None``: both.
            error: The exception raised by ``"error"`` (default: a ``RuntimeError``).
            hang: Longest a ``"hang"`` blocks, in seconds, if :meth:`heal` is not called.

        Calls are recorded in :attr:`calls` whether or not they fail.
        """
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {sorted(FAULTS)}")
        if operation not in (None, "wrap", "unwrap"):
            raise ValueError('operation must be "wrap", "unwrap" or None')
        with self._lock:
            self._faults.append(_Fault(fault, operation, at, count, error, hang))

    def heal(self) -> None:
        """Remove every injected fault and release the calls that hang now."""
        with self._lock:
            self._faults.clear()
            self._failures.clear()
            self._release.set()
            self._release = threading.Event()

    def _fault_for(self, operation: str) -> _Fault | None:
        # Caller holds self._lock. Every fault counts the call; the first that applies wins.
        found = None
        for fault in self._faults:
            if fault.hits(operation) and found is None:
                found = fault
        return found

    def _enter_with_fault(
        self, operation: str, key_ref: str, context: Mapping[str, str]
    ) -> tuple[AESGCM, _Fault | None]:
        if self.latency:
            time.sleep(self.latency)
        with self._lock:
            self.calls.append(KMSCall(operation, key_ref, context.get("tenant")))
            fault = self._fault_for(operation)
            release = self._release
            if self._failures:
                raise self._failures.pop(0)
        if fault is not None:
            if fault.kind == "unavailable":
                raise KMSUnavailableError("injected KMS outage", provider=self.scheme)
            if fault.kind == "denied":
                raise KeyAccessDeniedError(
                    f"key {key_ref!r} is revoked (injected)", key_ref=key_ref, provider=self.scheme
                )
            if fault.kind == "error":
                raise fault.error or RuntimeError("injected provider bug")
            if fault.kind == "hang":
                release.wait(fault.hang)
                fault = None  # then answers, too late
        with self._lock:
            if key_ref in self._denied:
                raise KeyAccessDeniedError(
                    f"key {key_ref!r} is revoked", key_ref=key_ref, provider=self.scheme
                )
            aead = self._keys.get(key_ref)
            if aead is None:
                aead = self._keys[key_ref] = AESGCM(AESGCM.generate_key(256))
            return aead, fault

    @staticmethod
    def _aad(key_ref: str, context: Mapping[str, str]) -> bytes:
        return json.dumps([key_ref, context.get("tenant", "")]).encode()

    def wrap_key(self, key_ref: str, data_key: bytes, context: Mapping[str, str]) -> bytes:
        aead, fault = self._enter_with_fault("wrap", key_ref, context)
        nonce = os.urandom(12)
        wrapped = nonce + aead.encrypt(nonce, data_key, self._aad(key_ref, context))
        return _faulty(fault, wrapped)  # type: ignore[no-any-return]

    def unwrap_key(self, key_ref: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        aead, fault = self._enter_with_fault("unwrap", key_ref, context)
        try:
            data_key = aead.decrypt(wrapped[:12], wrapped[12:], self._aad(key_ref, context))
        except (InvalidTag, ValueError):
            data_key = None
        if data_key is None:  # raised outside the handler: nothing chained
            raise DecryptionError(
                "wrapped key failed authentication", key_ref=key_ref, provider=self.scheme
            )
        return _faulty(fault, data_key)  # type: ignore[no-any-return]


def _faulty(fault: _Fault | None, answer: bytes) -> Any:
    """The answer a faulty KMS gives instead of ``answer``."""
    if fault is None:
        return answer
    if fault.kind == "garbage":
        return os.urandom(len(answer))
    if fault.kind == "wrong_length":
        return answer[:-1]
    if fault.kind == "none":
        return None
    if fault.kind == "str":
        return base64.b64encode(answer).decode()
    if fault.kind == "bytearray":
        return bytearray(answer)
    raise AssertionError(f"unhandled fault {fault.kind!r}")


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
