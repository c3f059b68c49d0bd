"""Alembic helpers for sqlalchemy-cmk (operations and autogenerate support).

Not yet implemented: the Alembic operations (``encrypt_column``, ``decrypt_column``,
``rewrap_keys``, ``rotate_data_keys``) are tracked as their own issue. Until then, this package
exposes nothing, rather than half-working operations.
"""

__all__: list[str] = []
