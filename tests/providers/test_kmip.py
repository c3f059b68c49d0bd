"""The KMIP provider against a real PyKMIP 0.11 server over TLS 1.2 with client certificates.

The server runs as a subprocess on 127.0.0.1 (see ``_kmip_server.py``). Two identities talk to
it, as in an on-premises deployment: the operator (``kmip-operator``) creates, activates,
revokes and destroys keys; the application (``sqlalchemy-cmk-app``) only encrypts and decrypts
through :class:`KmipProvider`. The application's access is withdrawn and given back by
rewriting the key's operation policy (the server reloads it within a second), because a KMIP
Revoke is final: the contract's revoke/restore fixtures use the policy, and the test of a real
Revoke uses a key of its own.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sqlalchemy_cmk.errors import (
    ConfigurationError,
    DecryptionError,
    KeyAccessDeniedError,
    KeyNotFoundError,
    KMSUnavailableError,
)
from sqlalchemy_cmk.providers.kmip import KmipProvider
from sqlalchemy_cmk.testing.contract import KeyProviderContract

from ._kmip_server import APPLICATION, KmipTestServer, free_port

with warnings.catch_warnings():
    # Importing any of PyKMIP 0.11 calls SQLAlchemy's deprecated declarative_base() once.
    warnings.filterwarnings(
        "ignore", message=r".*declarative_base\(\)", category=DeprecationWarning
    )
    from kmip.core import enums
    from kmip.pie.exceptions import KmipOperationFailure
    from kmip.pie.objects import SymmetricKey

ACME = {"tenant": "acme"}
#: The operation policy of the contract's key, which revoke/restore rewrite.
CONTRACT_POLICY = "cmk-acme"
#: The policy of the other keys: the application may always use them.
SHARED_POLICY = "cmk-shared"


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Kmip:
    """The running server, the operator's client, and factories for the application."""

    def __init__(self, server: KmipTestServer) -> None:
        self.server = server
        pki = server.pki
        self.operator = KmipProvider.tls_client_factory(
            "127.0.0.1", server.port, cert=pki.operator.cert, key=pki.operator.key, ca=pki.ca
        )()
        self.operator.open()
        self._lock = threading.Lock()

    def app_factory(self, **kwargs: Any) -> Callable[[], Any]:
        pki = self.server.pki
        options: dict[str, Any] = {
            "cert": pki.application.cert,
            "key": pki.application.key,
            "ca": pki.ca,
            "timeout": 3.0,
        }
        options.update(kwargs)
        return KmipProvider.tls_client_factory("127.0.0.1", self.server.port, **options)

    def new_key(self, policy: str = SHARED_POLICY) -> str:
        """Create and activate an AES-256 key as the operator; return its unique identifier."""
        with self._lock:
            uid: str = self.operator.create(
                enums.CryptographicAlgorithm.AES, 256, operation_policy_name=policy
            )
            self.operator.activate(uid)
        return uid

    def app_can_use(self, uid: str) -> bool:
        client = self.app_factory()()
        client.open()
        try:
            client.encrypt(
                os.urandom(32),
                uid=uid,
                cryptographic_parameters={
                    "cryptographic_algorithm": enums.CryptographicAlgorithm.AES,
                    "block_cipher_mode": enums.BlockCipherMode.CTR,
                },
                iv_counter_nonce=os.urandom(16),
            )
        except KmipOperationFailure as exc:
            assert exc.reason == enums.ResultReason.PERMISSION_DENIED
            return False
        finally:
            client.close()
        return True

    def set_app_access(self, uid: str, policy: str, allowed: bool) -> None:
        self.server.set_policy(policy, application_allowed=allowed)
        _wait_for(f"the policy change ({allowed=})", lambda: self.app_can_use(uid) is allowed)

    def close(self) -> None:
        self.operator.close()


@pytest.fixture(scope="module")
def kmip(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kmip]:
    server = KmipTestServer(tmp_path_factory.mktemp("kmip"))
    server.set_policy(CONTRACT_POLICY, application_allowed=True)
    server.set_policy(SHARED_POLICY, application_allowed=True)
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        msg = f"the PyKMIP server could not start: {exc}"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI is set: the KMIP tests must run)")
        pytest.skip(msg)
    kmip = None
    try:
        kmip = Kmip(server)

        def policies_loaded() -> bool:  # the monitor loads policy files a second after start
            try:
                kmip.new_key(CONTRACT_POLICY)
            except KmipOperationFailure:
                return False
            return True

        _wait_for("the server to load its operation policies", policies_loaded)
        yield kmip
    finally:
        if kmip is not None:
            kmip.close()
        server.stop()


@pytest.fixture(scope="module")
def contract_uid(kmip: Kmip) -> str:
    return kmip.new_key(CONTRACT_POLICY)


@pytest.fixture
def app(kmip: Kmip) -> Iterator[KmipProvider]:
    provider = KmipProvider(kmip.app_factory(), pool_size=4)
    yield provider
    provider.close()


class TestKmipProviderContract(KeyProviderContract):
    @pytest.fixture
    def provider(self, app: KmipProvider) -> KmipProvider:
        return app

    @pytest.fixture
    def key_ref(self, contract_uid: str) -> str:
        return f"kmip://{contract_uid}"

    @pytest.fixture
    def missing_key_ref(self) -> str:
        return "kmip://no-such-key"

    @pytest.fixture
    def revoke(self, kmip: Kmip) -> Callable[[str], None]:
        # Withdraw the application's grant in the key's operation policy (PERMISSION_DENIED
        # from then on); a KMIP Revoke would be final, see test_kmip_revoke_is_final.
        return lambda ref: kmip.set_app_access(ref.removeprefix("kmip://"), CONTRACT_POLICY, False)

    @pytest.fixture
    def restore(self, kmip: Kmip) -> Callable[[str], None]:
        return lambda ref: kmip.set_app_access(ref.removeprefix("kmip://"), CONTRACT_POLICY, True)

    @pytest.fixture
    def unavailable_provider(self, kmip: Kmip) -> Iterator[KmipProvider]:
        pki = kmip.server.pki
        provider = KmipProvider.connect(
            "127.0.0.1",
            free_port(),  # nothing listens there
            cert=pki.application.cert,
            key=pki.application.key,
            ca=pki.ca,
            timeout=1.0,
        )
        yield provider
        provider.close()


# -- KMIP lifecycle ------------------------------------------------------------------------------


def test_kmip_revoke_is_final(kmip: Kmip, app: KmipProvider) -> None:
    uid = kmip.new_key()
    ref = f"kmip://{uid}"
    dek = os.urandom(32)
    wrapped = app.wrap_key(ref, dek, ACME)
    kmip.operator.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid)
    with pytest.raises(KeyAccessDeniedError, match="PERMISSION_DENIED") as info:
        app.unwrap_key(ref, wrapped, ACME)
    assert isinstance(info.value.__cause__, KmipOperationFailure)
    assert info.value.key_ref == ref and info.value.provider == "kmip"
    with pytest.raises(KeyAccessDeniedError):
        app.wrap_key(ref, os.urandom(32), ACME)
    # KMIP has no way back from Deactivated: Activate only applies to Pre-Active keys.
    with pytest.raises(KmipOperationFailure):
        kmip.operator.activate(uid)


def test_destroyed_key_is_not_found(kmip: Kmip, app: KmipProvider) -> None:
    uid = kmip.new_key()
    ref = f"kmip://{uid}"
    wrapped = app.wrap_key(ref, os.urandom(32), ACME)
    kmip.operator.revoke(enums.RevocationReasonCode.KEY_COMPROMISE, uid)
    kmip.operator.destroy(uid)
    # PyKMIP deletes a destroyed object; servers that keep its metadata answer
    # WRONG_KEY_LIFECYCLE_STATE or OBJECT_DESTROYED, which map to KeyAccessDeniedError.
    with pytest.raises(KeyNotFoundError, match="ITEM_NOT_FOUND"):
        app.unwrap_key(ref, wrapped, ACME)


def test_a_wrapped_key_does_not_unwrap_under_another_key(kmip: Kmip, app: KmipProvider) -> None:
    one, other = f"kmip://{kmip.new_key()}", f"kmip://{kmip.new_key()}"
    wrapped = app.wrap_key(one, os.urandom(32), ACME)
    with pytest.raises(DecryptionError):
        app.unwrap_key(other, wrapped, ACME)


def test_operator_audit_log_shows_the_application(kmip: Kmip, app: KmipProvider) -> None:
    ref = f"kmip://{kmip.new_key()}"
    app.unwrap_key(ref, app.wrap_key(ref, os.urandom(32), ACME), ACME)
    log = kmip.server.log_path.read_text()
    assert f"Session client identity: {APPLICATION}" in log
    assert "Processing operation: Encrypt" in log
    assert "Processing operation: Decrypt" in log


# -- the wrapped format ----------------------------------------------------------------------


def test_wrapped_layout_records_the_data_label(kmip: Kmip, app: KmipProvider) -> None:
    ref = f"kmip://{kmip.new_key()}"
    dek = os.urandom(32)
    wrapped = app.wrap_key(ref, dek, {"tenant": "acme", "data_label": "PHI"})
    assert wrapped[0] == 1 and wrapped[1] == 3 and wrapped[2:5] == b"PHI"
    assert len(wrapped) == 2 + 3 + 16 + 32 + 12 + 48
    assert dek not in wrapped
    # The label is authenticated: another label of the same length does not unwrap.
    with pytest.raises(DecryptionError):
        app.unwrap_key(ref, wrapped[:2] + b"PII" + wrapped[5:], ACME)
    unlabelled = app.wrap_key(ref, dek, ACME)
    assert unlabelled[1] == 0 and len(unlabelled) == 110
    assert app.unwrap_key(ref, unlabelled, ACME) == dek


def _known_key(kmip: Kmip, value: bytes) -> str:
    key = SymmetricKey(
        enums.CryptographicAlgorithm.AES,
        256,
        value,
        masks=[enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT],
    )
    key.operation_policy_name = SHARED_POLICY
    uid: str = kmip.operator.register(key)
    kmip.operator.activate(uid)
    return uid


def _aad(header: bytes, uid: str, tenant: str) -> bytes:
    def lp(text: str) -> bytes:
        return len(text.encode()).to_bytes(4, "big") + text.encode()

    return b"sqlalchemy-cmk/kmip-wrap/v1\x00" + header + lp(uid) + lp(tenant)


def test_format_v1_known_answer(kmip: Kmip, app: KmipProvider) -> None:
    """The documented layout, built and opened here with plain AES: pins format version 1."""
    master, kek, dek = bytes(range(32)), bytes(range(32, 64)), bytes(range(64, 96))
    counter, nonce = bytes(range(96, 112)), bytes(range(112, 124))
    uid = _known_key(kmip, master)
    ref = f"kmip://{uid}"

    ctr = Cipher(algorithms.AES(master), modes.CTR(counter)).encryptor()
    header = b"\x01\x03PHI" + counter + ctr.update(kek) + ctr.finalize()
    sealed = AESGCM(kek).encrypt(nonce, dek, _aad(header, uid, "acme"))
    assert app.unwrap_key(ref, header + nonce + sealed, ACME) == dek

    wrapped = app.wrap_key(ref, dek, {"tenant": "acme", "data_label": "PHI"})
    counter, encrypted_kek = wrapped[5:21], wrapped[21:53]
    ctr = Cipher(algorithms.AES(master), modes.CTR(counter)).decryptor()
    their_kek = ctr.update(encrypted_kek) + ctr.finalize()
    assert (
        AESGCM(their_kek).decrypt(wrapped[53:65], wrapped[65:], _aad(wrapped[:53], uid, "acme"))
        == dek
    )


def test_long_labels_are_cut_at_a_character_boundary(kmip: Kmip, app: KmipProvider) -> None:
    ref = f"kmip://{kmip.new_key()}"
    dek = os.urandom(32)
    wrapped = app.wrap_key(ref, dek, {"tenant": "acme", "data_label": "é" * 200})
    assert wrapped[1] == 254 and wrapped[2:256].decode() == "é" * 127
    assert app.unwrap_key(ref, wrapped, ACME) == dek


def test_every_byte_is_authenticated(kmip: Kmip, app: KmipProvider) -> None:
    ref = f"kmip://{kmip.new_key()}"
    wrapped = app.wrap_key(ref, os.urandom(32), {"tenant": "acme", "data_label": "x"})
    for i in range(2, len(wrapped)):  # past the version and the length, checked without a call
        with pytest.raises(DecryptionError):
            app.unwrap_key(ref, wrapped[:i] + bytes([wrapped[i] ^ 0x80]) + wrapped[i + 1 :], ACME)


# -- routing -------------------------------------------------------------------------------------


def test_named_servers(kmip: Kmip) -> None:
    name = f"127.0.0.1:{kmip.server.port}"
    provider = KmipProvider(kmip.app_factory(), servers={name: kmip.app_factory()})
    try:
        uid = kmip.new_key()
        dek = os.urandom(32)
        wrapped = provider.wrap_key(f"kmip://{name}/{uid}", dek, ACME)
        assert provider.unwrap_key(f"kmip://{name}/{uid}", wrapped, ACME) == dek
        # The key's unique identifier is bound, not the server's name in the reference.
        assert provider.unwrap_key(f"kmip://{uid}", wrapped, ACME) == dek
        with pytest.raises(KeyNotFoundError, match="no KMIP server named 'elsewhere:5696'"):
            provider.wrap_key(f"kmip://elsewhere:5696/{uid}", dek, ACME)
        assert "127.0.0.1" in repr(provider) and "<default>" in repr(provider)
    finally:
        provider.close()
    named_only = KmipProvider(servers={name: kmip.app_factory()})
    with pytest.raises(KeyNotFoundError, match="no default KMIP server"):
        named_only.wrap_key("kmip://1", os.urandom(32), ACME)


@pytest.mark.parametrize("ref", ["local://1", "kmip://", "kmip://server/"])
def test_malformed_references(app: KmipProvider, ref: str) -> None:
    with pytest.raises(KeyNotFoundError):
        app.wrap_key(ref, os.urandom(32), ACME)


def test_configuration_errors(kmip: Kmip, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="needs a client_factory"):
        KmipProvider()
    with pytest.raises(ConfigurationError, match="pool_size"):
        KmipProvider(kmip.app_factory(), pool_size=0)
    with pytest.raises(ConfigurationError, match="contain no '/'"):
        KmipProvider(servers={"a/b": kmip.app_factory()})
    with pytest.raises(ConfigurationError, match="cannot load the KMIP TLS files"):
        KmipProvider.connect("127.0.0.1", cert=tmp_path / "no.crt", key="no.key", ca="no.ca")
    provider = KmipProvider(kmip.app_factory())
    with pytest.raises(ConfigurationError, match="32-byte"):
        provider.wrap_key(f"kmip://{kmip.new_key()}", os.urandom(16), ACME)
    provider.close()


# -- transport: TLS, timeouts, broken connections -------------------------------------------


def test_client_certificate_from_another_ca_is_refused(kmip: Kmip) -> None:
    pki = kmip.server.pki
    provider = KmipProvider(kmip.app_factory(cert=pki.stranger.cert, key=pki.stranger.key))
    with pytest.raises(KMSUnavailableError, match="TLS to the KMIP server failed") as info:
        provider.wrap_key(f"kmip://{kmip.new_key()}", os.urandom(32), ACME)
    assert info.value.retryable is False  # a refused certificate: no retry cures it


def test_server_certificate_is_verified(kmip: Kmip) -> None:
    other_ca = str(Path(kmip.server.pki.ca).with_name("other-ca.crt"))
    provider = KmipProvider(kmip.app_factory(ca=other_ca))
    with pytest.raises(KMSUnavailableError, match="SSLCertVerificationError") as info:
        provider.wrap_key(f"kmip://{kmip.new_key()}", os.urandom(32), ACME)
    assert info.value.retryable is False


def test_tls_failures_are_not_retried_by_the_key_manager(kmip: Kmip) -> None:
    # As Vault's are not: a certificate problem fails the flush at once, one connection tried.
    from sqlalchemy_cmk import CMK, tenant_context

    other_ca = str(Path(kmip.server.pki.ca).with_name("other-ca.crt"))
    factory = _Recording(kmip.app_factory(ca=other_ca))
    provider = KmipProvider(factory)
    cmk = CMK(
        provider,
        tenant_keys={"acme": f"kmip://{kmip.new_key()}"},
        retry_attempts=3,
        retry_backoff=0,
        audit_sinks=[],
    )
    with tenant_context("acme"), pytest.raises(KMSUnavailableError, match="1 attempt"):
        cmk.encrypt_document({"f": b"x"})
    assert len(factory.made) == 1


def test_a_silent_server_times_out(kmip: Kmip) -> None:
    pki = kmip.server.pki
    with socket.socket() as silent:  # accepts TCP (backlog) and never speaks TLS
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        provider = KmipProvider.connect(
            "127.0.0.1",
            silent.getsockname()[1],
            cert=pki.application.cert,
            key=pki.application.key,
            ca=pki.ca,
            timeout=0.5,
        )
        started = time.monotonic()
        with pytest.raises(KMSUnavailableError, match="timed out"):
            provider.wrap_key("kmip://1", os.urandom(32), ACME)
        assert time.monotonic() - started < 3


class _Recording:
    """A client factory that keeps the real clients it made, to break their connections."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self.made: list[Any] = []

    def __call__(self) -> Any:
        client = self._factory()
        self.made.append(client)
        return client


def test_a_connection_dropped_while_idle_is_replaced(kmip: Kmip) -> None:
    factory = _Recording(kmip.app_factory())
    provider = KmipProvider(factory, pool_size=1)
    ref = f"kmip://{kmip.new_key()}"
    dek = os.urandom(32)
    wrapped = provider.wrap_key(ref, dek, ACME)
    assert len(factory.made) == 1
    factory.made[0].proxy.socket.shutdown(socket.SHUT_RDWR)  # as a server's idle timeout would
    assert provider.unwrap_key(ref, wrapped, ACME) == dek
    assert len(factory.made) == 2
    provider.close()


def test_pool_bounds_connections_under_concurrency(kmip: Kmip) -> None:
    factory = _Recording(kmip.app_factory())
    provider = KmipProvider(factory, pool_size=2)
    ref = f"kmip://{kmip.new_key()}"
    deks = [os.urandom(32) for _ in range(40)]

    def round_trip(dek: bytes) -> bytes:
        return provider.unwrap_key(ref, provider.wrap_key(ref, dek, ACME), ACME)

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(round_trip, deks)) == deks
    assert 1 <= len(factory.made) <= 2
    provider.close()


# -- error mapping for answers PyKMIP's server does not give -------------------------------------


class _Faulty:
    """A real client whose next encrypt/decrypt raises the given error instead (fault injection)."""

    def __init__(self, real: Any, fault: BaseException) -> None:
        self._real = real
        self._fault = fault
        self.closed = False

    def open(self) -> None:
        self._real.open()

    def close(self) -> None:
        self.closed = True
        self._real.close()

    def encrypt(self, *args: Any, **kwargs: Any) -> Any:
        raise self._fault

    decrypt = encrypt


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (enums.ResultReason.WRONG_KEY_LIFECYCLE_STATE, KeyAccessDeniedError),
        (enums.ResultReason.PERMISSION_DENIED, KeyAccessDeniedError),
        (enums.ResultReason.ITEM_NOT_FOUND, KeyNotFoundError),
        (enums.ResultReason.GENERAL_FAILURE, KMSUnavailableError),
        (enums.ResultReason.SERVER_LIMIT_EXCEEDED, KMSUnavailableError),
        (enums.ResultReason.INVALID_FIELD, KeyAccessDeniedError),
    ],
)
def test_result_reasons_map(kmip: Kmip, reason: Any, expected: type[Exception]) -> None:
    fault = KmipOperationFailure(enums.ResultStatus.OPERATION_FAILED, reason, "injected")
    made: list[_Faulty] = []

    def factory() -> _Faulty:
        made.append(_Faulty(kmip.app_factory()(), fault))
        return made[-1]

    provider = KmipProvider(factory, pool_size=1)
    with pytest.raises(expected, match=reason.name) as info:
        provider.wrap_key("kmip://1", os.urandom(32), ACME)
    assert info.value.__cause__ is fault
    assert not made[0].closed  # a KMIP answer leaves the connection usable
    provider.close()


def test_a_timeout_mid_call_drops_the_connection(kmip: Kmip) -> None:
    made: list[_Faulty] = []

    def factory() -> _Faulty:
        made.append(_Faulty(kmip.app_factory()(), TimeoutError("timed out")))
        return made[-1]

    provider = KmipProvider(factory, pool_size=1)
    with pytest.raises(KMSUnavailableError, match="TimeoutError"):
        provider.wrap_key("kmip://1", os.urandom(32), ACME)
    assert len(made) == 1 and made[0].closed  # a fresh connection is not retried
    with pytest.raises(KMSUnavailableError):
        provider.wrap_key("kmip://1", os.urandom(32), ACME)
    assert len(made) == 2
    provider.close()


def test_a_hung_handshake_ends_with_kms_deadline(kmip: Kmip) -> None:
    # The provider's own timeout is 5 s; the key manager's deadline of 0.5 s cuts the socket's,
    # so the abandoned call's thread and connection do not outlive the deadline by much.
    from sqlalchemy_cmk import CMK, tenant_context

    pki = kmip.server.pki
    with socket.socket() as silent:  # accepts TCP (backlog) and never speaks TLS
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        provider = KmipProvider.connect(
            "127.0.0.1",
            silent.getsockname()[1],
            cert=pki.application.cert,
            key=pki.application.key,
            ca=pki.ca,
            timeout=5.0,
        )
        cmk = CMK(
            provider,
            tenant_keys={"acme": "kmip://1"},
            kms_deadline=0.5,
            retry_attempts=1,
            audit_sinks=[],
        )
        started = time.monotonic()
        with tenant_context("acme"), pytest.raises(KMSUnavailableError):
            cmk.encrypt_document({"f": b"x"})
        assert time.monotonic() - started < 1.0

        def kms_threads() -> int:
            return sum(t.name == "sqlalchemy-cmk-kms" for t in threading.enumerate())

        while kms_threads() and time.monotonic() - started < 6.0:
            time.sleep(0.05)
        assert time.monotonic() - started < 1.5  # not the provider's 5 s
        provider.close()


def test_docs_tenant_decrypts_a_data_key_with_its_own_tools(
    kmip: Kmip, app: KmipProvider, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The page's PyKMIP script, run as the operator against the local server, recovers the
    data key from a stored companion."""
    import warnings

    from ._tenant_tools import companion, doc_block

    uid = kmip.new_key()
    key_ref = f"kmip://{uid}"
    dek = os.urandom(32)
    wrapped = app.wrap_key(key_ref, dek, {"tenant": "acme", "data_label": "PHI"})
    (tmp_path / "edek.bin").write_bytes(companion("acme", "kmip", key_ref, wrapped))
    pki = kmip.server.pki
    script = doc_block("kmip.md", "python", 'Path("edek.bin")')
    for doc_value, local in (
        ('"kms.acme.example"', '"127.0.0.1"'),
        ("port=5696", f"port={kmip.server.port}"),
        ('"operator.crt"', repr(str(pki.operator.cert))),
        ('"operator.key"', repr(str(pki.operator.key))),
        ('"ca.crt"', repr(str(pki.ca))),
    ):
        assert doc_value in script
        script = script.replace(doc_value, local)
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        with warnings.catch_warnings():
            # PyKMIP's own client builds its TLS context from a deprecated protocol constant.
            warnings.simplefilter("ignore", DeprecationWarning)
            exec(compile(script, "docs/providers/kmip.md", "exec"), {})
    finally:
        os.chdir(old)
    assert (tmp_path / "data-key.bin").read_bytes() == dek
    assert f"tenant acme key {uid} label PHI" in capsys.readouterr().out
