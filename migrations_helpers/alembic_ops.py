"""Alembic operations that encrypt, decrypt, re-wrap and rotate existing data.

Each is an Alembic operation plugin (``Operations.register_operation`` plus
``Operations.implementation_for``), with a ``reverse()``, usable in migration scripts once
:func:`register` (or :func:`configure`) has run in ``env.py``::

    # env.py
    import migrations_helpers

    migrations_helpers.configure("myapp.crypto:cmk")  # the CMK; also registers the operations

    # versions/xxxx_encrypt_ssn.py
    def upgrade():
        op.encrypt_column("patients", "ssn", tenant_column="tenant_id")

    def downgrade():
        op.decrypt_column("patients", "ssn", tenant_column="tenant_id")

``tenant_column=`` may be left out when the table's model declares its tenant column with
``sqlalchemy_cmk.tenant_column()`` and env.py passes the models as ``target_metadata``: the
operations look the table up there by name and schema (and refuse a ``tenant_column=`` that
contradicts the declaration).

What ``op.encrypt_column`` does, in order: checks that the table, columns and tenant column
exist; adds the companion column (``cmk_edek``) with ``op.add_column`` if it is missing; commits
the migration's transaction with ``op.get_context().autocommit_block()`` (the backfill works in
its own short transactions on its own connections, which must see the new column and must not
wait on the migration's locks); then runs :func:`migrations_helpers.backfill.encrypt_columns`
on the migration connection's engine. Deploy the application with the column declared
``EncryptedType(Text, storage="text", allow_plaintext=True)`` first: it reads both kinds of
value during the backfill. A backfill that fails (a tenant with no key, a KMS outage) leaves the
migration not applied; running ``alembic upgrade`` again resumes where it stopped, since
progress is the data itself. Because of that commit, use ``transaction_per_migration=True`` in
``context.configure`` and keep an encrypting migration in a revision of its own.

Offline mode (``alembic upgrade --sql``) cannot run these operations: they read every row and
call each tenant's KMS, which no SQL script can do. They raise
:class:`~sqlalchemy_cmk.errors.ConfigurationError` instead of emitting half of the work; run the
migration online, or use the ``sqlalchemy-cmk encrypt-column`` CLI for the table.

Registration is explicit: nothing is registered by importing this module (house style: no
import-time side effects). Alembic's own recipe registers in the body of a module that env.py
imports; we expose the same step as :func:`register` instead, so importing
``migrations_helpers`` (the CLI does, for the backfill engine) changes no global Alembic state,
and so tests and tools control when it happens. :func:`configure` calls it, so ``env.py`` needs
one line. Both are idempotent.

Progress is logged to ``alembic.runtime.migration.sqlalchemy_cmk`` (a child of the ``alembic``
logger that the default ``alembic.ini`` shows at INFO), at most every few seconds, plus a
summary per operation.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa

from sqlalchemy_cmk import CMK
from sqlalchemy_cmk._cmk import load_cmk
from sqlalchemy_cmk.errors import ConfigurationError
from sqlalchemy_cmk.types import EDEKType

from . import backfill

try:
    from alembic.autogenerate import renderers
    from alembic.autogenerate.api import AutogenContext
    from alembic.operations import MigrateOperation, Operations
    from alembic.runtime.migration import MigrationContext
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "migrations_helpers' Alembic operations need Alembic: "
        "pip install 'sqlalchemy-cmk[migrations]'"
    ) from exc

__all__ = [
    "DecryptColumnOp",
    "EncryptColumnOp",
    "NothingToUndoOp",
    "RewrapKeysOp",
    "RotateDataKeysOp",
    "configure",
    "configured_cmk",
    "register",
]

log = logging.getLogger("alembic.runtime.migration.sqlalchemy_cmk")

_LOG_EVERY = 5.0  # seconds between progress lines

_lock = threading.Lock()
_registered = False
_cmk: CMK | None = None

CMKSpec = CMK | str | None


# -- configuration ---------------------------------------------------------------------------


def configure(cmk: CMK | str | None) -> None:
    """Set the CMK the operations use when a call gives no ``cmk=``, and register them.

    Call it in ``env.py``.

    Args:
        cmk: A :class:`~sqlalchemy_cmk.CMK`, or ``"module:attribute"`` naming one (or a
            function that builds one; it is called once, here). ``None`` forgets it.

    Raises:
        ConfigurationError: the string does not name an importable CMK.
    """
    global _cmk
    resolved = None if cmk is None else _load(cmk)
    with _lock:
        _cmk = resolved
    register()


def configured_cmk() -> CMK | None:
    """The CMK set by :func:`configure`, if any."""
    return _cmk


def _load(spec: CMK | str) -> CMK:
    return load_cmk(spec)


def _resolve(cmk: CMKSpec, operation: str) -> CMK:
    if cmk is not None:
        return _load(cmk)
    if _cmk is not None:
        return _cmk
    raise ConfigurationError(
        f"op.{operation} needs a CMK: call migrations_helpers.configure(cmk) in env.py "
        f"(a CMK object or 'module:attribute'), or pass cmk= to op.{operation}"
    )


# -- operations --------------------------------------------------------------------------------


def _columns(value: str | Sequence[str]) -> tuple[str, ...]:
    cols = (value,) if isinstance(value, str) else tuple(value)
    if not cols or not all(isinstance(c, str) and c for c in cols):
        raise ConfigurationError("give one column name or a non-empty sequence of them")
    if len(set(cols)) != len(cols):
        raise ConfigurationError(f"a column is named twice in {list(cols)!r}")
    return cols


class _ColumnsOp(MigrateOperation):
    """Shared arguments of the operations that work on encrypted text columns."""

    def __init__(
        self,
        table_name: str,
        columns: str | Sequence[str],
        *,
        tenant_column: str | None = None,
        companion_column: str = "cmk_edek",
        schema: str | None = None,
        batch_size: int = 1000,
        cmk: CMKSpec = None,
    ) -> None:
        self.table_name = table_name
        self.columns = _columns(columns)
        self.tenant_column = tenant_column
        self.companion_column = companion_column
        self.schema = schema
        self.batch_size = batch_size
        self.cmk = cmk
        for reserved in (tenant_column, companion_column):
            if reserved in self.columns:
                raise ConfigurationError(
                    f"{reserved!r} cannot be encrypted: it is the tenant or companion column",
                    table=table_name,
                    column=reserved,
                )
        if batch_size < 1:
            raise ConfigurationError("batch_size must be at least 1", table=table_name)

    def _kwargs(self) -> dict[str, Any]:
        return {
            "tenant_column": self.tenant_column,
            "companion_column": self.companion_column,
            "schema": self.schema,
            "batch_size": self.batch_size,
            "cmk": self.cmk,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.table_name!r}, {list(self.columns)!r})"


class EncryptColumnOp(_ColumnsOp):
    """``op.encrypt_column``: encrypt an existing text column in place, online, resumably."""

    @classmethod
    def encrypt_column(
        cls,
        operations: Operations,
        table: str,
        column_or_columns: str | Sequence[str],
        *,
        tenant_column: str | None = None,
        companion_column: str = "cmk_edek",
        schema: str | None = None,
        batch_size: int = 1000,
        cmk: CMK | str | None = None,
    ) -> backfill.Report:
        """Encrypt, in place, every plaintext value of text column(s) of ``table``.

        Adds the companion column if missing, commits, then seals each row under its own
        tenant's key (from ``tenant_column``) in batches of ``batch_size`` rows, each in its own
        transaction. Running it again (after a failure, or on finished data) resumes or does
        nothing. The reverse is ``op.decrypt_column`` with the same arguments.

        Args:
            table: The table name.
            column_or_columns: A text column, or several (they share the row's data key).
            tenant_column: The column holding each row's tenant id; default: the one the
                table's model declares with ``sqlalchemy_cmk.tenant_column()``, looked up in
                Alembic's ``target_metadata`` by table name and ``schema``. One that contradicts
                the declared one is refused.
            companion_column: The companion (EDEK) column, added if missing.
            schema: The table's schema, if not the default.
            batch_size: Rows per transaction.
            cmk: A CMK or ``"module:attribute"``; default: the one given to
                ``migrations_helpers.configure``.

        Returns:
            The backfill's report (rows changed, by tenant, batches, seconds).

        Raises:
            ConfigurationError: no CMK, a missing table or column, offline (``--sql``) mode, no
                tenant column given or declared, or one given that contradicts the model.
            TenantNotConfiguredError: a row's tenant has no key; nothing of that batch is written.
            UniqueColumnError: a unique index or constraint covers a column; raised before the
                companion column is added.
        """
        op = cls(
            table,
            column_or_columns,
            tenant_column=tenant_column,
            companion_column=companion_column,
            schema=schema,
            batch_size=batch_size,
            cmk=cmk,
        )
        result: backfill.Report = operations.invoke(op)
        return result

    def reverse(self) -> DecryptColumnOp:
        return DecryptColumnOp(self.table_name, self.columns, **self._kwargs())


class DecryptColumnOp(_ColumnsOp):
    """``op.decrypt_column``: restore an encrypted text column to plaintext, byte for byte."""

    @classmethod
    def decrypt_column(
        cls,
        operations: Operations,
        table: str,
        column_or_columns: str | Sequence[str],
        *,
        tenant_column: str | None = None,
        companion_column: str = "cmk_edek",
        schema: str | None = None,
        batch_size: int = 1000,
        cmk: CMK | str | None = None,
    ) -> backfill.Report:
        """Decrypt, in place, every encrypted value of text column(s) of ``table``.

        The reverse of ``op.encrypt_column``, with the same arguments and the same batching.
        The companion column is left in place, since other columns may still be encrypted under
        it; drop it with ``op.drop_column`` once no column uses it. Deploy the application with
        ``allow_plaintext=True`` (or the plain type) before running it.

        Raises:
            ConfigurationError: no CMK, a missing table or column, or offline (``--sql``) mode.
            KeyAccessError: a tenant's KMS refused; the rows done so far stay decrypted.
            MigrationDatabaseError: the database refused a plaintext (a CHECK, a unique index):
                names the row and constraint, never the value, and chains no database error.
        """
        op = cls(
            table,
            column_or_columns,
            tenant_column=tenant_column,
            companion_column=companion_column,
            schema=schema,
            batch_size=batch_size,
            cmk=cmk,
        )
        result: backfill.Report = operations.invoke(op)
        return result

    def reverse(self) -> EncryptColumnOp:
        return EncryptColumnOp(self.table_name, self.columns, **self._kwargs())


class NothingToUndoOp(MigrateOperation):
    """The reverse of an operation whose effect needs no undoing; running it only logs why."""

    def __init__(self, operation: str, table_name: str, reason: str) -> None:
        self.operation = operation
        self.table_name = table_name
        self.reason = reason

    def __repr__(self) -> str:
        return f"NothingToUndoOp({self.operation!r}, {self.table_name!r})"


_REWRAP_REASON = (
    "re-wrapping leaves every value as it was and only changes which KMS key wraps the data "
    "keys; the old key still reads nothing new, and re-wrapping again is idempotent and safe"
)
_ROTATE_REASON = (
    "rows now use fresh data keys and decrypt to the same values; going back to the old data "
    "keys is neither possible nor useful"
)


class RewrapKeysOp(MigrateOperation):
    """``op.rewrap_keys``: re-wrap a table's data keys under each tenant's current primary key."""

    def __init__(
        self,
        table_name: str,
        *,
        tenant: str | None = None,
        companion_column: str = "cmk_edek",
        schema: str | None = None,
        batch_size: int = 1000,
        cmk: CMKSpec = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigurationError("batch_size must be at least 1", table=table_name)
        self.table_name = table_name
        self.tenant = tenant
        self.companion_column = companion_column
        self.schema = schema
        self.batch_size = batch_size
        self.cmk = cmk

    @classmethod
    def rewrap_keys(
        cls,
        operations: Operations,
        table: str,
        *,
        tenant: str | None = None,
        companion_column: str = "cmk_edek",
        schema: str | None = None,
        batch_size: int = 1000,
        cmk: CMK | str | None = None,
    ) -> backfill.Report:
        """Re-wrap every data key of ``table`` (or of one ``tenant``) under its tenant's
        current primary key, without re-encrypting data: per distinct wrapped key, one wrap and
        two unwraps (the old envelope, and the new one, which must give the same key back before
        any row points at it). Run it after a tenant's key rotation, before retiring the old key.

        The reverse does nothing (and logs why): re-wrapping changes no value.

        Raises:
            ConfigurationError: no CMK, a missing table, or offline (``--sql``) mode.
        """
        op = cls(
            table,
            tenant=tenant,
            companion_column=companion_column,
            schema=schema,
            batch_size=batch_size,
            cmk=cmk,
        )
        result: backfill.Report = operations.invoke(op)
        return result

    def reverse(self) -> NothingToUndoOp:
        return NothingToUndoOp("rewrap_keys", self.table_name, _REWRAP_REASON)

    def __repr__(self) -> str:
        return f"RewrapKeysOp({self.table_name!r}, tenant={self.tenant!r})"


class RotateDataKeysOp(_ColumnsOp):
    """``op.rotate_data_keys``: re-encrypt rows under fresh data keys."""

    def __init__(
        self,
        table_name: str,
        columns: str | Sequence[str],
        *,
        tenant_column: str | None = None,
        tenant: str | None = None,
        companion_column: str = "cmk_edek",
        schema: str | None = None,
        batch_size: int = 1000,
        cmk: CMKSpec = None,
    ) -> None:
        super().__init__(
            table_name,
            columns,
            tenant_column=tenant_column,
            companion_column=companion_column,
            schema=schema,
            batch_size=batch_size,
            cmk=cmk,
        )
        self.tenant = tenant

    @classmethod
    def rotate_data_keys(
        cls,
        operations: Operations,
        table: str,
        columns: str | Sequence[str],
        *,
        tenant_column: str | None = None,
        tenant: str | None = None,
        companion_column: str = "cmk_edek",
        schema: str | None = None,
        batch_size: int = 1000,
        cmk: CMK | str | None = None,
    ) -> backfill.Report:
        """Decrypt and seal again, under fresh data keys (new row ids), every encrypted value
        of the text ``columns`` (of all tenants, or of one ``tenant``); plaintext is left alone.

        The reverse does nothing (and logs why).

        Raises:
            ConfigurationError: no CMK, a missing table or column, or offline (``--sql``) mode.
            IncompleteColumnsError: ``columns`` leave out an encrypted column of the table (from
                ``target_metadata``, else found in the database); nothing is written.
        """
        op = cls(
            table,
            columns,
            tenant_column=tenant_column,
            tenant=tenant,
            companion_column=companion_column,
            schema=schema,
            batch_size=batch_size,
            cmk=cmk,
        )
        result: backfill.Report = operations.invoke(op)
        return result

    def reverse(self) -> NothingToUndoOp:
        return NothingToUndoOp("rotate_data_keys", self.table_name, _ROTATE_REASON)


# -- implementations ---------------------------------------------------------------------------


def _refuse_offline(operations: Operations, name: str, table: str, command: str) -> None:
    if operations.get_context().as_sql:
        raise ConfigurationError(
            f"op.{name}({table!r}) cannot run in offline mode (alembic upgrade/downgrade --sql): "
            "it reads every row and calls each tenant's KMS, which a SQL script cannot do, and "
            "emitting only the schema part would leave the data unconverted. Run this "
            "migration online (without --sql), or generate SQL only for the other revisions "
            f"and run `sqlalchemy-cmk {command}` for this table.",
            table=table,
        )


def _check_columns(
    conn: sa.Connection, table: str, schema: str | None, needed: Sequence[str]
) -> set[str]:
    """Return the table's column names; raise naming the first needed one that is missing."""
    inspector = sa.inspect(conn)
    if not inspector.has_table(table, schema=schema):
        raise ConfigurationError(f"no table {table!r} (schema {schema!r})", table=table)
    present = {c["name"] for c in inspector.get_columns(table, schema=schema)}
    for name in needed:
        if name not in present:
            raise ConfigurationError(
                f"table {table!r} has no column {name!r}", table=table, column=name
            )
    return present


def _check_transaction(operations: Operations) -> None:
    # autocommit_block() can only commit a transaction Alembic itself began; an env.py that
    # runs migrations inside its own engine.begin() would fail there with a bare assertion.
    ctx: MigrationContext = operations.get_context()
    conn = operations.get_bind()
    if conn.in_transaction() and getattr(ctx, "_transaction", None) is None:
        raise ConfigurationError(
            "the cmk operations commit the migration's transaction before their backfill, so "
            "Alembic must manage it: in env.py, open the connection with engine.connect() (not "
            "engine.begin()) and run migrations inside context.begin_transaction()"
        )


def _progress(operation: str, table: str) -> backfill.ProgressCallback:
    last = [0.0]

    def report(p: backfill.Progress) -> None:
        if p.elapsed - last[0] < _LOG_EVERY:
            return
        last[0] = p.elapsed
        rate = p.done / p.elapsed if p.elapsed > 0 else 0.0
        total = "?" if p.total is None else str(p.total)
        log.info("%s %s: %d/%s rows, %.0f rows/s", operation, table, p.done, total, rate)

    return report


def _summary(report: backfill.Report) -> None:
    log.info(
        "%s %s %s: %d rows changed in %d batches, %.1fs, by tenant %s",
        report.operation,
        report.table,
        ",".join(report.columns),
        report.rows,
        report.batches,
        report.seconds,
        dict(sorted(report.by_tenant.items())),
    )


def _tenant_column(operations: Operations, operation: _ColumnsOp) -> str:
    """The operation's tenant column: given, or declared by the model in ``target_metadata``
    (Alembic's own copy of the application's models, set in env.py)."""
    name = backfill.resolve_tenant_column(
        operation.table_name,
        operation.tenant_column,
        metadata=operations.get_context().opts.get("target_metadata"),
        schema=operation.schema,
    )
    if name in operation.columns:  # as __init__ checks a given one: before the schema changes
        raise ConfigurationError(
            f"{name!r} cannot be encrypted: it is the tenant column",
            table=operation.table_name,
            column=name,
        )
    return name


def _prepare(
    operations: Operations,
    name: str,
    table: str,
    command: str,
    cmk: CMKSpec,
    schema: str | None,
    columns: tuple[str, ...],
) -> tuple[CMK, sa.Connection, set[str]]:
    """Checks shared by every operation, in an order that changes nothing when one fails:
    online, a CMK, a transaction Alembic manages, the columns; returns (cmk, connection,
    columns present)."""
    _refuse_offline(operations, name, table, command)
    resolved = _resolve(cmk, name)
    _check_transaction(operations)
    conn = operations.get_bind()
    return resolved, conn, _check_columns(conn, table, schema, columns)


def _backfill(
    operations: Operations, run: Callable[..., backfill.Report], *args: Any, **kwargs: Any
) -> backfill.Report:
    # Commit the migration's transaction (and so its schema change) first: the backfill works
    # in batches on connections of its own, which must see it.
    with operations.get_context().autocommit_block():
        report = run(*args, **kwargs)
    _summary(report)
    return report


def _encrypt_column(operations: Operations, operation: EncryptColumnOp) -> backfill.Report:
    table = operation.table_name
    tenant_column = _tenant_column(operations, operation)
    cmk, conn, present = _prepare(
        operations,
        "encrypt_column",
        table,
        "encrypt-column",
        operation.cmk,
        operation.schema,
        (*operation.columns, tenant_column),
    )
    # Before the schema changes: a unique index over the column would enforce nothing.
    backfill.check_encryptable(conn, table, operation.columns, schema=operation.schema)
    if operation.companion_column not in present:
        operations.add_column(
            table,
            sa.Column(operation.companion_column, EDEKType(), nullable=True),
            schema=operation.schema,
        )
    return _backfill(
        operations,
        backfill.encrypt_columns,
        conn.engine,
        cmk,
        table,
        operation.columns,
        tenant_column=tenant_column,
        companion_column=operation.companion_column,
        schema=operation.schema,
        batch_size=operation.batch_size,
        progress=_progress("encrypt", table),
    )


def _decrypt_column(operations: Operations, operation: DecryptColumnOp) -> backfill.Report:
    table = operation.table_name
    tenant_column = _tenant_column(operations, operation)
    cmk, conn, _ = _prepare(
        operations,
        "decrypt_column",
        table,
        "decrypt-column",
        operation.cmk,
        operation.schema,
        (*operation.columns, tenant_column, operation.companion_column),
    )
    return _backfill(
        operations,
        backfill.decrypt_columns,
        conn.engine,
        cmk,
        table,
        operation.columns,
        tenant_column=tenant_column,
        companion_column=operation.companion_column,
        schema=operation.schema,
        batch_size=operation.batch_size,
        progress=_progress("decrypt", table),
    )


def _rewrap_keys(operations: Operations, operation: RewrapKeysOp) -> backfill.Report:
    table = operation.table_name
    cmk, conn, _ = _prepare(
        operations,
        "rewrap_keys",
        table,
        "rewrap",
        operation.cmk,
        operation.schema,
        (operation.companion_column,),
    )
    return _backfill(
        operations,
        backfill.rewrap_keys,
        conn.engine,
        cmk,
        table,
        tenant=operation.tenant,
        companion_column=operation.companion_column,
        schema=operation.schema,
        batch_size=operation.batch_size,
        progress=_progress("rewrap", table),
    )


def _rotate_data_keys(operations: Operations, operation: RotateDataKeysOp) -> backfill.Report:
    table = operation.table_name
    tenant_column = _tenant_column(operations, operation)
    cmk, conn, _ = _prepare(
        operations,
        "rotate_data_keys",
        table,
        "rotate",
        operation.cmk,
        operation.schema,
        (*operation.columns, tenant_column, operation.companion_column),
    )
    return _backfill(
        operations,
        backfill.rotate_data_keys,
        conn.engine,
        cmk,
        table,
        operation.columns,
        tenant_column=tenant_column,
        # The model's encrypted columns: rotate refuses a column list that leaves one out.
        metadata=operations.get_context().opts.get("target_metadata"),
        tenant=operation.tenant,
        companion_column=operation.companion_column,
        schema=operation.schema,
        batch_size=operation.batch_size,
        progress=_progress("rotate", table),
    )


def _nothing_to_undo(operations: Operations, operation: NothingToUndoOp) -> None:
    log.info(
        "op.%s(%r) has nothing to undo: %s",
        operation.operation,
        operation.table_name,
        operation.reason,
    )


# -- autogenerate rendering of the operations (for reverse() and process_revision_directives) --


def _args(op: _ColumnsOp | RewrapKeysOp, positional: list[Any], extra: dict[str, Any]) -> str:
    defaults = {
        "tenant_column": None,  # the model's declared one
        "companion_column": "cmk_edek",
        "schema": None,
        "batch_size": 1000,
        "tenant": None,
    }
    parts = [repr(p) for p in positional]
    for key, value in extra.items():
        if key in defaults and value == defaults[key]:
            continue
        parts.append(f"{key}={value!r}")
    if isinstance(op.cmk, str):  # a CMK object has no source form: rely on configure()
        parts.append(f"cmk={op.cmk!r}")
    return ", ".join(parts)


def _cols(op: _ColumnsOp) -> str | list[str]:
    return op.columns[0] if len(op.columns) == 1 else list(op.columns)


def _column_kwargs(op: _ColumnsOp) -> dict[str, Any]:
    return {
        "tenant_column": op.tenant_column,
        "companion_column": op.companion_column,
        "schema": op.schema,
        "batch_size": op.batch_size,
    }


def _render_encrypt(autogen_context: AutogenContext, op: EncryptColumnOp) -> str:
    return f"op.encrypt_column({_args(op, [op.table_name, _cols(op)], _column_kwargs(op))})"


def _render_decrypt(autogen_context: AutogenContext, op: DecryptColumnOp) -> str:
    return f"op.decrypt_column({_args(op, [op.table_name, _cols(op)], _column_kwargs(op))})"


def _render_rewrap(autogen_context: AutogenContext, op: RewrapKeysOp) -> str:
    extra = {
        "tenant": op.tenant,
        "companion_column": op.companion_column,
        "schema": op.schema,
        "batch_size": op.batch_size,
    }
    return f"op.rewrap_keys({_args(op, [op.table_name], extra)})"


def _render_rotate(autogen_context: AutogenContext, op: RotateDataKeysOp) -> str:
    extra = {"tenant": op.tenant, **_column_kwargs(op)}
    return f"op.rotate_data_keys({_args(op, [op.table_name, _cols(op)], extra)})"


def _render_nothing(autogen_context: AutogenContext, op: NothingToUndoOp) -> str:
    # ``pass``, not a bare comment: it may be the only statement of downgrade().
    return f"pass  # op.{op.operation}({op.table_name!r}) has nothing to undo"


# -- registration ------------------------------------------------------------------------------


def register() -> None:
    """Register the operations with Alembic: ``op.encrypt_column``, ``op.decrypt_column``,
    ``op.rewrap_keys``, ``op.rotate_data_keys``. Idempotent; :func:`configure` calls it."""
    global _registered
    with _lock:
        if _registered:
            return
        Operations.register_operation("encrypt_column")(EncryptColumnOp)
        Operations.register_operation("decrypt_column")(DecryptColumnOp)
        Operations.register_operation("rewrap_keys")(RewrapKeysOp)
        Operations.register_operation("rotate_data_keys")(RotateDataKeysOp)
        Operations.implementation_for(EncryptColumnOp)(_encrypt_column)
        Operations.implementation_for(DecryptColumnOp)(_decrypt_column)
        Operations.implementation_for(RewrapKeysOp)(_rewrap_keys)
        Operations.implementation_for(RotateDataKeysOp)(_rotate_data_keys)
        Operations.implementation_for(NothingToUndoOp)(_nothing_to_undo)
        renderers.dispatch_for(EncryptColumnOp)(_render_encrypt)
        renderers.dispatch_for(DecryptColumnOp)(_render_decrypt)
        renderers.dispatch_for(RewrapKeysOp)(_render_rewrap)
        renderers.dispatch_for(RotateDataKeysOp)(_render_rotate)
        renderers.dispatch_for(NothingToUndoOp)(_render_nothing)
        _registered = True
