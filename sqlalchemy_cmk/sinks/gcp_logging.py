"""``gcp_logging``: Google Cloud Logging ``WriteLogEntries`` into the tenant's project.

Spec::

    {"kind": "gcp_logging",
     "project": "acme-audit",                  # required: the tenant's project
     "log_id": "sqlalchemy-cmk-audit",         # the log's name in it (default)
     "resource_type": "global",                # monitored resource (default "global")
     "resource_labels": {"project_id": "acme-audit"},  # default: project_id = project
     "labels": {"env": "prod"},                # added to every entry
     "payload": "text",                        # "text" (default) or "json"
     "credentials": "file:/etc/cmk/acme-writer.json",  # optional service account key (a reference)
     "timeout": 10, "max_batch": 500}

Credentials: without ``credentials``, Application Default Credentials (the workload's service
account, which the tenant grants ``roles/logging.logWriter`` on its project); with it, the
service account key the reference names, whose ``token_uri`` must be Google's (https, a host
under googleapis.com that the NetworkPolicy admits): google-auth sends the token request there.

Each record is one ``LogEntry`` under ``projects/<project>/logs/<log_id>``: ``insert_id`` is the
event id, so Cloud Logging drops a re-delivered duplicate (same id, same timestamp);
``timestamp`` the access time; ``severity`` INFO or WARNING; labels ``event_id`` and
``tenant`` (then the spec's). ``payload: "text"`` puts the event's canonical JSON, unchanged, in
``textPayload``: the exact bytes the tenant's hash chain covers. ``"json"`` puts it in
``jsonPayload`` for structured queries, but a protobuf ``Struct`` holds numbers as doubles and
forgets key order, so integers above 2**53 (nanosecond times) lose precision there and the hash
chain can no longer be checked from the log.

One batch is one request with ``partial_success`` off: every entry is written or none is. The
call is bounded by ``timeout`` and not retried by the client library (the shipper retries):
UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ABORTED and INTERNAL are retryable;
PERMISSION_DENIED, NOT_FOUND, INVALID_ARGUMENT, UNAUTHENTICATED are not.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud.logging_v2.services.logging_service_v2 import LoggingServiceV2Client
from google.cloud.logging_v2.types import LogEntry, WriteLogEntriesRequest
from google.logging.type import log_severity_pb2  # type: ignore[import-untyped]
from google.protobuf import struct_pb2, timestamp_pb2  # type: ignore[import-untyped]

from ..errors import ConfigurationError, DeliveryError
from . import Record, SinkEnv
from ._fields import Fields

KIND = "gcp_logging"
DEFAULT_LOG_ID = "sqlalchemy-cmk-audit"
ENDPOINT = "logging.googleapis.com"
SCOPES = ("https://www.googleapis.com/auth/logging.write",)
_SEVERITY = {
    "debug": log_severity_pb2.DEBUG,
    "info": log_severity_pb2.INFO,
    "notice": log_severity_pb2.NOTICE,
    "warning": log_severity_pb2.WARNING,
    "error": log_severity_pb2.ERROR,
}
_RETRYABLE = (
    gexc.ServiceUnavailable,
    gexc.TooManyRequests,  # RESOURCE_EXHAUSTED
    gexc.DeadlineExceeded,
    gexc.Aborted,
    gexc.InternalServerError,
    gexc.GatewayTimeout,
    gexc.BadGateway,
)


def check(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and normalise a ``gcp_logging`` spec (no I/O, no secret)."""
    f = Fields(spec, KIND)
    project = f.string("project", required=True, pattern=r"[a-z][a-z0-9:.-]{4,62}[a-z0-9]")
    f.string("log_id", default=DEFAULT_LOG_ID, pattern=r"[A-Za-z0-9/_.-]{1,511}", max_len=511)
    f.string("resource_type", default="global", pattern=r"[a-z0-9_.]{1,100}")
    if spec.get("resource_labels") is None and f.out["resource_type"] == "global":
        f.seen.add("resource_labels")
        f.out["resource_labels"] = {"project_id": project}
    else:
        f.labels("resource_labels")
    labels = f.labels("labels")
    reserved = {"event_id", "tenant"} & set(labels)
    if reserved:
        raise ConfigurationError(
            f"{KIND} destination field 'labels' may not set {sorted(reserved)[0]!r} "
            "(the sink sets it)"
        )
    f.choice("payload", ("text", "json"), default="text")
    f.secret_ref("credentials")
    f.timeout()
    f.max_batch(500, high=1000)
    return f.done()


def build(spec: Mapping[str, Any], env: SinkEnv) -> GcpLoggingSink:
    """The sink for a checked spec; ``env.clients["gcp_logging"]``, if set, is the
    ``LoggingServiceV2Client`` to use, else the sink makes one for Cloud Logging."""
    client = env.clients.get(KIND)
    if client is not None:
        return GcpLoggingSink(spec, client)
    env.policy.check_host(ENDPOINT, what=f"{KIND} endpoint")
    client = LoggingServiceV2Client(credentials=_credentials(spec, env))
    return GcpLoggingSink(spec, client, owned=True)


def _credentials(spec: Mapping[str, Any], env: SinkEnv) -> Any:
    ref = spec.get("credentials")
    if ref is None:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            credentials, _ = google.auth.default(scopes=SCOPES)
        except DefaultCredentialsError:
            raise ConfigurationError(
                f"{KIND} destination: no 'credentials' reference and no Application Default "
                "Credentials found"
            ) from None
        return credentials
    from google.oauth2 import service_account

    try:
        info = json.loads(env.secret(ref))
        _check_token_uri(info, ref, env)
        return service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            info, scopes=SCOPES
        )
    except (ValueError, KeyError, TypeError):
        # Names the reference, never what it holds.
        raise ConfigurationError(
            f"{KIND} destination field 'credentials': {ref!r} is not a service account key"
        ) from None


def _check_token_uri(info: Any, ref: str, env: SinkEnv) -> None:
    """Refuse a key whose ``token_uri`` is not Google's token endpoint over https.

    google-auth POSTs the signed token request to the key's own ``token_uri``, resolving it
    itself, past the NetworkPolicy: a key file someone else wrote (the tenant's service
    account) would otherwise aim the application at its metadata service or an admin port, or
    collect signed assertions. The sink writes to Cloud Logging only, so the token comes from
    Google: a host under googleapis.com, which the policy's allowlist must also admit.

    Raises:
        ConfigurationError: naming the field, never the key.
    """
    uri = info.get("token_uri") if isinstance(info, dict) else None
    host = urllib.parse.urlsplit(uri).hostname if isinstance(uri, str) else None
    if (
        not isinstance(uri, str)
        or not uri.startswith("https://")
        or host is None
        or not (host == "googleapis.com" or host.endswith(".googleapis.com"))
    ):
        raise ConfigurationError(
            f"{KIND} destination field 'credentials': the key {ref!r} has a token_uri that is "
            "not Google's token endpoint (https://oauth2.googleapis.com/token)"
        )
    env.policy.check_url(uri, what=f"{KIND} credentials' token_uri")


def _timestamp(time_ns: int) -> timestamp_pb2.Timestamp:
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


class GcpLoggingSink:
    """Writes records to one log. The client is thread-safe; the shipper uses one thread."""

    kind = KIND

    def __init__(self, spec: Mapping[str, Any], client: Any, owned: bool = False) -> None:
        self.project: str = spec["project"]
        self.log_name = f"projects/{self.project}/logs/" + urllib.parse.quote(
            spec["log_id"], safe=""
        )
        self.resource = {"type": spec["resource_type"], "labels": dict(spec["resource_labels"])}
        self.labels: dict[str, str] = dict(spec.get("labels") or {})
        self.json_payload: bool = spec["payload"] == "json"
        self.timeout: float = spec["timeout"]
        self.max_batch: int = spec["max_batch"]
        self._client = client
        self._owned = owned
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"GcpLoggingSink({self.log_name})"

    def entry(self, record: Record) -> LogEntry:
        entry = LogEntry(
            insert_id=record.id,
            timestamp=_timestamp(record.time_ns),
            severity=_SEVERITY.get(record.severity, log_severity_pb2.DEFAULT),
            labels={**self.labels, "event_id": record.id, "tenant": record.tenant},
        )
        text = record.body.decode("utf-8")
        if self.json_payload:
            payload = struct_pb2.Struct()
            try:
                payload.update(json.loads(text))
            except (ValueError, TypeError, AttributeError):
                payload.update({"body": text})  # not an object: kept whole, as a string
            entry.json_payload = payload
        else:
            entry.text_payload = text
        return entry

    def send(self, records: Sequence[Record]) -> None:
        """Write the batch as one all-or-nothing request, entries in the batch's order.

        Raises:
            DeliveryError: see the module docstring for which are retryable.
        """
        if not records:
            return
        request = WriteLogEntriesRequest(
            log_name=self.log_name,
            resource=self.resource,
            entries=[self.entry(r) for r in records],
            partial_success=False,
        )
        try:
            with self._lock:
                self._client.write_log_entries(request=request, timeout=self.timeout, retry=None)
        except gexc.GoogleAPICallError as exc:
            # The status name only: the message of a refusal may quote entries.
            status = type(exc).__name__
            raise DeliveryError(
                f"{KIND}: WriteLogEntries to {self.log_name} failed: {status}",
                retryable=isinstance(exc, _RETRYABLE),
            ) from None
        except gexc.RetryError as exc:
            raise DeliveryError(f"{KIND}: WriteLogEntries failed ({type(exc).__name__})") from None

    def close(self) -> None:
        # An injected client belongs to whoever made it.
        if self._owned:
            self._client.transport.close()
