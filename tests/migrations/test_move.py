"""Moving a text column into binary storage online, and back (docs/migrations.md, "Moving a
text column into binary storage"), on SQLite and PostgreSQL.

What a user would check: the target's bytes are not the plaintext, the application's model
reads every moved row (during the move through the dual-read recipe, after the cutover through
the plain ``EncryptedType`` column), application writes during the move survive, values already
encrypted in place are moved without being encrypted twice, a stopped run resumes, the cutover
refuses while a value is left, and the reverse move restores the exact text.
"""

from __future__ import annotations

import datetime
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Date,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    insert,
    select,
    text,
)
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.orm.attributes import flag_modified

from migrations_helpers import backfill
from sqlalchemy_cmk import (
    CMK,
    ConfigurationError,
    DecryptionError,
    EncryptedMixin,
    EncryptedType,
    tenant_context,
)
from sqlalchemy_cmk.testing import FakeKeyProvider
from tests.migrations.test_alembic_ops import _forget_cmk, db_url  # noqa: F401 (fixtures)
from tests.migrations.test_backfill import _connect_args
from tests.migrations.test_integrity import GarbageWrap

TABLE = "mv_patients"
TENANTS = ("acme", "globex")
INTO = {"ssn": "ssn_enc"}

metadata = MetaData()
patients = Table(  # before the move: ssn is text; ssn_enc is added, empty, by the first step
    TABLE,
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("tenant_id", String(20)),
    Column("ssn", Text),
    Column("ssn_enc", LargeBinary),
    Column("cmk_edek", LargeBinary),
)


class Base(DeclarativeBase):
    pass


class Patient(EncryptedMixin, Base):
    """The application's model during the move: the recipe of docs/migrations.md.

    ``ssn`` reads the old column while it holds a value, else the new one, and writes only the
    new one (emptying the old), so the backfill's compare-and-swap sees every write.
    """

    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(String(20))
    ssn_old: Mapped[str | None] = mapped_column(
        "ssn", EncryptedType(Text, storage="text", allow_plaintext=True)
    )
    ssn_new: Mapped[str | None] = mapped_column("ssn_enc", EncryptedType(Text))

    @hybrid_property
    def ssn(self) -> str | None:
        return self.ssn_old if self.ssn_old is not None else self.ssn_new

    @ssn.setter  # the form of docs/migrations.md: 2.0.0 has no hybrid .inplace
    def ssn(self, value: str | None) -> None:
        self.ssn_new = value
        self.ssn_old = None
        # Both columns in the UPDATE, changed or not as this session saw them: the backfill
        # may have moved the value since the row was loaded.
        flag_modified(self, "ssn_new")
        flag_modified(self, "ssn_old")


class After(DeclarativeBase):
    pass


class PatientAfter(EncryptedMixin, After):
    """The model after the cutover: the attribute maps the target, which keeps its name."""

    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(String(20))
    ssn: Mapped[str | None] = mapped_column("ssn_enc", EncryptedType(Text))


def value(i: int) -> str | None:
    if i % 9 == 0:
        return None
    return ["123-45-6789", "Zoë 😀 漢字", "", "CMK:upper case is plaintext", "x" * 3000][i % 5] + (
        f" #{i}"
    )


def make_cmk(provider: Any) -> CMK:
    return CMK(provider, tenant_keys={t: f"{provider.scheme}://{t}" for t in TENANTS})


def seed(engine: Engine, n: int) -> dict[int, tuple[str, str | None]]:
    metadata.create_all(engine)
    rows = {i: (TENANTS[i % 2], value(i)) for i in range(n)}
    with engine.begin() as conn:
        conn.execute(
            insert(patients), [{"id": i, "tenant_id": t, "ssn": v} for i, (t, v) in rows.items()]
        )
    return rows


def stored(engine: Engine) -> dict[int, tuple[Any, Any]]:
    with engine.connect() as conn:
        return {
            r.id: (r.ssn, None if r.ssn_enc is None else bytes(r.ssn_enc))
            for r in conn.execute(select(patients))
        }


def read(engine: Engine, cmk: CMK, model: Any) -> dict[int, tuple[str, str | None]]:
    maker = sessionmaker(engine)
    cmk.install(maker)
    out = {}
    for t in TENANTS:
        with tenant_context(t), maker() as s:
            for p in s.scalars(select(model).where(model.tenant_id == t)):
                out[p.id] = (p.tenant_id, p.ssn)
    return out


def move(engine: Engine, cmk: CMK, **kw: Any) -> backfill.Report:
    kw.setdefault("tenant_column", "tenant_id")
    return backfill.encrypt_columns(engine, cmk, TABLE, ["ssn"], into=INTO, **kw)


def test_move_reads_back_resumes_cuts_over_and_reverses(engine: Engine) -> None:
    rows = seed(engine, 50)
    cmk = make_cmk(FakeKeyProvider())
    # Some values were encrypted in place earlier (the text storage): moved, not re-encrypted.
    backfill.encrypt_columns(
        engine, cmk, TABLE, ["ssn"], tenant_column="tenant_id", batch_size=10, max_batches=2
    )
    assert sum(1 for s, _ in stored(engine).values() if s and s.startswith("cmk:")) == 20
    assert read(engine, cmk, Patient) == rows

    with pytest.raises(backfill.MoveNotFinishedError) as early:
        backfill.check_cutover(engine, TABLE, INTO)
    assert early.value.remaining == sum(1 for _, v in rows.values() if v is not None)

    stopped = move(engine, cmk, batch_size=7, max_batches=3)  # a run stopped part-way
    assert stopped.rows == 21
    assert read(engine, cmk, Patient) == rows  # both forms read meanwhile
    with pytest.raises(backfill.MoveNotFinishedError) as left:
        backfill.check_cutover(engine, TABLE, INTO)
    assert left.value.remaining == early.value.remaining - 21 and left.value.column == "ssn"

    report = move(engine, cmk, batch_size=7)
    assert stopped.rows + report.rows == early.value.remaining
    assert report.conflicts == 0
    assert move(engine, cmk).rows == 0  # done: nothing to do

    for i, (src, enc) in stored(engine).items():
        assert src is None
        plain = rows[i][1]
        assert (enc is None) == (plain is None)
        if plain:
            assert enc is not None and plain.encode() not in enc and enc[0] == 1
    assert read(engine, cmk, Patient) == rows
    assert read(engine, cmk, PatientAfter) == rows  # the model after the cutover
    assert backfill.check_cutover(engine, TABLE, INTO) == early.value.remaining

    # The reverse: back into the text column, byte for byte; then forward again.
    back = backfill.decrypt_columns(
        engine, cmk, TABLE, ["ssn_enc"], tenant_column="tenant_id", into={"ssn_enc": "ssn"}
    )
    assert back.rows == early.value.remaining
    assert {i: s for i, (s, _) in stored(engine).items()} == {i: v for i, (_, v) in rows.items()}
    assert all(e is None for _, e in stored(engine).values())
    assert backfill.check_cutover(engine, TABLE, {"ssn_enc": "ssn"}) == back.rows
    assert move(engine, cmk).rows == back.rows
    assert read(engine, cmk, PatientAfter) == rows


def test_application_writes_during_the_move_are_kept(engine: Engine) -> None:
    expected = seed(engine, 40)
    cmk = make_cmk(FakeKeyProvider())
    maker = sessionmaker(engine)
    cmk.install(maker)
    calls = 0
    while move(engine, cmk, batch_size=6, max_batches=1).batches:
        calls += 1
        assert calls < 40
        for i in (calls * 7 % 40, (calls * 7 + 20) % 40):  # rows moved and not yet moved
            t = expected[i][0]
            with tenant_context(t), maker() as s:
                p = s.get(Patient, i)
                assert p is not None and p.ssn == expected[i][1]
                p.ssn = f"app {calls} {i}"
                s.commit()
            expected[i] = (t, f"app {calls} {i}")
        with tenant_context("globex"), maker() as s:
            s.add(Patient(id=1000 + calls, tenant_id="globex", ssn=f"new {calls}"))
            s.commit()
        expected[1000 + calls] = ("globex", f"new {calls}")
    backfill.check_cutover(engine, TABLE, INTO)
    assert read(engine, cmk, PatientAfter) == expected


def test_a_write_by_a_session_that_loaded_the_row_before_it_moved_wins(engine: Engine) -> None:
    """The session saw the old column's value and the new column NULL; the row moves; then the
    session writes NULL. Both columns must be in its UPDATE, or the moved copy would be read
    back (the setter's flag_modified)."""
    seed(engine, 4)
    cmk = make_cmk(FakeKeyProvider())
    maker = sessionmaker(engine)
    cmk.install(maker)
    with tenant_context("globex"), maker() as s:
        p = s.get(Patient, 1)
        assert p is not None and p.ssn == value(1)
        move(engine, cmk)  # meanwhile, on its own connections
        p.ssn = None
        s.commit()
    with tenant_context("globex"), maker() as s:
        again = s.get(Patient, 1)
        assert again is not None and again.ssn is None
    assert stored(engine)[1] == (None, None)


def test_compare_and_swap_keeps_a_write_made_inside_the_batch(engine: Engine) -> None:
    from sqlalchemy import event

    seed(engine, 10)
    cmk = make_cmk(FakeKeyProvider())
    app = create_engine(engine.url, connect_args=_connect_args(engine))
    maker = sessionmaker(app)
    cmk.install(maker)
    fired: list[str] = []

    def before_update(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if fired or not statement.lstrip().upper().startswith("UPDATE"):
            return
        fired.append(statement)
        if engine.dialect.name == "sqlite":  # no lock taken: the write lands before ours
            with tenant_context("acme"), maker() as s:
                p = s.get(Patient, 4)
                assert p is not None
                p.ssn = "written while the batch was in flight"
                s.commit()

    event.listen(engine, "before_cursor_execute", before_update)
    try:
        report = move(engine, cmk, batch_size=100)
    finally:
        event.remove(engine, "before_cursor_execute", before_update)
        app.dispose()
    assert fired
    got = read(engine, cmk, PatientAfter)
    if engine.dialect.name == "sqlite":
        assert report.conflicts == 1
        assert got[4] == ("acme", "written while the batch was in flight")
    assert stored(engine)[4][0] is None and len(got) == 10


def test_a_wrap_answering_garbage_moves_nothing(engine: Engine) -> None:
    rows = seed(engine, 20)
    provider = GarbageWrap()
    provider.broken = True
    before = stored(engine)
    with pytest.raises(DecryptionError):
        move(engine, make_cmk(provider), batch_size=5)
    assert stored(engine) == before  # every plaintext still where it was
    provider.broken = False
    move(engine, make_cmk(provider))
    assert read(engine, make_cmk(provider), PatientAfter) == rows


def test_other_types_move_as_their_encrypted_type_writes_them(engine: Engine) -> None:
    md = MetaData()
    table = Table(
        "mv_typed",
        md,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("tenant_id", String(20)),
        Column("born", Date),
        Column("born_enc", LargeBinary),
        Column("code", String(12)),  # length-limited: fine to move out of
        Column("code_enc", LargeBinary),
        Column("cmk_edek", LargeBinary),
    )
    md.create_all(engine)
    day = datetime.date(1990, 5, 17)
    with engine.begin() as conn:
        conn.execute(
            insert(table),
            [
                {"id": i, "tenant_id": "acme", "born": day + datetime.timedelta(i), "code": f"c{i}"}
                for i in range(5)
            ],
        )

    class B(DeclarativeBase):
        pass

    class Typed(EncryptedMixin, B):
        __tablename__ = "mv_typed"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        tenant_id: Mapped[str] = mapped_column(String(20))
        born: Mapped[datetime.date] = mapped_column("born_enc", EncryptedType(Date))
        code: Mapped[str] = mapped_column("code_enc", EncryptedType(String(12)))

    cmk = make_cmk(FakeKeyProvider())
    report = backfill.encrypt_columns(
        engine,
        cmk,
        "mv_typed",
        ["born", "code"],
        tenant_column="tenant_id",
        metadata=B,
        into={"born": "born_enc", "code": "code_enc"},
    )
    assert report.rows == 5
    maker = sessionmaker(engine)
    cmk.install(maker)
    with tenant_context("acme"), maker() as s:
        got = {p.id: (p.born, p.code) for p in s.scalars(select(Typed))}
    assert got == {i: (day + datetime.timedelta(i), f"c{i}") for i in range(5)}


def test_bad_moves_are_refused_before_anything_changes(engine: Engine) -> None:
    seed(engine, 5)
    cmk = make_cmk(FakeKeyProvider())
    with engine.begin() as conn:
        conn.execute(text(f"ALTER TABLE {TABLE} ADD COLUMN ssn_text TEXT"))
    before = stored(engine)
    cases: list[tuple[dict[str, str], str]] = [
        ({"ssn": "nope"}, "no column 'nope'"),
        ({"ssn": "ssn_text"}, "not a binary column"),
        ({"ssn": "ssn"}, "the column itself"),
        ({"ssn": "tenant_id"}, "tenant"),
        ({"ssn": "cmk_edek"}, "companion"),
    ]
    for k, (into, message) in enumerate(cases):
        with pytest.raises(ConfigurationError, match=message):
            backfill.encrypt_columns(
                engine, cmk, TABLE, ["ssn"], tenant_column="tenant_id", into=into
            )
        if k < 3:  # the checks that need no tenant or companion column: before the companion
            with pytest.raises(ConfigurationError, match=message):
                backfill.check_encryptable(engine, TABLE, ["ssn"], into=into)
    for bad in ({"ssn": "ssn"}, {"ssn": "ssn_enc", "ssn_text": "ssn_enc"}):
        with pytest.raises(ConfigurationError, match="another column"):  # not 'still holds'
            backfill.check_cutover(engine, TABLE, bad)
    with engine.begin() as conn:
        blob = "BYTEA" if engine.dialect.name == "postgresql" else "BLOB"
        conn.execute(text(f"ALTER TABLE {TABLE} ADD COLUMN ssn_nn {blob} NOT NULL DEFAULT 'x'"))
    with pytest.raises(ConfigurationError, match="NOT NULL"):
        backfill.check_encryptable(engine, TABLE, ["ssn"], into={"ssn": "ssn_nn"})
    with pytest.raises(ConfigurationError, match="every column"):
        backfill.encrypt_columns(
            engine, cmk, TABLE, ["ssn", "ssn_text"], tenant_column="tenant_id", into=INTO
        )

    class Wrong(DeclarativeBase):
        pass

    class P(EncryptedMixin, Wrong):
        __tablename__ = TABLE
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        tenant_id: Mapped[str] = mapped_column(String(20))
        ssn_enc: Mapped[str] = mapped_column(EncryptedType(Text, storage="text"))

    with pytest.raises(ConfigurationError, match="default \\(binary\\) storage"):
        move(engine, cmk, metadata=Wrong)
    with pytest.raises(ConfigurationError, match="default \\(binary\\) storage"):
        # What the CLI checks before its workers start (they run without the models).
        backfill.check_encryptable(engine, TABLE, ["ssn"], into=INTO, metadata=Wrong)

    with engine.begin() as conn:  # SQL, not Index(): that would stay on the shared Table
        conn.execute(text(f"CREATE UNIQUE INDEX mv_ssn_unique ON {TABLE} (ssn)"))
    with pytest.raises(backfill.UniqueColumnError) as unique:
        backfill.check_encryptable(engine, TABLE, ["ssn"], into=INTO)
    assert unique.value.index == "mv_ssn_unique"
    with pytest.raises(backfill.UniqueColumnError):
        move(engine, cmk)
    assert stored(engine) == before


def test_a_target_already_holding_values_is_refused(engine: Engine) -> None:
    """A mistyped into= naming a column with data of its own would overwrite it row by row."""
    seed(engine, 6)
    cmk = make_cmk(FakeKeyProvider())
    with engine.begin() as conn:
        conn.execute(patients.update().where(patients.c.id < 3).values(ssn_enc=b"other data"))
    before = stored(engine)
    for check in (
        lambda: move(engine, cmk),
        lambda: backfill.check_encryptable(engine, TABLE, ["ssn"], into=INTO),
    ):
        with pytest.raises(ConfigurationError, match=r"hold a value in both 'ssn' and 'ssn_enc'"):
            check()
    assert stored(engine) == before
    with engine.begin() as conn:  # once the target is empty where the source has a value
        conn.execute(patients.update().values(ssn_enc=None))
    assert move(engine, cmk).rows == sum(1 for v, _ in before.values() if v is not None)


def test_a_target_too_small_is_refused() -> None:
    where: dict[str, Any] = {
        "ssn": {"type": String(11)},
        "ok": {"type": LargeBinary(length=backfill._SEALED_OVERHEAD + 44)},
        "small": {"type": LargeBinary(length=40)},
        "any": {"type": Text()},
    }
    backfill._check_move_targets("t", "t", {"ssn": "ok"}, where)
    with pytest.raises(ConfigurationError, match="too small"):
        backfill._check_move_targets("t", "t", {"ssn": "small"}, where)
    with pytest.raises(ConfigurationError, match="too small"):  # any length of text
        backfill._check_move_targets("t", "t", {"any": "ok"}, where)


# -- Alembic: the move, the cutover and their reverses -------------------------------------------

R2_MOVE = '''
"""move people.note into the binary column note_enc"""
import sqlalchemy as sa
from alembic import op

revision = "r2"
down_revision = "r1"


def upgrade():
    op.add_column("people", sa.Column("note_enc", sa.LargeBinary(), nullable=True))
    op.encrypt_column("people", "note", tenant_column="tenant_id", into={"note": "note_enc"})


def downgrade():
    op.decrypt_column(
        "people", "note_enc", tenant_column="tenant_id", into={"note_enc": "note"}
    )
    op.drop_column("people", "note_enc")
'''

R3_CUTOVER = '''
"""cutover: drop the emptied people.note"""
import sqlalchemy as sa
from alembic import op

revision = "r3"
down_revision = "r2"


def upgrade():
    op.cutover_column("people", "note", "note_enc", type_=sa.Text())


def downgrade():
    op.add_column("people", sa.Column("note", sa.Text(), nullable=True))
'''


class AlembicBase(DeclarativeBase):
    pass


class PersonAfter(EncryptedMixin, AlembicBase):
    """The model after the cutover: ``note`` maps the column it moved into."""

    __tablename__ = "people"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(20))
    name: Mapped[str | None] = mapped_column(Text)
    note: Mapped[str | None] = mapped_column("note_enc", EncryptedType(Text))


def test_alembic_move_cutover_and_downgrade(tmp_path: Any, db_url: str) -> None:  # noqa: F811
    from alembic import command

    from tests.migrations.test_alembic_ops import R1, ROWS, make_config, new_cmk

    notes = {r["id"]: r["note"] for r in ROWS}
    cmk = new_cmk(FakeKeyProvider())
    cfg = make_config(
        tmp_path,
        db_url,
        {"r1": R1, "r2": R2_MOVE, "r3": R3_CUTOVER},
        cmk=cmk,
        target_metadata=AlembicBase.metadata,
    )
    engine = create_engine(db_url)

    def columns() -> dict[str, Any]:
        with engine.connect() as conn:
            names = [c["name"] for c in inspect_columns(conn)]
            return {
                n: dict(conn.execute(text(f"SELECT id, {n} FROM people")).all())  # type: ignore[arg-type]
                for n in names
                if n.startswith("note")
            }

    def app_notes() -> dict[int, str | None]:
        maker = sessionmaker(engine)
        cmk.install(maker)
        out: dict[int, str | None] = {}
        for t in ("acme", "globex"):
            with tenant_context(t), maker() as s:
                for p in s.scalars(select(PersonAfter).where(PersonAfter.tenant_id == t)):
                    out[p.id] = p.note
        return out

    try:
        command.upgrade(cfg, "r2")
        got = columns()
        assert all(v is None for v in got["note"].values())
        for pk, note in notes.items():
            enc = got["note_enc"][pk]
            assert (enc is None) == (note is None)
            assert note is None or note.encode() not in bytes(enc)
        assert app_notes() == notes

        # An old application instance writes the old column: the cutover refuses, naming it.
        with engine.begin() as conn:
            conn.execute(text("UPDATE people SET note = 'late write' WHERE id = 3"))
        with pytest.raises(backfill.MoveNotFinishedError) as refused:
            command.upgrade(cfg, "r3")
        assert refused.value.remaining == 1 and refused.value.column == "note"
        assert "note" in columns()  # nothing dropped
        # The move again (as the CLI runs it) picks the late write up; then the cutover runs.
        again = backfill.encrypt_columns(
            engine, cmk, "people", ["note"], tenant_column="tenant_id", into={"note": "note_enc"}
        )
        assert again.rows == 1
        notes[3] = "late write"
        command.upgrade(cfg, "r3")
        assert set(columns()) == {"note_enc"}
        assert app_notes() == notes

        command.downgrade(cfg, "r1")  # re-add note, move the values back, drop note_enc
        assert columns() == {"note": notes}
    finally:
        engine.dispose()


def inspect_columns(conn: Any) -> list[dict[str, Any]]:
    from sqlalchemy import inspect

    return list(inspect(conn).get_columns("people"))


def test_alembic_reverses_of_the_move_and_the_cutover_render() -> None:
    from alembic.autogenerate import render_op_text

    import migrations_helpers
    from migrations_helpers import alembic_ops
    from tests.migrations.test_alembic_ops import _autogen_context

    migrations_helpers.register()
    autogen = _autogen_context()
    forward = alembic_ops.EncryptColumnOp("people", "note", into={"note": "note_enc"})
    back = forward.reverse()
    assert render_op_text(autogen, forward) == (
        "op.encrypt_column('people', 'note', into={'note': 'note_enc'})"
    )
    assert render_op_text(autogen, back) == (
        "op.decrypt_column('people', 'note_enc', into={'note_enc': 'note'})"
    )
    assert render_op_text(autogen, back.reverse()) == render_op_text(autogen, forward)
    cut = alembic_ops.CutoverColumnOp("people", "note", "note_enc", type_=Text)
    assert render_op_text(autogen, cut) == (
        "op.cutover_column('people', 'note', 'note_enc', type_=sa.Text())"
    )
    assert render_op_text(autogen, cut.reverse()) == (
        "op.add_column('people', sa.Column('note', sa.Text(), nullable=True))"
    )
    with pytest.raises(ConfigurationError, match="not one of the columns"):
        alembic_ops.EncryptColumnOp("people", "note", into={"name": "x"})


# -- the recipe of docs/migrations.md, as written there --------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "migrations.md"


def doc_model() -> dict[str, Any]:
    """Run the first Python block of the doc's "Moving a text column into binary storage"."""
    doc = DOC.read_text()
    section = doc[doc.index("## Moving a text column into binary storage") :]
    block = section[section.index("```python\n") + len("```python\n") :]
    # A module of its own: the ORM resolves the Mapped[...] annotations in the class's module.
    module = types.ModuleType("docs_migrations_moving")
    sys.modules[module.__name__] = module
    try:
        exec(compile(block[: block.index("```")], str(DOC), "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module.__dict__


def test_the_documented_model_reads_and_writes_through_the_move(engine: Engine) -> None:
    ns = doc_model()
    base, patient = ns["Base"], ns["Patient"]
    base.metadata.create_all(engine)
    expected = {i: (TENANTS[i % 2], value(i)) for i in range(1, 31)}  # MySQL takes id 0 for "next"
    with engine.begin() as conn:  # the old release's rows: plaintext in ssn
        conn.execute(
            text("INSERT INTO patients (id, tenant_id, ssn) VALUES (:i, :t, :v)"),
            [{"i": i, "t": t, "v": v} for i, (t, v) in expected.items()],
        )
    cmk = make_cmk(FakeKeyProvider())
    maker = sessionmaker(engine)
    cmk.install(maker)

    def app_reads() -> dict[int, tuple[str, str | None]]:
        out = {}
        for t in TENANTS:
            with tenant_context(t), maker() as s:
                for p in s.scalars(select(patient).where(patient.tenant_id == t)):
                    out[p.id] = (p.tenant_id, p.ssn)
        return out

    into = {"ssn": "ssn_enc"}
    step = 0
    while backfill.encrypt_columns(
        engine, cmk, "patients", ["ssn"], metadata=base, into=into, batch_size=4, max_batches=1
    ).batches:
        step += 1
        assert app_reads() == expected
        i = (step * 5) % 30 + 1
        t = expected[i][0]
        with tenant_context(t), maker() as s:
            row = s.get(patient, i)
            row.ssn = None if step % 3 == 0 else f"app {step}"
            s.commit()
        expected[i] = (t, None if step % 3 == 0 else f"app {step}")
        with tenant_context("acme"), maker() as s:
            s.add(patient(id=100 + step, ssn=f"new {step}"))  # tenant_id from the context
            s.commit()
        expected[100 + step] = ("acme", f"new {step}")
    assert backfill.check_cutover(engine, "patients", into) == sum(
        1 for _, v in expected.values() if v is not None
    )
    assert app_reads() == expected
    with engine.connect() as conn:
        for enc in conn.execute(text("SELECT ssn_enc FROM patients")).scalars():
            assert enc is None or b"123-45-6789" not in bytes(enc)


def test_a_json_column_is_refused_before_anything_changes(engine: Engine) -> None:
    """A JSON source cannot go through the compare-and-swap (PostgreSQL's json has no
    equality; on SQLite a JSON null reads as None but is not SQL NULL, so the walk selected the
    row forever and the call never returned): refused up front, with a clear error."""
    from sqlalchemy import JSON

    md = MetaData()
    table = Table(
        "mv_json",
        md,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("tenant_id", String(20)),
        Column("doc", JSON),
        Column("doc_enc", LargeBinary),
        Column("cmk_edek", LargeBinary),
    )
    md.create_all(engine)
    docs: dict[int, Any] = {1: {"a": [1, "x"]}, 2: None, 3: "null"}
    with engine.begin() as conn:
        conn.execute(
            insert(table), [{"id": i, "tenant_id": "acme", "doc": d} for i, d in docs.items()]
        )
    with engine.connect() as conn:
        before = conn.execute(select(table).order_by(table.c.id)).all()
    cmk = make_cmk(FakeKeyProvider())
    into = {"doc": "doc_enc"}
    # MariaDB's JSON is LONGTEXT with a check: reflected as text, refused as another type.
    mysql = engine.dialect.name in ("mysql", "mariadb")
    message = "holds str values" if mysql else "JSON column"

    class B(DeclarativeBase):
        pass

    class Doc(EncryptedMixin, B):
        __tablename__ = "mv_json"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        tenant_id: Mapped[str] = mapped_column(String(20))
        doc: Mapped[Any] = mapped_column("doc_enc", EncryptedType(JSON))

    with pytest.raises(ConfigurationError, match=message):
        backfill.encrypt_columns(
            engine, cmk, "mv_json", ["doc"], tenant_column="tenant_id", metadata=B, into=into
        )
    if not mysql:
        with pytest.raises(ConfigurationError, match=message):
            backfill.check_encryptable(engine, "mv_json", ["doc"], into=into)
    with engine.connect() as conn:
        assert conn.execute(select(table).order_by(table.c.id)).all() == before
