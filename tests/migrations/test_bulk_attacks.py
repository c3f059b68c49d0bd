"""Red team of the bulk migration paths: a value sealed under one tenant's key is never written,
copied, re-keyed, indexed or revealed under another tenant (or under none) by a tool (issue 12).

The attacker is a tenant (acme) who can write rows of its own, or an operator's slip: globex's
ciphertexts and EDEK copied into a row, a row's tenant column changed to another tenant, to the
empty string or to NULL. Each *cell* is one bulk path run over four rows (acme's 1 and 3,
globex's 2 and 4, one batch, a cold key cache) after one such attack. Whatever the path does
(refuse, or count the row as failed), every cell checks:

* a row whose tenant column does not name its EDEK's tenant is left byte for byte as it was
  (never decrypted into, re-sealed, moved or indexed);
* no value of globex's appears in plaintext in a row not saying globex;
* a path that refuses a row for its tenant unwraps no key for the batch first;
* an event naming a tenant carries only that tenant's details (its key, no row tenant).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, String, Text, delete, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from migrations_helpers import backfill, search_index
from sqlalchemy_cmk import CMK, EncryptedMixin, EncryptedType, tenant_column, tenant_context
from sqlalchemy_cmk.errors import CMKError, TenantMismatchError
from sqlalchemy_cmk.search import BlindIndex, search_tables
from sqlalchemy_cmk.testing import FakeKeyProvider, MemoryAuditSink

ACME, GLOBEX = "acme", "globex"
TENANT_KEYS = {ACME: "fake://acme", GLOBEX: "fake://globex"}
TABLE = "ba_people"
INDEX = f"{TABLE}.email_bidx"
ROWS = {1: ACME, 2: GLOBEX, 3: ACME, 4: GLOBEX}
SECRETS = {"n2", "n4", "2@globex", "4@globex", "note 2", "note 4"}  # globex's plaintexts


class PlainBase(DeclarativeBase):
    pass


class PlainPerson(EncryptedMixin, PlainBase):
    """How the rows were written: before the email became searchable. The tenant column is
    nullable, as a legacy schema's may be."""

    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str | None] = tenant_column(String(20), nullable=True)
    email: Mapped[str | None] = mapped_column(EncryptedType(String(100)), nullable=True)
    note: Mapped[str | None] = mapped_column(
        EncryptedType(Text, storage="text", allow_plaintext=True), nullable=True
    )
    note_bin: Mapped[str | None] = mapped_column(EncryptedType(Text), nullable=True)  # move target


class Base(DeclarativeBase):
    pass


class Person(EncryptedMixin, Base):
    """The model the tools are given: the email searchable."""

    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str | None] = tenant_column(String(20), nullable=True)
    email: Mapped[str | None] = mapped_column(
        EncryptedType(String(100), search=BlindIndex()), nullable=True
    )
    note: Mapped[str | None] = mapped_column(
        EncryptedType(Text, storage="text", allow_plaintext=True), nullable=True
    )
    note_bin: Mapped[str | None] = mapped_column(EncryptedType(Text), nullable=True)  # move target


STATES = search_tables(Base.metadata)[1]


@dataclass
class Env:
    engine: Engine
    cmk: CMK
    kms: FakeKeyProvider
    audit: MemoryAuditSink

    def raw(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.begin() as conn:
            result = conn.execute(text(sql), params)
            return list(result.all()) if result.returns_rows else []


@pytest.fixture
def env(engine: Engine) -> Iterator[Env]:
    Base.metadata.create_all(engine)
    kms = FakeKeyProvider()
    audit = MemoryAuditSink()
    cmk = CMK(kms, tenant_keys=TENANT_KEYS, audit_sinks=[audit], retry_attempts=1)
    yield Env(engine, cmk, kms, audit)


# -- paths -------------------------------------------------------------------------------------


def _plaintext_notes(env: Env) -> None:
    for pk in ROWS:
        env.raw(f"update {TABLE} set note = :n where id = :k", n=f"note {pk}", k=pk)


def _build(env: Env) -> None:
    search_index.build_index(env.engine, env.cmk, Base.metadata, INDEX, settle=0)


@dataclass(frozen=True)
class Path:
    run: Callable[[Env], Any]
    checker: bool = False  # counts failures instead of raising
    prepare: Callable[[Env], None] | None = None  # after the rows are written


KW: dict[str, Any] = {"metadata": Base.metadata, "batch_size": 10}
PATHS: dict[str, Path] = {
    "verify": Path(lambda env: backfill.verify(env.engine, env.cmk, TABLE, **KW), checker=True),
    "rotate": Path(lambda env: backfill.rotate_data_keys(env.engine, env.cmk, TABLE, **KW)),
    "decrypt": Path(
        lambda env: backfill.decrypt_columns(env.engine, env.cmk, TABLE, ["note"], **KW)
    ),
    "encrypt": Path(
        lambda env: backfill.encrypt_columns(env.engine, env.cmk, TABLE, ["note"], **KW),
        prepare=_plaintext_notes,
    ),
    "move": Path(
        lambda env: backfill.encrypt_columns(
            env.engine, env.cmk, TABLE, ["note"], into={"note": "note_bin"}, **KW
        )
    ),
    "rewrap": Path(lambda env: backfill.rewrap_keys(env.engine, env.cmk, TABLE, batch_size=10)),
    "build_index": Path(
        lambda env: search_index.build_index(
            env.engine, env.cmk, Base.metadata, INDEX, batch_size=10, settle=0
        )
    ),
    "rotate_index": Path(
        lambda env: search_index.rotate_index(
            env.engine, env.cmk, Base.metadata, INDEX, batch_size=10, settle=0
        ),
        prepare=_build,
    ),
    "verify_index": Path(
        lambda env: search_index.verify_index(
            env.engine, env.cmk, Base.metadata, INDEX, batch_size=10
        ),
        checker=True,
        prepare=_build,
    ),
}

# -- attacks -----------------------------------------------------------------------------------


def _copy_globex_into(env: Env, pk: int, tenant: str | None) -> None:
    """Globex's row 2's ciphertexts and EDEK, copied into row ``pk`` saying ``tenant``."""
    _copy_into(env, 2, pk, tenant)


def _copy_into(env: Env, src: int, pk: int, tenant: str | None) -> None:
    """Row ``src``'s ciphertexts and EDEK, copied into row ``pk`` saying ``tenant``."""
    (email, note, note_bin, comp) = env.raw(
        f"select email, note, note_bin, cmk_edek from {TABLE} where id = :k", k=src
    )[0]
    env.raw(
        f"update {TABLE} set tenant_id = :t, email = :e, note = :n, note_bin = :b, "
        "cmk_edek = :c where id = :k",
        t=tenant,
        e=email,
        n=note,
        b=note_bin,
        c=comp,
        k=pk,
    )


# name -> (the attack, the rows it makes claim another tenant than their EDEK's)
ATTACKS: dict[str, tuple[Callable[[Env], None], frozenset[int]]] = {
    "copied_into_acme": (lambda env: _copy_globex_into(env, 1, ACME), frozenset({1})),
    "copied_into_null": (lambda env: _copy_globex_into(env, 1, None), frozenset({1})),
    "copied_into_empty": (lambda env: _copy_globex_into(env, 1, ""), frozenset({1})),
    "retenanted_acme": (
        lambda env: env.raw(f"update {TABLE} set tenant_id = 'acme' where id = 2"),
        frozenset({2}),
    ),
    "retenanted_null": (
        lambda env: env.raw(f"update {TABLE} set tenant_id = NULL where id = 2"),
        frozenset({2}),
    ),
    "retenanted_empty": (
        lambda env: env.raw(f"update {TABLE} set tenant_id = '' where id = 2"),
        frozenset({2}),
    ),
}


def reset(env: Env, path: Path) -> None:
    with env.engine.begin() as conn:
        conn.execute(delete(Person))
        conn.execute(delete(STATES))
    maker = sessionmaker(env.engine)
    env.cmk.install(maker)
    try:
        for pk, tenant in ROWS.items():
            with tenant_context(tenant), maker.begin() as s:
                s.add(PlainPerson(id=pk, tenant_id=tenant, email=f"{pk}@{tenant}", note=f"n{pk}"))
    finally:
        env.cmk.uninstall(maker)
    if path.prepare is not None:
        path.prepare(env)


def rows(env: Env) -> dict[int, tuple[Any, ...]]:
    return {
        r[0]: tuple(bytes(v) if isinstance(v, memoryview) else v for v in r[1:])
        for r in env.raw(f"select * from {TABLE} order by id")
    }


def run_cell(env: Env, path_name: str, attack_name: str) -> None:
    path = PATHS[path_name]
    attack, tampered = ATTACKS[attack_name]
    cell = f"{path_name} x {attack_name}"
    reset(env, path)
    attack(env)
    env.cmk.forget_tenant()  # a cold cache: every key comes from the KMS
    before = rows(env)
    env.audit.events.clear()
    env.kms.reset_counts()
    raised: CMKError | None = None
    try:
        path.run(env)
    except CMKError as exc:
        raised = exc
    unwraps = env.kms.unwrap_count
    after = rows(env)
    for pk in tampered:
        assert after[pk] == before[pk], (cell, "a tampered row was written", raised)
    tenant_of = {r[0]: r[1] for r in env.raw(f"select id, tenant_id from {TABLE}")}
    for pk, row in after.items():
        if tenant_of[pk] != GLOBEX:
            # (the attack itself may have copied plaintext: only what the tool wrote counts)
            leaked = {v for v in row if isinstance(v, str)} - set(before[pk])
            assert not leaked & SECRETS, (cell, pk, "globex's plaintext in another tenant's row")
    if isinstance(raised, TenantMismatchError):
        assert raised.row_tenant == GLOBEX, cell
        # Refused on the rows' tenants alone: no key was unwrapped for the batch.
        assert unwraps == 0, (cell, unwraps)
    elif not path.checker and path_name != "rewrap":
        # Every path that opens values must refuse the batch (rewrap never opens one: it
        # re-wraps each EDEK under its own tenant's key, whatever row holds it).
        assert raised is not None, (cell, "the tampered row was not refused")
    for e in env.audit.events:
        if e.tenant is not None:
            assert e.row_tenant is None, (cell, e)
            assert e.key_ref in (None, TENANT_KEYS.get(e.tenant)), (cell, e)


@pytest.mark.parametrize("path_name", list(PATHS))
def test_no_bulk_path_crosses_tenants(env: Env, path_name: str) -> None:
    """Every attack, from a fresh start: the path refuses (or counts) the tampered rows and
    crosses no tenant."""
    for attack_name in ATTACKS:
        run_cell(env, path_name, attack_name)


def test_decrypt_refuses_a_row_of_no_tenant(env: Env) -> None:
    """decrypt_columns checked a row's tenant against its EDEK only when the tenant column was
    not NULL: globex's ciphertext and EDEK in a row of no tenant (its tenant column emptied, or
    copied into such a row) were decrypted into that row, globex's plaintext readable by
    whoever reads rows of no tenant. Now refused before any key is unwrapped, nothing written."""
    reset(env, PATHS["decrypt"])
    env.raw(f"update {TABLE} set tenant_id = NULL where id = 2")
    env.cmk.forget_tenant()
    before = rows(env)
    env.kms.reset_counts()
    with pytest.raises(TenantMismatchError) as info:
        backfill.decrypt_columns(env.engine, env.cmk, TABLE, ["note"], metadata=Base.metadata)
    assert info.value.row_tenant == GLOBEX and info.value.tenant is None
    assert env.kms.unwrap_count == 0
    assert rows(env) == before


@pytest.mark.parametrize("path_name", ["move", "build_index"])
def test_refused_batch_unwraps_no_key(env: Env, path_name: str) -> None:
    """The move (encrypt into=) and the index build unwrapped every key of a batch before
    checking its rows' tenants, so a row of acme holding globex's EDEK had globex's key
    unwrapped (a KMS call on globex's key, audited to globex) for a batch then refused, as
    decrypt_columns did before 87f0561. Now the tenants are checked first."""
    reset(env, PATHS[path_name])
    _copy_globex_into(env, 1, ACME)
    env.cmk.forget_tenant()
    env.kms.reset_counts()
    with pytest.raises(TenantMismatchError):
        PATHS[path_name].run(env)
    assert env.kms.unwrap_count == 0


def _unwrapped(env: Env) -> set[str]:
    return {c.key_ref for c in env.kms.calls if c.operation == "unwrap"}


@pytest.mark.parametrize("path_name", ["verify", "verify_index"])
def test_checker_unwraps_only_keys_rows_claim(env: Env, path_name: str) -> None:
    """verify unwrapped the key of every EDEK in a batch, so globex's EDEK copied into a row of
    acme had globex's key unwrapped (a KMS call and an unwrap event for globex) to report a
    mismatch no key decides (verify_index: the previous commit's check before the load)."""
    path = PATHS[path_name]
    reset(env, path)
    _copy_globex_into(env, 1, ACME)
    env.raw(f"delete from {TABLE} where id in (2, 4)")  # globex's own rows: none in the batch
    env.cmk.forget_tenant()
    env.kms.reset_counts()
    report = path.run(env)
    assert report.failed == {ACME: 1}
    assert _unwrapped(env) == {TENANT_KEYS[ACME]}


class NotesBase(DeclarativeBase):
    pass


class Note(EncryptedMixin, NotesBase):
    """A searchable column of legacy plaintext, encrypted in place later."""

    __tablename__ = "ba_notes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = tenant_column(String(20))
    body: Mapped[str | None] = mapped_column(
        EncryptedType(Text, storage="text", allow_plaintext=True, search=BlindIndex()),
        nullable=True,
    )


search_tables(NotesBase.metadata)


@pytest.mark.parametrize("path_name", ["build_index", "verify_index"])
def test_index_audits_no_decrypt_of_plaintext(env: Env, path_name: str) -> None:
    """The index tools audited a ``decrypt`` for every row with a value to index, plaintext
    ones included: a legacy row saying globex, whose tenant column is all that names globex,
    put a decrypt of globex's data by the migration tool in globex's trail though nothing of
    globex's was decrypted (and unwrapped the keys of rows with no ciphertext to open). Only
    the rows whose values were decrypted are audited now."""
    NotesBase.metadata.create_all(env.engine)
    maker = sessionmaker(env.engine)
    env.cmk.install(maker)
    try:
        with tenant_context(ACME), maker.begin() as s:
            s.add(Note(id=1, tenant_id=ACME, body="sealed"))
    finally:
        env.cmk.uninstall(maker)
    env.raw("insert into ba_notes (id, tenant_id, body) values (2, 'globex', 'legacy')")
    index = "ba_notes.body_bidx"
    if path_name == "verify_index":
        search_index.build_index(env.engine, env.cmk, NotesBase.metadata, index, settle=0)
    env.cmk.forget_tenant()
    env.audit.events.clear()
    env.kms.reset_counts()
    if path_name == "build_index":
        search_index.build_index(env.engine, env.cmk, NotesBase.metadata, index, settle=0)
    else:
        report = search_index.verify_index(env.engine, env.cmk, NotesBase.metadata, index)
        assert report.ok == {ACME: 1, GLOBEX: 1}
    decrypts = [(e.tenant, e.rows) for e in env.audit.events if e.operation == "decrypt"]
    # (the build finds acme's row indexed by its write: only the legacy row is pending)
    assert decrypts == ([] if path_name == "build_index" else [(ACME, 1)])


@pytest.mark.parametrize("when", ["before", "during"])
@pytest.mark.parametrize("direction", ["decrypt", "move"])
def test_moves_never_overwrite_a_target(env: Env, direction: str, when: str) -> None:
    """A move fills an empty target and empties its source in one update. A target holding a
    value beside its source (written by an instance on the old model, before the run or while
    it runs) was overwritten by decrypt_columns(into=), which did not look (the encrypt move
    refused such rows only at its start, and neither looked at the rows it wrote): the value
    was lost. Both refuse it now, at the start and in each batch, and write nothing of it."""
    reset(env, PATHS["move"])
    if direction == "decrypt":  # the notes moved into note_bin first: decrypt them back
        PATHS["move"].run(env)
        env.raw(f"update {TABLE} set note = NULL")
    src, dst = ("note_bin", "note") if direction == "decrypt" else ("note", "note_bin")
    value: Any = "the app's" if direction == "decrypt" else b"the app's"

    def fill(*_: Any) -> None:
        env.raw(f"update {TABLE} set {dst} = :v where id = 4 and {dst} is null", v=value)

    progress = None
    if when == "before":
        fill()
    else:
        progress = fill  # after the first batch (rows 1 and 2): row 4 is yet to come
    with pytest.raises(CMKError):
        if direction == "decrypt":
            backfill.decrypt_columns(
                env.engine,
                env.cmk,
                TABLE,
                [src],
                into={src: dst},
                metadata=Base.metadata,
                batch_size=2,
                progress=progress,
            )
        else:
            backfill.encrypt_columns(
                env.engine,
                env.cmk,
                TABLE,
                [src],
                into={src: dst},
                metadata=Base.metadata,
                batch_size=2,
                progress=progress,
            )
    (kept,) = env.raw(f"select {dst} from {TABLE} where id = 4")[0]
    assert (bytes(kept) if isinstance(kept, memoryview) else kept) == value


# -- search: any rows, any mix of attacks, any batch size ------------------------------------

TENANT_VALUES = [ACME, GLOBEX, None, ""]


def _secret_owner(value: Any) -> str | None:
    """The tenant whose plaintext ``value`` is, if it is one of the rows' plaintexts."""
    for pk, tenant in ROWS.items():
        if value in (f"{pk}@{tenant}", f"n{pk}", f"note {pk}"):
            return tenant
    return None


# An attack on a row: copy another row's values and EDEK into it, or change its tenant
# column only; either way the row then names (col) another tenant than its EDEK's.
attack_st = st.tuples(
    st.sampled_from(sorted(ROWS)),  # the row attacked
    st.sampled_from(["copy", "retenant"]),
    st.sampled_from(sorted(ROWS)),  # the row copied from (copy)
    st.sampled_from(TENANT_VALUES),  # what its tenant column says afterwards
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    path_name=st.sampled_from(list(PATHS)),
    attacks=st.lists(attack_st, min_size=1, max_size=3),
    batch_size=st.integers(1, 4),
)
def test_search_bulk_paths_cross_no_tenant(
    env: Env, path_name: str, attacks: list[tuple[int, str, int, str | None]], batch_size: int
) -> None:
    """Any path, any rows attacked in any of the ways, in batches of any size (earlier
    batches commit before a later one is refused): no row naming another tenant than its
    EDEK's is ever written, and no tenant's plaintext lands in a row naming another."""
    path = PATHS[path_name]
    reset(env, path)
    owner = dict(ROWS)  # the tenant each row's EDEK is of
    tampered: set[int] = set()
    for pk, how, src, says in attacks:
        if how == "copy" and src != pk:
            if says == owner[src]:
                continue  # a copy within a tenant crosses none
            _copy_into(env, src, pk, says)
            owner[pk] = owner[src]
        elif how == "retenant":
            if says == owner[pk]:
                continue
            env.raw(f"update {TABLE} set tenant_id = :t where id = :k", t=says, k=pk)
        else:
            continue
        tampered.add(pk)
    env.cmk.forget_tenant()
    before = rows(env)
    kw = dict(KW, batch_size=batch_size)
    runs: dict[str, Callable[[], Any]] = {
        "verify": lambda: backfill.verify(env.engine, env.cmk, TABLE, **kw),
        "rotate": lambda: backfill.rotate_data_keys(env.engine, env.cmk, TABLE, **kw),
        "decrypt": lambda: backfill.decrypt_columns(env.engine, env.cmk, TABLE, ["note"], **kw),
        "encrypt": lambda: backfill.encrypt_columns(env.engine, env.cmk, TABLE, ["note"], **kw),
        "move": lambda: backfill.encrypt_columns(
            env.engine, env.cmk, TABLE, ["note"], into={"note": "note_bin"}, **kw
        ),
        "rewrap": lambda: backfill.rewrap_keys(env.engine, env.cmk, TABLE, batch_size=batch_size),
        "build_index": lambda: search_index.build_index(
            env.engine, env.cmk, Base.metadata, INDEX, batch_size=batch_size, settle=0
        ),
        "rotate_index": lambda: search_index.rotate_index(
            env.engine, env.cmk, Base.metadata, INDEX, batch_size=batch_size, settle=0
        ),
        "verify_index": lambda: search_index.verify_index(
            env.engine, env.cmk, Base.metadata, INDEX, batch_size=batch_size
        ),
    }
    raised: CMKError | None = None
    try:
        runs[path_name]()
    except CMKError as exc:
        raised = exc
    after = rows(env)
    for pk in tampered:
        assert after[pk] == before[pk], (path_name, attacks, pk, raised)
    if tampered and not path.checker and path_name != "rewrap":
        assert raised is not None, (path_name, attacks)
    for pk, row in after.items():
        for value in set(row) - set(before[pk]):
            found = _secret_owner(value)
            assert found is None or found == row[0], (path_name, attacks, pk)


class BehindBase(DeclarativeBase):
    pass


class Behind(EncryptedMixin, BehindBase):
    """The model an operator may hold mid-migration: ``note`` declared plain (its decryption
    not finished) and ``note_bin`` not mapped at all, while both still hold ciphertext."""

    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str | None] = tenant_column(String(20), nullable=True)
    email: Mapped[str | None] = mapped_column(EncryptedType(String(100)), nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)


def test_rotate_strands_no_column_the_model_misses(env: Env) -> None:
    """rotate_data_keys took the encrypted columns from the model alone when given one: a
    column the model declares plain, or no longer maps, that still held ciphertext was left
    out, and the rows' new companions stranded its values for good (every one unreadable).
    The columns holding ciphertext in the database are now rotated too."""
    reset(env, PATHS["move"])
    PATHS["move"].run(env)  # note -> note_bin, sealed; note NULL
    maker = sessionmaker(env.engine)
    env.cmk.install(maker)
    try:
        for pk, tenant in ROWS.items():
            with tenant_context(tenant), maker.begin() as s:
                row = s.get(PlainPerson, pk)
                assert row is not None
                row.note = f"again {pk}"  # text storage: sealed under the row's key
    finally:
        env.cmk.uninstall(maker)
    report = backfill.rotate_data_keys(env.engine, env.cmk, TABLE, metadata=BehindBase.metadata)
    assert set(report.columns) == {"email", "note", "note_bin"}
    check = backfill.verify(
        env.engine, env.cmk, TABLE, ["email", "note", "note_bin"], metadata=Base.metadata
    )
    assert check.failed == {} and check.encrypted_ok == {ACME: 2, GLOBEX: 2}


@pytest.mark.parametrize("fault", ["tampered", "forged_tenant"])
def test_one_bad_edek_blocks_no_other_tenants_rewrap(env: Env, fault: str) -> None:
    """rewrap_keys stopped at the first EDEK that did not rewrap, before writing anything of
    its batch, and named no row: one EDEK in a row of acme naming globex with acme's key
    (forged, or its tenant field changed) kept every tenant's rows on the keys being retired.
    The other rows are rewrapped now, the bad one is left as it was, and the error names it.
    A tampered wrapped key still stops the call with nothing of its batch written (a KMS
    returning a wrong key fails alike, test_rewrap_refuses_a_key_the_kms_unwrapped_wrongly...),
    and now names the row too."""
    reset(env, PATHS["verify"])
    (comp,) = env.raw(f"select cmk_edek from {TABLE} where id = 1")[0]
    comp = bytes(comp)
    if fault == "tampered":  # a bit of the wrapped key
        bad = comp[:-1] + bytes([comp[-1] ^ 1])
    else:  # the envelope's tenant field says globex (u16 length, then the name)
        n = int.from_bytes(comp[17:19], "big")
        bad = comp[:17] + len(GLOBEX).to_bytes(2, "big") + GLOBEX.encode() + comp[19 + n :]
    env.raw(f"update {TABLE} set cmk_edek = :c where id = 1", c=bad)
    rotated = CMK(
        env.kms,
        tenant_keys={t: [f"fake://{t}-new", ref] for t, ref in TENANT_KEYS.items()},
        audit_sinks=[env.audit],
        retry_attempts=1,
    )
    before = rows(env)
    with pytest.raises(CMKError) as info:
        backfill.rewrap_keys(env.engine, rotated, TABLE, batch_size=10)
    assert str(info.value).startswith("row 1 of ")
    after = rows(env)
    assert after[1] == before[1]
    if fault == "tampered":
        assert after == before
    else:
        assert all(after[pk][-1] != before[pk][-1] for pk in (2, 3, 4)), "not rewrapped"
