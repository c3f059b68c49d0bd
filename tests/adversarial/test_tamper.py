"""Tamper fuzzing of every stored byte, across rows, columns, tables and tenants.

``tests/db/test_tamper.py`` pins the expected error for each field of one value and one
companion of a simple model. This suite goes wider and lets Hypothesis compose the damage:

* every byte of every encrypted value and every companion of a plain model (six column types),
  of both tables of a joined-inheritance row (two companions) and of a single-table subclass row
  is flipped (a sample in CI; every byte and more masks with ``SQLALCHEMY_CMK_TAMPER_FULL=1``);
* random compositions of flips, truncations, extensions, copies and swaps of values and
  companions between rows, columns, tables and tenants, and rewrites of the tenant column.

The oracle, for a row loaded through an installed session after the damage: it either raises a
typed error (``DecryptionError``, ``TenantMismatchError``, ``TenantNotConfiguredError``, never
any other exception), or it loads, and then each of its tables holds exactly the bytes (values
and companion) that some row of that table was written with, under the tenant its tenant column
names and the context allows, and the loaded values are that row's. That is the documented limit
(docs/design.md, threat model): values moved together with their companion authenticate in any
row of the same table and tenant. Setting a value to NULL is not tampering the library can see
(NULL is stored unencrypted) and is not generated.
"""

from __future__ import annotations

import datetime
import decimal
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_cmk import (
    CMKError,
    DecryptionError,
    TenantMismatchError,
    TenantNotConfiguredError,
    cross_tenant_context,
    tenant_context,
)

from .models import COMPANIONS, ENCRYPTED, KINDS, Base, Keys, clear_tables, make_keys

FULL = os.environ.get("SQLALCHEMY_CMK_TAMPER_FULL", "") not in ("", "0")
EXAMPLES = int(os.environ.get("SQLALCHEMY_CMK_TAMPER_EXAMPLES", "2000" if FULL else "60"))
TYPED = (DecryptionError, TenantMismatchError, TenantNotConfiguredError)
CROSS = "cross"

UTC = datetime.timezone.utc


def _record(i: int, *, sparse: bool = False) -> dict[str, Any]:
    if sparse:
        return {
            "s": f"rec{i}sZq7x9w2v",
            "n": 700_000_000 + i,
            **dict.fromkeys(("doc", "amount", "at", "blob")),
        }
    return {
        "s": f"rec{i}sZq7x9w2v",
        "doc": {"k": f"rec{i}dZq7x9w2v", "v": [i]},
        "n": 700_000_000 + i,
        "amount": decimal.Decimal(f"{500_000 + i}.25"),
        "at": datetime.datetime(2031, 1, i, 8, 30, 15, 250, tzinfo=UTC),
        "blob": b"\x89B" + f"rec{i}bZq7x9w2v".encode(),
    }


# (kind, id) -> (tenant, values). Distinctive values, all tables of every row sealed.
SEED: dict[tuple[str, int], tuple[str, dict[str, Any]]] = {
    ("record", 1): ("acme", _record(1)),
    ("record", 2): ("acme", _record(2)),
    ("record", 3): ("globex", _record(3)),
    ("record", 4): ("acme", _record(4, sparse=True)),
    ("employee", 11): (
        "acme",
        {"name": "emp11nZq7x9", "salary": 811_000_011, "badge": "emp11bZq7"},
    ),
    ("employee", 12): (
        "acme",
        {"name": "emp12nZq7x9", "salary": 812_000_012, "badge": "emp12bZq7"},
    ),
    ("employee", 13): (
        "globex",
        {"name": "emp13nZq7x9", "salary": 813_000_013, "badge": "emp13bZq7"},
    ),
    ("dog", 21): ("acme", {"name": "dog21nZq7x9", "chip": "dog21cZq7x9"}),
    ("dog", 22): ("acme", {"name": "dog22nZq7x9", "chip": "dog22cZq7x9"}),
    ("dog", 23): ("globex", {"name": "dog23nZq7x9", "chip": "dog23cZq7x9"}),
}
TABLES_OF = {
    "record": ("adv_records",),
    "employee": ("adv_people", "adv_employees"),
    "dog": ("adv_animals",),
}
BASE_TABLE = {"record": "adv_records", "employee": "adv_people", "dog": "adv_animals"}
TABLES = ("adv_records", "adv_people", "adv_employees", "adv_animals")


@dataclass
class Env:
    engine: Engine
    maker: sessionmaker[Session]
    keys: Keys
    # (table, id) -> column -> stored value (encrypted columns, companion, tenant column)
    original: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    touched: set[tuple[str, int]] = field(default_factory=set)
    tried: dict[str, int] = field(default_factory=dict)

    def q(self, column: str) -> str:
        """``column`` quoted for the dialect: ``blob`` is a MySQL keyword."""
        return str(self.engine.dialect.identifier_preparer.quote(column))

    def cells(self, table: str) -> tuple[str, ...]:
        return (*ENCRYPTED[table], COMPANIONS[table])

    def read(self, table: str, row_id: int) -> dict[str, Any]:
        cols = self.cells(table) + (("tenant_id",) if table != "adv_employees" else ())
        with self.engine.connect() as conn:
            row = conn.execute(
                text(f"SELECT {', '.join(map(self.q, cols))} FROM {table} WHERE id = :id"),
                {"id": row_id},
            ).one()
        return {k: bytes(v) if isinstance(v, memoryview) else v for k, v in row._mapping.items()}

    def write(self, table: str, row_id: int, **cells: Any) -> None:
        """UPDATE through a plain connection, as someone with write access to the database."""
        sets = ", ".join(f"{self.q(c)} = :{c}" for c in cells)
        with self.engine.begin() as conn:
            conn.execute(text(f"UPDATE {table} SET {sets} WHERE id = :id"), {**cells, "id": row_id})
        self.touched.add((table, row_id))

    def restore(self) -> None:
        for table, row_id in sorted(self.touched):
            with self.engine.begin() as conn:
                cells = self.original[(table, row_id)]
                sets = ", ".join(f"{self.q(c)} = :{c}" for c in cells)
                conn.execute(
                    text(f"UPDATE {table} SET {sets} WHERE id = :id"), {**cells, "id": row_id}
                )
        self.touched.clear()


@pytest.fixture
def env(engine: Engine) -> Iterator[Env]:
    Base.metadata.create_all(engine)
    clear_tables(engine)
    keys = make_keys()
    maker = sessionmaker(engine)
    keys.cmk.install(maker)
    for (kind, row_id), (tenant, values) in SEED.items():
        with tenant_context(tenant), maker() as s:
            s.add(KINDS[kind].cls(id=row_id, tenant_id=tenant, **values))
            s.commit()
    e = Env(engine, maker, keys)
    for kind, row_id in SEED:
        for table in TABLES_OF[kind]:
            e.original[(table, row_id)] = e.read(table, row_id)
            assert e.original[(table, row_id)][COMPANIONS[table]] is not None
    yield e
    keys.cmk.uninstall(maker)
    clear_tables(engine)


# -- the oracle ----------------------------------------------------------------------------------


def _load(env: Env, kind: str, row_id: int, ctx: str) -> dict[str, Any] | CMKError:
    scope = cross_tenant_context(actor="tamper-fuzz") if ctx == CROSS else tenant_context(ctx)
    with scope, env.maker() as s:
        try:
            obj = s.get(KINDS[kind].cls, row_id)
            assert obj is not None
            return {c: getattr(obj, c) for c in KINDS[kind].columns}
        except CMKError as exc:
            return exc


def _secrets() -> list[str]:
    out = []
    for _, values in SEED.values():
        for v in values.values():
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, dict):
                out.append(v["k"])
    return out


def judge(env: Env, kind: str, row_id: int, ctx: str, what: str) -> None:
    """Load the row; assert the outcome is a typed error or an allowed replay (module doc)."""
    env.tried[kind] = env.tried.get(kind, 0) + 1
    tenant_col = env.read(BASE_TABLE[kind], row_id)["tenant_id"]
    replay: dict[str, list[int]] = {}  # table -> rows whose stored cells these are
    untouched = tenant_col == SEED[(kind, row_id)][0]
    for table in TABLES_OF[kind]:
        cur = env.read(table, row_id)
        cells = env.cells(table)
        matches = [
            other
            for (t, other), orig in env.original.items()
            if t == table
            and all(orig[c] == cur[c] for c in cells)
            and SEED[(kind, other)][0] == tenant_col
        ]
        replay[table] = matches
        untouched = untouched and all(cur[c] == env.original[(table, row_id)][c] for c in cells)
    allowed = all(replay.values()) and ctx in (CROSS, tenant_col)
    result = _load(env, kind, row_id, ctx)
    if isinstance(result, CMKError):
        assert isinstance(result, TYPED), f"{what}: {type(result).__name__}: {result}"
        shown = f"{result}\n{result!r}\n{result.args!r}"
        for secret in _secrets():
            assert secret not in shown, f"{what}: the error shows a plaintext"
        assert not (untouched and ctx in (CROSS, tenant_col)), (
            f"{what}: an untouched row of {tenant_col} failed under {ctx}: {result!r}"
        )
        return
    assert allowed, f"{what}: {kind} {row_id} loaded under {ctx} after tampering: {result!r}"
    for table, rows in replay.items():
        cols = [c for c in KINDS[kind].columns if c in ENCRYPTED[table]]
        got = {c: result[c] for c in cols}
        options = [{c: SEED[(kind, r)][1][c] for c in cols} for r in rows]
        assert got in options, f"{what}: {table} of {row_id} loaded {got!r}, not one of {options!r}"


def judge_all(env: Env, rows: set[tuple[str, int]], what: str) -> None:
    for kind, row_id in sorted(rows):
        tenant = SEED[(kind, row_id)][0]
        for ctx in (tenant, CROSS):
            judge(env, kind, row_id, ctx, what)


# -- every byte ----------------------------------------------------------------------------------


def _positions(length: int) -> list[int]:
    if FULL:
        return list(range(length))
    # CI: the first and last bytes of every field boundary region, and every 7th in between.
    return sorted(
        {*range(min(length, 4)), *range(max(0, length - 4), length), *range(0, length, 7)}
    )


CELLS = [
    (kind, row_id, table, column)
    for kind, row_id in (("record", 1), ("employee", 11), ("dog", 21))
    for table in TABLES_OF[kind]
    for column in (*ENCRYPTED[table], COMPANIONS[table])
    if not (table == "adv_animals" and column not in ("name", "chip", "cmk_edek"))
]


@pytest.mark.parametrize(
    ("kind", "row_id", "table", "column"), CELLS, ids=[f"{c[2]}.{c[3]}" for c in CELLS]
)
def test_every_byte_flipped(env: Env, kind: str, row_id: int, table: str, column: str) -> None:
    stored = env.original[(table, row_id)][column]
    masks = (0x01, 0x80, 0xFF, 0x10) if FULL else (0x01, 0x80)
    for pos in _positions(len(stored)):
        for mask in masks:
            tampered = stored[:pos] + bytes([stored[pos] ^ mask]) + stored[pos + 1 :]
            env.write(table, row_id, **{column: tampered})
            judge(env, kind, row_id, SEED[(kind, row_id)][0], f"{table}.{column}[{pos}]^{mask:#x}")
            env.restore()
    judge(env, kind, row_id, SEED[(kind, row_id)][0], "restored")


# -- composed damage -----------------------------------------------------------------------------

ROWS = sorted(SEED)
CELL_ADDRESSES = [
    (table, row_id, column)
    for kind, row_id in ROWS
    for table in TABLES_OF[kind]
    for column in (*ENCRYPTED[table], COMPANIONS[table])
]


@st.composite
def mutation(draw: st.DrawFn, env: Env) -> tuple[str, set[tuple[str, int]]]:
    """Apply one random change to the raw database; return what it did and the rows touched."""
    table, row_id, column = draw(st.sampled_from(CELL_ADDRESSES))
    kind = next(k for k, r in ROWS if r == row_id)
    current = env.read(table, row_id)[column]
    op = draw(st.sampled_from(["flip", "truncate", "extend", "copy", "swap", "tenant", "splice"]))
    if op == "tenant":
        base = BASE_TABLE[kind]
        new = draw(st.sampled_from(["acme", "globex", "initech"]))
        env.write(base, row_id, tenant_id=new)
        return f"{base}.tenant_id of {row_id} := {new}", {(kind, row_id)}
    if current is None:
        op = "copy"  # a NULL cell can only be given bytes from elsewhere
    elif not current and op in ("flip", "truncate"):
        op = "extend"
    if op == "flip":
        pos = draw(st.integers(0, len(current) - 1))
        mask = draw(st.integers(1, 255))
        new = current[:pos] + bytes([current[pos] ^ mask]) + current[pos + 1 :]
        env.write(table, row_id, **{column: new})
        return f"{table}.{column} of {row_id}: byte {pos} ^= {mask:#x}", {(kind, row_id)}
    if op == "truncate":
        keep = draw(st.integers(0, len(current) - 1))
        env.write(table, row_id, **{column: current[:keep]})
        return f"{table}.{column} of {row_id}: truncated to {keep}", {(kind, row_id)}
    if op == "extend":
        tail = draw(st.binary(min_size=1, max_size=8))
        env.write(table, row_id, **{column: current + tail})
        return f"{table}.{column} of {row_id}: {len(tail)} bytes appended", {(kind, row_id)}
    src_table, src_id, src_col = draw(st.sampled_from(CELL_ADDRESSES))
    src_kind = next(k for k, r in ROWS if r == src_id)
    source = env.read(src_table, src_id)[src_col]
    if op == "splice" and current is not None and source is not None:
        # The head of one stored value with the tail of another (e.g. envelope kept, row id
        # taken from another row; nonce of one value with the ciphertext of another).
        cut = draw(st.integers(1, max(1, min(len(current), len(source)) - 1)))
        env.write(table, row_id, **{column: current[:cut] + source[cut:]})
        return (
            f"{table}.{column} of {row_id}: first {cut} bytes kept, rest from "
            f"{src_table}.{src_col} of {src_id}",
            {(kind, row_id)},
        )
    if source is None:
        return "nothing (copy of a NULL)", set()
    env.write(table, row_id, **{column: source})
    touched = {(kind, row_id)}
    what = f"{table}.{column} of {row_id} := {src_table}.{src_col} of {src_id}"
    if op == "swap" and current is not None:
        env.write(src_table, src_id, **{src_col: current})
        touched.add((src_kind, src_id))
        what = f"{table}.{column} of {row_id} <-> {src_table}.{src_col} of {src_id}"
    return what, touched


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_composed_damage_is_refused_or_an_allowed_replay(env: Env, data: st.DataObject) -> None:
    env.keys.cmk.forget_tenant()  # a tampered envelope must not hit a key cached by the last one
    steps: list[str] = []
    touched: set[tuple[str, int]] = set()
    try:
        for _ in range(data.draw(st.integers(1, 3), label="changes")):
            what, rows = data.draw(mutation(env), label="change")
            steps.append(what)
            touched |= rows
        judge_all(env, touched, "; ".join(steps))
    finally:
        env.restore()


def test_whole_row_copied_to_another_tenant_with_its_tenant_column_is_refused_there(
    env: Env,
) -> None:
    """A row of acme made to look like globex's in every column but its envelope."""
    for table in TABLES_OF["record"]:
        env.write(table, 3, **{c: env.original[(table, 1)][c] for c in env.cells(table)})
    for ctx in ("globex", "acme"):
        result = _load(env, "record", 3, ctx)
        assert isinstance(result, TenantMismatchError), f"under {ctx}: {result!r}"
    result = _load(env, "record", 3, CROSS)
    assert isinstance(result, TenantMismatchError), f"cross-tenant: {result!r}"
