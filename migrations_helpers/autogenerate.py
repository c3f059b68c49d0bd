"""Autogenerate support: render sqlalchemy-cmk column types, and compare them with the database.

Add two lines to ``context.configure`` in ``env.py`` (both online and offline)::

    import migrations_helpers

    context.configure(
        ...,
        target_metadata=Base.metadata,
        render_item=migrations_helpers.render_item,
        compare_type=migrations_helpers.compare_type,
    )

``render_item`` makes ``alembic revision --autogenerate`` write
``sqlalchemy_cmk.EncryptedType(sa.Text(), storage='text')`` and ``sqlalchemy_cmk.EDEKType()``,
and add ``import sqlalchemy_cmk`` to the script. Without it, Alembic writes
``sqlalchemy_cmk.types.EncryptedType(Text())``, which names ``Text`` unqualified and imports
nothing: a script that does not run.

``compare_type`` tells autogenerate what an encrypted column is stored as: an
``EncryptedType(storage="binary")`` column or an ``EDEKType`` column matches a reflected binary
column (BYTEA, BLOB, ...), an ``EncryptedType(storage="text")`` column matches a reflected text
column of unlimited length (TEXT, CLOB, VARCHAR without a length). So a column encrypted in place
by ``op.encrypt_column`` (still TEXT in the database) shows no diff against its new
``EncryptedType(Text, storage="text")`` declaration, and a real mismatch (an ``EncryptedType``
on an INTEGER column, ``storage="binary"`` on a TEXT column) is still reported. So is a
length-limited text column (``VARCHAR(200)``, MySQL's ``TINYTEXT``) declared
``storage="text"``: the stored ``cmk:`` + base64 text is longer than the value, the backfill
refuses such a column, and the ``op.alter_column(..., type_=...)`` autogenerate writes is the
change to ``TEXT`` it needs (on SQLite, with ``render_as_batch=True``).

For every other type it returns ``None``, leaving the comparison to Alembic. If you have your
own ``compare_type``, call this one first and fall back to yours when it returns ``None``.

``allow_plaintext`` is not rendered: it changes how the application reads, not the schema, and a
migration script should not pin a mode the application drops after its backfill.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import types as sqltypes

from sqlalchemy_cmk.types import EDEKType, EncryptedType

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import Column

__all__ = ["compare_type", "render_item"]

_IMPORT = "import sqlalchemy_cmk"


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Alembic ``render_item`` hook: render sqlalchemy-cmk types with their import.

    Args:
        type_: What Alembic is rendering (``"type"``, ``"column"``, ...).
        obj: The object rendered.
        autogen_context: Alembic's rendering context; ``import sqlalchemy_cmk`` is added to
            its imports when one of our types is rendered.

    Returns:
        The source text for an ``EncryptedType`` or ``EDEKType``; ``False`` (Alembic's default
        rendering) for anything else.
    """
    if type_ != "type":
        return False
    if isinstance(obj, EncryptedType):
        autogen_context.imports.add(_IMPORT)
        args = [_render_underlying(obj.underlying, autogen_context)]
        if obj.storage != "binary":
            args.append(f"storage={obj.storage!r}")
        return f"sqlalchemy_cmk.EncryptedType({', '.join(args)})"
    if isinstance(obj, EDEKType):
        autogen_context.imports.add(_IMPORT)
        return "sqlalchemy_cmk.EDEKType()"
    return False


def _render_underlying(
    underlying: sqltypes.TypeEngine[Any], autogen_context: AutogenContext
) -> str:
    # Alembic's own type renderer: ``sa.`` prefixes, dialect types with their imports,
    # variants, and any render_item of the user's for types of their own.
    from alembic.autogenerate.render import _repr_type

    return _repr_type(underlying, autogen_context)


def compare_type(
    context: MigrationContext,
    inspected_column: Column[Any],
    metadata_column: Column[Any],
    inspected_type: sqltypes.TypeEngine[Any],
    metadata_type: sqltypes.TypeEngine[Any],
) -> bool | None:
    """Alembic ``compare_type`` hook: compare sqlalchemy-cmk types by their storage.

    Returns:
        ``True`` if the reflected column cannot hold the declared encrypted column (a diff),
        ``False`` if it can (no diff, and Alembic compares no further), ``None`` for columns
        that are not ours (Alembic's default comparison).
    """
    if isinstance(metadata_type, EncryptedType):
        if metadata_type.storage == "text":
            # Not any text column: one that holds the ciphertext, whatever the value's length.
            return not _is_text(inspected_type) or _is_length_limited(inspected_type)
        return not _is_binary(inspected_type)
    if isinstance(metadata_type, EDEKType):
        return not _is_binary(inspected_type)
    return None


def _is_binary(typ: sqltypes.TypeEngine[Any]) -> bool:
    # BYTEA, BLOB, LONGBLOB, VARBINARY... all share LargeBinary's type affinity.
    return typ._type_affinity is sqltypes.LargeBinary()._type_affinity


def _is_text(typ: sqltypes.TypeEngine[Any]) -> bool:
    return isinstance(typ, sqltypes.String) and not isinstance(typ, sqltypes.Enum)


def _is_length_limited(typ: sqltypes.TypeEngine[Any]) -> bool:
    # The backfill's own test (a String with a length), plus MySQL's TINYTEXT: 255 bytes
    # without a length argument, too short for most ciphertexts.
    length = getattr(typ, "length", None)
    return length is not None or typ.__visit_name__ == "TINYTEXT"
