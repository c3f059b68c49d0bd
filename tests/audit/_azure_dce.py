"""A local Azure Monitor data collection endpoint, and the Entra token endpoint in front of it.

HTTPS on loopback with a throwaway CA (``sqlalchemy_cmk.testing._support.make_tls``, as the
local Key Vault does), so the real ``LogsIngestionClient`` and azure-identity's
``ClientSecretCredential`` (``authority=`` this server, instance discovery off) talk to it:

- ``GET /<tenant>/v2.0/.well-known/openid-configuration`` and
  ``POST /<tenant>/oauth2/v2.0/token`` (client credentials): a token for the one service
  principal whose client id and secret match, else ``401 invalid_client`` as Entra answers;
- ``POST /dataCollectionRules/<rule>/streams/<stream>?api-version=...``: the Logs Ingestion
  API. Without the token: 401; a rule the identity has no role on: 403; a stream the DCR does
  not declare: 400 ``InvalidStream``; else the gzipped JSON rows are stored and 204 answered.

:attr:`DceServer.faults` answers the next ingestion calls with a status (and headers) instead.
"""

from __future__ import annotations

import gzip
import json
import re
import tempfile
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sqlalchemy_cmk.testing._support import make_tls

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "0b2c3d4e-0000-4000-8000-00000000c0de"
CLIENT_SECRET = "not-a-real-secret-for-the-local-entra"
RULE = "dcr-" + "0123456789abcdef" * 2
STREAM = "Custom-CmkAudit"
_INGEST = re.compile(r"^/dataCollectionRules/(?P<rule>[^/]+)/streams/(?P<stream>[^/]+)$")


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, {"error": {"code": code, "message": code}}, headers)

    def do_GET(self) -> None:
        dce = self.server.dce
        if self.path == f"/{TENANT}/v2.0/.well-known/openid-configuration":
            base = dce.url
            self._send(
                200,
                {
                    "token_endpoint": f"{base}/{TENANT}/oauth2/v2.0/token",
                    "authorization_endpoint": f"{base}/{TENANT}/oauth2/v2.0/authorize",
                    "issuer": f"{base}/{TENANT}/v2.0",
                },
            )
        else:
            self._error(404, "NotFound")

    def do_POST(self) -> None:
        dce = self.server.dce
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urlsplit(self.path).path
        if path == f"/{TENANT}/oauth2/v2.0/token":
            form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
            dce.token_requests.append(form.get("scope", ""))
            if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
                self._send(401, {"error": "invalid_client", "error_description": "AADSTS7000215"})
                return
            self._send(200, {"token_type": "Bearer", "expires_in": 3600, "access_token": dce.token})
            return
        match = _INGEST.match(path)
        if match is None:
            self._error(404, "NotFound")
            return
        if self.headers.get("Authorization") != f"Bearer {dce.token}":
            self._error(401, "InvalidToken")
            return
        with dce.lock:
            fault = dce.faults.popleft() if dce.faults else None
        if fault is not None:
            self._error(fault[0], "Injected", fault[1])
            return
        if match["rule"] != RULE:
            self._error(403, "OperationFailed")
            return
        if match["stream"] != STREAM:
            self._error(400, "InvalidStream")
            return
        if self.headers.get("Content-Encoding") == "gzip":
            raw = gzip.decompress(raw)
        with dce.lock:
            dce.rows.extend(json.loads(raw))
        self._send(204)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    dce: DceServer

    def get_request(self) -> Any:
        sock, address = super().get_request()
        tls = self.dce.context
        return tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class DceServer:
    """``https://127.0.0.1:<port>``: ``start``/``stop`` (again, on the same port)."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="cmk-dce-")
        self.context, ca = make_tls(Path(self._dir.name), "127.0.0.1")
        self.ca_file = str(ca)
        self.token = f"dce-token-{time.time_ns()}"
        self.rows: list[dict[str, Any]] = []
        self.faults: deque[tuple[int, dict[str, str]]] = deque()
        self.token_requests: list[str] = []
        self.lock = threading.Lock()
        self.port = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> DceServer:
        self._server = _Server(("127.0.0.1", self.port), _Handler)
        self._server.dce = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(5)
        self._server = None

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()
