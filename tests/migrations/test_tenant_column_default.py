"""The migration tools take a model's declared tenant column (``sqlalchemy_cmk.tenant_column()``)
by default: the backfill functions through ``metadata=``, the Alembic operations through
Alembic's ``target_metadata``, the CLI through ``--metadata``. All three go through one resolver,
``migrations_helpers.backfill.resolve_tenant_column``, which also refuses an explicit tenant
column that contradicts the declaration, and says what to pass when there is none.

The table has a second tenant-looking column, ``owner_id``, that names the *other* tenant of each
row: a backfill that used it would seal every row under the wrong tenant's key. What is checked
is what a user would check: the tenant each stored envelope names, the raw text, the application
reading its rows back, the schema left alone by a refused operation.
"""

from __future__ import annotations

import io
import re
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import render_op_text
from alembic.autogenerate.api import AutogenContext
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, Text, inspect, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import migrations_helpers
from migrations_helpers import alembic_ops, backfill
from sqlalchemy_cmk import (
    CMK,
    ConfigurationError,
    EncryptedMixin,
    EncryptedType,
    tenant_column,
    tenant_context,
)
from sqlalchemy_cmk._format import parse_envelope, split_companion
from sqlalchemy_cmk.cli import main
from sqlalchemy_cmk.testing import FakeKeyProvider

TABLE = "tc_people"
OTHER = {"acme": "globex", "globex": "acme"}
# id -> (tenant, name); owner_id is always the other tenant.
ROWS: dict[int, tuple[str, str | None]] = {
    1: ("acme", "Ada Lovelace"),
    2: ("globex", "Grace Hopper"),
    3: ("acme", "Zoë 🙂"),
    4: ("globex", None),
    5: ("acme", ""),
    6: ("globex", "O'Brien"),
}
ORIGINAL = {i: name for i, (_, name) in ROWS.items()}


class Base(DeclarativeBase):
    pass


class Person(EncryptedMixin, Base):
    """The application's model during the migration, declaring its tenant column."""

    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = tenant_column(String(20))
    owner_id: Mapped[str] = mapped_column(String(20))
    name: Mapped[str | None] = mapped_column(
        EncryptedType(Text, storage="text", allow_plaintext=True)
    )


def plain_table(metadata: MetaData, *, info: bool = False) -> Table:
    """The table as it is before the migration (``info``: a Core declaration of the tenant)."""
    return Table(
        TABLE,
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("tenant_id", String(20), info={"sqlalchemy_cmk": "tenant"} if info else {}),
        Column("owner_id", String(20)),
        Column("name", Text),
    )


def seed(engine: Engine) -> None:
    md = MetaData()
    table = plain_table(md)
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            table.insert(),
            [
                {"id": i, "tenant_id": t, "owner_id": OTHER[t], "name": n}
                for i, (t, n) in ROWS.items()
            ],
        )


def new_cmk() -> CMK:
    keys = {"acme": "fake://acme", "globex": "fake://globex"}
    return CMK(FakeKeyProvider(), tenant_keys=keys, audit_sinks=[])


def raw_names(engine: Engine) -> dict[int, str | None]:
    with engine.connect() as conn:
        return dict(conn.execute(text(f"SELECT id, name FROM {TABLE}")).all())  # type: ignore[arg-type]


def sealed_for(engine: Engine) -> dict[int, str]:
    """Row id -> the tenant its stored envelope names (rows with a companion only)."""
    with engine.connect() as conn:
        rows = conn.execute(text(f"SELECT id, cmk_edek FROM {TABLE}")).all()
    return {
        i: parse_envelope(split_companion(bytes(e))[1]).tenant for i, e in rows if e is not None
    }


def assert_sealed_under_own_tenants(engine: Engine) -> None:
    names = raw_names(engine)
    for i, name in ORIGINAL.items():
        if name is None:
            assert names[i] is None
        else:
            assert names[i] is not None and names[i].startswith("cmk:")  # type: ignore[union-attr]
            assert name == "" or name not in names[i]  # type: ignore[operator]
    assert sealed_for(engine) == {i: t for i, (t, n) in ROWS.items() if n is not None}


def orm_names(engine: Engine, cmk: CMK) -> dict[int, str | None]:
    """What the application reads, tenant by tenant; loading checks each row's declared tenant
    against its envelope."""
    maker = sessionmaker(engine)
    cmk.install(maker)
    out: dict[int, str | None] = {}
    for tenant in ("acme", "globex"):
        with tenant_context(tenant), maker() as s:
            for p in s.scalars(select(Person).where(Person.tenant_id == tenant)):
                out[p.id] = p.name
    return out


def has_companion(engine: Engine) -> bool:
    return "cmk_edek" in {c["name"] for c in inspect(engine).get_columns(TABLE)}


def database_url(engine: Engine) -> str:
    """The engine's URL, with conftest's per-test PostgreSQL schema in the URL itself."""
    url = engine.url
    if url.get_backend_name() == "postgresql":
        with engine.connect() as conn:
            schema = conn.execute(text("select current_schema()")).scalar_one()
        url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


# -- the resolver --------------------------------------------------------------------------------


def test_the_declared_column_is_found_in_every_kind_of_models() -> None:
    resolve = backfill.resolve_tenant_column
    core = MetaData()
    plain_table(core, info=True)  # a Core table declares it through Column.info
    for models in (Base, Base.metadata, Person.__table__, [MetaData(), Base.metadata], core):
        assert resolve(TABLE, metadata=models) == "tenant_id"
        assert resolve(TABLE, "tenant_id", metadata=models) == "tenant_id"  # agreeing is fine
    in_schema = MetaData(schema="app")
    plain_table(in_schema, info=True)
    assert resolve(TABLE, metadata=in_schema) == "tenant_id"  # the MetaData's default schema
    assert resolve(TABLE, schema="app", metadata=in_schema) == "tenant_id"
    assert resolve(TABLE, "owner_id") == "owner_id"  # nothing declared to check against


def test_a_tenant_column_contradicting_the_model_is_refused() -> None:
    with pytest.raises(ConfigurationError) as info:
        backfill.resolve_tenant_column(TABLE, "owner_id", metadata=Base)
    message = str(info.value)
    assert "tenant_column='owner_id'" in message and "'tenant_id'" in message
    assert info.value.table == TABLE and info.value.column == "owner_id"


def test_without_a_declaration_the_error_says_what_to_pass() -> None:
    undeclared = MetaData()
    plain_table(undeclared)
    cases = {
        None: "no models were given",
        undeclared: "its model declares none",
        MetaData(): f"have no table {TABLE!r}",
    }
    for models, why in cases.items():
        with pytest.raises(ConfigurationError) as info:
            backfill.resolve_tenant_column(TABLE, metadata=models)
        message = str(info.value)
        assert 'tenant_column="..."' in message, message
        assert "sqlalchemy_cmk.tenant_column()" in message, message
        assert why in message, message


def test_models_of_the_wrong_kind_or_table_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="not 'other'"):
        backfill.resolve_tenant_column("other", metadata=Person.__table__)
    with pytest.raises(ConfigurationError, match="takes a MetaData"):
        backfill.resolve_tenant_column(TABLE, metadata=42)  # type: ignore[arg-type]
    two = MetaData()
    Table(
        "two",
        two,
        Column("id", Integer, primary_key=True),
        Column("a", String(9), info={"sqlalchemy_cmk": "tenant"}),
        Column("b", String(9), info={"sqlalchemy_cmk": "tenant"}),
    )
    with pytest.raises(ConfigurationError, match="declares 2 tenant columns"):
        backfill.resolve_tenant_column("two", metadata=two)


# -- the backfill functions ----------------------------------------------------------------------


def test_backfill_functions_use_the_declared_tenant_column(engine: Engine) -> None:
    seed(engine)
    backfill.ensure_companion(engine, TABLE)
    cmk = new_cmk()
    report = backfill.encrypt_columns(engine, cmk, TABLE, ["name"], metadata=Base, batch_size=2)
    assert report.by_tenant == {"acme": 3, "globex": 2}
    assert_sealed_under_own_tenants(engine)  # by tenant_id, never by owner_id
    assert orm_names(engine, cmk) == ORIGINAL

    checked = backfill.verify(engine, cmk, TABLE, ["name"], metadata=Base.metadata)
    assert checked.ok and checked.encrypted_ok == {"acme": 3, "globex": 2}
    before = sealed_for(engine)
    backfill.rotate_data_keys(engine, cmk, TABLE, ["name"], metadata=Person.__table__)
    assert sealed_for(engine) == before  # same tenants, fresh data keys
    assert orm_names(engine, cmk) == ORIGINAL

    backfill.decrypt_columns(engine, cmk, TABLE, ["name"], metadata=Base)
    assert raw_names(engine) == ORIGINAL


Run = Callable[..., Any]
OPERATIONS: dict[str, Run] = {
    "encrypt": backfill.encrypt_columns,
    "decrypt": backfill.decrypt_columns,
    "rotate": backfill.rotate_data_keys,
    "verify": backfill.verify,
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_backfill_functions_refuse_a_contradicting_or_missing_tenant_column(
    engine: Engine, operation: str
) -> None:
    seed(engine)
    backfill.ensure_companion(engine, TABLE)
    run, cmk = OPERATIONS[operation], new_cmk()
    with pytest.raises(ConfigurationError, match="contradicts the model"):
        run(engine, cmk, TABLE, ["name"], tenant_column="owner_id", metadata=Base)
    with pytest.raises(ConfigurationError, match=re.escape('tenant_column="..."')):
        run(engine, cmk, TABLE, ["name"])
    assert raw_names(engine) == ORIGINAL  # nothing was written
    assert sealed_for(engine) == {}


# -- the Alembic operations ----------------------------------------------------------------------

ENV_PY = """
from alembic import context
from sqlalchemy import engine_from_config, pool

import migrations_helpers

config = context.config
migrations_helpers.configure(config.attributes["cmk"])
connectable = engine_from_config(
    config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool
)
with connectable.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=config.attributes.get("target_metadata"),
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()
connectable.dispose()
"""

INSERTS = [{"id": i, "tenant_id": t, "owner_id": OTHER[t], "name": n} for i, (t, n) in ROWS.items()]
R1 = f'''
"""create {TABLE} with plaintext rows"""
import sqlalchemy as sa
from alembic import op

revision = "r1"
down_revision = None


def upgrade():
    table = op.create_table(
        "{TABLE}",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("tenant_id", sa.String(20), nullable=False),
        sa.Column("owner_id", sa.String(20), nullable=False),
        sa.Column("name", sa.Text, nullable=True),
    )
    op.bulk_insert(table, {INSERTS!r})


def downgrade():
    op.drop_table("{TABLE}")
'''


def r2(arguments: str, column: str = "name") -> str:
    return f'''
"""encrypt {TABLE}.name"""
from alembic import op

revision = "r2"
down_revision = "r1"


def upgrade():
    op.encrypt_column("{TABLE}", "{column}"{arguments})
    op.rotate_data_keys("{TABLE}", ["{column}"]{arguments})


def downgrade():
    op.decrypt_column("{TABLE}", "{column}"{arguments})
'''


@pytest.fixture(autouse=True)
def _forget_cmk() -> Iterator[None]:
    yield
    migrations_helpers.configure(None)


def alembic_config(
    tmp_path: Path,
    engine: Engine,
    r2_args: str,
    cmk: CMK,
    metadata: MetaData | None,
    column: str = "name",
) -> Config:
    where = tmp_path / f"alembic_{uuid.uuid4().hex[:6]}"
    (where / "versions").mkdir(parents=True)
    (where / "env.py").write_text(ENV_PY)
    (where / "versions" / "r1.py").write_text(R1)
    (where / "versions" / "r2.py").write_text(r2(r2_args, column))
    cfg = Config(output_buffer=io.StringIO())
    cfg.set_main_option("script_location", str(where))
    cfg.set_main_option("sqlalchemy.url", database_url(engine).replace("%", "%%"))
    cfg.attributes["cmk"] = cmk
    cfg.attributes["target_metadata"] = metadata
    return cfg


def revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def test_alembic_operations_use_the_declared_tenant_column(tmp_path: Path, engine: Engine) -> None:
    cmk = new_cmk()
    cfg = alembic_config(tmp_path, engine, ", batch_size=2", cmk, Base.metadata)
    command.upgrade(cfg, "head")
    assert revision(engine) == "r2"
    assert_sealed_under_own_tenants(engine)
    assert orm_names(engine, cmk) == ORIGINAL
    command.downgrade(cfg, "r1")
    assert raw_names(engine) == ORIGINAL


@pytest.mark.parametrize(
    ("r2_args", "metadata", "column", "message"),
    [
        (", tenant_column='owner_id'", Base.metadata, "name", "contradicts the model"),
        ("", None, "name", "no models were given"),
        ("", Base.metadata, "tenant_id", "it is the tenant column"),
    ],
    ids=["contradiction", "no-declaration", "encrypting-the-declared-column"],
)
def test_alembic_operations_refuse_before_changing_anything(
    tmp_path: Path,
    engine: Engine,
    r2_args: str,
    metadata: MetaData | None,
    column: str,
    message: str,
) -> None:
    cfg = alembic_config(tmp_path, engine, r2_args, new_cmk(), metadata, column)
    with pytest.raises(ConfigurationError) as info:
        command.upgrade(cfg, "head")
    assert message in str(info.value)
    assert revision(engine) == "r1"
    assert not has_companion(engine)  # refused before even the schema changed
    assert raw_names(engine) == ORIGINAL


def test_an_operation_without_tenant_column_renders_without_it() -> None:
    migrations_helpers.register()
    opts = {"sqlalchemy_module_prefix": "sa.", "alembic_module_prefix": "op."}
    autogen = AutogenContext(MigrationContext.configure(dialect_name="sqlite", opts=opts))
    enc = alembic_ops.EncryptColumnOp(TABLE, "name")
    assert render_op_text(autogen, enc) == f"op.encrypt_column('{TABLE}', 'name')"
    assert render_op_text(autogen, enc.reverse()) == f"op.decrypt_column('{TABLE}', 'name')"


# -- the command line ----------------------------------------------------------------------------

APP = f"""
from sqlalchemy import Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_cmk import CMK, EncryptedMixin, EncryptedType, tenant_column
from sqlalchemy_cmk.testing import FakeKeyProvider

cmk = CMK(
    FakeKeyProvider(),
    tenant_keys={{"acme": "fake://acme", "globex": "fake://globex"}},
    audit_sinks=[],
)


class Base(DeclarativeBase):
    pass


class Person(EncryptedMixin, Base):
    __tablename__ = "{TABLE}"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[str] = tenant_column(String(20))
    name: Mapped[str | None] = mapped_column(
        EncryptedType(Text, storage="text", allow_plaintext=True)
    )
"""


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module with the application's CMK and models; yields its name."""
    name = f"tc_app_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(APP))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI adds --app-dir to it
    monkeypatch.chdir(tmp_path)  # --app-dir defaults to the current directory
    yield name
    sys.modules.pop(name, None)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_cli_takes_the_tenant_column_from_metadata(
    engine: Engine, app: str, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(engine)
    target = ["--database-url", database_url(engine), "--table", TABLE, "--column", "name"]
    models = ["--cmk", f"{app}:cmk", "--metadata", f"{app}:Base"]
    code, err = cli(capsys, "encrypt-column", *target, *models, "--no-progress")
    assert code == 0, err
    assert_sealed_under_own_tenants(engine)
    assert cli(capsys, "verify", *target, *models, "--no-progress")[0] == 0
    assert cli(capsys, "rotate", *target, *models, "--no-progress")[0] == 0
    assert_sealed_under_own_tenants(engine)
    assert cli(capsys, "decrypt-column", *target, *models, "--no-progress")[0] == 0
    assert raw_names(engine) == ORIGINAL


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_cli_refuses_a_contradicting_or_missing_tenant_column(
    engine: Engine, app: str, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(engine)
    target = ["--database-url", database_url(engine), "--table", TABLE, "--column", "name"]
    keys = ["--cmk", f"{app}:cmk"]
    models = ["--metadata", f"{app}:Base"]
    code, err = cli(
        capsys, "encrypt-column", *target, *keys, *models, "--tenant-column", "owner_id"
    )
    assert code == 2 and "contradicts the model" in err
    code, err = cli(capsys, "encrypt-column", *target, *keys)
    assert code == 2 and "--tenant-column NAME" in err and "tenant_column()" in err
    code, err = cli(capsys, "verify", *target, *keys, "--metadata", f"{app}:Nope")
    assert code == 2 and "--metadata" in err
    code, err = cli(capsys, "verify", *target, *keys, "--metadata", "no_such_module_xyz:Base")
    assert code == 2 and "no_such_module_xyz" in err
    assert not has_companion(engine)  # nothing changed, not even the schema
    assert raw_names(engine) == ORIGINAL
