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

What every operation guarantees (``tests/migrations/test_integrity.py``):

* A batch is one transaction that ends by reading its rows back: values written are decrypted
  as stored (a new envelope's key unwrapped afresh through the KMS, once per call), rows
  decrypted must hold exactly the plaintext written; otherwise :class:`UnreadableWriteError`
  and the batch rolls back. :func:`rewrap_keys` proves each new envelope before writing it.
* :func:`rotate_data_keys` never strands a column: it finds every encrypted column sharing the
  companion from the stored format, never by decrypting (:func:`_encrypted_columns`), and
  refuses a set that leaves one out (:class:`IncompleteColumnsError`), or a table whose values
  do not say (:class:`UndeterminedColumnsError`).
* Keys are opened by one per-call object (:class:`_Crypto`), which owns what it unwraps.
* A database error leaves as :class:`MigrationDatabaseError`, scrubbed of row values, with
  nothing chained.
* :func:`encrypt_columns` refuses a column under a unique index (:class:`UniqueColumnError`).

All functions take an ``Engine`` (batches need their own transactions; Alembic operations pass
the migration connection's engine after committing the schema change) and a ``CMK``; they read
every tenant's rows under ``cross_tenant_context`` semantics and write each row under the
``tenant_context`` of its own tenant, so each tenant's KMS and audit trail see the access.

Limits:

* The table needs a single-column primary key (the walk's cursor); composite keys raise
  ``ConfigurationError``.
* Only text columns (``TEXT``, or ``VARCHAR`` without a length) can be encrypted in place: the
  stored form is a third longer than the value plus about 45 characters. The other operations
  take text and binary (default-storage) columns alike; a binary column is decrypted ``into``
  another column, and a column of any type is encrypted ``into`` a binary column (the move:
  :func:`encrypt_columns` with ``into=``, then :func:`check_cutover`).
* A plaintext value that itself starts with ``cmk:`` cannot be told from ciphertext: the walk
  leaves it alone, :func:`status` counts it as encrypted and :func:`verify` reports it failed.
* :func:`rotate_data_keys` gives rows a new companion, so it takes *every* encrypted column of
  the table (a list leaving one out is refused); run it in one worker.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import inspect
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar, overload

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
    false,
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
from sqlalchemy.exc import CompileError, DBAPIError, StatementError

from sqlalchemy_cmk import CMK, TenantContext, _codecs, _format
from sqlalchemy_cmk._access import access, emit_ok, emit_refused, note_row_tenant
from sqlalchemy_cmk._cmk import _aad_prefix
from sqlalchemy_cmk._codecs import Codec, codec_for
from sqlalchemy_cmk._dialects import DialectSupport, select_dialect
from sqlalchemy_cmk._keys import DataKey, kms_call_gate
from sqlalchemy_cmk._mapping import ColumnSpec, TableSpec, is_tenant_column
from sqlalchemy_cmk.errors import (
    CMKError,
    ConfigurationError,
    DecryptionError,
    TenantMismatchError,
    TenantNotConfiguredError,
)
from sqlalchemy_cmk.types import TEXT_MARKER, EncryptedType, _binary, _from_text

if TYPE_CHECKING:
    from .search_index import IndexReport

__all__ = [
    "IncompleteColumnsError",
    "Job",
    "MigrationDatabaseError",
    "Models",
    "MoveNotFinishedError",
    "Operation",
    "Progress",
    "Report",
    "StatusReport",
    "UniqueColumnError",
    "UnreadableWriteError",
    "VerifyReport",
    "check_cutover",
    "check_encryptable",
    "decrypt_columns",
    "encrypt_columns",
    "ensure_companion",
    "resolve_tenant_column",
    "rewrap_keys",
    "rotate_data_keys",
    "run_job",
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
_SEALED_OVERHEAD = _format.MIN_VALUE  # sealed value = version | nonce | tag | value | auth tag
_MARKER_LEN = len(TEXT_MARKER)
_MAX_FAILURES_LISTED = 1000
_ENVELOPE_MEMO = 4096  # envelopes remembered by a call (rewrap: old -> new; keys), LRU
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


# -- errors ----------------------------------------------------------------------------------


class IncompleteColumnsError(ConfigurationError):
    """The columns given leave out encrypted columns that share the rows' data keys.

    Rotation gives each row a new companion (row id and data key); an encrypted column left out
    would keep values bound to the old one and stop decrypting. ``missing`` names the columns
    to add (found in the model given as ``metadata=``, else in the database).
    """

    def __init__(self, message: str, *, missing: tuple[str, ...], **kwargs: str | None) -> None:
        super().__init__(message, **kwargs)
        self.missing = missing


class UniqueColumnError(ConfigurationError):
    """A column to encrypt is under a unique index or constraint (``index`` names it).

    Encrypted values are randomized: the index would compare ciphertexts and enforce nothing.
    Nothing was changed. Drop the index (or constraint) first, knowing uniqueness is no longer
    enforced, or keep the column in plaintext.
    """

    def __init__(self, message: str, *, index: str | None, **kwargs: str | None) -> None:
        super().__init__(message, **kwargs)
        self.index = index


class MigrationDatabaseError(CMKError):
    """The database refused a statement of a migration (a CHECK constraint, a unique index...).

    Scrubbed of row values: the message and attributes name the table, the columns, the row's
    primary key (``pk``, when one row could be singled out), the database error class
    (``error_class``, e.g. ``CheckViolation``), ``sqlstate`` and ``constraint``, and nothing
    else. The database's own exception is not chained (its DETAIL line and the statement's
    parameters carry the values). The batch was rolled back: nothing of it was written.
    """

    def __init__(
        self,
        message: str,
        *,
        operation: str,
        pk: str | None,
        error_class: str,
        sqlstate: str | None,
        constraint: str | None,
        **kwargs: str | None,
    ) -> None:
        super().__init__(message, **kwargs)
        self.operation = operation
        self.pk = pk
        self.error_class = error_class
        self.sqlstate = sqlstate
        self.constraint = constraint


class UnreadableWriteError(DecryptionError):
    """Rows a batch wrote did not read back: a value did not decrypt under the key its stored
    companion names, unwrapped afresh through the KMS, or the stored row differs from what was
    written. The batch was rolled back before commit, so nothing was lost."""


# -- the target table ------------------------------------------------------------------------


@dataclass(eq=False)
class _Target:
    """The parts of the user's table a backfill touches, as a private Core table.

    ``raw`` has plain ``Text``/``LargeBinary`` columns: the SQL reads and writes stored values
    as is. ``storage[i]`` says how ``cols[i]`` holds a ciphertext: ``"text"`` (``cmk:`` +
    base64, beside plaintext during an in-place encryption) or ``"binary"`` (the default
    storage: the bytes themselves; never plaintext); ``"plain"`` marks a column that only
    receives plaintext (decrypt's ``into=``), of its reflected type. ``into`` maps the index of
    a column decrypted elsewhere to the index of the column receiving its plaintext.
    """

    name: str
    raw: Table
    pk: Column[Any]
    tenant: Column[Any] | None
    cols: tuple[Column[Any], ...]
    storage: tuple[str, ...]
    companion: Column[Any] | None
    db: DialectSupport  # what the database can do (SKIP LOCKED, set-based updates...)
    types: dict[str, Any]  # every column of the table, as reflected: name -> type
    into: dict[int, int] = field(default_factory=dict)
    bulk_update: Any = None  # _Batch.set_based's statement, built once

    def label(self) -> str:
        return f"{self.raw.schema}.{self.name}" if self.raw.schema else self.name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.cols)

    def encrypted(self, i: int) -> ColumnElement[bool]:
        """SQL: ``cols[i]`` holds a ciphertext."""
        col = self.cols[i]
        if self.storage[i] == "plain":
            return false()
        if self.storage[i] == "binary":
            return col.is_not(None)
        return self.db.has_prefix(col, TEXT_MARKER)  # "CMK:..." is plaintext

    def plaintext(self, i: int) -> ColumnElement[bool]:
        """SQL: ``cols[i]`` holds plaintext (NULL is neither)."""
        if self.storage[i] != "text":
            return false()
        return ~self.db.has_prefix(self.cols[i], TEXT_MARKER)

    def is_plain(self, i: int, value: Any) -> bool:
        return self.storage[i] == "text" and value is not None and not value.startswith(TEXT_MARKER)

    def ciphertext(self, i: int, value: Any) -> bytes | None:
        """The ciphertext stored in ``cols[i]``; None for NULL and plaintext. A malformed one
        raises DecryptionError."""
        if value is None or self.storage[i] == "plain":
            return None
        if self.storage[i] == "binary":
            return bytes(_binary(value))
        if not value.startswith(TEXT_MARKER):
            return None
        return bytes(_from_text(value, False))

    def store(self, i: int, ciphertext: bytes) -> Any:
        """``ciphertext`` as ``cols[i]`` stores it."""
        if self.storage[i] == "binary":
            return ciphertext
        return TEXT_MARKER + base64.b64encode(ciphertext).decode("ascii")


def _target(
    engine: Engine | Connection,
    table: str,
    columns: Sequence[str] | None,
    *,
    tenant_column: str | None,
    companion_column: str | None,
    schema: str | None,
    for_encrypt: bool = False,
    metadata: Models | None = None,
    with_tenant: bool = True,
    into: Mapping[str, str] | None = None,
) -> _Target:
    """Check the table and build its :class:`_Target`; ``columns=None``: no columns yet (the
    caller finds the encrypted ones with :func:`_encrypted_columns`)."""
    where = f"{schema}.{table}" if schema else table
    if isinstance(columns, str):
        raise ConfigurationError("columns must be a list of column names, not a str", table=table)
    if columns is not None and not columns:
        raise ConfigurationError("give at least one column", table=table)
    columns = tuple(columns or ())
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
    # encrypt's into=: each column moves into a binary column, leaving NULL behind; the source
    # keeps its own type (any type EncryptedType takes), text ones may hold text-storage values.
    moving = for_encrypt and bool(into)
    if moving and set(into or ()) != set(columns):
        raise ConfigurationError(
            f"into= must name a binary target for every column moved ({list(columns)!r}); "
            "encrypt the others in place in a call of their own",
            table=table,
        )
    storage: list[str] = []
    for name in columns:
        info = reflected.get(name)
        if info is None:
            raise ConfigurationError(
                f"table {where!r} has no column {name!r}; its columns: {sorted(reflected)}",
                table=table,
                column=name,
            )
        typ = info["type"]
        if moving:
            if name in (pk_name, tenant_column, companion_column):
                raise ConfigurationError(
                    f"{where}.{name} is the primary key, tenant or companion column; it cannot "
                    "be encrypted",
                    table=table,
                    column=name,
                )
            codec_for(typ)  # ConfigurationError for a type EncryptedType cannot take
            if isinstance(typ, sqltypes.JSON):
                # The compare-and-swap cannot hold a JSON source: PostgreSQL's json has no
                # equality, SQLite's text never equals the re-serialised value, and JSON null
                # reads as None yet is not SQL NULL, so the walk selected such rows forever.
                raise ConfigurationError(
                    f"{where}.{name} is {typ!r}: a JSON column cannot be moved online; add "
                    "the EncryptedType(JSON) column and copy the values in application code",
                    table=table,
                    column=name,
                )
            storage.append("text" if isinstance(typ, sqltypes.String) else "plain")
            continue
        if isinstance(typ, sqltypes._Binary) and not for_encrypt:
            storage.append("binary")
            continue
        if not isinstance(typ, sqltypes.String):
            raise ConfigurationError(
                f"{where}.{name} is {typ!r}, not a text column: only text columns can be "
                "encrypted in place (EncryptedType(Text, storage='text')); for other types add "
                "a new EncryptedType column and copy the values in application code",
                table=table,
                column=name,
            )
        storage.append("text")
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
    if for_encrypt:
        # A moved column's target holds ciphertext too: an index there enforces nothing either.
        _refuse_unique(insp, table, schema, (*columns, *(into or {}).values()))
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
    raw_cols += [
        Column(
            name,
            LargeBinary() if s == "binary" else Text() if s == "text" else reflected[name]["type"],
        )
        for name, s in zip(columns, storage, strict=True)
    ]
    targets = _check_into(
        where, table, into or {}, columns, reflected, pk_name, tenant_column, companion_column
    )
    if moving:
        _check_move_targets(where, table, into or {}, reflected)
    raw_cols += [
        Column(name, LargeBinary() if moving else reflected[name]["type"]) for name in targets
    ]
    if companion_column is not None:
        raw_cols.append(Column(companion_column, LargeBinary()))
    raw = Table(table, MetaData(), *raw_cols, schema=schema)
    return _Target(
        name=table,
        raw=raw,
        pk=raw.c[pk_name],
        tenant=raw.c[tenant_column] if tenant_column is not None else None,
        cols=tuple(raw.c[name] for name in (*columns, *targets)),
        storage=(*storage, *(["binary" if moving else "plain"] * len(targets))),
        companion=raw.c[companion_column] if companion_column is not None else None,
        db=select_dialect(engine.dialect),
        types={name: info["type"] for name, info in reflected.items()},
        into={columns.index(src): len(columns) + k for k, src in enumerate(into or {})},
    )


def _check_into(
    where: str,
    table: str,
    into: Mapping[str, str],
    columns: Sequence[str],
    reflected: Mapping[str, Any],
    pk_name: str,
    tenant_column: str | None,
    companion_column: str | None,
) -> list[str]:
    """The columns receiving plaintext (decrypt's ``into=``), in ``into``'s order."""
    targets = list(into.values())
    for src, dst in into.items():
        if src not in columns:
            raise ConfigurationError(
                f"into= names {src!r}, which is not one of the columns {list(columns)!r}",
                table=table,
                column=src,
            )
        if dst not in reflected:
            raise ConfigurationError(
                f"table {where!r} has no column {dst!r} to move {src!r} into: add it first "
                "(nullable; of the plaintext's type to decrypt into, binary to encrypt into)",
                table=table,
                column=dst,
            )
        why = (
            "the column itself"
            if dst == src
            else "one of the columns named"
            if dst in columns
            else "the primary key"
            if dst == pk_name
            else "the tenant column"
            if dst == tenant_column
            else "the companion column"
            if dst == companion_column
            else "the target of another column"
            if targets.count(dst) > 1
            else None
        )
        if why is not None:
            raise ConfigurationError(
                f"{dst!r} cannot receive the values of {src!r}: it is {why}",
                table=table,
                column=dst,
            )
    return targets


def _check_move_targets(
    where: str, table: str, into: Mapping[str, str], reflected: Mapping[str, Any]
) -> None:
    """encrypt's ``into=``: every target is binary and long enough for any sealed value of
    its source (a sealed value is the encoded plaintext plus :data:`_SEALED_OVERHEAD` bytes)."""
    for src, dst in into.items():
        typ = reflected[dst]["type"]
        if not isinstance(typ, sqltypes._Binary):
            raise ConfigurationError(
                f"{where}.{dst} is {typ!r}, not a binary column: the values of {src!r} are "
                "moved into it as the default (binary) storage writes them. Add it as "
                "LargeBinary (BYTEA, BLOB), nullable, or as the type EncryptedType renders",
                table=table,
                column=dst,
            )
        if reflected[dst].get("nullable") is False:
            # The application empties the target when it writes None through the dual-read
            # model, and a row with no value keeps the target NULL (a default there would be
            # read as a ciphertext after the cutover).
            raise ConfigurationError(
                f"{where}.{dst} is NOT NULL: the values of {src!r} are moved into a nullable "
                "column (NULL where there is no value); make it nullable first",
                table=table,
                column=dst,
            )
        limit = getattr(typ, "length", None)
        if limit is None:
            continue
        src_type = reflected[src]["type"]
        src_len = getattr(src_type, "length", None)
        needed = None
        if isinstance(src_type, sqltypes.String) and src_len is not None:
            needed = _SEALED_OVERHEAD + 4 * src_len  # UTF-8: at most 4 bytes a character
        if needed is None or limit < needed:
            raise ConfigurationError(
                f"{where}.{dst} is {typ!r}, too small for every sealed value of {src!r} "
                f"({typ!r} holds {limit} bytes; a sealed value is the value's bytes plus "
                f"{_SEALED_OVERHEAD}"
                + (f", up to {needed} here" if needed is not None else "")
                + "): make it an unlimited binary column (LargeBinary: BYTEA, BLOB)",
                table=table,
                column=dst,
            )


def _refuse_unique(insp: Any, table: str, schema: str | None, columns: Sequence[str]) -> None:
    """Raise UniqueColumnError if a unique index or constraint covers one of ``columns``."""
    where = f"{schema}.{table}" if schema else table
    found: list[tuple[str | None, list[str], str]] = []
    for uc in insp.get_unique_constraints(table, schema=schema):
        found.append((uc.get("name"), list(uc.get("column_names") or []), ""))
    for ix in insp.get_indexes(table, schema=schema):
        if ix.get("unique"):
            exprs = " ".join(str(e) for e in ix.get("expressions") or [] if e)
            found.append((ix.get("name"), [c for c in ix.get("column_names") or [] if c], exprs))
    for name, cols, exprs in found:
        for column in columns:
            if column in cols or (exprs and re.search(rf"\b{re.escape(column)}\b", exprs)):
                raise UniqueColumnError(
                    f"{where}.{column} is under the unique index or constraint {name!r}: "
                    "encrypted values are randomized, so the index would compare ciphertexts "
                    "and enforce nothing. Nothing was changed. Drop it first (uniqueness is "
                    "then no longer enforced by the database), or keep the column in plaintext",
                    index=name,
                    table=table,
                    column=column,
                )


def parallel_workers(engine: Engine) -> bool:
    """Whether several processes may run one operation on a table of this database at once.

    Workers partition the rows with ``FOR UPDATE SKIP LOCKED``: PostgreSQL, MariaDB 10.6+ and
    MySQL 8.0+ have it (the server's version decides, so this connects once); SQLite does not.
    """
    db = select_dialect(engine.dialect)
    if not db.row_locks:
        return False
    with engine.connect():
        pass
    return db.skip_locked(engine.dialect)


def check_encryptable(
    bind: Engine | Connection,
    table: str,
    columns: Sequence[str],
    *,
    schema: str | None = None,
    into: Mapping[str, str] | None = None,
    metadata: Models | None = None,
) -> None:
    """The checks :func:`encrypt_columns` makes before anything changes that need no tenant
    column or companion: that no unique index or constraint covers a column; with ``into``,
    every check of the move's columns and targets too (with ``metadata``, against the types
    the model declares for the targets). The Alembic operation and the CLI call it before
    they add the companion column, and before the CLI's workers start (which run without the
    models).

    Raises:
        UniqueColumnError: a unique index or constraint covers one of ``columns`` (or a
            target).
        ConfigurationError: with ``into``, as :func:`encrypt_columns` raises for the columns
            and targets.
    """
    if into:
        tgt = _target(
            bind,
            table,
            columns,
            tenant_column=None,
            companion_column=None,
            schema=schema,
            for_encrypt=True,
            with_tenant=False,
            into=into,
        )
        _move_codecs(tgt, metadata)
        _refuse_occupied_targets(bind, tgt)
        return
    _refuse_unique(sa_inspect(bind), table, schema, columns)


class MoveNotFinishedError(CMKError):
    """A moved column still holds values: its move (``encrypt_columns(into=)`` or
    ``decrypt_columns(into=)``) has not finished, so dropping it would lose them.

    ``remaining`` counts the rows whose ``column`` is not NULL; ``into`` names the target.
    Nothing was changed. Run the move again (it resumes), then the cutover.
    """

    def __init__(self, message: str, *, remaining: int, into: str, **kwargs: str | None) -> None:
        super().__init__(message, **kwargs)
        self.remaining = remaining
        self.into = into


class UndeterminedColumnsError(IncompleteColumnsError):
    """Without the model, the stored values do not say which columns are encrypted.

    Raised before anything is written or checked, when a binary column holds values in the
    sealed format beside values that are not (``missing`` names such columns), or when rows
    hold companions (EDEKs) but no column holds a value in the sealed format (``missing`` is
    empty). Pass the models (``metadata=``, ``--metadata``) or name the columns.
    """


def _encrypted_columns(
    engine: Engine,
    tgt: _Target,
    metadata: Models | None,
    operation: str,
    named: Sequence[str] = (),
) -> tuple[str, ...]:
    """Every encrypted column of the table that shares ``tgt``'s companion.

    From the model when ``metadata`` holds the table (its ``EncryptedType`` columns that the
    database has). Else from the stored format alone, never from decrypting: a key that is
    revoked, a tenant taken out of the configuration or a tampered value must not make an
    encrypted column look plain (and a rotation strand it). One aggregate scan of every row
    with a companion: a text column is encrypted if a value starts with ``cmk:``; a binary
    column if a value is sealed (version byte first, at least the shortest sealed length).
    Binary storage never holds plaintext, so a binary column with sealed values beside others
    cannot be told from a plain column holding look-alikes: it is reported, not guessed.

    Args:
        engine: The database.
        tgt: The table, with its companion column.
        metadata: The application's models, if given.
        operation: For messages: ``"rotate"``, ``"verify"``.
        named: Columns the caller names as encrypted; they settle their own ambiguity.

    Returns:
        The encrypted columns, in table order.

    Raises:
        UndeterminedColumnsError: a binary column not in ``named`` holds sealed and unsealed
            values, or rows hold companions while no column holds a sealed value and none is
            named.
    """
    assert tgt.companion is not None
    model, _ = _model_table(tgt.name, tgt.raw.schema, metadata)
    declared: list[str] | None = None
    if model is not None and any(isinstance(c.type, EncryptedType) for c in model.columns):
        # Only those the database has: in a migration, the model may be ahead of the schema.
        declared = [
            c.name
            for c in model.columns
            if isinstance(c.type, EncryptedType) and c.name in tgt.types
        ]
    skip = {tgt.pk.name, tgt.companion.name, *(declared or ())} | (
        {tgt.tenant.name} if tgt.tenant is not None else set()
    )
    candidates: list[tuple[str, str]] = []
    for name, typ in tgt.types.items():
        if name in skip:
            continue
        if isinstance(typ, sqltypes._Binary):
            candidates.append((name, "binary"))
        elif isinstance(typ, sqltypes.String):
            candidates.append((name, "text"))
    cols: list[Column[Any]] = [
        Column(n, LargeBinary() if s == "binary" else Text()) for n, s in candidates
    ]
    comp = Column(tgt.companion.name, LargeBinary())
    pk = Column(tgt.pk.name, tgt.pk.type, primary_key=True)
    raw = Table(tgt.name, MetaData(), pk, comp, *cols, schema=tgt.raw.schema)

    def count(cond: ColumnElement[bool]) -> ColumnElement[Any]:
        return func.coalesce(func.sum(case((and_(comp.is_not(None), cond), 1), else_=0)), 0)

    # Per column: values in the sealed format and (binary) non-NULL values not in it, counted
    # over every row with a companion, in SQL: substr and length work on bytes in SQLite,
    # PostgreSQL and MySQL alike (a SQLite text value is never equal to a blob).
    counts: list[ColumnElement[Any]] = [count(comp.is_not(None))]
    for col, (_, s) in zip(cols, candidates, strict=True):
        if s == "binary":
            sealed = and_(
                func.substr(col, 1, 1) == literal(_format.VERSION_BYTE, type_=LargeBinary()),
                func.length(col) >= _format.MIN_VALUE,
            )
            counts += [count(sealed), count(and_(col.is_not(None), ~sealed))]
        else:  # "CMK:..." is plaintext
            counts += [count(tgt.db.has_prefix(col, TEXT_MARKER)), literal(0)]
    with engine.connect() as conn:
        got = [int(v) for v in conn.execute(select(*counts).select_from(raw)).one()]
    with_companion = got[0]
    if declared is not None:
        # The model may also be behind the database (a column it declares plain still holds
        # ciphertext: a decryption not finished, a column it no longer maps): a rotation that
        # left such a column out would strand its values under the old companion for good.
        # A text value starting with "cmk:" is ciphertext (plaintext may not start so). A
        # binary column the model maps as plain is plain (a blind index's slots look sealed);
        # one it does not map is taken if every value is sealed (a look-alike then makes a
        # rotation refuse, never strand anything).
        assert model is not None
        for k, (name, kind) in enumerate(candidates):
            sealed_n, other_n = got[1 + 2 * k], got[2 + 2 * k]
            if sealed_n and (kind == "text" or (name not in model.columns and not other_n)):
                declared.append(name)
        return tuple(declared)
    found: list[str] = []
    ambiguous: list[tuple[str, int, int]] = []
    for k, (name, _) in enumerate(candidates):
        sealed_n, other_n = got[1 + 2 * k], got[2 + 2 * k]
        if sealed_n and other_n and name not in named:
            ambiguous.append((name, sealed_n, other_n))
        elif sealed_n:
            found.append(name)
    where = tgt.label()
    if ambiguous:
        detail = "; ".join(f"{n}: {s:,} sealed, {o:,} not" for n, s, o in ambiguous)
        raise UndeterminedColumnsError(
            f"{operation} of {where!r}: cannot tell whether binary column(s) "
            f"{[n for n, _, _ in ambiguous]!r} are encrypted ({detail}, in rows with a "
            "companion). An encrypted binary column holds only sealed values (others are "
            "tampered or corrupt); a plain one may hold look-alikes. Nothing was changed. Pass "
            "the models (metadata=, --metadata) or name the encrypted columns",
            missing=tuple(n for n, _, _ in ambiguous),
            table=tgt.name,
            column=ambiguous[0][0],
        )
    if with_companion and not found and not named:
        raise UndeterminedColumnsError(
            f"{operation} of {where!r}: {with_companion:,} row(s) hold a companion (EDEK) but "
            "no column holds a value in the sealed format: the encrypted values were decrypted "
            "(drop the companions, or name the columns) or overwritten. Nothing was changed. "
            "Pass the models (metadata=, --metadata) or name the encrypted columns",
            missing=(),
            table=tgt.name,
        )
    return tuple(found)


def _require_every_column(
    tgt: _Target, everything: Sequence[str], columns: Sequence[str], operation: str
) -> None:
    missing = tuple(c for c in everything if c not in columns)
    if missing:
        raise IncompleteColumnsError(
            f"{operation} of {tgt.label()!r} would strand encrypted column(s) "
            f"{list(missing)!r}: they share each row's companion (row id and data key) with "
            f"{list(columns)!r}, and a new companion leaves them unreadable. Name every "
            f"encrypted column ({list(everything)!r}), or leave columns out to take them all",
            missing=missing,
            table=tgt.name,
            column=missing[0],
        )


# -- helpers ---------------------------------------------------------------------------------


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


def _check_row_tenant(
    tgt: _Target, pk: Any, tenant: str, companion: bytes, crypto: _Crypto
) -> None:
    owner = crypto.tenant(companion)
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


def _check_row_claim(tgt: _Target, pk: Any, tenant: Any, companion: bytes, crypto: _Crypto) -> None:
    """:func:`_check_row_tenant` for a row read by a tool that opens values: a row whose tenant
    column is NULL is no row of its EDEK's tenant either (the column was emptied after the row
    was encrypted, or the EDEK copied into a row of no tenant), so its values are never opened
    for it: decrypted into it, they would be plaintext of that tenant in a row of none."""
    if tenant is not None:
        _check_row_tenant(tgt, pk, str(tenant), companion, crypto)
        return
    owner = crypto.tenant(companion)
    assert tgt.tenant is not None
    raise TenantMismatchError(
        f"row {_pk_repr(pk)} of {tgt.label()!r} has no tenant (its {tgt.tenant.name} is NULL) "
        f"but its EDEK belongs to tenant {owner!r}: the tenant column was emptied after the row "
        "was encrypted, or the EDEK was copied into it; investigate the row (verify() lists all "
        "such rows) before continuing",
        row_tenant=owner,
        table=tgt.name,
    )


def _note_claim(crypto: _Crypto, companion: bytes | None, tenant: Any) -> None:
    """Name, for the refusal about to be raised in the current access, the tenant the row
    claims (its envelope's, else its tenant column's): unauthenticated, so it goes in the
    event's ``row_tenant`` only (``_access``)."""
    claimed = crypto.claimed(companion, tenant)
    if claimed is not None:
        note_row_tenant(crypto.km, claimed)


def _claims_own(crypto: _Crypto, row: Any) -> bool:
    """Whether a row (``row[1]`` its tenant, ``row[-1]`` its companion) has an EDEK of the
    tenant its tenant column names; a malformed companion claims nothing."""
    if row[-1] is None or row[1] is None:
        return False
    try:
        return crypto.tenant(bytes(row[-1])) == str(row[1])
    except CMKError:
        return False


def _check_batch_args(batch_size: int, max_batches: int | None = None) -> None:
    if batch_size < 1:
        raise ConfigurationError(f"batch_size must be at least 1, not {batch_size}")
    if max_batches is not None and max_batches < 0:
        raise ConfigurationError(f"max_batches must be >= 0, not {max_batches}")


def _check_sample(sample: float | None) -> None:
    if sample is not None and not 0 < sample <= 1:
        raise ConfigurationError(f"sample must be in (0, 1], not {sample}")


def _transient(exc: DBAPIError) -> bool:
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in _TRANSIENT_SQLSTATES:
        return True
    return "database is locked" in str(orig)


def _in_transaction(bind: Engine | Connection, work: Callable[[Connection], _T]) -> _T:
    """Run ``work`` in its own transaction (on ``bind`` if it is a connection, else on one
    from the pool), retrying deadlocks and lock timeouts."""
    attempt = 0
    while True:
        attempt += 1
        try:
            if isinstance(bind, Connection):
                with bind.begin():
                    return work(bind)
            with bind.begin() as conn:
                return work(conn)
        except DBAPIError as exc:
            if attempt >= _RETRIES or not _transient(exc):
                raise
            time.sleep(0.05 * 2**attempt)


def _count(tally: dict[str, int], tenant: str, n: int = 1) -> None:
    tally[tenant] = tally.get(tenant, 0) + n


# -- database errors, scrubbed ---------------------------------------------------------------


@dataclass(frozen=True)
class _DBFailure:
    """What may be said of a database error: its class, SQLSTATE and constraint name."""

    error_class: str
    sqlstate: str | None
    constraint: str | None

    @classmethod
    def of(cls, exc: StatementError) -> _DBFailure:
        orig = exc.orig
        sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        sqlstate = sqlstate or getattr(orig, "sqlite_errorname", None)
        diag = getattr(orig, "diag", None)
        constraint = getattr(diag, "constraint_name", None) if diag is not None else None
        if constraint is None:
            # SQLite names the constraint (or table.column list) in its message, never values;
            # taken only when it is a bare identifier list.
            found = _SQLITE_CONSTRAINT.match(str(orig))
            constraint = found.group(1) if found else None
        if constraint is None and len(getattr(orig, "args", ())) == 2:
            # MariaDB and MySQL name a violated CHECK (and no value) in these two shapes.
            # Never "Duplicate entry '<value>' for key ...": that one quotes the row.
            found = _MYSQL_CHECK.match(str(orig.args[1]))  # type: ignore[union-attr]
            constraint = (found.group(1) or found.group(2)) if found else None
        return cls(
            type(orig).__name__ if orig is not None else type(exc).__name__,
            str(sqlstate) if sqlstate else None,
            str(constraint) if constraint else None,
        )


_SQLITE_CONSTRAINT = re.compile(
    r"(?:CHECK|UNIQUE|NOT NULL|FOREIGN KEY) constraint failed: ([\w.]+(?:, [\w.]+)*)\Z"
)


_MYSQL_CHECK = re.compile(
    r"(?:CONSTRAINT `(\w+)` failed for `[\w$]+`\.`[\w$]+`|Check constraint '(\w+)' is violated\.)\Z"
)


class _BatchRefused(Exception):
    """A batch's write was refused (not transiently); carries no database exception."""

    def __init__(self, failure: _DBFailure, statement: Any, params: list[dict[str, Any]]) -> None:
        super().__init__(failure.error_class)
        self.failure = failure
        self.statement = statement
        self.params = params


def _refused_row(engine: Engine, statement: Any, params: list[dict[str, Any]]) -> Any:
    """The primary key of the first row of a refused batch that the database refuses on its
    own (each tried in a transaction rolled back), or None (rows refused only together, such
    as two rows of the batch colliding in a unique index)."""
    for p in params:
        refused = False
        with engine.connect() as conn:
            trans = conn.begin()
            try:
                conn.execute(statement, p)
            except DBAPIError:
                refused = True  # the exception (values in it) is dropped here
            finally:
                trans.rollback()
        if refused:
            return p["_k"]
    return None


def _constraint_columns(engine: Engine, tgt: _Target, constraint: str | None) -> list[str]:
    """The columns of ``tgt`` a named constraint or index covers (all of them if unknown)."""
    names = list(tgt.names)
    if not constraint:
        return names
    insp = sa_inspect(engine)
    schema = tgt.raw.schema
    try:
        for uc in insp.get_unique_constraints(tgt.name, schema=schema):
            if uc.get("name") == constraint:
                return [c for c in names if c in (uc.get("column_names") or [])] or names
        for ix in insp.get_indexes(tgt.name, schema=schema):
            if ix.get("name") == constraint:
                text_ = " ".join(str(e) for e in ix.get("expressions") or [] if e)
                cols = ix.get("column_names") or []
                return [c for c in names if c in cols or re.search(rf"\b{c}\b", text_)] or names
        for ck in insp.get_check_constraints(tgt.name, schema=schema):
            if ck.get("name") == constraint:
                sqltext = str(ck.get("sqltext") or "")
                return [c for c in names if re.search(rf"\b{re.escape(c)}\b", sqltext)] or names
    except (NotImplementedError, DBAPIError):
        pass
    return names


def _database_error(
    operation: str,
    table: str | None,
    failure: _DBFailure,
    *,
    columns: Sequence[str] = (),
    pk: Any = None,
    span: tuple[Any, Any] | None = None,
) -> MigrationDatabaseError:
    where = f"row {_pk_repr(pk)}" if pk is not None else "a row"
    if pk is None and span is not None:
        where = f"a row with primary key from {_pk_repr(span[0])} to {_pk_repr(span[1])}"
    what = f" ({', '.join(columns)})" if columns else ""
    state = f", SQLSTATE {failure.sqlstate}" if failure.sqlstate else ""
    named = f", constraint {failure.constraint!r}" if failure.constraint else ""
    return MigrationDatabaseError(
        f"{operation} of {table!r}{what}: the database refused {where} "
        f"({failure.error_class}{state}{named}); nothing of the batch was written. The "
        "database's message is withheld because it quotes row values: check the constraint "
        "against the data, fix one or the other, and run the operation again",
        operation=operation,
        pk=None if pk is None else _pk_repr(pk),
        error_class=failure.error_class,
        sqlstate=failure.sqlstate,
        constraint=failure.constraint,
        table=table,
        column=columns[0] if columns else None,
    )


_P = ParamSpec("_P")


def _scrubbed(operation: str) -> Callable[[Callable[_P, _T]], Callable[_P, _T]]:
    """Turn a database error escaping ``operation`` into a MigrationDatabaseError that names
    no value and chains nothing (a DBAPI error's DETAIL and parameters hold row values)."""

    def decorate(fn: Callable[_P, _T]) -> Callable[_P, _T]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            failure = None
            try:
                return fn(*args, **kwargs)
            except StatementError as exc:
                failure = _DBFailure.of(exc)
            # Raised outside the handler: the database's exception is neither the cause nor
            # the context of ours.
            bound = signature.bind_partial(*args, **kwargs).arguments
            table = bound.get("table")
            raise _database_error(operation, table if isinstance(table, str) else None, failure)

        return run

    return decorate


# -- the KMS request budget ------------------------------------------------------------------


class _TokenBucket:
    """A token bucket: at most ``burst + rate * t`` calls in any ``t`` seconds from its start.

    Called before each provider call (through ``kms_call_gate``), from any thread of the run:
    a call takes a token, or reserves the next one and sleeps until it is due, outside the
    lock, so concurrent unwraps queue up in order. ``clock`` and ``sleep`` are seams for tests.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        # One second's worth (at least one call): short bursts of concurrent unwraps go
        # through together, and the quotas the budget is meant for are per second or longer.
        self.burst = max(1.0, rate if burst is None else burst)
        self.calls = 0
        self.waited = 0.0
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._last = clock()
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= 1.0
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
            self.calls += 1
            self.waited += wait
        if wait > 0:
            self._sleep(wait)


def _budget_of(max_kms_rps: float | None) -> _TokenBucket | None:
    if max_kms_rps is None:
        return None
    if isinstance(max_kms_rps, bool) or not isinstance(max_kms_rps, int | float):
        raise ConfigurationError(f"max_kms_rps must be a number, not {max_kms_rps!r}")
    if not 0 < max_kms_rps < float("inf"):
        raise ConfigurationError(f"max_kms_rps must be a positive number, not {max_kms_rps!r}")
    return _TokenBucket(float(max_kms_rps))


def _budgeted(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """Hold every provider call of the operation (wraps, unwraps, proofs, retries, in any of
    its threads) to its ``max_kms_rps`` keyword argument, with one token bucket per call."""

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        rate: Any = kwargs.get("max_kms_rps")  # keyword-only on every operation
        bucket = _budget_of(rate)
        if bucket is None:
            return fn(*args, **kwargs)
        token = kms_call_gate.set(bucket)
        try:
            return fn(*args, **kwargs)
        finally:
            kms_call_gate.reset(token)

    return run


# -- keys and ciphers of one call ------------------------------------------------------------


def _raw_codec(tag: int) -> Codec:
    """A codec that passes a plaintext's encoded bytes through under its own tag: the
    migration tools move values between keys without decoding them, whatever their type."""
    codec = _RAW_CODECS.get(tag)
    if codec is None:
        codec = _RAW_CODECS[tag] = Codec("raw", tag, bytes, bytes, (bytes,))
    return codec


_RAW_CODECS: dict[int, Codec] = {}
_STR_TAG = -1  # in a spec's key: the column's value is a str, sealed with the text codec


def _tag(value: bytes | str | None) -> int:
    if value is None:
        return 0  # no value: the column's codec is never used
    if isinstance(value, str):
        return _STR_TAG
    return value[0]


class _Crypto:
    """The data keys and ciphers one call of an operation uses, and the keys it owns.

    Values are opened to their raw plaintext (codec tag and encoded value), so every column
    type and both storages move alike. Keys come from the CMK's key manager: the cache or an
    unwrap this call owns; an envelope this call *wrote* is checked only with a key unwrapped
    afresh through the KMS for this call (:meth:`prove`), never with a cache entry, which
    another thread may have filled or may wipe. :meth:`close` wipes the keys the call owns.
    """

    def __init__(self, cmk: CMK, tgt: _Target, actor: str) -> None:
        self.cmk = cmk
        self.km = cmk._keys
        self.tgt = tgt
        self.actor = actor
        self.ctx = _cross(actor)
        self._keys: OrderedDict[bytes, tuple[DataKey, bool]] = OrderedDict()  # (key, owned)
        self._proven: dict[bytes, DataKey] = {}
        self._tenants: dict[bytes, str] = {}
        # column tags -> the spec sealing them, and whether every value is text
        self._specs: dict[tuple[int, ...], tuple[TableSpec, bool]] = {}

    def __enter__(self) -> _Crypto:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for key, owned in self._keys.values():
            if owned:
                key.wipe()
        for key in self._proven.values():
            key.wipe()
        self._keys.clear()
        self._proven.clear()

    def tenant(self, companion: bytes) -> str:
        """The tenant of a companion's envelope (checks the companion's form)."""
        env = companion[_SPLIT:]
        tenant = self._tenants.get(env)
        if tenant is None:
            _format.split_companion(companion)
            tenant = self._tenants[env] = _format.parse_envelope(env).tenant
        return tenant

    def load(self, envelopes: Iterable[bytes]) -> dict[bytes, CMKError]:
        """Get the keys of ``envelopes`` (concurrent unwraps); return the errors of those that
        could not be had, by envelope."""
        missing = [e for e in dict.fromkeys(envelopes) if e not in self._keys]
        errors: dict[bytes, CMKError] = {}
        if not missing:
            return errors
        fresh: list[DataKey] = []
        try:
            found = self.km.read_keys(missing, self.ctx, fresh=fresh)
        except CMKError:
            found, fresh = {}, []
            for env in missing:  # one by one, to tell which failed
                mine: list[DataKey] = []
                try:
                    found.update(self.km.read_keys([env], self.ctx, fresh=mine))
                except CMKError as exc:
                    errors[env] = exc
                fresh += mine
        owned = {id(k) for k in fresh}
        for env, key in found.items():
            self._keys[env] = (key, id(key) in owned)
        while len(self._keys) > _ENVELOPE_MEMO:
            key, owned_key = self._keys.popitem(last=False)[1]
            if owned_key:
                key.wipe()
        return errors

    def open(
        self, companion: bytes, column: str, ciphertext: bytes, *, proven: bool = False
    ) -> bytes:
        """The raw plaintext of one value; DecryptionError if it does not authenticate. With
        ``proven``, under the key :meth:`prove` unwrapped for the companion's envelope."""
        env = companion[_SPLIT:]
        if proven:
            key = self._proven[env]
        else:
            entry = self._keys.get(env)
            if entry is None:
                errors = self.load([env])
                if errors:
                    raise errors[env]
                entry = self._keys[env]
            key = entry[0]
        aad = _aad_prefix(self.tenant(companion), self.tgt.name, column) + companion[1:_SPLIT]
        return _format.open_(key.aead, aad, ciphertext)

    def authenticates(self, companion: bytes, column: str, ciphertext: bytes) -> bool:
        try:
            self.open(companion, column, ciphertext)
        except CMKError:
            return False
        return True

    def prove(self, envelope: bytes) -> None:
        """Unwrap ``envelope`` through the KMS into a key this call owns (once per call)."""
        if envelope not in self._proven:
            self._proven[envelope] = self.km.own_key(envelope, self.ctx, purpose="verify")

    def audit(self, by_tenant: Mapping[str, int]) -> None:
        """One ``decrypt`` audit event per tenant for the rows opened."""
        for tenant, rows in by_tenant.items():
            emit_ok(
                self.km,
                self.ctx,
                "decrypt",
                tenant,
                table=self.tgt.name,
                rows=rows,
                columns=self.tgt.names,
            )

    def refused(self, counts: Mapping[tuple[str | None, type[CMKError]], int]) -> None:
        """A checker's refusals (rows that did not open, counted instead of raised): one
        ``decrypt`` event per tenant the rows claim and error, ``rows`` rows each, routed as
        every refusal is (``_access``): for this call's cross-tenant context, so for no
        tenant's delivery, the claimed tenant (unauthenticated) only in ``row_tenant``."""
        for (claimed, error), rows in counts.items():
            emit_refused(
                self.km,
                self.ctx,
                "decrypt",
                error,
                table=self.tgt.name,
                columns=self.tgt.names,
                row_tenant=claimed,
                rows=rows,
            )

    def claimed(self, companion: bytes | None, tenant: Any) -> str | None:
        """The tenant a row claims (unauthenticated): its envelope's, else its tenant
        column's."""
        if companion is not None:
            with contextlib.suppress(CMKError):
                return self.tenant(companion)
        return None if tenant is None else str(tenant)

    def seal(
        self,
        tenant: str,
        rows: Sequence[Mapping[str, bytes | str]],
        companions: Sequence[bytes | None],
        witnesses: Sequence[Mapping[str, Any] | None],
    ) -> tuple[list[bytes | None], list[bytes]]:
        """Seal plaintexts for ``tenant`` with :meth:`CMK.seal`: under each row's own key where
        ``companions[i]`` is given, else under the tenant's write key. A value is raw (bytes:
        codec tag + encoded value, as :meth:`open` gives it) or text (a ``str``, sealed as
        ``EncryptedType(Text)`` would). Returns what CMK.seal returns."""
        assert self.tgt.companion is not None
        names = self.tgt.names
        specs: list[TableSpec] = []
        all_text = True
        for row in rows:
            tags = tuple([_tag(row.get(n)) for n in names])
            found = self._specs.get(tags)
            if found is None:
                comp = self.tgt.companion.name
                spec = TableSpec(
                    self.tgt.name,
                    comp,
                    comp,
                    tuple(
                        ColumnSpec(n, n, _codecs.STR if t == _STR_TAG else _raw_codec(t))
                        for n, t in zip(names, tags, strict=True)
                    ),
                )
                found = self._specs[tags] = (spec, all(t in (_STR_TAG, 0) for t in tags))
            specs.append(found[0])
            all_text = all_text and found[1]
        # Text values are sealed as they are; raw ones lose their tag (the spec's codec has it).
        payloads = (
            rows
            if all_text
            else [{n: v if type(v) is str else v[1:] for n, v in row.items()} for row in rows]
        )
        return self.cmk.seal(
            payloads,
            specs,
            [s.columns for s in specs],
            companions,
            TenantContext(tenant_id=tenant, actor=self.actor),
            witnesses,
        )

    def check_written(self, rows: Sequence[_Written], new: set[bytes]) -> None:
        """Every ciphertext a batch wrote must authenticate under the key its row's companion
        names: for an envelope this call created (``new``), a key unwrapped afresh through the
        KMS for this call (:meth:`prove`), never a cache entry; else the row's own key.

        ``rows`` are the batch's rows as read back after the update, each holding byte for byte
        what was written (:meth:`_Batch.apply`), so the ciphertexts opened here are the stored
        ones; they come from memory, which spares decoding the stored text again.
        """
        # The hot loop of every encrypt and rotate batch: one AEAD open per value written,
        # with the associated data's prefix computed once per envelope run.
        tgt = self.tgt
        open_ = _format.open_
        bad: Any = _NONE
        last: bytes | None = None
        aead: Any = None
        prefixes: list[bytes] = []
        # Consecutive rows often alternate tenants: the key and prefixes of each envelope are
        # kept for the batch.
        seen: dict[bytes, tuple[Any, list[bytes]]] = {}
        for pk, companion, sealed in rows:
            if companion is None:
                if sealed:  # a ciphertext with no key named for it
                    bad = pk
                    break
                continue
            try:
                env = companion[_SPLIT:]
                if env != last:
                    found = seen.get(env)
                    if found is None:
                        if env in new:
                            self.prove(env)
                            key = self._proven[env].aead
                        else:
                            errors = self.load([env])
                            if errors:
                                raise errors[env]
                            key = self._keys[env][0].aead
                        tenant = self.tenant(companion)
                        found = seen[env] = (
                            key,
                            [_aad_prefix(tenant, tgt.name, n) for n in tgt.names],
                        )
                    aead, prefixes = found
                    last = env
                row_id = companion[1:_SPLIT]
                for j, ct in sealed:
                    open_(aead, prefixes[j] + row_id, ct)
            except DecryptionError:
                bad = pk
                break
        if bad is not _NONE:
            raise UnreadableWriteError(
                f"row {_pk_repr(bad)} of {self.tgt.label()!r} did not read back after the write "
                "(a value does not decrypt under the key its companion names, unwrapped "
                "through the KMS): the batch was rolled back, nothing was written. The KMS or "
                "provider returns keys it cannot give back; check it before running again",
                table=self.tgt.name,
            )


_NONE = object()


class _Batch:
    """The compare-and-swap updates of one batch, in one executemany, checked after the write.

    Each row gets its old values (all compared) and new values. After the update, the batch's
    rows are read back in the same transaction: a row is this batch's when it holds exactly
    the new values (a lost compare-and-swap leaves another writer's values), and the rows that
    are ours go through ``check`` before the transaction commits, so a write that does not
    read back is rolled back instead of committed.
    """

    def __init__(self, tgt: _Target) -> None:
        self.tgt = tgt
        self.params: list[dict[str, Any]] = []
        self.tenants: list[str] = []
        self.sealed: list[Sequence[tuple[int, bytes]]] = []
        n = len(tgt.cols)
        self._keys = [(f"_o{i}", f"_n{i}") for i in range(n)]
        self._has_tenant = tgt.tenant is not None

    def add(
        self,
        pk: Any,
        tenant_raw: Any,
        old: Sequence[Any],
        new: Sequence[Any],
        old_companion: bytes | None,
        new_companion: bytes | None,
        tenant: str,
        sealed: Sequence[tuple[int, bytes]] = (),
    ) -> None:
        """One row's update; ``sealed`` lists the ciphertexts written (column index, bytes)
        for the check."""
        p: dict[str, Any] = {"_k": pk, "_oe": old_companion, "_ne": new_companion}
        if self._has_tenant:
            p["_t"] = tenant_raw
        for (ko, kn), o, n in zip(self._keys, old, new, strict=True):
            p[ko] = o
            p[kn] = n
        self.params.append(p)
        self.tenants.append(tenant)
        self.sealed.append(sealed)

    def statement(self) -> Any:
        tgt = self.tgt
        assert tgt.companion is not None
        same = tgt.db.same
        conds: list[ColumnElement[bool]] = [tgt.pk == bindparam("_k")]
        if tgt.tenant is not None:
            conds.append(same(tgt.tenant, bindparam("_t")))
        conds += [same(c, bindparam(f"_o{i}")) for i, c in enumerate(tgt.cols)]
        conds.append(same(tgt.companion, bindparam("_oe")))
        values: dict[Any, Any] = {c: bindparam(f"_n{i}") for i, c in enumerate(tgt.cols)}
        values[tgt.companion] = bindparam("_ne")
        return update(tgt.raw).where(and_(*conds)).values(values)

    def set_based(self, conn: Connection) -> tuple[Any, dict[str, str]] | None:
        """PostgreSQL: the batch's compare-and-swap updates as one ``UPDATE ... FROM
        json_to_recordset(:rows)``: one statement and one parameter for the batch, where an
        executemany sends a statement per row, and a JSON text is far cheaper to send than
        arrays (PostgreSQL parses it in C; bytes travel as ``\\x`` hex, which ``bytea``
        reads). Every compare of the executemany is kept. None where it does not apply
        (another database, a column receiving plaintext of an arbitrary type, a key or
        tenant column type without a name)."""
        tgt = self.tgt
        if not tgt.db.set_based_update or "plain" in tgt.storage or tgt.companion is None:
            return None
        sql = tgt.bulk_update
        if sql is None:
            dialect = conn.dialect
            q = dialect.identifier_preparer.quote
            fields = [("_k", tgt.pk)]
            if tgt.tenant is not None:
                fields.append(("_t", tgt.tenant))
            try:
                types = {n: tgt.types[c.name].compile(dialect=dialect) for n, c in fields}
            except CompileError:
                return None
            conds = [f"_cmk_t.{q(tgt.pk.name)} = _cmk_v._k"]
            if tgt.tenant is not None:
                conds.append(f"_cmk_t.{q(tgt.tenant.name)} = _cmk_v._t")
            sets = []
            for i, (c, kind) in enumerate(zip(tgt.cols, tgt.storage, strict=True)):
                types[f"_o{i}"] = types[f"_n{i}"] = "BYTEA" if kind == "binary" else "TEXT"
                conds.append(f"_cmk_t.{q(c.name)} IS NOT DISTINCT FROM _cmk_v._o{i}")
                sets.append(f"{q(c.name)} = _cmk_v._n{i}")
            types["_oe"] = types["_ne"] = "BYTEA"
            conds.append(f"_cmk_t.{q(tgt.companion.name)} IS NOT DISTINCT FROM _cmk_v._oe")
            sets.append(f"{q(tgt.companion.name)} = _cmk_v._ne")
            table = dialect.identifier_preparer.format_table(tgt.raw)
            returning = [tgt.pk, *tgt.cols, tgt.companion]
            statement = text(
                f"UPDATE {table} AS _cmk_t SET {', '.join(sets)} "  # noqa: S608
                "FROM json_to_recordset(CAST(:_rows AS JSON)) AS _cmk_v("
                + ", ".join(f"{n} {t}" for n, t in types.items())
                + ") WHERE "
                + " AND ".join(conds)
                + " RETURNING "
                + ", ".join(f"_cmk_t.{q(c.name)}" for c in returning)
            )
            sql = tgt.bulk_update = statement
        return sql, {"_rows": json.dumps(self.params, ensure_ascii=False, default=_json)}

    def apply(
        self,
        conn: Connection,
        report: Report,
        check: Callable[[list[_Written]], None] | None = None,
    ) -> None:
        if not self.params:
            return
        tgt = self.tgt
        assert tgt.companion is not None
        statement = self.statement()
        failure = None
        now: dict[Any, Any] | None = None
        try:
            bulk = self.set_based(conn)
            if bulk is not None:
                # RETURNING reads back each updated row as stored, in the same statement.
                now = {r[0]: r[1:] for r in conn.execute(bulk[0], bulk[1]).all()}
            else:
                conn.execute(statement, self.params)
        except DBAPIError as exc:
            if _transient(exc):
                raise
            failure = _DBFailure.of(exc)
        if failure is not None:  # outside the handler: nothing chains the database's error
            raise _BatchRefused(failure, statement, self.params)
        n = len(self.params)
        ncols = len(tgt.cols)
        if now is None:  # the executemany: a SELECT of the batch's rows reads them back
            pks = [p["_k"] for p in self.params]
            read = select(tgt.pk, *tgt.cols, tgt.companion)
            lo = hi = None
            if all(type(k) is int for k in pks):
                lo, hi = min(pks), max(pks)
            if lo is not None and hi is not None and hi - lo < 2 * n:
                # A dense batch (the usual case): a range is much cheaper to bind than IN.
                read = read.where(tgt.pk >= bindparam("_lo"), tgt.pk <= bindparam("_hi"))
            else:
                read = read.where(tgt.pk.in_(bindparam("_pks", expanding=True)))
            result = conn.execute(read, {"_lo": lo, "_hi": hi, "_pks": pks})
            now = {r[0]: r[1:] for r in result.all()}
        # A row is ours when every stored value equals, byte for byte, what was written; the
        # ciphertexts checked below are then the stored ones.
        ours: list[_Written] = []
        keys = [kn for _, kn in self._keys]
        by_tenant = report.by_tenant
        for p, t, sealed in zip(self.params, self.tenants, self.sealed, strict=True):
            current = now.get(p["_k"])
            if current is None or not _same(current[ncols], p["_ne"]):
                continue
            for i in range(ncols):
                if not _same(current[i], p[keys[i]]):
                    break
            else:
                ours.append((p["_k"], _as_bytes(current[ncols]), sealed))
                by_tenant[t] = by_tenant.get(t, 0) + 1
        if check is not None and ours:
            check(ours)
        report.rows += len(ours)
        report.conflicts += n - len(ours)


def _json(value: Any) -> str:
    """A parameter JSON does not know, as PostgreSQL's text input reads it: bytes as ``bytea``
    hex (``\\x...``), anything else (a UUID, a Decimal key...) as its ``str``."""
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + value.hex()
    return str(value)


#: A row a batch wrote, as read back: (primary key, stored companion, the ciphertexts written
#: by column index), the stored values having been found equal to the written ones.
_Written = tuple[Any, bytes | None, Sequence[tuple[int, bytes]]]


def _same(stored: Any, value: Any) -> bool:
    if type(value) is str:
        return bool(stored == value)
    if stored is None or value is None:
        return stored is value
    if isinstance(value, bytes):
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
    max_passes: int | None = None,
) -> None:
    """Walk the rows matching ``pending`` by primary key, one transaction per batch, in passes
    until a pass finds nothing (or ``max_passes`` passes: for a ``pending`` that a handled row
    may still match, such as a blind index's candidates, whose SQL cannot tell a rightly
    empty derived value from a missing one). ``handle`` updates a batch inside its transaction
    and counts into the report it is given, merged into ``report`` once the transaction committed.

    On PostgreSQL, batches are claimed with ``FOR UPDATE SKIP LOCKED``; once a pass finds
    nothing, a confirming pass uses plain ``FOR UPDATE`` (it waits for rows others hold, then
    sees their new values), so returning means nothing pending is left. Only an empty batch
    ends a pass: after waiting for a lock, PostgreSQL may return fewer rows than the limit.

    A batch the database refuses raises :class:`MigrationDatabaseError`, naming the first row
    it refuses on its own, and no value.
    """
    assert tgt.companion is not None
    selected = [tgt.pk] + ([tgt.tenant] if tgt.tenant is not None else [])
    selected += [*tgt.cols, tgt.companion]
    base = select(*selected).order_by(tgt.pk).limit(batch_size)
    first, after = base.where(pending), base.where(pending, tgt.pk > bindparam("_last"))
    # One connection for the walk, a transaction per batch: no pool checkout per batch.
    with engine.connect() as walker, tgt.db.fast_commits(walker):
        # Known once connected: MariaDB before 10.6 and MySQL before 8.0 have no SKIP LOCKED,
        # and walk without row locks, as SQLite does (each write compares and swaps anyway).
        locks = tgt.db.row_locks and tgt.db.skip_locked(walker.dialect)
        skip = locks
        while True:
            report.passes += 1
            if max_passes is not None and report.passes >= max_passes:
                skip = False  # the last pass waits for rows others hold
            found = 0
            last: Any = None
            if locks:
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

                refused = None
                try:
                    last_pk, n, part = _in_transaction(walker, batch)
                except _BatchRefused as exc:
                    refused = exc
                if refused is not None:
                    pks = [p["_k"] for p in refused.params]
                    raise _database_error(
                        report.operation,
                        tgt.name,
                        refused.failure,
                        columns=_constraint_columns(engine, tgt, refused.failure.constraint),
                        pk=_refused_row(engine, refused.statement, refused.params),
                        span=(min(pks), max(pks)),
                    )
                if not n:
                    break
                _merge(report, part)
                found += n
                last = last_pk
                report.batches += 1
                if progress is not None:
                    progress(
                        Progress(report.operation, tgt.name, report.rows, total, _now() - started)
                    )
            if max_passes is not None and report.passes >= max_passes:
                return
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


# -- public API ------------------------------------------------------------------------------


@_scrubbed("ensure_companion")
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


@_scrubbed("encrypt")
@_budgeted
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
    max_kms_rps: float | None = None,
    into: Mapping[str, str] | None = None,
) -> Report:
    """Encrypt, in place, every plaintext value of the text ``columns`` (see module docstring);
    or, with ``into``, move each column's values into a binary column.

    Each batch is one ``SELECT``, one ``executemany`` ``UPDATE`` and one ``SELECT`` reading the
    rows back, in one transaction; rows are sealed per tenant (one ``CMK.seal`` per tenant of
    the batch, so one KMS wrap per tenant and write-key window). Before the transaction
    commits, every value written is decrypted as stored, under a key unwrapped afresh through
    the KMS for each new envelope (once per call): a write key the KMS cannot give back (a
    provider whose wrap returns an unusable blob) fails the batch, which is rolled back, so no
    plaintext is ever replaced by a ciphertext nothing can read. ``max_batches`` stops early
    (for tests and for spreading work); the next call resumes. Run it from as many processes
    as you like on PostgreSQL; on SQLite, one.

    Each row is sealed under the tenant named in its ``tenant_column``; without one, the column
    the model declares with :func:`sqlalchemy_cmk.tenant_column`, found in ``metadata`` (a
    ``MetaData``, a declarative base or the ``Table``; see :func:`resolve_tenant_column`). The
    other functions here take the two arguments alike.

    ``max_kms_rps`` caps the call's KMS requests per second: every wrap, unwrap, proof and
    retry it makes, in all its threads, waits for a token of one bucket (bursts up to one
    second's worth), so a long run stays inside the tenants' KMS quotas (see "KMS request
    budget" in docs/migrations.md). With several worker processes, give each its share.

    ``into`` (``{"ssn": "ssn_enc"}``) moves every column named into an existing binary column,
    online, for a model that declares the target ``EncryptedType(<the source's type>)`` (the
    default, binary storage): each value is sealed exactly as that type writes it (bound to
    the *target's* name, as the ORM binds it) and written to the target while the source
    becomes NULL, in the same compare-and-swap update, so a killed run resumes and an
    application write in between is never overwritten. A source value already in the text
    storage (``cmk:``, from an earlier in-place encryption) is opened and sealed again under
    its row's key, never encrypted twice. The source may be of any type ``EncryptedType``
    takes, of any length; the plaintext is encoded as the model's ``EncryptedType`` for the
    target declares (``metadata``), else as the source's own type. Meanwhile the application
    reads the source while it holds a value, else the target, and writes the target (NULLing
    the source); then :func:`check_cutover` says when the source can be dropped. See "Moving
    a text column into binary storage" in docs/migrations.md.

    Returns:
        What this call did: ``rows`` it encrypted (by tenant), compare-and-swap ``conflicts``
        (rows an application write changed in between: left to the application's value, and
        picked up by a later pass if still plaintext), ``batches`` and ``passes``.

    Raises:
        ConfigurationError: unknown table or column, no companion column, a composite primary
            key, a non-text or length-limited column, a row whose tenant column is NULL; no
            tenant column given or declared, or one given that contradicts the declared one.
            With ``into``: a target that is missing, not binary, too small for the source's
            values, the source itself or another's target; a column left out of ``into``; a
            source type ``EncryptedType`` cannot take, or that the model's target type
            contradicts.
        UniqueColumnError: a unique index or constraint covers a column (or, with ``into``, a
            target); nothing changed.
        TenantNotConfiguredError: a row's tenant has no key (names the tenant); nothing of that
            batch is written, earlier batches stay done.
        TenantMismatchError: a row's existing EDEK belongs to another tenant than its tenant
            column says.
        KeyAccessError: a tenant's KMS refused or failed; nothing of that batch is written.
        UnreadableWriteError: a value written did not read back; nothing of that batch is
            written.
        MigrationDatabaseError: the database refused a batch (names the row, never a value).
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
        into=into,
    )
    report = Report("encrypt", table, tuple(columns))
    if tgt.into:
        pending = or_(*(tgt.cols[i].is_not(None) for i in tgt.into))
        move = _mover(tgt, _move_codecs(tgt, metadata))
        _refuse_occupied_targets(engine, tgt)
        with _Crypto(cmk, tgt, actor) as crypto:
            _walk(
                engine,
                tgt,
                report,
                pending=pending,
                handle=functools.partial(_with, move, crypto),
                batch_size=batch_size,
                max_batches=max_batches,
                progress=progress,
                started=started,
                total=_total(engine, tgt, pending) if progress is not None else None,
            )
        report.seconds = _now() - started
        return report
    pending = or_(*(tgt.plaintext(i) for i in range(len(tgt.cols))))
    total = _total(engine, tgt, pending) if progress is not None else None
    ncols = len(tgt.cols)

    names = tgt.names
    b64encode = base64.b64encode

    def handle(conn: Connection, rows: Sequence[Any], part: Report, crypto: _Crypto) -> None:
        # Per-row work is the cost of a batch: one pass to sort values, a seal per tenant,
        # one pass to build the updates.
        groups: dict[str, list[int]] = {}
        values: list[dict[str, bytes | str]] = []
        witnesses: list[dict[str, bytes] | None] = []
        comps: list[bytes | None] = []
        # The rows' checks are the batch's access for the operator's cross-tenant context: a
        # row refused here (another tenant's EDEK, ciphertext with no EDEK) is audited once
        # before the error propagates. Each tenant's seal is an access of its own (CMK.seal,
        # under that tenant's context), so it stays outside this scope, which it would join.
        with access(crypto.km, crypto.ctx, "encrypt") as acc:
            acc.table(tgt.name, names)
            sort_rows(rows, groups, values, witnesses, comps, crypto)
        sealed = _seal_groups(crypto, groups, values, comps, witnesses)
        _write_sealed(
            tgt,
            rows,
            values,
            comps,
            sealed,
            conn,
            part,
            crypto,
            lambda ct: TEXT_MARKER + b64encode(ct).decode("ascii"),
        )

    def sort_rows(
        rows: Sequence[Any],
        groups: dict[str, list[int]],
        values: list[dict[str, bytes | str]],
        witnesses: list[dict[str, bytes] | None],
        comps: list[bytes | None],
        crypto: _Crypto,
    ) -> None:
        for i, row in enumerate(rows):
            pk, tenant_raw = row[0], row[1]
            tenant = tenant_raw if type(tenant_raw) is str else _require_tenant(tgt, pk, tenant_raw)
            d: dict[str, bytes | str] = {}
            witness: dict[str, bytes] | None = None
            for j in range(ncols):
                v = row[2 + j]
                if v is None:
                    continue
                if not v.startswith(TEXT_MARKER):  # every column here is text storage
                    d[names[j]] = v
                    continue
                ct = tgt.ciphertext(j, v)
                assert ct is not None
                if witness is None:
                    witness = {}
                witness[names[j]] = ct
            comp = row[-1]
            if comp is not None:
                comp = bytes(comp)
                _check_row_tenant(tgt, pk, tenant, comp, crypto)
            elif witness:
                raise DecryptionError(
                    f"row {_pk_repr(pk)} of {tgt.label()!r} holds encrypted values but its "
                    "EDEK column is NULL: the row cannot be decrypted; restore its EDEK or "
                    "its values before continuing",
                    table=tgt.name,
                )
            group = groups.get(tenant)
            if group is None:
                group = groups[tenant] = []
            group.append(i)
            values.append(d)
            witnesses.append(witness)
            comps.append(comp)

    with _Crypto(cmk, tgt, actor) as crypto:
        _walk(
            engine,
            tgt,
            report,
            pending=pending,
            handle=functools.partial(_with, handle, crypto),
            batch_size=batch_size,
            max_batches=max_batches,
            progress=progress,
            started=started,
            total=total,
        )
    report.seconds = _now() - started
    return report


def _move_codecs(tgt: _Target, metadata: Models | None) -> dict[int, Codec]:
    """encrypt's ``into=``: by source index, the codec its values are sealed with: the one of
    the model's ``EncryptedType`` for the target (what the application will read them with),
    else the one of the source's own type. A model that declares the target otherwise (not
    encrypted, the text storage, another value type) is refused before anything is written."""
    model, _ = _model_table(tgt.name, tgt.raw.schema, metadata)
    codecs: dict[int, Codec] = {}
    for s, t in tgt.into.items():
        src, dst = tgt.cols[s].name, tgt.cols[t].name
        own = codec_for(tgt.types[src])
        declared = model.columns.get(dst) if model is not None else None
        if declared is None:
            codecs[s] = own
            continue
        typ = declared.type
        if not isinstance(typ, EncryptedType) or typ.storage != "binary":
            raise ConfigurationError(
                f"the model declares {tgt.label()}.{dst} as {typ!r}: the values of {src!r} are "
                "moved into it as EncryptedType(<type>) with the default (binary) storage "
                "writes them; declare it so",
                table=tgt.name,
                column=dst,
            )
        if typ.codec.tag != own.tag:
            raise ConfigurationError(
                f"the model declares {tgt.label()}.{dst} as {typ!r}, which reads "
                f"{typ.codec.name} values, but {src!r} holds {own.name} values: move the "
                "values as they are, and change their type in a migration of its own",
                table=tgt.name,
                column=dst,
            )
        codecs[s] = typ.codec
    return codecs


def _mover(
    tgt: _Target, codecs: Mapping[int, Codec]
) -> Callable[[Connection, Sequence[Any], Report, _Crypto], None]:
    """encrypt's ``into=``: the batch handler that seals each source value into its target
    and NULLs the source, in one compare-and-swap update per row, read back before commit."""
    names = tgt.names
    pairs = sorted(tgt.into.items())
    str_tag = _codecs.STR.tag

    def move(conn: Connection, rows: Sequence[Any], part: Report, crypto: _Crypto) -> None:
        for row in rows:  # a target written since the start is never overwritten
            _refuse_occupied_row(tgt, row)
        # A text-storage value is opened under its row's key: load every such key at once.
        # One access per batch: a refusal (a value that does not decrypt, a KMS error) is
        # audited once, for the operator's cross-tenant context, before it propagates.
        with access(crypto.km, crypto.ctx, "decrypt") as acc:
            acc.table(tgt.name, names)
            # Tenants first, as _open_batch checks them: nothing is unwrapped for a batch
            # refused for another tenant's EDEK in one of its rows.
            tenants: list[str] = []
            for row in rows:
                pk, tenant_raw = row[0], row[1]
                tenant = (
                    tenant_raw if type(tenant_raw) is str else _require_tenant(tgt, pk, tenant_raw)
                )
                if row[-1] is not None:
                    _check_row_tenant(tgt, pk, tenant, bytes(row[-1]), crypto)
                tenants.append(tenant)
            errors = crypto.load(
                bytes(row[-1])[_SPLIT:]
                for row in rows
                if row[-1] is not None
                and any(
                    tgt.storage[s] == "text" and tgt.ciphertext(s, row[2 + s]) for s, _ in pairs
                )
            )
            groups: dict[str, list[int]] = {}
            values: list[dict[str, bytes | str]] = []
            witnesses: list[dict[str, bytes] | None] = []
            comps: list[bytes | None] = []
            opened: dict[str, int] = {}
            for i, row in enumerate(rows):
                pk, tenant = row[0], tenants[i]
                comp = _as_bytes(row[-1])
                d: dict[str, bytes | str] = {}
                witness: dict[str, bytes] | None = None
                for s, t in pairs:
                    v = row[2 + s]
                    if v is None:
                        continue
                    ct = tgt.ciphertext(s, v)
                    codec = codecs[s]
                    if ct is None:  # plaintext: encoded as the target's EncryptedType encodes it
                        if type(v) is str and codec.tag == str_tag:
                            d[names[t]] = v
                        else:
                            d[names[t]] = _codecs.encode(codec, v, table=tgt.name, column=names[t])
                        continue
                    pt = None
                    if comp is not None:
                        error = errors.get(comp[_SPLIT:])
                        if error is not None:
                            raise error
                        with contextlib.suppress(DecryptionError):
                            pt = crypto.open(comp, names[s], ct)
                    if pt is None:
                        _note_claim(crypto, comp, tenant)
                        raise DecryptionError(
                            f"row {_pk_repr(pk)} of {tgt.label()!r}: {names[s]} holds an "
                            "encrypted value that does not decrypt (or its EDEK is NULL); "
                            "nothing of its batch was written: run verify() for a full report",
                            table=tgt.name,
                        )
                    if pt[0] != codec.tag:
                        raise ConfigurationError(
                            f"row {_pk_repr(pk)} of {tgt.label()!r}: {names[s]} holds a value "
                            f"written as another type than {codec.name}; nothing of its batch was "
                            "written",
                            table=tgt.name,
                            column=names[s],
                        )
                    d[names[t]] = pt  # the raw plaintext, sealed again: never encrypted twice
                    if witness is None:
                        witness = {}
                    witness[names[s]] = ct
                if witness:
                    _count(opened, tenant)
                groups.setdefault(tenant, []).append(i)
                values.append(d)
                witnesses.append(witness)
                comps.append(comp)
            crypto.audit(opened)
        sealed = _seal_groups(crypto, groups, values, comps, witnesses)
        _write_sealed(
            tgt,
            rows,
            values,
            comps,
            sealed,
            conn,
            part,
            crypto,
            lambda ct: ct,
            cleared=[s for s, _ in pairs],
        )

    return move


def _write_sealed(
    tgt: _Target,
    rows: Sequence[Any],
    values: Sequence[Mapping[str, bytes | str]],
    comps: Sequence[bytes | None],
    sealed: tuple[list[bytes | None], list[list[bytes]], set[bytes]],
    conn: Connection,
    part: Report,
    crypto: _Crypto,
    stored: Callable[[bytes], Any],
    *,
    cleared: Sequence[int] = (),
) -> None:
    """Write a batch's sealed values (``_seal_groups``' result): each row's columns in
    ``values`` get their ciphertext as ``stored(ct)`` (the column's storage), the ``cleared``
    columns NULL (a move's sources), in one compare-and-swap update per row, read back before
    commit."""
    new_comps, cts, new_envs = sealed
    names = tgt.names
    ncols = len(tgt.cols)
    batch = _Batch(tgt)
    for i, row in enumerate(rows):
        d = values[i]
        if not d:
            continue  # nothing to seal (cannot happen: the row matched)
        old = row[2 : 2 + ncols]
        new = list(old)
        written: list[tuple[int, bytes]] = []
        row_cts = iter(cts[i])
        for j in range(ncols):  # the seal's flat order: the spec's, i.e. names' order
            if names[j] in d:
                ct = next(row_cts)
                new[j] = stored(ct)
                written.append((j, ct))
        for j in cleared:
            new[j] = None
        comp = comps[i]
        new_comp = new_comps[i]
        batch.add(
            row[0],
            row[1],
            old,
            new,
            comp,
            new_comp if new_comp is not None else comp,
            str(row[1]),
            written,
        )
    batch.apply(conn, part, lambda ours: crypto.check_written(ours, new_envs))


def _seal_groups(
    crypto: _Crypto,
    groups: Mapping[str, list[int]],
    values: Sequence[Mapping[str, bytes | str]],
    comps: Sequence[bytes | None],
    witnesses: Sequence[dict[str, bytes] | None],
) -> tuple[list[bytes | None], list[list[bytes]], set[bytes]]:
    """Seal a batch's values, tenant by tenant (``groups``: tenant -> row indexes), before any
    is written, so that a failure writes nothing of the batch. Returns, by row, the new
    companion (None: unchanged) and the ciphertexts in the spec's column order, and the set of
    new envelopes (for the read-back check)."""
    new_comps: list[bytes | None] = [None] * len(values)
    cts: list[list[bytes]] = [[]] * len(values)
    new_envs: set[bytes] = set()
    for tenant, idx in groups.items():
        sealed_comps, flat = crypto.seal(
            tenant,
            [values[i] for i in idx],
            [comps[i] for i in idx],
            [witnesses[i] for i in idx],
        )
        k = 0
        for i, new_comp in zip(idx, sealed_comps, strict=True):
            if new_comp is not None:
                new_envs.add(new_comp[_SPLIT:])
            new_comps[i] = new_comp
            n = len(values[i])
            cts[i] = flat[k : k + n]
            k += n
    return new_comps, cts, new_envs


def _refuse_occupied_row(tgt: _Target, row: Sequence[Any]) -> None:
    """A move's batch (encrypt's or decrypt's ``into=``; ``row[2:]`` the target's columns):
    refuse a row that holds a value in both a source and its target, as
    :func:`_refuse_occupied_targets` refuses them all at the start: one written since (an
    instance on the old model) would be overwritten, its value lost. Nothing of the batch is
    written."""
    for s, t in sorted(tgt.into.items()):
        if row[2 + s] is not None and row[2 + t] is not None:
            src, dst = tgt.cols[s].name, tgt.cols[t].name
            raise ConfigurationError(
                f"row {_pk_repr(row[0])} of {tgt.label()!r} holds a value in both {src!r} and "
                f"{dst!r}: a move fills an empty target, and would overwrite it. Check that "
                "every instance runs the model reading both columns (docs/migrations.md); "
                "nothing of its batch was written",
                table=tgt.name,
                column=dst,
            )


def _refuse_occupied_targets(bind: Engine | Connection, tgt: _Target) -> None:
    """A move (encrypt's or decrypt's ``into=``): refuse, before any write, a target holding
    values in rows whose source holds one too. Through the documented model the two never both
    hold one (a write fills the target and empties the source), so such rows mean a target
    that is not the column meant (its values would be overwritten) or an instance still on the
    old model. Each batch checks its rows again (:func:`_refuse_occupied_row`)."""
    with bind.connect() if isinstance(bind, Engine) else contextlib.nullcontext(bind) as conn:
        for s, t in sorted(tgt.into.items()):
            src, dst = tgt.cols[s], tgt.cols[t]
            both = conn.execute(
                select(func.count()).select_from(tgt.raw).where(src.is_not(None), dst.is_not(None))
            ).scalar_one()
            if both:
                raise ConfigurationError(
                    f"{both} rows of {tgt.label()!r} hold a value in both {src.name!r} and "
                    f"{dst.name!r}: a move fills an empty target, and would overwrite these. "
                    f"Check that {dst.name!r} is the column meant, and that every instance "
                    "runs the model reading both columns (docs/migrations.md); nothing was "
                    "written",
                    table=tgt.name,
                    column=dst.name,
                )


def _codec_of_tag(tag: int, table: str, column: str) -> Codec:
    """The codec a value was written with, from its tag (for a column no model describes)."""
    types = _TAG_TYPES.get(tag)
    if types is None:
        raise ConfigurationError(
            f"{table}.{column} holds a value of an unknown type (tag {tag}): pass the model as "
            "metadata= so its declared type decodes it",
            table=table,
            column=column,
        )
    return codec_for(types())


_TAG_TYPES: dict[int, Callable[[], sqltypes.TypeEngine[Any]]] = {
    1: sqltypes.Text,
    2: sqltypes.LargeBinary,
    3: sqltypes.BigInteger,
    4: sqltypes.Numeric,
    5: sqltypes.Boolean,
    6: sqltypes.Date,
    7: sqltypes.DateTime,
    8: sqltypes.Time,
    9: sqltypes.JSON,
    10: sqltypes.Uuid,
}


def _with(
    handle: Callable[[Connection, Sequence[Any], Report, _Crypto], None],
    crypto: _Crypto,
    conn: Connection,
    rows: Sequence[Any],
    part: Report,
) -> None:
    handle(conn, rows, part, crypto)


def _open_batch(
    crypto: _Crypto, tgt: _Target, rows: Sequence[Any], first_col: int
) -> list[dict[int, bytes]]:
    """Open every ciphertext of a batch to its raw plaintext (row -> column index -> bytes);
    a value that does not decrypt raises DecryptionError naming its row, and a row whose
    tenant column (``row[1]``, when not NULL) disagrees with its EDEK TenantMismatchError,
    before anything of the batch is written."""
    # One access per batch: a refusal is audited once, before it propagates.
    with access(crypto.km, crypto.ctx, "decrypt") as acc:
        acc.table(tgt.name, tgt.names)
        ncols = len(tgt.cols)
        # Tenants first, as a load checks them: nothing is unwrapped for a refused batch.
        # Another tenant's ciphertext in a row opens under that tenant's key: it is never
        # written back to the row in plaintext (or under a new key).
        for row in rows:
            if row[-1] is not None:
                _check_row_claim(tgt, row[0], row[1], bytes(row[-1]), crypto)
        errors = crypto.load(
            _as_bytes(row[-1])[_SPLIT:]  # type: ignore[index]
            for row in rows
            if row[-1] is not None
        )
        opened: list[dict[int, bytes]] = []
        by_tenant: dict[str, int] = {}
        for row in rows:
            comp = _as_bytes(row[-1])
            out: dict[int, bytes] = {}
            bad = False
            for j, v in enumerate(row[first_col : first_col + ncols]):
                ct = tgt.ciphertext(j, v)
                if ct is None:
                    continue
                if comp is None:
                    bad = True
                    break
                error = errors.get(comp[_SPLIT:])
                if error is not None:
                    raise error
                try:
                    out[j] = crypto.open(comp, tgt.cols[j].name, ct)
                except DecryptionError:
                    bad = True
                    break
            if bad:
                _note_claim(crypto, comp, row[1])
                raise DecryptionError(
                    f"row {_pk_repr(row[0])} of {tgt.label()!r} did not decrypt; nothing of its "
                    "batch was written: run verify() for a full report",
                    table=tgt.name,
                )
            if out and comp is not None:
                _count(by_tenant, crypto.tenant(comp))
            opened.append(out)
        crypto.audit(by_tenant)
    return opened


@_scrubbed("decrypt")
@_budgeted
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
    into: Mapping[str, str] | None = None,
    max_kms_rps: float | None = None,
) -> Report:
    """The reverse: restore every encrypted value of ``columns`` to its plaintext, with the
    same batching, locking and compare-and-swap; each batch is read back before it commits
    (the rows must hold exactly what was written).

    A text-storage column is restored in place, byte for byte. A column may instead be
    decrypted ``into`` another, existing column (``{"ssn": "ssn_plain"}``), and must be if it
    uses the binary (default) storage, where plaintext has no place: the plaintext, decoded as
    the column's type (the model's, given ``metadata``; else the type the value was written
    as), goes to the target column and the encrypted value becomes NULL in the same update,
    so a rerun resumes where a killed run stopped. The application reads the target where the
    source is NULL meanwhile.

    The companion column and its values are left in place (other columns may still use them).
    Deploy the application with ``allow_plaintext=True`` before an in-place run, and with a
    plain ``Text`` column once it is done.

    ``max_kms_rps`` caps the call's KMS requests per second: every wrap, unwrap, proof and
    retry it makes, in all its threads, waits for a token of one bucket (bursts up to one
    second's worth), so a long run stays inside the tenants' KMS quotas (see "KMS request
    budget" in docs/migrations.md). With several worker processes, give each its share.

    Raises:
        ConfigurationError: as :func:`encrypt_columns`; a binary-storage column without an
            ``into`` target; a target that is missing, encrypted or taken; a text column's
            value whose type is not text.
        DecryptionError: a value did not decrypt (names the row); nothing of its batch is
            written. Run :func:`verify` for the full list.
        TenantMismatchError: a row's tenant column disagrees with its EDEK's tenant (another
            tenant's ciphertext is never written in plaintext into this row); nothing of its
            batch is written.
        KeyAccessError: a tenant's KMS refused or failed.
        MigrationDatabaseError: the database refused a plaintext (a CHECK constraint, a unique
            index): names the row, the constraint and SQLSTATE, never the value; nothing of
            the batch is written.
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
        into=into,
    )
    for j, s in enumerate(tgt.storage):
        if s == "binary" and j not in tgt.into:
            raise ConfigurationError(
                f"{tgt.label()}.{tgt.cols[j].name} is a binary column (the default storage): "
                "its plaintext has no place there. Add a plaintext column and pass "
                f"into={{{tgt.cols[j].name!r}: 'new_column'}}",
                table=table,
                column=tgt.cols[j].name,
            )
    model, _ = _model_table(table, schema, metadata)
    declared: dict[str, Codec] = {}
    if model is not None:
        declared = {
            c.name: c.type.codec for c in model.columns if isinstance(c.type, EncryptedType)
        }
    if tgt.into:
        _refuse_occupied_targets(engine, tgt)
    report = Report("decrypt", table, tuple(columns))
    pending = or_(*(tgt.encrypted(i) for i in range(len(tgt.cols))))
    total = _total(engine, tgt, pending) if progress is not None else None
    ncols = len(tgt.cols)

    def plaintext(j: int, pt: bytes) -> Any:
        name = tgt.cols[j].name
        if j not in tgt.into:  # in place, in a text column
            return _codecs.decode(_codecs.STR, pt, table=tgt.name, column=name)
        codec = declared.get(name) or _codec_of_tag(pt[0], tgt.name, name)
        return _codecs.decode(codec, pt, table=tgt.name, column=name)

    def handle(conn: Connection, rows: Sequence[Any], part: Report, crypto: _Crypto) -> None:
        for row in rows:  # a target written since the start is never overwritten
            _refuse_occupied_row(tgt, row)
        opened = _open_batch(crypto, tgt, rows, 2)
        batch = _Batch(tgt)
        for row, out in zip(rows, opened, strict=True):
            if not out:
                continue  # nothing encrypted (cannot happen: the row matched as encrypted)
            old = tuple(row[2 : 2 + ncols])
            new = list(old)
            for j, pt in out.items():
                value = plaintext(j, pt)
                if j in tgt.into:
                    new[tgt.into[j]], new[j] = value, None
                else:
                    new[j] = value
            comp = _as_bytes(row[-1])
            batch.add(row[0], row[1], old, new, comp, comp, _tenant_of(row[1]))
        batch.apply(conn, part)

    with _Crypto(cmk, tgt, actor) as crypto:
        _walk(
            engine,
            tgt,
            report,
            pending=pending,
            handle=functools.partial(_with, handle, crypto),
            batch_size=batch_size,
            max_batches=max_batches,
            progress=progress,
            started=started,
            total=total,
        )
    report.seconds = _now() - started
    return report


@_scrubbed("cutover")
def check_cutover(
    bind: Engine | Connection,
    table: str,
    into: Mapping[str, str],
    *,
    schema: str | None = None,
) -> int:
    """The cutover's check: every value of the moved columns (the keys of ``into``) has
    reached its target (the values of ``into``), so the sources may be dropped.

    The step between a move (:func:`encrypt_columns` or :func:`decrypt_columns` with
    ``into=``) and the migration that drops the source (``op.cutover_column``, which calls
    this first). One ``COUNT`` per source, no key needed. A source is not renamed after: an
    encrypted value is bound to its column's name, so the target keeps its own name and the
    model maps the attribute to it (``ssn = mapped_column("ssn_enc", EncryptedType(Text))``).

    Args:
        bind: The database (an engine, or the migration's connection).
        table: The table.
        into: Source -> target, as given to the move.
        schema: The table's schema, if not the default.

    Returns:
        The number of rows whose targets hold a value.

    Raises:
        ConfigurationError: the table, a source or a target does not exist.
        MoveNotFinishedError: a source still holds values (``remaining`` counts them).
    """
    where = f"{schema}.{table}" if schema else table
    if not into:
        raise ConfigurationError("into= names no column to cut over", table=table)
    insp = sa_inspect(bind)
    if not insp.has_table(table, schema=schema):
        raise ConfigurationError(f"table {where!r} does not exist", table=table)
    present = {c["name"] for c in insp.get_columns(table, schema=schema)}
    for src, dst in into.items():
        # A column "moved into itself" always holds its values: the count would read as a
        # move never finished, and the drop would take the values with it.
        if src == dst or dst in into or list(into.values()).count(dst) > 1:
            raise ConfigurationError(
                f"into= cannot cut {src!r} over to {dst!r}: a target must be another column, "
                "neither cut over itself nor the target of two",
                table=table,
                column=dst,
            )
    for name in (*into, *into.values()):
        if name not in present:
            raise ConfigurationError(
                f"table {where!r} has no column {name!r}; its columns: {sorted(present)}",
                table=table,
                column=name,
            )
    raw = Table(
        table,
        MetaData(),
        *(Column(n, LargeBinary()) for n in dict.fromkeys((*into, *into.values()))),
        schema=schema,
    )

    def count(conn: Connection) -> list[int]:
        counts = [func.count(raw.c[n]) for n in (*into, *into.values())]
        return [int(v) for v in conn.execute(select(*counts)).one()]

    if isinstance(bind, Connection):
        got = count(bind)
    else:
        with bind.connect() as conn:
            got = count(conn)
    for (src, dst), left in zip(into.items(), got, strict=False):
        if left:
            raise MoveNotFinishedError(
                f"{where}.{src} still holds {left:,} value(s) not moved into {dst!r}: the move "
                "has not finished (or an application still writes the old column). Nothing "
                f"was changed; run the move again, then the cutover",
                remaining=left,
                into=dst,
                table=table,
                column=src,
            )
    return max(got[len(into) :], default=0)


@_scrubbed("rewrap")
@_budgeted
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
    max_kms_rps: float | None = None,
) -> Report:
    """Re-wrap every data key of the table (or of one tenant) under its tenant's current
    primary key, without re-encrypting data: per distinct envelope, an unwrap into a key this
    call owns (no other thread's ``forget_tenant()`` or eviction can wipe it), a wrap, and an
    unwrap of the new envelope that must give the same key back (``KeyManager.rewrap``), then a
    set-based update of the rows using it (row ids unchanged, so values stay valid). A wrap
    that returns an unusable blob raises before any row points at it.

    Configure the tenant with ``tenant_keys={"acme": [new, old]}`` (new primary, old still
    accepted), run this, then drop the old key once a second run reports ``rows == 0``:
    application processes keep writing under their cached write key for up to ``cache_ttl``
    after the change, so run it again after that long.

    The table is walked by primary key in batches of ``batch_size`` rows, each in its own
    transaction. On PostgreSQL each batch is one ``UPDATE ... SET companion =
    substring(companion from 1 for 17) || :new WHERE <pk in batch> AND substring(companion from
    18) = :old`` per distinct envelope; on SQLite, a compare-and-swap update per row. Envelopes
    already under the primary cost no KMS call. ``by_tenant`` counts rows by envelope tenant.

    ``max_kms_rps`` caps the call's KMS requests per second: every wrap, unwrap, proof and
    retry it makes, in all its threads, waits for a token of one bucket (bursts up to one
    second's worth), so a long run stays inside the tenants' KMS quotas (see "KMS request
    budget" in docs/migrations.md). With several worker processes, give each its share.

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
    refused: tuple[Any, CMKError] | None = None  # the first row whose EDEK did not rewrap
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
            moves: dict[bytes, tuple[bytes, str]] = {}
            for env, members in by_env.items():
                try:
                    m = new_envelope(env)
                except TenantNotConfiguredError as exc:
                    # An envelope naming a key that is not its tenant's (forged, or copied with
                    # its tenant field changed) is that row's fault: it must not keep every
                    # other tenant's rows on a key being retired. Left as it is, and raised
                    # once the rest is done. (A DecryptionError may be the KMS's fault, as a
                    # wrong key returned: that stops the call, nothing of the batch written.)
                    memo[env] = None
                    if refused is None:
                        refused = (members[0][0], exc)
                    continue
                except DecryptionError as exc:
                    raise _rewrap_refused(tgt, members[0][0], exc, done=False) from exc
                if m is not None:
                    moves[env] = m
            lo, hi = rows[0][0], rows[-1][0]

            def write(
                conn: Connection,
                moves: dict[bytes, tuple[bytes, str]] = moves,
                by_env: dict[bytes, list[tuple[Any, bytes]]] = by_env,
                lo: Any = lo,
                hi: Any = hi,
            ) -> Report:
                part = Report("rewrap", table, ())
                if tgt.db.set_based_update:  # one UPDATE per envelope in the batch's range
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
    if refused is not None:
        raise _rewrap_refused(tgt, refused[0], refused[1], done=True) from refused[1]
    return report


def _rewrap_refused(tgt: _Target, pk: Any, error: CMKError, *, done: bool) -> CMKError:
    """rewrap_keys' error for a row whose EDEK did not rewrap: the same class, naming the row
    (the KMS's or key manager's error names none) and what became of the others."""
    rest = (
        "every other row was rewrapped"
        if done
        else "nothing of its batch was written, and the rows after it were not looked at"
    )
    return type(error)(
        f"row {_pk_repr(pk)} of {tgt.label()!r}: its EDEK could not be rewrapped ({error}); it "
        f"was left as it is, and {rest}. Investigate the row (verify() lists all such rows) "
        "before retiring the old key",
        tenant=error.tenant,
        key_ref=error.key_ref,
        provider=error.provider,
        table=tgt.name,
    )


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
        pk=raw.c[pk[0]],
        tenant=None,
        cols=(),
        storage=(),
        companion=raw.c[companion_column],
        db=select_dialect(engine.dialect),
        types={name: info["type"] for name, info in reflected.items()},
    )


@_scrubbed("rotate")
@_budgeted
def rotate_data_keys(
    engine: Engine,
    cmk: CMK,
    table: str,
    columns: Sequence[str] | None = None,
    *,
    tenant_column: str | None = None,
    metadata: Models | None = None,
    tenant: str | None = None,
    companion_column: str = "cmk_edek",
    schema: str | None = None,
    batch_size: int = 1000,
    progress: ProgressCallback | None = None,
    actor: str = "sqlalchemy-cmk migration",
    max_kms_rps: float | None = None,
) -> Report:
    """Re-encrypt rows under fresh data keys (new row id, new companion): every encrypted value
    of the table's encrypted columns, text or binary storage, of any type, is decrypted and
    sealed again; plaintext values are left alone.

    A new companion would strand an encrypted column left out (its values bound to the old row
    id and data key), so the call first finds every encrypted column sharing the companion:
    from the model when ``metadata`` holds the table, else from the database (see
    :func:`_encrypted_columns`). ``columns=None`` takes them all; ``columns`` that leave one
    out raise :class:`IncompleteColumnsError` before anything is written.

    Rows that exist when the call starts (primary key up to the maximum then) of ``tenant`` (or
    all tenants) are rotated, each in a batch transaction with compare-and-swap; rows an
    application writes meanwhile are retried. Every batch is read back before it commits and
    each value decrypted under its new envelope, unwrapped afresh through the KMS (once per
    envelope and call), so a rotation never commits a row it cannot read. Run it in one
    worker; a killed rotation run again starts over (harmless, more KMS calls). It drops
    ``cmk``'s cached data keys of ``tenant`` (or all tenants) first, so that the new companions
    get data keys wrapped now, not the write key the rows may already use.

    ``max_kms_rps`` caps the call's KMS requests per second: every wrap, unwrap, proof and
    retry it makes, in all its threads, waits for a token of one bucket (bursts up to one
    second's worth), so a long run stays inside the tenants' KMS quotas (see "KMS request
    budget" in docs/migrations.md). With several worker processes, give each its share.

    Raises:
        IncompleteColumnsError: ``columns`` leave out an encrypted column (names them).
        ConfigurationError, TenantNotConfiguredError, TenantMismatchError, DecryptionError,
        KeyAccessError, UnreadableWriteError, MigrationDatabaseError: as
        :func:`encrypt_columns` and :func:`decrypt_columns`.
    """
    _check_batch_args(batch_size)
    started = _now()
    shape = _target(
        engine,
        table,
        None,
        tenant_column=tenant_column,
        companion_column=companion_column,
        schema=schema,
        metadata=metadata,
    )
    everything = _encrypted_columns(engine, shape, metadata, "rotate", columns or ())
    if columns is not None:
        _require_every_column(shape, everything, columns, "rotate")
    chosen = tuple(columns) if columns is not None else everything
    report = Report("rotate", table, chosen)
    if not chosen:
        report.seconds = _now() - started
        return report
    tgt = _target(
        engine,
        table,
        chosen,
        tenant_column=shape.tenant.name if shape.tenant is not None else None,
        companion_column=companion_column,
        schema=schema,
        metadata=metadata,
    )
    assert tgt.companion is not None and tgt.tenant is not None
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
        or_(*(tgt.encrypted(i) for i in range(len(tgt.cols)))),
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

    def handle(conn: Connection, rows: Sequence[Any], part: Report, crypto: _Crypto) -> None:
        for row in rows:
            _require_tenant(tgt, row[0], row[1])
        opened = _open_batch(crypto, tgt, rows, 2)  # checks each row's tenant against its EDEK
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(str(row[1]), []).append(i)
        sealed: list[tuple[list[Any], bytes, list[tuple[int, bytes]]]] = [([], b"", [])] * len(rows)
        new_envs: set[bytes] = set()
        for owner, idx in groups.items():
            values = [{tgt.cols[j].name: pt for j, pt in opened[i].items()} for i in idx]
            new_comps, cts = crypto.seal(owner, values, [None] * len(idx), [None] * len(idx))
            k = 0
            for i, new_comp in zip(idx, new_comps, strict=True):
                assert new_comp is not None
                created.add(new_comp[_SPLIT:])
                new_envs.add(new_comp[_SPLIT:])
                new = list(rows[i][2 : 2 + ncols])
                written: list[tuple[int, bytes]] = []
                for j in range(ncols):
                    if j in opened[i]:
                        new[j] = tgt.store(j, cts[k])
                        written.append((j, cts[k]))
                        k += 1
                sealed[i] = (new, new_comp, written)
        batch = _Batch(tgt)
        for i, row in enumerate(rows):
            new, new_comp, written = sealed[i]
            batch.add(
                row[0],
                row[1],
                tuple(row[2 : 2 + ncols]),
                new,
                _as_bytes(row[-1]),
                new_comp,
                str(row[1]),
                written,
            )
        batch.apply(conn, part, lambda ours: crypto.check_written(ours, new_envs))

    with _Crypto(cmk, tgt, actor) as crypto:
        _walk(
            engine,
            tgt,
            report,
            pending=pending,
            handle=functools.partial(_with, handle, crypto),
            params=lambda: {"_created": list(created)},
            batch_size=batch_size,
            max_batches=None,
            progress=progress,
            started=started,
            total=total,
        )
    report.seconds = _now() - started
    return report


@_scrubbed("verify")
@_budgeted
def verify(
    engine: Engine,
    cmk: CMK,
    table: str,
    columns: Sequence[str] | None = None,
    *,
    tenant_column: str | None = None,
    metadata: Models | None = None,
    companion_column: str = "cmk_edek",
    schema: str | None = None,
    batch_size: int = 1000,
    sample: float | None = None,
    progress: ProgressCallback | None = None,
    actor: str = "sqlalchemy-cmk verify",
    max_kms_rps: float | None = None,
) -> VerifyReport:
    """Decrypt every row (or a random ``sample`` fraction) and count ok / plaintext / failed
    per tenant (see :class:`VerifyReport`), text and binary storage alike. ``columns=None``
    checks every encrypted column of the table (from the model given as ``metadata``, else
    found in the database). A row whose tenant column disagrees with its EDEK's tenant is a
    failure (``TenantMismatchError``), as is a value that does not decrypt
    (``DecryptionError``), that decrypts to another type than the model's (with ``metadata``:
    ``ConfigurationError``), or whose key the KMS refuses (``KeyAccessDeniedError``...). Failures
    never stop the scan. Reads only, without locks, one batch at a time.

    Each batch is one access (``sqlalchemy_cmk._access``): a ``decrypt`` event per tenant for
    the rows that decrypted, and for the rows refused one event per tenant they claim and error
    (``rows`` counts them), for this call's cross-tenant context: no tenant's delivery gets it,
    and the claimed tenant, unauthenticated, is only in ``row_tenant``.

    ``max_kms_rps`` caps its KMS requests per second, as for :func:`encrypt_columns`.

    Raises:
        ConfigurationError: unknown table or column, no companion column, ``sample`` not in
            (0, 1], the tenant column (as :func:`encrypt_columns`).
        UndeterminedColumnsError: ``columns=None`` and the stored values do not say which
            columns are encrypted (see :func:`_encrypted_columns`).
    """
    _check_batch_args(batch_size)
    _check_sample(sample)
    started = _now()
    if columns is None:
        shape = _target(
            engine,
            table,
            None,
            tenant_column=tenant_column,
            companion_column=companion_column,
            schema=schema,
            metadata=metadata,
        )
        # Raises rather than find nothing while rows hold companions: "0 checked" is no "OK".
        columns = _encrypted_columns(engine, shape, metadata, "verify")
        if not columns:
            return VerifyReport(table, ())
    tgt = _target(
        engine,
        table,
        columns,
        tenant_column=tenant_column,
        companion_column=companion_column,
        schema=schema,
        metadata=metadata,
    )
    assert tgt.companion is not None and tgt.tenant is not None
    report = VerifyReport(table, tuple(columns))
    # With the model: each value must also be of the column's declared type, or the
    # application would refuse it on load although it decrypts.
    model, _ = _model_table(table, schema, metadata)
    tags: dict[int, bytes] = {}
    if model is not None:
        for j, c in enumerate(tgt.cols):
            declared = model.c.get(c.name)
            if declared is not None and isinstance(declared.type, EncryptedType):
                tags[j] = bytes([declared.type.codec.tag])
    conds: list[ColumnElement[bool]] = [or_(*(c.is_not(None) for c in tgt.cols))]
    if sample is not None and sample < 1:
        conds.append(tgt.db.random_below(sample))
    total = None
    if progress is not None:
        with engine.connect() as conn:
            total = int(
                conn.execute(select(func.count()).select_from(tgt.raw).where(conds[0])).scalar_one()
            )
    ncols = len(tgt.cols)
    base = select(tgt.pk, tgt.tenant, *tgt.cols, tgt.companion).where(*conds).order_by(tgt.pk)
    base = base.limit(batch_size)
    after = base.where(tgt.pk > bindparam("_last"))

    def fail(pk: Any, tenant: str, error: str) -> None:
        _count(report.failed, tenant)
        if len(report.failures) < _MAX_FAILURES_LISTED:
            report.failures.append((str(pk), tenant, error))

    storage = tgt.storage
    names = tgt.names
    b64decode = base64.b64decode
    open_ = _format.open_

    def check(rows: Sequence[Any], crypto: _Crypto) -> None:
        # One access per batch, as a backfill batch is; but a checker counts the rows refused
        # instead of raising, so their refusals are emitted at the end, one per claimed tenant
        # and error (``_Crypto.refused``).
        with access(crypto.km, crypto.ctx, "decrypt") as acc:
            acc.table(tgt.name, names)
            refused: dict[tuple[str | None, type[CMKError]], int] = {}
            try:
                check_rows(rows, crypto, refused)
            finally:
                crypto.refused(refused)

    def check_rows(
        rows: Sequence[Any],
        crypto: _Crypto,
        refused: dict[tuple[str | None, type[CMKError]], int],
    ) -> None:
        # Envelopes first, concurrently; then each row on its own, so one failure is one row.
        # The hot loop of verify: per envelope, its tenant, key and associated-data prefixes
        # are looked up once; per value, a base64 decode (text storage) and an AEAD open.
        # Only the keys of rows that claim their EDEK's tenant: a row of acme holding
        # globex's EDEK is a mismatch whatever globex's key says, and is no reason to unwrap it.
        errors = crypto.load(bytes(r[-1])[_SPLIT:] for r in rows if _claims_own(crypto, r))
        by_tenant: dict[str, int] = {}
        seen: dict[bytes, tuple[str, Any, list[bytes], type[CMKError] | None]] = {}
        for row in rows:
            pk, t = row[0], _tenant_of(row[1])
            raw = row[-1]
            comp = None if raw is None else bytes(raw)
            plain = False
            error: type[CMKError] | None = None
            claimed = None if row[1] is None else t  # the row's claim: its envelope's, if any
            try:
                cts: list[tuple[int, bytes]] = []
                for j in range(ncols):
                    v = row[2 + j]
                    if v is None:
                        continue
                    if storage[j] == "text" and type(v) is str:
                        if not v.startswith(TEXT_MARKER):
                            plain = True
                            continue
                        try:
                            ct = b64decode(v[_MARKER_LEN:], validate=True)
                        except ValueError:  # binascii.Error: the stored text, not plaintext
                            raise DecryptionError("stored value is malformed") from None
                    else:
                        if tgt.is_plain(j, v):
                            plain = True
                            continue
                        found = tgt.ciphertext(j, v)
                        assert found is not None
                        ct = found
                    cts.append((j, ct))
                if cts and comp is None:
                    raise DecryptionError("encrypted values but no EDEK")
                if comp is not None and cts:
                    env = comp[_SPLIT:]
                    info = seen.get(env)
                    if info is None or (info[1] is None and info[3] is None and info[0] == t):
                        owner = crypto.tenant(comp)
                        aead: Any = None
                        prefixes: list[bytes] = []
                        failed = type(errors[env]) if env in errors else None
                        if failed is None and row[1] is not None and owner == t:
                            entry = crypto._keys.get(env)
                            if entry is None:  # evicted by a batch of very many envelopes
                                more = crypto.load([env])
                                if more:
                                    raise more[env]
                                entry = crypto._keys[env]
                            aead = entry[0].aead
                            prefixes = [_aad_prefix(owner, tgt.name, n) for n in names]
                        info = seen[env] = (owner, aead, prefixes, failed)
                    owner, aead, prefixes, failed = info
                    claimed = owner
                    if row[1] is None or owner != t:  # (a NULL tenant is none, not "(null)")
                        error = TenantMismatchError
                    elif failed is not None:
                        error = failed
                    else:
                        row_id = comp[1:_SPLIT]
                        mistyped = False
                        for j, ct in cts:
                            pt = open_(aead, prefixes[j] + row_id, ct)
                            if j in tags and pt[:1] != tags[j]:
                                mistyped = True  # not the model's type
                        by_tenant[t] = by_tenant.get(t, 0) + 1
                        if mistyped:  # opened (audited as such), but unreadable by the model
                            fail(pk, t, "ConfigurationError")
                            continue
            except DecryptionError:
                error = DecryptionError
            if error is not None:
                fail(pk, t, error.__name__)
                refused[(claimed, error)] = refused.get((claimed, error), 0) + 1
            else:
                _count(report.plaintext if plain else report.encrypted_ok, t)
        crypto.audit(by_tenant)

    last: Any = None
    # One connection in autocommit for the whole scan: each batch's SELECT is its own snapshot,
    # as a transaction per batch would be, without a BEGIN and a ROLLBACK round trip each.
    with (
        _Crypto(cmk, tgt, actor) as crypto,
        engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn,
    ):
        while True:
            if last is None:
                rows = conn.execute(base).all()
            else:
                rows = conn.execute(after, {"_last": last}).all()
            if not rows:
                break
            last = rows[-1][0]
            check(rows, crypto)
            report.checked += len(rows)
            if progress is not None:
                progress(Progress("verify", table, report.checked, total, _now() - started))
    return report


@_scrubbed("status")
def status(
    engine: Engine,
    table: str,
    columns: Sequence[str],
    *,
    schema: str | None = None,
) -> StatusReport:
    """Count plaintext / encrypted / NULL values per column with SQL only (no keys needed).

    One full scan of the table. In a text column, "encrypted" means "starts with ``cmk:``"; in
    a binary (default-storage) column, every value is encrypted (it never holds plaintext).
    Only :func:`verify` says whether a value decrypts.
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
    for i, c in enumerate(tgt.cols):
        exprs.append(func.count(c))
        exprs.append(func.coalesce(func.sum(case((tgt.encrypted(i), 1), else_=0)), 0))
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


# -- one run, as a value ------------------------------------------------------------------------

Operation = Literal[
    "encrypt", "decrypt", "rotate", "rewrap", "verify", "build_index", "rotate_index"
]


@dataclass(frozen=True, kw_only=True)
class Job:
    """The options of one migration run, given once: what :func:`run_job` hands to the
    operation. The ``sqlalchemy-cmk`` migration commands and the Alembic operations
    (``op.encrypt_column``...) each build one from their own arguments, so an option is a field
    here and a keyword of the one function that uses it, not a keyword re-listed by every
    caller.

    A field left at its default is not passed on, so the operation's own default applies (for
    ``actor``: ``"sqlalchemy-cmk migration"``, or ``"sqlalchemy-cmk verify"``); a field set
    that the operation does not take is refused by :func:`run_job`. What can be checked
    without a database is checked here. Change a field with :func:`dataclasses.replace`,
    which checks again.

    Attributes:
        table: The table name; for ``build_index`` and ``rotate_index``, the blind index
            (``"table.index_name"``, or a domain shared by several tables).
        columns: The columns (a sequence, kept as a tuple); empty for rotate and verify means
            every encrypted column of the table, for rewrap it must be empty.
        schema: The table's schema, if not the default.
        tenant_column: The column naming each row's tenant; default: the model's declared one,
            found in ``metadata``.
        metadata: The models (see :data:`Models`).
        companion_column: The EDEK companion column.
        batch_size: Rows per batch, each in its own transaction (at least 1).
        max_batches: Stop after this many batches (encrypt, decrypt); a later run resumes.
        max_kms_rps: KMS requests per second for the whole run (a positive number).
        progress: Called after every batch with a :class:`Progress`.
        actor: The audit events' actor; ``None``: the operation's default.
        into: Source column -> target column, for a move (encrypt, decrypt); kept as a dict.
        tenant: Only this tenant's rows (rotate, rewrap).
        sample: The share of rows to check, in (0, 1] (verify).
        bits: The new width of a rotated blind index (rotate_index).
        settle: Seconds to wait after each state change of a blind index, so every process
            has read it (build_index, rotate_index; default: twice the CMK's
            ``search_state_ttl``).

    Raises:
        ConfigurationError: ``columns`` given as one str, ``batch_size`` below 1,
            ``max_batches`` below 0, ``max_kms_rps`` not a positive number, ``sample`` outside
            (0, 1]; the message names the option.
    """

    table: str
    columns: Sequence[str] = ()
    schema: str | None = None
    tenant_column: str | None = None
    metadata: Models | None = None
    companion_column: str = "cmk_edek"
    batch_size: int = 1000
    max_batches: int | None = None
    max_kms_rps: float | None = None
    progress: ProgressCallback | None = None
    actor: str | None = None
    into: Mapping[str, str] | None = None
    tenant: str | None = None
    sample: float | None = None
    bits: int | None = None
    settle: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.columns, str):
            raise ConfigurationError(
                "columns must be a list of column names, not a str", table=self.table
            )
        # Normalised so that two jobs of the same options compare equal, however given.
        object.__setattr__(self, "columns", tuple(self.columns))
        object.__setattr__(self, "into", dict(self.into) if self.into else None)
        _check_batch_args(self.batch_size, self.max_batches)
        _budget_of(self.max_kms_rps)
        _check_sample(self.sample)


def _index_models(metadata: Models | None, index: str) -> Models:
    if metadata is None:
        raise ConfigurationError(
            f"blind index {index!r}: the models are needed to find its columns (metadata=; "
            "in Alembic, target_metadata in env.py; CLI: --metadata MODULE:Base)"
        )
    return metadata


def _build_index(
    engine: Engine,
    cmk: CMK,
    table: str,
    *,
    metadata: Models | None = None,
    batch_size: int = 1000,
    progress: ProgressCallback | None = None,
    actor: str = "sqlalchemy-cmk search",
    max_kms_rps: float | None = None,
    settle: float | None = None,
) -> Any:
    """run_job's "build_index": :func:`migrations_helpers.search_index.build_index` of the
    index named by ``table``."""
    from .search_index import build_index

    return build_index(
        engine,
        cmk,
        _index_models(metadata, table),
        table,
        batch_size=batch_size,
        progress=progress,
        actor=actor,
        max_kms_rps=max_kms_rps,
        settle=settle,
    )


def _rotate_index(
    engine: Engine,
    cmk: CMK,
    table: str,
    *,
    metadata: Models | None = None,
    batch_size: int = 1000,
    progress: ProgressCallback | None = None,
    actor: str = "sqlalchemy-cmk search",
    max_kms_rps: float | None = None,
    settle: float | None = None,
    bits: int | None = None,
) -> Any:
    """run_job's "rotate_index": :func:`migrations_helpers.search_index.rotate_index`."""
    from .search_index import rotate_index

    return rotate_index(
        engine,
        cmk,
        _index_models(metadata, table),
        table,
        bits=bits,
        batch_size=batch_size,
        progress=progress,
        actor=actor,
        max_kms_rps=max_kms_rps,
        settle=settle,
    )


_OPERATIONS: dict[str, Callable[..., Any]] = {
    "encrypt": encrypt_columns,
    "decrypt": decrypt_columns,
    "rotate": rotate_data_keys,
    "rewrap": rewrap_keys,
    "verify": verify,
    "build_index": _build_index,
    "rotate_index": _rotate_index,
}


def _is_default(value: Any, default: Any) -> bool:
    # By identity for None: a model (a Table, a declarative class) may overload ==.
    return value is None if default is None else bool(value == default)


@overload
def run_job(engine: Engine, cmk: CMK, operation: Literal["verify"], job: Job) -> VerifyReport: ...


@overload
def run_job(
    engine: Engine,
    cmk: CMK,
    operation: Literal["encrypt", "decrypt", "rotate", "rewrap"],
    job: Job,
) -> Report: ...


@overload
def run_job(
    engine: Engine, cmk: CMK, operation: Literal["build_index", "rotate_index"], job: Job
) -> IndexReport: ...


def run_job(
    engine: Engine, cmk: CMK, operation: Operation, job: Job
) -> Report | VerifyReport | IndexReport:
    """Run one operation with the options ``job`` holds.

    ``"encrypt"`` is :func:`encrypt_columns`, ``"decrypt"`` :func:`decrypt_columns`,
    ``"rotate"`` :func:`rotate_data_keys`, ``"rewrap"`` :func:`rewrap_keys`, ``"verify"``
    :func:`verify`, and ``"build_index"`` / ``"rotate_index"`` the functions of
    :mod:`migrations_helpers.search_index` of that name (``job.table`` names the index, and
    ``job.metadata`` is required); each takes the fields its keywords name, and a field set
    for an operation that does not take it (``sample`` for encrypt, ``into`` for rotate...) is
    refused before anything is read, rather than silently ignored.

    Args:
        engine: The database.
        cmk: The CMK.
        operation: What to run.
        job: The options.

    Returns:
        The operation's report: a :class:`VerifyReport` for verify, an
        :class:`~migrations_helpers.search_index.IndexReport` for the index operations, else a
        :class:`Report`.

    Raises:
        ConfigurationError: an unknown operation, or fields set that it does not take (named);
            and whatever the operation raises.
    """
    run = _OPERATIONS.get(operation)
    if run is None:
        raise ConfigurationError(
            f"unknown operation {operation!r}: one of {sorted(_OPERATIONS)}", table=job.table
        )
    takes = inspect.signature(run).parameters  # through the decorators, to the function's own
    given = {
        f.name: getattr(job, f.name)
        for f in fields(job)
        if f.name != "table" and not _is_default(getattr(job, f.name), f.default)
    }
    refused = [name for name in given if name not in takes]
    if refused:
        raise ConfigurationError(
            f"{operation} does not take {', '.join(refused)}: leave "
            + ("it" if len(refused) == 1 else "them")
            + " unset",
            table=job.table,
        )
    if "columns" in takes and takes["columns"].default is inspect.Parameter.empty:
        given.setdefault("columns", job.columns)  # empty: the operation says it needs one
    result: Report | VerifyReport | IndexReport = run(engine, cmk, job.table, **given)
    return result
