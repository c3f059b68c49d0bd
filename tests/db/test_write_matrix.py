"""The write-path matrix: every SQLAlchemy write construct x every kind of value x every dialect.

Each cell is one of:

* SEALED: the raw bytes in the database are ciphertext (version byte, no form of the secret)
  that decrypts back to the value through the ORM;
* NULLED: the column is NULL (NULL stores no plaintext, so it is allowed everywhere a value
  can be written);
* REFUSED: a typed error, and the raw table is exactly as before.

The CMK is installed on the sessionmaker *and* on the engine, so Core execution on the engine's
connections is guarded too and the ORM's own flush statements pass the guard. ``docs/design.md``
has the same table in prose. Then the read matrix: each read construct is allowed (and answers
correctly) or refused with ``UnsupportedQueryError`` before any SQL is sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import (
    Engine,
    LargeBinary,
    String,
    case,
    cast,
    delete,
    event,
    func,
    insert,
    literal,
    literal_column,
    null,
    select,
    text,
    type_coerce,
    union,
    union_all,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, aliased, mapped_column, sessionmaker

from sqlalchemy_cmk import (
    CMK,
    DecryptionError,
    EncryptedMixin,
    EncryptedType,
    InvalidValueError,
    PlaintextWriteError,
    UnsupportedQueryError,
    tenant_context,
)
from sqlalchemy_cmk.testing import FakeKeyProvider

from ._access_matrix import WRITE_PATHS, AccEnv, acc_env_fixture, faults_of, run_cell
from ._upsert import upsert
from .models import assert_absent

SECRET = "SECRET-MATRIX-078-05-1120"
ORIGINAL = "ORIGINAL-SSN-123"


class Base(DeclarativeBase):
    pass


class Rec(EncryptedMixin, Base):
    __tablename__ = "matrix_records"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(50))
    legacy: Mapped[str | None] = mapped_column(String(200))  # plaintext: a source to copy from
    ssn: Mapped[str | None] = mapped_column(EncryptedType(String))


REC = Rec.__table__


@dataclass
class Ctx:
    engine: Engine
    Session: sessionmaker[Any]
    cmk: CMK

    def raw(self) -> list[tuple[Any, ...]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                text("select id, tenant_id, legacy, ssn, cmk_edek from matrix_records order by id")
            )
            return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in rows]

    def load(self, row_id: int) -> str | None:
        with tenant_context("acme"), self.Session() as s:
            rec = s.get(Rec, row_id)
            assert rec is not None
            return rec.ssn


@pytest.fixture
def ctx(engine: Engine) -> Iterator[Ctx]:
    Base.metadata.create_all(engine)
    cmk = CMK(FakeKeyProvider(), tenant_keys={"acme": "fake://acme"})
    maker = sessionmaker(engine)
    cmk.install(maker)
    cmk.install(engine)
    with tenant_context("acme"), maker() as s:
        s.add(Rec(id=1, tenant_id="acme", legacy=SECRET, ssn=ORIGINAL))
        s.commit()
    yield Ctx(engine, maker, cmk)
    cmk.uninstall(engine)


# -- value kinds: what is offered as the new value of the encrypted column ssn ---------------

VALUES: dict[str, Callable[[], Any]] = {
    "value": lambda: SECRET,
    "null": lambda: None,
    "column": lambda: Rec.legacy,
    "literal_binary": lambda: literal(SECRET.encode(), LargeBinary),
    "literal_string": lambda: literal(SECRET),
    "cast": lambda: cast(Rec.legacy, LargeBinary),
    "type_coerce": lambda: type_coerce(Rec.legacy, LargeBinary),
    "func": lambda: func.upper(Rec.legacy),
    "literal_column": lambda: literal_column(f"'{SECRET}'"),
    "scalar_subquery": lambda: select(Rec.legacy).where(Rec.id == 1).scalar_subquery(),
}


def _selectable(value: Any) -> Any:
    """The value as a select-list item, for INSERT ... FROM SELECT."""
    if value is None:
        return null()
    return literal(value) if isinstance(value, str) else value


# -- write constructs: each writes `value` into ssn of row 2 (inserts) or row 1 (updates) -----


def _session(ctx: Ctx, work: Callable[[Any], Any]) -> None:
    with tenant_context("acme"), ctx.Session() as s:
        work(s)
        s.commit()


def _connection(ctx: Ctx, work: Callable[[Any], Any]) -> None:
    with tenant_context("acme"), ctx.engine.begin() as conn:
        work(conn)


def _orm_attribute(s: Any, v: Any) -> None:
    rec = s.get(Rec, 1)
    rec.ssn = v


def _upsert(ctx: Ctx, target: Any, v: Any) -> Any:
    return upsert(ctx.engine, target, lambda proposed: {"ssn": v}).values(id=1, tenant_id="acme")


NEW_ROW = {"id": 2, "tenant_id": "acme"}

WRITES: dict[str, tuple[int, Callable[[Ctx, Any], None]]] = {
    # The unit of work seals: ORM add, attribute changes, ORM bulk insert.
    "orm_add": (2, lambda c, v: _session(c, lambda s: s.add(Rec(**NEW_ROW, ssn=v)))),
    "orm_attribute": (1, lambda c, v: _session(c, lambda s: _orm_attribute(s, v))),
    "orm_bulk_insert": (
        2,
        lambda c, v: _session(c, lambda s: s.execute(insert(Rec), [{**NEW_ROW, "ssn": v}])),
    ),
    # Statements carry values where no hook can seal them.
    "orm_bulk_update_by_pk": (
        1,
        lambda c, v: _session(c, lambda s: s.execute(update(Rec), [{"id": 1, "ssn": v}])),
    ),
    "orm_update_values": (
        1,
        lambda c, v: _session(c, lambda s: s.execute(update(Rec).where(Rec.id == 1).values(ssn=v))),
    ),
    "orm_update_ordered_values": (
        1,
        lambda c, v: _session(
            c, lambda s: s.execute(update(Rec).where(Rec.id == 1).ordered_values(("ssn", v)))
        ),
    ),
    "orm_insert_values": (
        2,
        lambda c, v: _session(c, lambda s: s.execute(insert(Rec).values(**NEW_ROW, ssn=v))),
    ),
    "orm_insert_multivalues": (
        2,
        lambda c, v: _session(
            c,
            lambda s: s.execute(
                insert(Rec).values(
                    [{**NEW_ROW, "ssn": v}, {"id": 3, "tenant_id": "acme", "ssn": None}]
                )
            ),
        ),
    ),
    "orm_insert_from_select": (
        2,
        lambda c, v: _session(
            c,
            lambda s: s.execute(
                insert(Rec).from_select(
                    ["id", "tenant_id", "ssn"],
                    select(literal(2), literal("acme"), _selectable(v)).where(Rec.id == 1),
                )
            ),
        ),
    ),
    "orm_upsert": (1, lambda c, v: _session(c, lambda s: s.execute(_upsert(c, Rec, v)))),
    "legacy_bulk_save_objects": (
        2,
        lambda c, v: _session(c, lambda s: s.bulk_save_objects([Rec(**NEW_ROW, ssn=v)])),
    ),
    "legacy_bulk_insert_mappings": (
        2,
        lambda c, v: _session(c, lambda s: s.bulk_insert_mappings(Rec, [{**NEW_ROW, "ssn": v}])),
    ),
    "legacy_bulk_update_mappings": (
        1,
        lambda c, v: _session(c, lambda s: s.bulk_update_mappings(Rec, [{"id": 1, "ssn": v}])),
    ),
    # Core statements through the installed session.
    "core_session_insert_values": (
        2,
        lambda c, v: _session(c, lambda s: s.execute(REC.insert().values(**NEW_ROW, ssn=v))),
    ),
    "core_session_insert_params": (
        2,
        lambda c, v: _session(c, lambda s: s.execute(REC.insert(), {**NEW_ROW, "ssn": v})),
    ),
    "core_session_update": (
        1,
        lambda c, v: _session(
            c, lambda s: s.execute(REC.update().where(REC.c.id == 1).values(ssn=v))
        ),
    ),
    # Core on a connection of the engine the CMK is installed on.
    "core_engine_insert_values": (
        2,
        lambda c, v: _connection(
            c, lambda conn: conn.execute(REC.insert().values(**NEW_ROW, ssn=v))
        ),
    ),
    "core_engine_insert_params": (
        2,
        lambda c, v: _connection(c, lambda conn: conn.execute(REC.insert(), {**NEW_ROW, "ssn": v})),
    ),
    "core_engine_update": (
        1,
        lambda c, v: _connection(
            c, lambda conn: conn.execute(REC.update().where(REC.c.id == 1).values(ssn=v))
        ),
    ),
    "core_engine_upsert": (
        1,
        lambda c, v: _connection(c, lambda conn: conn.execute(_upsert(c, REC, v))),
    ),
}

SEALING = {"orm_add", "orm_attribute", "orm_bulk_insert"}


def expected(construct: str, kind: str) -> tuple[str, type[Exception] | None]:
    """The verdict of one cell, and the error a refusal raises."""
    if construct == "orm_insert_from_select":
        return "REFUSED", PlaintextWriteError  # a SELECT feeding the column, whatever it yields
    if kind == "null":
        return "NULLED", None
    if construct in SEALING:
        # The hooks seal values; a SQL expression is not a value of the column's type.
        return ("SEALED", None) if kind == "value" else ("REFUSED", InvalidValueError)
    return "REFUSED", PlaintextWriteError


CELLS = [(w, k) for w in WRITES for k in VALUES]


@pytest.mark.parametrize(("construct", "kind"), CELLS, ids=[f"{w}-{k}" for w, k in CELLS])
def test_write_matrix(ctx: Ctx, construct: str, kind: str) -> None:
    row_id, write = WRITES[construct]
    verdict, error = expected(construct, kind)
    before = ctx.raw()

    if verdict == "REFUSED":
        assert error is not None
        with pytest.raises(error) as info:
            write(ctx, VALUES[kind]())
        assert_absent(str(info.value), [SECRET])
        assert ctx.raw() == before, "a refused write changed the database"
        assert ctx.load(1) == ORIGINAL
        return

    write(ctx, VALUES[kind]())
    after = {r[0]: r for r in ctx.raw()}
    stored = after[row_id][3]
    if verdict == "NULLED":
        assert stored is None
    else:
        assert isinstance(stored, bytes) and stored[0] == 0x01
        assert_absent(stored, [SECRET])
        assert ctx.load(row_id) == SECRET
    # Every other row is as it was, and row 1 still decrypts.
    others = [r for r in before if r[0] != row_id]
    assert [after[r[0]] for r in others] == others
    if row_id != 1:
        assert ctx.load(1) == ORIGINAL


@pytest.mark.parametrize("target", ["orm", "core"])
def test_upsert_set_from_excluded_is_refused(ctx: Ctx, target: str) -> None:
    """ON CONFLICT DO UPDATE SET ssn = excluded.ssn copies whatever the INSERT carried."""
    before = ctx.raw()
    stmt = upsert(
        ctx.engine, Rec if target == "orm" else REC, lambda proposed: {"ssn": proposed.legacy}
    ).values(id=1, tenant_id="acme", legacy=SECRET)
    with pytest.raises(PlaintextWriteError, match=r"(excluded|inserted)\.legacy"):
        _session(ctx, lambda s: s.execute(stmt))
    assert ctx.raw() == before


def test_text_in_a_binary_column_is_a_decryption_error(ctx: Ctx) -> None:
    """SQLite stores TEXT in a BLOB column: loading it is a DecryptionError, not TypeError."""
    if ctx.engine.dialect.name != "sqlite":
        pytest.skip("only SQLite stores text in a binary column")
    with ctx.engine.begin() as conn:
        conn.execute(text("update matrix_records set ssn = 'PLAIN-TEXT' where id = 1"))
    with tenant_context("acme"), ctx.Session() as s, pytest.raises(DecryptionError) as info:
        s.get(Rec, 1)
    assert "PLAIN-TEXT" not in str(info.value)
    with ctx.engine.connect() as conn, pytest.raises(DecryptionError):
        conn.execute(select(REC.c.ssn)).all()


# -- the read matrix -------------------------------------------------------------------------

Other = aliased(Rec)

READS: dict[str, tuple[bool, Callable[[], Any]]] = {
    # allowed
    "entity": (True, lambda: select(Rec).where(Rec.id == 1)),
    "column": (True, lambda: select(Rec.id, Rec.ssn).where(Rec.id == 1)),
    "labelled_column": (True, lambda: select(Rec.ssn.label("s")).where(Rec.id == 1)),
    "is_null": (True, lambda: select(Rec).where(Rec.ssn.is_(None))),
    "is_not_null": (True, lambda: select(Rec).where(Rec.ssn.is_not(None))),
    "eq_none": (True, lambda: select(Rec).where(Rec.ssn == None)),  # noqa: E711
    "ne_none": (True, lambda: select(Rec).where(Rec.ssn != None)),  # noqa: E711
    "case_of_is_null": (True, lambda: select(case((Rec.ssn.is_(None), 0), else_=1))),
    "entity_distinct": (True, lambda: select(Rec).distinct()),
    "distinct_with_pk": (True, lambda: select(Rec.id, Rec.ssn).distinct()),
    "union_all": (True, lambda: union_all(select(Rec.ssn), select(Rec.ssn))),
    "union_with_pk": (True, lambda: union(select(Rec.id, Rec.ssn), select(Rec.id, Rec.ssn))),
    "subquery_column": (True, lambda: select(select(Rec.id, Rec.ssn).subquery())),
    "returning": (
        True,
        lambda: update(Rec).where(Rec.id == 1).values(legacy="x").returning(Rec.id, Rec.ssn),
    ),
    "delete_where_is_null": (True, lambda: delete(Rec).where(Rec.ssn.is_(None))),
    "count_rows": (True, lambda: select(func.count()).select_from(Rec)),
    # refused
    "func_lower_eq": (False, lambda: select(Rec).where(func.lower(Rec.ssn) == "x")),
    "cast_eq": (False, lambda: select(Rec).where(cast(Rec.ssn, String) == "x")),
    "type_coerce_eq": (False, lambda: select(Rec).where(type_coerce(Rec.ssn, String) == "x")),
    "order_by": (False, lambda: select(Rec).order_by(Rec.ssn)),
    "order_by_name": (False, lambda: select(Rec.id, Rec.ssn).order_by("ssn")),
    "group_by": (False, lambda: select(func.count()).group_by(Rec.ssn)),
    "distinct_column": (False, lambda: select(Rec.ssn).distinct()),
    "union": (False, lambda: union(select(Rec.ssn), select(Rec.legacy))),
    "aggregate": (False, lambda: select(func.max(Rec.ssn))),
    "count_column": (False, lambda: select(func.count(Rec.ssn))),
    "function_in_select": (False, lambda: select(func.length(Rec.ssn))),
    "window": (False, lambda: select(func.row_number().over(order_by=Rec.ssn))),
    "join_condition": (False, lambda: select(Rec).join(Other, Other.ssn == Rec.ssn)),
    "column_to_column": (False, lambda: select(Rec).where(Rec.ssn == Rec.legacy)),
    "subquery_filter": (
        False,
        lambda: select(Rec).where(Rec.id.in_(select(Rec.id).where(func.upper(Rec.ssn) == "X"))),
    ),
    "having": (
        False,
        lambda: select(Rec.tenant_id).group_by(Rec.tenant_id).having(func.count(Rec.ssn) > 1),
    ),
    "update_where": (
        False,
        lambda: update(Rec).where(func.lower(Rec.ssn) == "x").values(legacy="y"),
    ),
    "delete_where": (False, lambda: delete(Rec).where(func.lower(Rec.ssn) == "x")),
    "copy_to_plaintext_column": (False, lambda: update(Rec).values(legacy=Rec.ssn)),
}

READ_CELLS = [(name, via) for name in READS for via in ("session", "engine")]


@pytest.mark.parametrize(("name", "via"), READ_CELLS, ids=[f"{n}-{v}" for n, v in READ_CELLS])
def test_read_matrix(ctx: Ctx, name: str, via: str) -> None:
    allowed, build = READS[name]
    sent: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    if name == "returning" and not ctx.engine.dialect.update_returning:
        pytest.skip(f"{ctx.engine.dialect.name} has no UPDATE ... RETURNING")
    stmt = build()
    event.listen(ctx.engine, "before_cursor_execute", count)
    try:
        with tenant_context("acme"):
            if via == "session":
                with ctx.Session() as s:
                    _read(lambda: s.execute(stmt), allowed, name, via)
            else:
                with ctx.engine.connect() as conn:
                    _read(lambda: conn.execute(stmt), allowed, name, via)
    finally:
        event.remove(ctx.engine, "before_cursor_execute", count)
    if not allowed:
        assert sent == [], "a refused read reached the database"


def _read(run: Callable[[], Any], allowed: bool, name: str, via: str) -> None:
    if not allowed:
        with pytest.raises(UnsupportedQueryError, match="Supported on an encrypted column"):
            run()
        return
    result = run()
    rows = [] if name.startswith("delete") else result.all()
    if name in ("entity", "column", "labelled_column"):
        (row,) = rows
        if name == "entity" and via == "session":
            assert row[0].ssn == ORIGINAL  # the hooks decrypt entities
        else:
            value = row._mapping["ssn"] if name == "entity" else row[-1]
            # Outside an entity the value stays opaque: ciphertext, never the plaintext.
            assert value == ORIGINAL or isinstance(value, bytes)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Rec.ssn == "x",
        lambda: Rec.ssn.in_(["x"]),
        lambda: Rec.ssn.like("x%"),
        lambda: Rec.ssn > "x",
        lambda: Rec.ssn.between("a", "b"),
        lambda: Rec.ssn.desc(),
        lambda: Rec.ssn.contains("x"),
        lambda: REC.c.ssn == "x",
        lambda: "x" + REC.c.ssn,
    ],
    ids=["eq", "in", "like", "gt", "between", "desc", "contains", "core_eq", "concat"],
)
def test_operators_are_refused_when_built(build: Callable[[], Any]) -> None:
    """Refused when the expression is built: also on a connection the CMK is not installed on."""
    with pytest.raises(UnsupportedQueryError) as info:
        build()
    assert "'x'" not in str(info.value)


@pytest.mark.parametrize(
    "value",
    [lambda: b"\x01forged", lambda: None, lambda: Rec.legacy, lambda: func.substr(Rec.cmk_edek, 1)],
    ids=["bytes", "null", "column", "func"],
)
@pytest.mark.parametrize("via", ["session", "engine"])
def test_companion_writes_are_refused(ctx: Ctx, value: Callable[[], Any], via: str) -> None:
    """Only the hooks write a row's companion: any other value would strand its encrypted values."""
    before = ctx.raw()
    stmt = update(Rec).where(Rec.id == 1).values(cmk_edek=value())
    with pytest.raises(PlaintextWriteError, match="companion"):
        if via == "session":
            _session(ctx, lambda s: s.execute(stmt))
        else:
            _connection(ctx, lambda conn: conn.execute(stmt))
    assert ctx.raw() == before
    assert ctx.load(1) == ORIGINAL


# -- every write access is audited once, refused ones included (issue 12) ----------------------

acc_env = pytest.fixture(acc_env_fixture)


@pytest.mark.parametrize("path", list(WRITE_PATHS))
def test_every_write_access_gives_one_event(acc_env: AccEnv, path: str) -> None:
    """Each write path under each fault (``_access_matrix``): one access event, its outcome,
    the context's tenant, and nothing for any other tenant."""
    for fault in faults_of(path):
        run_cell(acc_env, path, fault)
