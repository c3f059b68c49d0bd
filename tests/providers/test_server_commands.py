"""The local Cloud KMS and Key Vault servers as a user's test suite runs them: as commands.

Each test starts ``python -m sqlalchemy_cmk.testing.<server>`` as another process, reads where
it serves from its first line(s), makes and revokes a key with the real SDK client (as the
tenant would), and checks that the provider, through ``CMK``, is refused afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import grpc
import pytest
import tomllib
from azure.keyvault.keys import KeyClient
from google.cloud import kms
from google.cloud.kms_v1.services.key_management_service.transports import (
    KeyManagementServiceGrpcTransport,
)
from google.protobuf import field_mask_pb2

from sqlalchemy_cmk import CMK, KeyAccessDeniedError, tenant_context
from sqlalchemy_cmk.providers.azure import AzureKeyVaultProvider
from sqlalchemy_cmk.providers.gcp import GcpKmsProvider
from sqlalchemy_cmk.testing import azure_keyvault, gcp_kms
from sqlalchemy_cmk.testing.azure_keyvault import StaticTokenCredential

from ._tenant_tools import doc_block

RING = "projects/tenant-project/locations/europe-west1/keyRings/cmk"
ROOT = Path(__file__).resolve().parents[2]


class Command:
    """A server command running in another process; :meth:`line` reads its standard output."""

    def __init__(self, module: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"sqlalchemy_cmk.testing.{module}", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def line(self) -> str:
        assert self.proc.stdout is not None
        out = self.proc.stdout.readline().strip()
        assert out, f"no output; stderr: {self._stderr()}"
        return out

    def _stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return "(still running)"
        return self.proc.stderr.read()

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        streams: tuple[IO[str] | None, ...] = (self.proc.stdout, self.proc.stderr)
        for stream in streams:
            if stream is not None:
                stream.close()


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield int(sock.getsockname()[1])


def _cmk(provider: object, key_ref: str) -> CMK:
    return CMK(provider, tenant_keys={"acme": key_ref}, audit_sinks=[])  # type: ignore[arg-type]


def _sealed_then_refused(cmk: CMK, revoke: object, restore: object | None = None) -> None:
    """Seal a document, revoke (``revoke()``), check the next read is refused; then restore."""
    with tenant_context("acme"):
        sealed = cmk.encrypt_document({"ssn": b"123-45-6789"})
        assert cmk.decrypt_document(sealed) == {"ssn": b"123-45-6789"}
        revoke()  # type: ignore[operator]
        cmk.forget_tenant("acme")  # or let cache_ttl run out
        with pytest.raises(KeyAccessDeniedError):
            cmk.decrypt_document(sealed)
        if restore is not None:
            restore()  # type: ignore[operator]
            assert cmk.decrypt_document(sealed) == {"ssn": b"123-45-6789"}


# -- Cloud KMS -----------------------------------------------------------------------------------


def test_gcp_command_serves_a_kms_that_refuses_a_disabled_key_version() -> None:
    server = Command("gcp_kms", "--port", "0", "--key", f"{RING}/cryptoKeys/made-at-start")
    client = None
    try:
        target = server.line()
        host, _, port = target.rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0
        # Another process, as an application's test suite would be: the real client library.
        client = kms.KeyManagementServiceClient(
            transport=KeyManagementServiceGrpcTransport(channel=grpc.insecure_channel(target))
        )
        client.create_key_ring(parent=RING.rsplit("/keyRings/", 1)[0], key_ring_id="cmk")
        key = client.create_crypto_key(
            parent=RING,
            crypto_key_id="acme",
            crypto_key=kms.CryptoKey(purpose=kms.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT),
        )
        assert key.primary.name == f"{RING}/cryptoKeys/acme/cryptoKeyVersions/1"

        def set_state(state: kms.CryptoKeyVersion.CryptoKeyVersionState) -> None:
            # What the tenant does: gcloud kms keys versions disable|enable.
            client.update_crypto_key_version(
                crypto_key_version=kms.CryptoKeyVersion(name=key.primary.name, state=state),
                update_mask=field_mask_pb2.FieldMask(paths=["state"]),
            )

        State = kms.CryptoKeyVersion.CryptoKeyVersionState
        provider = GcpKmsProvider(client, timeout=5)
        _sealed_then_refused(
            _cmk(provider, f"gcp-kms://{key.name}"),
            lambda: set_state(State.DISABLED),
            lambda: set_state(State.ENABLED),
        )
        # The key made by --key works too; an unknown key is refused as Cloud KMS refuses it.
        with tenant_context("acme"):
            _cmk(provider, f"gcp-kms://{RING}/cryptoKeys/made-at-start").encrypt_document(
                {"f": b"1"}
            )
            with pytest.raises(KeyAccessDeniedError):
                _cmk(provider, f"gcp-kms://{RING}/cryptoKeys/nobody").encrypt_document({"f": b"1"})
        assert server.terminate() == 0
    finally:
        if client is not None:
            client.transport.close()
        server.close()


def test_gcp_command_reports_a_port_in_use(busy_port: int) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_cmk.testing.gcp_kms", "--port", str(busy_port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == "" and done.stderr.startswith("error: ")
    assert "Traceback" not in done.stderr


def test_gcp_command_refuses_a_key_that_is_not_a_resource_name() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_cmk.testing.gcp_kms", "--key", "acme"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "not a CryptoKey resource name" in done.stderr


# -- Key Vault -----------------------------------------------------------------------------------


def test_azure_command_serves_a_vault_that_refuses_a_disabled_key() -> None:
    server = Command("azure_keyvault", "--port", "0", "--key", "made-at-start")
    try:
        url = server.line()
        ca_file = Path(server.line())
        assert url.startswith("https://127.0.0.1:") and int(url.rsplit(":", 1)[1]) > 0
        assert ca_file.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
        options = {"connection_verify": str(ca_file), "verify_challenge_resource": False}
        # The tenant's own tool: the real KeyClient (as `az keyvault key` would).
        tenant = KeyClient(url, StaticTokenCredential(), **options)
        created = tenant.create_rsa_key("acme")
        assert created.properties.enabled and created.id.startswith(f"{url}/keys/acme/")
        host = url.removeprefix("https://")
        with (
            tenant,
            AzureKeyVaultProvider.from_credential(StaticTokenCredential(), **options) as provider,
        ):
            _sealed_then_refused(
                _cmk(provider, f"azure-kv://{host}/keys/acme"),
                # Without a version: the latest one, as the portal and the CLI do.
                lambda: tenant.update_key_properties("acme", enabled=False),
                lambda: tenant.update_key_properties("acme", enabled=True),
            )
            assert tenant.get_key("made-at-start").properties.enabled
            with tenant_context("acme"):
                _cmk(provider, f"azure-kv://{host}/keys/made-at-start").encrypt_document(
                    {"f": b"1"}
                )
        assert server.terminate() == 0
        assert not ca_file.exists()  # its temporary directory went with it
    finally:
        server.close()


def test_azure_command_reports_a_port_in_use(busy_port: int) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_cmk.testing.azure_keyvault", "--port", str(busy_port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == "" and done.stderr.startswith("error: ")
    assert "Traceback" not in done.stderr


def test_azure_command_writes_the_ca_where_asked(tmp_path: Path) -> None:
    server = Command("azure_keyvault", "--ca-dir", str(tmp_path / "tls"))
    try:
        server.line()
        assert Path(server.line()) == tmp_path / "tls" / "ca.pem"
        assert server.terminate() == 0
        assert (tmp_path / "tls" / "ca.pem").exists()  # the user's directory is kept
    finally:
        server.close()


# -- packaging -----------------------------------------------------------------------------------


def _load_without(module: ModuleType, hidden: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, hidden, None)  # None in sys.modules: "not installed"
    assert module.__file__ is not None
    spec = importlib.util.spec_from_file_location(f"{module.__name__}_without", module.__file__)
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


@pytest.mark.parametrize(
    ("module", "hidden", "extra"),
    [
        (gcp_kms, "grpc", "gcp-testing"),
        (gcp_kms, "google.cloud.kms", "gcp-testing"),
        (azure_keyvault, "azure.keyvault.keys", "azure-testing"),
    ],
)
def test_import_error_names_the_extra(
    module: ModuleType, hidden: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ImportError, match=rf"needs {hidden}; .*sqlalchemy-cmk\[{extra}\]'"):
        _load_without(module, hidden, monkeypatch)


def test_the_extras_are_declared_with_test_packages_only() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]

    def packages(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        out: set[str] = set()
        for req in extras[name]:
            if req.startswith("sqlalchemy-cmk["):
                for inner in req.removeprefix("sqlalchemy-cmk[").rstrip("]").split(","):
                    if inner not in seen:
                        out |= packages(inner, seen | {name})
            else:
                out.add(req)
        return out

    assert packages("gcp-testing") == {*extras["gcp"], "grpcio>=1.60"}
    assert packages("azure-testing") == set(extras["azure"])
    assert packages("gcp-testing") | packages("azure-testing") <= packages("test")


# -- the documentation ---------------------------------------------------------------------------


def _doc_test(page: str) -> None:
    """Run the page's example test function, as the user's pytest would."""
    namespace: dict[str, Any] = {}
    code = doc_block(page, "python", "def test_a_tenant_who_disables_its_key_is_refused")
    exec(compile(code, page, "exec"), namespace)
    namespace["test_a_tenant_who_disables_its_key_is_refused"]()


def _doc_command(page: str, module: str) -> Command:
    """The page's ``python -m`` command, started with ``--port 0`` as written."""
    block = doc_block(page, "sh", f"sqlalchemy_cmk.testing.{module}")
    argv = shlex.split(block.replace("\\\n", " "))  # line continuations
    assert argv[:3] == ["python", "-m", f"sqlalchemy_cmk.testing.{module}"]
    return Command(module, *argv[3:])


def test_docs_gcp_example_test_passes() -> None:
    _doc_test("gcp.md")


def test_docs_gcp_command_and_client_make_and_revoke_keys() -> None:
    server = _doc_command("gcp.md", "gcp_kms")
    try:
        target = server.line()
        code = doc_block("gcp.md", "python", "create_crypto_key")
        namespace: dict[str, Any] = {}
        exec(compile(code.replace("127.0.0.1:50051", target), "gcp.md", "exec"), namespace)
        client = namespace["client"]
        try:
            provider = GcpKmsProvider(client, timeout=5)
            ring = "projects/acme-prod/locations/europe-west1/keyRings/saas-cmk"
            with tenant_context("acme"):  # the --key made at start serves
                _cmk(provider, f"gcp-kms://{ring}/cryptoKeys/app-data").encrypt_document(
                    {"f": b"1"}
                )
                with pytest.raises(KeyAccessDeniedError):  # "orders", disabled by the block
                    _cmk(provider, f"gcp-kms://{ring}/cryptoKeys/orders").encrypt_document(
                        {"f": b"1"}
                    )
        finally:
            client.transport.close()
        assert server.terminate() == 0
    finally:
        server.close()


def test_docs_azure_example_test_passes() -> None:
    _doc_test("azure.md")


def test_docs_azure_command_and_curl_revoke_a_key() -> None:
    if shutil.which("curl") is None and not os.environ.get("CI"):
        pytest.skip("curl is not installed")
    server = _doc_command("azure.md", "azure_keyvault")
    try:
        url, ca_file = server.line(), server.line()
        options = {"connection_verify": ca_file, "verify_challenge_resource": False}
        host = url.removeprefix("https://")
        with AzureKeyVaultProvider.from_credential(StaticTokenCredential(), **options) as provider:
            cmk = _cmk(provider, f"azure-kv://{host}/keys/acme")  # made by --key acme
            with tenant_context("acme"):
                sealed = cmk.encrypt_document({"f": b"1"})
                done = subprocess.run(
                    ["bash", "-c", doc_block("azure.md", "sh", "curl")],
                    env={**os.environ, "URL": url, "CA": ca_file},
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                assert done.returncode == 0, done.stderr
                assert json.loads(done.stdout)["attributes"]["enabled"] is False
                cmk.forget_tenant("acme")
                with pytest.raises(KeyAccessDeniedError):
                    cmk.decrypt_document(sealed)
        assert server.terminate() == 0
    finally:
        server.close()
