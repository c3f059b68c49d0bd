"""LocalKeyProvider: loading keys, wrapping, context binding, revocation."""

from __future__ import annotations

import base64
import json
import os
import pickle
import stat
from pathlib import Path

import pytest

from sqlalchemy_cmk import (
    CMK,
    ConfigurationError,
    DecryptionError,
    KeyAccessDeniedError,
    KeyNotFoundError,
    KeyProvider,
    tenant_context,
)
from sqlalchemy_cmk.providers.local import LocalKeyProvider

KEY_A = bytes(range(1, 33))
KEY_B = bytes(range(101, 133))
DEK = bytes(range(200, 232))
CTX = {"tenant": "acme"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def provider() -> LocalKeyProvider:
    return LocalKeyProvider({"acme": KEY_A, "globex": KEY_B})


def write_json(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


# -- loading ------------------------------------------------------------------------------------


def test_from_file(tmp_path: Path):
    path = write_json(tmp_path / "keys.json", {"keys": {"acme": b64(KEY_A), "globex": b64(KEY_B)}})
    p = LocalKeyProvider.from_file(path)
    wrapped = p.wrap_key("local://globex", DEK, CTX)
    assert LocalKeyProvider({"globex": KEY_B}).unwrap_key("local://globex", wrapped, CTX) == DEK
    assert LocalKeyProvider.from_file(str(path)).unwrap_key("local://globex", wrapped, CTX) == DEK


def test_from_file_missing_says_how_to_create_one(tmp_path: Path):
    with pytest.raises(ConfigurationError, match=r"does not exist.*generate_key_file"):
        LocalKeyProvider.from_file(tmp_path / "nope.json")


@pytest.mark.parametrize("content", ["", "{not json", "\xff\xfe", '{"keys": '])
def test_from_file_bad_json(tmp_path: Path, content: str):
    path = tmp_path / "keys.json"
    path.write_text(content, encoding="latin-1")
    with pytest.raises(ConfigurationError, match="not JSON") as info:
        LocalKeyProvider.from_file(path)
    assert str(path) in str(info.value)


def test_from_file_directory(tmp_path: Path):
    with pytest.raises(ConfigurationError, match="unreadable"):
        LocalKeyProvider.from_file(tmp_path)


@pytest.mark.parametrize(
    "doc",
    [[], "keys", {"nokeys": {}}, {"keys": []}, {"keys": "acme"}, {"keys": None}],
    ids=repr,
)
def test_from_file_wrong_structure_shows_the_expected_one(tmp_path: Path, doc: object):
    with pytest.raises(ConfigurationError, match=r'must hold \{"keys": \{"name": "base64"\}\}'):
        LocalKeyProvider.from_file(write_json(tmp_path / "keys.json", doc))


def test_from_file_no_keys(tmp_path: Path):
    with pytest.raises(ConfigurationError, match="at least one master key"):
        LocalKeyProvider.from_file(write_json(tmp_path / "keys.json", {"keys": {}}))


@pytest.mark.parametrize("value", [42, None, ["x"], {"b64": "x"}], ids=repr)
def test_from_file_key_not_a_string(tmp_path: Path, value: object):
    path = write_json(tmp_path / "keys.json", {"keys": {"acme": value}})
    with pytest.raises(ConfigurationError, match="'acme' must be a base64 string"):
        LocalKeyProvider.from_file(path)


@pytest.mark.parametrize("value", ["not base64!", "AAA", b64(KEY_A) + "!", "é"], ids=repr)
def test_from_file_bad_base64(tmp_path: Path, value: str):
    path = write_json(tmp_path / "keys.json", {"keys": {"acme": value}})
    with pytest.raises(ConfigurationError, match="'acme' is not valid base64"):
        LocalKeyProvider.from_file(path)


@pytest.mark.parametrize(
    "key", [b"", KEY_A[:16], KEY_A[:31], KEY_A + b"\x00"], ids=lambda k: f"{len(k)}-bytes"
)
def test_from_file_wrong_key_size_says_what_to_do(tmp_path: Path, key: bytes):
    path = write_json(tmp_path / "keys.json", {"keys": {"acme": b64(key)}})
    with pytest.raises(ConfigurationError, match="must be 32 bytes") as info:
        LocalKeyProvider.from_file(path)
    assert "generate_key_file" in str(info.value)
    if key:
        assert b64(key) not in str(info.value)


@pytest.mark.parametrize(
    "key",
    [bytes(32), b"\xff" * 32, bytes(range(7)) * 4 + bytes(range(4)), b"ab" * 16],
    ids=["zeros", "ff", "7-distinct", "2-distinct"],
)
def test_weak_key_is_refused_with_advice(tmp_path: Path, key: bytes):
    path = write_json(tmp_path / "keys.json", {"keys": {"acme": b64(key)}})
    with pytest.raises(ConfigurationError, match=r"weak.*generate a random one") as info:
        LocalKeyProvider.from_file(path)
    assert b64(key) not in str(info.value)
    with pytest.raises(ConfigurationError, match="weak"):
        LocalKeyProvider({"acme": key})


def test_constructor_needs_keys():
    with pytest.raises(ConfigurationError, match="at least one"):
        LocalKeyProvider({})


def test_from_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MY_KEYS", f" acme={b64(KEY_A)} , globex={b64(KEY_B)}")
    p = LocalKeyProvider.from_env("MY_KEYS")
    wrapped = p.wrap_key("local://acme", DEK, CTX)
    assert LocalKeyProvider({"acme": KEY_A}).unwrap_key("local://acme", wrapped, CTX) == DEK
    monkeypatch.setenv("SQLALCHEMY_CMK_LOCAL_KEYS", f"acme={b64(KEY_A)}")
    assert LocalKeyProvider.from_env().unwrap_key("local://acme", wrapped, CTX) == DEK


@pytest.mark.parametrize("value", [None, ""])
def test_from_env_unset(monkeypatch: pytest.MonkeyPatch, value: str | None):
    if value is None:
        monkeypatch.delenv("MY_KEYS", raising=False)
    else:
        monkeypatch.setenv("MY_KEYS", value)
    with pytest.raises(ConfigurationError, match="MY_KEYS is not set"):
        LocalKeyProvider.from_env("MY_KEYS")


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("justbase64", "name=base64"),
        (f"={b64(KEY_A)}", "name=base64"),
        (f"acme={b64(KEY_A)},", "name=base64"),
        ("acme=***", "not valid base64"),
        ("acme=", "must be 32 bytes"),
        (f"acme={b64(bytes(32))}", "weak"),
    ],
)
def test_from_env_malformed(monkeypatch: pytest.MonkeyPatch, value: str, match: str):
    monkeypatch.setenv("MY_KEYS", value)
    with pytest.raises(ConfigurationError, match=match):
        LocalKeyProvider.from_env("MY_KEYS")


def test_generate_key_file(tmp_path: Path):
    path = LocalKeyProvider.generate_key_file(tmp_path / "keys.json", ["acme", "globex"])
    assert path == tmp_path / "keys.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    keys = {n: base64.b64decode(v) for n, v in json.loads(path.read_text())["keys"].items()}
    assert sorted(keys) == ["acme", "globex"]
    assert all(len(k) == 32 for k in keys.values())
    assert keys["acme"] != keys["globex"]
    p = LocalKeyProvider.from_file(path)
    assert p.unwrap_key("local://acme", p.wrap_key("local://acme", DEK, CTX), CTX) == DEK


def test_generate_key_file_refuses_to_overwrite(tmp_path: Path):
    path = LocalKeyProvider.generate_key_file(tmp_path / "keys.json", ["acme"])
    before = path.read_bytes()
    with pytest.raises(ConfigurationError, match="refusing to overwrite"):
        LocalKeyProvider.generate_key_file(path, ["acme"])
    assert path.read_bytes() == before


def test_generate_key_file_does_not_follow_a_symlink(tmp_path: Path):
    target = tmp_path / "elsewhere.json"
    (tmp_path / "keys.json").symlink_to(target)
    with pytest.raises(ConfigurationError, match="refusing to overwrite"):
        LocalKeyProvider.generate_key_file(tmp_path / "keys.json", ["acme"])
    assert not target.exists()


# -- wrapping ----------------------------------------------------------------------------------


def test_is_a_key_provider(provider: LocalKeyProvider):
    assert isinstance(provider, KeyProvider)
    assert provider.scheme == "local"


def test_wrap_unwrap_round_trip(provider: LocalKeyProvider):
    wrapped = provider.wrap_key("local://acme", DEK, CTX)
    assert len(wrapped) == 1 + 12 + 32 + 16 and wrapped[0] == 1
    assert DEK not in wrapped
    assert provider.unwrap_key("local://acme", wrapped, CTX) == DEK
    assert provider.wrap_key("local://acme", DEK, CTX) != wrapped  # fresh nonce each time


@pytest.mark.parametrize(
    "context",
    [{"tenant": "globex"}, {}, {"tenant": "ACME"}],
    ids=repr,
)
def test_unwrap_is_bound_to_the_context(provider: LocalKeyProvider, context: dict[str, str]):
    wrapped = provider.wrap_key("local://acme", DEK, CTX)
    with pytest.raises(DecryptionError) as info:
        provider.unwrap_key("local://acme", wrapped, context)
    assert (info.value.key_ref, info.value.provider) == ("local://acme", "local")


def test_only_the_tenant_binds(provider: LocalKeyProvider):
    # Other entries (the data label) are informational: unwrap gets {"tenant": ...} only.
    wrapped = provider.wrap_key("local://acme", DEK, {"data_label": "PHI", "tenant": "acme"})
    assert provider.unwrap_key("local://acme", wrapped, {"tenant": "acme"}) == DEK


def test_unwrap_is_bound_to_the_key_name():
    # The same master bytes under two names still do not unwrap each other's keys.
    p = LocalKeyProvider({"a": KEY_A, "b": KEY_A})
    wrapped = p.wrap_key("local://a", DEK, CTX)
    with pytest.raises(DecryptionError):
        p.unwrap_key("local://b", wrapped, CTX)


def test_unwrap_under_another_key(provider: LocalKeyProvider):
    wrapped = provider.wrap_key("local://acme", DEK, CTX)
    with pytest.raises(DecryptionError):
        LocalKeyProvider({"acme": KEY_B}).unwrap_key("local://acme", wrapped, CTX)


def test_unwrap_rejects_malformed(provider: LocalKeyProvider):
    wrapped = provider.wrap_key("local://acme", DEK, CTX)
    bad = [wrapped[:i] for i in range(len(wrapped))] + [wrapped + b"\x00", b"\x02" + wrapped[1:]]
    for i in range(len(wrapped)):
        flipped = bytearray(wrapped)
        flipped[i] ^= 0x01
        bad.append(bytes(flipped))
    for data in bad:
        with pytest.raises(DecryptionError):
            provider.unwrap_key("local://acme", data, CTX)


@pytest.mark.parametrize("key_ref", ["local://nobody", "local://", "aws-kms://acme", "acme"])
def test_unknown_key_is_not_found(provider: LocalKeyProvider, key_ref: str):
    with pytest.raises(KeyNotFoundError) as info:
        provider.wrap_key(key_ref, DEK, CTX)
    assert info.value.key_ref == key_ref
    with pytest.raises(KeyNotFoundError):
        provider.unwrap_key(key_ref, b"\x01" + bytes(60), CTX)


def test_revoke_and_restore(provider: LocalKeyProvider):
    wrapped = provider.wrap_key("local://acme", DEK, CTX)
    other = provider.wrap_key("local://globex", DEK, CTX)
    provider.revoke("acme")
    with pytest.raises(KeyAccessDeniedError) as info:
        provider.unwrap_key("local://acme", wrapped, CTX)
    assert (info.value.key_ref, info.value.provider) == ("local://acme", "local")
    with pytest.raises(KeyAccessDeniedError):
        provider.wrap_key("local://acme", DEK, CTX)
    assert provider.unwrap_key("local://globex", other, CTX) == DEK  # other keys unaffected
    provider.restore("acme")
    assert provider.unwrap_key("local://acme", wrapped, CTX) == DEK


def test_revocation_through_cmk(provider: LocalKeyProvider):
    cmk = CMK(provider, tenant_keys={"acme": "local://acme"}, audit_sinks=[])
    with tenant_context("acme"):
        doc = cmk.encrypt_document({"f": b"secret"})
        provider.revoke("acme")
        cmk.forget_tenant("acme")
        with pytest.raises(KeyAccessDeniedError) as info:
            cmk.decrypt_document(doc)
        assert info.value.tenant == "acme"
        provider.restore("acme")
        assert cmk.decrypt_document(doc) == {"f": b"secret"}


def test_repr_has_no_key_bytes(provider: LocalKeyProvider):
    text = repr(provider)
    assert "acme" in text and "globex" in text
    for key in (KEY_A, KEY_B):
        for form in (b64(key), key.hex(), repr(key), repr(key)[2:-1]):
            assert form not in text


def test_generate_key_file_refuses_a_str_of_names(tmp_path: Path) -> None:
    # "acme" would otherwise become four keys named a, c, m, e.
    with pytest.raises(ConfigurationError, match="list of key names"):
        LocalKeyProvider.generate_key_file(tmp_path / "k.json", "acme")
    assert not (tmp_path / "k.json").exists()


def test_a_broken_key_file_does_not_chain_its_contents(tmp_path: Path):
    # A JSONDecodeError keeps the whole document (here, a master key) in its `doc`; it must not
    # ride along as the __context__ of the error that error trackers record.
    path = tmp_path / "keys.json"
    path.write_text('{"keys": {"acme": "' + b64(KEY_A) + '"}')  # truncated: not JSON
    with pytest.raises(ConfigurationError) as info:
        LocalKeyProvider.from_file(path)
    assert info.value.__context__ is None and info.value.__cause__ is None
    assert b64(KEY_A) not in repr(pickle.dumps(info.value))


@pytest.mark.parametrize(
    ("tenants", "says"),
    [
        ({"acme": ["acme-2"]}, "must name one or more of the provider's keys"),
        ({"acme": []}, "must name one or more of the provider's keys"),
        ({"acme": "acme"}, '"tenants" must map tenant ids to key names'),
        (["acme"], '"tenants" must map tenant ids to key names'),
    ],
)
def test_a_key_file_s_tenants_must_name_its_keys(
    tmp_path: Path, tenants: object, says: str
) -> None:
    path = tmp_path / "keys.json"
    key = base64.b64encode(os.urandom(32)).decode()
    path.write_text(json.dumps({"keys": {"acme": key}, "tenants": tenants}))
    with pytest.raises(ConfigurationError, match=says) as info:
        LocalKeyProvider.from_file(path)
    assert key not in str(info.value)
    path.write_text(json.dumps({"keys": {"acme": key}, "tenants": {"acme": ["acme"]}}))
    assert LocalKeyProvider.from_file(path).tenant_keys == {"acme": ["local://acme"]}
