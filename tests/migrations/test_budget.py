"""The KMS request budget of the migration operations (``max_kms_rps``, issue 8).

What an operator relies on: a run given a budget of R requests per second never sends the
tenants' KMS more than ``R x elapsed + burst`` requests, counting every wrap, unwrap, proof
unwrap and retry, from every thread of the run; and the run still finishes its work.
The requests are timed where they arrive, at the (fake) KMS.
"""

from __future__ import annotations

import threading
import time
import uuid as uuid_mod
from collections.abc import Mapping
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    Uuid,
    create_engine,
    insert,
    select,
    text,
)

from migrations_helpers import backfill
from sqlalchemy_cmk import CMK, ConfigurationError, KMSUnavailableError
from sqlalchemy_cmk._keys import kms_call_gate
from sqlalchemy_cmk.testing import FakeKeyProvider

TENANTS = tuple(f"t{i}" for i in range(6))


class TimedKMS(FakeKeyProvider):
    """The fake KMS, noting when each request arrives (monotonic seconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[float] = []
        self._times = threading.Lock()

    def _note(self) -> None:
        with self._times:
            self.arrivals.append(time.monotonic())

    def wrap_key(self, key_ref: str, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        self._note()
        return super().wrap_key(key_ref, plaintext, context)

    def unwrap_key(self, key_ref: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        self._note()
        return super().unwrap_key(key_ref, wrapped, context)


def assert_within(arrivals: list[float], started: float, rate: float, burst: float) -> None:
    """Every prefix of the requests fits the bucket: the k-th (from 1) arrives no earlier than
    ``(k - burst) / rate`` seconds after the start (a small allowance for clock reads)."""
    for k, at in enumerate(sorted(arrivals), start=1):
        earliest = (k - burst) / rate
        assert at - started >= earliest - 0.02, (k, at - started, earliest)


def make_table(engine: Engine, n: int) -> Table:
    table = Table(
        "budget_notes",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("tenant_id", String(20), nullable=False),
        Column("body", Text),
        Column("cmk_edek", LargeBinary),
    )
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(table),
            [
                {"id": i, "tenant_id": TENANTS[i % len(TENANTS)], "body": f"note {i}"}
                for i in range(n)
            ],
        )
    return table


def make_cmk(kms: FakeKeyProvider, **kw: Any) -> CMK:
    kw.setdefault("tenant_keys", {t: f"fake://{t}" for t in TENANTS})
    return CMK(kms, audit_sinks=[], **kw)


def test_encrypt_stays_within_the_budget_and_finishes(engine: Engine) -> None:
    # A write key per 4 values: each costs a wrap, the write check's unwrap and the proof
    # unwrap, so 120 rows make about 90 requests, far more than one second's burst.
    kms = TimedKMS()
    cmk = make_cmk(kms, write_key_max_uses=4)
    make_table(engine, 120)
    rate = 30.0
    started = time.monotonic()
    report = backfill.encrypt_columns(
        engine,
        cmk,
        "budget_notes",
        ["body"],
        tenant_column="tenant_id",
        batch_size=24,
        max_kms_rps=rate,
    )
    elapsed = time.monotonic() - started
    assert report.rows == 120
    n = len(kms.calls)
    assert n >= 2 * rate  # the budget was what limited the run
    assert n <= rate * elapsed + rate
    assert elapsed >= (n - rate) / rate
    assert_within(kms.arrivals, started, rate, burst=rate)
    # Everything written reads back.
    assert backfill.verify(engine, cmk, "budget_notes", ["body"], tenant_column="tenant_id").ok
    assert kms_call_gate.get() is None  # the budget ends with the call


def test_concurrent_unwraps_and_retries_count(engine: Engine) -> None:
    # Decrypting with a cold cache unwraps many envelopes at once (read_keys' thread pool);
    # failed attempts that the key manager retries are requests too.
    kms = TimedKMS()
    writer = make_cmk(kms, write_key_max_uses=2)
    make_table(engine, 80)
    backfill.encrypt_columns(engine, writer, "budget_notes", ["body"], tenant_column="tenant_id")
    reader = make_cmk(kms)  # its own, empty cache: one unwrap per envelope (about 40)
    kms.reset_counts()
    kms.arrivals.clear()
    kms.fail_next(6, KMSUnavailableError("throttled", provider="fake"))
    rate = 15.0
    started = time.monotonic()
    report = backfill.decrypt_columns(
        engine,
        reader,
        "budget_notes",
        ["body"],
        tenant_column="tenant_id",
        batch_size=40,
        max_kms_rps=rate,
    )
    elapsed = time.monotonic() - started
    assert report.rows == 80
    n = len(kms.calls)
    assert n >= 40 + 6  # every envelope, and the six failed attempts
    assert n <= rate * elapsed + rate
    assert_within(kms.arrivals, started, rate, burst=rate)


def test_verify_stays_within_the_budget(engine: Engine) -> None:
    kms = TimedKMS()
    make_table(engine, 60)
    writer = make_cmk(kms, write_key_max_uses=2)
    backfill.encrypt_columns(engine, writer, "budget_notes", ["body"], tenant_column="tenant_id")
    kms.reset_counts()
    kms.arrivals.clear()
    rate = 10.0
    started = time.monotonic()
    report = backfill.verify(
        engine,
        make_cmk(kms),
        "budget_notes",
        ["body"],
        tenant_column="tenant_id",
        max_kms_rps=rate,
    )
    elapsed = time.monotonic() - started
    assert report.ok and sum(report.encrypted_ok.values()) == 60
    n = len(kms.calls)
    assert n >= 30  # one unwrap per data key
    assert n <= rate * elapsed + rate
    assert_within(kms.arrivals, started, rate, burst=rate)


def test_rewrap_and_rotate_stay_within_the_budget(engine: Engine) -> None:
    kms = TimedKMS()
    cmk = make_cmk(kms, write_key_max_uses=5)
    make_table(engine, 60)
    backfill.encrypt_columns(engine, cmk, "budget_notes", ["body"], tenant_column="tenant_id")
    moved = make_cmk(kms, tenant_keys={t: [f"fake://{t}-new", f"fake://{t}"] for t in TENANTS})
    rate = 20.0
    for run in (
        lambda: backfill.rewrap_keys(engine, moved, "budget_notes", max_kms_rps=rate),
        lambda: backfill.rotate_data_keys(
            engine,
            moved,
            "budget_notes",
            ["body"],
            tenant_column="tenant_id",
            batch_size=15,
            max_kms_rps=rate,
        ),
    ):
        kms.reset_counts()
        kms.arrivals.clear()
        moved.forget_tenant(None)
        started = time.monotonic()
        report = run()
        elapsed = time.monotonic() - started
        assert report.rows == 60
        n = len(kms.calls)
        assert n > rate  # more than one burst: the bucket had to pace the run
        assert n <= rate * elapsed + rate
        assert_within(kms.arrivals, started, rate, burst=rate)
    assert backfill.verify(engine, moved, "budget_notes", ["body"], tenant_column="tenant_id").ok


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "10", True])
def test_a_budget_that_is_not_a_positive_number_is_refused(engine: Engine, bad: Any) -> None:
    kms = FakeKeyProvider()
    make_table(engine, 3)
    with pytest.raises(ConfigurationError, match="max_kms_rps"):
        backfill.encrypt_columns(
            engine,
            make_cmk(kms),
            "budget_notes",
            ["body"],
            tenant_column="tenant_id",
            max_kms_rps=bad,
        )
    assert kms.calls == []  # refused before anything was asked of the KMS


def test_token_bucket_with_a_clock() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    bucket = backfill._TokenBucket(2.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(2):  # the burst: one second's worth
        bucket()
    assert slept == []
    bucket()
    bucket()
    assert slept == [pytest.approx(0.5), pytest.approx(0.5)]
    now[0] += 10.0  # idle time refills up to the burst, not beyond
    for _ in range(2):
        bucket()
    assert len(slept) == 2
    bucket()
    assert slept[-1] == pytest.approx(0.5)
    assert backfill._TokenBucket(0.2).burst == 1.0  # a slow budget still lets one call through


# -- the batch update the speed-up rests on (PostgreSQL: one UPDATE ... FROM json_to_recordset)


def test_every_value_and_key_type_survives_the_batch_update(engine: Engine) -> None:
    """Values JSON or bytea hex could mangle, a UUID primary key and an integer tenant column
    go through encrypt and decrypt exactly (compare-and-swap under concurrent writes:
    test_backfill.py)."""
    table = Table(
        "odd_notes",
        MetaData(),
        Column("id", Uuid, primary_key=True),
        Column("tenant_id", Integer, nullable=False),
        Column("body", Text),
        Column("cmk_edek", LargeBinary),
    )
    table.metadata.create_all(engine)
    odd = [
        'quote " and \\ backslash',
        "\\x41 looks like bytea hex",
        "comma, {brace}, [bracket], null",
        "ünïcødé ✓ \u2028 line separator",
        "",
        "tab\tnewline\nend",
        "x" * 5000,
    ]
    rows = {uuid_mod.UUID(int=i + 1): (i % 2, v) for i, v in enumerate(odd * 3)}
    with engine.begin() as conn:
        conn.execute(
            insert(table), [{"id": k, "tenant_id": t, "body": v} for k, (t, v) in rows.items()]
        )
    cmk = make_cmk(FakeKeyProvider(), tenant_keys={"0": "fake://zero", "1": "fake://one"})
    report = backfill.encrypt_columns(
        engine, cmk, "odd_notes", ["body"], tenant_column="tenant_id", batch_size=8
    )
    assert report.rows == len(rows) and report.conflicts == 0
    with engine.connect() as conn:
        stored = dict(conn.execute(select(table.c.id, table.c.body)).all())
    assert all(v.startswith("cmk:") for v in stored.values())
    assert backfill.verify(engine, cmk, "odd_notes", ["body"], tenant_column="tenant_id").ok
    back = backfill.decrypt_columns(
        engine, cmk, "odd_notes", ["body"], tenant_column="tenant_id", batch_size=8
    )
    assert back.rows == len(rows)
    with engine.connect() as conn:
        restored = dict(conn.execute(select(table.c.id, table.c.body)).all())
    assert restored == {k: v for k, (_, v) in rows.items()}


def test_the_walk_gives_its_connection_back_as_it_found_it(engine: Engine) -> None:
    """PostgreSQL batches commit without waiting for the WAL flush; the application must never
    get a pooled connection left that way (with one pooled connection, it is the walk's)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("synchronous_commit is PostgreSQL's")
    with engine.connect() as conn:
        schema = conn.execute(text("SELECT current_schema()")).scalar_one()
    one = create_engine(
        engine.url, pool_size=1, max_overflow=0, connect_args={"options": f"-csearch_path={schema}"}
    )
    table = make_table(one, 30)
    backfill.encrypt_columns(
        one, make_cmk(FakeKeyProvider()), "budget_notes", ["body"], tenant_column="tenant_id"
    )
    with one.connect() as conn:
        assert conn.execute(text("SHOW synchronous_commit")).scalar() == "on"
    # Also after a run that fails half-way.
    kms = FakeKeyProvider()
    cmk = make_cmk(kms)
    with one.begin() as conn:
        conn.execute(
            insert(table), [{"id": 100 + i, "tenant_id": "t1", "body": "more"} for i in range(5)]
        )
    kms.inject("denied", operation="wrap", count=None)
    with pytest.raises(Exception, match="revoked"):
        backfill.encrypt_columns(one, cmk, "budget_notes", ["body"], tenant_column="tenant_id")
    with one.connect() as conn:
        assert conn.execute(text("SHOW synchronous_commit")).scalar() == "on"
    one.dispose()
