"""The ``otlp_http`` destination: OpenTelemetry logs over OTLP/HTTP, through the OTel SDK.

Spec (extra ``audit-otlp``: ``opentelemetry-sdk``, ``opentelemetry-exporter-otlp-proto-http``)::

    {"kind": "otlp_http",
     "url": "https://otel.acme.example:4318",    # the path defaults to /v1/logs
     "headers": {"Authorization": "env:ACME_OTLP_AUTH"},   # each value a secret reference
     "service_name": "sqlalchemy-cmk", "compression": "none",   # or "gzip"
     "timeout": 10, "max_batch": 500, "ca_file": null}

Each record becomes one SDK log record: body the event's JSON text (the record's bytes, decoded
as UTF-8, so they re-encode to the same bytes), ``timestamp`` the access time, severity INFO for
a served access and WARN for a refused one, ``event_name`` ``sqlalchemy_cmk.audit`` and the
attributes ``cmk.event.id`` and ``cmk.tenant``; the resource holds ``service.name`` only.

The SDK's ``OTLPLogExporter`` encodes and POSTs each batch, called directly (no batch processor,
which would drop a failed batch): its failure becomes a :class:`DeliveryError`. Its HTTP goes
through a ``requests.Session`` whose ``request`` is the shared client of ``_http``, so OTLP
obeys the same rules as the other HTTP destinations: policy-checked and pinned address, verified
TLS, no redirect, no proxy or ``.netrc`` from the environment, one timeout, the same retryable
statuses. (The stock exporter, left to ``requests``, would count a 3xx answer as a successful
export: a redirecting collector would silently lose the batch.) Only the exporter's own
``Content-Type``, ``Content-Encoding`` and ``User-Agent`` headers pass, plus the spec's: headers
the process's ``OTEL_EXPORTER_OTLP_*HEADERS`` variables add (credentials for the application's
own collector) never reach a tenant; likewise the resource is built without
``OTEL_RESOURCE_ATTRIBUTES``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import requests
from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import LogRecordExportResult
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from requests.structures import CaseInsensitiveDict

from ..errors import ConfigurationError, DeliveryError
from . import Record, SinkEnv, check_secret_ref
from ._fields import Fields
from ._http import HttpsClient, raise_for_status

__all__ = ["OtlpHttpSink", "build", "check", "log_records"]

KIND = "otlp_http"
MAX_BATCH = 1000
DEFAULT_PATH = "/v1/logs"
EVENT_NAME = "sqlalchemy_cmk.audit"
_SEVERITY = {
    "info": (SeverityNumber.INFO, "INFO"),
    "warning": (SeverityNumber.WARN, "WARN"),
    "error": (SeverityNumber.ERROR, "ERROR"),
}
_COMPRESSION = {"none": Compression.NoCompression, "gzip": Compression.Gzip}
# The exporter's headers that describe the body; everything else it adds is dropped.
_EXPORTER_HEADERS = frozenset({"content-type", "content-encoding", "user-agent"})
_RESERVED = _EXPORTER_HEADERS | {"host", "content-length", "transfer-encoding", "connection"}
_HEADER_NAME = r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+"  # RFC 9110's token


def check(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and normalise an OTLP/HTTP spec (no I/O, no secret resolved).

    Raises:
        ConfigurationError: naming the field.
    """
    f = Fields(spec, KIND)
    f.url("url", required=True, default_path=DEFAULT_PATH)
    for name, ref in f.mapping("headers").items():
        if not isinstance(name, str) or not re.fullmatch(_HEADER_NAME, name):
            raise ConfigurationError(f"{f.what('headers')} has an invalid header name {name!r}")
        if name.lower() in _RESERVED:
            raise ConfigurationError(f"{f.what('headers')}: header {name!r} is set by the sink")
        check_secret_ref(ref, f.what(f"headers.{name}"))
    f.string("service_name", default="sqlalchemy-cmk")
    f.choice("compression", _COMPRESSION, default="none")
    f.timeout()
    f.ca_file()
    f.max_batch(MAX_BATCH)
    return f.done()


def log_records(
    records: Sequence[Record], resource: Resource, scope: InstrumentationScope
) -> list[ReadableLogRecord]:
    """The SDK log records for ``records`` (see the module docstring for the mapping).

    Raises:
        DeliveryError: a body that is not UTF-8 (not retryable).
    """
    observed = time.time_ns()
    out = []
    for r in records:
        try:
            body = r.body.decode("utf-8")
        except UnicodeDecodeError:
            raise DeliveryError(f"audit event {r.id} is not UTF-8 JSON", retryable=False) from None
        number, text = _SEVERITY.get(r.severity, _SEVERITY["info"])
        log = LogRecord(
            timestamp=r.time_ns,
            observed_timestamp=observed,
            severity_number=number,
            severity_text=text,
            body=body,
            attributes={"cmk.event.id": r.id, "cmk.tenant": r.tenant},
            event_name=EVENT_NAME,
        )
        out.append(ReadableLogRecord(log, resource=resource, instrumentation_scope=scope))
    return out


class _PolicySession(requests.Session):
    """A ``requests.Session`` that sends through :class:`HttpsClient` and nothing else.

    The exporter hands it the encoded batch; ``requests``' own connection handling (its DNS,
    proxies, redirects, CA bundle) is never used. Any answer but 2xx raises the
    :class:`DeliveryError` the shared client maps it to, kept in ``last_error`` because
    exporters differ between SDK versions in whether they pass it on or only log it.
    """

    def __init__(self, client: HttpsClient, headers: Mapping[str, str]) -> None:
        super().__init__()
        self.trust_env = False  # no proxy or .netrc credentials from the environment
        self.max_redirects = 0
        self._client = client
        self._headers = dict(headers)
        self.last_error: DeliveryError | None = None

    @property
    def origin(self) -> str:
        """``https://host:port`` of the collector, for messages."""
        return self._client.origin

    def request(  # type: ignore[override]
        self,
        method: str | bytes,
        url: str | bytes,
        *args: Any,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        self.last_error = None
        sent = {k: v for k, v in (headers or {}).items() if k.lower() in _EXPORTER_HEADERS}
        sent.update(self._headers)
        try:
            if method != "POST" or args or not isinstance(data, bytes):
                raise DeliveryError("otlp_http: the exporter made an unexpected request")
            answer = self._client.post(data, sent)
            raise_for_status(answer, self._client)
        except DeliveryError as exc:
            self.last_error = exc
            raise
        response = requests.Response()
        response.status_code = answer.status
        response.reason = answer.reason
        response.headers = CaseInsensitiveDict(answer.headers)
        response._content = answer.body
        response.url = url if isinstance(url, str) else url.decode()
        return response


class OtlpHttpSink:
    """Exports batches as OTel log records with the SDK's OTLP/HTTP exporter.

    Args:
        exporter: The exporter, made with ``session=`` a :class:`_PolicySession`.
        session: That session.
        service_name: The resource's ``service.name``.
        max_batch: Records per request at most.
    """

    kind = KIND

    def __init__(
        self,
        exporter: OTLPLogExporter,
        session: _PolicySession,
        *,
        service_name: str,
        max_batch: int,
    ) -> None:
        self.max_batch = max_batch
        self._exporter = exporter
        self._session = session
        # Built from the spec alone: Resource.create would add OTEL_RESOURCE_ATTRIBUTES, the
        # application's own deployment details, to every tenant's logs.
        self._resource = Resource({"service.name": service_name})
        self._scope = InstrumentationScope("sqlalchemy_cmk.audit")

    def send(self, records: Sequence[Record]) -> None:
        """Export ``records`` as one OTLP request.

        Raises:
            DeliveryError: the collector did not take them, or the exporter failed before
                sending (then retryable: the SDK logged why).
        """
        if not records:
            return
        batch = log_records(records, self._resource, self._scope)
        self._session.last_error = None
        result = self._exporter.export(batch)
        if result is LogRecordExportResult.SUCCESS:
            return
        if self._session.last_error is not None:
            raise self._session.last_error
        raise DeliveryError(f"otlp_http {self._session.origin}: the exporter failed")

    def close(self) -> None:
        """Shut the exporter down (it closes the session)."""
        self._exporter.shutdown()  # type: ignore[no-untyped-call]  # the SDK leaves it untyped


def build(spec: Mapping[str, Any], env: SinkEnv) -> OtlpHttpSink:
    """The sink for a checked spec: the URL passes ``env.policy``, the headers are resolved.

    Raises:
        ConfigurationError: a refused URL or host, an unloadable ``ca_file`` or a header
            reference that cannot be resolved or is not a valid header value.
    """
    client = HttpsClient(
        spec["url"],
        policy=env.policy,
        timeout=spec["timeout"],
        ca_file=spec.get("ca_file"),
        what="otlp_http",
    )
    headers: dict[str, str] = {}
    for name, ref in spec["headers"].items():
        value = env.secret(ref)
        if any(c in value for c in b"\r\n\x00") or not value.isascii():
            raise ConfigurationError(
                f"otlp_http header {name!r} from {ref!r} is not a valid header value "
                "(line break or non-ASCII byte)"
            )
        headers[name] = value.decode("ascii")
    session = _PolicySession(client, headers)
    exporter = OTLPLogExporter(
        endpoint=spec["url"],
        timeout=spec["timeout"],
        compression=_COMPRESSION[spec["compression"]],
        session=session,
    )
    return OtlpHttpSink(
        exporter, session, service_name=spec["service_name"], max_batch=spec["max_batch"]
    )
