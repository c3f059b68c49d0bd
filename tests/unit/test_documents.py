"""The low-level API (encrypt_documents / decrypt_documents) with bad input, failing audit sinks
and another tenant's documents: typed errors, no plaintext and no other tenant in messages."""

from __future__ import annotations

import pickle
import sys
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table

from sqlalchemy_cmk import (
    CMK,
    AuditError,
    DecryptionError,
    EDEKType,
    EncryptedDocument,
    EncryptedType,
    InvalidValueError,
    TenantMismatchError,
    tenant_context,
)
from sqlalchemy_cmk._mapping import table_spec
from sqlalchemy_cmk.audit import AuditEvent
from sqlalchemy_cmk.testing import FakeKeyProvider, MemoryAuditSink
from sqlalchemy_cmk.types import EncryptedValue

SECRET = "hunter2-plaintext"


def make_cmk(**kwargs: Any) -> tuple[CMK, FakeKeyProvider]:
    fake = FakeKeyProvider()
    kwargs.setdefault("audit_sinks", [])
    cmk = CMK(fake, tenant_keys={"acme": "fake://acme", "globex": "fake://globex"}, **kwargs)
    return cmk, fake


def assert_no_secret(exc: BaseException, secret: str = SECRET) -> None:
    """The secret appears nowhere in the error: message, repr, pickle, cause or context chain."""
    seen: BaseException | None = exc
    while seen is not None:
        for text in (str(seen), repr(seen), repr(seen.args), repr(vars(seen))):
            assert secret not in text
        assert secret.encode() not in pickle.dumps(seen)
        seen = seen.__cause__ or seen.__context__


# -- documents that are not documents ---------------------------------------------------------


@pytest.mark.parametrize(
    "documents",
    [
        [{1: b"x"}],
        [{"a": b"x", 2: b"y"}],
        [{("t",): b"x"}],
        ["abc"],
        [b"abc"],
        [None],
        [{"a": SECRET}],
        [{"a": 5}],
        [{"": b"x"}],
        {"a": b"x"},  # one document, not a list of them
        "abc",
    ],
    ids=repr,
)
def test_malformed_documents_are_invalid_values(documents: Any):
    cmk, fake = make_cmk()
    with tenant_context("acme"), pytest.raises(InvalidValueError) as info:
        cmk.encrypt_documents(documents)
    assert_no_secret(info.value)
    assert fake.calls == []  # refused before any KMS call


def encrypted(cmk: CMK, tenant: str = "acme") -> EncryptedDocument:
    with tenant_context(tenant):
        return cmk.encrypt_document({"a": SECRET.encode()})


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: EncryptedDocument(d.edek, {"a": "a str"}),
        lambda d: EncryptedDocument(d.edek, {1: d.fields["a"]}),
        lambda d: EncryptedDocument(d.edek, ["a"]),  # type: ignore[arg-type]
        lambda d: EncryptedDocument("edek as str", d.fields),  # type: ignore[arg-type]
        lambda d: EncryptedDocument(None, d.fields),  # type: ignore[arg-type]
        lambda d: {"a": d.fields["a"]},
    ],
    ids=["str-field", "int-name", "list-fields", "str-edek", "none-edek", "not-a-document"],
)
def test_malformed_encrypted_documents_are_invalid_values(mutate: Any):
    cmk, _ = make_cmk()
    doc = mutate(encrypted(cmk))
    with tenant_context("acme"), pytest.raises(InvalidValueError):
        cmk.decrypt_documents([doc])


def test_bytes_like_edek_and_fields_are_accepted():
    cmk, _ = make_cmk()
    doc = encrypted(cmk)
    like = EncryptedDocument(bytearray(doc.edek), {"a": memoryview(doc.fields["a"])})
    with tenant_context("acme"):
        assert cmk.decrypt_document(like) == {"a": SECRET.encode()}
        assert cmk.encrypt_documents([{"a": bytearray(b"x")}])[0].fields["a"]


# -- another tenant's document: the message names no other tenant ----------------------------


def test_tenant_mismatch_message_does_not_name_the_rows_tenant():
    cmk, fake = make_cmk()
    doc = encrypted(cmk, "globex")
    fake.reset_counts()
    with tenant_context("acme"), pytest.raises(TenantMismatchError) as info:
        cmk.decrypt_document(doc)
    err = info.value
    assert "globex" not in str(err) and "globex" not in repr(err)
    assert (err.row_tenant, err.tenant) == ("globex", "acme")  # for logs and operators
    assert fake.calls == []


# -- a failing audit sink stops the access ----------------------------------------------------


class FailingSink:
    """Raises on events of one operation (or ``"any"``) while ``failing`` is set."""

    def __init__(self, operation: str) -> None:
        self.operation = operation
        self.failing = True

    def __call__(self, event: AuditEvent) -> None:
        if self.failing and self.operation in (event.operation, "any"):
            raise RuntimeError("SIEM unreachable")


@pytest.mark.parametrize("operation", ["wrap", "unwrap", "encrypt"])
def test_a_raising_audit_sink_stops_a_write(operation: str):
    cmk, _ = make_cmk(audit_sinks=[FailingSink(operation)])
    with tenant_context("acme"), pytest.raises(AuditError) as info:
        cmk.encrypt_document({"a": SECRET.encode()})
    assert isinstance(info.value.__cause__, RuntimeError)
    assert info.value.tenant == "acme"
    assert "acme" not in str(info.value)
    assert_no_secret(info.value)


@pytest.mark.parametrize("operation", ["unwrap", "decrypt"])
def test_a_raising_audit_sink_stops_a_read(operation: str):
    sink = FailingSink(operation)
    sink.failing = False
    cmk, _ = make_cmk(audit_sinks=[sink])
    doc = encrypted(cmk)
    cmk.forget_tenant()
    sink.failing = True
    with tenant_context("acme"), pytest.raises(AuditError) as info:
        cmk.decrypt_document(doc)
    assert isinstance(info.value.__cause__, RuntimeError)
    sink.failing = False
    with tenant_context("acme"):
        assert cmk.decrypt_document(doc) == {"a": SECRET.encode()}


@pytest.mark.parametrize(
    ("operation", "access"),
    [("unwrap", "decrypt"), ("decrypt", "decrypt"), ("wrap", "encrypt"), ("encrypt", "encrypt")],
)
def test_an_access_stopped_by_a_sink_is_audited_once(operation: str, access: str) -> None:
    """Issue 12: an access an audit sink stopped is a refused access. A sink before the failing
    one sees one access event for it: ``error`` (``AuditError``) when a KMS event failed,
    else the ``ok`` event that could not reach every sink, never both. The caller gets the
    AuditError; when the refusal's own event fails too, a note says so."""
    seen = MemoryAuditSink()
    failing = FailingSink(operation)
    failing.failing = False
    cmk, _ = make_cmk(audit_sinks=[seen, failing])
    doc = encrypted(cmk)
    cmk.forget_tenant()
    seen.events.clear()
    failing.failing = True
    failing.operation = operation
    with tenant_context("acme"), pytest.raises(AuditError) as info:
        if access == "decrypt":
            cmk.decrypt_document(doc)
        else:
            cmk.encrypt_document({"a": b"x"})
    events = [(e.operation, e.outcome, e.error) for e in seen.events if e.operation == access]
    if operation == access:
        assert events == [(access, "ok", None)]
    else:
        assert events == [(access, "error", "AuditError")]
        assert (seen.events[-1].tenant, seen.events[-1].row_tenant) == ("acme", None)
    assert not getattr(info.value, "__notes__", [])  # the refusal's own event went through


def test_a_refusal_that_cannot_be_audited_keeps_its_own_error() -> None:
    """A sink that fails on every event: the caller gets the first AuditError (the unwrap's),
    noted that the refusal's own event could not be recorded either (no value in the note)."""
    sink = FailingSink("any")
    sink.failing = False
    cmk, _ = make_cmk(audit_sinks=[sink])
    doc = encrypted(cmk)
    cmk.forget_tenant()
    sink.failing = True
    with tenant_context("acme"), pytest.raises(AuditError) as info:
        cmk.decrypt_document(doc)
    assert "'unwrap' event" in str(info.value)
    if sys.version_info >= (3, 11):
        assert info.value.__notes__ == [
            "sqlalchemy-cmk: the refusal could not be audited (AuditError)"
        ]


# -- no plaintext in errors from sealing (the str fast path included) -------------------------

metadata = MetaData()
notes = Table(
    "notes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("short", EncryptedType(String(5))),
    Column("body", EncryptedType(String)),
    Column("cmk_edek", EDEKType()),
)


class Sneaky(str):
    def __len__(self) -> int:
        return 1


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("body", "abc\ud800" + SECRET),
        ("short", "\udfff" + SECRET),
        ("short", SECRET),  # too long
        ("short", Sneaky(SECRET)),  # a str subclass, too long, lying about its length
        ("short", type("S", (str,), {})(SECRET)),
    ],
    ids=["surrogate", "surrogate-limited", "too-long", "lying-subclass", "subclass"],
)
def test_unsealable_strings_are_refused_without_plaintext(column: str, value: str):
    cmk, _ = make_cmk()
    spec = table_spec(notes)
    assert spec is not None
    with tenant_context("acme"), pytest.raises(InvalidValueError) as info:
        cmk.seal([{column: value}], [spec], [spec.columns], [None], tenant_context("acme").context)
    assert info.value.column == column
    assert info.value.__context__ is None and info.value.__cause__ is None
    assert_no_secret(info.value)


# -- a KMS answering with a wrong key: nothing sealed under it, nothing cached ----------------


def seal_row(cmk: CMK, row: dict[str, Any], companion: bytes | None = None, **kw: Any) -> Any:
    spec = table_spec(notes)
    assert spec is not None
    ctx = tenant_context("acme").context
    return cmk.seal([row], [spec], [spec.columns], [companion], ctx, **kw)


def open_row(cmk: CMK, stored: dict[str, Any]) -> dict[str, Any]:
    row = {k: EncryptedValue(v) if k in ("short", "body") else v for k, v in stored.items()}
    with tenant_context("acme"):
        return cmk.decrypt_row(notes, row)


def stored_row(cmk: CMK) -> dict[str, Any]:
    (companion,), cts = seal_row(cmk, {"short": "abc", "body": SECRET})
    return {"id": 1, "short": cts[0], "body": cts[1], "cmk_edek": companion}


def test_a_wrong_key_from_the_kms_is_not_cached_by_a_load():
    cmk, fake = make_cmk()
    stored = stored_row(cmk)
    cmk.forget_tenant()
    fake.reset_counts()
    fake.inject("garbage", operation="unwrap")
    with pytest.raises(DecryptionError):
        open_row(cmk, stored)
    assert open_row(cmk, stored)["body"] == SECRET  # asked the KMS again, not the cache
    assert fake.unwrap_count == 2


def test_an_update_checks_a_fresh_key_against_a_stored_value():
    cmk, fake = make_cmk()
    stored = stored_row(cmk)
    cmk.forget_tenant()
    fake.reset_counts()
    fake.inject("garbage", operation="unwrap")
    witness = {"short": stored["short"], "body": stored["body"]}
    with pytest.raises(DecryptionError, match="does not open"):
        seal_row(cmk, {"body": "new"}, stored["cmk_edek"], witnesses=[witness])
    assert fake.unwrap_count == 1
    _, (ct,) = seal_row(cmk, {"body": "new"}, stored["cmk_edek"], witnesses=[witness])
    assert fake.unwrap_count == 2  # no second unwrap: the stored value proved the key
    assert open_row(cmk, {**stored, "body": ct})["body"] == "new"


def test_an_update_without_witnesses_unwraps_a_fresh_key_twice():
    cmk, fake = make_cmk()
    stored = stored_row(cmk)
    cmk.forget_tenant()
    fake.inject("garbage", operation="unwrap")
    with pytest.raises(DecryptionError, match="twice"):
        seal_row(cmk, {"body": "new"}, stored["cmk_edek"])
    fake.reset_counts()
    _, (ct,) = seal_row(cmk, {"body": "new"}, stored["cmk_edek"])
    assert fake.unwrap_count == 2
    assert open_row(cmk, {**stored, "body": ct})["body"] == "new"
    _, (ct,) = seal_row(cmk, {"body": "newer"}, stored["cmk_edek"])
    assert fake.unwrap_count == 2  # proven, so cached
