"""moto's CloudWatch Logs (and STS) over HTTPS on loopback, with injected faults.

moto's server app behind a small WSGI layer that answers the next ``PutLogEvents`` calls with
an error instead (throttling, a 5xx, access denied), the way :class:`LocalKms` injects KMS
faults. HTTPS with a throwaway CA, because the sink's ``endpoint_url`` must be https.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from sqlalchemy_cmk.testing._support import make_tls

REGION = "eu-west-1"
CREDS = {"aws_access_key_id": "AKIATESTTESTTEST", "aws_secret_access_key": "testing"}


class _Faults:
    def __init__(self, owner: MotoLogs, app: Any) -> None:
        self.owner = owner
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        auth = environ.get("HTTP_AUTHORIZATION", "")
        access_key = auth.partition("Credential=")[2].partition("/")[0]
        self.owner.targets.append((target.rpartition(".")[2], access_key))
        if target.endswith(".PutLogEvents") and self.owner.faults:
            status, code = self.owner.faults.popleft()
            body = json.dumps({"__type": code, "message": "injected"}).encode()
            start_response(
                f"{status} Injected",
                [
                    ("Content-Type", "application/x-amz-json-1.1"),
                    ("Content-Length", str(len(body))),
                ],
            )
            return [body]
        return self.app(environ, start_response)


class MotoLogs:
    """``https://127.0.0.1:<port>``; ``start``/``stop`` (again, on the same port)."""

    def __init__(self, directory: Path) -> None:
        self.context, self.ca_file = make_tls(directory, "127.0.0.1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.faults: deque[tuple[int, str]] = deque()
        self.targets: list[tuple[str, str]] = []  # (X-Amz-Target's operation, access key)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        logging.getLogger("werkzeug").setLevel(logging.WARNING)

    def start(self) -> MotoLogs:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        app = _Faults(self, DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            "127.0.0.1",
            self.port,
            app,
            threaded=True,
            request_handler=MotoRequestHandler,
            ssl_context=self.context,
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join()
        self._server = self._thread = None

    def client(self, service: str = "logs") -> Any:
        return boto3.session.Session(region_name=REGION, **CREDS).client(
            service,
            endpoint_url=self.url,
            verify=str(self.ca_file),
            config=Config(connect_timeout=2, read_timeout=5, retries={"total_max_attempts": 1}),
        )
