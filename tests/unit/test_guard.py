"""The statement guard and the declaration checks, without a database."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    Column,
    Computed,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    except_,
    func,
    intersect,
    lambda_stmt,
    select,
    text,
    union,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.ext.mutable import MutableDict
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, with_loader_criteria
from sqlalchemy.schema import CreateTable

from sqlalchemy_cmk import (
    ConfigurationError,
    DecryptionError,
    EDEKType,
    EncryptedMixin,
    EncryptedType,
    PlaintextWriteError,
    UnsupportedQueryError,
    _guard,
)
from sqlalchemy_cmk._guard import check_statement

SECRET = "SECRET-GUARD-42"


class Base(DeclarativeBase):
    pass


class Doc(EncryptedMixin, Base):
    __tablename__ = "guard_docs"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    body: Mapped[str | None] = mapped_column(EncryptedType(String))


DOCS = Doc.__table__


# -- declarations ----------------------------------------------------------------------------


def _table(*items: Any, name: str = "t") -> Table:
    return Table(name, MetaData(), Column("id", Integer, primary_key=True), *items)


@pytest.mark.parametrize(
    ("column", "words"),
    [
        (lambda: Column("v", EncryptedType(String), server_default="x"), "server_default"),
        (lambda: Column("v", EncryptedType(String), server_onupdate=text("'x'")), "server_"),
        (lambda: Column("v", EncryptedType(String), Computed("'x'")), "Computed"),
        (lambda: Column("v", EncryptedType(Integer), Identity()), "Identity"),
        (lambda: Column("v", EncryptedType(String), default="x"), "default"),
        (lambda: Column("v", EncryptedType(String), default=lambda: "x"), "default"),
        (lambda: Column("v", EncryptedType(String), onupdate="x"), "onupdate"),
        (lambda: Column("v", EncryptedType(String), unique=True), "unique"),
        (lambda: Column("v", EncryptedType(String), index=True), "index"),
        (lambda: Column("v", EncryptedType(String), primary_key=True), "primary"),
        (lambda: Column("v", EncryptedType(Integer), ForeignKey("o.id")), "foreign"),
        (lambda: Column("v", MutableDict.as_mutable(EncryptedType(JSON))), "flag_modified"),
        (lambda: Column("v", EDEKType(), server_default=text("x''")), "server_default"),
        (lambda: Column("v", EDEKType(), default=b"x"), "default"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_column_options_an_encrypted_column_cannot_honour_are_refused_at_declaration(
    column: Callable[[], Column[Any]], words: str
) -> None:
    with pytest.raises(ConfigurationError, match=words) as info:
        _table(column(), Column("cmk_edek", EDEKType()))
    assert info.value.table == "t" and info.value.column == "v"


def test_refused_in_a_declarative_model_when_the_class_is_declared() -> None:
    class Local(DeclarativeBase):
        pass

    with pytest.raises(ConfigurationError, match="server_default"):

        class Bad(EncryptedMixin, Local):
            __tablename__ = "bad"
            id: Mapped[int] = mapped_column(primary_key=True)
            ssn: Mapped[str] = mapped_column(EncryptedType(String), server_default="000")

    with pytest.raises(ConfigurationError, match="flag_modified"):

        class Mut(EncryptedMixin, Local):
            __tablename__ = "mut"
            id: Mapped[int] = mapped_column(primary_key=True)
            doc: Mapped[dict[str, Any]] = mapped_column(MutableDict.as_mutable(EncryptedType(JSON)))


@pytest.mark.parametrize(
    "constraint",
    [
        lambda t: t.append_constraint(UniqueConstraint("v")),
        lambda t: Index("ix_v", t.c.v),
        lambda t: Index("ix_lower_v", func.lower(t.c.v)),
        lambda t: Index("ix_pair", t.c.id, t.c.v),
    ],
    ids=["unique_constraint", "index", "functional_index", "composite_index"],
)
def test_table_constraints_over_an_encrypted_column_are_refused(
    constraint: Callable[[Table], Any],
) -> None:
    t = _table(Column("v", EncryptedType(String)), Column("cmk_edek", EDEKType()), name="tc")
    constraint(t)
    # When the table is created ...
    with pytest.raises(ConfigurationError, match="ciphertext"):
        t.dispatch.before_create(t, None, checkfirst=False, _ddl_runner=None)
    # ... or first used by a guarded statement.
    with pytest.raises(ConfigurationError, match="ciphertext"):
        check_statement(select(t))


def test_a_foreign_key_to_an_encrypted_column_is_refused() -> None:
    md = MetaData()
    Table(
        "target",
        md,
        Column("id", Integer, primary_key=True),
        Column("v", EncryptedType(Integer)),
        Column("cmk_edek", EDEKType()),
    )
    src = Table(
        "src",
        md,
        Column("id", Integer, primary_key=True),
        Column("t", Integer, ForeignKey("target.v")),
    )
    with pytest.raises(ConfigurationError, match="foreign keys compare"):
        check_statement(select(src))
    # Untyped, the referring column takes the encrypted type, and is refused as a key itself.
    src2 = Table(
        "src2", md, Column("id", Integer, primary_key=True), Column("t", ForeignKey("target.v"))
    )
    with pytest.raises(ConfigurationError, match="foreign key"):
        check_statement(select(src2))


def test_plain_declarations_pass_and_render() -> None:
    t = _table(
        Column("v", EncryptedType(String), nullable=False),
        Column("cmk_edek", EDEKType(), index=True),  # an index on the companion is harmless
        name="fine",
    )
    assert "BLOB" in str(CreateTable(t).compile(dialect=sqlite.dialect()))
    check_statement(select(t))


# -- operators on the column -----------------------------------------------------------------


def test_null_tests_and_column_identity_still_build() -> None:
    for expr in (
        Doc.body == None,  # noqa: E711
        Doc.body != None,  # noqa: E711
        Doc.body.is_(None),
        Doc.body.is_not(None),
        DOCS.c.body.is_distinct_from(None),
    ):
        check_statement(select(Doc).where(expr))
    # SQLAlchemy compares columns with == in sets and lookups: that must keep working ...
    assert DOCS.c.body in {DOCS.c.body}
    assert DOCS.c.body in list(DOCS.c)
    # ... but executing a column comparison is refused.
    with pytest.raises(UnsupportedQueryError):
        check_statement(select(Doc).where(Doc.body == Doc.title))


def test_operator_errors_name_the_column_not_the_value() -> None:
    with pytest.raises(UnsupportedQueryError) as info:
        Doc.body == SECRET  # noqa: B015
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    assert (info.value.table, info.value.column) == ("guard_docs", "body")
    assert SECRET not in str(pickle.loads(pickle.dumps(info.value)))


def test_columns_with_the_comparator_still_pickle() -> None:
    _ = DOCS.c.body.comparator  # memoized on the column
    copy = pickle.loads(pickle.dumps(DOCS))
    assert isinstance(copy.c.body.type, EncryptedType)


# -- statements ------------------------------------------------------------------------------


def test_mysql_on_duplicate_key_update_is_judged_too() -> None:
    stmt = mysql.insert(DOCS).values(id=1, title="t")
    with pytest.raises(PlaintextWriteError, match=r"inserted\.title"):
        check_statement(stmt.on_duplicate_key_update(body=stmt.inserted.title))
    check_statement(stmt.on_duplicate_key_update(title=stmt.inserted.title, body=None))


@pytest.mark.parametrize("dialect_insert", [postgresql.insert, sqlite.insert])
def test_upsert_where_and_conflict_target_are_reads(dialect_insert: Any) -> None:
    stmt = dialect_insert(DOCS).values(id=1, title="t")
    with pytest.raises(UnsupportedQueryError, match="upsert's WHERE"):
        check_statement(
            stmt.on_conflict_do_update(
                index_elements=["id"], set_={"title": "x"}, where=func.lower(DOCS.c.body) == "x"
            )
        )
    check_statement(stmt.on_conflict_do_nothing(index_elements=["id"]))


@pytest.mark.parametrize("setop", [union, intersect, except_])
def test_set_operations_compare_rows(setop: Any) -> None:
    with pytest.raises(UnsupportedQueryError):
        check_statement(setop(select(DOCS.c.body), select(DOCS.c.body)))
    check_statement(setop(select(DOCS.c.id, DOCS.c.body), select(DOCS.c.id, DOCS.c.body)))


def test_lambda_statements_are_judged_by_what_they_stand_for() -> None:
    with pytest.raises(UnsupportedQueryError, match="ORDER BY"):
        check_statement(lambda_stmt(lambda: select(Doc).order_by(Doc.body)))


def test_orm_loader_criteria_are_judged() -> None:
    stmt = select(Doc).options(with_loader_criteria(Doc, func.lower(Doc.body) == "x"))
    with pytest.raises(UnsupportedQueryError, match="loader criteria"):
        check_statement(stmt)


def test_write_errors_name_the_column_and_the_kind_never_the_value() -> None:
    with pytest.raises(PlaintextWriteError) as info:
        check_statement(update(Doc).values(body=func.upper(SECRET)))
    message = str(info.value)
    assert "guard_docs.body" in message and "upper()" in message
    assert SECRET not in message and SECRET not in repr(info.value.args)
    assert (info.value.table, info.value.column) == ("guard_docs", "body")


def test_what_is_out_of_reach_passes() -> None:
    """text() and DDL are not judged (said plainly in docs/design.md)."""
    check_statement(text("update guard_docs set body = 'x'"))
    check_statement(CreateTable(DOCS))
    check_statement("select 1")


def test_a_verdict_is_remembered_by_structure_only_when_it_passes() -> None:
    _guard._passed.clear()
    check_statement(select(Doc).where(Doc.id == 1))
    assert len(_guard._passed) == 1
    check_statement(select(Doc).where(Doc.id == 2))  # same structure, another value
    assert len(_guard._passed) == 1
    for _ in range(2):
        with pytest.raises(UnsupportedQueryError):
            check_statement(select(Doc).order_by(Doc.body))
    assert len(_guard._passed) == 1


# -- stored values that cannot be ciphertext -------------------------------------------------


@pytest.mark.parametrize("stored", ["PLAIN-TEXT", 12345, 10**12])
def test_non_binary_stored_values_are_decryption_errors(stored: Any) -> None:
    dialect = sqlite.dialect()
    process = EncryptedType(String).result_processor(dialect, None)
    with pytest.raises(DecryptionError) as info:
        process(stored)
    assert str(stored) not in str(info.value)
    with pytest.raises(DecryptionError):
        EDEKType().process_result_value(stored, dialect)
    text_type = EncryptedType(String, storage="text")
    with pytest.raises(DecryptionError):
        text_type.process_result_value(b"\x01binary", dialect)


def test_binary_values_still_load() -> None:
    process = EncryptedType(String).result_processor(postgresql.dialect(), None)
    for raw in (b"\x01abc", bytearray(b"\x01abc"), memoryview(b"\x01abc")):
        assert bytes(process(raw)) == b"\x01abc"
    assert process(None) is None


def test_the_readme_promise_is_the_design_docs_word_for_word() -> None:
    root = Path(__file__).resolve().parents[2]

    def promise(path: str) -> str:
        flat = " ".join(root.joinpath(path).read_text().split())
        start = flat.index("No write path stores plaintext")
        return flat[start : flat.index("reflected tables).", start)]

    assert promise("README.md") == promise("docs/design.md")


def test_distinct_on_an_encrypted_column_is_refused() -> None:
    try:
        from sqlalchemy.dialects.postgresql import distinct_on  # SQLAlchemy 2.1
    except ImportError:  # SQLAlchemy 2.0
        stmt = select(Doc).distinct(Doc.body)
    else:
        stmt = select(Doc).ext(distinct_on(Doc.body))
    with pytest.raises(UnsupportedQueryError):
        check_statement(stmt)
    check_statement(select(Doc).distinct())  # entity-level DISTINCT: rows carry the key


def test_for_update_of_an_encrypted_column_locks_its_table() -> None:
    check_statement(select(Doc).with_for_update(of=Doc.body))
