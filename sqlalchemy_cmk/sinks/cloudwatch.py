"""``cloudwatch``: AWS CloudWatch Logs ``PutLogEvents`` into the tenant's log group.

Spec::

    {"kind": "cloudwatch",
     "region": "eu-west-1",                       # required
     "log_group": "/acme/sqlalchemy-cmk-audit",   # required: the tenant's log group
     "log_stream": "prod-eu",                     # required
     "create_stream": false,                      # create the stream when it is missing
     "role_arn": "arn:aws:iam::111122223333:role/cmk-audit-writer",  # optional
     "external_id": "acme-7f3a",                  # optional, with role_arn
     "endpoint_url": "https://logs.eu-west-1.amazonaws.com",         # optional (VPC endpoint)
     "sts_endpoint_url": "https://sts.eu-west-1.amazonaws.com",      # optional, with role_arn
     "timeout": 10, "max_batch": 1000}

Credentials come from boto3's standard chain (environment, shared files, instance or task
role); with ``role_arn``, the sink assumes that role (in the tenant's account) with them and
renews the temporary credentials before they expire. No access key is ever put in a spec.

Each record is one log event: ``timestamp`` the access time in milliseconds, ``message`` the
event's canonical JSON. A batch goes out in as few ``PutLogEvents`` calls as CloudWatch's limits
allow (10,000 events, 1,048,576 bytes counting 26 bytes per event, a 24-hour span); within a
call the events are sorted by time, as the API requires, otherwise the batch order is kept.
Each call is bounded by ``timeout`` (connect and read) and makes one attempt: the shipper
retries. Throttling, 5xx answers and network errors are retryable; a missing group or stream
(unless ``create_stream``), a refused credential or an event CloudWatch rejects as too old or
too new are not.

The SDK resolves names itself: the sink checks ``endpoint_url`` and the addresses its host
resolves to against the NetworkPolicy when built, and, on the clients it makes, the endpoint
the SDK chose (``logs.<region>.amazonaws.com`` without ``endpoint_url``, likewise STS) against
the allowlist and the addresses of every request's host just before it is sent, so a later
DNS change is refused (not retryable). The SDK then resolves the name once more to connect: a
name that changes its answer within that moment (rebinding) is not caught.
"""

from __future__ import annotations

import datetime
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import boto3  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from ..errors import ConfigurationError, DeliveryError
from . import NetworkPolicy, Record, SinkEnv
from ._fields import Fields

KIND = "cloudwatch"
MAX_EVENTS = 10_000
MAX_BYTES = 1_048_576
EVENT_OVERHEAD = 26
MAX_EVENT_BYTES = 1_048_576 - EVENT_OVERHEAD
MAX_SPAN_MS = 24 * 3600 * 1000
_RETRYABLE = {
    "ThrottlingException",
    "ServiceUnavailableException",
    "InternalFailure",
    "InternalServerError",
    "RequestLimitExceeded",
    "LimitExceededException",
    "OperationAbortedException",
    "ExpiredTokenException",  # temporary credentials: the next try takes new ones
    "RequestTimeout",
    "RequestTimeoutException",
}


def check(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and normalise a ``cloudwatch`` spec (no I/O, no secret)."""
    f = Fields(spec, KIND)
    f.string("region", required=True, pattern=r"[a-z]{2}(-[a-z]+)+-\d{1,2}")
    f.string("log_group", required=True, pattern=r"[.\-_/#A-Za-z0-9]{1,512}", max_len=512)
    f.string("log_stream", required=True, pattern=r"[^:*]{1,512}", max_len=512)
    f.flag("create_stream")
    role = f.string("role_arn", pattern=r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}")
    external = f.string("external_id", pattern=r"[\w+=,.@:/-]{2,1224}", max_len=1224)
    if external is not None and role is None:
        raise ConfigurationError(f"{KIND} destination field 'external_id' needs 'role_arn'")
    # https, a host, no credentials in it (no DNS, no allowlist: that is build's).
    f.url("endpoint_url")
    f.url("sts_endpoint_url")
    f.timeout()
    f.max_batch(1000, high=MAX_EVENTS)
    return f.done()


def build(spec: Mapping[str, Any], env: SinkEnv) -> CloudWatchSink:
    """The sink for a checked spec; ``env.clients["cloudwatch"]``, if set, is the boto3
    ``logs`` client to use (its own credentials and timeouts), else the sink makes one."""
    for name in ("endpoint_url", "sts_endpoint_url"):
        if spec.get(name):
            parts = env.policy.check_url(spec[name], what=f"{KIND} {name}")
            assert parts.hostname is not None
            env.policy.resolve(parts.hostname, parts.port or 443, what=f"{KIND} {name}")
    return CloudWatchSink(spec, env.clients.get(KIND), env.policy)


def _code(exc: ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "")), int(status or 0)


class CloudWatchSink:
    """Puts records into one log stream. Not thread-safe (one shipper thread per sink)."""

    kind = KIND

    def __init__(
        self, spec: Mapping[str, Any], client: Any = None, policy: NetworkPolicy | None = None
    ) -> None:
        self.region: str = spec["region"]
        self.log_group: str = spec["log_group"]
        self.log_stream: str = spec["log_stream"]
        self.create_stream: bool = spec.get("create_stream", False)
        self.timeout: float = spec["timeout"]
        self.max_batch: int = spec["max_batch"]
        self._spec = dict(spec)
        self._injected = client
        self._client: Any = client
        # Checked on the clients the sink makes (an injected one is its maker's business).
        self._policy = policy or NetworkPolicy()
        self._expires: datetime.datetime | None = None  # of assumed-role credentials
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CloudWatchSink({self.region}:{self.log_group}/{self.log_stream})"

    def _config(self) -> Any:
        return Config(
            connect_timeout=self.timeout,
            read_timeout=self.timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},  # the shipper retries
        )

    def _logs(self) -> Any:
        if self._injected is not None:
            return self._injected
        now = datetime.datetime.now(datetime.timezone.utc)
        if self._client is not None and (
            self._expires is None or now < self._expires - datetime.timedelta(minutes=5)
        ):
            return self._client
        session = boto3.session.Session(region_name=self.region)
        creds: dict[str, str] = {}
        role = self._spec.get("role_arn")
        if role:
            sts = session.client(
                "sts",
                region_name=self.region,
                endpoint_url=self._spec.get("sts_endpoint_url"),
                config=self._config(),
            )
            self._guard(sts)
            kwargs: dict[str, Any] = {"RoleArn": role, "RoleSessionName": "sqlalchemy-cmk-audit"}
            if self._spec.get("external_id"):
                kwargs["ExternalId"] = self._spec["external_id"]
            c = sts.assume_role(**kwargs)["Credentials"]
            creds = {
                "aws_access_key_id": c["AccessKeyId"],
                "aws_secret_access_key": c["SecretAccessKey"],
                "aws_session_token": c["SessionToken"],
            }
            self._expires = c["Expiration"]
        self._client = session.client(
            "logs",
            region_name=self.region,
            endpoint_url=self._spec.get("endpoint_url"),
            config=self._config(),
            **creds,
        )
        self._guard(self._client)
        return self._client

    def _guard(self, client: Any) -> None:
        """Check the endpoint the SDK chose against the allowlist now, and the addresses of each
        request's host against the policy just before the SDK sends it.

        Raises:
            DeliveryError: the endpoint is refused (not retryable).
        """
        try:
            self._policy.check_url(client.meta.endpoint_url, what=f"{KIND} endpoint")
        except ConfigurationError as exc:
            raise DeliveryError(str(exc), retryable=False) from None
        client.meta.events.register("before-send", self._before_send)

    def _before_send(self, request: Any, **_: Any) -> None:
        parts = urllib.parse.urlsplit(request.url)
        try:
            self._policy.resolve(
                parts.hostname or "",
                parts.port or 443,
                what=f"{KIND} endpoint",
                timeout=self.timeout,
            )
        except ConfigurationError as exc:
            # The name now points somewhere the policy refuses: an operator must act.
            raise DeliveryError(str(exc), retryable=False) from None

    @staticmethod
    def chunks(records: Sequence[Record]) -> list[list[dict[str, Any]]]:
        """``records`` as PutLogEvents event lists within CloudWatch's limits, each sorted by
        time (stable: records of the same millisecond keep their order).

        Raises:
            DeliveryError: not retryable, for a record larger than one event may be.
        """
        out: list[list[dict[str, Any]]] = []
        current: list[dict[str, Any]] = []
        size = 0
        low = high = 0
        for record in records:
            size_one = len(record.body) + EVENT_OVERHEAD
            if len(record.body) > MAX_EVENT_BYTES:
                raise DeliveryError(
                    f"{KIND}: event {record.id} is {len(record.body)} bytes, over CloudWatch's "
                    "limit for one log event",
                    retryable=False,
                )
            ms = record.time_ns // 1_000_000
            if current and (
                len(current) == MAX_EVENTS
                or size + size_one > MAX_BYTES
                or max(high, ms) - min(low, ms) > MAX_SPAN_MS
            ):
                out.append(current)
                current, size = [], 0
            if not current:
                low = high = ms
            low, high = min(low, ms), max(high, ms)
            # The body is canonical JSON in UTF-8: the message is that text, unchanged.
            current.append({"timestamp": ms, "message": record.body.decode("utf-8")})
            size += size_one
        if current:
            out.append(current)
        return [sorted(chunk, key=lambda e: e["timestamp"]) for chunk in out]

    def send(self, records: Sequence[Record]) -> None:
        """Put the batch into the log stream (see the module docstring for the limits).

        Raises:
            DeliveryError: see the module docstring for which are retryable.
        """
        if not records:
            return
        chunks = self.chunks(records)
        deadline = time.monotonic() + self.timeout
        with self._lock:
            for chunk in chunks:
                if time.monotonic() > deadline:
                    raise DeliveryError(f"{KIND}: the batch did not go out within its timeout")
                self._put(chunk)

    def _put(self, events: list[dict[str, Any]], created: bool = False) -> None:
        where = f"{self.log_group}/{self.log_stream}"
        try:
            logs = self._logs()
            answer = logs.put_log_events(
                logGroupName=self.log_group, logStreamName=self.log_stream, logEvents=events
            )
        except ClientError as exc:
            code, status = _code(exc)
            if code == "ResourceNotFoundException" and self.create_stream and not created:
                self._create()
                self._put(events, created=True)
                return
            if code == "ExpiredTokenException" and self._injected is None:
                self._client = None  # assume the role again on the next try
            retryable = code in _RETRYABLE or status >= 500 or status == 429
            raise DeliveryError(
                f"{KIND}: PutLogEvents to {where} failed: {code or status}", retryable=retryable
            ) from None
        except BotoCoreError as exc:
            raise DeliveryError(
                f"{KIND}: PutLogEvents to {where} failed ({type(exc).__name__})"
            ) from None
        rejected = answer.get("rejectedLogEventsInfo") or {}
        if rejected:
            # Accepted events stay accepted; these never will be: an operator must look.
            raise DeliveryError(
                f"{KIND}: CloudWatch rejected events of the batch to {where} "
                f"({', '.join(sorted(rejected))})",
                retryable=False,
            )

    def _create(self) -> None:
        try:
            self._logs().create_log_stream(
                logGroupName=self.log_group, logStreamName=self.log_stream
            )
        except ClientError as exc:
            code, status = _code(exc)
            if code == "ResourceAlreadyExistsException":
                return
            raise DeliveryError(
                f"{KIND}: creating the stream {self.log_group}/{self.log_stream} failed: "
                f"{code or status}",
                retryable=code in _RETRYABLE or status >= 500,
            ) from None
        except BotoCoreError as exc:
            raise DeliveryError(
                f"{KIND}: creating the stream failed ({type(exc).__name__})"
            ) from None

    def close(self) -> None:
        if self._injected is None and self._client is not None:
            self._client.close()
        self._client = None if self._injected is None else self._injected
