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

import dataclasses
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal

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
    from alembic.operations.ops import AddColumnOp
    from alembic.runtime.migration import MigrationContext
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "migrations_helpers' Alembic operations need Alembic: "
        "pip install 'sqlalchemy-cmk[migrations]'"
    ) from exc

__all__ = [
    "BuildBlindIndexOp",
    "CutoverColumnOp",
    "DecryptColumnOp",
    "EncryptColumnOp",
    "NothingToUndoOp",
    "RewrapKeysOp",
    "RotateBlindIndexOp",
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


class _JobField:
    """An operation's argument, kept in the operation's :class:`~migrations_helpers.Job` (its
    one copy): read from it, and set by replacing the Job."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name

    def __set_name__(self, owner: type, attr: str) -> None:
        self.name = self.name or attr

    def __get__(self, op: Any, owner: type | None = None) -> Any:
        return self if op is None else getattr(op.job, str(self.name))

    def __set__(self, op: Any, value: Any) -> None:
        op.job = dataclasses.replace(op.job, **{str(self.name): value})


class _JobOp(MigrateOperation):
    """An operation that runs a backfill: its options are one Job, built by the constructor."""

    job: backfill.Job
    cmk: CMKSpec
    table_name = _JobField("table")
    companion_column = _JobField()
    schema = _JobField()
    batch_size = _JobField()


class _ColumnsOp(_JobOp):
    """Shared arguments of the operations that work on encrypted text columns."""

    columns = _JobField()
    into = _JobField()
    tenant_column = _JobField()

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
        into: Mapping[str, str] | None = None,
    ) -> None:
        cols = _columns(columns)
        for src, dst in (into or {}).items():
            if src not in cols or not isinstance(dst, str) or not dst:
                raise ConfigurationError(
                    f"into= maps {src!r}, which is not one of the columns {list(cols)!r}"
                    if src not in cols
                    else f"into= gives {src!r} no target column name",
                    table=table_name,
                    column=src,
                )
        for reserved in (tenant_column, companion_column):
            if reserved in cols:
                raise ConfigurationError(
                    f"{reserved!r} cannot be encrypted: it is the tenant or companion column",
                    table=table_name,
                    column=reserved,
                )
        self.job = backfill.Job(
            table=table_name,
            columns=cols,
            tenant_column=tenant_column,
            companion_column=companion_column,
            schema=schema,
            batch_size=batch_size,
            into=into,
        )
        self.cmk = cmk

    def _kwargs(self) -> dict[str, Any]:
        return {
            "tenant_column": self.tenant_column,
            "companion_column": self.companion_column,
            "schema": self.schema,
            "batch_size": self.batch_size,
            "cmk": self.cmk,
        }

    def _reversed(self) -> tuple[tuple[str, ...], dict[str, str] | None]:
        """The columns and ``into`` of the reverse move: each target moves back."""
        if not self.into:
            return self.columns, None
        return tuple(self.into.values()), {dst: src for src, dst in self.into.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.table_name!r}, {list(self.columns)!r})"


class EncryptColumnOp(_ColumnsOp):
    """``op.encrypt_column``: encrypt an existing text column in place (or, with ``into``,
    move a column into a binary column), online, resumably."""

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
        into: Mapping[str, str] | None = None,
    ) -> backfill.Report:
        """Encrypt, in place, every plaintext value of text column(s) of ``table``.

        Adds the companion column if missing, commits, then seals each row under its own
        tenant's key (from ``tenant_column``) in batches of ``batch_size`` rows, each in its own
        transaction. Running it again (after a failure, or on finished data) resumes or does
        nothing. The reverse is ``op.decrypt_column`` with the same arguments.

        With ``into`` (``{"ssn": "ssn_enc"}``), each column is instead moved into an existing
        binary column, as :func:`migrations_helpers.backfill.encrypt_columns` moves it (sealed as
        the model's ``EncryptedType`` for the target, found in ``target_metadata``, writes it;
        the source left NULL). The reverse moves each target back:
        ``op.decrypt_column(table, "ssn_enc", into={"ssn_enc": "ssn"})``. Drop the source
        afterwards with ``op.cutover_column``.

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
            into: Source column -> existing binary target column, to move instead of
                encrypting in place (every column named).

        Returns:
            The backfill's report (rows changed, by tenant, batches, seconds).

        Raises:
            ConfigurationError: no CMK, a missing table or column, offline (``--sql``) mode, no
                tenant column given or declared, or one given that contradicts the model; with
                ``into``, a target that is missing, not binary or too small (before any
                change).
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
            into=into,
        )
        result: backfill.Report = operations.invoke(op)
        return result

    def reverse(self) -> DecryptColumnOp:
        columns, into = self._reversed()
        return DecryptColumnOp(self.table_name, columns, **self._kwargs(), into=into)


class DecryptColumnOp(_ColumnsOp):
    """``op.decrypt_column``: restore an encrypted text column to plaintext, byte for byte (or,
    with ``into``, move an encrypted column's plaintext into another column)."""

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
        into: Mapping[str, str] | None = None,
    ) -> backfill.Report:
        """Decrypt, in place, every encrypted value of text column(s) of ``table``.

        The reverse of ``op.encrypt_column``, with the same arguments and the same batching.
        The companion column is left in place, since other columns may still be encrypted under
        it; drop it with ``op.drop_column`` once no column uses it. Deploy the application with
        ``allow_plaintext=True`` (or the plain type) before running it.

        With ``into`` (``{"ssn_enc": "ssn"}``), each column's plaintext goes to an existing
        column and the encrypted value becomes NULL (required for a binary, default-storage
        column), as :func:`migrations_helpers.backfill.decrypt_columns` does; the reverse is
        ``op.encrypt_column`` moving each target back.

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
            into=into,
        )
        result: backfill.Report = operations.invoke(op)
        return result

    def reverse(self) -> EncryptColumnOp:
        columns, into = self._reversed()
        return EncryptColumnOp(self.table_name, columns, **self._kwargs(), into=into)


class CutoverColumnOp(MigrateOperation):
    """``op.cutover_column``: end a move by dropping the emptied source column."""

    def __init__(
        self,
        table_name: str,
        column_name: str,
        into: str,
        *,
        type_: sa.types.TypeEngine[Any] | type[sa.types.TypeEngine[Any]],
        schema: str | None = None,
    ) -> None:
        if not column_name or not into or column_name == into:
            raise ConfigurationError(
                "op.cutover_column takes the moved column and the column it moved into, "
                "two different names",
                table=table_name,
                column=column_name,
            )
        self.table_name = table_name
        self.column_name = column_name
        self.into = into
        self.type_ = type_() if isinstance(type_, type) else type_
        self.schema = schema

    @classmethod
    def cutover_column(
        cls,
        operations: Operations,
        table: str,
        column: str,
        into: str,
        *,
        type_: sa.types.TypeEngine[Any] | type[sa.types.TypeEngine[Any]],
        schema: str | None = None,
    ) -> int:
        """Drop ``column`` once its move into ``into`` has finished: the cutover.

        Counts the rows whose ``column`` still holds a value
        (:func:`migrations_helpers.backfill.check_cutover`; on PostgreSQL under a ``SHARE ROW
        EXCLUSIVE`` lock held until the migration commits, so no write slips in between) and
        refuses while there is one; then ``op.drop_column``. The target keeps its name: an
        encrypted value is bound to its column's name, so renaming the target would make every
        value unreadable. Map the model's attribute to it instead
        (``ssn = mapped_column("ssn_enc", EncryptedType(Text))``).

        The reverse adds ``column`` back, empty and nullable, of ``type_``; a reversed move
        (``op.decrypt_column(table, into, into={into: column})``) then fills it.

        Args:
            table: The table name.
            column: The moved (source) column, dropped.
            into: The column it moved into, which stays.
            type_: The source column's type, for the reverse.
            schema: The table's schema, if not the default.

        Returns:
            The number of rows whose ``into`` holds a value.

        Raises:
            MoveNotFinishedError: ``column`` still holds values (``remaining`` counts them);
                nothing was changed. Run the move again, then this migration.
            ConfigurationError: a missing table or column, or offline (``--sql``) mode: the
                count needs the database.
        """
        op = cls(table, column, into, type_=type_, schema=schema)
        result: int = operations.invoke(op)
        return result

    def reverse(self) -> AddColumnOp:
        return AddColumnOp.from_column_and_tablename(
            self.schema, self.table_name, sa.Column(self.column_name, self.type_, nullable=True)
        )

    def __repr__(self) -> str:
        return f"CutoverColumnOp({self.table_name!r}, {self.column_name!r}, into={self.into!r})"


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


class RewrapKeysOp(_JobOp):
    """``op.rewrap_keys``: re-wrap a table's data keys under each tenant's current primary key."""

    tenant = _JobField()

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
        self.job = backfill.Job(
            table=table_name,
            tenant=tenant,
            companion_column=companion_column,
            schema=schema,
            batch_size=batch_size,
        )
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

    tenant = _JobField()

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


_BUILD_REASON = (
    "a built index stays correct whatever the schema does next: downgrading the column (or "
    "dropping its index columns) is the migration's own op.drop_column"
)
_ROTATE_INDEX_REASON = (
    "the index now uses its next key version; rotating back would be another rotation "
    "(op.rotate_blind_index again), never an undo"
)


class _IndexOp(_JobOp):
    """An operation on a blind index: its Job's ``table`` holds the index's name."""

    index = _JobField("table")
    settle = _JobField()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.index!r})"


class BuildBlindIndexOp(_IndexOp):
    """``op.build_blind_index``: fill a searchable column's blind index for the rows that
    exist, then make it searchable."""

    def __init__(
        self,
        index: str,
        *,
        batch_size: int = 1000,
        settle: float | None = None,
        cmk: CMKSpec = None,
    ) -> None:
        self.job = backfill.Job(table=index, batch_size=batch_size, settle=settle)
        self.cmk = cmk

    @classmethod
    def build_blind_index(
        cls,
        operations: Operations,
        index: str,
        *,
        batch_size: int = 1000,
        settle: float | None = None,
        cmk: CMK | str | None = None,
    ) -> Any:
        """Build the blind index ``index`` (``"table.index_name"`` or a shared domain) over
        the rows that exist (:func:`migrations_helpers.search_index.build_index`), with the
        models of ``target_metadata``. Deploy the application declaring the column
        searchable first; the call waits ``settle`` seconds (default twice the CMK's
        ``search_state_ttl``) before the walk. Rerunning after a failure finishes the build.

        The reverse does nothing (and logs why).

        Raises:
            ConfigurationError: no CMK, no ``target_metadata``, an unknown index, or offline
                (``--sql``) mode.
        """
        op = cls(index, batch_size=batch_size, settle=settle, cmk=cmk)
        return operations.invoke(op)

    def reverse(self) -> NothingToUndoOp:
        return NothingToUndoOp("build_blind_index", self.index, _BUILD_REASON)


class RotateBlindIndexOp(_IndexOp):
    """``op.rotate_blind_index``: move a blind index to its next key version, online."""

    bits = _JobField()

    def __init__(
        self,
        index: str,
        *,
        bits: int | None = None,
        batch_size: int = 1000,
        settle: float | None = None,
        cmk: CMKSpec = None,
    ) -> None:
        self.job = backfill.Job(table=index, bits=bits, batch_size=batch_size, settle=settle)
        self.cmk = cmk

    @classmethod
    def rotate_blind_index(
        cls,
        operations: Operations,
        index: str,
        *,
        bits: int | None = None,
        batch_size: int = 1000,
        settle: float | None = None,
        cmk: CMK | str | None = None,
    ) -> Any:
        """Rotate the blind index ``index`` to its next key version (and, with ``bits``, a new
        width): :func:`migrations_helpers.search_index.rotate_index`, every phase in one call
        (it waits ``settle`` seconds twice). Rerunning after a failure resumes the rotation.

        The reverse does nothing (and logs why).

        Raises:
            ConfigurationError: no CMK, no ``target_metadata``, an index not built yet, or
                offline (``--sql``) mode.
        """
        op = cls(index, bits=bits, batch_size=batch_size, settle=settle, cmk=cmk)
        return operations.invoke(op)

    def reverse(self) -> NothingToUndoOp:
        return NothingToUndoOp("rotate_blind_index", self.index, _ROTATE_INDEX_REASON)


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


_NAMES = {  # operation -> (its op.<name>, the CLI command doing the same)
    "encrypt": ("encrypt_column", "encrypt-column"),
    "decrypt": ("decrypt_column", "decrypt-column"),
    "rewrap": ("rewrap_keys", "rewrap"),
    "rotate": ("rotate_data_keys", "rotate"),
}


def _run(
    operations: Operations,
    operation: Literal["encrypt", "decrypt", "rewrap", "rotate"],
    op: _JobOp,
) -> backfill.Report:
    """Run ``op``'s Job through :func:`migrations_helpers.backfill.run_job`, once the checks
    that change nothing when they fail have passed (and, to encrypt, the companion is added)."""
    name, command = _NAMES[operation]
    job = op.job
    needed = [*job.columns, *(job.into or {}).values()]
    if isinstance(op, _ColumnsOp):
        job = dataclasses.replace(job, tenant_column=_tenant_column(operations, op))
        needed.append(str(job.tenant_column))
    if operation != "encrypt":  # encrypt adds it
        needed.append(job.companion_column)
    cmk, conn, present = _prepare(
        operations, name, job.table, command, op.cmk, job.schema, tuple(needed)
    )
    if operation == "encrypt":
        # Before the schema changes: a unique index over the column would enforce nothing
        # (and, for a move, a target that cannot take the values is refused).
        backfill.check_encryptable(
            conn,
            job.table,
            job.columns,
            schema=job.schema,
            into=job.into,
            metadata=operations.get_context().opts.get("target_metadata"),
        )
        if job.companion_column not in present:
            operations.add_column(
                job.table,
                sa.Column(job.companion_column, EDEKType(), nullable=True),
                schema=job.schema,
            )
    if job.into or operation == "rotate":
        # The models: a move encodes values as the model's EncryptedType for each column says,
        # and rotate refuses a column list that leaves one of the model's encrypted columns out.
        # An in-place run behaves as it always did, without them.
        job = dataclasses.replace(
            job, metadata=operations.get_context().opts.get("target_metadata")
        )
    job = dataclasses.replace(job, progress=_progress(operation, job.table))
    # Commit the migration's transaction (and so its schema change) first: the backfill works
    # in batches on connections of its own, which must see it.
    with operations.get_context().autocommit_block():
        report = backfill.run_job(conn.engine, cmk, operation, job)
    _summary(report)
    return report


def _run_index(
    operations: Operations, operation: Literal["build_index", "rotate_index"], op: _IndexOp
) -> Any:
    """Run a blind index operation's Job through :func:`migrations_helpers.backfill.run_job`,
    with the models of ``target_metadata``, outside the migration's transaction."""
    name = "build_blind_index" if operation == "build_index" else "rotate_blind_index"
    command = "search build" if operation == "build_index" else "search rotate"
    _refuse_offline(operations, name, op.index, command)
    cmk = _resolve(op.cmk, name)
    _check_transaction(operations)
    conn = operations.get_bind()
    job = dataclasses.replace(
        op.job,
        metadata=operations.get_context().opts.get("target_metadata"),
        progress=_progress(operation, op.index),
    )
    with operations.get_context().autocommit_block():
        report = backfill.run_job(conn.engine, cmk, operation, job)
    log.info(
        "%s %s: %s; %d rows written, %.1fs (%.1fs waiting for every process to see a state)",
        operation,
        report.domain,
        ", ".join(report.steps) or f"nothing to do (phase {report.phase})",
        report.rows,
        report.seconds,
        report.waited,
    )
    return report


def _build_blind_index(operations: Operations, op: BuildBlindIndexOp) -> Any:
    return _run_index(operations, "build_index", op)


def _rotate_blind_index(operations: Operations, op: RotateBlindIndexOp) -> Any:
    return _run_index(operations, "rotate_index", op)


def _encrypt_column(operations: Operations, op: EncryptColumnOp) -> backfill.Report:
    return _run(operations, "encrypt", op)


def _decrypt_column(operations: Operations, op: DecryptColumnOp) -> backfill.Report:
    return _run(operations, "decrypt", op)


def _rewrap_keys(operations: Operations, op: RewrapKeysOp) -> backfill.Report:
    return _run(operations, "rewrap", op)


def _rotate_data_keys(operations: Operations, op: RotateDataKeysOp) -> backfill.Report:
    return _run(operations, "rotate", op)


def _cutover_column(operations: Operations, operation: CutoverColumnOp) -> int:
    table = operation.table_name
    _refuse_offline(operations, "cutover_column", table, "cutover")
    conn = operations.get_bind()
    if conn.dialect.name == "postgresql":
        # Writes wait from here until the migration commits: none lands between the count and
        # the drop.
        prep = conn.dialect.identifier_preparer
        name = prep.format_table(sa.Table(table, sa.MetaData(), schema=operation.schema))
        conn.exec_driver_sql(f"LOCK TABLE {name} IN SHARE ROW EXCLUSIVE MODE")
    moved = backfill.check_cutover(
        conn, table, {operation.column_name: operation.into}, schema=operation.schema
    )
    operations.drop_column(table, operation.column_name, schema=operation.schema)
    log.info(
        "cutover %s: dropped %s; %d rows hold %s",
        table,
        operation.column_name,
        moved,
        operation.into,
    )
    return moved


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
    if isinstance(op, _ColumnsOp) and op.into:
        parts.append(f"into={op.into!r}")
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


def _render_cutover(autogen_context: AutogenContext, op: CutoverColumnOp) -> str:
    # Alembic's own type renderer, as for op.add_column: it honours render_item and prefixes.
    from alembic.autogenerate.render import _repr_type

    parts = [repr(op.table_name), repr(op.column_name), repr(op.into)]
    parts.append(f"type_={_repr_type(op.type_, autogen_context)}")
    if op.schema is not None:
        parts.append(f"schema={op.schema!r}")
    return f"op.cutover_column({', '.join(parts)})"


def _render_index(autogen_context: AutogenContext, op: _IndexOp) -> str:
    name = "build_blind_index" if isinstance(op, BuildBlindIndexOp) else "rotate_blind_index"
    parts = [repr(op.index)]
    if isinstance(op, RotateBlindIndexOp) and op.bits is not None:
        parts.append(f"bits={op.bits!r}")
    if op.batch_size != 1000:
        parts.append(f"batch_size={op.batch_size!r}")
    if op.settle is not None:
        parts.append(f"settle={op.settle!r}")
    if isinstance(op.cmk, str):
        parts.append(f"cmk={op.cmk!r}")
    return f"op.{name}({', '.join(parts)})"


def _render_nothing(autogen_context: AutogenContext, op: NothingToUndoOp) -> str:
    # ``pass``, not a bare comment: it may be the only statement of downgrade().
    return f"pass  # op.{op.operation}({op.table_name!r}) has nothing to undo"


# -- registration ------------------------------------------------------------------------------


def register() -> None:
    """Register the operations with Alembic: ``op.encrypt_column``, ``op.decrypt_column``,
    ``op.rewrap_keys``, ``op.rotate_data_keys``, ``op.cutover_column``,
    ``op.build_blind_index``, ``op.rotate_blind_index``. Idempotent;
    :func:`configure` calls it."""
    global _registered
    with _lock:
        if _registered:
            return
        Operations.register_operation("encrypt_column")(EncryptColumnOp)
        Operations.register_operation("decrypt_column")(DecryptColumnOp)
        Operations.register_operation("rewrap_keys")(RewrapKeysOp)
        Operations.register_operation("rotate_data_keys")(RotateDataKeysOp)
        Operations.register_operation("cutover_column")(CutoverColumnOp)
        Operations.register_operation("build_blind_index")(BuildBlindIndexOp)
        Operations.register_operation("rotate_blind_index")(RotateBlindIndexOp)
        Operations.implementation_for(EncryptColumnOp)(_encrypt_column)
        Operations.implementation_for(DecryptColumnOp)(_decrypt_column)
        Operations.implementation_for(RewrapKeysOp)(_rewrap_keys)
        Operations.implementation_for(RotateDataKeysOp)(_rotate_data_keys)
        Operations.implementation_for(CutoverColumnOp)(_cutover_column)
        Operations.implementation_for(NothingToUndoOp)(_nothing_to_undo)
        Operations.implementation_for(BuildBlindIndexOp)(_build_blind_index)
        Operations.implementation_for(RotateBlindIndexOp)(_rotate_blind_index)
        renderers.dispatch_for(BuildBlindIndexOp)(_render_index)
        renderers.dispatch_for(RotateBlindIndexOp)(_render_index)
        renderers.dispatch_for(EncryptColumnOp)(_render_encrypt)
        renderers.dispatch_for(DecryptColumnOp)(_render_decrypt)
        renderers.dispatch_for(RewrapKeysOp)(_render_rewrap)
        renderers.dispatch_for(RotateDataKeysOp)(_render_rotate)
        renderers.dispatch_for(CutoverColumnOp)(_render_cutover)
        renderers.dispatch_for(NothingToUndoOp)(_render_nothing)
        _registered = True
