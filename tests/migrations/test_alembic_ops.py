"""The Alembic operations and autogenerate hooks, in real Alembic environments built per test.

Each test writes an Alembic environment into ``tmp_path`` (an ``env.py`` like Alembic's generic
template plus the two ``migrations_helpers`` lines, and migration scripts) and drives it through
``alembic.command``, as ``alembic upgrade`` would, against a SQLite file and a PostgreSQL schema
of its own.
"""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import alembic
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata, render_op_text
from alembic.autogenerate.api import AutogenContext
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    inspect,
    make_url,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import migrations_helpers
from migrations_helpers import alembic_ops
from sqlalchemy_cmk import (
    CMK,
    ConfigurationError,
    EDEKType,
    EncryptedMixin,
    EncryptedType,
    TenantNotConfiguredError,
    tenant_context,
)
from sqlalchemy_cmk._format import parse_envelope, split_companion
from sqlalchemy_cmk.testing import FakeKeyProvider

# -- the application's model after the migration ---------------------------------------------


class Base(DeclarativeBase):
    pass


class Person(EncryptedMixin, Base):
    __tablename__ = "people"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(20))
    name: Mapped[str | None] = mapped_column(
        EncryptedType(Text, storage="text", allow_plaintext=True)
    )
    note: Mapped[str | None] = mapped_column(Text)


# Tricky plaintext on purpose: non-ASCII, empty, NULL, whitespace and newlines, long, quotes.
ROWS: list[dict[str, Any]] = [
    {"id": 1, "tenant_id": "acme", "name": "Ada Lovelace", "note": "n1"},
    {"id": 2, "tenant_id": "acme", "name": "Zoë 🙂 ünïcødé", "note": "n2"},
    {"id": 3, "tenant_id": "acme", "name": "", "note": None},
    {"id": 4, "tenant_id": "acme", "name": None, "note": "n4"},
    {"id": 5, "tenant_id": "acme", "name": "  padded\nnew line\t", "note": "n5"},
    {"id": 6, "tenant_id": "globex", "name": "Grace Hopper", "note": "n6"},
    {"id": 7, "tenant_id": "globex", "name": "x" * 3000, "note": "n7"},
    {"id": 8, "tenant_id": "globex", "name": "O'Brien'); DROP TABLE people;--", "note": None},
]
ORIGINAL = {r["id"]: r["name"] for r in ROWS}
TENANT_KEYS = {"acme": "fake://acme", "globex": "fake://globex"}

R1 = '''
"""create people, with plaintext rows of two tenants"""
import sqlalchemy as sa
from alembic import op

revision = "r1"
down_revision = None


def upgrade():
    people = op.create_table(
        "people",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.String(20), nullable=False),
        sa.Column("name", sa.Text, nullable=True),
        sa.Column("note", sa.Text, nullable=True),
    )
    op.bulk_insert(people, ROWS)


def downgrade():
    op.drop_table("people")
'''.replace("ROWS", repr(ROWS))

R2 = '''
"""encrypt people.name"""
from alembic import op

revision = "r2"
down_revision = "r1"


def upgrade():
    op.encrypt_column("people", "name", tenant_column="tenant_id", batch_size=2)


def downgrade():
    op.decrypt_column("people", "name", tenant_column="tenant_id", batch_size=2)
'''

R3_ROTATE = '''
"""rewrap, then rotate"""
from alembic import op

revision = "r3"
down_revision = "r2"


def upgrade():
    op.rewrap_keys("people", batch_size=3)
    op.rotate_data_keys("people", ["name"], tenant_column="tenant_id", batch_size=3)


def downgrade():
    pass  # neither has anything to undo
'''

ENV_PY = """
from alembic import context
from sqlalchemy import engine_from_config, pool

import migrations_helpers

config = context.config
migrations_helpers.configure(config.attributes.get("cmk") or config.get_main_option("cmk"))
target_metadata = config.attributes.get("target_metadata")


def run_migrations_offline():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        transaction_per_migration=True,
        render_item=migrations_helpers.render_item,
        compare_type=migrations_helpers.compare_type,
    )
    with context.begin_transaction():
        context.run_migrations()


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
            transaction_per_migration=True,
            render_item=migrations_helpers.render_item,
            compare_type=migrations_helpers.compare_type,
        )
        with context.begin_transaction():
            context.run_migrations()
    connectable.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
"""


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _forget_cmk() -> Iterator[None]:
    yield
    migrations_helpers.configure(None)


# The dialects of the db_url fixtures, marked as conftest's engine fixture marks them.
DIALECTS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.postgresql),
    pytest.param("mariadb", marks=pytest.mark.mariadb),
]


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
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    yield url.render_as_string(hide_password=False)
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def make_config(
    tmp_path: Path,
    url: str,
    scripts: dict[str, str],
    *,
    cmk: CMK | None = None,
    cmk_option: str | None = None,
    target_metadata: MetaData | None = None,
) -> Config:
    """Write an Alembic environment (env.py, template, versions/) and return its Config."""
    where = tmp_path / "alembic"
    (where / "versions").mkdir(parents=True, exist_ok=True)
    (where / "env.py").write_text(ENV_PY)
    template = Path(alembic.__file__).parent / "templates" / "generic" / "script.py.mako"
    shutil.copy(template, where / "script.py.mako")
    for name, source in scripts.items():
        (where / "versions" / f"{name}.py").write_text(textwrap.dedent(source))
    cfg = Config(output_buffer=io.StringIO())
    cfg.set_main_option("script_location", str(where))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if cmk_option is not None:
        cfg.set_main_option("cmk", cmk_option)
    cfg.attributes["cmk"] = cmk
    cfg.attributes["target_metadata"] = target_metadata
    return cfg


def new_cmk(provider: FakeKeyProvider, keys: dict[str, Any] | None = None) -> CMK:
    return CMK(provider, tenant_keys=TENANT_KEYS if keys is None else keys, audit_sinks=[])


def raw(engine: Engine, column: str = "name") -> dict[int, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(text(f"SELECT id, {column} FROM people ORDER BY id")).all())  # type: ignore[arg-type]


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def orm_names(engine: Engine, cmk: CMK) -> dict[int, str | None]:
    """What the application reads through the ORM, each tenant in its own context."""
    maker = sessionmaker(engine)
    cmk.install(maker)
    out: dict[int, str | None] = {}
    for tenant in ("acme", "globex"):
        with tenant_context(tenant), maker() as s:
            for p in s.scalars(select(Person).where(Person.tenant_id == tenant)):
                out[p.id] = p.name
    return out


def assert_encrypted(values: dict[int, Any]) -> None:
    for pk, value in values.items():
        if ORIGINAL[pk] is None:
            assert value is None, pk
        else:
            assert isinstance(value, str) and value.startswith("cmk:"), (pk, value[:20])
            assert ORIGINAL[pk] == "" or ORIGINAL[pk] not in value


def model_diff(engine: Engine, metadata: MetaData, **opts: Any) -> list[Any]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts=opts)
        return list(compare_metadata(ctx, metadata))


# -- the round trip ----------------------------------------------------------------------------


def test_upgrade_downgrade_upgrade_round_trip(tmp_path: Path, db_url: str) -> None:
    provider = FakeKeyProvider()
    cmk = new_cmk(provider)
    cfg = make_config(tmp_path, db_url, {"r1": R1, "r2": R2}, cmk=cmk)
    engine = create_engine(db_url)
    try:
        command.upgrade(cfg, "head")
        assert current_revision(engine) == "r2"
        first = raw(engine)
        assert_encrypted(first)
        edeks = raw(engine, "cmk_edek")
        assert all(edeks[pk] is not None for pk, v in ORIGINAL.items() if v is not None)
        assert raw(engine, "note") == {r["id"]: r["note"] for r in ROWS}  # untouched
        # Each row is sealed under its own tenant's key.
        assert {parse_envelope(split_companion(bytes(edeks[1]))[1]).key_ref} == {"fake://acme"}
        assert parse_envelope(split_companion(bytes(edeks[6]))[1]).key_ref == "fake://globex"
        # The application reads every row; autogenerate sees the model as applied.
        assert orm_names(engine, cmk) == ORIGINAL
        assert model_diff(engine, Base.metadata, **_hooks()) == []

        # A finished backfill does nothing: re-run revision 2 (as after a crash before the
        # version table was updated) and the stored ciphertext stays byte-for-byte the same.
        command.stamp(cfg, "r1")
        command.upgrade(cfg, "head")
        assert raw(engine) == first

        command.downgrade(cfg, "-1")
        assert current_revision(engine) == "r1"
        assert raw(engine) == ORIGINAL  # plaintext restored byte-for-byte, NULL stays NULL
        assert "cmk_edek" in {c["name"] for c in inspect(engine).get_columns("people")}

        command.upgrade(cfg, "head")  # and again
        assert current_revision(engine) == "r2"
        assert_encrypted(raw(engine))
        assert orm_names(engine, cmk) == ORIGINAL
    finally:
        engine.dispose()


def test_a_failed_backfill_leaves_the_revision_unapplied_and_resumes(
    tmp_path: Path, db_url: str
) -> None:
    provider = FakeKeyProvider()
    only_acme = new_cmk(provider, {"acme": "fake://acme"})
    cfg = make_config(tmp_path, db_url, {"r1": R1, "r2": R2}, cmk=only_acme)
    engine = create_engine(db_url)
    try:
        with pytest.raises(TenantNotConfiguredError) as info:
            command.upgrade(cfg, "head")
        assert info.value.tenant == "globex"
        assert current_revision(engine) == "r1"  # revision 2 is not recorded as applied
        partial = raw(engine)
        for pk in (6, 7, 8):  # globex has no key: its rows were never touched
            assert partial[pk] == ORIGINAL[pk]
        done = {pk for pk, v in partial.items() if isinstance(v, str) and v.startswith("cmk:")}
        assert done == {1, 2, 3, 5}  # acme's batches (2 rows each, by primary key) committed

        cfg.attributes["cmk"] = new_cmk(provider)  # the operator adds globex's key, reruns
        command.upgrade(cfg, "head")
        assert current_revision(engine) == "r2"
        final = raw(engine)
        assert_encrypted(final)
        for pk in done:  # resumed: rows done by the failed run were not sealed again
            assert final[pk] == partial[pk]
        assert orm_names(engine, cfg.attributes["cmk"]) == ORIGINAL
    finally:
        engine.dispose()


def test_rewrap_and_rotate_then_downgrade_does_nothing(tmp_path: Path, db_url: str) -> None:
    provider = FakeKeyProvider()
    cfg = make_config(
        tmp_path, db_url, {"r1": R1, "r2": R2, "r3": R3_ROTATE}, cmk=new_cmk(provider)
    )
    engine = create_engine(db_url)
    try:
        command.upgrade(cfg, "r2")
        before, edeks_before = raw(engine), raw(engine, "cmk_edek")
        # acme rotates its master key: the new one is primary, the old one still readable.
        rotated = new_cmk(
            provider, {"acme": ["fake://acme-2", "fake://acme"], "globex": "fake://globex"}
        )
        cfg.attributes["cmk"] = rotated
        command.upgrade(cfg, "head")
        after, edeks_after = raw(engine), raw(engine, "cmk_edek")
        refs = {
            pk: parse_envelope(split_companion(bytes(e))[1]).key_ref
            for pk, e in edeks_after.items()
            if e is not None
        }
        assert {refs[pk] for pk in (1, 2, 3, 5)} == {"fake://acme-2"}
        assert {refs[pk] for pk in (6, 7, 8)} == {"fake://globex"}
        # rotate_data_keys: fresh data keys and row ids, so every encrypted value changed.
        for pk, value in before.items():
            if value is not None:
                assert after[pk] != value and after[pk].startswith("cmk:")
                assert (
                    split_companion(bytes(edeks_after[pk]))[0]
                    != split_companion(bytes(edeks_before[pk]))[0]
                )
        # Only the new acme key is needed now.
        only_new = new_cmk(provider, {"acme": "fake://acme-2", "globex": "fake://globex"})
        assert orm_names(engine, only_new) == ORIGINAL

        command.downgrade(cfg, "r2")  # nothing to undo: data as it was after the upgrade
        assert current_revision(engine) == "r2"
        assert raw(engine) == after
    finally:
        engine.dispose()


# -- configuration errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["sqlite:///{tmp}/never-created.db", "postgresql+psycopg://nobody@127.0.0.1:1/never"],
    ids=["sqlite", "postgresql"],
)
def test_offline_sql_mode_refuses_clearly(tmp_path: Path, url: str) -> None:
    url = url.format(tmp=tmp_path)
    cfg = make_config(tmp_path, url, {"r1": R1, "r2": R2}, cmk=new_cmk(FakeKeyProvider()))
    with pytest.raises(ConfigurationError) as info:
        command.upgrade(cfg, "head", sql=True)
    message = str(info.value)
    assert "op.encrypt_column('people')" in message
    assert "--sql" in message and "online" in message
    assert "sqlalchemy-cmk encrypt-column" in message
    assert info.value.table == "people"
    script = cfg.output_buffer.getvalue()  # type: ignore[union-attr]
    assert "CREATE TABLE people" in script  # revision 1 was rendered...
    assert "cmk_edek" not in script  # ...and nothing half-right of revision 2
    assert not (tmp_path / "never-created.db").exists()

    with pytest.raises(ConfigurationError, match="sqlalchemy-cmk decrypt-column"):
        command.downgrade(cfg, "r2:r1", sql=True)


def test_missing_cmk_names_both_ways_and_changes_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/app.db"
    cfg = make_config(tmp_path, url, {"r1": R1, "r2": R2}, cmk=None)
    engine = create_engine(url)
    try:
        with pytest.raises(ConfigurationError) as info:
            command.upgrade(cfg, "head")
        assert "migrations_helpers.configure(cmk)" in str(info.value)
        assert "cmk=" in str(info.value)
        assert current_revision(engine) == "r1"
        assert "cmk_edek" not in {c["name"] for c in inspect(engine).get_columns("people")}
        assert raw(engine) == ORIGINAL
    finally:
        engine.dispose()


def test_cmk_given_as_module_attribute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``configure("module:attribute")`` with a LocalKeyProvider key file, as an app would."""
    from sqlalchemy_cmk.providers.local import LocalKeyProvider

    LocalKeyProvider.generate_key_file(tmp_path / "keys.json", ["acme", "globex"])
    module = f"crypto_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            f"""
            from sqlalchemy_cmk import CMK
            from sqlalchemy_cmk.providers.local import LocalKeyProvider

            cmk = CMK(
                LocalKeyProvider.from_file({str(tmp_path / "keys.json")!r}),
                tenant_keys={{"acme": "local://acme", "globex": "local://globex"}},
                audit_sinks=[],
            )
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    url = f"sqlite:///{tmp_path}/app.db"
    cfg = make_config(tmp_path, url, {"r1": R1, "r2": R2}, cmk_option=f"{module}:cmk")
    engine = create_engine(url)
    try:
        command.upgrade(cfg, "head")
        assert_encrypted(raw(engine))
        app_cmk = sys.modules[module].cmk
        assert migrations_helpers.configured_cmk() is app_cmk
        assert orm_names(engine, app_cmk) == ORIGINAL
    finally:
        engine.dispose()
        sys.modules.pop(module, None)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("no_colon", "module:attribute"),
        ("no_such_module_xyz:cmk", "cannot import"),
        ("sqlalchemy_cmk:nothing_here", "has no attribute"),
        ("sqlalchemy_cmk:__version__", "not a CMK"),
    ],
)
def test_bad_cmk_specs(spec: str, expected: str) -> None:
    with pytest.raises(ConfigurationError, match=expected):
        migrations_helpers.configure(spec)


def test_one_transaction_for_all_migrations_works_too(tmp_path: Path, db_url: str) -> None:
    """Alembic's default env.py (no transaction_per_migration): the op commits mid-run."""
    provider = FakeKeyProvider()
    cfg = make_config(tmp_path, db_url, {"r1": R1, "r2": R2}, cmk=new_cmk(provider))
    env = tmp_path / "alembic" / "env.py"
    env.write_text(env.read_text().replace("transaction_per_migration=True,", ""))
    engine = create_engine(db_url)
    try:
        command.upgrade(cfg, "head")
        assert current_revision(engine) == "r2"
        assert_encrypted(raw(engine))
        command.downgrade(cfg, "base")
        assert "people" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_env_that_owns_the_transaction_gets_a_clear_error(tmp_path: Path) -> None:
    """env.py's engine.begin() leaves Alembic no transaction to commit before the backfill."""
    url = f"sqlite:///{tmp_path}/app.db"
    cfg = make_config(tmp_path, url, {"r1": R1, "r2": R2}, cmk=new_cmk(FakeKeyProvider()))
    env = tmp_path / "alembic" / "env.py"
    env.write_text(env.read_text().replace("connectable.connect()", "connectable.begin()"))
    with pytest.raises(ConfigurationError, match=r"engine\.connect\(\) \(not engine\.begin\(\)\)"):
        command.upgrade(cfg, "head")


# -- operation objects: validation, reverse, rendering -------------------------------------


def test_operation_arguments_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="tenant or companion"):
        alembic_ops.EncryptColumnOp("people", ["name", "tenant_id"], tenant_column="tenant_id")
    with pytest.raises(ConfigurationError, match="tenant or companion"):
        alembic_ops.EncryptColumnOp("people", "cmk_edek", tenant_column="tenant_id")
    with pytest.raises(ConfigurationError, match="non-empty"):
        alembic_ops.EncryptColumnOp("people", [], tenant_column="tenant_id")
    with pytest.raises(ConfigurationError, match="named twice"):
        alembic_ops.DecryptColumnOp("people", ["a", "a"], tenant_column="tenant_id")
    with pytest.raises(ConfigurationError, match="batch_size"):
        alembic_ops.RewrapKeysOp("people", batch_size=0)


def _autogen_context() -> AutogenContext:
    # The prefixes are what EnvironmentContext.configure sets by default.
    opts = {"sqlalchemy_module_prefix": "sa.", "alembic_module_prefix": "op.", **_hooks()}
    ctx = MigrationContext.configure(dialect_name="postgresql", opts=opts)
    return AutogenContext(ctx)


def test_reverses_render_as_runnable_operations(caplog: pytest.LogCaptureFixture) -> None:
    migrations_helpers.register()
    migrations_helpers.register()  # idempotent
    autogen = _autogen_context()
    enc = alembic_ops.EncryptColumnOp(
        "people", "name", tenant_column="tenant_id", schema="app", cmk="myapp.crypto:cmk"
    )
    dec = enc.reverse()
    assert isinstance(dec, alembic_ops.DecryptColumnOp)
    assert render_op_text(autogen, enc) == (
        "op.encrypt_column('people', 'name', tenant_column='tenant_id', schema='app', "
        "cmk='myapp.crypto:cmk')"
    )
    assert render_op_text(autogen, dec) == (
        "op.decrypt_column('people', 'name', tenant_column='tenant_id', schema='app', "
        "cmk='myapp.crypto:cmk')"
    )
    assert isinstance(dec.reverse(), alembic_ops.EncryptColumnOp)
    rot = alembic_ops.RotateDataKeysOp("people", ["a", "b"], tenant_column="t", tenant="acme")
    assert render_op_text(autogen, rot) == (
        "op.rotate_data_keys('people', ['a', 'b'], tenant='acme', tenant_column='t')"
    )
    assert render_op_text(autogen, alembic_ops.RewrapKeysOp("people", tenant="acme")) == (
        "op.rewrap_keys('people', tenant='acme')"
    )
    for forward in (rot, alembic_ops.RewrapKeysOp("people")):
        undo = forward.reverse()
        assert isinstance(undo, alembic_ops.NothingToUndoOp)
        assert render_op_text(autogen, undo).startswith("pass  # op.")
        # Invoking it runs nothing (no database needed) and says why.
        from alembic.operations import Operations

        with caplog.at_level(logging.INFO, logger=alembic_ops.log.name):
            Operations(MigrationContext.configure(dialect_name="sqlite")).invoke(undo)
        assert "has nothing to undo" in caplog.text


# -- autogenerate --------------------------------------------------------------------------


def _hooks() -> dict[str, Any]:
    return {
        "render_item": migrations_helpers.render_item,
        "compare_type": migrations_helpers.compare_type,
    }


def _accounts(metadata: MetaData, *, ssn_storage: str = "binary") -> Table:
    return Table(
        "accounts",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("tenant_id", String(20), nullable=False),
        Column("ssn", EncryptedType(String(40), storage=ssn_storage)),
        Column("bio", EncryptedType(Text, storage="text", allow_plaintext=True)),
        Column("born", EncryptedType(DateTime(timezone=True))),
        Column("cmk_edek", EDEKType(), nullable=True),
    )


def test_autogenerate_renders_our_types_and_the_migration_runs(tmp_path: Path, db_url: str) -> None:
    metadata = MetaData()
    _accounts(metadata)
    cfg = make_config(
        tmp_path, db_url, {}, cmk=new_cmk(FakeKeyProvider()), target_metadata=metadata
    )
    engine = create_engine(db_url)
    try:
        script = command.revision(cfg, message="accounts", autogenerate=True, rev_id="a1")
        assert script is not None and not isinstance(script, list)
        source = Path(script.path).read_text()
        assert "\nimport sqlalchemy_cmk\n" in source
        assert "sqlalchemy_cmk.EncryptedType(sa.String(length=40))" in source
        assert "sqlalchemy_cmk.EncryptedType(sa.Text(), storage='text')" in source
        assert "sqlalchemy_cmk.EncryptedType(sa.DateTime(timezone=True))" in source
        assert "sa.Column('cmk_edek', sqlalchemy_cmk.EDEKType(), nullable=True)" in source
        assert "allow_plaintext" not in source  # a read mode of the app, not schema
        assert "sqlalchemy_cmk.types" not in source

        command.upgrade(cfg, "head")  # the generated script runs...
        columns = {c["name"]: c["type"] for c in inspect(engine).get_columns("accounts")}
        assert columns["ssn"].python_type is bytes and columns["born"].python_type is bytes
        # Text storage: TEXT (SQLite) or, today, VARCHAR with no length (PostgreSQL; see report).
        assert isinstance(columns["bio"], String) and columns["bio"].length is None
        command.check(cfg)  # ...and leaves nothing to autogenerate (raises on any diff)
        assert model_diff(engine, metadata, **_hooks()) == []

        # The hook still reports real differences: a column stored as text declared binary.
        wrong = MetaData()
        _accounts(wrong, ssn_storage="text")
        bio_binary = MetaData()
        t = _accounts(bio_binary)
        t.c.bio.type = EncryptedType(Text)  # binary storage, but the column is TEXT
        diffs = model_diff(engine, bio_binary, **_hooks())
        assert [(d[0][0], d[0][3]) for d in diffs] == [("modify_type", "bio")]
        diffs = model_diff(engine, wrong, **_hooks())
        assert [(d[0][0], d[0][3]) for d in diffs] == [("modify_type", "ssn")]
    finally:
        engine.dispose()


def test_render_item_leaves_other_items_to_alembic() -> None:
    autogen = _autogen_context()
    assert migrations_helpers.render_item("type", String(10), autogen) is False
    assert migrations_helpers.render_item("column", Column("x", EDEKType()), autogen) is False
    assert autogen.imports == set()
    from sqlalchemy.dialects import postgresql

    rendered = migrations_helpers.render_item("type", EncryptedType(postgresql.JSONB()), autogen)
    assert rendered == "sqlalchemy_cmk.EncryptedType(postgresql.JSONB(astext_type=sa.Text()))"
    assert autogen.imports == {
        "import sqlalchemy_cmk",
        "from sqlalchemy.dialects import postgresql",
    }


@pytest.mark.parametrize(
    ("declared", "reflected", "differs"),
    [
        (EncryptedType(String(40)), "postgresql.BYTEA()", False),
        (EncryptedType(String(40)), "sqlite.BLOB()", False),
        (EncryptedType(String(40)), "mysql.LONGBLOB()", False),
        (EncryptedType(String(40)), "postgresql.TEXT()", True),
        (EncryptedType(Text, storage="text"), "postgresql.TEXT()", False),
        (EncryptedType(Text, storage="text"), "postgresql.VARCHAR()", False),
        (EncryptedType(Text, storage="text"), "sqlite.VARCHAR(255)", True),  # too short
        (EncryptedType(Text, storage="text"), "postgresql.BYTEA()", True),
        (EncryptedType(Text, storage="text"), "postgresql.INTEGER()", True),
        (EncryptedType(Text, storage="text"), "postgresql.ENUM('a', name='e')", True),
        (EDEKType(), "postgresql.BYTEA()", False),
        (EDEKType(), "sqlite.BLOB()", False),
        (EDEKType(), "sqlite.TEXT()", True),
        (Text(), "postgresql.BYTEA()", None),  # not ours: Alembic decides
    ],
)
def test_compare_type_matches_by_storage(
    declared: Any, reflected: str, differs: bool | None
) -> None:
    from sqlalchemy.dialects import mysql, postgresql, sqlite

    inspected = eval(reflected, {"postgresql": postgresql, "sqlite": sqlite, "mysql": mysql})
    ctx = MigrationContext.configure(dialect_name="postgresql")
    got = migrations_helpers.compare_type(
        ctx, Column("c", inspected), Column("c", declared), inspected, declared
    )
    assert got is differs


# -- packaging ---------------------------------------------------------------------------------


def test_backfill_imports_without_alembic_and_ops_name_the_extra() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["alembic"] = None  # as if Alembic were not installed
        import migrations_helpers.backfill  # the CLI's engine needs no Alembic
        import migrations_helpers
        try:
            migrations_helpers.configure(None)
        except ImportError as exc:
            print("ImportError:", exc)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert "pip install 'sqlalchemy-cmk[migrations]'" in out.stdout, out.stderr


def test_importing_the_package_registers_nothing() -> None:
    code = textwrap.dedent(
        """
        import migrations_helpers
        from alembic.operations import Operations
        assert not hasattr(Operations, "encrypt_column")
        migrations_helpers.register()
        assert hasattr(Operations, "encrypt_column") and hasattr(Operations, "rotate_data_keys")
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "ok"
