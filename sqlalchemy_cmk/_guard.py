"""The statement guard: what a statement may do with an encrypted column, judged before it is sent.

``EncryptedType``'s bind processor only ever sees *bound values*; a SQL expression in their
place (a column, ``cast()``, ``func.*``, ``literal_column()``, a subquery, ``INSERT ... FROM
SELECT``, an upsert's ``SET``) is computed by the database and stored as is, unencrypted. And a
read that compares, sorts or groups an encrypted column runs on randomized ciphertext and
silently answers wrongly, after sending its search term to the database and its logs. So
:func:`check_statement` walks a statement's structure once and refuses, before anything is sent:

* writes: every value for an ``EncryptedType`` or ``EDEKType`` column must be a bound value
  (the bind processor then lets through only what the hooks sealed) or NULL; anything else
  raises :class:`PlaintextWriteError`;
* reads: an encrypted column may appear bare or labelled in a select list or RETURNING (the
  hooks decrypt it), as a column of a FROM clause, and as the operand of ``IS [NOT] NULL``.
  ``DISTINCT`` and set operations are allowed over rows that also carry the primary key of
  the column's table (``select(Model).distinct()``): rows that are distinct by primary key are
  the same rows however their ciphertext compares. Anything else raises
  :class:`UnsupportedQueryError`.

Tables are checked once each, the first time a statement meets them (see :func:`check_table`).
A statement that passed is remembered by its structure (SQLAlchemy's cache key), so an
application's repeated statements are judged once.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Column, Table, exc
from sqlalchemy.schema import (
    ForeignKeyConstraint,
    Index,
    PrimaryKeyConstraint,
    UniqueConstraint,
)
from sqlalchemy.sql import operators
from sqlalchemy.sql.expression import (
    AliasedReturnsRows,
    BinaryExpression,
    BindParameter,
    Cast,
    ClauseElement,
    ClauseList,
    ColumnClause,
    ColumnElement,
    CompoundSelect,
    FromClause,
    FromGrouping,
    FunctionElement,
    Grouping,
    Insert,
    Join,
    Label,
    Null,
    Over,
    ScalarSelect,
    Select,
    SelectBase,
    StatementLambdaElement,
    TableClause,
    TextClause,
    TextualSelect,
    TypeCoerce,
    UnaryExpression,
    Update,
    UpdateBase,
)
from sqlalchemy.sql.sqltypes import NullType
from sqlalchemy.sql.visitors import HasTraverseInternals, iterate

from ._mapping import is_tenant_column
from .errors import (
    ConfigurationError,
    PlaintextWriteError,
    TenantContextError,
    UnsupportedQueryError,
)
from .search import BlindIndexType
from .types import EDEKType, EncryptedType

__all__ = ["SUPPORTED_READS", "check_column", "check_statement", "check_table"]

SUPPORTED_READS = (
    "Supported on an encrypted column: selecting it (the hooks decrypt it), IS NULL / IS NOT "
    "NULL, and DISTINCT over rows that include the primary key (select(Model).distinct()); "
    "on a column declared with search=BlindIndex(...), also ==, !=, in_(), not_in() and "
    "joins on a shared index domain (docs/search.md). Sort and group on a plaintext column."
)

# Statement attributes that the walk handles itself; every other child of a statement is
# walked as an expression where an encrypted column is refused (unknown means refused).
_SELECT_OWN = (
    "_raw_columns",
    "_from_obj",
    "_setup_joins",
    "_memoized_select_entities",
    "_where_criteria",
    "_having_criteria",
    "_order_by_clauses",
    "_group_by_clauses",
    "_distinct_on",
    "_correlate",
    "_correlate_except",
    "_for_update_arg",  # FOR UPDATE OF col names only the column's table
)
_COMPOUND_OWN = ("selects", "_order_by_clauses", "_group_by_clauses")
_DML_OWN = (
    "table",
    "_values",
    "_multi_values",
    "_ordered_values",
    "select",
    "_post_values_clause",
    "_returning",
    "_return_defaults_columns",
    "_supplemental_returning",
    "_where_criteria",
    "_extra_froms",
)
_IS_NULL_OPS = frozenset(
    {
        operators.is_,
        operators.is_not,
        operators.is_distinct_from,
        operators.is_not_distinct_from,
    }
)
_OP_NAMES = {
    operators.eq: "=",
    operators.ne: "!=",
    operators.lt: "<",
    operators.le: "<=",
    operators.gt: ">",
    operators.ge: ">=",
    operators.like_op: "LIKE",
    operators.not_like_op: "NOT LIKE",
    operators.ilike_op: "ILIKE",
    operators.not_ilike_op: "NOT ILIKE",
    operators.in_op: "IN",
    operators.not_in_op: "NOT IN",
    operators.between_op: "BETWEEN",
    operators.not_between_op: "NOT BETWEEN",
    operators.is_distinct_from: "IS DISTINCT FROM",
    operators.is_not_distinct_from: "IS NOT DISTINCT FROM",
    operators.startswith_op: "LIKE (startswith)",
    operators.endswith_op: "LIKE (endswith)",
    operators.contains_op: "LIKE (contains)",
    operators.concat_op: "||",
    operators.add: "+",
    operators.sub: "-",
    operators.mul: "*",
    operators.getitem: "[] (JSON or array index)",
    operators.desc_op: "DESC",
    operators.asc_op: "ASC",
    operators.distinct_op: "DISTINCT",
    operators.collate: "COLLATE",
}

# Statements that passed, by structure (see _structure): walking costs ~10 µs, a lookup <1.
_MAX_VERDICTS = 2000
_passed: dict[Any, bool] = {}
_tables_ok: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def check_statement(stmt: object) -> None:
    """Refuse a statement that would store plaintext or read an encrypted column wrongly.

    Args:
        stmt: What is about to be executed. Only SQL expression statements are judged: DDL,
            ``text()`` and driver SQL are out of reach.

    Raises:
        PlaintextWriteError: a value for an encrypted or companion column is neither a bound
            value nor NULL.
        UnsupportedQueryError: an encrypted column is compared, sorted, grouped, passed to a
            function, cast, or made DISTINCT.
        ConfigurationError: a table the statement uses declares what an encrypted column
            cannot honour (see :func:`check_table`).
    """
    if isinstance(stmt, StatementLambdaElement):
        stmt = stmt._resolved
    if not isinstance(stmt, SelectBase | UpdateBase | ColumnElement):
        return
    key = _structure(stmt)
    if key is not None and key in _passed:
        return
    _Walk().statement(stmt)
    if key is not None:
        if len(_passed) >= _MAX_VERDICTS:
            _passed.clear()
        _passed[key] = True


def _structure(stmt: Any) -> Any:
    """The statement's SQL compilation cache key: its structure, without the bound values.

    SQLAlchemy memoizes it on the statement and computes it anyway to look up the compiled
    form, so using it costs a dictionary lookup; the verdict depends only on structure and
    types, which the key holds. None for what SQLAlchemy does not cache (multi-row VALUES).
    """
    generate = getattr(stmt, "_generate_cache_key", None)
    found = generate() if generate is not None else None
    return None if found is None else found.key


def _refuse_search_in(crit: Any, where: str) -> None:
    """A blind index search in criteria an ORM option adds to the statements it reaches (its
    own, lazy and eager loads) that the search rewrite does not see: named as a search, not as
    a comparison of ciphertext."""
    from ._search import SearchTerm

    for node in iterate(crit):
        if isinstance(node, SearchTerm):
            raise UnsupportedQueryError(
                f"a blind index search ({node!r}) cannot be part of {where}: those criteria "
                "are added to the statements the option reaches, where searches are not "
                "rewritten; search in the statement's WHERE: .where(Model.col == term)"
            )


def _protected(col: Any) -> bool:
    return isinstance(getattr(col, "type", None), EncryptedType | EDEKType | BlindIndexType)


def _encrypted(node: Any) -> bool:
    return isinstance(getattr(node, "type", None), EncryptedType)


def _unwrap(obj: Any) -> Any:
    """The SQL expression behind an ORM attribute (or anything with ``__clause_element__``)."""
    while not isinstance(obj, ClauseElement) and hasattr(obj, "__clause_element__"):
        obj = obj.__clause_element__()
    return obj


def _locate(col: Any) -> tuple[str | None, str | None]:
    """(table, column) of an encrypted column, or of the first one inside an expression."""
    if not isinstance(col, ColumnClause):
        found = [c for c in _columns_in(col) if _encrypted(c)]
        if not found:
            return None, None
        col = found[0]
    if not isinstance(col.table, TableClause):
        # A subquery's column: name the table column it stands for (its base column).
        base = [c for c in col.base_columns if isinstance(getattr(c, "table", None), TableClause)]
        if len(base) == 1 and not _named_alias(col.table):
            col = base[0]
    return _table_name(col.table), str(col.name)


def _name(col: Any) -> str:
    table, column = _locate(col)
    if column is None:
        return "an expression of an encrypted type"
    return f"{table}.{column}" if table else column


def _named_alias(table: Any) -> bool:
    """An alias the user named (``excluded``, ``inserted``, ``aliased(M, name=...)``)."""
    return isinstance(table, AliasedReturnsRows) and type(table.name) is str


def _table_name(table: Any) -> str:
    while isinstance(table, AliasedReturnsRows | FromGrouping) and not _named_alias(table):
        table = table.element
    if _named_alias(table):
        return str(table.name)
    if isinstance(table, TableClause):
        return str(table.name)
    return "(subquery)"


def _construct(node: Any) -> str:
    """How an expression uses its operand, in SQL words (never a value)."""
    if isinstance(node, BinaryExpression | UnaryExpression):
        op = node.operator if isinstance(node, BinaryExpression) else node.modifier
        if op is None and isinstance(node, UnaryExpression):
            op = node.operator
        return _construct_op(op)
    if isinstance(node, Over):
        return "a window function"
    if isinstance(node, FunctionElement):
        return f"the function {getattr(node, 'name', '?')}()"
    if isinstance(node, Cast):
        return "CAST"
    if isinstance(node, TypeCoerce):
        return "type_coerce()"
    return type(node).__name__


def _construct_op(op: Any) -> str:
    named = _OP_NAMES.get(op)
    if named is not None:
        return named
    return str(getattr(op, "opstring", None) or getattr(op, "__name__", "an operator"))


def _value_kind(value: Any) -> str:
    """What a refused write value is, for the message (never the value itself)."""
    if isinstance(value, BindParameter):
        return f"a literal typed {type(value.type).__name__}"
    if isinstance(value, ColumnClause):
        return "literal_column()" if value.is_literal else f"the column {_name(value)}"
    if isinstance(value, TextClause):
        return "text()"
    if isinstance(value, ScalarSelect | SelectBase):
        return "a subquery"
    return _construct(value)


def _unsupported(col: Any, clause: str, parent: Any) -> UnsupportedQueryError:
    how = f" ({_construct(parent)})" if parent is not None else ""
    name = _name(col)
    table, column = _locate(col)
    return UnsupportedQueryError(
        f"{name} is encrypted and cannot be used in {clause}{how}: the database holds "
        "only randomized ciphertext, so comparisons cannot match and sorting, grouping and "
        f"DISTINCT would follow the ciphertext. Nothing was sent. {SUPPORTED_READS}",
        table=table,
        column=column,
    )


def _write_refused(col: Any, what: str, where: str) -> PlaintextWriteError:
    kind = "encrypted" if _encrypted(col) else "companion (EDEK)"
    table, column = _locate(col) if _encrypted(col) else (_table_name(col.table), col.name)
    return PlaintextWriteError(
        f"refusing to write {what} into the {kind} column {table}.{column} ({where}): the "
        "database would store what the expression yields, unencrypted. Nothing was sent. Only "
        "a bound value can be encrypted, by an installed session's unit of work (session.add, "
        "attribute changes, session.execute(insert(Model), rows)); None (NULL) is allowed",
        table=table,
        column=column,
    )


class _Walk:
    """One walk over one statement; remembers the FROM objects it has already judged."""

    __slots__ = ("scopes", "seen")

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.scopes: list[Any] = []  # enclosing SELECTs, to resolve ORDER BY "name"

    # -- statements ------------------------------------------------------------------------

    def statement(self, stmt: Any) -> None:
        if isinstance(stmt, Select):
            self.select(stmt)
        elif isinstance(stmt, CompoundSelect):
            self.compound(stmt)
        elif isinstance(stmt, UpdateBase):
            self.dml(stmt)
        elif isinstance(stmt, TextualSelect):
            return  # text().columns(...): the text is out of reach; its columns are a select list
        elif isinstance(stmt, ClauseElement) and not isinstance(stmt, TextClause):
            self.expr(stmt, "the statement", None)

    def select(self, s: Select[Any]) -> None:
        self.scopes.append(s)
        for item in s._raw_columns:
            self.selected(item, "the select list")
        for entities in getattr(s, "_memoized_select_entities", ()):
            for item in entities._raw_columns:
                self.selected(item, "the select list")
            self.joins(entities._setup_joins)
        for f in s._from_obj:
            self.from_(f)
        self.joins(s._setup_joins)
        self.exprs(s._where_criteria, "WHERE")
        self.exprs(s._having_criteria, "HAVING")
        self.exprs(s._order_by_clauses, "ORDER BY")
        self.exprs(s._group_by_clauses, "GROUP BY")
        if s._distinct_on:
            self.exprs(s._distinct_on, "DISTINCT ON")
        elif s._distinct:
            self.distinct_rows(s, "DISTINCT")
        self.exprs(_children(s, _SELECT_OWN), "the statement")
        for opt in getattr(s, "_with_options", ()):
            self.option(opt)
        self.scopes.pop()

    def compound(self, s: CompoundSelect[Any]) -> None:
        keyword = str(getattr(s.keyword, "value", s.keyword))
        compares_rows = keyword != "UNION ALL"  # UNION dedups, INTERSECT/EXCEPT match rows
        for sel in s.selects:
            self.statement(sel)
            if compares_rows and isinstance(sel, Select):
                self.distinct_rows(sel, keyword)
        self.scopes.append(s.selects[0] if s.selects else s)
        self.exprs(s._order_by_clauses, "ORDER BY")
        self.exprs(s._group_by_clauses, "GROUP BY")
        self.scopes.pop()
        self.exprs(_children(s, _COMPOUND_OWN), "the statement")

    def dml(self, s: UpdateBase) -> None:
        table = s.table
        self.from_(table)
        where = "UPDATE ... SET" if isinstance(s, Update) else "INSERT ... VALUES"
        values = getattr(s, "_values", None)
        if values:
            for key, value in values.items():
                self.write(table, key, value, where)
        for key, value in getattr(s, "_ordered_values", None) or ():  # SQLAlchemy 2.0
            self.write(table, key, value, where)
        if isinstance(s, Insert):
            for rows in s._multi_values:
                for row in rows:
                    # a tuple row lists the table's columns in order (SQLAlchemy checks length)
                    pairs = row.items() if isinstance(row, dict) else zip(table.c, row)  # noqa: B905
                    for key, value in pairs:
                        self.write(table, key, value, "a multi-row INSERT ... VALUES")
            if s.select is not None:
                for key in s._select_names or ():
                    col = self.target(table, key)
                    if col is not None and _protected(col):
                        raise _write_refused(col, "a SELECT's result", "INSERT ... FROM SELECT")
                self.statement(s.select)
            if s._post_values_clause is not None:
                self.upsert(table, s._post_values_clause)
        for attr in ("_returning", "_return_defaults_columns", "_supplemental_returning"):
            for item in getattr(s, attr, None) or ():
                self.selected(item, "RETURNING")
        self.exprs(getattr(s, "_where_criteria", ()), "WHERE")
        for f in getattr(s, "_extra_froms", ()):
            self.from_(f)
        self.exprs(_children(s, _DML_OWN), "the statement")

    def upsert(self, table: Any, clause: Any) -> None:
        """ON CONFLICT DO UPDATE (PostgreSQL, SQLite), ON DUPLICATE KEY UPDATE (MySQL)."""
        found = False
        for attr in ("update_values_to_set", "update"):
            sets = getattr(clause, attr, None)
            if sets is None:
                continue
            found = True
            for key, value in sets.items() if isinstance(sets, dict) else sets:
                self.write(table, key, value, "the upsert's SET")
        for key in getattr(clause, "inferred_target_elements", None) or ():
            self.expr(self.target(table, key), "the conflict target", None)
        for attr, where in (
            ("inferred_target_whereclause", "the conflict target's WHERE"),
            ("update_whereclause", "the upsert's WHERE"),
        ):
            value = getattr(clause, attr, None)
            if value is not None:
                found = True
                self.exprs(value if isinstance(value, list | tuple) else (value,), where)
        if not found:
            self.expr(clause, "the statement", None)

    # -- positions -------------------------------------------------------------------------

    def target(self, table: Any, key: Any) -> Any:
        key = _unwrap(key)
        if isinstance(key, str):
            return table.c.get(key) if hasattr(table, "c") else None
        return key

    def write(self, table: Any, key: Any, value: Any, where: str) -> None:
        col = self.target(table, key)
        if col is None:
            return  # SQLAlchemy itself refuses a key the table does not have
        if not isinstance(col, ColumnClause):
            self.expr(col, where, None)  # e.g. a JSON path as the SET target
            return
        value = _unwrap(value)
        if "INSERT" not in where and is_tenant_column(col):
            table = _table_name(col.table)
            raise TenantContextError(
                f"refusing to set the declared tenant column {table}.{col.name} ({where}): a "
                "row's values are bound to its tenant's key, so a row cannot move to another "
                "tenant; copy it under the new tenant and delete the old row. Nothing was sent",
                table=table,
                column=col.name,
            )
        if not _protected(col):
            if isinstance(value, ClauseElement):
                self.expr(value, where, None)
            return
        if "INSERT" not in where and isinstance(col.type, BlindIndexType):
            raise PlaintextWriteError(
                f"refusing to set the blind index column {_table_name(col.table)}.{col.name} "
                f"({where}): index values are written by sqlalchemy-cmk's session hooks only, "
                "with the value they index. Nothing was sent",
                table=_table_name(col.table),
                column=col.name,
            )
        if "INSERT" not in where and _encrypted(col) and getattr(col.type, "search", None):
            raise PlaintextWriteError(
                f"refusing to set the searchable column {_name(col)} ({where}): its blind "
                "index would keep indexing the old value. Change it on the loaded object "
                "through an installed session. Nothing was sent",
                table=_locate(col)[0],
                column=col.name,
            )
        if "INSERT" not in where and isinstance(col.type, EDEKType):
            # An UPDATE (or upsert) never sets a companion in the statement itself: the flush
            # passes its own as parameters. Any value here, NULL included, strands the row.
            raise PlaintextWriteError(
                f"refusing to set the companion (EDEK) column {_table_name(col.table)}.{col.name} "
                f"({where}): companions are written by sqlalchemy-cmk's session hooks only, and "
                "any other value (NULL included) would leave the row's encrypted values "
                "unreadable. Nothing was sent",
                table=_table_name(col.table),
                column=col.name,
            )
        if not isinstance(value, ClauseElement) or isinstance(value, Null):
            return  # a plain value is bound with the column's type: the bind guard judges it
        if isinstance(value, BindParameter) and isinstance(value.type, NullType | type(col.type)):
            return  # an untyped bind takes the column's type when compiled
        raise _write_refused(col, _value_kind(value), where)

    def selected(self, item: Any, clause: str) -> None:
        """A select list or RETURNING item: columns may be encrypted, bare or labelled."""
        item = _unwrap(item)
        col = item.element if isinstance(item, Label) else item
        if isinstance(col, ColumnClause):
            if col.table is not None:
                self.from_(col.table)
        elif isinstance(item, FromClause) and not isinstance(item, FunctionElement):
            self.from_(item)  # an entity: select(Model)
        elif isinstance(item, ClauseList) and "bundle" in item._annotations:
            for sub in item.clauses:
                self.selected(sub, clause)
        else:
            self.expr(item, clause, None)

    def joins(self, setup_joins: Iterable[Any]) -> None:
        for target, onclause, from_, _flags in setup_joins:
            for part in (from_, target):
                part = _unwrap(part)
                if isinstance(part, FromClause):
                    self.from_(part)
                elif isinstance(part, ClauseElement):
                    self.expr(part, "a JOIN condition", None)  # a relationship's join
            if onclause is not None and not isinstance(onclause, str):
                self.expr(_unwrap(onclause), "a JOIN condition", None)

    def distinct_rows(self, s: Select[Any], clause: str) -> None:
        """Rows compared whole: each encrypted column needs its table's primary key alongside."""
        selected: set[int] = set()
        tables: dict[int, Any] = {}
        for item in s._raw_columns:
            item = _unwrap(item)
            col = item.element if isinstance(item, Label) else item
            if isinstance(item, FromClause) and not isinstance(item, FunctionElement):
                selected.update(hash(c) for c in item.c)
            elif isinstance(col, ColumnClause):
                selected.add(hash(col))
                if _encrypted(col) and col.table is not None:
                    tables.setdefault(hash(col.table), col)
            elif isinstance(item, ClauseList) and "bundle" in item._annotations:
                for sub in item.clauses:
                    sub = sub.element if isinstance(sub, Label) else sub
                    selected.add(hash(sub))
                    if _encrypted(sub) and getattr(sub, "table", None) is not None:
                        tables.setdefault(hash(sub.table), sub)
        for col in tables.values():
            pk = list(col.table.primary_key)
            if not pk or any(hash(c) not in selected for c in pk):
                raise _unsupported(col, clause, None)

    def option(self, opt: Any) -> None:
        """Criteria carried by ORM options: with_loader_criteria(), relationship.and_()."""
        crit = getattr(opt, "where_criteria", None)
        if isinstance(crit, ClauseElement):
            _refuse_search_in(crit, "with_loader_criteria()")
            self.expr(crit, "a loader criteria", None)
        for element in getattr(opt, "context", ()) or ():
            extra = getattr(element, "_extra_criteria", ())
            for node in extra:
                _refuse_search_in(node, "relationship.and_()")
            self.exprs(extra, "a relationship criteria")

    # -- FROM clauses ----------------------------------------------------------------------

    def from_(self, f: Any) -> None:
        if id(f) in self.seen:
            return
        self.seen.add(id(f))
        if isinstance(f, TableClause):
            if isinstance(f, Table):
                check_table(f)
        elif isinstance(f, Join):
            self.from_(f.left)
            self.from_(f.right)
            self.expr(f.onclause, "a JOIN condition", None)
        elif isinstance(f, FunctionElement):
            self.expr(f, "FROM", None)  # a table-valued function: its arguments
        elif isinstance(f, AliasedReturnsRows | FromGrouping):
            inner = f.element
            if isinstance(inner, FromClause):
                self.from_(inner)
            else:
                self.statement(inner)
            if not isinstance(f, FromGrouping):
                self.exprs(_children(f, ("element",)), "FROM")
        else:
            self.exprs(f.get_children(), "FROM")

    # -- expressions -----------------------------------------------------------------------

    def exprs(self, nodes: Iterable[Any], clause: str) -> None:
        for node in nodes:
            self.expr(node, clause, None)

    def expr(self, node: Any, clause: str, parent: Any) -> None:
        """An expression where an encrypted column may only be tested for NULL."""
        if not isinstance(node, ClauseElement):
            node = _unwrap(node)
            if not isinstance(node, ClauseElement):
                return  # a name (ON CONFLICT ("id")) or a plain value
        if isinstance(node, ColumnClause):
            if _encrypted(node):
                raise _unsupported(node, clause, parent)
            if node.table is not None:
                self.from_(node.table)
            return
        if isinstance(node, SelectBase | UpdateBase):
            self.statement(node)
            return
        if isinstance(node, FromClause) and not isinstance(node, FunctionElement):
            self.from_(node)  # (a SQL function is a FromClause too, but judged as an expression)
            return
        if isinstance(node, BinaryExpression) and node.operator in _IS_NULL_OPS:
            left, right = node.left, node.right
            other = left if isinstance(right, Null) else right if isinstance(left, Null) else None
            if isinstance(other, ColumnClause):  # col IS [NOT] NULL: no value, no ciphertext
                if other.table is not None:
                    self.from_(other.table)
                return
        if isinstance(node, UnaryExpression) and node.operator is operators.exists:
            self.expr(getattr(node.element, "element", node.element), clause, None)
            return
        if getattr(node, "__visit_name__", None) == "textual_label_reference":
            self.label_reference(node, clause)
            return
        if isinstance(node, ScalarSelect):
            if _encrypted(node):
                raise _unsupported(_first_column(node.element), clause, parent)
            self.statement(node.element)
            return
        if _encrypted(node) and not isinstance(node, Label | BindParameter):
            # type_coerce(..., EncryptedType) and the like: no column to name
            raise _unsupported(node, clause, parent)
        if isinstance(node, Label):
            self.expr(node.element, clause, parent)
            return
        # Name the construct that uses the column, not the list or parentheses around it.
        around = parent if isinstance(node, ClauseList | Grouping) else node
        for child in node.get_children():
            self.expr(child, clause, around)

    def label_reference(self, node: Any, clause: str) -> None:
        """ORDER BY "ssn": SQLAlchemy resolves the name against the enclosing select list."""
        if not self.scopes:
            return
        scope = self.scopes[-1]
        columns = getattr(scope, "selected_columns", None)
        col = columns.get(node.element) if columns is not None else None
        if col is not None:
            self.expr(col, clause, None)


def _children(node: Any, omit: tuple[str, ...]) -> Iterable[Any]:
    """A node's children but those the walk handles itself (``Select.get_children`` takes no
    ``omit_attrs``, so call the generic one)."""
    return HasTraverseInternals.get_children(node, omit_attrs=omit)


def _first_column(select: Any) -> Any:
    cols = list(getattr(select, "selected_columns", ()))
    return cols[0] if cols else select


# -- declarations -----------------------------------------------------------------------------


def check_column(column: Column[Any]) -> None:
    """Refuse column options an encrypted (or companion) column cannot honour.

    Called when the column is attached to its table (see ``EncryptedType._set_parent``), so a
    model fails when it is declared.

    Raises:
        ConfigurationError: a server or Python-side default, ``Computed``, ``Identity``,
            ``unique``, ``index``, primary or foreign key, or ``Mutable`` tracking.
    """
    encrypted = isinstance(column.type, EncryptedType)
    if not encrypted and not isinstance(column.type, EDEKType):
        return
    what = "an encrypted column" if encrypted else "a companion (EDEK) column"
    checks: list[tuple[bool, str]] = [
        (
            column.computed is not None or column.identity is not None,
            "a Computed/Identity value is computed by the database and stored unencrypted",
        ),
        (
            column.server_default is not None or column.server_onupdate is not None,
            "a server_default/server_onupdate would be computed by the database and stored "
            "unencrypted; set the value on the object instead",
        ),
        (
            column.default is not None or column.onupdate is not None,
            "a default/onupdate is applied by SQLAlchemy after the hooks have encrypted the "
            "row, so it would reach the database unencrypted; set the value on the object "
            "instead (in __init__, or default_factory= with dataclasses)",
        ),
    ]
    if encrypted:
        checks += [
            (
                bool(column.primary_key or column.foreign_keys),
                "a primary or foreign key compares values, and encrypted values are "
                "randomized; key on a plaintext column",
            ),
            (
                bool(column.unique or column.index),
                "unique=/index= would index randomized ciphertext and enforce nothing; for "
                "equality search and uniqueness declare EncryptedType(..., search=BlindIndex())",
            ),
            (
                "_ext_mutable_orig_type" in column.info,
                "Mutable tracking (MutableDict.as_mutable(...)) is not supported: its load "
                "listener sees the ciphertext; declare the column without it and call "
                "sqlalchemy.orm.attributes.flag_modified(obj, key) after an in-place change",
            ),
        ]
    for failed, why in checks:
        if failed:
            table = getattr(column, "table", None)
            raise ConfigurationError(
                f"{_name(column)} is {what}: {why}",
                table=getattr(table, "name", None),
                column=column.name,
            )


def check_table(table: Table) -> None:
    """Refuse a table whose constraints or indexes cover an encrypted column; once per table.

    Column options are refused when the column is declared (:func:`check_column`); a
    ``UniqueConstraint``, ``Index`` or key declared on the table is refused here, when the
    table is created (``metadata.create_all``) or first used by a guarded statement.

    Raises:
        ConfigurationError: the table indexes or constrains an encrypted column.
    """
    if _tables_ok.get(table):
        return
    for column in table.columns:
        if isinstance(column, Column):
            check_column(column)
    items: list[Any] = [*table.indexes, *table.constraints]
    for item in items:
        if not isinstance(
            item, Index | UniqueConstraint | PrimaryKeyConstraint | ForeignKeyConstraint
        ):
            continue
        exprs = list(getattr(item, "expressions", None) or item.columns)
        for e in exprs:
            for col in _columns_in(e):
                if _encrypted(col):
                    kind = type(item).__name__
                    raise ConfigurationError(
                        f"{_name(col)} is an encrypted column: {kind} over it would index "
                        "randomized ciphertext and enforce or speed up nothing; for search and "
                        "uniqueness declare EncryptedType(..., search=BlindIndex(...))",
                        table=table.name,
                        column=getattr(col, "name", None),
                    )
    for fk in table.foreign_keys:
        try:
            referred = fk.column
        except (exc.InvalidRequestError, exc.ArgumentError):
            continue  # not resolvable yet: the other table is not declared
        if _encrypted(referred):
            raise ConfigurationError(
                f"{_name(fk.parent)} refers to the encrypted column {_name(referred)}: "
                "foreign keys compare values, and encrypted values are randomized",
                table=table.name,
                column=fk.parent.name,
            )
    _tables_ok[table] = True


def _columns_in(expr: Any) -> Iterable[Any]:
    expr = _unwrap(expr)
    if isinstance(expr, str):
        return ()
    if isinstance(expr, ColumnClause):
        return (expr,)
    found: list[Any] = []
    stack = [expr]
    while stack:
        e = stack.pop()
        if isinstance(e, ColumnClause):
            found.append(e)
        elif isinstance(e, ClauseElement):
            stack.extend(e.get_children())
    return found
