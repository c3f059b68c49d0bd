"""The cloudwatch sink on the credentials a production host has: an ECS task role and an EC2
instance role (IMDSv2), each served on loopback where the SDK's own settings point it
(``AWS_CONTAINER_CREDENTIALS_FULL_URI``, ``AWS_EC2_METADATA_SERVICE_ENDPOINT``), with the task
role's temporary credentials renewed as they near their expiry. The sink makes its own client,
as in production; moto's CloudWatch Logs records which key signed each call."""

from __future__ import annotations

import datetime
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sqlalchemy_cmk.sinks import SinkEnv, build_sink
from tests.audit.test_sinks_cloud import LOOPBACK, _cw_group, _cw_read, _records
from tests.audit.test_sinks_cloud import dce as dce  # a fixture, used by name
from tests.audit.test_sinks_cloud import moto_logs as moto_logs  # a fixture, used by name

pytest.importorskip("boto3")

ROLE = "cmk-audit-writer"
TASK_TOKEN = "task-auth-token"
IMDS_TOKEN = "imds-session-token"


class CredentialServer:
    """The ECS container credentials endpoint and EC2's IMDSv2, each issuing a new temporary key
    per request (``ASIATASK1``, ``ASIAIMDS1``...) that expires ``lifetime`` from now."""

    def __init__(self, lifetime: datetime.timedelta) -> None:
        self.lifetime = lifetime
        self.issued: list[str] = []
        self.refused: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                if self.path == "/latest/api/token" and ttl:
                    self._send(200, IMDS_TOKEN.encode(), "text/plain")
                else:
                    owner.refused.append(self.path)
                    self._send(400, b"")

            def do_GET(self) -> None:
                if self.path == "/task-credentials":
                    if self.headers.get("Authorization") != TASK_TOKEN:
                        owner.refused.append(self.path)
                        return self._send(403, b"{}")
                    return self._send(200, owner.key("TASK"))
                if self.headers.get("X-aws-ec2-metadata-token") != IMDS_TOKEN:
                    owner.refused.append(self.path)
                    return self._send(401, b"")
                base = "/latest/meta-data/iam/security-credentials/"
                if self.path == base:
                    return self._send(200, ROLE.encode(), "text/plain")
                if self.path == base + ROLE:
                    return self._send(200, owner.key("IMDS"))
                owner.refused.append(self.path)
                self._send(404, b"")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def key(self, source: str) -> bytes:
        key = f"ASIA{source}{len(self.issued) + 1}"
        self.issued.append(key)
        expires = datetime.datetime.now(datetime.timezone.utc) + self.lifetime
        return json.dumps(
            {
                "Code": "Success",
                "Type": "AWS-HMAC",
                "AccessKeyId": key,
                "SecretAccessKey": "testing",
                "Token": f"session-{key}",
                "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        ).encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def no_static_credentials(tmp_path: Path, moto_logs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing earlier in boto3's chain than the role: no keys in the environment, no files."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        "AWS_EC2_METADATA_DISABLED",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CA_BUNDLE", str(moto_logs.ca_file))


def _put_keys(moto_logs: Any) -> list[str]:
    return [key for op, key in moto_logs.targets if op == "PutLogEvents"]


@pytest.fixture
def credentials() -> Iterator[CredentialServer]:
    # Inside botocore's advisory refresh window (15 minutes): each use renews the key.
    server = CredentialServer(datetime.timedelta(minutes=12))
    yield server
    server.close()


@pytest.mark.usefixtures("no_static_credentials")
@pytest.mark.parametrize("source", ["task", "instance"])
def test_cloudwatch_signs_with_the_hosts_role_and_renews_it(
    source: str, credentials: CredentialServer, moto_logs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    if source == "task":
        monkeypatch.setenv(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI", credentials.url + "/task-credentials"
        )
        monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", TASK_TOKEN)
    else:
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", credentials.url + "/")
    spec, logs = _cw_group(moto_logs)
    spec["endpoint_url"] = moto_logs.url
    sink = build_sink(spec, SinkEnv(policy=LOOPBACK))
    before = len(_put_keys(moto_logs))
    records = _records(4)
    sink.send(records[:2])
    sink.send(records[2:])
    sink.close()
    assert [e["message"].encode() for e in _cw_read(logs, spec)] == [r.body for r in records]
    used = _put_keys(moto_logs)[before:]
    prefix = "ASIATASK" if source == "task" else "ASIAIMDS"
    assert len(used) == 2 and all(key.startswith(prefix) for key in used), used
    if source == "task":
        assert used[0] != used[1], "the expiring key was not renewed"
    # (An instance role's key near its expiry is not renewed at once: botocore extends it by
    # 12-20 minutes first, for when IMDS is down, so a test cannot tell when it renews.)
    assert credentials.refused == []


# -- azure_monitor: a managed identity -----------------------------------------------------------


class ManagedIdentity:
    """App Service's managed identity endpoint (``IDENTITY_ENDPOINT``, API 2019-08-01): a token
    for the resource asked, to a caller that presents ``IDENTITY_HEADER``."""

    def __init__(self, token: str) -> None:
        self.requests: list[dict[str, str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                from urllib.parse import parse_qsl, urlsplit

                query = dict(parse_qsl(urlsplit(self.path).query))
                owner.requests.append(query)
                if self.headers.get("X-IDENTITY-HEADER") != IDENTITY_HEADER:
                    body, status = b'{"error":"bad header"}', 401
                else:
                    expires = int(datetime.datetime.now().timestamp()) + 3600
                    body = json.dumps(
                        {
                            "access_token": token,
                            "expires_on": str(expires),
                            "resource": query.get("resource", ""),
                            "token_type": "Bearer",
                        }
                    ).encode()
                    status = 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/msi/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


IDENTITY_HEADER = "identity-header-secret"


@pytest.mark.parametrize("assigned", ["system", "user"])
def test_azure_uploads_with_the_hosts_managed_identity(
    assigned: str, dce: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No secret in the spec: azure-identity's default chain finds the workload's managed
    identity (system-assigned, or the user-assigned one ``client_id`` names)."""
    import uuid

    from tests.audit._azure_dce import CLIENT_ID
    from tests.audit.test_sinks_cloud import _az_rows, _az_spec

    for name in (
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
        "AZURE_CLIENT_SECRET",
        "AZURE_CLIENT_CERTIFICATE_PATH",
        "AZURE_USERNAME",
        "AZURE_FEDERATED_TOKEN_FILE",
        "MSI_ENDPOINT",
        "MSI_SECRET",
        "IDENTITY_SERVER_THUMBPRINT",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no Azure CLI or shared token cache to find
    identity = ManagedIdentity(dce.token)
    monkeypatch.setenv("IDENTITY_ENDPOINT", identity.url)
    monkeypatch.setenv("IDENTITY_HEADER", IDENTITY_HEADER)
    spec = _az_spec(dce)
    for name in ("tenant_id", "client_secret", "authority_host"):
        del spec[name]
    if assigned == "system":
        del spec["client_id"]
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    env = SinkEnv(policy=LOOPBACK, clients={"azure_monitor": {"connection_verify": dce.ca_file}})
    sink = build_sink(spec, env)
    records = _records(3, tenant=tenant)
    try:
        sink.send(records)
    finally:
        sink.close()
        identity.close()
    assert [r["Body"].encode() for r in _az_rows(dce, tenant)] == [r.body for r in records]
    (asked,) = identity.requests
    assert asked["resource"] == "https://monitor.azure.com"
    assert asked.get("client_id") == (CLIENT_ID if assigned == "user" else None)
