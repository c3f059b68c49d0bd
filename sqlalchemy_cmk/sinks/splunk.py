"""The ``splunk_hec`` destination: Splunk's HTTP Event Collector (HEC), JSON event endpoint.

Spec::

    {"kind": "splunk_hec",
     "url": "https://hec.acme.example:8088",      # the path defaults to /services/collector/event
     "token": "env:ACME_HEC_TOKEN",               # a secret reference to the HEC token
     "index": "cmk_audit",                        # optional: the token's default index otherwise
     "source": "sqlalchemy-cmk", "sourcetype": "sqlalchemy_cmk:audit", "host": null,
     "timeout": 10, "max_batch": 100, "ca_file": null}

Each batch is one POST of concatenated event objects (HEC's batch format), each
``{"time": <seconds.micro>, "source", "sourcetype", ["index",] ["host",] "event": <body>}`` with
the record's body embedded verbatim as the event, ``Authorization: Splunk <token>``.

HEC's answers: 200 (code 0) delivered; 429 and 503 (server busy, code 9) and other 5xx are
retried; every other 4xx (bad token 401/403, bad data 400, disabled token) is not, and the
error names HEC's numeric code with its documented meaning, never the token or an event.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigurationError
from . import Record, SinkEnv
from ._fields import Fields
from ._http import HttpsClient, Response, raise_for_status

__all__ = ["SplunkHecSink", "build", "check"]

KIND = "splunk_hec"
MAX_BATCH = 1000
DEFAULT_PATH = "/services/collector/event"

# HEC's status codes (Splunk docs, "Troubleshoot HTTP Event Collector"), so an error can say
# what HEC meant without repeating the answer's own text.
_HEC_CODES = {
    0: "success",
    1: "token disabled",
    2: "token is required",
    3: "invalid authorization",
    4: "invalid token",
    5: "no data",
    6: "invalid data format",
    7: "incorrect index",
    8: "internal server error",
    9: "server is busy",
    10: "data channel is missing",
    11: "invalid data channel",
    12: "event field is required",
    13: "event field cannot be blank",
    14: "ACK is disabled",
    15: "error in handling indexed fields",
    16: "query string authorization is not enabled",
}


def check(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and normalise a Splunk HEC spec (no I/O, no secret resolved).

    Raises:
        ConfigurationError: naming the field.
    """
    f = Fields(spec, KIND)
    f.url("url", required=True, default_path=DEFAULT_PATH)
    f.secret_ref("token", required=True)
    f.string("index")
    f.string("source", default="sqlalchemy-cmk")
    f.string("sourcetype", default="sqlalchemy_cmk:audit")
    f.string("host")
    f.timeout()
    f.ca_file()
    f.max_batch(MAX_BATCH)
    return f.done()


def _time(ns: int) -> str:
    # HEC reads epoch seconds with a fraction; integer arithmetic keeps the microseconds exact.
    return f"{ns // 1_000_000_000}.{ns // 1000 % 1_000_000:06d}"


class SplunkHecSink:
    """POSTs batches of events to one HEC endpoint (see the module docstring).

    Args:
        client: The HTTPS client for the endpoint.
        token: The HEC token.
        meta: ``source``, ``sourcetype`` and, if set, ``index`` and ``host``.
        max_batch: Records per request at most.
    """

    kind = KIND

    def __init__(
        self, client: HttpsClient, token: bytes, meta: Mapping[str, str], *, max_batch: int
    ) -> None:
        self.max_batch = max_batch
        self._client = client
        self._auth = b"Splunk " + token
        # The metadata is the same for every event: serialise it once, to splice each event in.
        self._meta = json.dumps(dict(meta), separators=(",", ":")).encode()[1:-1]

    def payload(self, records: Sequence[Record]) -> bytes:
        """The request body: one JSON object per record, concatenated (HEC's batch format)."""
        return b"".join(
            b'{"time":'
            + _time(r.time_ns).encode()
            + b","
            + self._meta
            + b',"event":'
            + r.body
            + b"}"
            for r in records
        )

    def send(self, records: Sequence[Record]) -> None:
        """POST ``records`` in one request.

        Raises:
            DeliveryError: HEC did not take them.
        """
        if not records:
            return
        headers = {
            "Authorization": self._auth.decode("latin-1"),
            "Content-Type": "application/json",
            "User-Agent": "sqlalchemy-cmk",
        }
        resp = self._client.post(self.payload(records), headers)
        raise_for_status(resp, self._client, _hec_detail(resp))

    def close(self) -> None:
        """Nothing to release: each request has its own connection."""


def _hec_detail(resp: Response) -> str:
    if 200 <= resp.status < 300:
        return ""
    try:
        code = json.loads(resp.body).get("code")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return ""
    if not isinstance(code, int) or isinstance(code, bool):
        return ""
    return f"HEC code {code}: {_HEC_CODES.get(code, 'unknown code')}"


def build(spec: Mapping[str, Any], env: SinkEnv) -> SplunkHecSink:
    """The sink for a checked spec: the URL passes ``env.policy``, the token is resolved.

    Raises:
        ConfigurationError: a refused URL or host, an unloadable ``ca_file`` or a token
            reference that cannot be resolved.
    """
    client = HttpsClient(
        spec["url"],
        policy=env.policy,
        timeout=spec["timeout"],
        ca_file=spec.get("ca_file"),
        what="splunk_hec",
    )
    token = env.secret(spec["token"])
    if any(c in token for c in b"\r\n\x00") or not token.isascii():
        raise ConfigurationError(
            f"splunk_hec token {spec['token']!r} is not a valid header value (line break or "
            "non-ASCII byte)"
        )
    meta = {k: spec[k] for k in ("source", "sourcetype", "index", "host") if k in spec}
    return SplunkHecSink(client, token, meta, max_batch=spec["max_batch"])
