"""Alembic helpers for sqlalchemy-cmk: operations that encrypt existing data, and autogenerate.

In ``env.py``::

    import migrations_helpers

    # The CMK the operations use (a CMK, or "module:attribute"); also registers
    # op.encrypt_column, op.decrypt_column, op.rewrap_keys, op.rotate_data_keys,
    # op.build_blind_index and op.rotate_blind_index.
    migrations_helpers.configure("myapp.crypto:cmk")

    def run_migrations_online():
        ...
        with connectable.connect() as connection:  # connect(), not begin(): see alembic_ops
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                transaction_per_migration=True,
                render_item=migrations_helpers.render_item,
                compare_type=migrations_helpers.compare_type,
            )
            with context.begin_transaction():
                context.run_migrations()

Then, in a migration: ``op.encrypt_column("patients", "ssn", tenant_column="tenant_id")``, or
``op.encrypt_column("patients", "ssn")`` when the model declares its tenant column with
``sqlalchemy_cmk.tenant_column()`` and ``target_metadata`` holds the model. See
:mod:`migrations_helpers.alembic_ops` for what each operation does and
:mod:`migrations_helpers.autogenerate` for the two hooks. The engine behind the operations is
:mod:`migrations_helpers.backfill` (also used by the ``sqlalchemy-cmk`` CLI).

The backfill engine's functions, reports and errors are exported here too (``encrypt_columns``,
``verify``, ``Report``...): the ``sqlalchemy-cmk`` migration commands use these names and no
other. A run's options travel as one :class:`~migrations_helpers.backfill.Job`, which
:func:`~migrations_helpers.backfill.run_job` runs: the CLI and the Alembic operations both build
one. The names below are loaded on first use: the backfill engine must work without Alembic
installed (Alembic is the ``migrations`` extra), and importing this
package registers nothing with Alembic (call :func:`register` or :func:`configure`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy_cmk._cmk import load_cmk as load_cmk

    from .alembic_ops import BuildBlindIndexOp as BuildBlindIndexOp
    from .alembic_ops import CutoverColumnOp as CutoverColumnOp
    from .alembic_ops import DecryptColumnOp as DecryptColumnOp
    from .alembic_ops import EncryptColumnOp as EncryptColumnOp
    from .alembic_ops import NothingToUndoOp as NothingToUndoOp
    from .alembic_ops import RewrapKeysOp as RewrapKeysOp
    from .alembic_ops import RotateBlindIndexOp as RotateBlindIndexOp
    from .alembic_ops import RotateDataKeysOp as RotateDataKeysOp
    from .alembic_ops import configure as configure
    from .alembic_ops import configured_cmk as configured_cmk
    from .alembic_ops import register as register
    from .autogenerate import compare_type as compare_type
    from .autogenerate import render_item as render_item
    from .backfill import IncompleteColumnsError as IncompleteColumnsError
    from .backfill import Job as Job
    from .backfill import MigrationDatabaseError as MigrationDatabaseError
    from .backfill import Models as Models
    from .backfill import MoveNotFinishedError as MoveNotFinishedError
    from .backfill import Progress as Progress
    from .backfill import Report as Report
    from .backfill import StatusReport as StatusReport
    from .backfill import UndeterminedColumnsError as UndeterminedColumnsError
    from .backfill import UniqueColumnError as UniqueColumnError
    from .backfill import UnreadableWriteError as UnreadableWriteError
    from .backfill import VerifyReport as VerifyReport
    from .backfill import check_cutover as check_cutover
    from .backfill import check_encryptable as check_encryptable
    from .backfill import decrypt_columns as decrypt_columns
    from .backfill import encrypt_columns as encrypt_columns
    from .backfill import ensure_companion as ensure_companion
    from .backfill import parallel_workers as parallel_workers
    from .backfill import resolve_tenant_column as resolve_tenant_column
    from .backfill import rewrap_keys as rewrap_keys
    from .backfill import rotate_data_keys as rotate_data_keys
    from .backfill import run_job as run_job
    from .backfill import status as status
    from .backfill import verify as verify
    from .search_index import IndexReport as IndexReport
    from .search_index import IndexStatus as IndexStatus
    from .search_index import IndexVerifyReport as IndexVerifyReport
    from .search_index import build_index as build_index
    from .search_index import index_status as index_status
    from .search_index import rotate_index as rotate_index
    from .search_index import verify_index as verify_index

__all__ = [
    "BuildBlindIndexOp",
    "CutoverColumnOp",
    "DecryptColumnOp",
    "EncryptColumnOp",
    "IncompleteColumnsError",
    "IndexReport",
    "IndexStatus",
    "IndexVerifyReport",
    "Job",
    "MigrationDatabaseError",
    "Models",
    "MoveNotFinishedError",
    "NothingToUndoOp",
    "Progress",
    "Report",
    "RewrapKeysOp",
    "RotateBlindIndexOp",
    "RotateDataKeysOp",
    "StatusReport",
    "UndeterminedColumnsError",
    "UniqueColumnError",
    "UnreadableWriteError",
    "VerifyReport",
    "build_index",
    "check_cutover",
    "check_encryptable",
    "compare_type",
    "configure",
    "configured_cmk",
    "decrypt_columns",
    "encrypt_columns",
    "ensure_companion",
    "index_status",
    "load_cmk",
    "parallel_workers",
    "register",
    "render_item",
    "resolve_tenant_column",
    "rewrap_keys",
    "rotate_data_keys",
    "rotate_index",
    "run_job",
    "status",
    "verify",
    "verify_index",
]

_HOMES = {
    "BuildBlindIndexOp": ".alembic_ops",
    "CutoverColumnOp": ".alembic_ops",
    "DecryptColumnOp": ".alembic_ops",
    "EncryptColumnOp": ".alembic_ops",
    "NothingToUndoOp": ".alembic_ops",
    "RewrapKeysOp": ".alembic_ops",
    "RotateBlindIndexOp": ".alembic_ops",
    "RotateDataKeysOp": ".alembic_ops",
    "configure": ".alembic_ops",
    "configured_cmk": ".alembic_ops",
    "register": ".alembic_ops",
    "compare_type": ".autogenerate",
    "render_item": ".autogenerate",
    # The backfill engine (what the operations and the CLI run) and its errors and reports:
    # these work without Alembic.
    "IncompleteColumnsError": ".backfill",
    "Job": ".backfill",
    "MigrationDatabaseError": ".backfill",
    "Models": ".backfill",
    "MoveNotFinishedError": ".backfill",
    "Progress": ".backfill",
    "Report": ".backfill",
    "StatusReport": ".backfill",
    "UndeterminedColumnsError": ".backfill",
    "UniqueColumnError": ".backfill",
    "UnreadableWriteError": ".backfill",
    "VerifyReport": ".backfill",
    "check_cutover": ".backfill",
    "check_encryptable": ".backfill",
    "parallel_workers": ".backfill",
    "decrypt_columns": ".backfill",
    "encrypt_columns": ".backfill",
    "ensure_companion": ".backfill",
    "resolve_tenant_column": ".backfill",
    "rewrap_keys": ".backfill",
    "rotate_data_keys": ".backfill",
    "run_job": ".backfill",
    "status": ".backfill",
    "verify": ".backfill",
    # Blind indexes (searchable columns): build, rotate, status, verify; on the same engine.
    "IndexReport": ".search_index",
    "IndexStatus": ".search_index",
    "IndexVerifyReport": ".search_index",
    "build_index": ".search_index",
    "index_status": ".search_index",
    "rotate_index": ".search_index",
    "verify_index": ".search_index",
    # The loader behind configure() and the CLI's --cmk: a CMK, or "module:attribute" naming
    # one (or a function of no arguments returning one); whatever the module does wrong ends
    # as one ConfigurationError.
    "load_cmk": "sqlalchemy_cmk._cmk",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
