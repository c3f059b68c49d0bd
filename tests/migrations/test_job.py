"""One value for a migration run: ``migrations_helpers.Job``, run by ``run_job``.

Every operation runs from a Job on every dialect; a Job checks what it can without a database;
each operation refuses, by name, a field it does not take; and an Alembic operation and the CLI
command of the same options hold equal Jobs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from sqlalchemy import Column, Engine, Integer, LargeBinary, MetaData, String, Table, Text, select

from migrations_helpers import Job, Progress, alembic_ops, run_job
from sqlalchemy_cmk import CMK, ConfigurationError
from sqlalchemy_cmk.cli import _parser
from sqlalchemy_cmk.cli.migrate import _job
from sqlalchemy_cmk.testing import FakeKeyProvider

TABLE = "job_people"
TENANTS = ("acme", "globex")
ROWS = 10

metadata = MetaData()
people = Table(
    TABLE,
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("tenant_id", String(20)),
    Column("name", Text),
    Column("cmk_edek", LargeBinary),
)


def names(i: int) -> str:
    return f"person {i} ✓"


def seed(engine: Engine) -> None:
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            people.insert(),
            [{"id": i, "tenant_id": TENANTS[i % 2], "name": names(i)} for i in range(1, ROWS + 1)],
        )


def stored(engine: Engine) -> dict[int, tuple[str, bytes | None]]:
    with engine.connect() as conn:
        return {
            r.id: (r.name, None if r.cmk_edek is None else bytes(r.cmk_edek))
            for r in conn.execute(select(people))
        }


def make_cmk(provider: FakeKeyProvider) -> CMK:
    return CMK(provider, tenant_keys={t: f"fake://{t}-v1" for t in TENANTS}, audit_sinks=[])


def test_every_operation_runs_from_a_job(engine: Engine) -> None:
    seed(engine)
    provider = FakeKeyProvider()
    cmk = make_cmk(provider)
    seen: list[Progress] = []
    job = Job(table=TABLE, columns=["name"], tenant_column="tenant_id", batch_size=3)

    report = run_job(engine, cmk, "encrypt", dataclasses.replace(job, progress=seen.append))
    assert (report.operation, report.rows, report.batches) == ("encrypt", ROWS, 4)
    assert {p.operation for p in seen} == {"encrypt"}
    encrypted = stored(engine)
    assert all(v.startswith("cmk:") and edek for v, edek in encrypted.values())

    checked = run_job(engine, cmk, "verify", Job(table=TABLE, tenant_column="tenant_id"))
    assert checked.ok and checked.columns == ("name",)  # found by itself: no columns given
    assert sum(checked.encrypted_ok.values()) == ROWS

    moved = CMK(  # the tenants' new primary keys, the old ones still read
        provider,
        tenant_keys={t: [f"fake://{t}-v2", f"fake://{t}-v1"] for t in TENANTS},
        audit_sinks=[],
    )
    rewrapped = run_job(engine, moved, "rewrap", Job(table=TABLE, tenant="acme"))
    assert set(rewrapped.by_tenant) == {"acme"} and rewrapped.rows == ROWS // 2
    assert {i: v for i, (v, _) in stored(engine).items()} == {
        i: v for i, (v, _) in encrypted.items()
    }  # values untouched: only the data keys' wrapping changed

    rotated = run_job(
        engine, moved, "rotate", Job(table=TABLE, columns=("name",), tenant_column="tenant_id")
    )
    assert rotated.rows == ROWS
    after = stored(engine)
    assert all(after[i][1] != encrypted[i][1] for i in after)  # fresh row ids and data keys

    sampled = run_job(
        engine, moved, "verify", Job(table=TABLE, tenant_column="tenant_id", sample=1.0)
    )
    assert sampled.ok and sampled.checked == ROWS

    restored = run_job(engine, moved, "decrypt", job)
    assert restored.rows == ROWS
    assert {i: v for i, (v, _) in stored(engine).items()} == {
        i: names(i) for i in range(1, ROWS + 1)
    }


@pytest.mark.parametrize(
    ("changes", "option"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"max_batches": -1}, "max_batches"),
        ({"max_kms_rps": 0}, "max_kms_rps"),
        ({"max_kms_rps": float("nan")}, "max_kms_rps"),
        ({"max_kms_rps": True}, "max_kms_rps"),
        ({"sample": 0}, "sample"),
        ({"sample": 1.5}, "sample"),
        ({"columns": "name"}, "columns"),
    ],
)
def test_a_job_checks_its_values(changes: dict[str, Any], option: str) -> None:
    with pytest.raises(ConfigurationError, match=option):
        Job(table=TABLE, **changes)
    with pytest.raises(ConfigurationError, match=option):  # replace() checks again
        dataclasses.replace(Job(table=TABLE), **changes)


def test_a_job_is_normalised_and_keyword_only() -> None:
    assert Job(table=TABLE, columns=["a"], into={"a": "b"}) == Job(
        table=TABLE, columns=("a",), into={"a": "b"}
    )
    assert Job(table=TABLE, into={}).into is None
    with pytest.raises(TypeError):
        Job(TABLE)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Job(table=TABLE).batch_size = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("operation", "changes", "refused"),
    [
        ("encrypt", {"sample": 0.5}, "sample"),
        ("encrypt", {"tenant": "acme"}, "tenant"),
        ("decrypt", {"sample": 0.5, "tenant": "acme"}, "tenant, sample"),
        ("rotate", {"into": {"name": "x"}, "max_batches": 1}, "max_batches, into"),
        ("rewrap", {"columns": ("name",)}, "columns"),
        ("rewrap", {"tenant_column": "tenant_id", "metadata": metadata}, "tenant_column, metadata"),
        ("verify", {"tenant": "acme"}, "tenant"),
        ("verify", {"max_batches": 2}, "max_batches"),
    ],
)
def test_each_operation_refuses_fields_it_does_not_take(
    operation: Any, changes: dict[str, Any], refused: str
) -> None:
    job = Job(table=TABLE, **changes)
    # Refused before the database or the CMK is touched (neither is given here).
    with pytest.raises(ConfigurationError, match=f"{operation} does not take {refused}: leave"):
        run_job(None, None, operation, job)  # type: ignore[arg-type]


def test_unknown_operations_and_missing_columns(engine: Engine) -> None:
    seed(engine)
    cmk = make_cmk(FakeKeyProvider())
    with pytest.raises(ConfigurationError, match="unknown operation 'shred'"):
        run_job(engine, cmk, "shred", Job(table=TABLE))  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="at least one column"):
        run_job(engine, cmk, "encrypt", Job(table=TABLE, tenant_column="tenant_id"))


# -- one Job for the Alembic operation and the CLI command of the same options ---------------


def cli_job(*argv: str) -> Job:
    args = _parser().parse_args([*argv, "--table", TABLE, "--cmk", "app:cmk"])
    return _job(args)


def test_an_alembic_operation_and_the_cli_hold_the_same_job() -> None:
    pairs = [
        (
            alembic_ops.EncryptColumnOp(
                TABLE, "name", tenant_column="tenant_id", schema="app", batch_size=50
            ),
            cli_job(
                "encrypt-column",
                "--column=name",
                "--tenant-column=tenant_id",
                "--schema=app",
                "--batch-size=50",
            ),
        ),
        (
            alembic_ops.DecryptColumnOp(
                TABLE,
                "ssn_enc",
                tenant_column="t",
                companion_column="edek",
                into={"ssn_enc": "ssn"},
            ),
            cli_job(
                "decrypt-column",
                "--column=ssn_enc",
                "--tenant-column=t",
                "--companion-column=edek",
                "--into=ssn",
            ),
        ),
        (
            alembic_ops.RotateDataKeysOp(TABLE, ["a", "b"], tenant_column="t", tenant="acme"),
            cli_job("rotate", "--column=a", "--column=b", "--tenant-column=t", "--tenant=acme"),
        ),
        (
            alembic_ops.RewrapKeysOp(TABLE, tenant="acme", batch_size=7),
            cli_job("rewrap", "--tenant=acme", "--batch-size=7"),
        ),
    ]
    for op, job in pairs:
        assert op.job == job, type(op).__name__
    assert pairs[1][1].into == {"ssn_enc": "ssn"}


def test_an_operations_arguments_live_in_its_job() -> None:
    op = alembic_ops.EncryptColumnOp(TABLE, ["name"], tenant_column="tenant_id")
    assert (op.table_name, op.columns, op.tenant_column) == (TABLE, ("name",), "tenant_id")
    op.schema = "app"  # as a process_revision_directives hook may
    assert op.job == Job(table=TABLE, columns=("name",), tenant_column="tenant_id", schema="app")
    assert op.reverse().job == dataclasses.replace(op.job)  # same options, the other way
