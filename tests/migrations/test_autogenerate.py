"""Autogenerate and text storage: ``alembic revision --autogenerate`` in a real Alembic
environment shows the ``VARCHAR(n)`` -> ``TEXT`` change that encrypting a length-limited column
in place needs, on SQLite (batch mode) and PostgreSQL; the generated script runs, leaves nothing
to autogenerate, and the backfill then encrypts the column.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import alembic
import pytest
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from docblocks import doc_block
from sqlalchemy import (
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    inspect,
    make_url,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import migrations_helpers
from sqlalchemy_cmk import EDEKType, EncryptedMixin, EncryptedType, tenant_column
from sqlalchemy_cmk.search import BlindIndex, BlindIndexType, last_digits, search_tables

from .test_alembic_ops import DIALECTS

ENV_PY = """
from alembic import context
from sqlalchemy import engine_from_config, pool

import migrations_helpers

config = context.config
target_metadata = config.attributes["target_metadata"]


def run_migrations_online():
    connectable = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER a type
            render_item=migrations_helpers.render_item,
            compare_type=migrations_helpers.compare_type,
        )
        with context.begin_transaction():
            context.run_migrations()
    connectable.dispose()


run_migrations_online()
"""

VALUES = {i: f"note {i}: Grüße {'x' * (i * 13 % 180)}" for i in range(1, 41)}  # up to 195 chars


@pytest.fixture(params=DIALECTS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, a PostgreSQL schema or a MariaDB database of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/app.db"
        return
    if request.param == "mariadb":  # a database of its own (MySQL's schemas are databases)
        yield request.getfixturevalue("mariadb_url")
        return
    base = request.getfixturevalue("postgres_url")
    schema = f"ag_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    yield url.render_as_string(hide_password=False)
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def notes(metadata: MetaData, body: Any) -> Table:
    return Table(
        "notes",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("tenant_id", String(20), nullable=False),
        Column("body", body),
        Column("cmk_edek", EDEKType(), nullable=True),
    )


def make_config(tmp_path: Path, url: str, metadata: MetaData) -> Config:
    where = tmp_path / "alembic"
    (where / "versions").mkdir(parents=True)
    (where / "env.py").write_text(ENV_PY)
    template = Path(alembic.__file__).parent / "templates" / "generic" / "script.py.mako"
    shutil.copy(template, where / "script.py.mako")
    cfg = Config(output_buffer=io.StringIO())
    cfg.set_main_option("script_location", str(where))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["target_metadata"] = metadata
    return cfg


APP = """
import base64

from sqlalchemy_cmk import CMK
from sqlalchemy_cmk.providers.local import LocalKeyProvider

cmk = CMK(LocalKeyProvider({{"acme": base64.b64decode({key!r})}}),
          tenant_keys={{"acme": "local://acme"}}, audit_sinks=[])
"""


def test_autogenerate_widens_a_length_limited_column_for_text_storage(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy_cmk.cli import main

    engine = create_engine(db_url)
    table = notes(MetaData(), String(200))  # the application's table before encryption
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(
            table.insert(), [{"id": i, "tenant_id": "acme", "body": v} for i, v in VALUES.items()]
        )
    # The application's model during the migration: the same column, encrypted in place.
    model = MetaData()
    notes(model, EncryptedType(Text, storage="text", allow_plaintext=True))
    cfg = make_config(tmp_path, db_url, model)

    # The encrypting backfill refuses the VARCHAR(200) column: the ciphertext would not fit.
    name = f"ag_app_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(APP.format(key=base64.b64encode(os.urandom(32)).decode()))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("SQLALCHEMY_CMK_DATABASE_URL", db_url)
    argv = ["--table", "notes", "--column", "body", "--tenant-column", "tenant_id"]
    argv += ["--cmk", f"{name}:cmk", "--app-dir", str(tmp_path), "--no-progress"]
    try:
        assert main(["encrypt-column", *argv]) == 1

        script = command.revision(cfg, message="encrypt body", autogenerate=True, rev_id="e1")
        assert script is not None and not isinstance(script, list)
        source = Path(script.path).read_text()
        upgrade = source[source.index("def upgrade") : source.index("def downgrade")]
        assert "alter_column(" in upgrade and "'body'" in upgrade, source
        # As reflected: MySQL's is its dialect's own VARCHAR.
        assert re.search(r"existing_type=(sa|mysql)\.VARCHAR\(length=200\)", source), source
        assert "type_=sqlalchemy_cmk.EncryptedType(sa.Text(), storage='text')" in source
        assert "\nimport sqlalchemy_cmk\n" in source
        assert "'tenant_id'" not in source and "'cmk_edek'" not in source  # nothing else
        # What docs/migrations.md shows is what autogenerate writes (quotes and layout aside;
        # on SQLite inside a batch_alter_table("notes"), as render_as_batch makes it).
        shown = "".join(doc_block("migrations.md", "python", "sa.VARCHAR(length=200)").split())
        flat = "".join(upgrade.replace("'", '"').replace("mysql.VARCHAR", "sa.VARCHAR").split())
        assert shown.startswith('op.alter_column("notes","body",existing_type=')
        assert shown[shown.index("existing_type=") :].rstrip(",)") in flat

        command.upgrade(cfg, "head")  # the generated script runs ...
        body = {c["name"]: c["type"] for c in inspect(engine).get_columns("notes")}["body"]
        assert isinstance(body, String) and body.length is None
        with engine.connect() as conn:
            assert dict(conn.execute(text("SELECT id, body FROM notes")).all()) == VALUES  # type: ignore[arg-type]
        command.check(cfg)  # ... and leaves nothing to autogenerate

        # Now the backfill takes the column; every value is stored longer than 200 characters
        # would allow for the longest ones.
        assert main(["encrypt-column", *argv, "--json"]) == 0
        with engine.connect() as conn:
            stored = dict(conn.execute(text("SELECT id, body FROM notes")).all())  # type: ignore[arg-type]
        assert all(v.startswith("cmk:") for v in stored.values())
        assert max(len(v) for v in stored.values()) > 200
        assert main(["verify", *argv, "--require-encrypted", "--json"]) == 0
    finally:
        sys.modules.pop(name, None)
        engine.dispose()


def _compare(declared: Any, reflected: Any) -> bool | None:
    ctx = MigrationContext.configure(dialect_name="postgresql")
    return migrations_helpers.compare_type(
        ctx, Column("c", reflected), Column("c", declared), reflected, declared
    )


@pytest.mark.parametrize(
    ("reflected", "differs"),
    [
        ("postgresql.VARCHAR(200)", True),
        ("postgresql.VARCHAR(10000)", True),  # the backfill refuses any length
        ("sqlite.VARCHAR(255)", True),
        ("mysql.VARCHAR(255)", True),
        ("mysql.TINYTEXT()", True),  # 255 bytes, without a length argument
        ("postgresql.CHAR(20)", True),
        ("postgresql.TEXT()", False),
        ("postgresql.VARCHAR()", False),
        ("mysql.TEXT()", False),
        ("mysql.LONGTEXT()", False),
        ("sqlite.TEXT()", False),
    ],
)
def test_text_storage_needs_a_column_of_unlimited_length(reflected: str, differs: bool) -> None:
    from sqlalchemy.dialects import mysql, postgresql, sqlite

    inspected = eval(reflected, {"postgresql": postgresql, "sqlite": sqlite, "mysql": mysql})
    assert _compare(EncryptedType(Text, storage="text"), inspected) is differs
    assert _compare(EncryptedType(String(40), storage="text"), inspected) is differs
    # Binary storage wants a binary column, whatever the text column's length.
    assert _compare(EncryptedType(Text), inspected) is True
    assert _compare(EncryptedType(Text), LargeBinary()) is False


def searchable_model() -> MetaData:
    """A model with a searchable e-mail (exact, unique) and SSN (truncated, and a derived
    last-4 index), and the two tables searching needs."""

    class Base(DeclarativeBase):
        pass

    class Person(EncryptedMixin, Base):
        __tablename__ = "ag_people"

        id: Mapped[int] = mapped_column(primary_key=True)
        tenant_id: Mapped[str] = tenant_column(String(50))
        email: Mapped[str] = mapped_column(
            EncryptedType(String(255), search=BlindIndex(normalize="email", unique=True))
        )
        ssn: Mapped[str | None] = mapped_column(
            EncryptedType(
                String(20),
                search=[
                    BlindIndex(normalize="digits", bits=16),
                    BlindIndex(name="ssn_last4", transform=last_digits(4), bits=8),
                ],
            ),
            nullable=True,
        )

    search_tables(Base.metadata)
    return Base.metadata


SLOTS = {
    "email_bidx": True,
    "email_bidx_alt": True,
    "ssn_bidx": False,
    "ssn_bidx_alt": False,
    "ssn_last4": False,
    "ssn_last4_alt": False,
}


def test_autogenerate_writes_a_searchable_model(tmp_path: Path, db_url: str) -> None:
    """The slot columns, their (tenant, slot) indexes and the two search tables are written
    into a script that imports what it names, runs, and leaves nothing to autogenerate."""
    model = searchable_model()
    cfg = make_config(tmp_path, db_url, model)
    engine = create_engine(db_url)
    try:
        script = command.revision(cfg, message="people", autogenerate=True, rev_id="s1")
        assert script is not None and not isinstance(script, list)
        source = Path(script.path).read_text()
        upgrade = source[source.index("def upgrade") : source.index("def downgrade")]
        assert "\nimport sqlalchemy_cmk.search\n" in source
        assert "\nimport sqlalchemy_cmk\n" in source
        for slot, unique in SLOTS.items():
            column = f"sa.Column('{slot}', sqlalchemy_cmk.search.BlindIndexType(), nullable=True)"
            assert column in upgrade, upgrade
            assert re.search(
                rf"create_index\('ix_ag_people_{slot}', (?:'ag_people', )?\['tenant_id', "
                rf"'{slot}'\], unique={unique}\)",
                upgrade,
            ), upgrade
        # The encrypted columns without their search=: the slots are in the script already.
        assert "sqlalchemy_cmk.EncryptedType(sa.String(length=255))" in upgrade
        assert "BlindIndex(" not in source and "info=" not in source
        assert "op.create_table('cmk_tenant_keys'" in upgrade
        assert "op.create_table('cmk_search_indexes'" in upgrade

        command.upgrade(cfg, "head")  # the script runs ...
        found = {
            ix["name"]: (ix["column_names"], bool(ix["unique"]))
            for ix in inspect(engine).get_indexes("ag_people")
        }
        for slot, unique in SLOTS.items():
            assert found[f"ix_ag_people_{slot}"] == (["tenant_id", slot], unique)
        assert {"cmk_tenant_keys", "cmk_search_indexes"} <= set(inspect(engine).get_table_names())
        command.check(cfg)  # ... and leaves nothing to autogenerate
        command.downgrade(cfg, "base")
        assert "ag_people" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("reflected", "differs"),
    [
        ("postgresql.BYTEA()", False),
        ("sqlite.BLOB()", False),
        ("mysql.VARBINARY(37)", False),
        ("mysql.BLOB()", False),
        ("mysql.VARBINARY(21)", True),  # too short for a 256-bit index value
        ("postgresql.VARCHAR(37)", True),
        ("postgresql.TEXT()", True),
    ],
)
def test_a_blind_index_slot_is_a_binary_column(reflected: str, differs: bool) -> None:
    from sqlalchemy.dialects import mysql, postgresql, sqlite

    inspected = eval(reflected, {"postgresql": postgresql, "sqlite": sqlite, "mysql": mysql})
    assert _compare(BlindIndexType(), inspected) is differs


def test_a_searchable_table_copies_with_its_slots_and_indexes_once() -> None:
    """Table.to_metadata (and Alembic, which builds tables from copies of the columns) copies
    the slot columns and their indexes; the copied searchable and tenant columns add none."""
    table = searchable_model().tables["ag_people"]
    copy = table.to_metadata(MetaData())
    assert [c.name for c in copy.c] == [c.name for c in table.c]
    assert sorted(ix.name for ix in copy.indexes) == sorted(f"ix_ag_people_{s}" for s in SLOTS)
    copy.create(create_engine("sqlite://"))  # no index created twice


class _Contact:
    """A mixin's searchable column: each model gets its own copy, and its own slots."""

    tenant_id: Mapped[str] = tenant_column(String(50))
    phone: Mapped[str] = mapped_column(EncryptedType(String(20), search=BlindIndex(bits=128)))


def test_a_mixin_searchable_column_gives_each_model_its_slots() -> None:
    class Base(DeclarativeBase):
        pass

    class Lead(_Contact, EncryptedMixin, Base):
        __tablename__ = "ag_leads"
        id: Mapped[int] = mapped_column(primary_key=True)

    class Client(_Contact, EncryptedMixin, Base):
        __tablename__ = "ag_clients"
        id: Mapped[int] = mapped_column(primary_key=True)

    for model in (Lead, Client):
        table = model.__table__
        assert {"phone_bidx", "phone_bidx_alt"} <= set(table.c.keys())
        assert {ix.name for ix in table.indexes} == {
            f"ix_{table.name}_phone_bidx",
            f"ix_{table.name}_phone_bidx_alt",
        }
