"""The Google Cloud KMS provider, with the real client library against a local KMS gRPC server.

The server (``sqlalchemy_cmk.testing.gcp_kms``) implements
``google.cloud.kms.v1.KeyManagementService`` with the library's own message types and real
AES-256-GCM; the client is the real ``KeyManagementServiceClient`` over an insecure loopback
channel (an ``api_endpoint`` alone would make it use TLS). Nothing leaves 127.0.0.1: ADC and
the metadata server are fenced off.
"""

from __future__ import annotations

import datetime
import importlib
import json
import logging
import os
import re
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry, if_exception_type
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import kms
from google.cloud.kms_v1.services.key_management_service.transports import (
    KeyManagementServiceGrpcTransport,
)
from google.protobuf import field_mask_pb2

from sqlalchemy_cmk import CMK, tenant_context
from sqlalchemy_cmk.errors import (
    ConfigurationError,
    DecryptionError,
    KeyAccessDeniedError,
    KeyNotFoundError,
    KMSUnavailableError,
)
from sqlalchemy_cmk.providers.gcp import GcpKmsProvider
from sqlalchemy_cmk.testing.contract import KeyProviderContract
from sqlalchemy_cmk.testing.gcp_kms import CORRUPTIONS, KmsServer, State

ACME = {"tenant": "acme"}
RING = "projects/tenant-project/locations/europe-west1/keyRings/cmk"


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _no_google_cloud() -> Iterator[None]:
    """Keep google.auth away from the metadata server, gcloud's config and real credentials."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NO_GCE_CHECK", "true")
        mp.setenv("GCE_METADATA_HOST", "127.0.0.1:9")  # discard port: any probe stays local
        mp.setenv("GCE_METADATA_IP", "127.0.0.1:9")
        mp.setenv("GOOGLE_CLOUD_PROJECT", "tenant-project")
        mp.setenv("CLOUDSDK_CONFIG", os.devnull)
        mp.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
        mp.delenv("GOOGLE_SDK_PYTHON_LOGGING_SCOPE", raising=False)

        def no_adc(*args: object, **kwargs: object) -> None:
            raise AssertionError("a test asked for Application Default Credentials")

        mp.setattr("google.auth.default", no_adc)
        yield


@pytest.fixture(scope="session")
def kms_server() -> Iterator[KmsServer]:
    server = KmsServer()
    try:
        server.start()
    except Exception as exc:
        server.stop()
        msg = f"the local Cloud KMS gRPC server did not start: {exc!r}"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI is set: the GCP provider tests must run)")
        pytest.skip(msg)
    yield server
    server.stop()


def _client(address: str, *interceptors: grpc.UnaryUnaryClientInterceptor) -> Any:
    channel = grpc.insecure_channel(address)
    if interceptors:
        channel = grpc.intercept_channel(channel, *interceptors)
    return kms.KeyManagementServiceClient(
        transport=KeyManagementServiceGrpcTransport(channel=channel)
    )


@pytest.fixture(scope="session")
def kms_client(kms_server: KmsServer) -> Iterator[Any]:
    client = _client(kms_server.address)
    yield client
    client.transport.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def key_name(kms_server: KmsServer) -> str:
    """A fresh CryptoKey per test, so faults and states never leak between tests."""
    return kms_server.add_key(f"{RING}/cryptoKeys/k-{uuid.uuid4().hex[:10]}")


def _set_state(client: Any, key_ref: str, state: Any, version: int = 1) -> None:
    # What the tenant does: gcloud kms keys versions disable|enable, i.e. this RPC.
    name = key_ref.removeprefix("gcp-kms://")
    client.update_crypto_key_version(
        crypto_key_version=kms.CryptoKeyVersion(
            name=f"{name}/cryptoKeyVersions/{version}", state=state
        ),
        update_mask=field_mask_pb2.FieldMask(paths=["state"]),
        timeout=5,
    )


class TestGcpKmsContract(KeyProviderContract):
    @pytest.fixture
    def provider(self, kms_client: Any) -> GcpKmsProvider:
        return GcpKmsProvider(kms_client, timeout=5)

    @pytest.fixture
    def key_ref(self, key_name: str) -> str:
        return f"gcp-kms://{key_name}"

    @pytest.fixture
    def missing_key_ref(self) -> str:
        return f"gcp-kms://{RING}/cryptoKeys/nobody"

    @pytest.fixture
    def revoke(self, kms_client: Any) -> Callable[[str], None]:
        return lambda ref: _set_state(kms_client, ref, State.DISABLED)

    @pytest.fixture
    def restore(self, kms_client: Any) -> Callable[[str], None]:
        return lambda ref: _set_state(kms_client, ref, State.ENABLED)

    @pytest.fixture
    def unavailable_provider(self) -> Iterator[GcpKmsProvider]:
        client = _client(f"127.0.0.1:{_free_port()}")
        yield GcpKmsProvider(client, timeout=2)
        client.transport.close()

    def test_unknown_key(self, provider: GcpKmsProvider, missing_key_ref: str) -> None:  # type: ignore[override]
        # Cloud KMS answers an unknown key with PERMISSION_DENIED "(or it may not exist)", never
        # NOT_FOUND: the provider cannot tell a missing key from a missing grant, and says so.
        with pytest.raises(KeyAccessDeniedError, match="not found or no permission") as info:
            provider.wrap_key(missing_key_ref, os.urandom(32), ACME)
        assert isinstance(info.value.__cause__, gexc.PermissionDenied)
        assert "(or it may not exist)" in str(info.value.__cause__)


@pytest.fixture
def provider(kms_client: Any) -> GcpKmsProvider:
    return GcpKmsProvider(kms_client, timeout=5)


@pytest.fixture
def key_ref(key_name: str) -> str:
    return f"gcp-kms://{key_name}"


def _parse(wrapped: bytes) -> tuple[bytes, bytes]:
    """The documented layout: version | AAD length (u16 BE) | AAD | Cloud KMS ciphertext."""
    version, n = struct.unpack_from(">BH", wrapped)
    assert version == 1
    return wrapped[3 : 3 + n], wrapped[3 + n :]


def _forge(wrapped: bytes, context: dict[str, str]) -> bytes:
    """Record another context in front of the same KMS ciphertext, well formed."""
    _, ciphertext = _parse(wrapped)
    aad = json.dumps(
        ["sqlalchemy-cmk/gcp-kms/v1", context], sort_keys=True, separators=(",", ":")
    ).encode()
    return struct.pack(">BH", 1, len(aad)) + aad + ciphertext


# -- the wrapped format and the AAD ------------------------------------------------------------


def test_wrapped_layout_records_the_context(provider: GcpKmsProvider, key_ref: str) -> None:
    dek = os.urandom(32)
    wrapped = provider.wrap_key(key_ref, dek, {"tenant": "acme", "data_label": "PHI"})
    aad, ciphertext = _parse(wrapped)
    assert json.loads(aad) == ["sqlalchemy-cmk/gcp-kms/v1", {"data_label": "PHI", "tenant": "acme"}]
    assert ciphertext and dek not in wrapped


def test_wrapped_format_known_answer(provider: GcpKmsProvider, key_ref: str) -> None:
    """Pins the v1 layout and AAD encoding: stored wrapped keys must keep unwrapping."""
    from sqlalchemy_cmk.providers.gcp import _aad, _decode, _encode

    aad = _aad({"tenant": "açme", "data_label": "PHI"})
    assert aad == b'["sqlalchemy-cmk/gcp-kms/v1",{"data_label":"PHI","tenant":"a\\u00e7me"}]'
    vector = bytes.fromhex("010047") + aad + b"\x0a\x01kms-ciphertext"
    assert _encode(aad, b"\x0a\x01kms-ciphertext") == vector
    assert _decode(vector, "açme") == (aad, b"\x0a\x01kms-ciphertext")
    with pytest.raises(ValueError):
        _decode(vector, "acme")


def test_kms_saw_tenant_and_label_as_aad(
    provider: GcpKmsProvider, key_ref: str, kms_server: KmsServer, key_name: str
) -> None:
    wrapped = provider.wrap_key(key_ref, os.urandom(32), {"tenant": "acme", "data_label": "PHI"})
    assert json.loads(kms_server.last_aad[key_name])[1] == {"tenant": "acme", "data_label": "PHI"}
    provider.unwrap_key(key_ref, wrapped, ACME)  # unwrap sends the recorded AAD back
    assert json.loads(kms_server.last_aad[key_name])[1] == {"tenant": "acme", "data_label": "PHI"}


@pytest.mark.parametrize(
    "forged",
    [{"tenant": "globex"}, {"tenant": "acme"}, {"tenant": "acme", "data_label": "PII"}],
    ids=["other-tenant", "label-dropped", "label-changed"],
)
def test_the_kms_binds_the_aad(
    provider: GcpKmsProvider, key_ref: str, forged: dict[str, str]
) -> None:
    """A well-formed record of another context passes our checks and is refused by the KMS."""
    dek = os.urandom(32)
    wrapped = provider.wrap_key(key_ref, dek, {"tenant": "acme", "data_label": "PHI"})
    with pytest.raises(DecryptionError) as info:
        provider.unwrap_key(key_ref, _forge(wrapped, forged), {"tenant": forged["tenant"]})
    assert isinstance(info.value.__cause__, gexc.InvalidArgument)  # the KMS said no
    assert dek.hex() not in str(info.value)


def test_recorded_tenant_is_checked_before_calling_the_kms(
    provider: GcpKmsProvider, key_ref: str, kms_server: KmsServer, key_name: str
) -> None:
    wrapped = provider.wrap_key(key_ref, os.urandom(32), ACME)
    calls = kms_server.calls[f"Decrypt:{key_name}"]
    with pytest.raises(DecryptionError):
        provider.unwrap_key(key_ref, wrapped, {"tenant": "globex"})
    assert kms_server.calls[f"Decrypt:{key_name}"] == calls


@pytest.mark.parametrize(
    "record",
    [
        b'["sqlalchemy-cmk/gcp-kms/v1", {"tenant": "acme"}]',  # not canonical
        b'["sqlalchemy-cmk/gcp-kms/v2",{"tenant":"acme"}]',
        b'["sqlalchemy-cmk/gcp-kms/v1",{"n":1,"tenant":"acme"}]',
        b'{"tenant":"acme"}',
        b"[" * 60000,  # deep nesting: RecursionError in the JSON parser
        b"\xff",
    ],
    ids=["spaces", "label", "non-str", "object", "deep", "not-utf8"],
)
def test_bad_records_are_refused(provider: GcpKmsProvider, key_ref: str, record: bytes) -> None:
    wrapped = provider.wrap_key(key_ref, os.urandom(32), ACME)
    _, ciphertext = _parse(wrapped)
    with pytest.raises(DecryptionError):
        provider.unwrap_key(key_ref, struct.pack(">BH", 1, len(record)) + record + ciphertext, ACME)


# -- CRC32C integrity, both directions ---------------------------------------------------------


@pytest.mark.parametrize(
    "what", [c for c in CORRUPTIONS if c not in ("plaintext", "plaintext_crc32c")]
)
def test_tampered_encrypt_response_is_detected(
    provider: GcpKmsProvider, key_ref: str, kms_server: KmsServer, key_name: str, what: str
) -> None:
    kms_server.corrupt(key_name, what)
    dek = os.urandom(32)
    with pytest.raises(KMSUnavailableError) as info:
        provider.wrap_key(key_ref, dek, ACME)
    assert info.value.retryable
    assert dek.hex() not in str(info.value)


@pytest.mark.parametrize("what", ["plaintext", "plaintext_crc32c"])
def test_tampered_decrypt_response_is_detected(
    provider: GcpKmsProvider, key_ref: str, kms_server: KmsServer, key_name: str, what: str
) -> None:
    dek = os.urandom(32)
    wrapped = provider.wrap_key(key_ref, dek, ACME)
    kms_server.corrupt(key_name, what)
    with pytest.raises(KMSUnavailableError) as info:
        provider.unwrap_key(key_ref, wrapped, ACME)
    assert dek.hex() not in str(info.value)
    kms_server.corrupt(key_name, None)
    assert provider.unwrap_key(key_ref, wrapped, ACME) == dek


class _FlipInFlight(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Flips a bit of the request payload after the provider computed its checksum."""

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        request = type(request).deserialize(type(request).serialize(request))
        for field in ("plaintext", "ciphertext"):
            if field in type(request).meta.fields and getattr(request, field):
                data = getattr(request, field)
                setattr(request, field, data[:-1] + bytes([data[-1] ^ 1]))
        return continuation(details, request)


def test_request_corrupted_in_transit_is_unavailable(
    kms_server: KmsServer, provider: GcpKmsProvider, key_ref: str
) -> None:
    wrapped = provider.wrap_key(key_ref, os.urandom(32), ACME)
    client = _client(kms_server.address, _FlipInFlight())
    try:
        flipping = GcpKmsProvider(client, timeout=5)
        with pytest.raises(KMSUnavailableError, match="in transit") as info:
            flipping.wrap_key(key_ref, os.urandom(32), ACME)
        assert isinstance(info.value.__cause__, gexc.InvalidArgument)
        with pytest.raises(KMSUnavailableError, match="in transit"):
            flipping.unwrap_key(key_ref, wrapped, ACME)
    finally:
        client.transport.close()


# -- revocation --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["disable", "destroy", "iam"])
def test_revocation_is_access_denied(
    provider: GcpKmsProvider,
    kms_client: Any,
    kms_server: KmsServer,
    key_name: str,
    key_ref: str,
    how: str,
) -> None:
    dek = os.urandom(32)
    wrapped = provider.wrap_key(key_ref, dek, ACME)
    if how == "disable":
        _set_state(kms_client, key_ref, State.DISABLED)
    elif how == "destroy":
        kms_client.destroy_crypto_key_version(name=f"{key_name}/cryptoKeyVersions/1", timeout=5)
    else:
        kms_server.deny(key_name)
    for call in (
        lambda: provider.unwrap_key(key_ref, wrapped, ACME),
        lambda: provider.wrap_key(key_ref, os.urandom(32), ACME),
    ):
        with pytest.raises(KeyAccessDeniedError) as info:
            call()
        expected = gexc.PermissionDenied if how == "iam" else gexc.FailedPrecondition
        assert isinstance(info.value.__cause__, expected)
        assert info.value.provider == "gcp-kms" and info.value.key_ref == key_ref
    if how == "destroy":  # within the destroy-scheduled window the tenant can undo it
        kms_client.restore_crypto_key_version(name=f"{key_name}/cryptoKeyVersions/1", timeout=5)
        _set_state(kms_client, key_ref, State.ENABLED)
    elif how == "iam":
        kms_server.allow(key_name)
    else:
        _set_state(kms_client, key_ref, State.ENABLED)
    assert provider.unwrap_key(key_ref, wrapped, ACME) == dek


def test_rotation_old_versions_still_unwrap_until_disabled(
    provider: GcpKmsProvider, kms_client: Any, kms_server: KmsServer, key_name: str, key_ref: str
) -> None:
    old_dek, new_dek = os.urandom(32), os.urandom(32)
    old = provider.wrap_key(key_ref, old_dek, ACME)
    # gcloud kms keys versions create: a new version, not yet primary.
    created = kms_client.create_crypto_key_version(
        parent=key_name, crypto_key_version=kms.CryptoKeyVersion(), timeout=5
    )
    assert created.name.endswith("/cryptoKeyVersions/2")
    provider.wrap_key(key_ref, os.urandom(32), ACME)
    assert kms_server.primary(key_name) == 1
    # gcloud kms keys update --primary-version=2: now wraps use version 2.
    kms_client.update_crypto_key_primary_version(
        name=key_name, crypto_key_version_id="2", timeout=5
    )
    new = provider.wrap_key(key_ref, new_dek, ACME)
    assert kms_server.primary(key_name) == 2
    assert provider.unwrap_key(key_ref, old, ACME) == old_dek
    _set_state(kms_client, key_ref, State.DISABLED, version=1)
    with pytest.raises(KeyAccessDeniedError):
        provider.unwrap_key(key_ref, old, ACME)
    assert provider.unwrap_key(key_ref, new, ACME) == new_dek


# -- error mapping -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, KeyAccessDeniedError),
        (grpc.StatusCode.UNAUTHENTICATED, KeyAccessDeniedError),
        (grpc.StatusCode.FAILED_PRECONDITION, KeyAccessDeniedError),
        (grpc.StatusCode.NOT_FOUND, KeyNotFoundError),
        (grpc.StatusCode.UNAVAILABLE, KMSUnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, KMSUnavailableError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, KMSUnavailableError),
        (grpc.StatusCode.INTERNAL, KMSUnavailableError),
        (grpc.StatusCode.UNKNOWN, KMSUnavailableError),
        (grpc.StatusCode.ABORTED, KMSUnavailableError),
    ],
    ids=lambda v: getattr(v, "name", getattr(v, "__name__", "")),
)
def test_status_mapping(
    provider: GcpKmsProvider,
    kms_server: KmsServer,
    key_name: str,
    key_ref: str,
    code: grpc.StatusCode,
    expected: type[Exception],
) -> None:
    wrapped = provider.wrap_key(key_ref, os.urandom(32), ACME)
    kms_server.fail(key_name, code, times=2)
    with pytest.raises(expected) as info:
        provider.wrap_key(key_ref, os.urandom(32), ACME)
    assert isinstance(info.value.__cause__, gexc.GoogleAPICallError)
    with pytest.raises(expected):
        provider.unwrap_key(key_ref, wrapped, ACME)
    # One call each: no SDK retry underneath the key manager's own.
    assert kms_server.calls[f"Encrypt:{key_name}"] == 2
    assert kms_server.calls[f"Decrypt:{key_name}"] == 1


def test_invalid_argument_on_encrypt_is_configuration(
    provider: GcpKmsProvider, kms_server: KmsServer, key_name: str, key_ref: str
) -> None:
    kms_server.fail(key_name, grpc.StatusCode.INVALID_ARGUMENT, message="wrong key purpose")
    with pytest.raises(ConfigurationError, match="ENCRYPT_DECRYPT"):
        provider.wrap_key(key_ref, os.urandom(32), ACME)


def test_deadline_is_per_call(
    kms_client: Any, kms_server: KmsServer, key_name: str, key_ref: str
) -> None:
    kms_server.delay(key_name, 3)
    started = time.monotonic()
    with pytest.raises(KMSUnavailableError) as info:
        GcpKmsProvider(kms_client, timeout=0.3).wrap_key(key_ref, os.urandom(32), ACME)
    assert time.monotonic() - started < 2
    assert isinstance(info.value.__cause__, gexc.DeadlineExceeded)


def test_sdk_retry_is_opt_in_and_bounded(
    kms_client: Any, kms_server: KmsServer, key_name: str, key_ref: str
) -> None:
    kms_server.fail(key_name, grpc.StatusCode.UNAVAILABLE, times=100)
    retry = Retry(predicate=if_exception_type(gexc.ServiceUnavailable), initial=0.05, timeout=0.4)
    with pytest.raises(KMSUnavailableError) as info:
        GcpKmsProvider(kms_client, retry=retry).wrap_key(key_ref, os.urandom(32), ACME)
    assert isinstance(info.value.__cause__, gexc.RetryError)
    assert kms_server.calls[f"Encrypt:{key_name}"] > 1


def test_key_manager_retries_a_transient_failure(
    provider: GcpKmsProvider, kms_server: KmsServer, key_name: str, key_ref: str
) -> None:
    kms_server.fail(key_name, grpc.StatusCode.UNAVAILABLE, times=1)
    cmk = CMK(provider, tenant_keys={"acme": key_ref}, audit_sinks=[])
    result = cmk.check_tenant("acme")
    assert result.ok, str(result)
    assert kms_server.calls[f"Encrypt:{key_name}"] == 2


@pytest.mark.parametrize(
    "ref",
    [
        f"gcp-kms://{RING}/cryptoKeys/k/cryptoKeyVersions/1",
        f"gcp-kms://{RING}",
        f"aws-kms://{RING}/cryptoKeys/k",
        f"gcp-kms://{RING}/cryptoKeys/",
    ],
)
def test_malformed_key_refs(provider: GcpKmsProvider, ref: str) -> None:
    with pytest.raises(KeyNotFoundError, match="cryptoKeys/<key>"):
        provider.wrap_key(ref, os.urandom(32), ACME)


def test_context_needs_a_tenant(provider: GcpKmsProvider, key_ref: str) -> None:
    with pytest.raises(ConfigurationError):
        provider.wrap_key(key_ref, os.urandom(32), {"data_label": "PHI"})


# -- construction ------------------------------------------------------------------------------


def test_from_credentials_dead_endpoint_fails_fast() -> None:
    """The convenience constructor (TLS, anonymous credentials) against a closed port."""
    provider = GcpKmsProvider.from_credentials(
        AnonymousCredentials(), api_endpoint=f"127.0.0.1:{_free_port()}", timeout=2
    )
    started = time.monotonic()
    with pytest.raises(KMSUnavailableError) as info:
        provider.wrap_key(f"gcp-kms://{RING}/cryptoKeys/k", os.urandom(32), ACME)
    assert time.monotonic() - started < 5
    assert isinstance(info.value.__cause__, gexc.ServiceUnavailable)
    assert repr(provider) == "GcpKmsProvider(timeout=2.0)"


@pytest.mark.parametrize("timeout", [0, -1, 601])
def test_timeout_is_validated(kms_client: Any, timeout: float) -> None:
    with pytest.raises(ConfigurationError):
        GcpKmsProvider(kms_client, timeout=timeout)


def test_sdk_debug_logging_is_warned_about(
    provider: GcpKmsProvider, key_ref: str, caplog: pytest.LogCaptureFixture
) -> None:
    sdk = logging.getLogger("google.cloud.kms_v1.services.key_management_service.transports.grpc")
    handler = logging.NullHandler()
    sdk.addHandler(handler)
    old_level = sdk.level
    sdk.setLevel(logging.DEBUG)
    try:
        with caplog.at_level(logging.WARNING, logger="sqlalchemy_cmk.providers.gcp"):
            provider.wrap_key(key_ref, os.urandom(32), ACME)
            provider.wrap_key(key_ref, os.urandom(32), ACME)
    finally:
        sdk.setLevel(old_level)
        sdk.removeHandler(handler)
    warnings = [r for r in caplog.records if r.name == "sqlalchemy_cmk.providers.gcp"]
    assert len(warnings) == 1 and "data keys" in warnings[0].getMessage()


def test_docs_example_runs(
    kms_server: KmsServer, kms_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Python example of docs/providers/gcp.md, with its client pointed at the local KMS."""
    from ._tenant_tools import doc_block

    example = doc_block("gcp.md", "python", "GcpKmsProvider.from_credentials(timeout=5.0)")
    for ref in re.findall(r'"gcp-kms://([^"]+)"', example):
        kms_server.add_key(ref)
    built: list[float] = []

    def local(cls: type[GcpKmsProvider], *, timeout: float) -> GcpKmsProvider:
        built.append(timeout)
        return cls(kms_client, timeout=timeout)

    monkeypatch.setattr(GcpKmsProvider, "from_credentials", classmethod(local))
    exec(compile(example, "docs/providers/gcp.md", "exec"), {})
    assert built == [5.0]


@pytest.mark.parametrize("missing", ["google.cloud.kms", "google_crc32c"])
def test_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    # As if not installed: no module, and no attribute left on the parent package.
    monkeypatch.setitem(sys.modules, missing, None)
    parent, _, name = missing.rpartition(".")
    if parent:
        monkeypatch.delattr(sys.modules[parent], name, raising=False)
    monkeypatch.delitem(sys.modules, "sqlalchemy_cmk.providers.gcp")
    with pytest.raises(ImportError, match=r"pip install 'sqlalchemy-cmk\[gcp\]'"):
        importlib.import_module("sqlalchemy_cmk.providers.gcp")


# -- from_credentials over TLS, with a token source (issue 8) ----------------------------------


class FakeTokenSource(Credentials):
    """A google-auth credential that "fetches" a fixed access token, counting refreshes."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self._issue = token
        self.refreshes = 0

    def refresh(self, request: Any) -> None:
        self.refreshes += 1
        self.token = self._issue
        self.expiry = datetime.datetime.now(datetime.timezone.utc).replace(
            tzinfo=None
        ) + datetime.timedelta(hours=1)


@pytest.fixture(scope="module")
def tls_kms_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KmsServer, bytes]]:
    from sqlalchemy_cmk.testing.gcp_kms import make_tls  # a CA and a certificate for 127.0.0.1

    directory = tmp_path_factory.mktemp("gcp-tls")
    _, ca_file = make_tls(directory)
    pem = (directory / "server.pem").read_bytes()
    cut = pem.index(b"-----BEGIN PRIVATE KEY-----")
    server = KmsServer(tls=(pem[cut:], pem[:cut]), token="ya29.fake-access-token")
    server.start()
    yield server, ca_file.read_bytes()
    server.stop()


def test_from_credentials_over_tls_with_a_token_source(
    tls_kms_server: tuple[KmsServer, bytes],
) -> None:
    server, ca = tls_kms_server
    name = server.add_key(f"{RING}/cryptoKeys/tls-{uuid.uuid4().hex[:8]}")
    source = FakeTokenSource("ya29.fake-access-token")
    provider = GcpKmsProvider.from_credentials(
        source, api_endpoint=server.address, root_certificates=ca, timeout=5
    )
    dek = os.urandom(32)
    wrapped = provider.wrap_key(f"gcp-kms://{name}", dek, ACME)
    assert provider.unwrap_key(f"gcp-kms://{name}", wrapped, ACME) == dek
    assert server.tokens_seen["Bearer ya29.fake-access-token"] == 2
    assert source.refreshes == 1  # one token, reused while valid

    # A token the service does not accept: the credentials are refused, not retried as a fault.
    refused = GcpKmsProvider.from_credentials(
        FakeTokenSource("ya29.revoked"), api_endpoint=server.address, root_certificates=ca
    )
    with pytest.raises(KeyAccessDeniedError, match="refused the credentials"):
        refused.wrap_key(f"gcp-kms://{name}", dek, ACME)
    # And a client that does not trust the endpoint's CA never sends the token.
    seen = sum(server.tokens_seen.values())
    untrusting = GcpKmsProvider.from_credentials(
        FakeTokenSource("ya29.fake-access-token"), api_endpoint=server.address, timeout=2
    )
    with pytest.raises(KMSUnavailableError, match="TLS to Cloud KMS failed") as info:
        untrusting.wrap_key(f"gcp-kms://{name}", dek, ACME)
    assert info.value.retryable is False  # a certificate problem: not retried
    assert sum(server.tokens_seen.values()) == seen


def test_a_hung_call_ends_with_kms_deadline(
    kms_client: Any, kms_server: KmsServer, key_name: str, key_ref: str
) -> None:
    # The provider's timeout is 5 s; the key manager's 0.5 s deadline becomes the gRPC deadline.
    cmk = CMK(
        GcpKmsProvider(kms_client, timeout=5),
        tenant_keys={"acme": key_ref},
        kms_deadline=0.5,
        retry_attempts=1,
        audit_sinks=[],
    )
    kms_server.delay(key_name, 3)
    started = time.monotonic()
    with tenant_context("acme"), pytest.raises(KMSUnavailableError):
        cmk.encrypt_document({"f": b"x"})

    def kms_threads() -> int:
        return sum(t.name == "sqlalchemy-cmk-kms" for t in threading.enumerate())

    while kms_threads() and time.monotonic() - started < 5.0:
        time.sleep(0.05)
    assert time.monotonic() - started < 1.5  # the gRPC call ended too, not after 3 s


def test_check_tenant_diagnoses_an_unknown_key_as_the_service_answers(
    provider: GcpKmsProvider,
) -> None:
    cmk = CMK(provider, tenant_keys={"acme": f"gcp-kms://{RING}/cryptoKeys/nobody"}, audit_sinks=[])
    result = cmk.check_tenant("acme")
    assert not result.ok
    (step,) = [s for s in result.steps if s.name == "wrap+unwrap"]
    assert "not found or no permission" in step.detail


def test_docs_tenant_decrypts_a_data_key_with_its_own_tools(
    kms_server: KmsServer,
    kms_client: Any,
    provider: GcpKmsProvider,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The page's script splits a stored companion; the page's `gcloud kms decrypt`, run as the
    request gcloud sends, returns the data key; without the label Cloud KMS refuses."""
    import shlex

    from ._tenant_tools import companion, doc_block, run_script

    command = doc_block("gcp.md", "sh", "gcloud kms decrypt")
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:3] == ["gcloud", "kms", "decrypt"]
    options = dict(w.removeprefix("--").split("=", 1) for w in words[3:])
    key_name = kms_server.add_key(f"{options['key']}-{uuid.uuid4().hex[:6]}")
    key_ref = f"gcp-kms://{key_name}"
    dek = os.urandom(32)
    wrapped = provider.wrap_key(key_ref, dek, {"tenant": "acme", "data_label": "PHI"})
    (tmp_path / "edek.bin").write_bytes(companion("acme", "gcp-kms", key_ref, wrapped))
    run_script("gcp.md", 'Path("edek.bin")', tmp_path)
    assert f"tenant acme key {key_name}" in capsys.readouterr().out

    ciphertext = (tmp_path / options["ciphertext-file"]).read_bytes()
    aad = (tmp_path / options["additional-authenticated-data-file"]).read_bytes()
    answer = kms_client.decrypt(
        request={"name": key_name, "ciphertext": ciphertext, "additional_authenticated_data": aad},
        timeout=5,
    )
    assert answer.plaintext == dek and options["plaintext-file"] == "data-key.bin"
    assert json.loads(aad)[1] == {"data_label": "PHI", "tenant": "acme"}
    # The label is bound: the tenant alone does not decrypt.
    without_label = json.dumps(
        ["sqlalchemy-cmk/gcp-kms/v1", {"tenant": "acme"}], sort_keys=True, separators=(",", ":")
    ).encode()
    with pytest.raises(gexc.InvalidArgument):
        kms_client.decrypt(
            request={
                "name": key_name,
                "ciphertext": ciphertext,
                "additional_authenticated_data": without_label,
            },
            timeout=5,
        )
