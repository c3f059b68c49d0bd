"""The ``splunk_hec`` destination: Splunk's HTTP Event Collector (HEC), JSON event endpoint.

Spec::

    {"kind": "splunk_hec",
     "url": "https://hec.acme.example:8088",      # the path defaults to /services/collector/event
     "token": "env:ACME_HEC_TOKEN",               # a secret reference to the HEC token
     "index": "cmk_audit",                        # optional: the token's default index otherwise
     "source": "sqlalchemy-cmk", "sourcetype": "sqlalchemy_cmk:audit", "host": null,
     "timeout": 10, "max_batch": 100, "ca_file": null,
     "ack": false, "ack_timeout": 60}             # indexer acknowledgement (below)

Each batch is one POST of concatenated event objects (HEC's batch format), each
``{"time": <seconds.micro>, "source", "sourcetype", ["index",] ["host",] "event": <body>}`` with
the record's body embedded verbatim as the event, ``Authorization: Splunk <token>``.

HEC's answers: 200 (code 0) delivered; 429 and 503 (server busy, code 9) and other 5xx are
retried; every other 4xx (bad token 401/403, bad data 400, disabled token) is not, and the
error names HEC's numeric code with its documented meaning, never the token or an event.

**Indexer acknowledgement** (``"ack": true``, for a token that has it on). HEC's 200 then means
"received", not "indexed": every request carries ``X-Splunk-Request-Channel`` (one random UUID
per sink), the answer carries an ``ackId``, and the send polls ``/services/collector/ack`` on
the same origin (``{"acks": [id]}``, answered ``{"acks": {"<id>": true|false}}``) at growing
intervals until the id is acknowledged; only then does it return, and the shipper move its
cursor. Not acknowledged within ``ack_timeout`` seconds: a retryable error, and the batch is
sent again (its events keep their ids, for the tenant to de-duplicate). A poll that fails for a
while (network, 503) is polled again within that time. The cookies the origin sets go back to
it (a load balancer's stickiness cookie keeps the polls on the indexer that holds the
channel). HEC's channel and acknowledgement errors
(code 10 "data channel is missing", 11 "invalid data channel", 14 "ACK is disabled") are not
retryable, and the error says what to change in the spec or on the token.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import ConfigurationError, DeliveryError
from . import Record, SinkEnv
from ._fields import Fields
from ._http import HttpsClient, Response, raise_for_status

__all__ = ["SplunkHecSink", "build", "check"]

KIND = "splunk_hec"
MAX_BATCH = 1000
DEFAULT_PATH = "/services/collector/event"
ACK_PATH = "/services/collector/ack"
#: Seconds a send waits for the indexers' acknowledgement by default, and at most (ten minutes:
#: Splunk may drop a channel idle that long, and its acknowledgements with it).
DEFAULT_ACK_TIMEOUT = 60.0
MAX_ACK_TIMEOUT = 600.0
# Polls of the ack endpoint: the first after a quarter second (indexing takes about that at
# the least), each wait twice the one before, at most ten seconds (the query interval Splunk's
# client guidance uses).
FIRST_POLL = 0.25
MAX_POLL = 10.0

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

# Cookies kept for the load balancer in front of HEC's indexers (at most so many, so long), and
# the forms RFC 6265 allows for a cookie's name and value.
_MAX_COOKIES = 8
_MAX_COOKIE = 4096
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_COOKIE_VALUE = re.compile(r'"?[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*"?')

# What the operator changes for HEC's channel and acknowledgement errors.
_HEC_ADVICE = {
    10: (
        'the token has indexer acknowledgement on: set "ack": true in the destination spec '
        '(or turn acknowledgement off for the token); with "ack" set, a proxy in between '
        "dropped the X-Splunk-Request-Channel header"
    ),
    11: (
        'HEC refused the request channel: do not put channel= in the url (with "ack": true '
        "the sink sends a channel of its own), and check that no proxy in between rewrites "
        "X-Splunk-Request-Channel"
    ),
    14: (
        "the token has indexer acknowledgement off: turn it on for the token in Splunk, or "
        'remove "ack" from the destination spec'
    ),
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
    # Added after specs were stored: absent, neither enters the normal form.
    ack = f.flag("ack", emit_default=False)
    f.number(
        "ack_timeout",
        default=DEFAULT_ACK_TIMEOUT,
        low=1,
        high=MAX_ACK_TIMEOUT,
        emit_default=ack,
    )
    if not ack and "ack_timeout" in f.out:
        raise ConfigurationError(f'{f.what("ack_timeout")} applies only with "ack": true')
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
        ack_timeout: Seconds to wait for the indexers' acknowledgement of each batch; None:
            no indexer acknowledgement (a 200 delivers).
        clock: Monotonic seconds (a seam for tests, with ``sleep``).
        sleep: Waits between polls of the ack endpoint.
    """

    kind = KIND

    def __init__(
        self,
        client: HttpsClient,
        token: bytes,
        meta: Mapping[str, str],
        *,
        max_batch: int,
        ack_timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.max_batch = max_batch
        self.ack_timeout = ack_timeout
        self._client = client
        self._clock = clock
        self._sleep = sleep
        self._headers = {
            "Authorization": (b"Splunk " + token).decode("latin-1"),
            "Content-Type": "application/json",
            "User-Agent": "sqlalchemy-cmk",
        }
        if ack_timeout is not None:
            # One channel per sink: HEC numbers the ackIds per channel.
            self.channel = str(uuid.uuid4())
            self._headers["X-Splunk-Request-Channel"] = self.channel
        # With acknowledgement, the cookies the origin sets: a load balancer in front of several
        # indexers keeps a client on the indexer that holds its channel by one (AWS's AWSALB),
        # and an ack poll that reaches another indexer is never answered true.
        self._cookies: dict[str, str] = {}
        # The ack endpoint beside the event endpoint, under any prefix a proxy adds.
        prefix, found, _ = client.target.partition("/services/collector")
        self._ack_path = (prefix if found else "") + ACK_PATH
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
        """POST ``records`` in one request; with indexer acknowledgement, wait until HEC
        acknowledges that they are indexed.

        Raises:
            DeliveryError: HEC did not take them, or did not acknowledge them in time.
        """
        if not records:
            return
        resp = self._post(self.payload(records))
        raise_for_status(resp, self._client, _hec_detail(resp))
        if self.ack_timeout is None:
            return
        ack_id = _ack_id(resp)
        if ack_id is None:
            # HEC takes a batch on a token without acknowledgement and says nothing of it: its
            # ack endpoint says why (code 14, raised here) in its own words.
            try:
                self._acked(0)
            except DeliveryError as exc:
                if not exc.retryable:
                    raise
            raise DeliveryError(
                f"{self._what()} took the batch without an ackId, so it cannot confirm that it "
                f"was indexed: {_HEC_ADVICE[14]}",
                retryable=False,
            )
        self._await_ack(ack_id)

    def _post(self, body: bytes, path: str | None = None) -> Response:
        """One request to the origin, with its cookies (acknowledgement only)."""
        headers = self._headers
        if self._cookies:
            cookie = "; ".join(f"{k}={v}" for k, v in self._cookies.items())
            headers = {**headers, "Cookie": cookie}
        resp = self._client.post(body, headers, path=path)
        if self.ack_timeout is not None:
            self._keep_cookies(resp.set_cookies)
        return resp

    def _keep_cookies(self, set_cookies: Sequence[str]) -> None:
        # Name and value only (the client sends them to this origin alone, whatever Domain or
        # Path say); a cookie set empty or with Max-Age=0 is dropped. Anything not of the form
        # RFC 6265 allows is ignored: it would otherwise reach a request header.
        for line in set_cookies:
            pair, *attrs = line.split(";")
            name, eq, value = pair.strip().partition("=")
            value = value.strip()
            if not eq or len(name) + len(value) > _MAX_COOKIE:
                continue
            if not _COOKIE_NAME.fullmatch(name) or not _COOKIE_VALUE.fullmatch(value):
                continue
            if not value or any(a.strip().lower() == "max-age=0" for a in attrs):
                self._cookies.pop(name, None)
            elif name in self._cookies or len(self._cookies) < _MAX_COOKIES:
                self._cookies[name] = value

    def _what(self) -> str:
        return f"{self._client.what} {self._client.origin}"

    def _await_ack(self, ack_id: int) -> None:
        """Poll until ``ack_id`` is acknowledged; retryable DeliveryError at ``ack_timeout``."""
        assert self.ack_timeout is not None
        deadline = self._clock() + self.ack_timeout
        wait = FIRST_POLL
        last: DeliveryError | None = None
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            self._sleep(min(wait, remaining))
            wait = min(wait * 2, MAX_POLL)
            try:
                if self._acked(ack_id):
                    return
                last = None
            except DeliveryError as exc:
                if not exc.retryable:
                    raise
                # A network error or a busy HEC: the ackId is still HEC's to answer for.
                last = exc
                if exc.retry_after is not None:
                    wait = max(wait, exc.retry_after)
        said = f"; the last poll failed: {last}" if last is not None else ""
        raise DeliveryError(
            f"{self._what()} did not acknowledge within {self.ack_timeout:g} s that it indexed "
            f"the batch (ackId {ack_id}): sending it again{said}",
            retryable=True,
        )

    def _acked(self, ack_id: int) -> bool:
        """Whether HEC acknowledges ``ack_id`` now (one POST to the ack endpoint).

        Raises:
            DeliveryError: as for the event POST (code 14 when the token has acknowledgement
                off), and retryable for an answer that is not HEC's ``{"acks": {...}}``.
        """
        body = b'{"acks":[' + str(ack_id).encode() + b"]}"
        resp = self._post(body, self._ack_path)
        raise_for_status(resp, self._client, _hec_detail(resp))
        try:
            acks = json.loads(resp.body).get("acks")
        except (ValueError, AttributeError, UnicodeDecodeError):
            acks = None
        if not isinstance(acks, dict):
            raise DeliveryError(
                f'{self._what()} answered the ack query without HEC\'s "acks" object'
            )
        return acks.get(str(ack_id)) is True

    def close(self) -> None:
        """Nothing to release: each request has its own connection."""


def _hec_code(resp: Response) -> int | None:
    try:
        code = json.loads(resp.body).get("code")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    if not isinstance(code, int) or isinstance(code, bool):
        return None
    return code


def _hec_detail(resp: Response) -> str:
    if 200 <= resp.status < 300:
        return ""
    code = _hec_code(resp)
    if code is None:
        return ""
    said = f"HEC code {code}: {_HEC_CODES.get(code, 'unknown code')}"
    advice = _HEC_ADVICE.get(code)
    return f"{said}; {advice}" if advice else said


def _ack_id(resp: Response) -> int | None:
    try:
        ack_id = json.loads(resp.body).get("ackId")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    if not isinstance(ack_id, int) or isinstance(ack_id, bool) or ack_id < 0:
        return None
    return ack_id


def build(
    spec: Mapping[str, Any],
    env: SinkEnv,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> SplunkHecSink:
    """The sink for a checked spec: the URL passes ``env.policy``, the token is resolved.

    Args:
        spec: The checked spec.
        env: The policy and secret resolvers.
        clock: Monotonic seconds, for the acknowledgement's deadline (a seam for tests).
        sleep: Waits between polls of the ack endpoint (a seam for tests).

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
    return SplunkHecSink(
        client,
        token,
        meta,
        max_batch=spec["max_batch"],
        ack_timeout=spec.get("ack_timeout") if spec.get("ack") else None,
        clock=clock,
        sleep=sleep,
    )
