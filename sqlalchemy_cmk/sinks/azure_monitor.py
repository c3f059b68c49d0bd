"""``azure_monitor``: Azure Monitor Logs ingestion through the tenant's data collection rule.

Spec::

    {"kind": "azure_monitor",
     "endpoint": "https://acme-dce-ab12.westeurope-1.ingest.monitor.azure.com",  # required
     "rule_id": "dcr-00000000000000000000000000000000",  # required: the DCR's immutable id
     "stream_name": "Custom-CmkAudit",       # required: the DCR's stream declaration
     "tenant_id": "<Entra tenant GUID>",     # with client_id + client_secret: a service principal
     "client_id": "<app (client) id>",
     "client_secret": "env:ACME_AUDIT_SP_SECRET",  # a secret reference, never the secret
     "authority_host": "https://login.microsoftonline.com",  # optional (sovereign clouds)
     "timeout": 10, "max_batch": 500}

Credentials: with ``client_secret`` (a reference resolved when the sink is built), a
``ClientSecretCredential`` for ``tenant_id``/``client_id``; without, azure-identity's
``DefaultAzureCredential`` (managed identity, workload identity, environment). The identity
needs the *Monitoring Metrics Publisher* role on the tenant's DCR.

Each record is one row of the stream, with these columns (the DCR's stream declaration)::

    TimeGenerated  datetime  the access time (UTC, microseconds)
    EventId        string    the event id (the same on every re-delivery)
    Tenant         string    the tenant
    Severity       string    "info" or "warning"
    Body           string    the event's canonical JSON, unchanged (what the hash chain covers)

``LogsIngestionClient.upload`` gzips the rows in order and sends them in chunks of at most 1 MB,
one after another; the first failed chunk fails the batch (chunks before it stay ingested, so
the retry may duplicate them: de-duplicate by ``EventId``). Each request is bounded by
``timeout`` and not retried by the SDK (the shipper retries), and a redirect is not followed
(a 3xx answer fails, not retryable, as for every destination). The endpoint's addresses pass
the NetworkPolicy at build and again before each request (refused: not retryable). 408, 429
(with its ``Retry-After``) and 5xx answers and network errors are retryable; 401, 403, 404 and
other 4xx are not.
"""

from __future__ import annotations

import datetime
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.policies import SansIOHTTPPolicy
from azure.identity import ClientSecretCredential, DefaultAzureCredential
from azure.monitor.ingestion import LogsIngestionClient

from ..errors import ConfigurationError, DeliveryError
from . import NetworkPolicy, Record, SinkEnv
from ._fields import Fields

KIND = "azure_monitor"
_GUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"


def check(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and normalise an ``azure_monitor`` spec (no I/O, no secret)."""
    f = Fields(spec, KIND)
    endpoint = f.url("endpoint", required=True)
    assert endpoint is not None  # required
    f.out["endpoint"] = endpoint.rstrip("/")
    f.string("rule_id", required=True, pattern=r"dcr-[0-9a-f]{32}")
    f.string("stream_name", required=True, pattern=r"(Custom|Microsoft)-[A-Za-z0-9_]{1,100}")
    tenant = f.string("tenant_id", pattern=_GUID)
    client = f.string("client_id", pattern=_GUID)
    secret = f.secret_ref("client_secret")
    if secret is not None and (tenant is None or client is None):
        raise ConfigurationError(
            f"{KIND} destination field 'client_secret' needs 'tenant_id' and 'client_id'"
        )
    if secret is None and tenant is not None:
        raise ConfigurationError(
            f"{KIND} destination field 'tenant_id' is for a service principal: add "
            "'client_id' and a 'client_secret' reference, or drop it for the default credential"
        )
    f.url("authority_host")
    f.timeout()
    f.max_batch(500, high=10_000)
    return f.done()


def build(spec: Mapping[str, Any], env: SinkEnv) -> AzureMonitorSink:
    """The sink for a checked spec.

    ``env.clients["azure_monitor"]`` may be a ``LogsIngestionClient`` to use as is, or a
    mapping of extra keyword arguments for the client and credential the sink makes (say,
    ``{"connection_verify": "/path/ca.pem"}`` for a private CA).

    Raises:
        ConfigurationError: a host the policy refuses, an unresolvable ``client_secret``.
    """
    for name in ("endpoint", "authority_host"):
        if spec.get(name):
            parts = env.policy.check_url(spec[name], what=f"{KIND} {name}")
            assert parts.hostname is not None
            env.policy.resolve(parts.hostname, parts.port or 443, what=f"{KIND} {name}")
    injected = env.clients.get(KIND)
    if injected is not None and not isinstance(injected, Mapping):
        return AzureMonitorSink(spec, injected)
    options = dict(injected or {})
    timeouts = {"connection_timeout": spec["timeout"], "read_timeout": spec["timeout"]}
    credential = _credential(spec, env, {**options, **timeouts})
    client = LogsIngestionClient(
        endpoint=spec["endpoint"],
        credential=credential,
        retry_total=0,  # the shipper retries
        # azure-core follows up to 30 redirects, to any host, re-attaching the bearer token:
        # the rows (and the token) would go where the NetworkPolicy never looked. A 3xx fails
        # instead, not retryable, as every other destination's does.
        permit_redirects=False,
        per_call_policies=[_AddressCheck(env.policy)],
        **timeouts,
        **options,
    )
    return AzureMonitorSink(spec, client, credential)


class _AddressCheck(SansIOHTTPPolicy):  # type: ignore[type-arg]
    """Checks the addresses of each request's host against the policy just before it is sent.

    The SDK resolves the endpoint itself: checked only at build, a later DNS change (a dangling
    name taken over) would reach whatever it pointed at. (The SDK resolves once more to connect:
    a name that changes its answer within that moment is not caught.)
    """

    def __init__(self, policy: NetworkPolicy) -> None:
        self._policy = policy

    def on_request(self, request: Any) -> None:
        parts = urllib.parse.urlsplit(request.http_request.url)
        try:
            self._policy.resolve(parts.hostname or "", parts.port or 443, what=f"{KIND} endpoint")
        except ConfigurationError as exc:
            # The name now points somewhere the policy refuses: an operator must act.
            raise DeliveryError(str(exc), retryable=False) from None


def _credential(spec: Mapping[str, Any], env: SinkEnv, options: dict[str, Any]) -> Any:
    if spec.get("authority_host"):
        options["authority"] = spec["authority_host"]
    if spec.get("client_secret"):
        try:
            secret = env.secret(spec["client_secret"]).decode("utf-8")
        except UnicodeDecodeError:
            # Its message would quote a byte of the secret.
            raise ConfigurationError(
                f"{KIND} destination field 'client_secret': {spec['client_secret']!r} is not "
                "UTF-8 text"
            ) from None
        return ClientSecretCredential(spec["tenant_id"], spec["client_id"], secret, **options)
    if spec.get("client_id"):  # a user-assigned managed identity or workload identity
        options["managed_identity_client_id"] = spec["client_id"]
    return DefaultAzureCredential(exclude_interactive_browser_credential=True, **options)


def _time(time_ns: int) -> str:
    seconds, ns = divmod(time_ns, 1_000_000_000)
    t = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return (t + datetime.timedelta(microseconds=ns // 1000)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _retry_after(exc: HttpResponseError) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: the shipper's own backoff applies


class AzureMonitorSink:
    """Uploads records to one DCR stream. Not thread-safe (one shipper thread per sink)."""

    kind = KIND

    def __init__(self, spec: Mapping[str, Any], client: Any, credential: Any = None) -> None:
        self.endpoint: str = spec["endpoint"]
        self.rule_id: str = spec["rule_id"]
        self.stream_name: str = spec["stream_name"]
        self.timeout: float = spec["timeout"]
        self.max_batch: int = spec["max_batch"]
        self._client = client
        self._credential = credential  # set when the sink made the client, and closes both
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AzureMonitorSink({self.endpoint} {self.rule_id}/{self.stream_name})"

    @staticmethod
    def row(record: Record) -> dict[str, str]:
        return {
            "TimeGenerated": _time(record.time_ns),
            "EventId": record.id,
            "Tenant": record.tenant,
            "Severity": record.severity,
            "Body": record.body.decode("utf-8"),
        }

    def send(self, records: Sequence[Record]) -> None:
        """Upload the batch, rows in order (see the module docstring).

        Raises:
            DeliveryError: see the module docstring for which are retryable.
        """
        if not records:
            return
        rows = [self.row(r) for r in records]
        where = f"{self.rule_id}/{self.stream_name}"
        try:
            with self._lock:
                self._client.upload(rule_id=self.rule_id, stream_name=self.stream_name, logs=rows)
        except HttpResponseError as exc:
            status = exc.status_code
            if status is None:  # no answer from the service: the credential failed to get a token
                retryable = not isinstance(exc, ClientAuthenticationError)
            else:
                retryable = status in (408, 429) or status >= 500
            answer = f"HTTP {status}" if status else type(exc).__name__
            if status is not None and 300 <= status < 400:
                answer += ", a redirect, not followed (set the destination's final endpoint)"
            raise DeliveryError(
                f"{KIND}: upload to {where} failed: {answer}",
                retryable=retryable,
                retry_after=_retry_after(exc) if retryable else None,
            ) from None
        except (ServiceRequestError, ServiceResponseError) as exc:
            raise DeliveryError(
                f"{KIND}: upload to {where} failed ({type(exc).__name__})"
            ) from None

    def close(self) -> None:
        if self._credential is not None:
            self._client.close()
            close = getattr(self._credential, "close", None)
            if close is not None:
                close()
