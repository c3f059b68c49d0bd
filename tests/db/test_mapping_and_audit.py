"""Model configuration errors, value type errors, audit events, and the low-level document API."""

from __future__ import annotations

import enum
import json
import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    ARRAY,
    Column,
    Engine,
    Enum,
    Integer,
    Interval,
    LargeBinary,
    MetaData,
    PickleType,
    String,
    Table,
    insert,
    select,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_cmk import (
    ConfigurationError,
    DecryptionError,
    EDEKType,
    EncryptedDocument,
    EncryptedType,
    InvalidValueError,
    KeyAccessDeniedError,
    NoTenantError,
    TenantMismatchError,
    tenant_context,
)

from ._access_matrix import (
    FAULTS,
    PATHS,
    READ_PATHS,
    AccEnv,
    acc_env_fixture,
    check_agrees,
    faults_of,
    run_access,
    run_cell,
)
from .models import (
    AllTypes,
    Env,
    Patient,
    assert_absent,
    event_json,
    make_env,
)


@pytest.fixture
def env(engine: Engine) -> Env:
    return make_env(engine)


def count(env: Env, table: str = "patients") -> int:
    return int(env.raw(f"select count(*) from {table}")[0][0])


# -- model configuration ---------------------------------------------------------------------


def define_model_without_companion(extra_companions: int = 0) -> type[Any]:
    """A model with an encrypted column and ``extra_companions`` EDEK columns, in its own registry
    (so that its error cannot leak into other tests' queries)."""

    class IsolatedBase(DeclarativeBase):
        pass

    attrs: dict[str, Any] = {
        "__tablename__": "leaky",
        "__annotations__": {"id": Mapped[int], "secret": Mapped[str]},
        "id": mapped_column(Integer, primary_key=True),
        "secret": mapped_column(EncryptedType(String)),
    }
    for i in range(extra_companions):
        attrs[f"edek_{i}"] = mapped_column(EDEKType(), nullable=True)
    return type("LeakyModel", (IsolatedBase,), attrs)


def assert_names_model_and_fix(exc: ConfigurationError) -> None:
    message = str(exc)
    assert "LeakyModel" in message
    assert "EncryptedMixin" in message or "EDEKType" in message


@pytest.mark.parametrize("how", ["flush", "query"])
def test_model_without_companion_column_is_refused(env: Env, how: str) -> None:
    try:
        model = define_model_without_companion()
    except ConfigurationError as exc:  # refused at class definition: the earliest, the best
        assert_names_model_and_fix(exc)
        return
    model.metadata.create_all(env.engine)
    with tenant_context("acme"), env.Session() as s:
        with pytest.raises(ConfigurationError) as info:
            if how == "flush":
                s.add(model(id=1, secret="WRITTEN-WITHOUT-KEY"))
                s.flush()
            else:
                s.scalars(select(model)).all()
        s.rollback()
    assert_names_model_and_fix(info.value)
    assert count(env, "leaky") == 0


def test_model_with_two_companion_columns_is_refused(env: Env) -> None:
    try:
        model = define_model_without_companion(extra_companions=2)
    except ConfigurationError as exc:
        assert "LeakyModel" in str(exc)
        return
    model.metadata.create_all(env.engine)
    with tenant_context("acme"), env.Session() as s:
        s.add(model(id=1, secret="x"))
        with pytest.raises(ConfigurationError, match="LeakyModel"):
            s.flush()
        s.rollback()
    assert count(env, "leaky") == 0


class Color(enum.Enum):
    RED = "red"


@pytest.mark.parametrize(
    "underlying",
    [
        Enum("a", "b", name="ab"),
        Enum(Color),
        ARRAY(Integer),
        postgresql.ARRAY(String),
        Interval(),
        PickleType(),
    ],
    ids=["enum", "py-enum", "array", "pg-array", "interval", "pickle"],
)
def test_unsupported_underlying_types_are_refused(underlying: Any) -> None:
    with pytest.raises(ConfigurationError, match="supported"):
        EncryptedType(underlying)


@pytest.mark.parametrize(
    ("column", "value"),
    [("age", "forty-two"), ("age", True), ("age", 4.2), ("ssn", 123456789), ("notes", {1, 2})],
)
def test_value_of_wrong_type_is_refused_before_anything_is_written(
    env: Env, column: str, value: Any
) -> None:
    with tenant_context("acme"), env.Session() as s:
        good = Patient(tenant_id="acme", ssn="fine", age=1)
        bad = Patient(tenant_id="acme", **{column: value})
        s.add_all([good, bad])
        with pytest.raises(InvalidValueError) as info:
            s.commit()
        s.rollback()
    assert f"patients.{column}" in str(info.value)
    assert (info.value.table, info.value.column) == ("patients", column)
    assert "forty-two" not in str(info.value)
    assert count(env) == 0


def test_value_of_wrong_type_in_bulk_insert_is_refused(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        with pytest.raises(InvalidValueError, match=r"patients\.age"):
            s.execute(
                insert(Patient),
                [{"tenant_id": "acme", "age": 1}, {"tenant_id": "acme", "age": "forty-two"}],
            )
        s.rollback()
    assert count(env) == 0


def test_declared_string_length_is_enforced(env: Env) -> None:
    # The stored column is binary, so the database cannot enforce String(n): the type does.
    with tenant_context("acme"), env.Session() as s:
        s.add(AllTypes(s="x" * 201))
        with pytest.raises(InvalidValueError, match=r"all_types\.s holds at most 200") as info:
            s.commit()
        s.rollback()
        assert "xxxx" not in str(info.value)
        s.add(AllTypes(s="x" * 200))
        s.commit()


# -- audit -----------------------------------------------------------------------------------

CONTEXT = {
    "actor": "user-42",
    "data_label": "PHI",
    "request_id": "req-0001",
    "source_ip": "10.1.2.3",
    "object_id": "patient/batch",
    "extra": {"app": "clinic", "region": "eu"},
}


def assert_has_context(event: Any) -> None:
    for name, value in CONTEXT.items():
        got = getattr(event, name)
        assert (dict(got) if name == "extra" else got) == value, name


def test_flush_emits_wrap_once_and_encrypt_with_rows_and_context(env: Env) -> None:
    with tenant_context("acme", **CONTEXT), env.Session() as s:
        s.add_all([Patient(tenant_id="acme", ssn=f"s{i}", age=i) for i in range(3)])
        s.commit()
        s.add(Patient(tenant_id="acme", notes={"x": 1}))
        s.commit()

    (wrap,) = env.audit.of("wrap")
    assert (wrap.outcome, wrap.tenant, wrap.key_ref, wrap.provider) == (
        "ok",
        "acme",
        "fake://acme",
        "fake",
    )
    assert_has_context(wrap)

    first, second = env.audit.of("encrypt")
    assert (first.outcome, first.tenant, first.table, first.rows) == ("ok", "acme", "patients", 3)
    assert first.columns == ("age", "ssn")
    assert (second.rows, second.columns) == (1, ("notes",))
    assert_has_context(first)
    assert env.audit.events.index(wrap) < env.audit.events.index(first)
    assert env.kms.wrap_count == 1


def test_load_emits_decrypt_with_row_count(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        s.add_all([Patient(tenant_id="acme", ssn=f"s{i}", age=i) for i in range(4)])
        s.commit()
    env.audit.events.clear()
    env.cmk.forget_tenant()
    with tenant_context("acme", **CONTEXT), env.Session() as s:
        assert len(s.scalars(select(Patient)).all()) == 4

    (unwrap,) = env.audit.of("unwrap")
    assert (unwrap.outcome, unwrap.tenant, unwrap.key_ref) == ("ok", "acme", "fake://acme")
    decrypts = env.audit.of("decrypt")
    assert len(decrypts) == 1, "one query, one decrypt event"
    (decrypt,) = decrypts
    assert (decrypt.outcome, decrypt.tenant, decrypt.table, decrypt.rows) == (
        "ok",
        "acme",
        "patients",
        4,
    )
    # The columns read: at least those holding values, at most the table's encrypted ones.
    assert {"age", "ssn"} <= set(decrypt.columns) <= {"age", "ssn", "notes"}
    assert_has_context(decrypt)

    # Served from the cache, a load is still audited.
    env.audit.events.clear()
    with tenant_context("acme"), env.Session() as s:
        assert len(s.scalars(select(Patient).limit(2)).all()) == 2
    assert [e.operation for e in env.audit.events] == ["decrypt"]
    assert env.audit.events[0].rows == 2


def test_denied_read_emits_denied_event(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        s.add(Patient(tenant_id="acme", ssn="s"))
        s.commit()
    env.kms.deny("fake://acme")
    env.cmk.forget_tenant("acme")
    env.audit.events.clear()
    with (
        tenant_context("acme", **CONTEXT),
        env.Session() as s,
        pytest.raises(KeyAccessDeniedError),
    ):
        s.scalars(select(Patient)).all()
    # The KMS call the tenant's KMS refused, and (issue 12) the refused access itself.
    denied = [e for e in env.audit.events if e.outcome == "denied"]
    assert [(e.operation, e.tenant, e.error) for e in denied] == [
        ("unwrap", "acme", "KeyAccessDeniedError"),
        ("decrypt", "acme", "KeyAccessDeniedError"),
    ]
    assert denied[0].key_ref == "fake://acme"
    assert (denied[1].table, denied[1].row_tenant) == ("patients", None)
    for e in denied:
        assert_has_context(e)
    assert all(e.outcome != "ok" for e in env.audit.of("decrypt"))


def test_denied_write_emits_denied_event_and_writes_nothing(env: Env) -> None:
    env.kms.deny("fake://acme")
    with tenant_context("acme"), env.Session() as s:
        s.add(Patient(tenant_id="acme", ssn="never-stored"))
        with pytest.raises(KeyAccessDeniedError):
            s.commit()
        s.rollback()
    assert count(env) == 0
    # The refused wrap, then (issue 12) the refused flush: one event for the table written.
    assert [(e.operation, e.outcome, e.table) for e in env.audit.events] == [
        ("wrap", "denied", None),
        ("encrypt", "denied", "patients"),
    ]


def test_mismatch_emits_event(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        s.add(Patient(tenant_id="acme", ssn="s"))
        s.commit()
    env.audit.events.clear()
    with tenant_context("globex"), env.Session() as s, pytest.raises(TenantMismatchError):
        s.scalars(select(Patient)).all()
    assert [e.outcome for e in env.audit.events] == ["mismatch"]
    # A refusal is the context's tenant's event (issue 12): acme's name comes from an envelope
    # that did not authenticate here, so it is only in row_tenant, for the app's own sinks.
    assert (env.audit.events[0].tenant, env.audit.events[0].row_tenant) == ("globex", "acme")


def test_events_never_carry_plaintext_keys_or_edek(env: Env) -> None:
    secrets = ["SECRET-SSN-555-12-3456", "SECRET-NOTE-diabetes"]
    with tenant_context("acme", **CONTEXT), env.Session() as s:
        s.add(Patient(tenant_id="acme", ssn=secrets[0], notes={"n": secrets[1]}, age=33))
        s.commit()
    env.cmk.forget_tenant()
    with tenant_context("acme"), env.Session() as s:
        assert s.scalars(select(Patient)).one().ssn == secrets[0]
    env.kms.deny("fake://acme")
    env.cmk.forget_tenant()
    with tenant_context("acme"), env.Session() as s, pytest.raises(KeyAccessDeniedError):
        s.scalars(select(Patient)).all()

    (row,) = env.raw("select cmk_edek from patients")
    edek = bytes(row.cmk_edek)
    assert {"wrap", "encrypt", "unwrap", "decrypt"} <= {e.operation for e in env.audit.events}
    assert len(env.kms.data_keys) >= 2 and env.kms.wrapped_keys
    for line in event_json(env.audit.events):
        assert_absent(line, [*secrets, *env.kms.data_keys, *env.kms.wrapped_keys, edek])
        assert_absent(line, [edek[17:], edek[1:17]])  # the envelope, the row id


def test_default_sink_writes_json_lines_to_audit_logger(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sqlalchemy_cmk.audit")
    env = make_env(engine, audit_sinks=None)
    with tenant_context("acme", actor="user-7", request_id="req-77"), env.Session() as s:
        s.add(Patient(tenant_id="acme", ssn="SECRET-LOGGED-SSN"))
        s.commit()
        assert s.scalars(select(Patient)).one().ssn == "SECRET-LOGGED-SSN"
    records = [r for r in caplog.records if r.name == "sqlalchemy_cmk.audit"]
    events = [json.loads(r.getMessage()) for r in records]
    assert {"wrap", "encrypt", "decrypt"} <= {e["operation"] for e in events}
    for e in events:
        assert (e["tenant"], e["actor"], e["request_id"], e["outcome"]) == (
            "acme",
            "user-7",
            "req-77",
            "ok",
        )
    for r in records:
        assert r.levelno == logging.INFO
        assert "\n" not in r.getMessage()
        assert_absent(r.getMessage(), ["SECRET-LOGGED-SSN", *env.kms.data_keys])


# -- the low-level document API --------------------------------------------------------------

DOCS_METADATA = MetaData()
DOCS = Table(
    "documents",
    DOCS_METADATA,
    Column("id", Integer, primary_key=True),
    Column("edek", LargeBinary, nullable=False),
    Column("title", LargeBinary),
    Column("body", LargeBinary),
)

PLAIN_DOCS = [
    {"title": b"SECRET-TITLE-1", "body": b"first body \x00\xff"},
    {"title": b"SECRET-TITLE-2", "body": b""},
    {"title": b"SECRET-TITLE-3", "body": b"third"},
]


def store_documents(env: Env, docs: list[EncryptedDocument]) -> list[EncryptedDocument]:
    """Write documents to a plain table and read them back, as an application would."""
    DOCS_METADATA.create_all(env.engine)
    with env.engine.begin() as conn:
        conn.execute(
            DOCS.insert(),
            # From 1: MySQL takes an id of 0 as "the next AUTO_INCREMENT value".
            [{"id": i, "edek": d.edek, **d.fields} for i, d in enumerate(docs, start=1)],
        )
    with env.engine.connect() as conn:
        rows = conn.execute(select(DOCS).order_by(DOCS.c.id)).all()
    return [
        EncryptedDocument(bytes(r.edek), {"title": bytes(r.title), "body": bytes(r.body)})
        for r in rows
    ]


def test_documents_round_trip_for_one_tenant_under_one_wrap(env: Env) -> None:
    with tenant_context("acme"):
        encrypted = env.cmk.encrypt_documents(PLAIN_DOCS)
    assert env.kms.wrap_count == 1
    assert env.kms.unwrap_count == 1  # verify_write_keys: the new key is unwrapped once
    assert len({d.edek for d in encrypted}) == 3, "one EDEK value (row id) per document"
    assert len({d.edek[17:] for d in encrypted}) == 1, "one wrapped key for the batch"
    for doc, plain in zip(encrypted, PLAIN_DOCS, strict=True):
        assert doc.edek[0] == 0x01
        assert all(v[0] == 0x01 for v in doc.fields.values())
        assert_absent(doc.fields["title"], [plain["title"]])
        assert_absent(repr(doc), [plain["title"].decode()])
    stored = store_documents(env, encrypted)

    env.cmk.forget_tenant()
    with tenant_context("acme"):
        assert env.cmk.decrypt_documents(stored) == PLAIN_DOCS
        assert env.cmk.decrypt_document(stored[1]) == PLAIN_DOCS[1]
    assert env.kms.unwrap_count == 2  # the verification, then one for the cold load


def test_document_of_another_tenant_is_refused(env: Env) -> None:
    with tenant_context("acme"):
        stored = store_documents(env, env.cmk.encrypt_documents(PLAIN_DOCS[:1]))
    with tenant_context("globex"), pytest.raises(TenantMismatchError) as info:
        env.cmk.decrypt_documents(stored)
    assert (info.value.row_tenant, info.value.tenant) == ("acme", "globex")
    with pytest.raises(NoTenantError):
        env.cmk.decrypt_documents(stored)


def test_field_moved_between_documents_is_refused(env: Env) -> None:
    with tenant_context("acme"):
        one, two = store_documents(env, env.cmk.encrypt_documents(PLAIN_DOCS[:2]))
        moved = EncryptedDocument(one.edek, {"title": two.fields["title"]})
        with pytest.raises(DecryptionError):
            env.cmk.decrypt_document(moved)
        swapped = EncryptedDocument(
            one.edek, {"title": one.fields["body"], "body": one.fields["title"]}
        )
        with pytest.raises(DecryptionError):
            env.cmk.decrypt_document(swapped)
        with pytest.raises(DecryptionError):
            env.cmk.decrypt_document(one, namespace="other")
        assert env.cmk.decrypt_document(one) == PLAIN_DOCS[0]  # the original still opens


# -- every read access is audited once, refused ones included (issue 12) -----------------------

acc_env = pytest.fixture(acc_env_fixture)


@pytest.mark.parametrize("path", list(READ_PATHS))
def test_every_read_access_gives_one_event(acc_env: AccEnv, path: str) -> None:
    """Each read path (load, streamed partition, lazy first access, ``decrypt_row``,
    ``decrypt_document``, search) under each fault (``_access_matrix``): one access event, its
    outcome, the context's tenant, and nothing for any other tenant."""
    for fault in faults_of(path):
        run_cell(acc_env, path, fault)


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(sorted(PATHS)), st.sampled_from(sorted(FAULTS)), st.booleans()),
        min_size=1,
        max_size=4,
    )
)
def test_the_event_agrees_with_what_the_caller_saw(
    acc_env: AccEnv, steps: list[tuple[str, str, bool]]
) -> None:
    """Any path under any fault, with the key cache cold or as the writes left it (a warm cache
    hides some faults: the update of a tampered row whose key is cached seals without reading
    the tampered value). Whatever the caller saw, the one access event says the same: ``ok``
    when it got the data, else the outcome of the error it got, for the context's tenant only."""
    for path, fault, cold in steps:
        raised = run_access(acc_env, path, fault, cold=cold)
        check_agrees(acc_env, path, fault, raised)
