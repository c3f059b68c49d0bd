"""The Azure Key Vault provider, with the real azure-keyvault-keys clients against a local vault.

The vault (``sqlalchemy_cmk.testing.azure_keyvault``) serves HTTPS on 127.0.0.1 with a CA made
for the session; the clients authenticate with a static test credential, so nothing reaches
Entra ID, IMDS or Azure.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.keyvault.keys import KeyClient
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sqlalchemy_cmk.errors import (
    ConfigurationError,
    DecryptionError,
    KeyAccessDeniedError,
    KeyNotFoundError,
    KMSUnavailableError,
)
from sqlalchemy_cmk.providers.azure import AzureKeyVaultProvider
from sqlalchemy_cmk.testing.azure_keyvault import (
    ENTRA_TENANT,
    TOKEN,
    KeyVaultServer,
    StaticTokenCredential,
)
from sqlalchemy_cmk.testing.contract import KeyProviderContract

ACME = {"tenant": "acme"}
GLOBEX = {"tenant": "globex"}


@pytest.fixture(scope="session")
def azure_vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyVaultServer]:
    try:
        server = KeyVaultServer(tmp_path_factory.mktemp("azure-kv")).start()
    except OSError as exc:  # pragma: no cover - depends on the machine
        msg = f"the local Key Vault server could not start: {exc}"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI is set: the Azure provider tests must run)")
        pytest.skip(msg)
    server.create_rsa_key("acme")
    server.create_rsa_key("globex")
    server.create_oct_hsm_key("hsm-acme")
    yield server
    server.stop()


@pytest.fixture
def vault(azure_vault: KeyVaultServer) -> Iterator[KeyVaultServer]:
    azure_vault.reset()
    yield azure_vault
    azure_vault.reset()


def client_options(ca_file: Path, **options: Any) -> dict[str, Any]:
    return {
        "connection_verify": str(ca_file),  # trust the test CA only
        # The challenge names https://vault.azure.net, which is not 127.0.0.1.
        "verify_challenge_resource": False,
        "connection_timeout": 2.0,
        "read_timeout": 5.0,
        **options,
    }


def make_provider(
    vault: KeyVaultServer, credential: Any = None, **options: Any
) -> AzureKeyVaultProvider:
    """A provider as an application builds it, but trusting the test CA."""
    return AzureKeyVaultProvider.from_credential(
        credential or StaticTokenCredential(), **client_options(vault.ca_file, **options)
    )


def dead_provider(ca_file: Path) -> AzureKeyVaultProvider:
    """Injected client factories that send every vault's traffic to a port nobody listens on."""
    url = dead_url()
    credential = StaticTokenCredential()
    options = client_options(ca_file, retry_total=1)
    return AzureKeyVaultProvider(
        key_client_factory=lambda _vault_url: KeyClient(url, credential, **options),
        crypto_client_factory=lambda kid: CryptographyClient(
            url + kid[kid.index("/keys/") :], credential, **options
        ),
    )


@pytest.fixture
def provider(vault: KeyVaultServer) -> Iterator[AzureKeyVaultProvider]:
    with make_provider(vault) as p:
        yield p


def ref(vault: KeyVaultServer, name: str, version: str | None = None) -> str:
    return f"azure-kv://{vault.host}/keys/{name}" + (f"/{version}" if version else "")


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"https://127.0.0.1:{port}"


def current_version(vault: KeyVaultServer, name: str) -> str:
    return vault.keys[name].versions[-1].version


def split(wrapped: bytes) -> dict[str, Any]:
    """Parse the documented layout independently of the provider."""
    version, alg, kid_len = struct.unpack_from(">BBH", wrapped)
    kid = wrapped[4 : 4 + kid_len].decode()
    (kek_len,) = struct.unpack_from(">H", wrapped, 4 + kid_len)
    end = 6 + kid_len + kek_len
    return {
        "version": version,
        "alg": alg,
        "kid": kid,
        "kek_at": 6 + kid_len,
        "end": end,
        "nonce": wrapped[end : end + 12],
        "sealed": wrapped[end + 12 :],
    }


# -- the contract, with an RSA key (revoked by disabling it) and an oct-HSM key (by removing the
# -- app's role) -----------------------------------------------------------------------------------


class TestAzureRsaKeyContract(KeyProviderContract):
    @pytest.fixture
    def key_ref(self, vault: KeyVaultServer) -> str:
        return ref(vault, "acme")

    @pytest.fixture
    def missing_key_ref(self, vault: KeyVaultServer) -> str:
        return ref(vault, "nobody")

    @pytest.fixture
    def revoke(self, vault: KeyVaultServer) -> Callable[[str], None]:
        return lambda key_ref: vault.disable(key_ref.rsplit("/", 1)[-1])

    @pytest.fixture
    def restore(self, vault: KeyVaultServer) -> Callable[[str], None]:
        return lambda key_ref: vault.enable(key_ref.rsplit("/", 1)[-1])

    @pytest.fixture
    def unavailable_provider(self, vault: KeyVaultServer) -> Iterator[AzureKeyVaultProvider]:
        with dead_provider(vault.ca_file) as p:
            yield p


class TestAzureManagedHsmKeyContract(TestAzureRsaKeyContract):
    @pytest.fixture
    def key_ref(self, vault: KeyVaultServer) -> str:
        return ref(vault, "hsm-acme")

    @pytest.fixture
    def revoke(self, vault: KeyVaultServer) -> Callable[[str], None]:
        return lambda key_ref: vault.deny(key_ref.rsplit("/", 1)[-1])

    @pytest.fixture
    def restore(self, vault: KeyVaultServer) -> Callable[[str], None]:
        return lambda key_ref: vault.allow(key_ref.rsplit("/", 1)[-1])


# -- tenant binding --------------------------------------------------------------------------------


def test_a_wrapped_key_moved_to_another_tenant_fails(
    provider: AzureKeyVaultProvider, vault: KeyVaultServer
) -> None:
    dek = os.urandom(32)
    wrapped = provider.wrap_key(ref(vault, "acme"), dek, {"tenant": "acme", "data_label": "PHI"})
    # Same vault key (a shared key): the vault unwraps the KEK, the tenant-bound GCM layer refuses.
    before = vault.counts["unwrapkey"]
    with pytest.raises(DecryptionError) as info:
        provider.unwrap_key(ref(vault, "acme"), wrapped, GLOBEX)
    assert vault.counts["unwrapkey"] == before + 1
    assert dek.hex() not in str(info.value)
    # Copied next to globex's key reference: refused before the vault is asked.
    with pytest.raises(DecryptionError):
        provider.unwrap_key(ref(vault, "globex"), wrapped, GLOBEX)
    with pytest.raises(DecryptionError):
        provider.unwrap_key(ref(vault, "globex"), wrapped, ACME)
    assert vault.counts["unwrapkey"] == before + 1
    assert provider.unwrap_key(ref(vault, "acme"), wrapped, ACME) == dek


def test_the_header_is_authenticated(
    provider: AzureKeyVaultProvider, vault: KeyVaultServer
) -> None:
    # The recorded key id, algorithm and wrapped KEK are in the GCM AAD: a key sealed without
    # them (as a tampered header would be) does not authenticate, though the vault unwraps it.
    before = vault.counts["unwrapkey"]
    with pytest.raises(DecryptionError):
        provider.unwrap_key(ref(vault, "acme"), make_wrapped(vault, header_in_aad=False), ACME)
    assert vault.counts["unwrapkey"] == before + 1
    # Re-pointing the recorded key id at another version of the key fails too.
    vault.create_rsa_key("repointed")
    key_ref = ref(vault, "repointed")
    wrapped = provider.wrap_key(key_ref, os.urandom(32), ACME)
    old_kid = split(wrapped)["kid"]
    kid = old_kid.rsplit("/", 1)[0] + "/" + vault.rotate("repointed")
    forged = wrapped[:2] + struct.pack(">H", len(kid)) + kid.encode() + wrapped[4 + len(old_kid) :]
    with pytest.raises(DecryptionError):
        provider.unwrap_key(key_ref, forged, ACME)


# -- key versions ----------------------------------------------------------------------------------


def test_the_key_version_is_recorded_and_used_to_unwrap(
    provider: AzureKeyVaultProvider, vault: KeyVaultServer
) -> None:
    vault.create_rsa_key("rotating")
    key_ref = ref(vault, "rotating")
    v1 = current_version(vault, "rotating")
    dek1 = os.urandom(32)
    old = provider.wrap_key(key_ref, dek1, ACME)
    assert split(old)["kid"] == f"{vault.url}/keys/rotating/{v1}"

    v2 = vault.rotate("rotating")
    dek2 = os.urandom(32)
    new = provider.wrap_key(key_ref, dek2, ACME)
    assert split(new)["kid"].endswith(f"/{v2}")  # new wraps follow the current version

    assert provider.unwrap_key(key_ref, old, ACME) == dek1
    assert provider.unwrap_key(key_ref, new, ACME) == dek2
    assert vault.counts[f"unwrapkey:{v1}"] == 1
    assert vault.counts[f"unwrapkey:{v2}"] == 1

    # A reference pinned to v1 wraps with v1 and refuses a key wrapped with v2.
    pinned = ref(vault, "rotating", v1)
    assert split(provider.wrap_key(pinned, dek1, ACME))["kid"].endswith(f"/{v1}")
    assert provider.unwrap_key(pinned, old, ACME) == dek1
    with pytest.raises(DecryptionError):
        provider.unwrap_key(pinned, new, ACME)


def test_an_unknown_version_is_not_found(
    provider: AzureKeyVaultProvider, vault: KeyVaultServer
) -> None:
    with pytest.raises(KeyNotFoundError):
        provider.wrap_key(ref(vault, "acme", "0" * 32), os.urandom(32), ACME)


# -- the calls the tenant sees in its logs ---------------------------------------------------------


def test_calls_per_operation(provider: AzureKeyVaultProvider, vault: KeyVaultServer) -> None:
    # What docs/providers/azure.md tells tenants their AuditEvent log shows.
    wrapped = provider.wrap_key(ref(vault, "acme"), os.urandom(32), ACME)
    provider.unwrap_key(ref(vault, "acme"), wrapped, ACME)
    vault.counts.clear()
    wrapped = provider.wrap_key(ref(vault, "acme"), os.urandom(32), ACME)
    assert (vault.counts["get"], vault.counts["wrapkey"]) == (1, 0)  # RSA: KeyGet, local wrap
    provider.unwrap_key(ref(vault, "acme"), wrapped, ACME)
    # KeyGet (the current version must be enabled), KeyUnwrap at the vault
    assert (vault.counts["get"], vault.counts["unwrapkey"]) == (2, 1)

    hsm = ref(vault, "hsm-acme")
    vault.counts.clear()
    wrapped = provider.wrap_key(hsm, os.urandom(32), ACME)
    assert (vault.counts["get"], vault.counts["wrapkey"]) == (1, 1)  # KeyGet, KeyWrap
    provider.unwrap_key(hsm, wrapped, ACME)
    assert (vault.counts["get"], vault.counts["unwrapkey"]) == (2, 1)  # KeyGet, KeyUnwrap
    assert split(wrapped)["alg"] == 2


def test_why_oct_hsm_keys_bypass_cryptography_client(vault: KeyVaultServer) -> None:
    # azure-keyvault-keys 4.11: given an oct-HSM key bundle (no key bytes), CryptographyClient
    # builds a local AES provider around a *random* key and "wraps" with it, never asking the HSM:
    # the result can never be unwrapped. If this test fails, the SDK changed: the provider may
    # then use CryptographyClient for oct-HSM keys too.
    credential = StaticTokenCredential()
    kid = f"{vault.url}/keys/hsm-acme/{current_version(vault, 'hsm-acme')}"
    with CryptographyClient(
        kid, credential, connection_verify=str(vault.ca_file), verify_challenge_resource=False
    ) as client:
        client.wrap_key(KeyWrapAlgorithm.aes_256, os.urandom(32))
    assert vault.counts["get"] == 1
    assert vault.counts["wrapkey"] == 0


# -- error mapping ---------------------------------------------------------------------------------


def test_a_removed_role_is_denied_without_the_vaults_message(
    provider: AzureKeyVaultProvider, vault: KeyVaultServer
) -> None:
    wrapped = provider.wrap_key(ref(vault, "acme"), os.urandom(32), ACME)
    vault.deny("acme")
    for call in (
        lambda: provider.wrap_key(ref(vault, "acme"), os.urandom(32), ACME),
        lambda: provider.unwrap_key(ref(vault, "acme"), wrapped, ACME),
    ):
        with pytest.raises(KeyAccessDeniedError) as info:
            call()
        assert "ForbiddenByRbac" in str(info.value)
        assert "Caller is not authorized" not in str(info.value)  # no response bodies
        assert info.value.key_ref == ref(vault, "acme") and info.value.provider == "azure-kv"
        assert info.value.__cause__ is not None


def test_a_disabled_key_says_so(provider: AzureKeyVaultProvider, vault: KeyVaultServer) -> None:
    vault.disable("acme")
    with pytest.raises(KeyAccessDeniedError, match="403 Forbidden KeyDisabled"):
        provider.wrap_key(ref(vault, "acme"), os.urandom(32), ACME)


def test_a_key_without_wrap_permission_is_denied(
    provider: AzureKeyVaultProvider, vault: KeyVaultServer
) -> None:
    vault.create_rsa_key("sign-only", key_ops=["sign", "verify"])
    with pytest.raises(KeyAccessDeniedError, match="wrapKey"):
        provider.wrap_key(ref(vault, "sign-only"), os.urandom(32), ACME)


def test_a_rejected_token_is_denied(vault: KeyVaultServer) -> None:
    credential = StaticTokenCredential("a-token-the-vault-rejects")
    with make_provider(vault, credential) as p, pytest.raises(KeyAccessDeniedError, match="401"):
        p.wrap_key(ref(vault, "acme"), os.urandom(32), ACME)
    # The SDK followed the vault's challenge to the tenant it names.
    assert credential.requests
    assert credential.requests[0] == (("https://vault.azure.net/.default",), ENTRA_TENANT)


def test_a_corrupted_wrapped_kek_is_a_decryption_error(
    provider: AzureKeyVaultProvider, vault: KeyVaultServer
) -> None:
    for name in ("acme", "hsm-acme"):
        wrapped = provider.wrap_key(ref(vault, name), os.urandom(32), ACME)
        at = split(wrapped)["kek_at"] + 5
        bad = wrapped[:at] + bytes([wrapped[at] ^ 1]) + wrapped[at + 1 :]
        before = vault.counts["unwrapkey"]
        with pytest.raises(DecryptionError):  # the vault answers 400 BadParameter
            provider.unwrap_key(ref(vault, name), bad, ACME)
        assert vault.counts["unwrapkey"] == before + 1


@pytest.mark.parametrize(("status", "code"), [(503, "ServiceUnavailable"), (429, "Throttled")])
def test_server_errors_and_throttling_are_unavailable(
    provider: AzureKeyVaultProvider, vault: KeyVaultServer, status: int, code: str
) -> None:
    wrapped = provider.wrap_key(ref(vault, "acme"), os.urandom(32), ACME)
    # Warm the unwrap client: its first call reads the key, and the SDK ignores a failed read.
    provider.unwrap_key(ref(vault, "acme"), wrapped, ACME)
    vault.fail_next(1, status, code)  # one SDK retry (retry_total=1) absorbs one fault
    provider.wrap_key(ref(vault, "acme"), os.urandom(32), ACME)
    vault.fail_next(2, status, code)
    with pytest.raises(KMSUnavailableError, match=str(status)) as info:
        provider.unwrap_key(ref(vault, "acme"), wrapped, ACME)
    assert info.value.retryable


def test_a_dead_endpoint_fails_fast(vault: KeyVaultServer) -> None:
    with dead_provider(vault.ca_file) as p:
        started = time.monotonic()
        with pytest.raises(KMSUnavailableError, match="could not be reached"):
            p.wrap_key(ref(vault, "acme"), os.urandom(32), ACME)
        with pytest.raises(KMSUnavailableError):
            p.unwrap_key(ref(vault, "acme"), make_wrapped(vault), ACME)
        assert time.monotonic() - started < 3.0


def test_a_slow_vault_times_out(vault: KeyVaultServer) -> None:
    with make_provider(vault, read_timeout=0.3, retry_total=0) as p:
        p.wrap_key(ref(vault, "acme"), os.urandom(32), ACME)  # challenge done, connection warm
        vault.stall_seconds = 1.5
        started = time.monotonic()
        with pytest.raises(KMSUnavailableError, match="did not answer"):
            p.wrap_key(ref(vault, "acme"), os.urandom(32), ACME)
        assert time.monotonic() - started < 1.2


@pytest.mark.parametrize(
    "bad_ref",
    [
        "azure-kv://",
        "azure-kv://vault.example/keys/",
        "azure-kv://vault.example/secrets/acme",
        "azure-kv://vault.example/keys/acme/v1/extra",
        "azure-kv://vault.example/keys/ac_me",
        "azure-kv://user@vault.example/keys/acme",
        "aws-kms://vault.example/keys/acme",
    ],
)
def test_malformed_key_references(provider: AzureKeyVaultProvider, bad_ref: str) -> None:
    with pytest.raises(KeyNotFoundError, match="azure-kv://<vault host>"):
        provider.wrap_key(bad_ref, os.urandom(32), ACME)
    with pytest.raises(KeyNotFoundError):
        provider.unwrap_key(bad_ref, b"\x01" * 100, ACME)


def test_data_keys_are_32_bytes(provider: AzureKeyVaultProvider, vault: KeyVaultServer) -> None:
    with pytest.raises(ConfigurationError):
        provider.wrap_key(ref(vault, "acme"), os.urandom(16), ACME)


# -- the stored format -----------------------------------------------------------------------------


def make_wrapped(
    vault: KeyVaultServer,
    dek: bytes | None = None,
    tenant: str = "acme",
    *,
    header_in_aad: bool = True,
) -> bytes:
    """A version-1 wrapped key built from the documented layout alone (not the provider)."""
    version = current_version(vault, "acme")
    kid = f"{vault.url}/keys/acme/{version}".encode()
    kek = os.urandom(32)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    wrapped_kek = vault.public_key("acme", version).encrypt(kek, oaep)
    header = (
        struct.pack(">BBH", 1, 1, len(kid))
        + kid
        + struct.pack(">H", len(wrapped_kek))
        + wrapped_kek
    )
    nonce = os.urandom(12)
    aad = (
        b"sqlalchemy-cmk/azure-kv/v1"
        + (header if header_in_aad else b"")
        + json.dumps(["tenant", tenant]).encode()
    )
    return header + nonce + AESGCM(kek).encrypt(nonce, dek or os.urandom(32), aad)


def test_the_documented_layout_unwraps(
    provider: AzureKeyVaultProvider, vault: KeyVaultServer
) -> None:
    # Pins format version 1: bytes laid out by hand from the module docstring must keep
    # unwrapping, whatever the provider's code becomes.
    dek = os.urandom(32)
    assert provider.unwrap_key(ref(vault, "acme"), make_wrapped(vault, dek), ACME) == dek
    with pytest.raises(DecryptionError):
        provider.unwrap_key(ref(vault, "acme"), make_wrapped(vault, dek, "globex"), ACME)
    parts = split(provider.wrap_key(ref(vault, "acme"), dek, ACME))
    assert (parts["version"], parts["alg"], len(parts["nonce"]), len(parts["sealed"])) == (
        1,
        1,
        12,
        48,
    )


# -- packaging and hygiene -------------------------------------------------------------------------


def test_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if not installed: no module, and no attribute left on the parent package.
    monkeypatch.setitem(sys.modules, "azure.keyvault.keys", None)
    monkeypatch.delattr(sys.modules["azure.keyvault"], "keys", raising=False)
    monkeypatch.delitem(sys.modules, "sqlalchemy_cmk.providers.azure")
    with pytest.raises(ImportError, match=r"pip install 'sqlalchemy-cmk\[azure\]'"):
        importlib.import_module("sqlalchemy_cmk.providers.azure")


def test_docs_example_runs(vault: KeyVaultServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python example of docs/providers/azure.md, against the local vault."""
    from ._tenant_tools import doc_block

    example = doc_block("azure.md", "python", "ManagedIdentityCredential(client_id=")
    example = example.replace("contoso-cmk.vault.azure.net", vault.host)
    for name in re.findall(r"/keys/([0-9A-Za-z-]+)\"", example):
        if name not in vault.keys:
            vault.create_rsa_key(name)
    built: list[dict[str, Any]] = []
    original = AzureKeyVaultProvider.from_credential.__func__  # type: ignore[attr-defined]

    def local(
        cls: type[AzureKeyVaultProvider], credential: Any, **options: Any
    ) -> AzureKeyVaultProvider:
        built.append(options)  # the example's credential is not used: it would ask Entra ID
        return original(cls, StaticTokenCredential(), **client_options(vault.ca_file, **options))

    monkeypatch.setattr(AzureKeyVaultProvider, "from_credential", classmethod(local))
    exec(compile(example, "docs/providers/azure.md", "exec"), {})
    assert built == [{"connection_timeout": 3.0, "read_timeout": 10.0, "retry_total": 1}]


def test_repr_names_vaults_only(provider: AzureKeyVaultProvider, vault: KeyVaultServer) -> None:
    provider.wrap_key(ref(vault, "acme"), os.urandom(32), ACME)
    assert repr(provider) == f"AzureKeyVaultProvider(vaults=['{vault.url}'])"
    assert TOKEN not in repr(provider)


# -- per-version state, as Key Vault keeps it (issue 8) --------------------------------------------


class Clock:
    """Monotonic seconds moved by the test: the key manager's cache and the key-state check."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_vault_keeps_enabled_per_version(vault: KeyVaultServer) -> None:
    # What the portal and `az keyvault key set-attributes --enabled false` (no --version) do:
    # the latest version is disabled, older ones keep unwrapping at the vault.
    vault.create_rsa_key("versions")
    v1 = current_version(vault, "versions")
    v2 = vault.rotate("versions")
    vault.disable("versions")
    credential = StaticTokenCredential()
    options = client_options(vault.ca_file)
    keys = KeyClient(vault.url, credential, **options)
    assert keys.get_key("versions", v1).properties.enabled is True
    with pytest.raises(Exception, match="disabled key"):
        keys.get_key("versions")  # the current version: v2
    old = CryptographyClient(f"{vault.url}/keys/versions/{v1}", credential, **options)
    kek = os.urandom(32)
    wrapped = vault.public_key("versions", v1).encrypt(
        kek,
        padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
    )
    assert old.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key == kek
    assert vault.keys["versions"].versions[1].version == v2


def test_a_key_disabled_as_the_portal_does_stops_rows_under_older_versions(
    vault: KeyVaultServer,
) -> None:
    clock = Clock()
    provider = make_provider(vault, clock=clock)
    vault.create_rsa_key("portal")
    key_ref = ref(vault, "portal")
    dek1 = os.urandom(32)
    old = provider.wrap_key(key_ref, dek1, ACME)
    vault.rotate("portal")
    new = provider.wrap_key(key_ref, os.urandom(32), ACME)
    assert provider.unwrap_key(key_ref, old, ACME) == dek1

    vault.disable("portal")  # the latest version, as the portal does
    clock.now += 0.001  # any unwrap asked for after the change reads the state afresh
    before = vault.counts["get"]
    for wrapped in (old, new):
        with pytest.raises(KeyAccessDeniedError, match="KeyDisabled"):
            provider.unwrap_key(key_ref, wrapped, ACME)
    with pytest.raises(KeyAccessDeniedError, match="KeyDisabled"):
        provider.wrap_key(key_ref, os.urandom(32), ACME)
    assert vault.counts["get"] - before == 3  # nothing cached while refused

    vault.enable("portal")
    assert provider.unwrap_key(key_ref, old, ACME) == dek1
    provider.close()


def test_the_key_state_read_is_cached_for_key_state_ttl(vault: KeyVaultServer) -> None:
    clock = Clock()
    provider = make_provider(vault, clock=clock, key_state_ttl=5.0)
    vault.create_rsa_key("state-cost")
    key_ref = ref(vault, "state-cost")
    wrapped = [provider.wrap_key(key_ref, os.urandom(32), ACME) for _ in range(3)]
    provider.unwrap_key(key_ref, wrapped[0], ACME)  # the SDK's CryptographyClient reads the
    vault.counts.clear()  # key once, on its first use: not counted below
    clock.now += 10.0
    for w in wrapped * 2:  # a cold load of six rows: one extra get
        provider.unwrap_key(key_ref, w, ACME)
    assert (vault.counts["get"], vault.counts["unwrapkey"]) == (1, 6)
    clock.now += 4.9
    provider.unwrap_key(key_ref, wrapped[0], ACME)
    assert vault.counts["get"] == 1
    clock.now += 0.1
    provider.unwrap_key(key_ref, wrapped[0], ACME)
    assert vault.counts["get"] == 2
    provider.close()


def test_revocation_through_the_key_manager_within_the_cache_bound(
    vault: KeyVaultServer,
) -> None:
    from sqlalchemy_cmk import CMK, tenant_context

    clock = Clock()
    provider = make_provider(vault, clock=clock)
    vault.create_rsa_key("cmk-portal")
    cmk = CMK(
        provider,
        tenant_keys={"acme": ref(vault, "cmk-portal")},
        cache_ttl=30.0,
        audit_sinks=[],
        clock=clock,
    )
    with tenant_context("acme"):
        doc_v1 = cmk.encrypt_document({"ssn": b"123-45-6789"})
        vault.rotate("cmk-portal")
        clock.now += 31.0  # a new write key, under the new version
        doc_v2 = cmk.encrypt_document({"ssn": b"987-65-4321"})
        assert cmk.decrypt_document(doc_v1) == {"ssn": b"123-45-6789"}
        vault.disable("cmk-portal")
        clock.now += 30.0  # cache_ttl
        for doc in (doc_v1, doc_v2):
            with pytest.raises(KeyAccessDeniedError):
                cmk.decrypt_document(doc)
    provider.close()


def test_exp_and_nbf_stop_wraps_not_unwraps(vault: KeyVaultServer) -> None:
    # Key Vault: an expired (or not yet valid) key may still decrypt, unwrap and verify.
    with make_provider(vault) as provider:
        vault.create_rsa_key("dated")
        key_ref = ref(vault, "dated")
        dek = os.urandom(32)
        wrapped = provider.wrap_key(key_ref, dek, ACME)
        vault.set_attributes("dated", exp=int(time.time()) - 1)
        with pytest.raises(KeyAccessDeniedError, match="expired"):
            provider.wrap_key(key_ref, os.urandom(32), ACME)
        assert provider.unwrap_key(key_ref, wrapped, ACME) == dek
        vault.reset()
        vault.set_attributes("dated", nbf=int(time.time()) + 3600)
        with pytest.raises(KeyAccessDeniedError, match="not yet valid"):
            provider.wrap_key(key_ref, os.urandom(32), ACME)
        assert provider.unwrap_key(key_ref, wrapped, ACME) == dek


def test_key_ops_are_enforced_per_version(vault: KeyVaultServer) -> None:
    with make_provider(vault) as provider:
        vault.create_rsa_key("ops")
        key_ref = ref(vault, "ops")
        wrapped = provider.wrap_key(key_ref, os.urandom(32), ACME)
        vault.set_attributes("ops", key_ops=["wrapKey"])  # unwrapKey removed from the version
        with pytest.raises(KeyAccessDeniedError, match="KeyOperationForbidden"):
            provider.unwrap_key(key_ref, wrapped, ACME)


def test_key_names_are_case_insensitive(vault: KeyVaultServer) -> None:
    with make_provider(vault) as provider:
        vault.create_rsa_key("Mixed-Case")
        dek = os.urandom(32)
        # The vault answers with the name as created; the tenant's reference may differ in case.
        wrapped = provider.wrap_key(ref(vault, "mixed-case"), dek, ACME)
        assert split(wrapped)["kid"].startswith(f"{vault.url}/keys/mixed-case/")
        assert provider.unwrap_key(ref(vault, "MIXED-CASE"), wrapped, ACME) == dek
        assert provider.unwrap_key(ref(vault, "Mixed-Case"), wrapped, ACME) == dek


def test_a_hung_vault_call_ends_with_kms_deadline(vault: KeyVaultServer) -> None:
    # The SDK's read timeout (10 s here) is cut to what is left of kms_deadline, so the
    # abandoned call does not keep its thread and connection for the vault's full stall.
    from sqlalchemy_cmk import CMK, tenant_context

    with make_provider(vault, read_timeout=10.0, retry_total=0) as provider:
        cmk = CMK(
            provider,
            tenant_keys={"acme": ref(vault, "acme")},
            kms_deadline=0.5,
            retry_attempts=1,
            audit_sinks=[],
        )
        provider.wrap_key(ref(vault, "acme"), os.urandom(32), ACME)  # challenge done
        vault.stall_seconds = 3.0
        started = time.monotonic()
        with tenant_context("acme"), pytest.raises(KMSUnavailableError):
            cmk.encrypt_document({"f": b"x"})
        assert time.monotonic() - started < 1.0

        def kms_threads() -> int:
            return sum(t.name == "sqlalchemy-cmk-kms" for t in threading.enumerate())

        while kms_threads() and time.monotonic() - started < 5.0:
            time.sleep(0.05)
        assert kms_threads() == 0
        assert time.monotonic() - started < 1.5  # not the vault's 3 s stall


def test_tls_failures_are_not_retryable(vault: KeyVaultServer, tmp_path: Path) -> None:
    # A vault certificate the client does not trust: configuration, not a transient fault.
    from sqlalchemy_cmk.testing.azure_keyvault import make_tls

    _, other_ca = make_tls(tmp_path)
    provider = make_provider(vault, connection_verify=str(other_ca), retry_total=0)
    with provider, pytest.raises(KMSUnavailableError, match="TLS to the vault failed") as info:
        provider.wrap_key(ref(vault, "acme"), os.urandom(32), ACME)
    assert info.value.retryable is False


def test_docs_tenant_decrypts_a_data_key_with_its_own_tools(
    vault: KeyVaultServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The page's script splits a stored companion; what its `az rest` sends (a POST of the
    body to <kid>/unwrapkey with the tenant's token) and the page's AES-GCM step give the key."""
    import shlex

    import requests

    from ._tenant_tools import companion, doc_block, run_script

    with make_provider(vault) as provider:
        vault.rotate("acme")
        dek = os.urandom(32)
        key_ref = ref(vault, "acme")
        wrapped = provider.wrap_key(key_ref, dek, {"tenant": "acme", "data_label": "PHI"})
    (tmp_path / "edek.bin").write_bytes(companion("acme", "azure-kv", key_ref, wrapped))
    run_script("azure.md", 'Path("edek.bin")', tmp_path)
    kid = (tmp_path / "kid.txt").read_text()
    assert f"tenant acme key version {kid}" in capsys.readouterr().out
    assert kid == f"{vault.url}/keys/acme/{current_version(vault, 'acme')}"

    command = doc_block("azure.md", "sh", "az rest")
    words = shlex.split(command.replace("\\\n", " "), posix=True)
    assert words[:4] == ["az", "rest", "--method", "post"]
    options = dict(zip(words[4:-2:2], words[5:-2:2], strict=True))
    assert words[-2:] == [">", "kek.txt"]
    assert options["--resource"] == "https://vault.azure.net"
    assert options["--query"] == "value" and options["--output"] == "tsv"
    url = options["--url"].replace("$(cat kid.txt)", kid)
    body = json.loads((tmp_path / options["--body"].removeprefix("@")).read_text())
    before = vault.counts["unwrapkey"]
    answer = requests.post(
        url,
        json=body,
        headers={"Authorization": f"Bearer {TOKEN}"},
        verify=str(vault.ca_file),
        timeout=5,
    )
    answer.raise_for_status()
    assert vault.counts["unwrapkey"] == before + 1
    (tmp_path / "kek.txt").write_text(answer.json()["value"] + "\n")  # what --output tsv prints

    run_script("azure.md", 'Path("kek.txt")', tmp_path)
    assert (tmp_path / "data-key.bin").read_bytes() == dek


def test_concurrent_unwraps_share_the_key_state_read(vault: KeyVaultServer) -> None:
    # A cold load: sixteen unwraps of one key at once cost one or two KeyGet, not sixteen.
    import concurrent.futures

    with make_provider(vault) as provider:
        vault.create_rsa_key("cold-load")
        key_ref = ref(vault, "cold-load")
        deks = [os.urandom(32) for _ in range(16)]
        wrapped = [provider.wrap_key(key_ref, d, ACME) for d in deks]
        provider.unwrap_key(key_ref, wrapped[0], ACME)  # the SDK's first-use read, not counted
        vault.counts.clear()
        vault.stall_seconds = 0.05  # each answer takes a while, as over a real network
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda w: provider.unwrap_key(key_ref, w, ACME), wrapped))
        assert got == deks
        assert vault.counts["unwrapkey"] == 16
        assert 1 <= vault.counts["get"] <= 2


def test_forget_tenant_stops_rows_under_older_versions_at_once(vault: KeyVaultServer) -> None:
    from sqlalchemy_cmk import CMK, tenant_context

    with make_provider(vault) as provider:
        vault.create_rsa_key("forget")
        cmk = CMK(provider, tenant_keys={"acme": ref(vault, "forget")}, audit_sinks=[])
        with tenant_context("acme"):
            doc = cmk.encrypt_document({"ssn": b"123-45-6789"})  # under version 1
            vault.rotate("forget")
            assert cmk.decrypt_document(doc) == {"ssn": b"123-45-6789"}
            vault.disable("forget")  # version 2, as the portal does
            cmk.forget_tenant("acme")
            with pytest.raises(KeyAccessDeniedError):
                cmk.decrypt_document(doc)
