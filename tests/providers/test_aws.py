"""AWS KMS provider: the real boto3 client against moto's KMS server on loopback.

See ``sqlalchemy_cmk.testing.aws_kms`` for what the server enforces on top of moto (disabled keys,
pending deletion, explicit and implicit denies of the key policy, IncorrectKeyException), how
requests are recorded and how faults are injected; its own tests are in test_aws_kms_server.py.
Nothing leaves 127.0.0.1: fake static credentials, no metadata service, no config files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docblocks
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import String, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import sqlalchemy_cmk.providers.aws as aws_module
from sqlalchemy_cmk import CMK, tenant_context
from sqlalchemy_cmk._format import aad_prefix, open_, split_companion
from sqlalchemy_cmk.errors import (
    ConfigurationError,
    DecryptionError,
    KeyAccessDeniedError,
    KeyAccessError,
    KeyNotFoundError,
    KMSUnavailableError,
)
from sqlalchemy_cmk.providers.aws import AwsKmsProvider, kms_client_config
from sqlalchemy_cmk.testing.aws_kms import GUARD_ENV, MOTO_MINOR, REGION, UNSET_ENV, LocalKms
from sqlalchemy_cmk.testing.contract import KeyProviderContract
from sqlalchemy_cmk.types import EncryptedMixin, EncryptedType

OTHER_REGION = "eu-west-1"

ACME = {"tenant": "acme"}
U16 = struct.Struct(">H")


def free_port() -> int:
    """A loopback port with nothing listening on it (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SilentServer:
    """A loopback TCP server that accepts connections and never answers (a hung KMS)."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = int(self._sock.getsockname()[1])
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self._conns.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self._conns:
            conn.close()
        self._sock.close()


# -- the server ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kms_server() -> Iterator[LocalKms]:
    """moto's KMS on 127.0.0.1 for the session; skipped (failed under CI) if it cannot run."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in GUARD_ENV.items():
            mp.setenv(name, value)
        for name in UNSET_ENV:
            mp.delenv(name, raising=False)
        server = LocalKms()
        try:
            server.start()
        except (ImportError, RuntimeError, OSError) as exc:
            msg = f"moto's KMS server cannot run: {type(exc).__name__}: {exc}"
            if os.environ.get("CI"):
                pytest.fail(msg + " (CI is set: the AWS KMS tests must run)")
            pytest.skip(msg)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def kms(kms_server: LocalKms) -> LocalKms:
    """The server with no recorded requests, no pending faults and enforcement on."""
    kms_server.clear()
    return kms_server


def ref_of(arn: str) -> str:
    return f"aws-kms://{arn}"


def split(wrapped: bytes) -> tuple[bytes, bytes]:
    """(context JSON, ciphertext blob) of wrapped bytes, by the documented layout."""
    (c,) = U16.unpack_from(wrapped, 1)
    (b,) = U16.unpack_from(wrapped, 3 + c)
    assert len(wrapped) == 5 + c + b
    return wrapped[3 : 3 + c], wrapped[5 + c :]


def join(context_json: bytes, blob: bytes, version: int = 1) -> bytes:
    """Wrapped bytes by the documented layout, written independently of the provider."""
    return (
        bytes([version]) + U16.pack(len(context_json)) + context_json + U16.pack(len(blob)) + blob
    )


# -- the contract --------------------------------------------------------------------------------


class TestAwsKmsContract(KeyProviderContract):
    """Key ARNs; revocation is DisableKey through the real client, restore EnableKey."""

    @pytest.fixture
    def provider(self, kms: LocalKms) -> AwsKmsProvider:
        return AwsKmsProvider(kms.client())

    @pytest.fixture
    def key_ref(self, kms: LocalKms) -> str:
        return ref_of(kms.create_key())

    @pytest.fixture
    def missing_key_ref(self, kms: LocalKms) -> str:
        return ref_of(f"arn:aws:kms:{REGION}:123456789012:key/{uuid.uuid4()}")

    @pytest.fixture
    def revoke(self, kms: LocalKms) -> Callable[[str], None]:
        return kms.disable

    @pytest.fixture
    def restore(self, kms: LocalKms) -> Callable[[str], None]:
        return kms.enable

    @pytest.fixture
    def unavailable_provider(self, kms: LocalKms) -> AwsKmsProvider:
        return AwsKmsProvider.from_session(
            kms.session(), endpoint_url=f"http://127.0.0.1:{free_port()}"
        )


class TestAwsKmsAliasContract(TestAwsKmsContract):
    """The same with alias ARNs (revocation disables the key the alias points to)."""

    @pytest.fixture
    def key_ref(self, kms: LocalKms) -> str:
        return ref_of(kms.create_key(alias=f"tenant-{uuid.uuid4().hex[:12]}"))

    @pytest.fixture
    def missing_key_ref(self, kms: LocalKms) -> str:
        return ref_of(f"arn:aws:kms:{REGION}:123456789012:alias/nobody-{uuid.uuid4().hex[:8]}")


# -- the encryption context ----------------------------------------------------------------------


@pytest.fixture
def provider(kms: LocalKms) -> AwsKmsProvider:
    return AwsKmsProvider(kms.client())


@pytest.fixture
def key_ref(kms: LocalKms) -> str:
    return ref_of(kms.create_key())


def test_encryption_context_is_sent_on_encrypt_and_decrypt(
    kms: LocalKms, provider: AwsKmsProvider, key_ref: str
) -> None:
    dek = os.urandom(32)
    wrapped = provider.wrap_key(key_ref, dek, {"tenant": "acme", "data_label": "PHI"})
    assert provider.unwrap_key(key_ref, wrapped, ACME) == dek
    arn = key_ref.removeprefix("aws-kms://")
    sent = {"tenant": "acme", "data_label": "PHI"}
    assert [(r.key_id, r.context) for r in kms.of("Encrypt")] == [(arn, sent)]
    # Decrypt names the key (KeyId) and repeats the recorded context, data label included.
    assert [(r.key_id, r.context) for r in kms.of("Decrypt")] == [(arn, sent)]


def test_the_wrapped_bytes_record_the_exact_context(provider: AwsKmsProvider, key_ref: str) -> None:
    wrapped = provider.wrap_key(key_ref, os.urandom(32), {"tenant": "acmé", "data_label": "PHI"})
    assert wrapped[0] == 1
    context_json, blob = split(wrapped)
    assert context_json == '{"data_label":"PHI","tenant":"acmé"}'.encode()
    assert 1 <= len(blob) <= 6144


def test_kms_binds_the_whole_context(kms: LocalKms, provider: AwsKmsProvider, key_ref: str) -> None:
    """KMS itself refuses the blob under any other context than the one sent to Encrypt."""
    dek = os.urandom(32)
    wrapped = provider.wrap_key(key_ref, dek, {"tenant": "acme", "data_label": "PHI"})
    _, blob = split(wrapped)
    client = kms.client()
    arn = key_ref.removeprefix("aws-kms://")
    for wrong in ({"tenant": "acme"}, {"tenant": "globex", "data_label": "PHI"}, {}):
        with pytest.raises(ClientError) as info:
            client.decrypt(KeyId=arn, CiphertextBlob=blob, EncryptionContext=wrong)
        assert info.value.response["Error"]["Code"] == "InvalidCiphertextException"
    right = {"tenant": "acme", "data_label": "PHI"}
    assert (
        client.decrypt(KeyId=arn, CiphertextBlob=blob, EncryptionContext=right)["Plaintext"] == dek
    )


def test_a_rewritten_recorded_context_is_refused_by_kms(
    kms: LocalKms, provider: AwsKmsProvider, key_ref: str
) -> None:
    """Rewriting the recorded tenant to pass the local check still fails: KMS binds it."""
    wrapped = provider.wrap_key(key_ref, os.urandom(32), {"tenant": "acme", "data_label": "PHI"})
    _, blob = split(wrapped)
    for forged, caller in (
        (b'{"data_label":"PHI","tenant":"globex"}', {"tenant": "globex"}),
        (b'{"data_label":"PII","tenant":"acme"}', ACME),
        (b'{"tenant":"acme"}', ACME),
    ):
        kms.clear()
        with pytest.raises(DecryptionError) as info:
            provider.unwrap_key(key_ref, join(forged, blob), caller)
        assert isinstance(info.value.__cause__, ClientError)
        assert len(kms.of("Decrypt")) == 1  # it was KMS that said no


def test_an_independently_written_layout_unwraps(kms: LocalKms, provider: AwsKmsProvider) -> None:
    """The documented layout, written by this test around a blob from a direct Encrypt call."""
    arn = kms.create_key()
    dek = os.urandom(32)
    context = {"tenant": "acme", "data_label": "billing"}
    blob = kms.client().encrypt(KeyId=arn, Plaintext=dek, EncryptionContext=context)[
        "CiphertextBlob"
    ]
    wrapped = join(b'{"data_label":"billing","tenant":"acme"}', blob)
    assert provider.unwrap_key(ref_of(arn), wrapped, ACME) == dek


def _malformed(context_json: bytes, blob: bytes) -> list[bytes]:
    good = join(context_json, blob)
    return [
        join(context_json, blob, version=2),
        join(context_json, blob, version=0),
        good + b"\x00",
        good[:-1],
        good[:4],
        b"\x01" + U16.pack(0) + U16.pack(len(blob)) + blob,  # empty context
        b"\x01" + U16.pack(len(context_json) + 500) + context_json + U16.pack(len(blob)) + blob,
        join(context_json, b""),  # empty blob
        join(context_json, blob)[: 3 + len(context_json)],  # no blob length
        join(b"\xff\xfe", blob),  # not UTF-8
        join(b"not json", blob),
        join(b"[" * 1999, blob),  # too deep for the JSON parser
        join(b'["tenant","acme"]', blob),
        join(b'{"tenant":1}', blob),
        join(b'{"data_label":"PHI"}', blob),  # no tenant
        join(b'{"tenant": "acme"}', blob),  # not canonical: a space
        join(b'{"tenant":"acme","data_label":"PHI"}', blob),  # not canonical: key order
        join(b'{"tenant":"acme","tenant":"acme"}', blob),  # duplicate key
        join(b'{"tenant":"globex"}', blob),  # another tenant's
        join(b'{"tenant":"acme"}', b"\x00" * 7000),  # blob longer than KMS ever returns
    ]


def test_malformed_wrapped_keys_fail_before_reaching_kms(
    kms: LocalKms, provider: AwsKmsProvider, key_ref: str
) -> None:
    dek = os.urandom(32)
    _, blob = split(provider.wrap_key(key_ref, dek, ACME))
    kms.clear()
    for bad in _malformed(b'{"tenant":"acme"}', blob):
        with pytest.raises(DecryptionError) as info:
            provider.unwrap_key(key_ref, bad, ACME)
        assert info.value.__cause__ is None
        assert blob.hex() not in str(info.value) and dek.hex() not in str(info.value)
    assert kms.of("Decrypt") == []


def test_unwrap_checks_every_entry_the_caller_gives(provider: AwsKmsProvider, key_ref: str) -> None:
    dek = os.urandom(32)
    wrapped = provider.wrap_key(key_ref, dek, {"tenant": "acme", "data_label": "PHI"})
    assert provider.unwrap_key(key_ref, wrapped, {"tenant": "acme", "data_label": "PHI"}) == dek
    with pytest.raises(DecryptionError):
        provider.unwrap_key(key_ref, wrapped, {"tenant": "acme", "data_label": "PII"})


def test_the_context_must_name_a_tenant(
    kms: LocalKms, provider: AwsKmsProvider, key_ref: str
) -> None:
    with pytest.raises(ConfigurationError):
        provider.wrap_key(key_ref, os.urandom(32), {"data_label": "PHI"})
    with pytest.raises(ConfigurationError):
        provider.wrap_key(key_ref, os.urandom(32), {"tenant": "x" * 3000})
    assert kms.of("Encrypt") == []


# -- key references ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "region"),
    [
        (
            "aws-kms://arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "eu-west-1",
        ),
        (
            "aws-kms://arn:aws:kms:us-east-2:111122223333:key/mrk-1234abcd12ab34cd56ef1234567890ab",
            "us-east-2",
        ),
        (
            "aws-kms://arn:aws:kms:ap-southeast-2:111122223333:alias/acme/app-data_1",
            "ap-southeast-2",
        ),
        (
            "aws-kms://arn:aws-cn:kms:cn-north-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "cn-north-1",
        ),
        ("aws-kms://arn:aws-us-gov:kms:us-gov-west-1:111122223333:alias/acme", "us-gov-west-1"),
    ],
)
def test_key_references(ref: str, region: str) -> None:
    assert AwsKmsProvider.parse_key_ref(ref) == (ref.removeprefix("aws-kms://"), region)


@pytest.mark.parametrize(
    "ref",
    [
        "aws-kms://1234abcd-12ab-34cd-56ef-1234567890ab",  # bare key id: region unknown
        "aws-kms://alias/acme",  # bare alias name
        "aws-kms://arn:aws:kms:eu-west-1:111122223333:key/",
        "aws-kms://arn:aws:kms:eu-west-1:1111:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "aws-kms://arn:aws:s3:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "aws-kms://arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab ",
        "aws-kms://arn:aws:kms:eu-west-1:111122223333:secret/x",
        "gcp-kms://arn:aws:kms:eu-west-1:111122223333:alias/acme",
        "arn:aws:kms:eu-west-1:111122223333:alias/acme",
    ],
)
def test_malformed_key_references(kms: LocalKms, provider: AwsKmsProvider, ref: str) -> None:
    with pytest.raises(ConfigurationError, match="not an AWS KMS key reference"):
        provider.wrap_key(ref, os.urandom(32), ACME)
    with pytest.raises(ConfigurationError):
        provider.unwrap_key(ref, b"\x01", ACME)
    assert kms.requests == []


# -- revocation ----------------------------------------------------------------------------------


def _cause_code(exc: BaseException) -> str:
    cause = exc.__cause__
    assert isinstance(cause, ClientError), cause
    return str(cause.response["Error"]["Code"])


def test_disabled_key(kms: LocalKms, provider: AwsKmsProvider, key_ref: str) -> None:
    wrapped = provider.wrap_key(key_ref, os.urandom(32), ACME)
    kms.disable(key_ref)
    with pytest.raises(KeyAccessDeniedError) as info:
        provider.unwrap_key(key_ref, wrapped, ACME)
    assert _cause_code(info.value) == "DisabledException"
    assert "is disabled" in str(info.value)
    assert (info.value.key_ref, info.value.provider) == (key_ref, "aws-kms")


def test_key_pending_deletion(kms: LocalKms, provider: AwsKmsProvider, key_ref: str) -> None:
    dek = os.urandom(32)
    wrapped = provider.wrap_key(key_ref, dek, ACME)
    client, key_id = kms.key_meta(key_ref)
    client.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    with pytest.raises(KeyAccessDeniedError) as info:
        provider.unwrap_key(key_ref, wrapped, ACME)
    assert _cause_code(info.value) == "KMSInvalidStateException"
    with pytest.raises(KeyAccessDeniedError):
        provider.wrap_key(key_ref, os.urandom(32), ACME)
    client.cancel_key_deletion(KeyId=key_id)  # as on AWS, a cancelled deletion leaves it disabled
    with pytest.raises(KeyAccessDeniedError) as info:
        provider.unwrap_key(key_ref, wrapped, ACME)
    assert _cause_code(info.value) == "DisabledException"
    client.enable_key(KeyId=key_id)
    assert provider.unwrap_key(key_ref, wrapped, ACME) == dek


def test_a_deny_in_the_key_policy_revokes_one_tenant(
    kms: LocalKms, provider: AwsKmsProvider, key_ref: str
) -> None:
    """A tenant sharing one key across its sub-tenants can deny one of them by context."""
    acme, globex = os.urandom(32), os.urandom(32)
    wrapped_acme = provider.wrap_key(key_ref, acme, ACME)
    wrapped_globex = provider.wrap_key(key_ref, globex, {"tenant": "globex"})
    client, key_id = kms.key_meta(key_ref)
    original = client.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"]
    policy = json.loads(original)
    policy["Statement"].append(
        {
            "Sid": "RevokeAcme",
            "Effect": "Deny",
            "Principal": {"AWS": "*"},
            "Action": ["kms:Decrypt", "kms:Encrypt"],
            "Resource": "*",
            "Condition": {"StringEquals": {"kms:EncryptionContext:tenant": "acme"}},
        }
    )
    client.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
    try:
        with pytest.raises(KeyAccessDeniedError) as info:
            provider.unwrap_key(key_ref, wrapped_acme, ACME)
        assert _cause_code(info.value) == "AccessDeniedException"
        assert "explicit deny" in str(info.value)
        with pytest.raises(KeyAccessDeniedError):
            provider.wrap_key(key_ref, os.urandom(32), ACME)
        assert provider.unwrap_key(key_ref, wrapped_globex, {"tenant": "globex"}) == globex
    finally:
        client.put_key_policy(KeyId=key_id, PolicyName="default", Policy=original)
    assert provider.unwrap_key(key_ref, wrapped_acme, ACME) == acme


def test_another_key_is_incorrect_key(
    kms: LocalKms, provider: AwsKmsProvider, key_ref: str
) -> None:
    wrapped = provider.wrap_key(key_ref, os.urandom(32), ACME)
    with pytest.raises(DecryptionError) as info:
        provider.unwrap_key(ref_of(kms.create_key()), wrapped, ACME)
    assert _cause_code(info.value) == "IncorrectKeyException"


def test_unknown_key(provider: AwsKmsProvider) -> None:
    ref = ref_of(f"arn:aws:kms:{REGION}:123456789012:key/{uuid.uuid4()}")
    with pytest.raises(KeyNotFoundError) as info:
        provider.unwrap_key(ref, join(b'{"tenant":"acme"}', b"\x00" * 80), ACME)
    assert _cause_code(info.value) == "NotFoundException"


# -- transient faults and timeouts ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("ThrottlingException", 400),
        ("KMSInternalException", 500),
        ("DependencyTimeoutException", 503),
        ("KeyUnavailableException", 500),
        ("InternalFailure", 500),
        ("SomethingNew", 502),  # any 5xx
    ],
)
@pytest.mark.parametrize("operation", ["Encrypt", "Decrypt"])
def test_transient_errors_are_unavailable_without_sdk_retries(
    kms: LocalKms, provider: AwsKmsProvider, key_ref: str, code: str, status: int, operation: str
) -> None:
    dek = os.urandom(32)
    wrapped = provider.wrap_key(key_ref, dek, ACME)
    kms.clear()
    kms.fail_next(operation, code, status)
    with pytest.raises(KMSUnavailableError) as info:
        if operation == "Encrypt":
            provider.wrap_key(key_ref, dek, ACME)
        else:
            provider.unwrap_key(key_ref, wrapped, ACME)
    assert _cause_code(info.value) == code
    assert info.value.retryable
    assert len(kms.of(operation)) == 1  # botocore did not retry: the core does


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("AccessDeniedException", KeyAccessDeniedError),
        ("UnrecognizedClientException", KeyAccessDeniedError),
        ("NotFoundException", KeyNotFoundError),
        ("InvalidCiphertextException", DecryptionError),
        ("IncorrectKeyException", DecryptionError),
        ("InvalidKeyUsageException", ConfigurationError),
    ],
)
def test_refusals_map_to_their_error(
    kms: LocalKms, provider: AwsKmsProvider, key_ref: str, code: str, error: type[Exception]
) -> None:
    wrapped = provider.wrap_key(key_ref, os.urandom(32), ACME)
    kms.fail_next("Decrypt", code)
    with pytest.raises(error) as info:
        provider.unwrap_key(key_ref, wrapped, ACME)
    assert _cause_code(info.value) == code


def test_an_unknown_client_error_is_a_plain_key_access_error(
    kms: LocalKms, provider: AwsKmsProvider, key_ref: str
) -> None:
    kms.fail_next("Encrypt", "BrandNewException", 400)
    with pytest.raises(KeyAccessError) as info:
        provider.wrap_key(key_ref, os.urandom(32), ACME)
    assert type(info.value) is KeyAccessError
    assert "BrandNewException" in str(info.value)


def test_the_core_retries_throttling(kms: LocalKms, key_ref: str) -> None:
    """Two throttled Decrypts, then success: CMK's bounded retries absorb them."""
    cmk, sessions, engine = _cmk(kms, {"acme": key_ref}, retry_attempts=3, retry_backoff=0.01)
    try:
        with tenant_context("acme"):
            with sessions() as s:
                s.add(_Note(body="hello"))
                s.commit()
            cmk.forget_tenant("acme")
            kms.clear()
            kms.fail_next("Decrypt", "ThrottlingException")
            kms.fail_next("Decrypt", "ThrottlingException")
            with sessions() as s:
                assert [n.body for n in s.scalars(select(_Note))] == ["hello"]
        assert len(kms.of("Decrypt")) == 3
    finally:
        engine.dispose()


def test_a_closed_port_fails_fast(kms: LocalKms, key_ref: str) -> None:
    provider = AwsKmsProvider.from_session(
        kms.session(), endpoint_url=f"http://127.0.0.1:{free_port()}"
    )
    started = time.monotonic()
    with pytest.raises(KMSUnavailableError) as info:
        provider.wrap_key(key_ref, os.urandom(32), ACME)
    assert time.monotonic() - started < 2.0
    assert isinstance(info.value.__cause__, EndpointConnectionError)


def test_a_hung_endpoint_times_out(kms: LocalKms, key_ref: str) -> None:
    silent = SilentServer()
    try:
        provider = AwsKmsProvider.from_session(
            kms.session(), endpoint_url=f"http://127.0.0.1:{silent.port}", read_timeout=0.5
        )
        started = time.monotonic()
        with pytest.raises(KMSUnavailableError) as info:
            provider.unwrap_key(key_ref, join(b'{"tenant":"acme"}', b"\x00" * 80), ACME)
        assert time.monotonic() - started < 3.0
        assert isinstance(info.value.__cause__, ReadTimeoutError)
    finally:
        silent.close()


def _kms_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "sqlalchemy-cmk-kms"}


def test_a_hung_kms_is_bounded_by_the_cmk_deadline(kms: LocalKms, key_ref: str) -> None:
    """from_session's clients take their timeouts from the CMK's kms_deadline (here 1 s): the
    SDK call itself ends (read timeout 0.5 s) instead of holding its thread and connection for
    botocore's own timeout after the CMK gave up, and there is time to retry on a new one."""
    silent = SilentServer()
    before = _kms_threads()
    try:
        provider = AwsKmsProvider.from_session(
            kms.session(), endpoint_url=f"http://127.0.0.1:{silent.port}"
        )
        cmk = CMK(provider, tenant_keys={"acme": key_ref}, kms_deadline=1.0, audit_sinks=[])
        started = time.monotonic()
        with tenant_context("acme"), pytest.raises(KMSUnavailableError) as info:
            cmk.encrypt_document({"a": b"x"})
        elapsed = time.monotonic() - started
        assert 0.9 < elapsed < 2.5, elapsed
        assert "attempt(s)" in str(info.value)
        # The last attempt's own read timeout (0.5 s) ends its SDK call soon after; with
        # botocore's timeouts of old (5 s read) the thread and its connection stayed busy.
        while _kms_threads() - before and time.monotonic() - started < 3.0:
            time.sleep(0.05)
        assert _kms_threads() - before == set()
        assert len(silent._conns) >= 2  # the first attempt timed out in time for another
    finally:
        silent.close()


def test_an_explicit_deadline_sets_the_timeouts(kms: LocalKms, key_ref: str) -> None:
    silent = SilentServer()
    try:
        provider = AwsKmsProvider.from_session(
            kms.session(), endpoint_url=f"http://127.0.0.1:{silent.port}", kms_deadline=2.0
        )
        started = time.monotonic()
        with pytest.raises(KMSUnavailableError) as info:  # called directly: no CMK deadline
            provider.unwrap_key(key_ref, join(b'{"tenant":"acme"}', b"\x00" * 80), ACME)
        assert 0.9 < time.monotonic() - started < 1.8  # read timeout 2.0 / 2
        assert isinstance(info.value.__cause__, ReadTimeoutError)
    finally:
        silent.close()
    with pytest.raises(ConfigurationError):
        AwsKmsProvider.from_session(kms.session(), kms_deadline=0)
    with pytest.raises(ConfigurationError):
        AwsKmsProvider.from_session(kms.session(), kms_deadline=1.0, read_timeout=5.0)


def test_a_tls_failure_is_not_retried(kms: LocalKms, key_ref: str) -> None:
    """HTTPS to a plain-HTTP port: the handshake fails the same way on every attempt."""
    provider = AwsKmsProvider.from_session(
        kms.session(), endpoint_url=kms.endpoint_url.replace("http://", "https://")
    )
    with pytest.raises(KMSUnavailableError) as info:
        provider.wrap_key(key_ref, os.urandom(32), ACME)
    assert info.value.retryable is False
    cmk = CMK(provider, tenant_keys={"acme": key_ref}, audit_sinks=[])
    started = time.monotonic()
    with tenant_context("acme"), pytest.raises(KMSUnavailableError):
        cmk.encrypt_document({"a": b"x"})
    assert time.monotonic() - started < 2.0  # not retried until the 10 s deadline


def test_client_config() -> None:
    config = kms_client_config()
    assert (config.connect_timeout, config.read_timeout) == (2.0, 5.0)
    assert config.retries == {"total_max_attempts": 1, "mode": "standard"}
    assert config.max_pool_connections == 16
    with pytest.raises(ConfigurationError):
        kms_client_config(read_timeout=0)
    with pytest.raises(ConfigurationError):
        kms_client_config(max_attempts=0)
    # Derived from the deadline: connect min(2, D / 5), read D / 2, no botocore retry.
    config = kms_client_config(kms_deadline=1.0)
    assert (config.connect_timeout, config.read_timeout) == (0.2, 0.5)
    assert config.retries == {"total_max_attempts": 1, "mode": "standard"}
    config = kms_client_config(kms_deadline=60.0)
    assert (config.connect_timeout, config.read_timeout) == (2.0, 30.0)
    for bad in ({"kms_deadline": 0}, {"kms_deadline": 1.0, "connect_timeout": 1.5}):
        with pytest.raises(ConfigurationError):
            kms_client_config(**bad)


# -- clients -------------------------------------------------------------------------------------


def test_a_client_factory_serves_several_regions(kms: LocalKms) -> None:
    east, west = ref_of(kms.create_key(REGION)), ref_of(kms.create_key(OTHER_REGION))
    made: list[str] = []
    lock = threading.Lock()

    def factory(region: str) -> Any:
        with lock:
            made.append(region)
        return kms.client(region)

    provider = AwsKmsProvider(client_factory=factory)

    def round_trip(ref: str) -> bool:
        dek = os.urandom(32)
        return provider.unwrap_key(ref, provider.wrap_key(ref, dek, ACME), ACME) == dek

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(round_trip, [east, west] * 8))
    assert sorted(made) == [OTHER_REGION, REGION]  # one client per region, made once
    assert repr(provider) == f"AwsKmsProvider(client_factory=..., regions={sorted(made)!r})"
    # The west key really lives in the west: the east endpoint does not know it.
    with pytest.raises(ClientError, match="NotFoundException"):
        kms.client(REGION).describe_key(KeyId=west.removeprefix("aws-kms://"))


def test_one_client_refuses_a_key_of_another_region(
    kms: LocalKms, provider: AwsKmsProvider
) -> None:
    west = ref_of(kms.create_key(OTHER_REGION))
    kms.clear()
    with pytest.raises(ConfigurationError, match="client_factory"):
        provider.wrap_key(west, os.urandom(32), ACME)
    assert kms.requests == []


def test_from_session_uses_the_default_credential_chain(kms: LocalKms, key_ref: str) -> None:
    # No session given: boto3's chain finds the fake credentials of the guarded environment.
    provider = AwsKmsProvider.from_session(endpoint_url=kms.endpoint_url)
    dek = os.urandom(32)
    assert provider.unwrap_key(key_ref, provider.wrap_key(key_ref, dek, ACME), ACME) == dek


def test_constructor_needs_exactly_one_client_source(kms: LocalKms) -> None:
    with pytest.raises(ConfigurationError):
        AwsKmsProvider()
    with pytest.raises(ConfigurationError):
        AwsKmsProvider(kms.client(), client_factory=kms.client)


def test_repr(provider: AwsKmsProvider) -> None:
    assert repr(provider) == f"AwsKmsProvider(client=<kms {REGION}>)"
    assert "testing" not in repr(provider)


def test_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("boto3", "botocore", "botocore.config", "botocore.exceptions"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: "not installed"
    spec = importlib.util.spec_from_file_location(
        "sqlalchemy_cmk.providers._aws_without_boto3", aws_module.__file__
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError, match=r"pip install 'sqlalchemy-cmk\[aws\]'"):
        spec.loader.exec_module(module)


# -- end to end through CMK ----------------------------------------------------------------------


class _Base(DeclarativeBase):
    pass


class _Note(EncryptedMixin, _Base):
    __tablename__ = "aws_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(String(40), default="acme")
    body: Mapped[str] = mapped_column(EncryptedType(String))


def _cmk(kms: LocalKms, tenant_keys: dict[str, str], **options: Any) -> tuple[CMK, Any, Any]:
    return _cmk_in(kms, REGION, tenant_keys, **options)


def _cmk_in(
    kms: LocalKms, region: str, tenant_keys: dict[str, str], **options: Any
) -> tuple[CMK, Any, Any]:
    engine = create_engine("sqlite://")
    _Base.metadata.create_all(engine)
    sessions = sessionmaker(engine)
    provider = AwsKmsProvider(kms.client(region))
    cmk = CMK(provider, tenant_keys=tenant_keys, audit_sinks=[], **options)
    cmk.install(sessions)
    return cmk, sessions, engine


def test_the_data_label_reaches_cloudtrail(kms: LocalKms, key_ref: str) -> None:
    cmk, sessions, engine = _cmk(kms, {"acme": key_ref})
    try:
        with tenant_context("acme", data_label="patient-notes"), sessions() as s:
            s.add(_Note(body="confidential"))
            s.commit()
        cmk.forget_tenant("acme")
        with tenant_context("acme"), sessions() as s:  # reads need no label
            assert [n.body for n in s.scalars(select(_Note))] == ["confidential"]
    finally:
        engine.dispose()
    expected = {"tenant": "acme", "data_label": "patient-notes"}
    assert [r.context for r in kms.of("Encrypt")] == [expected]
    # The new write key's check (verify_write_keys), then the read: both carry the label.
    assert [r.context for r in kms.of("Decrypt")] == [expected, expected]


def test_revocation_bites_within_the_cache_ttl_and_spares_other_tenants(kms: LocalKms) -> None:
    acme, globex = ref_of(kms.create_key()), ref_of(kms.create_key())
    _, sessions, engine = _cmk(kms, {"acme": acme, "globex": globex}, cache_ttl=0.3)

    def read(tenant: str) -> list[str]:
        with tenant_context(tenant), sessions() as s:
            return [n.body for n in s.scalars(select(_Note).where(_Note.tenant == tenant))]

    try:
        for tenant in ("acme", "globex"):
            with tenant_context(tenant), sessions() as s:
                s.add(_Note(tenant=tenant, body=f"{tenant} data"))
                s.commit()
        assert read("acme") == ["acme data"]
        kms.disable(acme)
        time.sleep(0.4)  # past cache_ttl: the cached data keys have expired, no forget_tenant
        with pytest.raises(KeyAccessDeniedError) as info:
            read("acme")
        assert info.value.tenant == "acme"
        provider_error = info.value.__cause__  # the provider's error, under CMK's
        assert provider_error is not None and _cause_code(provider_error) == "DisabledException"
        assert read("globex") == ["globex data"]
        kms.enable(acme)
        assert read("acme") == ["acme data"]
    finally:
        engine.dispose()


# -- the pinned server ---------------------------------------------------------------------------


def test_moto_minor_version_is_pinned(kms_server: LocalKms) -> None:
    """The server's enforcement reads moto internals: re-check it on any moto upgrade."""
    import moto

    assert moto.__version__.startswith(MOTO_MINOR + "."), (
        f"moto {moto.__version__}: check that sqlalchemy_cmk/testing/aws_kms.py still finds "
        "keys in moto's kms_backends and reads moto's ciphertext header, and whether moto now "
        "enforces key state itself (see the next test), then update MOTO_MINOR and the pin in "
        "pyproject.toml"
    )


def test_moto_alone_does_not_enforce_disabled_keys(kms: LocalKms, key_ref: str) -> None:
    """Why the enforcement exists; if this fails, moto enforces key state itself now."""
    kms.disable(key_ref)
    kms.enforce = False
    client = kms.client()
    arn = key_ref.removeprefix("aws-kms://")
    blob = client.encrypt(KeyId=arn, Plaintext=b"k" * 32, EncryptionContext=ACME)["CiphertextBlob"]
    assert client.decrypt(KeyId=arn, CiphertextBlob=blob, EncryptionContext=ACME)["Plaintext"]


# -- the documentation ---------------------------------------------------------------------------

DOC = Path(__file__).parents[2] / "docs" / "providers" / "aws.md"
DOC_ARN = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def doc_blocks(lang: str) -> list[str]:
    return [b.code for b in docblocks.blocks(DOC.relative_to(docblocks.ROOT)) if b.lang == lang]


def doc_block(lang: str, containing: str) -> str:
    (block,) = [b for b in doc_blocks(lang) if containing in b]
    return block


def test_docs_example_runs(kms: LocalKms, monkeypatch: pytest.MonkeyPatch) -> None:
    arn = kms.create_key(OTHER_REGION)  # the documented ARN's region
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", kms.endpoint_url)  # boto3 reads it
    example = doc_block("python", "from_session(boto3")
    assert DOC_ARN in example
    namespace: dict[str, Any] = {}
    exec(compile(example.replace(DOC_ARN, arn), str(DOC), "exec"), namespace)
    assert [r.key_id for r in kms.of("Encrypt")] == [arn]
    assert [r.context["tenant"] for r in kms.requests] == ["acme", "acme"]


def test_docs_key_policy_matches_what_the_provider_sends(
    kms: LocalKms, provider: AwsKmsProvider, key_ref: str
) -> None:
    blocks = [json.loads(b) for b in doc_blocks("json")]
    (statement,) = [b for b in blocks if b.get("Sid") == "AllowSqlalchemyCmkApplication"]
    (iam,) = [b for b in blocks if "Version" in b]
    (event,) = [b for b in blocks if "eventName" in b]
    assert statement["Action"] == ["kms:Encrypt", "kms:Decrypt"] == iam["Statement"][0]["Action"]
    assert event["requestParameters"]["keyId"] == DOC_ARN == iam["Statement"][0]["Resource"]

    provider.wrap_key(key_ref, os.urandom(32), {"tenant": "acme", "data_label": "patient-notes"})
    (sent,) = kms.of("Encrypt")
    assert sent.context == event["requestParameters"]["encryptionContext"]
    condition = statement["Condition"]
    assert set(sent.context) <= set(
        condition["ForAllValues:StringEquals"]["kms:EncryptionContextKeys"]
    )
    assert condition["StringEquals"] == {"kms:EncryptionContext:tenant": "acme"}

    # As the key's only grant to the application (the key owner keeps its own statement), the
    # documented statement lets the application's role in for acme's data, and nothing else:
    # the server denies implicitly what no Allow covers, as AWS does.
    owner = {
        "Sid": "KeyOwner",
        "Effect": "Allow",
        "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
        "Action": "kms:*",
        "Resource": "*",
    }
    kms.put_policy(key_ref, {"Version": "2012-10-17", "Statement": [owner, statement]})
    # The role's session, as CloudTrail shows it: an assumed-role ARN of the role named.
    app = AwsKmsProvider(kms.client(principal=event["userIdentity"]["arn"]))
    dek = os.urandom(32)
    label = {"tenant": "acme", "data_label": "patient-notes"}
    assert app.unwrap_key(key_ref, app.wrap_key(key_ref, dek, label), ACME) == dek
    refused = [{"tenant": "globex"}, {"tenant": "acme", "other": "x"}]
    for context in refused:
        with pytest.raises(KeyAccessDeniedError, match="no resource-based policy allows"):
            app.wrap_key(key_ref, dek, context)
    # Turned into a Deny, the statement catches exactly acme's calls by that role.
    kms.put_policy(
        key_ref,
        {
            "Version": "2012-10-17",
            "Statement": [{**owner, "Principal": "*"}, {**statement, "Effect": "Deny"}],
        },
    )
    with pytest.raises(KeyAccessDeniedError, match="explicit deny"):
        app.wrap_key(key_ref, dek, ACME)
    app.wrap_key(key_ref, dek, {"tenant": "globex"})
    provider.wrap_key(key_ref, dek, ACME)  # another caller


def test_docs_tenant_decrypts_a_data_key_with_its_own_tools(
    kms: LocalKms,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The page's script takes a stored companion apart; the page's `aws kms decrypt`, run as
    the equivalent boto3 call, returns the data key that opens the row's value."""
    arn = kms.create_key(OTHER_REGION)  # the documented command's region
    _, sessions, engine = _cmk_in(kms, OTHER_REGION, {"acme": ref_of(arn)})
    try:
        with tenant_context("acme", data_label="patient-notes"), sessions() as s:
            s.add(_Note(body="confidential"))
            s.commit()
        with engine.connect() as conn:
            edek, body = conn.execute(text("SELECT cmk_edek, body FROM aws_notes")).one()
    finally:
        engine.dispose()

    (tmp_path / "edek.bin").write_bytes(edek)
    monkeypatch.chdir(tmp_path)
    script = doc_block("python", 'Path("edek.bin")')
    exec(compile(script, str(DOC), "exec"), {})
    printed = capsys.readouterr().out
    assert f"tenant acme key {arn}" in printed
    context = json.loads((tmp_path / "context.json").read_text())
    assert context == {"tenant": "acme", "data_label": "patient-notes"}

    command = doc_block("sh", "aws kms decrypt")
    assert DOC_ARN in command
    words = shlex.split(command.replace(DOC_ARN, arn).replace("\\\n", " "))
    assert words[:3] == ["aws", "kms", "decrypt"]
    pipe = words.index("|")
    assert words[pipe:] == ["|", "base64", "--decode", ">", "data-key.bin"]
    options = dict(zip(words[3:pipe:2], words[4:pipe:2], strict=True))
    assert options["--query"] == "Plaintext" and options["--output"] == "text"
    assert options["--region"] == arn.split(":")[3]
    blob_path = options["--ciphertext-blob"].removeprefix("fileb://")
    context_path = options["--encryption-context"].removeprefix("file://")
    # What the AWS CLI sends for that command: the file's bytes, the file's JSON.
    client = kms.client(options["--region"])
    kms.clear()
    answer = client.decrypt(
        KeyId=options["--key-id"],
        CiphertextBlob=(tmp_path / blob_path).read_bytes(),
        EncryptionContext=json.loads((tmp_path / context_path).read_text()),
    )
    data_key = answer["Plaintext"]
    assert len(data_key) == 32
    (sent,) = kms.of("Decrypt")
    assert (sent.key_id, sent.context) == (arn, context)

    # The key opens the stored value (layouts of sqlalchemy_cmk/_format.py).
    row_id, _ = split_companion(edek)
    aad = aad_prefix("acme", "aws_notes", "body") + row_id
    assert open_(AESGCM(data_key), aad, body).endswith(b"confidential")

    # The label is bound: without it, or with another, KMS refuses.
    blob = (tmp_path / blob_path).read_bytes()
    for wrong in ({"tenant": "acme"}, {"tenant": "acme", "data_label": "billing"}):
        with pytest.raises(ClientError) as info:
            client.decrypt(KeyId=arn, CiphertextBlob=blob, EncryptionContext=wrong)
        assert info.value.response["Error"]["Code"] == "InvalidCiphertextException"


def test_docs_testing_example_runs() -> None:
    example = doc_block("python", "from sqlalchemy_cmk.testing.aws_kms import LocalKms")
    namespace: dict[str, Any] = {}
    exec(compile(example, str(DOC), "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert len(tests) == 1
    tests[0]()


def test_docs_no_longer_send_users_to_plain_moto() -> None:
    page = DOC.read_text()
    assert "_aws_server" not in page
    assert "python -m sqlalchemy_cmk.testing.aws_kms --port 0" in doc_block("sh", "--port")
    assert "pip install 'sqlalchemy-cmk[aws-testing]'" in page
