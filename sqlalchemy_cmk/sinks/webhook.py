"""The ``webhook`` destination: each batch POSTed over HTTPS as JSON, signed for the tenant.

Spec (``docs/audit.md`` shows the tenant's side and the verification recipe)::

    {"kind": "webhook",
     "url": "https://siem.acme.example/cmk-audit",
     "signing": {"alg": "hmac-sha256", "key": "env:ACME_WEBHOOK_KEY", "key_id": "acme-1"},
     # or {"alg": "ed25519", "private_key": "file:/etc/myapp/acme-webhook.pem"}
     "timeout": 10, "max_batch": 100, "ca_file": null}

The request body holds the records' bodies verbatim, one per line, inside a JSON document::

    {"events":[
    <body 1>,
    <body 2>
    ]}

so a receiver either parses it as JSON, or takes the exact bytes of each event (to re-hash the
tenant's hash chain) as the lines between the first and the last, less one trailing comma.

Headers: ``CMK-Signature: t=<unix seconds>,kid=<key id>,v1=<hex HMAC-SHA256>`` (or
``v1-ed25519=<base64 signature>``), the signature over ``b"<t>." + body``; ``CMK-Tenant``
(the tenant id, UTF-8 percent-encoded: :func:`tenant_header`); ``CMK-Event-Count``. A
receiver checks the signature with the tenant's key, refuses a ``t`` more than five minutes
from its clock (replays) and de-duplicates by event id (re-deliveries).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import ConfigurationError, DeliveryError
from . import Record, SinkEnv
from ._fields import Fields
from ._http import HttpsClient, raise_for_status

__all__ = ["SIGNATURE_HEADER", "WebhookSink", "build", "check", "sign", "tenant_header"]

KIND = "webhook"
MAX_BATCH = 500
SIGNATURE_HEADER = "CMK-Signature"
_ALGS = {"hmac-sha256": "key", "ed25519": "private_key"}
# HMAC keys shorter than the hash's output weaken it; 32 random bytes is what the docs generate.
_MIN_HMAC_KEY = 32
# Printable ASCII but "%" (the escape) stays as it is in the CMK-Tenant header.
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def check(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and normalise a webhook spec (no I/O, no secret resolved).

    Raises:
        ConfigurationError: naming the field.
    """
    f = Fields(spec, KIND)
    f.url("url", required=True)
    signing = f.section(
        "signing",
        required=True,
        example='{"alg": "hmac-sha256", "key": "env:NAME"} or '
        '{"alg": "ed25519", "private_key": "file:/path.pem"}',
    )
    assert signing is not None  # required
    alg = signing.choice("alg", _ALGS)
    signing.secret_ref(_ALGS[alg], required=True)
    key_id = signing.string("key_id", pattern=r"[A-Za-z0-9_.-]{1,64}", max_len=64)
    other = "ed25519-" if alg == "hmac-sha256" else "hmac-"
    if key_id is not None and key_id.startswith(other):
        # The docs' recipe takes a key id of the other algorithm's default form for that
        # algorithm (an Ed25519 public key as bytes must never verify as an HMAC secret).
        raise ConfigurationError(
            f"{signing.what('key_id')} of an {alg} key must not begin with {other!r}"
        )
    f.timeout()
    f.ca_file()
    f.max_batch(MAX_BATCH)
    return f.done()


@dataclass(frozen=True)
class _Signer:
    """Signs ``b"<t>." + body`` with one key; knows the key's id."""

    alg: str
    key_id: str
    _sign: Callable[[bytes], str] = field(repr=False)

    def header(self, body: bytes, timestamp: int) -> str:
        sig = self._sign(f"{timestamp}.".encode() + body)
        name = "v1" if self.alg == "hmac-sha256" else "v1-ed25519"
        return f"t={timestamp},kid={self.key_id},{name}={sig}"


def _signer(signing: Mapping[str, Any], env: SinkEnv) -> _Signer:
    if signing["alg"] == "hmac-sha256":
        ref = signing["key"]
        key = env.secret(ref)
        if len(key) < _MIN_HMAC_KEY:
            raise ConfigurationError(
                f"webhook signing key {ref!r} is shorter than {_MIN_HMAC_KEY} bytes"
            )
        # A key id derived from the key (not a hash of it alone): names the key, reveals nothing.
        key_id = signing.get("key_id") or (
            "hmac-" + hmac.new(key, b"sqlalchemy-cmk webhook key id", "sha256").hexdigest()[:16]
        )
        return _Signer(
            "hmac-sha256", key_id, lambda m: hmac.new(key, m, hashlib.sha256).hexdigest()
        )
    ref = signing["private_key"]
    pem = env.secret(ref)
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise ConfigurationError(
            f"webhook signing private_key {ref!r} is not an unencrypted PEM private key"
        ) from None
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigurationError(f"webhook signing private_key {ref!r} is not an Ed25519 key")
    key_id = signing.get("key_id") or public_key_id(private.public_key().public_bytes_raw())
    return _Signer("ed25519", key_id, lambda m: base64.b64encode(private.sign(m)).decode("ascii"))


def public_key_id(raw_public_key: bytes) -> str:
    """The default key id of an Ed25519 key: ``ed25519-`` and 16 hex digits of the SHA-256 of
    its raw 32-byte public key (what a tenant computes from the public key it was given)."""
    return "ed25519-" + hashlib.sha256(raw_public_key).hexdigest()[:16]


def payload(records: Sequence[Record]) -> bytes:
    """The request body: the records' bodies verbatim, one per line, in a JSON document.

    Raises:
        DeliveryError: a body with a line break (not canonical JSON), not retryable.
    """
    for r in records:
        if b"\n" in r.body or b"\r" in r.body:
            raise DeliveryError(
                f"audit event {r.id} is not single-line JSON: cannot frame it", retryable=False
            )
    return b'{"events":[\n' + b",\n".join(r.body for r in records) + b"\n]}"


def tenant_header(tenant: str) -> str:
    """The ``CMK-Tenant`` header's value: the tenant id, UTF-8 percent-encoded.

    A tenant id is printable Unicode, a header value Latin-1 at most (and ASCII in practice):
    as is, "租户-1" could not be sent at all and "Zoë" arrived as a byte no receiver reads as
    the id. Printable ASCII other than ``%`` is kept, so ``acme`` stays ``acme``; a receiver
    takes the id back with ``urllib.parse.unquote``.
    """
    return urllib.parse.quote(tenant, safe=_HEADER_SAFE)


def sign(records: Sequence[Record], signer: _Signer, timestamp: int) -> tuple[bytes, str]:
    """The request body for ``records`` and its ``CMK-Signature`` header value."""
    body = payload(records)
    return body, signer.header(body, timestamp)


class WebhookSink:
    """POSTs signed batches to a tenant's HTTPS endpoint (see the module docstring).

    Args:
        client: The HTTPS client for the endpoint.
        signer: The tenant's signing key.
        max_batch: Records per request at most.
        clock: Seconds since the epoch, for the signature's timestamp (a seam for tests).
    """

    kind = KIND

    def __init__(
        self,
        client: HttpsClient,
        signer: _Signer,
        *,
        max_batch: int = MAX_BATCH,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_batch = max_batch
        self._client = client
        self._signer = signer
        self._clock = clock

    @property
    def key_id(self) -> str:
        """The id of the signing key, sent in every signature header."""
        return self._signer.key_id

    def send(self, records: Sequence[Record]) -> None:
        """POST ``records`` as one signed request.

        Raises:
            DeliveryError: the endpoint did not take them (see ``_http.raise_for_status``).
        """
        if not records:
            return
        body, signature = sign(records, self._signer, int(self._clock()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "sqlalchemy-cmk",
            SIGNATURE_HEADER: signature,
            "CMK-Tenant": tenant_header(records[0].tenant),
            "CMK-Event-Count": str(len(records)),
        }
        raise_for_status(self._client.post(body, headers), self._client)

    def close(self) -> None:
        """Nothing to release: each request has its own connection."""


def build(spec: Mapping[str, Any], env: SinkEnv) -> WebhookSink:
    """The sink for a checked spec: the URL passes ``env.policy``, the key is resolved.

    Raises:
        ConfigurationError: a refused URL or host, an unloadable ``ca_file``, or a signing key
            that cannot be resolved or is unfit (the message names the reference).
    """
    client = HttpsClient(
        spec["url"],
        policy=env.policy,
        timeout=spec["timeout"],
        ca_file=spec.get("ca_file"),
        what="webhook",
    )
    return WebhookSink(client, _signer(spec["signing"], env), max_batch=spec["max_batch"])
