"""Blind indexes at work: index columns, root keys and states, the write path, the query rewrite.

Rotation without missing rows. Each index has two slot columns (``name`` and ``name_alt``) and
a state per domain, read from ``cmk_search_indexes`` and cached ``search_state_ttl`` seconds:

=========  =====================================  ==========================================
phase      writes                                 reads
=========  =====================================  ==========================================
building   the current slot                       refused (``IndexNotReadyError``)
ready      the current slot (the other: NULL)     the current slot
rotating   both: current version, and the next    the current slot
switched   both: next version (now current), and  the new current slot
           the previous one in the other slot
=========  =====================================  ==========================================

The rotation tool moves one phase at a time and waits out the state cache between moves, so
every process is in one of two adjacent phases; in each pair, the slot any process reads is
complete for the rows any process writes, and a unique index over each slot keeps a duplicate
out in every phase. No query ever expands to two versions.
"""

from __future__ import annotations

import datetime
import hmac
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Index,
    Select,
    Table,
    and_,
    event,
    false,
    select,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import types as sqltypes
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ClauseElement,
    ColumnElement,
    _anonymous_label,
)
from sqlalchemy.sql.selectable import FromClause
from sqlalchemy.sql.visitors import InternalTraversal, iterate, replacement_traverse

from . import search as _s
from ._access import access, emit_ok
from ._dialects import select_dialect
from ._mapping import is_tenant_column
from .context import TenantContext, current_context
from .errors import (
    ConfigurationError,
    DecryptionError,
    IndexNotReadyError,
    NoTenantError,
    TenantMismatchError,
    UnsupportedQueryError,
)

# Column.info key: on a slot column its Slot; on a searchable column, _SLOTS_ADDED once it has
# added its slots to a table. Not table.info: Alembic's autogenerate renders a table's info
# into the migration script (a column's it does not), where a Slot is not valid Python.
_INFO = "sqlalchemy_cmk.search"
_SLOTS_ADDED = "slots added"
_ATTACHED = "attached"  # on a tenant column, once in a table
PURPOSE = "index"
PHASES = ("building", "ready", "rotating", "switched")


# -- declaration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    source: str  # the encrypted column's name
    index: _s.BlindIndex
    name: str  # the index's name (slot 0's column)
    slot: int


def index_names(column: Column[Any]) -> list[tuple[str, _s.BlindIndex]]:
    """(name, index) of each blind index of an encrypted column, names resolved."""
    out: list[tuple[str, _s.BlindIndex]] = []
    for ix in column.type.search:  # type: ignore[attr-defined]
        name = ix.name or f"{column.name}_bidx"
        if any(n == name for n, _ in out):
            raise ConfigurationError(
                f"{column.name}: two blind indexes named {name!r}; name each derived index",
                column=column.name,
            )
        out.append((name, ix))
    return out


def slot_columns(name: str) -> tuple[str, str]:
    return name, f"{name}_alt"


def add_index_columns(column: Column[Any], table: Any) -> None:
    """Give the table the index's slot columns, and the database index over each (once the
    tenant column is there too: whichever of the two comes last adds it)."""
    # A copy of a column that already added its slots to its table (Alembic's autogenerate and
    # Table.to_metadata build tables from copies of every column, in order, its info copied
    # with it): the slots' own copies come after it, and adding them here would make them
    # duplicates. A mixin's column is never in a table itself, so each model's copy adds them.
    copied = column.info.get(_INFO) == _SLOTS_ADDED
    names = index_names(column)
    _s.check_plan(f"{table.name}.{column.name}", [ix for _, ix in names])
    for name, ix in names:
        if ix.transform is None and any(o is not ix and o.transform is None for _, o in names):
            raise ConfigurationError(
                f"{table.name}.{column.name}: only one blind index may index the value itself; "
                "give the others a transform",
                table=table.name,
                column=column.name,
            )
        for n, col_name in enumerate(slot_columns(name)):
            slot = Slot(column.name, ix, name, n)
            if col_name in table.c:
                existing = table.c[col_name]
                if not isinstance(existing.type, _s.BlindIndexType):
                    raise ConfigurationError(
                        f"{table.name}.{col_name} is taken by another column: name the blind "
                        "index (BlindIndex(name=...))",
                        table=table.name,
                        column=col_name,
                    )
                existing.info[_INFO] = slot
            elif not copied:
                table.append_column(
                    Column(col_name, _s.BlindIndexType(), nullable=True, info={_INFO: slot})
                )
    column.info[_INFO] = _SLOTS_ADDED
    if not copied:  # a copied table gets copies of the indexes too (or, in Alembic, its ops)
        ensure_db_indexes(table)


def _slots(table: Any) -> dict[str, Slot]:
    """The table's slot columns: name -> Slot."""
    return {c.name: c.info[_INFO] for c in table.columns if isinstance(c.info.get(_INFO), Slot)}


def ensure_db_indexes(table: Any) -> None:
    info = _slots(table)
    if not info:
        return
    tenant = next((c for c in table.columns if is_tenant_column(c)), None)
    if tenant is None:
        return  # checked when the model is mapped (search_spec): searching needs one
    have = {ix.name for ix in table.indexes}
    for col_name, slot in info.items():
        ix_name = f"ix_{table.name}_{col_name}"[:63]
        if ix_name not in have:
            Index(ix_name, tenant, table.c[col_name], unique=slot.index.unique)


def on_tenant_attach(column: Column[Any], table: Any) -> None:
    if column.info.get(_INFO) == _ATTACHED:
        return  # a copy of a model's tenant column: as a copied searchable column, above
    column.info[_INFO] = _ATTACHED
    ensure_db_indexes(table)


@dataclass(frozen=True, eq=False)
class SearchSpec:
    """One blind index of a mapped encrypted column."""

    index: _s.BlindIndex
    name: str
    domain: str
    keys: tuple[str, str]  # attribute keys of the two slot columns
    table: str
    column: str

    @property
    def exact(self) -> bool:
        return self.index.width >= _s.EXACT_BITS


def specs_for(table: Any, column: Column[Any], keys: dict[str, str]) -> tuple[SearchSpec, ...]:
    """The search specs of one encrypted column, with the attribute keys of its slots."""
    if not getattr(column.type, "search", ()):
        return ()
    out = []
    for name, ix in index_names(column):
        cols = slot_columns(name)
        missing = [c for c in cols if c not in keys]
        if missing:
            raise ConfigurationError(
                f"{table.name}.{column.name} is searchable but its index column {missing[0]!r} "
                "is not mapped",
                table=table.name,
                column=column.name,
            )
        out.append(
            SearchSpec(
                ix,
                name,
                ix.domain or f"{table.name}.{name}",
                (keys[cols[0]], keys[cols[1]]),
                table.name,
                column.name,
            )
        )
    return tuple(out)


# -- states and root keys -----------------------------------------------------------------------


@dataclass(frozen=True)
class DomainState:
    phase: str
    slot: int
    version: int
    bits: int
    other_version: int | None
    other_bits: int | None
    fingerprint: str

    def writes(self) -> list[tuple[int, int, int]]:
        """(slot, key version, bits) of every slot a write fills."""
        out = [(self.slot, self.version, self.bits)]
        if self.phase in ("rotating", "switched"):
            assert self.other_version is not None and self.other_bits is not None
            out.append((1 - self.slot, self.other_version, self.other_bits))
        return out

    @property
    def read(self) -> tuple[int, int, int]:
        """(slot, key version, bits) a search reads."""
        return self.slot, self.version, self.bits


def default_state(ix: _s.BlindIndex) -> DomainState:
    """The state of a domain nobody has built yet: written, not yet readable."""
    return DomainState("building", 0, 1, ix.width, None, None, ix.fingerprint)


def _row_state(row: Any) -> DomainState:
    state = DomainState(
        row.phase,
        int(row.slot),
        int(row.version),
        int(row.bits),
        None if row.other_version is None else int(row.other_version),
        None if row.other_bits is None else int(row.other_bits),
        row.fingerprint,
    )
    # The row is data anyone with write access to the database can change: a phase or slot
    # this code does not know, or a width out of range, must stop searches and writes rather
    # than be read as "ready" (or pick a slot by Python's negative indexing).
    rotating = state.phase in ("rotating", "switched")
    if (
        state.phase not in PHASES
        or state.slot not in (0, 1)
        or not _valid(state.version, state.bits)
        or (rotating and not _valid(state.other_version, state.other_bits))
    ):
        raise ConfigurationError(
            f"the state of blind index domain {row.domain!r} in {_s.STATES_TABLE} is not one "
            "this version understands (phase, slot, key version or width out of range): "
            "refusing to search or write it"
        )
    return state


def _valid(version: int | None, bits: int | None) -> bool:
    return (
        version is not None
        and bits is not None
        and 1 <= version <= 0xFFFFFFFF
        and 1 <= bits <= _s.MAX_BITS
    )


class SearchStore:
    """Per CMK: the domain states and each tenant's root-key envelope, cached ``ttl`` seconds,
    and the index keys derived from unwrapped root keys (valid while the key manager serves
    the same unwrapped root: a forget or revocation makes the next use unwrap again)."""

    def __init__(self, cmk: Any, ttl: float, clock: Callable[[], float]) -> None:
        self._cmk = cmk
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, tuple[DomainState | None, float]] = {}
        self._roots: dict[str, tuple[bytes | None, float]] = {}
        self._derived: dict[tuple[bytes, str, int], tuple[Any, bytes]] = {}
        self._checks: dict[bytes, bytes] = {}  # root envelope -> its stored check value
        self._tables = _s.search_tables(_metadata())

    # -- reading -------------------------------------------------------------------------

    def state(self, reader: _Reader, spec: SearchSpec) -> DomainState:
        now = self._clock()
        hit = self._states.get(spec.domain)
        if hit is not None and hit[1] > now:
            found = hit[0]
        else:
            states = self._tables[1]
            with reader.conn() as conn:
                row = conn.execute(select(states).where(states.c.domain == spec.domain)).first()
            found = None if row is None else _row_state(row)
            # States are written only by the index tools, committed: cacheable everywhere.
            self._states[spec.domain] = (found, now + self.ttl)
        state = default_state(spec.index) if found is None else found
        if state.fingerprint != spec.index.fingerprint:
            raise ConfigurationError(
                f"blind index {spec.table}.{spec.name} (domain {spec.domain!r}) was built with "
                f"{state.fingerprint!r}, and this process declares {spec.index.fingerprint!r}: "
                "a changed normalizer or transform needs a new index (a new name), built anew",
                table=spec.table,
                column=spec.column,
            )
        return state

    def root_envelope(self, reader: _Reader, tenant: str) -> bytes | None:
        now = self._clock()
        hit = self._roots.get(tenant)
        if hit is not None and hit[1] > now and hit[0] is not None:
            return hit[0]
        keys = self._tables[0]
        with reader.conn() as conn:
            row = conn.execute(
                select(keys.c.envelope, keys.c.check_value)
                .where(keys.c.tenant == tenant, keys.c.purpose == PURPOSE)
                .order_by(keys.c.version.desc())
                .limit(1)
            ).first()
        env: bytes | None = None if row is None else bytes(row[0])
        if env is not None:
            _check_owner(env, tenant)
            assert row is not None
            with self._lock:
                if len(self._checks) > 65536:
                    self._checks.clear()
                self._checks[env] = bytes(row[1] or b"")
        if reader.cacheable and env is not None:
            self._roots[tenant] = (env, now + self.ttl)
        return env

    def create_root(self, reader: _Reader, tenant: str, ctx: TenantContext | None) -> bytes:
        """The tenant's root-key envelope, created (wrapped by its KMS, proved by an unwrap)
        and stored in its own transaction if it has none."""
        found = self.root_envelope(reader, tenant)
        if found is not None:
            return found
        km = self._cmk._keys
        key = km._wrap_new(tenant, km.tenant_keys(tenant).primary, ctx)
        try:
            km._verify(key, ctx)
            keys = self._tables[0]
            row = {
                "tenant": tenant,
                "purpose": PURPOSE,
                "version": 1,
                "envelope": key.envelope,
                "check_value": _s.root_check(key.material),
                "created_at": datetime.datetime.now(datetime.timezone.utc),
            }
            try:
                with reader.conn(write=True) as conn:
                    conn.execute(keys.insert().values(row))
            except IntegrityError:
                pass  # another process created it first: use theirs
        finally:
            key.wipe()
        env = self.root_envelope(reader, tenant)
        if env is None:
            raise ConfigurationError(
                f"the search root key of tenant {tenant!r} could not be stored: does the "
                f"{_s.KEYS_TABLE} table exist? (sqlalchemy_cmk.search.search_tables(metadata))",
                tenant=tenant,
            )
        return env

    def index_key(
        self, envelope: bytes, domain: str, version: int, ctx: TenantContext | None
    ) -> bytes:
        dk = self._cmk._keys.read_keys([envelope], ctx)[envelope]
        hit = self._derived.get((envelope, domain, version))
        if hit is not None and hit[0] is dk and not dk.wiped:
            return hit[1]
        material = dk.copy_material()
        if material is None:  # wiped between the lookup and now: unwrap afresh
            dk = self._cmk._keys.read_keys([envelope], ctx)[envelope]
            material = dk.copy_material()
            assert material is not None
        try:
            expected = self._checks.get(envelope)
            if expected is None or not hmac.compare_digest(_s.root_check(material), expected):
                # Never served again from the cache: the next use asks the KMS anew.
                self._cmk._keys.discard(envelope)
                raise DecryptionError(
                    f"the search root key of tenant {dk.tenant!r} does not match the check "
                    f"value stored with it in {_s.KEYS_TABLE}: the KMS unwrapped it to another "
                    "key, or the row was altered; nothing was indexed or searched with it",
                    tenant=dk.tenant,
                    key_ref=dk.key_ref,
                    provider=dk.provider,
                )
            derived = _s.index_key(material, domain, version)
        finally:
            material[:] = bytes(len(material))
        with self._lock:
            if len(self._derived) > 4096:
                self._derived.clear()
            self._derived[(envelope, domain, version)] = (dk, derived)
        return derived

    def forget(self) -> None:
        with self._lock:
            self._states.clear()
            self._roots.clear()
            self._derived.clear()


def _check_owner(envelope: bytes, tenant: str) -> None:
    """The stored root key must be the tenant's own. Another tenant's envelope (copied over by
    someone with write access to the database) would unwrap through that tenant's KMS, and the
    two tenants' equal values would get equal index values."""
    from ._format import is_leased, parse_envelope

    if is_leased(envelope):  # a root key is wrapped by the KMS itself, never under a lease
        raise DecryptionError("stored search root key envelope is malformed")
    owner = parse_envelope(envelope).tenant  # garbage: the opaque DecryptionError
    if owner != tenant:
        raise TenantMismatchError(
            f"the search root key stored for tenant {tenant!r} in {_s.KEYS_TABLE} belongs to "
            "another tenant: the table was edited outside the application",
            row_tenant=owner,
            tenant=tenant,
            table=_s.KEYS_TABLE,
        )


_meta: Any = None


def _metadata() -> Any:
    global _meta
    if _meta is None:
        from sqlalchemy import MetaData

        _meta = MetaData()
    return _meta


class _Reader:
    """Where the store reads and writes its tables.

    A connection of its own from the session's engine, so a root key is created in its own
    transaction (committed whatever the application's transaction does) and what is read is
    committed, hence cacheable. Not on SQLite: there a second connection would wait for the
    database lock the session may hold (or be the session's own DBAPI connection, in memory),
    so the session's connection is used, and tenant root envelopes are not cached (one that
    this transaction created could still be rolled back).
    """

    def __init__(self, own: Callable[[], Connection]) -> None:
        self._own = own
        self._session_conn: Connection | None = None

    def _session(self) -> Connection:
        if self._session_conn is None:
            self._session_conn = self._own()
        return self._session_conn

    @property
    def cacheable(self) -> bool:
        return self._session().dialect.name != "sqlite"

    @property
    def dialect(self) -> Any:
        return self._session().dialect

    def conn(self, write: bool = False) -> Any:
        import contextlib

        @contextlib.contextmanager
        def manage() -> Any:
            try:
                with opened() as conn:
                    yield conn
            except DBAPIError as exc:
                if isinstance(exc, IntegrityError):
                    raise
                # Most often: the tables were never created. Typed and scrubbed: a driver's
                # message may quote parameters (tenant ids, envelopes).
                raise ConfigurationError(
                    f"reading or writing the search tables ({_s.KEYS_TABLE}, "
                    f"{_s.STATES_TABLE}) failed with {type(exc.orig).__name__}: create them "
                    "with sqlalchemy_cmk.search.search_tables(metadata) and create_all() or an "
                    "Alembic migration"
                ) from None

        @contextlib.contextmanager
        def opened() -> Any:
            session_conn = self._session()
            if session_conn.dialect.name == "sqlite":
                yield session_conn
                return
            with session_conn.engine.connect() as conn:
                if write:
                    with conn.begin():
                        yield conn
                else:
                    yield conn
                    conn.rollback()

        return manage()


# -- values -------------------------------------------------------------------------------------


def compute(
    store: SearchStore,
    reader: _Reader,
    tenant: str,
    spec: SearchSpec,
    codec: Any,
    value: Any,
    ctx: TenantContext | None,
    *,
    create: bool,
    slots: Sequence[tuple[int, int, int]],
    keys: dict[tuple[str, int], bytes] | None = None,
) -> dict[int, _s.IndexValue | None] | None:
    """Index values of ``value`` for each (slot, version, bits); None if the tenant has no root
    key and ``create`` is false (then it has no index values at all). ``keys``: index keys by
    (domain, version) that one flush of one tenant reuses, as it reuses one data key."""
    prepared = None if value is None else spec.index.prepare(value)
    if prepared is None:
        return {slot: None for slot, _, _ in slots}
    env: bytes | None = b""
    if keys is None or any((spec.domain, version) not in keys for _, version, _ in slots):
        env = (
            store.create_root(reader, tenant, ctx)
            if create
            else store.root_envelope(reader, tenant)
        )
    if env is None:
        return None
    msg = _s.message(
        prepared,
        codec if spec.index.transform is None else None,
        table=spec.table,
        column=spec.column,
    )
    out: dict[int, _s.IndexValue | None] = {}
    for slot, version, bits in slots:
        key = None if keys is None else keys.get((spec.domain, version))
        if key is None:
            key = store.index_key(env, spec.domain, version, ctx)
            if keys is not None:
                keys[(spec.domain, version)] = key
        out[slot] = _s.IndexValue(_s.index_value(key, version, bits, msg))
    return out


def index_writes(
    store: SearchStore,
    reader: _Reader,
    rows: Iterable[tuple[dict[str, Any], Any, Any]],
    ctx: TenantContext,
) -> list[tuple[dict[str, Any], str, _s.IndexValue | None]]:
    """(row dict, slot attribute key, value) for each searchable column written: rows are
    (dict, ColumnSpec, plaintext). Computed before anything is sealed; raises as a seal does."""
    tenant = ctx.tenant_id
    out: list[tuple[dict[str, Any], str, _s.IndexValue | None]] = []
    states: dict[str, DomainState] = {}
    keys: dict[tuple[str, int], bytes] = {}
    for d, c, value in rows:
        if tenant is None:
            raise NoTenantError("searchable columns are written under a tenant context")
        for spec in c.search:
            state = states.get(spec.domain)
            if state is None:
                state = states[spec.domain] = store.state(reader, spec)
            writes = state.writes()
            found = compute(
                store,
                reader,
                tenant,
                spec,
                c.codec,
                value,
                ctx,
                create=True,
                slots=writes,
                keys=keys,
            )
            assert found is not None
            written = set(found)
            for slot in (0, 1):
                out.append((d, spec.keys[slot], found.get(slot) if slot in written else None))
    return out


# -- queries ------------------------------------------------------------------------------------


class _TermType(sqltypes.TypeDecorator[Any]):
    """The type of a search term's bind: it never binds, so a term cannot reach a database."""

    impl = sqltypes.NullType
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        raise _unrewritten()

    def process_literal_param(self, value: Any, dialect: Any) -> str:
        raise _unrewritten()


def _unrewritten() -> UnsupportedQueryError:
    return UnsupportedQueryError(
        "a search on an encrypted column runs only through a session (or engine) that "
        "cmk.install() was called on: the term is turned into blind index values there, and "
        "is never sent as is. Nothing was sent"
    )


class SearchTerm(ColumnElement[bool]):
    """``Model.col == term`` (``!=``, ``in_``, ``not_in``, or a join of two searchable
    columns): rewritten into index comparisons when it executes; never compiled for a database."""

    __visit_name__ = "cmk_search_term"
    inherit_cache = True
    _traverse_internals = [  # noqa: RUF012  (SQLAlchemy reads a list)
        ("operands", InternalTraversal.dp_clauseelement_tuple),
        ("values", InternalTraversal.dp_clauseelement_tuple),
        ("kind", InternalTraversal.dp_string),
        ("index_name", InternalTraversal.dp_string),
    ]
    type: Any = Boolean()

    def __init__(
        self, operands: tuple[Any, ...], values: tuple[Any, ...], kind: str, index_name: str
    ) -> None:
        self.operands = operands
        self.values = values
        self.kind = kind
        self.index_name = index_name

    def __repr__(self) -> str:
        return f"<blind index search ({self.kind}) on {_describe(self.operands[0])}>"

    def self_group(self, against: Any = None) -> ColumnElement[Any]:
        return self

    def __bool__(self) -> bool:
        # SQLAlchemy tests ``column in [columns]`` (RETURNING, column collections), which calls
        # ``==`` between columns: between two searchable ones that is a join term, and it must
        # answer as a BinaryExpression does, by identity. A value term has no truth value.
        if self.kind == "join":
            return hash(self.operands[0]) == hash(self.operands[1])
        raise TypeError("Boolean value of this clause is not defined")

    def __invert__(self) -> ColumnElement[bool]:
        flipped = {"eq": "ne", "ne": "eq", "in": "not_in", "not_in": "in"}.get(self.kind)
        if flipped is None:
            raise UnsupportedQueryError("NOT of a join condition on a searchable column")
        return SearchTerm(self.operands, self.values, flipped, self.index_name)


@compiles(SearchTerm)
def _compile_term(term: SearchTerm, compiler: Any, **kw: Any) -> str:
    if compiler.dialect.name == "default":  # str(statement): show where, never the term
        return f"<blind index search on {_describe(term.operands[0])}>"
    raise _unrewritten()


def _describe(col: Any) -> str:
    table = getattr(getattr(col, "table", None), "name", "?")
    return f"{table}.{getattr(col, 'name', '?')}"


def _spec_of_column(col: Any, index_name: str) -> SearchSpec:
    column = _base_column(col)
    keys = {c.name: c.name for c in column.table.columns}
    for spec in specs_for(column.table, column, keys):
        if spec.name == index_name:
            return spec
    raise ConfigurationError(f"{_describe(column)} has no blind index {index_name!r}")


def _base_column(col: Any) -> Any:
    for c in getattr(col, "base_columns", ()) or (col,):
        if hasattr(c.type, "search"):
            return c
    return col


def make_term(expr: Any, op: Any, other: Any, index_name: str | None = None) -> Any:
    """Build the term for ``expr <op> other`` on a searchable column, or None when the
    operator is not one a blind index answers."""
    column = _base_column(expr)
    if not _is_column_itself(expr, column):
        if op in (operators.eq, operators.ne) and _is_column_peer(other):
            return None  # SQLAlchemy compares columns internally; the guard refuses it if run
        raise UnsupportedQueryError(
            f"{_describe(_searchable_in(expr))}: a blind index answers for the column itself, "
            "not for an expression over it (a function, CAST, CASE, type_coerce or label has "
            "another value, or none the index knows): compare the column, Model.col == term"
        )
    _refuse_tracked(other, column)
    names = index_names(column)
    if index_name is None:
        plain = [n for n, ix in names if ix.transform is None]
        if not plain:
            raise UnsupportedQueryError(
                f"{_describe(column)} has only derived blind indexes: search one with "
                f"{column.name}.blind('<name>') == term"
            )
        index_name = plain[0]
    elif index_name not in {n for n, _ in names}:
        raise ConfigurationError(f"{_describe(column)} has no blind index {index_name!r}")
    if op in (operators.eq, operators.ne):
        peer = other.__clause_element__() if hasattr(other, "__clause_element__") else other
        if isinstance(peer, ColumnElement) and not isinstance(peer, BindParameter):
            if op is operators.eq and getattr(peer.type, "search", None):
                return SearchTerm((expr, peer), (), "join", index_name)
            return None
        if isinstance(peer, BindParameter):
            _refuse_named(peer, column)
            peer = peer.effective_value
        if peer is None:
            return None
        return SearchTerm((expr,), (_bind(peer),), "eq" if op is operators.eq else "ne", index_name)
    if op in (operators.in_op, operators.not_in_op):
        values = list(other) if isinstance(other, (list, tuple, set, frozenset)) else None
        if values is None or any(v is None or isinstance(v, ClauseElement) for v in values):
            raise UnsupportedQueryError(
                f"{_describe(column)}: in_() on a searchable column takes a list of values "
                "(no None: test for NULL with is_(None); no subquery)"
            )
        return SearchTerm(
            (expr,),
            tuple(_bind(v) for v in values),
            "in" if op is operators.in_op else "not_in",
            index_name,
        )
    return None


def _is_column_itself(expr: Any, column: Any) -> bool:
    """The operand is a table's searchable column (or an alias' or subquery's proxy of it),
    whose value is the column's: not a function, CASE, CAST, type_coerce or label over it."""
    return isinstance(column, Column) and isinstance(getattr(expr, "table", None), FromClause)


def _is_column_peer(other: Any) -> bool:
    peer = other.__clause_element__() if hasattr(other, "__clause_element__") else other
    return isinstance(peer, ColumnElement) and not isinstance(peer, BindParameter)


def _searchable_in(expr: Any) -> Any:
    """The searchable column inside an expression, to name it in an error."""
    for node in iterate(expr):
        if isinstance(node, Column) and getattr(node.type, "search", None):
            return node
    return expr


def _refuse_named(peer: BindParameter[Any], column: Any) -> None:
    """A term holds index values of its value, computed before the statement runs. A named
    ``bindparam("key", value)`` can be given another value when executed (``{"key": other}``),
    and a ``callable_`` gives its value then: taking the construction-time value would
    silently search for the wrong one."""
    if peer.callable is not None or not (peer.unique or isinstance(peer.key, _anonymous_label)):
        raise UnsupportedQueryError(
            f"{_describe(column)}: a search term is turned into blind index values before the "
            "statement runs, so it cannot be a named bindparam() (or one with callable_) whose "
            "value is given at execution: compare with the value itself (Model.col == value), "
            "or literal(value)"
        )


def _refuse_tracked(other: Any, column: Any) -> None:
    """Inside lambda_stmt, SQLAlchemy hands a variable over as a tracker (PyWrapper) and sets
    its value anew at each execution, from a statement cached once: a term, whose index
    values are computed from the value it is built with, would search the first value (or,
    given the tracker itself, fail in the codec). Literals written in the lambda are fine."""
    from sqlalchemy.sql.lambdas import PyWrapper

    values = other if isinstance(other, (list, tuple, set, frozenset)) else (other,)
    if any(isinstance(v, PyWrapper) for v in values):
        raise UnsupportedQueryError(
            f"{_describe(column)}: a search term inside lambda_stmt() compares with a variable, "
            "whose value SQLAlchemy sets at each execution of a statement built once, while "
            "the term's index values come from the value it is built with: search with "
            "select() (or write the value as a literal in the lambda)"
        )


def _bind(value: Any) -> BindParameter[Any]:
    return BindParameter(None, value, type_=_TermType(), unique=True)


@dataclass
class _Check:
    """One post-filter: the row's entity at ``pos`` must hold a value that prepares to one of
    ``wanted``; for a join, equal to the entity at ``pos2``. ``wanted`` holds the normalized
    terms: never in a repr (error trackers that record frames' locals print reprs)."""

    pos: int
    key: str
    index: _s.BlindIndex
    wanted: frozenset[Any] | None = field(default=None, repr=False)
    pos2: int = -1
    key2: str = ""
    index2: _s.BlindIndex | None = None

    def passes(self, row: Sequence[Any]) -> bool:
        a = row[self.pos]
        if a is None:
            return self.wanted is None  # an outer join's missing side: nothing to check
        va = getattr(a, self.key)
        pa = None if va is None else self.index.prepare(va)
        if self.wanted is not None:
            return pa in self.wanted
        b = row[self.pos2]
        if b is None:
            return True
        vb = getattr(b, self.key2)
        assert self.index2 is not None
        pb = None if vb is None else self.index2.prepare(vb)
        return pa is not None and pa == pb


def has_terms(stmt: Any) -> bool:
    return any(isinstance(node, SearchTerm) for node in iterate(stmt))


def find_terms(stmt: Any) -> list[SearchTerm]:
    """The statement's search terms, in traversal order."""
    return [node for node in iterate(stmt) if isinstance(node, SearchTerm)]


def rewrite(
    cmk: Any,
    stmt: Any,
    own: Callable[[], Connection],
    *,
    orm: bool,
    streaming: bool = False,
    terms: list[SearchTerm] | None = None,
) -> tuple[Any, list[_Check] | None]:
    """The statement with every search term replaced by index comparisons, and the checks
    the loaded rows must pass (None: no checks possible, every term's index is exact).
    ``terms``: the statement's terms, when the caller has found them already."""
    if terms is None:
        terms = find_terms(stmt)
    if not terms:
        return stmt, None
    ctx = current_context()
    # One search is one access: audited once per table searched, refused or not.
    with access(cmk._keys, ctx, "search") as acc:
        for term in terms:
            for operand in term.operands[:2] if term.kind == "join" else term.operands[:1]:
                name = _table_name(operand)
                if name is not None:
                    acc.table(name, (_base_column(operand).name,))
        acc.fixed = True
        return _rewrite(cmk, stmt, terms, ctx, own, orm=orm, streaming=streaming)


def _table_name(col: Any) -> str | None:
    """The name of the table a search term's column belongs to, or None (for the audit)."""
    table = getattr(_base_column(col), "table", None)
    name = getattr(table, "name", None)
    return name if isinstance(name, str) else None


def _rewrite(
    cmk: Any,
    stmt: Any,
    terms: list[SearchTerm],
    ctx: TenantContext | None,
    own: Callable[[], Connection],
    *,
    orm: bool,
    streaming: bool,
) -> tuple[Any, list[_Check] | None]:
    if ctx is None:
        raise NoTenantError(
            "a search on an encrypted column needs a tenant: run it inside "
            "`with tenant_context(tenant_id)`"
        )
    if ctx.cross_tenant or ctx.tenant_id is None:
        raise UnsupportedQueryError(
            "a search on an encrypted column is per tenant, and cross_tenant_context() has "
            "none: search each tenant in its own tenant_context"
        )
    tenant = ctx.tenant_id
    # A revoked or unknown tenant is refused here, typed, even when it has nothing indexed.
    cmk._keys.tenant_keys(tenant)
    store: SearchStore = cmk._search
    reader = _Reader(own)
    entities = _entity_positions(stmt) if orm and not streaming else None
    top = _top_level(stmt) if entities is not None and _filterable(stmt) else set()
    checks: list[_Check] = []
    replaced: dict[int, Any] = {}
    searched: dict[str, set[str]] = {}
    for term in terms:
        col = term.operands[0]
        spec = _spec_of_column(col, term.index_name)
        specs = [spec]
        if term.kind == "join":
            peer = term.operands[1]
            spec2 = _join_spec(peer, spec)
            specs.append(spec2)
        check = _check_for(term, specs, entities, top)
        if check is None and not all(s.exact for s in specs):
            raise UnsupportedQueryError(_why_refused(term, spec, streaming, orm))
        for sp in specs:
            searched.setdefault(sp.table, set()).add(sp.column)
        state = store.state(reader, spec)
        if state.phase == "building":
            raise IndexNotReadyError(
                f"blind index {spec.table}.{spec.name} is not built yet: run `sqlalchemy-cmk "
                f"search build` (or op.build_blind_index) once every process writes it",
                table=spec.table,
                column=spec.column,
            )
        slot, version, bits = state.read
        if check is None and bits < _s.EXACT_BITS:
            # Declared exact, but the state (a rotation to a narrower width, or an edit of the
            # table) says the index read is truncated: the database may not decide alone.
            raise UnsupportedQueryError(_why_refused(term, spec, streaming, orm, bits))
        replaced[id(term)] = _replacement(
            store, reader, tenant, term, specs, slot, version, bits, ctx
        )
        if check is not None:
            if term.kind in ("eq", "in"):
                check.wanted = frozenset(spec.index.prepare(v.effective_value) for v in term.values)
                checks.append(check)
            elif term.kind == "join":
                checks.append(check)
            # ne / not_in on an exact index: the database decides; a post-check of "value not
            # in" would drop nothing a collision let in, so none is kept

    # The tenant's security team sees every search (never its term), also one that finds
    # nothing and so decrypts nothing.
    for table, cols in sorted(searched.items()):
        emit_ok(cmk._keys, ctx, "search", tenant, table=table, columns=sorted(cols))

    where = getattr(stmt, "_where_criteria", None)
    if (
        isinstance(stmt, Select)
        and where is not None
        and sum(isinstance(w, SearchTerm) for w in where) == len(terms)
    ):
        # Every term is a WHERE conjunct of its own (select(User).where(User.email == x), the
        # common case): a shallow copy with those conjuncts swapped, as .where() itself copies,
        # instead of cloning the whole statement tree.
        new = stmt._generate()
        new._where_criteria = tuple(
            replaced[id(w)] if isinstance(w, SearchTerm) else w for w in where
        )
        return new, checks

    def swap(node: Any, **kw: Any) -> Any:
        return replaced.get(id(node)) if isinstance(node, SearchTerm) else None

    return replacement_traverse(stmt, {}, swap), checks  # type: ignore[call-overload]


def _replacement(
    store: SearchStore,
    reader: _Reader,
    tenant: str,
    term: SearchTerm,
    specs: list[SearchSpec],
    slot: int,
    version: int,
    bits: int,
    ctx: TenantContext,
) -> ColumnElement[bool]:
    col = term.operands[0]
    spec = specs[0]
    # Exactly the tenant, not what the column's collation calls equal to it ('ACME' for
    # 'acme' on MySQL): a join compares stored index values, with no key of the tenant's,
    # and != matches every row of a tenant whose values were indexed under another key.
    exact = select_dialect(reader.dialect).equals_exactly
    tenant_col = _tenant_col(col)
    own_tenant = exact(tenant_col, _tenant_value(tenant_col, tenant))
    if term.kind == "join":
        peer = term.operands[1]
        return and_(
            _slot_col(col, spec, slot) == _slot_col(peer, specs[1], slot),
            own_tenant,
            exact(_tenant_col(peer), _tenant_value(_tenant_col(peer), tenant)),
        )
    codec = getattr(_base_column(col).type, "codec", None)
    hashes: list[_s.IndexValue] = []
    for v in term.values:
        found = compute(
            store,
            reader,
            tenant,
            spec,
            codec,
            v.effective_value,
            ctx,
            create=False,
            slots=[(slot, version, bits)],
        )
        if found is None:
            return false()  # the tenant has no root key: it never wrote a searchable value
        h = found[slot]
        if h is not None:
            hashes.append(h)
    target = _slot_col(col, spec, slot)
    if term.kind in ("eq", "in"):
        if not hashes:
            return false()
        if len(hashes) == 1:
            # A point lookup, the common case: "=" and not "IN (...)", which is an expanding
            # parameter that every execution re-renders into the SQL.
            return and_(own_tenant, _equals(target, hashes[0]))
        return and_(own_tenant, target.in_(hashes))
    if not hashes:
        return and_(own_tenant, target.is_not(None))
    return and_(own_tenant, target.not_in(hashes))


def _equals(col: Any, value: Any) -> ColumnElement[bool]:
    """``col = :value``, built directly: what ``col == value`` builds, without the operator
    dispatch and coercion that cost more than the rest of a point lookup's rewrite."""
    bind = BindParameter(None, value, type_=col.type, unique=True)
    return BinaryExpression(col, bind, operators.eq, type_=Boolean())


def _slot_col(col: Any, spec: SearchSpec, slot: int) -> Any:
    name = slot_columns(spec.name)[slot]
    if name not in col.table.c:
        raise _missing_from(col, f"its index columns {', '.join(slot_columns(spec.name))}")
    return col.table.c[name]


def _missing_from(col: Any, what: str) -> UnsupportedQueryError:
    # A subquery or CTE selecting the searchable column without what the search compares.
    return UnsupportedQueryError(
        f"{_describe(_base_column(col))} is searched through a subquery (or CTE) that does not "
        f"select {what}: select them in it too (the tenant column and both index columns), "
        "or search the table itself"
    )


def _tenant_col(col: Any) -> Any:
    # An aliased entity's columns are proxies that carry no info: look through to the table's.
    for c in col.table.c:
        if is_tenant_column(c) or any(is_tenant_column(b) for b in getattr(c, "base_columns", ())):
            return c
    if not isinstance(col.table, Table):
        raise _missing_from(col, "the tenant column")
    raise ConfigurationError(
        f"{_describe(col)} is searchable, so its table needs a tenant column: declare it with "
        "sqlalchemy_cmk.tenant_column()"
    )


def _tenant_value(col: Any, tenant: str) -> Any:
    try:
        python = col.type.python_type
    except NotImplementedError:
        return tenant
    if python is int:
        return int(tenant)
    return tenant


def _join_spec(peer: Any, spec: SearchSpec) -> SearchSpec:
    column = _base_column(peer)
    keys = {c.name: c.name for c in column.table.columns}
    for other in specs_for(column.table, column, keys):
        if other.domain == spec.domain:
            return other
    raise UnsupportedQueryError(
        f"{_describe(column)} and {spec.table}.{spec.column} do not share a blind index "
        "domain: declare BlindIndex(domain=...) alike on both to join them"
    )


def _why_refused(
    term: SearchTerm, spec: SearchSpec, streaming: bool, orm: bool, bits: int | None = None
) -> str:
    where = (
        "a streamed result (yield_per)"
        if streaming
        else "a Core statement"
        if not orm
        else "this position (an OR, NOT, subquery, LIMIT/OFFSET, COUNT, DISTINCT, GROUP BY, "
        "an outer join, or a select that does not return the whole entity)"
    )
    return (
        f"{spec.table}.{spec.column}'s blind index {spec.name!r} is truncated to "
        f"{spec.index.width if bits is None else bits} bits, so values collide by design, and "
        f"in {where} the database "
        "would decide the result from the index alone. A truncated index is searched in "
        "select(Model).where(Model.col == term) (and in_, filter_by, inner joins), whose rows "
        f"are checked after decryption; declare bits >= {_s.EXACT_BITS} for an exact index, "
        "usable anywhere. Nothing was sent"
    )


def _entity_positions(stmt: Any) -> dict[Any, int] | None:
    """Row position of each whole entity a select returns, by its mapper or alias."""
    descs = getattr(stmt, "column_descriptions", None)
    if not descs or not hasattr(stmt, "_raw_columns"):
        return None
    out: dict[Any, int] = {}
    for i, desc in enumerate(descs):
        expr = desc.get("expr")
        entity = desc.get("entity")
        if expr is None or entity is None or expr is not entity:
            continue
        found = sa_inspect(expr, raiseerr=False)
        if found is not None:
            out[found] = i
    return out


def _filterable(stmt: Any) -> bool:
    """A select whose rows are exactly the matching rows, each checkable after decryption."""
    return (
        getattr(stmt, "_limit_clause", None) is None
        and getattr(stmt, "_offset_clause", None) is None
        and not getattr(stmt, "_fetch_clause", None)
        and not getattr(stmt, "_group_by_clauses", ())
        and not getattr(stmt, "_having_criteria", ())
        and not getattr(stmt, "_distinct", False)
    )


def _top_level(stmt: Any) -> set[int]:
    """Terms that are conjuncts of the WHERE clause, or of an inner join's ON clause."""
    found: set[int] = set()
    stack = list(getattr(stmt, "_where_criteria", ()))
    for _target, onclause, _from, flags in getattr(stmt, "_setup_joins", ()):
        if onclause is not None and not flags.get("isouter") and not flags.get("full"):
            stack.append(onclause)
    while stack:
        node = stack.pop()
        if isinstance(node, SearchTerm):
            found.add(id(node))
        elif isinstance(node, BooleanClauseList) and node.operator is operators.and_:
            stack.extend(node.clauses)
        elif hasattr(node, "element") and type(node).__name__ == "Grouping":
            stack.append(node.element)
    return found


def _check_for(
    term: SearchTerm,
    specs: list[SearchSpec],
    entities: dict[Any, int] | None,
    top: set[int],
) -> _Check | None:
    if entities is None or id(term) not in top or term.kind in ("ne", "not_in"):
        return None
    positions = []
    for col in term.operands:
        parent = col._annotations.get("parententity") if hasattr(col, "_annotations") else None
        if parent is None or parent not in entities:
            return None
        key = _attr_key(parent, col)
        if key is None:
            return None
        positions.append((entities[parent], key))
    if term.kind == "join":
        return _Check(
            positions[0][0],
            positions[0][1],
            specs[0].index,
            None,
            positions[1][0],
            positions[1][1],
            specs[1].index,
        )
    return _Check(positions[0][0], positions[0][1], specs[0].index)


def _attr_key(parent: Any, col: Any) -> str | None:
    mapper = getattr(parent, "mapper", parent)
    try:
        return str(mapper.get_property_by_column(_base_column(col)).key)
    except Exception:
        return None


def filter_rows(checks: list[_Check], frozen: Any) -> Any:
    """The frozen result without the rows a check fails: matches by index collision."""
    if not checks:
        return frozen
    scalars = frozen._source_supports_scalars
    rows = [(d,) if scalars else d for d in frozen.data]
    kept = [r for r in rows if all(c.passes(r) for c in checks)]
    if len(kept) == len(rows):
        return frozen
    new = object.__new__(type(frozen))
    new.__dict__.update(frozen.__dict__)
    new.data = [r[0] for r in kept] if scalars else kept
    return new


def listen_tenant_columns(column: Column[Any]) -> None:
    event.listen(column, "after_parent_attach", on_tenant_attach)
