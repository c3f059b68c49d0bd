"""The engine behind the Alembic operations and the CLI: online, resumable, parallel backfills.

How a text column is encrypted in place, online:

1. The companion column (``cmk_edek``, binary, nullable) is added if missing
   (:func:`ensure_companion`).
2. The application is deployed with the column declared
   ``EncryptedType(Text, storage="text", allow_plaintext=True)``: it reads both plaintext (rows
   not yet done) and ciphertext (``cmk:`` + base64), and encrypts everything it writes.
3. :func:`encrypt_columns` walks the table by primary key in batches, each batch in its own
   transaction: it selects rows whose value is not NULL and does not start with ``cmk:``
   (PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so several workers partition the work with no
   coordinator), seals them under *each row's own tenant* (from ``tenant_column``, by default
   the column the model declares with ``sqlalchemy_cmk.tenant_column()``), and updates
   with compare-and-swap (``WHERE pk = :pk AND col = :old AND cmk_edek IS NOT DISTINCT FROM
   :old_companion``), so a concurrent application write is never overwritten with stale data.
   Rows that already have a companion (another column was encrypted before) keep its row id and
   data key. Memory is bounded by the batch size. Progress lives in the data itself (the marker),
   so a killed run is finished by running it again, and a finished run does nothing. After the
   walk, passes repeat from the start until one finds no plaintext row (rows another worker held,
   or lost compare-and-swaps); on PostgreSQL the last pass waits for locked rows instead of
   skipping them, so a call returns only when no plaintext row is left.
4. :func:`verify` decrypts every row (or a sample) and reports ok / plaintext / failed by tenant.
5. The application drops ``allow_plaintext``.

All functions take an ``Engine`` (batches need their own transactions; Alembic operations pass
the migration connection's engine after committing the schema change) and a ``CMK``; they read
every tenant's rows under ``cross_tenant_context`` semantics and write each row under the
``tenant_context`` of its own tenant, so each tenant's KMS and audit trail see the access.

Limits:

* The table needs a single-column primary key (the walk's cursor); composite keys raise
  ``ConfigurationError``.
* Only text columns (``TEXT``, or ``VARCHAR`` without a length) can be encrypted in place: the
  stored form is a third longer than the value plus about 45 characters.
* A plaintext value that itself starts with ``cmk:`` cannot be told from ciphertext: the walk
  leaves it alone, :func:`status` counts it as encrypted and :func:`verify` reports it failed.
* :func:`rotate_data_keys` gives rows a new companion, so ``columns`` must name *every* encrypted
  column of the table; run it in one worker.
"""

from __future__ import annotations

import base64
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import (
    Column,
    ColumnElement,
    Engine,
    LargeBinary,
    MetaData,
    Table,
    Text,
    and_,
    bindparam,
    case,
    func,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import types as sqltypes
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from sqlalchemy_cmk import CMK, TenantContext, _format
from sqlalchemy_cmk._mapping import TableSpec, is_tenant_column, table_spec
from sqlalchemy_cmk.errors import (
    CMKError,
    ConfigurationError,
    DecryptionError,
    TenantMismatchError,
)
from sqlalchemy_cmk.types import TEXT_MARKER, EDEKType, EncryptedType, _from_text

__all__ = [
    "Models",
    "Progress",
    "Report",
    "StatusReport",
    "VerifyReport",
    "decrypt_columns",
    "encrypt_columns",
    "ensure_companion",
    "resolve_tenant_column",
    "rewrap_keys",
    "rotate_data_keys",
    "status",
    "verify",
]


@dataclass(frozen=True)
class Progress:
    """Passed to a progress callback after every batch."""

    operation: str  # "encrypt", "decrypt", "rewrap", "rotate", "verify"
    table: str
    done: int  # rows changed (or checked) so far by this call
    total: int | None  # rows to do when the call started (an estimate under concurrency)
    elapsed: float  # seconds since the call started


ProgressCallback = Callable[[Progress], None]


@dataclass
class Report:
    """What one call of a backfill did."""

    operation: str
    table: str
    columns: tuple[str, ...]
    rows: int = 0  # rows changed by this call
    conflicts: int = 0  # compare-and-swap losses (retried in a later pass)
    batches: int = 0
    passes: int = 0
    seconds: float = 0.0
    by_tenant: dict[str, int] = field(default_factory=dict)


@dataclass
class VerifyReport:
    """Counts of rows by tenant; ``ok`` is true when nothing failed.

    A row counts once: ``failed`` if any value of it did not decrypt (or its tenant column
    disagrees with its EDEK), else ``plaintext`` if any value is still plaintext, else
    ``encrypted_ok``. Rows whose columns are all NULL are not checked. ``failures`` lists the
    first 1,000 failed rows (the counts are always complete).
    """

    table: str
    columns: tuple[str, ...]
    checked: int = 0
    encrypted_ok: dict[str, int] = field(default_factory=dict)
    plaintext: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)  # tenant -> rows that did not decrypt
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (pk, tenant, error type)

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class StatusReport:
    """Counts per column without decrypting: plaintext, encrypted, NULL."""

    table: str
    counts: dict[str, dict[str, int]]  # column -> {"plaintext": n, "encrypted": n, "null": n}


_SPLIT = 1 + _format.ROW_ID_SIZE  # companion = version | row id | envelope
_MARKER_LEN = len(TEXT_MARKER)
_MAX_FAILURES_LISTED = 1000
_ENVELOPE_MEMO = 4096  # rewrap: old envelope -> new, LRU
_RETRIES = 5
# PostgreSQL: deadlock, serialization failure, lock not available. Retried with a fresh batch.
_TRANSIENT_SQLSTATES = frozenset({"40P01", "40001", "55P03"})
_NULL_TENANT = "(null)"

_T = TypeVar("_T")


# -- the tenant column: given, or declared by the model --------------------------------------

#: The application's models, where :func:`resolve_tenant_column` finds a declared tenant column:
#: a ``MetaData``, a declarative base (anything with a ``.metadata``), one ``Table``, or a
#: sequence of ``MetaData`` (as Alembic's ``target_metadata`` may be).
Models = MetaData | Table | type | Sequence[MetaData]


def resolve_tenant_column(
    table: str,
    tenant_column: str | None = None,
    *,
    metadata: Models | None = None,
    schema: str | None = None,
) -> str:
    """The column that holds each row of ``table``'s tenant: ``tenant_column`` if given, else
    the one its model declares with :func:`sqlalchemy_cmk.tenant_column`.

    The one place every migration tool gets its tenant column from: the functions of this
    module (``metadata=``), the Alembic operations (Alembic's ``target_metadata``) and the CLI
    (``--metadata``). An explicit ``tenant_column`` that contradicts the declaration is refused:
    a wrong column would seal rows under other tenants' keys, silently.

    Args:
        table: The table name.
        tenant_column: The column named by the caller, if any.
        metadata: The models (see :data:`Models`); ``table`` is looked up by name and
            ``schema`` (with ``schema=None``, also in the ``MetaData``'s own default schema).
        schema: The table's schema, if not the default.

    Raises:
        ConfigurationError: none given and none declared (says what to pass); the one given
            contradicts the declared one; the model declares two; ``metadata`` is neither of
            the kinds above, or a ``Table`` other than ``table``.
    """
    where = f"{schema}.{table}" if schema else table
    model, why = _model_table(table, schema, metadata)
    declared = None
    if model is not None:
        names = [c.name for c in model.columns if is_tenant_column(c)]
        if len(names) > 1:
            raise ConfigurationError(
                f"the model of {where!r} declares {len(names)} tenant columns {names!r}: "
                "declare exactly one with sqlalchemy_cmk.tenant_column()",
                table=table,
            )
        declared = names[0] if names else None
        why = f"its model declares none (columns: {sorted(model.columns.keys())})"
    if tenant_column is None:
        if declared is None:
            raise ConfigurationError(
                f"table {where!r}: which column holds each row's tenant id? Pass "
                'tenant_column="..." (CLI: --tenant-column NAME), or declare it on the model '
                "(tenant_id: Mapped[str] = sqlalchemy_cmk.tenant_column()) so the migration "
                f"tools use it by default; {why}",
                table=table,
            )
        return declared
    if declared is not None and tenant_column != declared:
        raise ConfigurationError(
            f"tenant_column={tenant_column!r} contradicts the model of {where!r}, which "
            f"declares {declared!r} as its tenant column; rows would be sealed under the "
            f"tenants named in the wrong column. Drop tenant_column= (the declared one is the "
            "default) or fix the model",
            table=table,
            column=tenant_column,
        )
    return tenant_column


def _model_table(
    table: str, schema: str | None, metadata: Models | None
) -> tuple[Table | None, str]:
    """The model's ``Table`` for ``table`` (or None, and why not)."""
    where = f"{schema}.{table}" if schema else table
    if metadata is None:
        return None, (
            "no models were given (metadata=Base; in Alembic, target_metadata in env.py; "
            "CLI: --metadata MODULE:Base)"
        )
    if isinstance(metadata, Table):
        # A Table given for another table would lend it a wrong tenant column.
        if metadata.name != table or (schema is not None and metadata.schema != schema):
            raise ConfigurationError(
                f"metadata= is the table {metadata.fullname!r}, not {where!r}: pass the "
                "table's own Table, or the MetaData or declarative base holding it",
                table=table,
            )
        return metadata, ""
    sources = list(metadata) if isinstance(metadata, list | tuple) else [metadata]
    for source in sources:
        md = source if isinstance(source, MetaData) else getattr(source, "metadata", None)
        if not isinstance(md, MetaData):
            raise ConfigurationError(
                "metadata= takes a MetaData, a declarative base or a Table, "
                f"not {type(source).__name__}",
                table=table,
            )
        keys = [where]
        if schema is None and md.schema is not None:
            keys.append(f"{md.schema}.{table}")
        for key in keys:
            if key in md.tables:
                return md.tables[key], ""
    return None, f"the models given have no table {where!r}"


# -- the target table ------------------------------------------------------------------------


@dataclass(eq=False)
class _Target:
    """The parts of the user's table a backfill touches, as private Core tables.

    ``raw`` has plain ``Text``/``LargeBinary`` columns (the SQL reads and writes stored text
    as is); ``spec`` describes the same columns as encrypted, for ``CMK.seal``/``CMK.open``.
    """

    name: str
    raw: Table
    spec: TableSpec | None
    spec_table: Table
    pk: Column[Any]
    tenant: Column[Any] | None
    cols: tuple[Column[Any], ...]
    companion: Column[Any] | None
    postgresql: bool

    def label(self) -> str:
        return f"{self.raw.schema}.{self.name}" if self.raw.schema else self.name


def _target(
    engine: Engine,
    table: str,
    columns: Sequence[str],
    *,
    tenant_column: str | None,
    companion_column: str | None,
    schema: str | None,
    for_encrypt: bool = False,
    metadata: Models | None = None,
    with_tenant: bool = True,
) -> _Target:
    where = f"{schema}.{table}" if schema else table
    if isinstance(columns, str):
        raise ConfigurationError("columns must be a list of column names, not a str", table=table)
    if not columns:
        raise ConfigurationError("give at least one column", table=table)
    if len(set(columns)) != len(columns):
        raise ConfigurationError(f"columns {list(columns)!r} name a column twice", table=table)
    if with_tenant:  # every operation but status(): rows are sealed or opened per tenant
        tenant_column = resolve_tenant_column(
            table, tenant_column, metadata=metadata, schema=schema
        )
    insp = sa_inspect(engine)
    if not insp.has_table(table, schema=schema):
        raise ConfigurationError(
            f"table {where!r} does not exist (check the name and schema=)", table=table
        )
    reflected = {c["name"]: c for c in insp.get_columns(table, schema=schema)}
    pk_names = insp.get_pk_constraint(table, schema=schema).get("constrained_columns") or []
    if len(pk_names) != 1:
        raise ConfigurationError(
            f"table {where!r} has "
            + ("no primary key" if not pk_names else f"a composite primary key {pk_names!r}")
            + ": the backfill walks a single-column primary key; add one (e.g. a serial or "
            "UUID column) or encrypt the table from application code",
            table=table,
        )
    pk_name = pk_names[0]
    for name in columns:
        info = reflected.get(name)
        if info is None:
            raise ConfigurationError(
                f"table {where!r} has no column {name!r}; its columns: {sorted(reflected)}",
                table=table,
                column=name,
            )
        typ = info["type"]
        if not isinstance(typ, sqltypes.String):
            raise ConfigurationError(
                f"{where}.{name} is {typ!r}, not a text column: only text columns can be "
                "encrypted in place (EncryptedType(Text, storage='text')); for other types add "
                "a new EncryptedType column and copy the values in application code",
                table=table,
                column=name,
            )
        if for_encrypt and getattr(typ, "length", None) is not None:
            raise ConfigurationError(
                f"{where}.{name} is {typ!r}, limited in length, and an "
                "encrypted value is a third longer plus about 45 characters: change the column "
                "to TEXT first (ALTER TABLE ... ALTER COLUMN ... TYPE TEXT; in a migration "
                "op.alter_column(table, column, type_=sa.Text()))",
                table=table,
                column=name,
            )
        if name == pk_name:
            raise ConfigurationError(
                f"{where}.{name} is the primary key; it cannot be encrypted", table=table
            )
    if tenant_column is not None:
        if tenant_column not in reflected:
            raise ConfigurationError(
                f"table {where!r} has no tenant column {tenant_column!r}: pass "
                f"tenant_column= naming the column that holds each row's tenant id; "
                f"columns: {sorted(reflected)}",
                table=table,
                column=tenant_column,
            )
        if tenant_column in columns:
            raise ConfigurationError(
                f"the tenant column {tenant_column!r} cannot itself be encrypted: the row's "
                "tenant must be readable to pick its key",
                table=table,
                column=tenant_column,
            )
    if companion_column is not None:
        if companion_column not in reflected:
            raise ConfigurationError(
                f"table {where!r} has no companion column {companion_column!r}: add it first "
                "with migrations_helpers.backfill.ensure_companion() (op.encrypt_column adds it "
                "itself), or pass companion_column= if it has another name",
                table=table,
                column=companion_column,
            )
        if companion_column in columns or companion_column == tenant_column:
            raise ConfigurationError(
                f"{companion_column!r} is the companion column; it cannot be one of the "
                "encrypted or tenant columns",
                table=table,
                column=companion_column,
            )
        if not isinstance(reflected[companion_column]["type"], sqltypes._Binary):
            raise ConfigurationError(
                f"{where}.{companion_column} is {reflected[companion_column]['type']!r}; the "
                "companion column must be binary (BYTEA, BLOB)",
                table=table,
                column=companion_column,
            )

    raw_cols: list[Column[Any]] = [Column(pk_name, reflected[pk_name]["type"], primary_key=True)]
    if tenant_column is not None:
        raw_cols.append(Column(tenant_column, reflected[tenant_column]["type"]))
    raw_cols += [Column(name, Text()) for name in columns]
    if companion_column is not None:
        raw_cols.append(Column(companion_column, LargeBinary()))
    raw = Table(table, MetaData(), *raw_cols, schema=schema)

    spec_cols: list[Column[Any]] = [Column(pk_name, reflected[pk_name]["type"], primary_key=True)]
    spec_cols += [Column(name, EncryptedType(Text, storage="text")) for name in columns]
    if companion_column is not None:
        spec_cols.append(Column(companion_column, EDEKType()))
    spec_table = Table(table, MetaData(), *spec_cols, schema=schema)
    spec = table_spec(spec_table) if companion_column is not None else None
    return _Target(
        name=table,
        raw=raw,
        spec=spec,
        spec_table=spec_table,
        pk=raw.c[pk_name],
        tenant=raw.c[tenant_column] if tenant_column is not None else None,
        cols=tuple(raw.c[name] for name in columns),
        companion=raw.c[companion_column] if companion_column is not None else None,
        postgresql=engine.dialect.name == "postgresql",
    )


# -- helpers ---------------------------------------------------------------------------------


def _is_encrypted(col: ColumnElement[Any]) -> ColumnElement[bool]:
    # substr, not LIKE: SQLite's LIKE ignores case, and "CMK:..." is plaintext.
    return func.substr(col, 1, _MARKER_LEN) == TEXT_MARKER


def _is_plaintext(col: ColumnElement[Any]) -> ColumnElement[bool]:
    return func.substr(col, 1, _MARKER_LEN) != TEXT_MARKER  # NULL is neither


def _to_text(ciphertext: bytes) -> str:
    return TEXT_MARKER + base64.b64encode(ciphertext).decode("ascii")


def _as_bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _tenant_of(value: Any) -> str:
    return _NULL_TENANT if value is None else str(value)


def _pk_repr(value: Any) -> str:
    return repr(value)


def _require_tenant(tgt: _Target, pk: Any, tenant: Any) -> str:
    if tenant is None:
        assert tgt.tenant is not None
        raise ConfigurationError(
            f"row {_pk_repr(pk)} of {tgt.label()!r} has no tenant (its {tgt.tenant.name} is "
            "NULL), so there is no key to encrypt it under: set the row's tenant, or delete it",
            table=tgt.name,
        )
    return str(tenant)


def _envelope_tenant(companion: bytes, memo: dict[bytes, str]) -> str:
    env = companion[_SPLIT:]
    tenant = memo.get(env)
    if tenant is None:
        _format.split_companion(companion)
        tenant = memo[env] = _format.parse_envelope(env).tenant
    return tenant


def _check_row_tenant(
    tgt: _Target, pk: Any, tenant: str, companion: bytes, memo: dict[bytes, str]
) -> None:
    owner = _envelope_tenant(companion, memo)
    if owner != tenant:
        assert tgt.tenant is not None
        raise TenantMismatchError(
            f"row {_pk_repr(pk)} of {tgt.label()!r} says tenant {tenant!r} in "
            f"{tgt.tenant.name} but its EDEK belongs to tenant {owner!r}: the tenant column "
            "was changed after the row was encrypted, or the EDEK was copied from another row; "
            "investigate the row (verify() lists all such rows) before continuing",
            row_tenant=owner,
            tenant=tenant,
            table=tgt.name,
        )


def _check_batch_args(batch_size: int, max_batches: int | None = None) -> None:
    if batch_size < 1:
        raise ConfigurationError(f"batch_size must be at least 1, not {batch_size}")
    if max_batches is not None and max_batches < 0:
        raise ConfigurationError(f"max_batches must be >= 0, not {max_batches}")


def _transient(exc: DBAPIError) -> bool:
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in _TRANSIENT_SQLSTATES:
        return True
    return "database is locked" in str(orig)


def _in_transaction(engine: Engine, work: Callable[[Connection], _T]) -> _T:
    """Run ``work`` in its own transaction, retrying deadlocks and lock timeouts."""
    attempt = 0
    while True:
        attempt += 1
        try:
            with engine.begin() as conn:
                return work(conn)
        except DBAPIError as exc:
            if attempt >= _RETRIES or not _transient(exc):
                raise
            time.sleep(0.05 * 2**attempt)


def _count(tally: dict[str, int], tenant: str, n: int = 1) -> None:
    tally[tenant] = tally.get(tenant, 0) + n


class _Batch:
    """The compare-and-swap updates of one batch, in one executemany.

    Each row gets its old values (all CAS-compared) and new values; ``marks`` holds, per row,
    one (column index, new value) pair that only this write can have produced, to tell which
    rows won when some compare-and-swaps lost.
    """

    def __init__(self, tgt: _Target) -> None:
        self.tgt = tgt
        self.params: list[dict[str, Any]] = []
        self.tenants: list[str] = []
        self.marks: list[tuple[int, Any]] = []

    def add(
        self,
        pk: Any,
        tenant_raw: Any,
        old: Sequence[Any],
        new: Sequence[Any],
        old_companion: bytes | None,
        new_companion: bytes | None,
        tenant: str,
        mark: tuple[int, Any],
    ) -> None:
        p: dict[str, Any] = {"_k": pk, "_oe": old_companion, "_ne": new_companion}
        if self.tgt.tenant is not None:
            p["_t"] = tenant_raw
        for i, (o, n) in enumerate(zip(old, new, strict=True)):
            p[f"_o{i}"] = o
            p[f"_n{i}"] = n
        self.params.append(p)
        self.tenants.append(tenant)
        self.marks.append(mark)

    def statement(self) -> Any:
        tgt = self.tgt
        assert tgt.companion is not None
        conds: list[ColumnElement[bool]] = [tgt.pk == bindparam("_k")]
        if tgt.tenant is not None:
            conds.append(tgt.tenant == bindparam("_t"))
        conds += [c.is_not_distinct_from(bindparam(f"_o{i}")) for i, c in enumerate(tgt.cols)]
        conds.append(tgt.companion.is_not_distinct_from(bindparam("_oe")))
        values: dict[Any, Any] = {c: bindparam(f"_n{i}") for i, c in enumerate(tgt.cols)}
        values[tgt.companion] = bindparam("_ne")
        return update(tgt.raw).where(and_(*conds)).values(values)

    def apply(self, conn: Connection, report: Report) -> None:
        if not self.params:
            return
        result = conn.execute(self.statement(), self.params)
        changed = result.rowcount
        n = len(self.params)
        if changed == n:
            for t in self.tenants:
                _count(report.by_tenant, t)
        else:
            # Some compare-and-swaps lost to concurrent writes: find which rows are ours (a mark
            # is a fresh ciphertext or companion, which no other writer can have stored, or a
            # decrypted plaintext, which the application, writing ciphertext, cannot store).
            tgt = self.tgt
            assert tgt.companion is not None
            pks = [p["_k"] for p in self.params]
            stmt = select(tgt.pk, *tgt.cols, tgt.companion).where(tgt.pk.in_(pks))
            now = {r[0]: r[1:] for r in conn.execute(stmt).all()}
            changed = 0
            for p, t, (i, value) in zip(self.params, self.tenants, self.marks, strict=True):
                current = now.get(p["_k"])
                if current is not None and _same(current[i], value):
                    changed += 1
                    _count(report.by_tenant, t)
        report.rows += changed
        report.conflicts += n - changed


def _same(stored: Any, value: Any) -> bool:
    if isinstance(value, bytes) and stored is not None:
        return bytes(stored) == value
    return bool(stored == value)


def _merge(report: Report, part: Report) -> None:
    report.rows += part.rows
    report.conflicts += part.conflicts
    for t, n in part.by_tenant.items():
        _count(report.by_tenant, t, n)


def _walk(
    engine: Engine,
    tgt: _Target,
    report: Report,
    *,
    pending: ColumnElement[bool],
    handle: Callable[[Connection, Sequence[Any], Report], None],
    params: Callable[[], Mapping[str, Any]] = dict,
    batch_size: int,
    max_batches: int | None,
    progress: ProgressCallback | None,
    started: float,
    total: int | None,
) -> None:
    """Walk the rows matching ``pending`` by primary key, one transaction per batch, in passes
    until a pass finds nothing. ``handle`` updates a batch inside its transaction and counts
    into the report it is given, merged into ``report`` once the transaction committed.

    On PostgreSQL, batches are claimed with ``FOR UPDATE SKIP LOCKED``; once a pass finds
    nothing, a confirming pass uses plain ``FOR UPDATE`` (it waits for rows others hold, then
    sees their new values), so returning means nothing pending is left. Only an empty batch
    ends a pass: after waiting for a lock, PostgreSQL may return fewer rows than the limit.
    """
    assert tgt.companion is not None
    selected = [tgt.pk] + ([tgt.tenant] if tgt.tenant is not None else [])
    selected += [*tgt.cols, tgt.companion]
    base = select(*selected).order_by(tgt.pk).limit(batch_size)
    first, after = base.where(pending), base.where(pending, tgt.pk > bindparam("_last"))
    skip = tgt.postgresql
    while True:
        report.passes += 1
        found = 0
        last: Any = None
        if tgt.postgresql:
            stmts = (
                first.with_for_update(skip_locked=skip),
                after.with_for_update(skip_locked=skip),
            )
        else:
            stmts = (first, after)
        while True:
            if max_batches is not None and report.batches >= max_batches:
                return

            def batch(conn: Connection, last: Any = last, stmts: Any = stmts) -> Any:
                p = dict(params())
                if last is None:
                    rows = conn.execute(stmts[0], p).all()
                else:
                    p["_last"] = last
                    rows = conn.execute(stmts[1], p).all()
                part = Report(report.operation, report.table, report.columns)
                if rows:
                    handle(conn, rows, part)
                return (rows[-1][0] if rows else None), len(rows), part

            last_pk, n, part = _in_transaction(engine, batch)
            if not n:
                break
            _merge(report, part)
            found += n
            last = last_pk
            report.batches += 1
            if progress is not None:
                progress(Progress(report.operation, tgt.name, report.rows, total, _now() - started))
        if found == 0:
            if skip:
                skip = False  # confirm, waiting for rows held by others
                continue
            return


def _now() -> float:
    return time.monotonic()


def _total(engine: Engine, tgt: _Target, pending: ColumnElement[bool]) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(select(func.count()).select_from(tgt.raw).where(pending)).scalar_one()
        )


def _cross(actor: str) -> TenantContext:
    return TenantContext(tenant_id=None, actor=actor, cross_tenant=True)


def _open_rows(
    cmk: CMK, tgt: _Target, dicts: list[dict[str, Any]], pks: Sequence[Any], ctx: TenantContext
) -> None:
    """Decrypt rows in place; a value that fails to decrypt is raised naming its row."""
    assert tgt.spec is not None
    spec = tgt.spec
    try:
        cmk.open(dicts, [spec] * len(dicts), ctx)
    except DecryptionError as exc:
        for d, pk in zip(dicts, pks, strict=True):
            try:
                cmk.open([dict(d)], [spec], ctx)
            except DecryptionError:
                raise DecryptionError(
                    f"row {_pk_repr(pk)} of {tgt.label()!r} did not decrypt ({exc}); nothing "
                    "of its batch was written: run verify() for a full report",
                    table=tgt.name,
                ) from exc
        raise


# -- public API ------------------------------------------------------------------------------


def ensure_companion(
    engine: Engine, table: str, *, companion_column: str = "cmk_edek", schema: str | None = None
) -> bool:
    """Add the companion column if it is missing; return True if it was added.

    The column is binary (``BYTEA``/``BLOB``) and nullable: NULL means "never encrypted".
    Safe to run from several workers at once (a concurrent add is not an error).

    Raises:
        ConfigurationError: the table does not exist.
    """
    where = f"{schema}.{table}" if schema else table
    insp = sa_inspect(engine)
    if not insp.has_table(table, schema=schema):
        raise ConfigurationError(f"table {where!r} does not exist", table=table)
    if any(c["name"] == companion_column for c in insp.get_columns(table, schema=schema)):
        return False
    prep = engine.dialect.identifier_preparer
    name = prep.format_table(Table(table, MetaData(), schema=schema))
    sql_type = LargeBinary().compile(dialect=engine.dialect)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(f"ALTER TABLE {name} ADD COLUMN {prep.quote(companion_column)} {sql_type}")
            )
    except DBAPIError:
        insp = sa_inspect(engine)
        if any(c["name"] == companion_column for c in insp.get_columns(table, schema=schema)):
            return False  # another worker added it first
        raise
    return True


def encrypt_columns(
    engine: Engine,
    cmk: CMK,
    table: str,
    columns: Sequence[str],
    *,
    tenant_column: str | None = None,
    metadata: Models | None = None,
    companion_column: str = "cmk_edek",
    schema: str | None = None,
    batch_size: int = 1000,
    progress: ProgressCallback | None = None,
    actor: str = "sqlalchemy-cmk migration",
    max_batches: int | None = None,
) -> Report:
    """Encrypt, in place, every plaintext value of the text ``columns`` (see module docstring).

    Each batch is one ``SELECT`` and one ``executemany`` ``UPDATE`` in one transaction; rows
    are sealed per tenant (one ``CMK.seal`` per tenant of the batch, so one KMS wrap per tenant
    and write-key window). ``max_batches`` stops early (for tests and for spreading work); the
    next call resumes. Run it from as many processes as you like on PostgreSQL; on SQLite, one.

    Each row is sealed under the tenant named in its ``tenant_column``; without one, the column
    the model declares with :func:`sqlalchemy_cmk.tenant_column`, found in ``metadata`` (a
    ``MetaData``, a declarative base or the ``Table``; see :func:`resolve_tenant_column`). The
    other functions here take the two arguments alike.

    Returns:
        What this call did: ``rows`` it encrypted (by tenant), compare-and-swap ``conflicts``
        (rows an application write changed in between: left to the application's value, and
        picked up by a later pass if still plaintext), ``batches`` and ``passes``.

    Raises:
        ConfigurationError: unknown table or column, no companion column, a composite primary
            key, a non-text or length-limited column, a row whose tenant column is NULL; no
            tenant column given or declared, or one given that contradicts the declared one.
        TenantNotConfiguredError: a row's tenant has no key (names the tenant); nothing of that
            batch is written, earlier batches stay done.
        TenantMismatchError: a row's existing EDEK belongs to another tenant than its tenant
            column says.
        KeyAccessError: a tenant's KMS refused or failed; nothing of that batch is written.
    """
    _check_batch_args(batch_size, max_batches)
    started = _now()
    tgt = _target(
        engine,
        table,
        columns,
        tenant_column=tenant_column,
        companion_column=companion_column,
        schema=schema,
        metadata=metadata,
        for_encrypt=True,
    )
    assert tgt.spec is not None
    spec = tgt.spec
    report = Report("encrypt", table, tuple(columns))
    pending = or_(*(_is_plaintext(c) for c in tgt.cols))
    total = _total(engine, tgt, pending) if progress is not None else None
    ncols = len(tgt.cols)
    memo: dict[bytes, str] = {}

    def handle(conn: Connection, rows: Sequence[Any], part: Report) -> None:
        groups: dict[str, list[int]] = {}
        dicts: list[dict[str, Any]] = []
        olds: list[tuple[Any, ...]] = []
        comps: list[bytes | None] = []
        for i, row in enumerate(rows):
            pk, tenant_raw = row[0], row[1]
            tenant = _require_tenant(tgt, pk, tenant_raw)
            old = tuple(row[2 : 2 + ncols])
            comp = _as_bytes(row[-1])
            d: dict[str, Any] = {}
            has_cipher = False
            for c, v in zip(tgt.cols, old, strict=True):
                if v is None:
                    continue
                if v.startswith(TEXT_MARKER):
                    has_cipher = True
                else:
                    d[c.name] = v
            if comp is None and has_cipher:
                raise DecryptionError(
                    f"row {_pk_repr(pk)} of {tgt.label()!r} holds encrypted values but its "
                    "EDEK column is NULL: the row cannot be decrypted; restore its EDEK or "
                    "its values before continuing",
                    table=tgt.name,
                )
            if comp is not None:
                _check_row_tenant(tgt, pk, tenant, comp, memo)
            groups.setdefault(tenant, []).append(i)
            dicts.append(d)
            olds.append(old)
            comps.append(comp)
        # Seal every tenant's rows before writing any: a failure writes nothing of the batch.
        sealed: list[tuple[list[Any], bytes | None]] = [([], None)] * len(rows)
        for tenant, idx in groups.items():
            ctx = TenantContext(tenant_id=tenant, actor=actor)
            new_comps, cts = cmk.seal(
                [dicts[i] for i in idx],
                [spec] * len(idx),
                [spec.columns] * len(idx),
                [comps[i] for i in idx],
                ctx,
            )
            k = 0
            for i, new_comp in zip(idx, new_comps, strict=True):
                new = list(olds[i])
                for j, cs in enumerate(spec.columns):
                    if cs.name in dicts[i]:
                        new[j] = _to_text(cts[k])
                        k += 1
                sealed[i] = (new, new_comp)
        batch = _Batch(tgt)
        for i, row in enumerate(rows):
            new, new_comp = sealed[i]
            if not dicts[i]:
                continue  # nothing to seal (cannot happen: the row matched as plaintext)
            j = next(j for j, cs in enumerate(spec.columns) if cs.name in dicts[i])
            batch.add(
                row[0],
                row[1],
                olds[i],
                new,
                comps[i],
                new_comp if new_comp is not None else comps[i],
                str(row[1]),
                (j, new[j]),
            )
        batch.apply(conn, part)

    _walk(
        engine,
        tgt,
        report,
        pending=pending,
        handle=handle,
        batch_size=batch_size,
        max_batches=max_batches,
        progress=progress,
        started=started,
        total=total,
    )
    report.seconds = _now() - started
    return report


def decrypt_columns(
    engine: Engine,
    cmk: CMK,
    table: str,
    columns: Sequence[str],
    *,
    tenant_column: str | None = None,
    metadata: Models | None = None,
    companion_column: str = "cmk_edek",
    schema: str | None = None,
    batch_size: int = 1000,
    progress: ProgressCallback | None = None,
    actor: str = "sqlalchemy-cmk migration",
    max_batches: int | None = None,
) -> Report:
    """The reverse: restore every encrypted value of the text ``columns`` to its plaintext,
    byte for byte, with the same batching, locking and compare-and-swap.

    The companion column and its values are left in place (other columns may still use them).
    Deploy the application with ``allow_plaintext=True`` before running it, and with a plain
    ``Text`` column once it is done.

    Raises:
        ConfigurationError: as :func:`encrypt_columns`.
        DecryptionError: a value did not decrypt (names the row); nothing of its batch is
            written. Run :func:`verify` for the full list.
        KeyAccessError: a tenant's KMS refused or failed.
    """
    _check_batch_args(batch_size, max_batches)
    started = _now()
    tgt = _target(
        engine,
        table,
        columns,
        tenant_column=tenant_column,
        companion_column=companion_column,
        schema=schema,
        metadata=metadata,
    )
    assert tgt.spec is not None and tgt.companion is not None
    report = Report("decrypt", table, tuple(columns))
    pending = or_(*(_is_encrypted(c) for c in tgt.cols))
    total = _total(engine, tgt, pending) if progress is not None else None
    ncols = len(tgt.cols)
    companion_name = tgt.companion.name
    ctx = _cross(actor)

    def handle(conn: Connection, rows: Sequence[Any], part: Report) -> None:
        dicts: list[dict[str, Any]] = []
        for row in rows:
            d: dict[str, Any] = {companion_name: _as_bytes(row[-1])}
            for c, v in zip(tgt.cols, row[2 : 2 + ncols], strict=True):
                if v is not None and v.startswith(TEXT_MARKER):
                    d[c.name] = _from_text(v, False)
            dicts.append(d)
        _open_rows(cmk, tgt, dicts, [r[0] for r in rows], ctx)
        batch = _Batch(tgt)
        for row, d in zip(rows, dicts, strict=True):
            old = tuple(row[2 : 2 + ncols])
            new = [d.get(c.name, v) for c, v in zip(tgt.cols, old, strict=True)]
            if len(d) == 1:
                continue  # nothing encrypted (cannot happen: the row matched as encrypted)
            j = next(j for j, c in enumerate(tgt.cols) if c.name in d)
            comp = d[companion_name]
            batch.add(row[0], row[1], old, new, comp, comp, _tenant_of(row[1]), (j, new[j]))
        batch.apply(conn, part)

    _walk(
        engine,
        tgt,
        report,
        pending=pending,
        handle=handle,
        batch_size=batch_size,
        max_batches=max_batches,
        progress=progress,
        started=started,
        total=total,
    )
    report.seconds = _now() - started
    return report


def rewrap_keys(
    engine: Engine,
    cmk: CMK,
    table: str,
    *,
    tenant: str | None = None,
    companion_column: str = "cmk_edek",
    schema: str | None = None,
    batch_size: int = 1000,
    progress: ProgressCallback | None = None,
    actor: str = "sqlalchemy-cmk migration",
) -> Report:
    """Re-wrap every data key of the table (or of one tenant) under its tenant's current
    primary key, without re-encrypting data: one unwrap and one wrap per distinct envelope, then
    a set-based update of the rows using it (row ids unchanged, so values stay valid).

    Configure the tenant with ``tenant_keys={"acme": [new, old]}`` (new primary, old still
    accepted), run this, then drop the old key once a second run reports ``rows == 0``:
    application processes keep writing under their cached write key for up to ``cache_ttl``
    after the change, so run it again after that long.

    The table is walked by primary key in batches of ``batch_size`` rows, each in its own
    transaction. On PostgreSQL each batch is one ``UPDATE ... SET companion =
    substring(companion from 1 for 17) || :new WHERE <pk in batch> AND substring(companion from
    18) = :old`` per distinct envelope; on SQLite, a compare-and-swap update per row. Envelopes
    already under the primary cost no KMS call. ``by_tenant`` counts rows by envelope tenant.

    Raises:
        ConfigurationError: unknown table or no companion column.
        TenantNotConfiguredError: an envelope's tenant (or its key) is no longer configured.
        KeyAccessError: a tenant's KMS refused or failed (rows done so far stay done).
    """
    _check_batch_args(batch_size)
    started = _now()
    insp = sa_inspect(engine)
    if not insp.has_table(table, schema=schema):
        where = f"{schema}.{table}" if schema else table
        raise ConfigurationError(f"table {where!r} does not exist", table=table)
    pk_probe = insp.get_pk_constraint(table, schema=schema).get("constrained_columns") or []
    # _target wants one text column; rewrap touches none, so describe the companion alone.
    tgt = _target_companion_only(engine, table, companion_column, schema, pk_probe)
    assert tgt.companion is not None
    comp_col = tgt.companion
    report = Report("rewrap", table, ())
    memo: OrderedDict[bytes, tuple[bytes, str] | None] = OrderedDict()
    total: int | None = None
    if progress is not None:
        with engine.connect() as conn:
            total = int(
                conn.execute(
                    select(func.count()).select_from(tgt.raw).where(comp_col.is_not(None))
                ).scalar_one()
            )

    def new_envelope(env: bytes) -> tuple[bytes, str] | None:
        """The replacement of ``env`` and its tenant, or None to leave it (cached, LRU)."""
        if env in memo:
            memo.move_to_end(env)
            return memo[env]
        owner = _format.parse_envelope(env).tenant
        result: tuple[bytes, str] | None = None
        if tenant is None or owner == tenant:
            ctx = TenantContext(tenant_id=owner, actor=actor)
            new = cmk._keys.rewrap(env, ctx)
            if new != env:
                result = (new, owner)
                memo[new] = None  # rows already moved (a retry pass) need nothing
        memo[env] = result
        while len(memo) > _ENVELOPE_MEMO:
            memo.popitem(last=False)
        return result

    base = select(tgt.pk, comp_col).where(comp_col.is_not(None)).order_by(tgt.pk).limit(batch_size)
    after = base.where(tgt.pk > bindparam("_last"))
    set_based = (
        update(tgt.raw)
        .where(
            tgt.pk >= bindparam("_lo"),
            tgt.pk <= bindparam("_hi"),
            func.substr(comp_col, _SPLIT + 1) == bindparam("_old", type_=LargeBinary()),
        )
        .values(
            {
                comp_col: func.substr(comp_col, 1, _SPLIT).op("||", return_type=LargeBinary())(
                    bindparam("_new", type_=LargeBinary())
                )
            }
        )
    )
    per_row = (
        update(tgt.raw)
        .where(tgt.pk == bindparam("_k"), comp_col == bindparam("_oe"))
        .values({comp_col: bindparam("_ne")})
    )
    done = 0
    while True:
        report.passes += 1
        conflicts_before = report.conflicts
        last: Any = None
        while True:
            # Read the batch and work out the replacements (KMS calls) outside any transaction:
            # the writes below are compare-and-swap on the old envelope, so nothing is stale.
            with engine.connect() as conn:
                if last is None:
                    rows = conn.execute(base).all()
                else:
                    rows = conn.execute(after, {"_last": last}).all()
            if not rows:
                break
            by_env: dict[bytes, list[tuple[Any, bytes]]] = {}
            for pk, stored in rows:
                comp = bytes(stored)
                if len(comp) <= _SPLIT:
                    raise DecryptionError(
                        f"row {_pk_repr(pk)} of {tgt.label()!r}: stored companion value is "
                        "malformed",
                        table=table,
                    )
                by_env.setdefault(comp[_SPLIT:], []).append((pk, comp))
            moves = {env: m for env in by_env if (m := new_envelope(env)) is not None}
            lo, hi = rows[0][0], rows[-1][0]

            def write(
                conn: Connection,
                moves: dict[bytes, tuple[bytes, str]] = moves,
                by_env: dict[bytes, list[tuple[Any, bytes]]] = by_env,
                lo: Any = lo,
                hi: Any = hi,
            ) -> Report:
                part = Report("rewrap", table, ())
                if tgt.postgresql:  # set-based: one UPDATE per envelope in the batch's range
                    for env, (new, owner) in moves.items():
                        res = conn.execute(
                            set_based, {"_lo": lo, "_hi": hi, "_old": env, "_new": new}
                        )
                        part.rows += res.rowcount
                        _count(part.by_tenant, owner, res.rowcount)
                    return part
                params: list[dict[str, Any]] = []
                owners: list[str] = []
                for env, (new, owner) in moves.items():
                    for pk, comp in by_env[env]:
                        params.append({"_k": pk, "_oe": comp, "_ne": comp[:_SPLIT] + new})
                        owners.append(owner)
                if not params:
                    return part
                res = conn.execute(per_row, params)
                if res.rowcount == len(params):
                    part.rows = len(params)
                    for owner in owners:
                        _count(part.by_tenant, owner)
                    return part
                stmt = select(tgt.pk, comp_col).where(tgt.pk.in_([p["_k"] for p in params]))
                now = {r[0]: _as_bytes(r[1]) for r in conn.execute(stmt).all()}
                for p, owner in zip(params, owners, strict=True):
                    if now.get(p["_k"]) == p["_ne"]:
                        part.rows += 1
                        _count(part.by_tenant, owner)
                    else:
                        part.conflicts += 1
                return part

            if moves:
                _merge(report, _in_transaction(engine, write))
            last = hi
            done += len(rows)
            report.batches += 1
            if progress is not None:
                progress(Progress("rewrap", table, done, total, _now() - started))
        if report.conflicts == conflicts_before:
            break
    report.seconds = _now() - started
    return report


def _target_companion_only(
    engine: Engine, table: str, companion_column: str, schema: str | None, pk: list[str]
) -> _Target:
    where = f"{schema}.{table}" if schema else table
    if len(pk) != 1:
        raise ConfigurationError(
            f"table {where!r} needs a single-column primary key for the backfill walk",
            table=table,
        )
    reflected = {c["name"]: c for c in sa_inspect(engine).get_columns(table, schema=schema)}
    if companion_column not in reflected:
        raise ConfigurationError(
            f"table {where!r} has no companion column {companion_column!r}: nothing is "
            "encrypted there (or pass companion_column= if it has another name)",
            table=table,
            column=companion_column,
        )
    raw = Table(
        table,
        MetaData(),
        Column(pk[0], reflected[pk[0]]["type"], primary_key=True),
        Column(companion_column, LargeBinary()),
        schema=schema,
    )
    return _Target(
        name=table,
        raw=raw,
        spec=None,
        spec_table=raw,
        pk=raw.c[pk[0]],
        tenant=None,
        cols=(),
        companion=raw.c[companion_column],
        postgresql=engine.dialect.name == "postgresql",
    )


def rotate_data_keys(
    engine: Engine,
    cmk: CMK,
    table: str,
    columns: Sequence[str],
    *,
    tenant_column: str | None = None,
    metadata: Models | None = None,
    tenant: str | None = None,
    companion_column: str = "cmk_edek",
    schema: str | None = None,
    batch_size: int = 1000,
    progress: ProgressCallback | None = None,
    actor: str = "sqlalchemy-cmk migration",
) -> Report:
    """Re-encrypt rows under fresh data keys (new row id, new companion): every encrypted text
    column of ``columns`` is decrypted and sealed again; plaintext values are left alone.

    ``columns`` must name every encrypted column of the table: a column left out would keep
    values bound to the old row id and stop decrypting. Rows that exist when the call starts
    (primary key up to the maximum then) of ``tenant`` (or all tenants) are rotated, each in a
    batch transaction with compare-and-swap; rows an application writes meanwhile are retried.
    Run it in one worker; a killed rotation run again starts over (harmless, more KMS calls).
    It drops ``cmk``'s cached data keys of ``tenant`` (or all tenants) first, so that the new
    companions get data keys wrapped now, not the write key the rows may already use.

    Raises:
        ConfigurationError, TenantNotConfiguredError, TenantMismatchError, DecryptionError,
        KeyAccessError: as :func:`encrypt_columns` and :func:`decrypt_columns`.
    """
    _check_batch_args(batch_size)
    started = _now()
    tgt = _target(
        engine,
        table,
        columns,
        tenant_column=tenant_column,
        companion_column=companion_column,
        schema=schema,
        metadata=metadata,
    )
    assert tgt.spec is not None and tgt.companion is not None and tgt.tenant is not None
    spec = tgt.spec
    report = Report("rotate", table, tuple(columns))
    scope: list[ColumnElement[bool]] = [tgt.companion.is_not(None)]
    if tenant is not None:
        scope.append(tgt.tenant == literal(tenant, type_=tgt.tenant.type))
    with engine.connect() as conn:
        max_pk = conn.execute(select(func.max(tgt.pk)).where(*scope)).scalar()
    if max_pk is None:
        report.seconds = _now() - started
        return report
    # Fresh data keys: drop the cached write keys, or the first batches would be sealed under
    # the very key the rows already use.
    cmk.forget_tenant(tenant)
    created: set[bytes] = set()
    # A row is done once its envelope is one this call created (a handful: one per tenant and
    # write-key window), so passes can tell rotated rows from the rest.
    pending = and_(
        *scope,
        tgt.pk <= literal(max_pk, type_=tgt.pk.type),
        or_(*(_is_encrypted(c) for c in tgt.cols)),
        func.substr(tgt.companion, _SPLIT + 1).not_in(
            bindparam("_created", expanding=True, type_=LargeBinary())
        ),
    )
    total = None
    if progress is not None:
        with engine.connect() as conn:
            total = int(
                conn.execute(
                    select(func.count()).select_from(tgt.raw).where(pending), {"_created": []}
                ).scalar_one()
            )
    ncols = len(tgt.cols)
    companion_name = tgt.companion.name
    read_ctx = _cross(actor)
    memo: dict[bytes, str] = {}

    def handle(conn: Connection, rows: Sequence[Any], part: Report) -> None:
        dicts: list[dict[str, Any]] = []
        for row in rows:
            comp = _as_bytes(row[-1])
            assert comp is not None
            _check_row_tenant(tgt, row[0], _require_tenant(tgt, row[0], row[1]), comp, memo)
            d: dict[str, Any] = {companion_name: comp}
            for c, v in zip(tgt.cols, row[2 : 2 + ncols], strict=True):
                if v is not None and v.startswith(TEXT_MARKER):
                    d[c.name] = _from_text(v, False)
            dicts.append(d)
        _open_rows(cmk, tgt, dicts, [r[0] for r in rows], read_ctx)
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(str(row[1]), []).append(i)
        sealed: list[tuple[list[Any], bytes]] = [([], b"")] * len(rows)
        for owner, idx in groups.items():
            values = [{k: v for k, v in dicts[i].items() if k != companion_name} for i in idx]
            new_comps, cts = cmk.seal(
                values,
                [spec] * len(idx),
                [spec.columns] * len(idx),
                [None] * len(idx),
                TenantContext(tenant_id=owner, actor=actor),
            )
            k = 0
            for i, vals, new_comp in zip(idx, values, new_comps, strict=True):
                assert new_comp is not None
                created.add(new_comp[_SPLIT:])
                new = list(rows[i][2 : 2 + ncols])
                for j, cs in enumerate(spec.columns):
                    if cs.name in vals:
                        new[j] = _to_text(cts[k])
                        k += 1
                sealed[i] = (new, new_comp)
        batch = _Batch(tgt)
        for i, row in enumerate(rows):
            new, new_comp = sealed[i]
            batch.add(
                row[0],
                row[1],
                tuple(row[2 : 2 + ncols]),
                new,
                dicts[i][companion_name],
                new_comp,
                str(row[1]),
                (ncols, new_comp),
            )
        batch.apply(conn, part)

    _walk(
        engine,
        tgt,
        report,
        pending=pending,
        handle=handle,
        params=lambda: {"_created": list(created)},
        batch_size=batch_size,
        max_batches=None,
        progress=progress,
        started=started,
        total=total,
    )
    report.seconds = _now() - started
    return report


def verify(
    engine: Engine,
    cmk: CMK,
    table: str,
    columns: Sequence[str],
    *,
    tenant_column: str | None = None,
    metadata: Models | None = None,
    companion_column: str = "cmk_edek",
    schema: str | None = None,
    batch_size: int = 1000,
    sample: float | None = None,
    progress: ProgressCallback | None = None,
    actor: str = "sqlalchemy-cmk verify",
) -> VerifyReport:
    """Decrypt every row (or a random ``sample`` fraction) and count ok / plaintext / failed
    per tenant (see :class:`VerifyReport`). A row whose tenant column disagrees with its EDEK's
    tenant is a failure (``TenantMismatchError``), as is a value that does not decrypt
    (``DecryptionError``) or whose key the KMS refuses (``KeyAccessDeniedError``...). Failures
    never stop the scan. Reads only, without locks, one batch at a time.

    Raises:
        ConfigurationError: unknown table or column, no companion column, ``sample`` not in
            (0, 1], the tenant column (as :func:`encrypt_columns`).
    """
    _check_batch_args(batch_size)
    if sample is not None and not 0 < sample <= 1:
        raise ConfigurationError(f"sample must be in (0, 1], not {sample}")
    started = _now()
    tgt = _target(
        engine,
        table,
        columns,
        tenant_column=tenant_column,
        companion_column=companion_column,
        schema=schema,
        metadata=metadata,
    )
    assert tgt.spec is not None and tgt.companion is not None
    spec = tgt.spec
    report = VerifyReport(table, tuple(columns))
    conds: list[ColumnElement[bool]] = [or_(*(c.is_not(None) for c in tgt.cols))]
    if sample is not None and sample < 1:
        if tgt.postgresql:
            conds.append(func.random() < sample)
        else:  # SQLite's random() is a 64-bit integer
            conds.append(func.abs(func.random()) % 1_000_000 < int(sample * 1_000_000))
    total = None
    if progress is not None:
        with engine.connect() as conn:
            total = int(
                conn.execute(select(func.count()).select_from(tgt.raw).where(conds[0])).scalar_one()
            )
    ncols = len(tgt.cols)
    companion_name = tgt.companion.name
    ctx = _cross(actor)
    memo: dict[bytes, str] = {}
    assert tgt.tenant is not None
    base = select(tgt.pk, tgt.tenant, *tgt.cols, tgt.companion).where(*conds).order_by(tgt.pk)
    base = base.limit(batch_size)
    after = base.where(tgt.pk > bindparam("_last"))

    def fail(pk: Any, tenant: str, error: str) -> None:
        _count(report.failed, tenant)
        if len(report.failures) < _MAX_FAILURES_LISTED:
            report.failures.append((str(pk), tenant, error))

    def check(rows: Sequence[Any]) -> None:
        # envelope -> [(pk, tenant, dict, has plaintext)]
        groups: dict[bytes, list[tuple[Any, str, dict[str, Any], bool]]] = {}
        for row in rows:
            pk, t = row[0], _tenant_of(row[1])
            comp = _as_bytes(row[-1])
            d: dict[str, Any] = {companion_name: comp}
            plain = False
            try:
                for c, v in zip(tgt.cols, row[2 : 2 + ncols], strict=True):
                    if v is None:
                        continue
                    if v.startswith(TEXT_MARKER):
                        d[c.name] = _from_text(v, False)
                    else:
                        plain = True
                if comp is None:
                    if len(d) > 1:
                        raise DecryptionError("encrypted values but no EDEK")
                elif _envelope_tenant(comp, memo) != t:
                    fail(pk, t, "TenantMismatchError")
                    continue
            except DecryptionError:
                fail(pk, t, "DecryptionError")
                continue
            if len(d) == 1:  # nothing encrypted
                _count(report.plaintext if plain else report.encrypted_ok, t)
                continue
            assert comp is not None
            groups.setdefault(comp[_SPLIT:], []).append((pk, t, d, plain))
        for members in groups.values():
            try:
                cmk.open([m[2] for m in members], [spec] * len(members), ctx)
                bad: list[tuple[Any, str, str]] = []
            except DecryptionError:
                bad = []
                for pk, t, d, _ in members:
                    try:
                        cmk.open([_fresh(d)], [spec], ctx)
                    except CMKError as exc:
                        bad.append((pk, t, type(exc).__name__))
            except CMKError as exc:  # the key itself: every row under it fails the same way
                bad = [(pk, t, type(exc).__name__) for pk, t, _, _ in members]
            failed = {b[0] for b in bad}
            for pk, t, error in bad:
                fail(pk, t, error)
            for pk, t, _, plain in members:
                if pk not in failed:
                    _count(report.plaintext if plain else report.encrypted_ok, t)

    last: Any = None
    while True:
        with engine.connect() as conn:
            if last is None:
                rows = conn.execute(base).all()
            else:
                rows = conn.execute(after, {"_last": last}).all()
        if not rows:
            break
        last = rows[-1][0]
        check(rows)
        report.checked += len(rows)
        if progress is not None:
            progress(Progress("verify", table, report.checked, total, _now() - started))
    return report


def _fresh(d: dict[str, Any]) -> dict[str, Any]:
    # CMK.open decrypts in place and may have half-done a failed batch: rebuild from what is
    # still ciphertext (decrypted values are str, not EncryptedValue, and are re-checked by
    # nothing, which is fine: they did decrypt).
    return {k: v for k, v in d.items() if not isinstance(v, str)}


def status(
    engine: Engine,
    table: str,
    columns: Sequence[str],
    *,
    schema: str | None = None,
) -> StatusReport:
    """Count plaintext / encrypted / NULL values per column with SQL only (no keys needed).

    One full scan of the table. "Encrypted" means "starts with ``cmk:``"; only :func:`verify`
    says whether it decrypts.
    """
    tgt = _target(
        engine,
        table,
        columns,
        tenant_column=None,
        companion_column=None,
        schema=schema,
        with_tenant=False,
    )
    exprs: list[ColumnElement[Any]] = [func.count()]
    for c in tgt.cols:
        exprs.append(func.count(c))
        exprs.append(func.coalesce(func.sum(case((_is_encrypted(c), 1), else_=0)), 0))
    with engine.connect() as conn:
        row = conn.execute(select(*exprs).select_from(tgt.raw)).one()
    rows = int(row[0])
    counts: dict[str, dict[str, int]] = {}
    for i, c in enumerate(tgt.cols):
        non_null, encrypted = int(row[1 + 2 * i]), int(row[2 + 2 * i])
        counts[c.name] = {
            "plaintext": non_null - encrypted,
            "encrypted": encrypted,
            "null": rows - non_null,
        }
    return StatusReport(table, counts)
