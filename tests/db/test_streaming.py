"""Streamed results (``yield_per``, ``stream_results``) are decrypted one partition at a time:
one batch, one audit event per partition, and nothing of a partition handed out before all of it
is decrypted and authenticated."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, event, inspect, select, text
from sqlalchemy.orm import selectinload, sessionmaker

from sqlalchemy_cmk import CMK, DecryptionError, tenant_context
from sqlalchemy_cmk.testing import MemoryAuditSink
from sqlalchemy_cmk.types import EncryptedValue

from .models import TENANT_KEYS, Env, Owner, Patient, Pet, assert_absent, make_env

ROWS = 10
PER = 3  # partitions of 3, 3, 3 and 1 rows


@pytest.fixture
def env(engine: Engine) -> Env:
    env = make_env(engine)
    with tenant_context("acme"), env.Session() as s:
        s.add_all(
            Patient(id=i, tenant_id="acme", ssn=f"ssn-{i:03d}", notes={"n": i}, age=20 + i)
            for i in range(1, 11)
        )
        s.commit()
    env.audit.events.clear()
    return env


def expected(ids: range | list[int]) -> list[tuple[int, str, dict[str, int], int]]:
    return [(i, f"ssn-{i:03d}", {"n": i}, 20 + i) for i in ids]


def values(objs: Any) -> list[tuple[int, str, dict[str, int], int]]:
    return [(p.id, p.ssn, p.notes, p.age) for p in objs]


STMT = select(Patient).order_by(Patient.id)

# Every way of consuming a streamed ORM result, each returning the partitions it saw.
WAYS = {
    "scalars-partitions": lambda s: [
        list(p) for p in s.scalars(STMT.execution_options(yield_per=PER)).partitions()
    ],
    "execute-iterate": lambda s: [
        [row[0] for row in s.execute(STMT.execution_options(yield_per=PER))]
    ],
    "scalars-fetchmany": lambda s: _fetchmany(s.scalars(STMT.execution_options(yield_per=PER))),
    "stream_results-partitions": lambda s: [
        list(p) for p in s.scalars(STMT.execution_options(stream_results=True)).partitions(PER)
    ],
    "stream_results-all": lambda s: [s.scalars(STMT.execution_options(stream_results=True)).all()],
    "query-yield_per": lambda s: [list(s.query(Patient).order_by(Patient.id).yield_per(PER))],
}


def _fetchmany(result: Any) -> list[list[Any]]:
    parts = []
    while part := result.fetchmany(PER):
        parts.append(part)
    return parts


@pytest.mark.parametrize("way", list(WAYS))
def test_every_way_of_streaming_returns_decrypted_rows(env: Env, way: str) -> None:
    with tenant_context("acme"), env.Session() as s:
        parts = WAYS[way](s)
        assert values(x for part in parts for x in part) == expected(range(1, ROWS + 1))
        for obj in s.identity_map.values():
            assert not any(type(v) is EncryptedValue for v in inspect(obj).dict.values())


def test_one_audit_event_and_one_batch_per_partition(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        result = s.scalars(STMT.execution_options(yield_per=PER))
        seen = []
        for part in result.partitions():
            # The partition arrived whole: its decrypt event is already recorded, and the
            # next partition's is not.
            seen.append((len(part), len(env.audit.of("decrypt"))))
    assert seen == [(3, 1), (3, 2), (3, 3), (1, 4)]
    assert [e.rows for e in env.audit.of("decrypt")] == [3, 3, 3, 1]
    assert all(e.outcome == "ok" for e in env.audit.of("decrypt"))


def test_tampered_row_in_partition_three_raises_when_it_is_fetched(env: Env) -> None:
    # Row 8 gets row 2's ciphertext: valid bytes under the same key, bound to another row.
    moved = env.raw_bytes("patients", "ssn", 2)
    with env.engine.begin() as conn:
        conn.execute(text("update patients set ssn = :v where id = 8"), {"v": moved})

    with tenant_context("acme"), env.Session() as s:
        parts = s.scalars(STMT.execution_options(yield_per=PER)).partitions()
        first, second = next(parts), next(parts)
        assert values(first) == expected([1, 2, 3])
        assert values(second) == expected([4, 5, 6])
        with pytest.raises(DecryptionError) as caught:
            next(parts)
        assert_absent(str(caught.value), ["ssn-002", "ssn-008", "ssn-007", "ssn-009"])
        # Nothing of partition 3 is exposed: its objects hold no value and no ciphertext, and
        # touching one raises again.
        third = [o for o in s.identity_map.values() if o.id in (7, 8, 9)]
        for obj in third:
            d = inspect(obj).dict
            assert not any(k in d for k in ("ssn", "notes", "age"))
        with pytest.raises(DecryptionError):
            s.get(Patient, 8).ssn  # type: ignore[union-attr]  # noqa: B018
        # The earlier partitions stay as they were.
        assert values([*first, *second]) == expected(range(1, 7))


def test_a_cold_stream_unwraps_its_data_key_once(env: Env) -> None:
    audit = MemoryAuditSink()
    cold = CMK(env.kms, tenant_keys=TENANT_KEYS, audit_sinks=[audit])  # same KMS, empty cache
    maker = sessionmaker(env.engine)
    cold.install(maker)
    env.kms.reset_counts()
    with tenant_context("acme"), maker() as s:
        got = [list(p) for p in s.scalars(STMT.execution_options(yield_per=PER)).partitions()]
    assert values(x for part in got for x in part) == expected(range(1, ROWS + 1))
    assert env.kms.unwrap_count == 1
    assert len(audit.of("decrypt")) == 4


def test_a_streamed_result_left_half_read_leaves_no_ciphertext(env: Env) -> None:
    with tenant_context("acme"), env.Session() as s:
        result = s.scalars(STMT.execution_options(yield_per=PER))
        first = result.fetchmany(2)
        assert values(first) == expected([1, 2])
        result.close()
        for obj in s.identity_map.values():
            assert not any(type(v) is EncryptedValue for v in inspect(obj).dict.values())


def test_relationships_loaded_with_a_partition_are_decrypted_with_it(env: Env) -> None:
    if env.engine.dialect.name in ("mysql", "mariadb"):
        # pymysql streams on an unbuffered cursor: selectinload's query, on the same
        # connection while it is open, fails with or without CMK.
        pytest.skip("yield_per with selectinload needs a second cursor pymysql cannot open")
    with tenant_context("acme"), env.Session() as s:
        for i in range(1, 5):
            s.add(Owner(id=i, name=f"owner-{i}", pets=[Pet(species="cat", chip=f"chip-{i}")]))
        s.commit()
    env.audit.events.clear()
    with tenant_context("acme"), env.Session() as s:
        stmt = (
            select(Owner)
            .options(selectinload(Owner.pets))
            .order_by(Owner.id)
            .execution_options(yield_per=2)
        )
        got = []
        for part in s.scalars(stmt).partitions():
            for owner in part:
                # The pets came in with the partition, by selectin: decrypted with it, before
                # the partition was handed out.
                (pet,) = inspect(owner).dict["pets"]
                assert inspect(pet).dict["chip"] == f"chip-{owner.id}"
                got.append((owner.name, pet.chip))
    assert got == [(f"owner-{i}", f"chip-{i}") for i in range(1, 5)]


def test_a_stream_answered_by_another_listener_is_still_decrypted(env: Env) -> None:
    # A result cache's listener (installed after CMK) answers with frozen rows, as in
    # SQLAlchemy's dogpile caching example: its instances are decrypted as they are built.
    def cache(orm_state: Any) -> Any:
        if orm_state.is_select:
            return orm_state.invoke_statement().freeze()()
        return None

    event.listen(env.Session, "do_orm_execute", cache)
    try:
        with tenant_context("acme"), env.Session() as s:
            got = list(s.scalars(STMT.execution_options(yield_per=PER)))
            assert values(got) == expected(range(1, ROWS + 1))
    finally:
        event.remove(env.Session, "do_orm_execute", cache)
