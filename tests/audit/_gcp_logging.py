"""A local Cloud Logging ``LoggingServiceV2.WriteLogEntries`` over gRPC on loopback.

There is no Cloud Logging emulator. This speaks the real wire protocol with the client
library's own message types (as ``sqlalchemy_cmk.testing.gcp_kms`` does for Cloud KMS), so the
real ``LoggingServiceV2Client`` talks to it over an insecure channel. It does what the service
does with a write that the sink relies on: entries are stored in request order, a second entry
with the same ``insert_id`` and timestamp in a log is dropped (Cloud Logging's de-duplication),
a request with ``partial_success`` off is all or nothing (an entry without a payload refuses
the whole request with INVALID_ARGUMENT), and a log name outside ``allowed_projects`` is
PERMISSION_DENIED. :meth:`LoggingServer.fail` answers the next calls with a status instead.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent import futures
from typing import Any

import grpc
from google.cloud.logging_v2.services.logging_service_v2 import LoggingServiceV2Client
from google.cloud.logging_v2.services.logging_service_v2.transports import (
    LoggingServiceV2GrpcTransport,
)
from google.cloud.logging_v2.types import (
    LogEntry,
    WriteLogEntriesRequest,
    WriteLogEntriesResponse,
)

SERVICE = "google.logging.v2.LoggingServiceV2"


class LoggingServer:
    """``127.0.0.1:<port>``; ``start``/``stop`` (again, on the same port)."""

    def __init__(self, allowed_projects: set[str]) -> None:
        self.allowed_projects = allowed_projects
        self.entries: list[tuple[str, LogEntry]] = []  # (log_name, entry) as stored
        self.requests: list[WriteLogEntriesRequest] = []
        self.faults: deque[grpc.StatusCode] = deque()
        self.port = 0
        self._lock = threading.Lock()
        self._server: Any = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> LoggingServer:
        server = grpc.server(
            futures.ThreadPoolExecutor(4, thread_name_prefix="fake-logging"),
            options=[("grpc.so_reuseport", 0)],
        )
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "WriteLogEntries": grpc.unary_unary_rpc_method_handler(
                            self._write,
                            request_deserializer=WriteLogEntriesRequest.deserialize,
                            response_serializer=WriteLogEntriesResponse.serialize,
                        )
                    },
                ),
            )
        )
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert port, "could not bind"
        self.port = port
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def client(self) -> Any:
        """The real GAPIC client on an insecure channel that reconnects quickly."""
        channel = grpc.insecure_channel(
            self.address,
            options=[
                ("grpc.initial_reconnect_backoff_ms", 50),
                ("grpc.min_reconnect_backoff_ms", 50),
                ("grpc.max_reconnect_backoff_ms", 100),
            ],
        )
        return LoggingServiceV2Client(transport=LoggingServiceV2GrpcTransport(channel=channel))

    def fail(self, code: grpc.StatusCode, times: int = 1) -> None:
        self.faults.extend([code] * times)

    def logged(self, log_name: str) -> list[LogEntry]:
        with self._lock:
            return [e for name, e in self.entries if name == log_name]

    def _write(self, request: WriteLogEntriesRequest, ctx: grpc.ServicerContext) -> Any:
        with self._lock:
            self.requests.append(request)
            if self.faults:
                ctx.abort(self.faults.popleft(), "injected")
            stored = []
            for entry in request.entries:
                merged = LogEntry(entry)
                merged.log_name = entry.log_name or request.log_name
                if not entry.resource.type:
                    merged.resource = request.resource
                for k, v in request.labels.items():
                    if k not in merged.labels:
                        merged.labels[k] = v
                project = merged.log_name.split("/")[1] if "/" in merged.log_name else ""
                if project not in self.allowed_projects:
                    ctx.abort(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"Permission 'logging.logEntries.create' denied on resource "
                        f"(or it may not exist): {merged.log_name}",
                    )
                if not (merged.text_payload or merged.json_payload or merged.proto_payload):
                    if not request.partial_success:
                        ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "Log entry has no payload")
                    continue
                stored.append(merged)
            for merged in stored:
                key = (merged.log_name, merged.insert_id, merged.timestamp)
                if merged.insert_id and any(
                    (n, e.insert_id, e.timestamp) == key for n, e in self.entries
                ):
                    continue  # Cloud Logging's de-duplication
                self.entries.append((merged.log_name, merged))
        return WriteLogEntriesResponse()
