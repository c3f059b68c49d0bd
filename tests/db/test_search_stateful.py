"""Random sequences of writes and searches over a 2-bit blind index (issue 10), on SQLite.

Two tenants, a normalizer (trim, lower) and an index so narrow that a quarter of all values
collide with any term: every search's result must be exactly what a Python model of the rows
says, never a colliding row, never another tenant's. Writes go through the unit of work (add,
change, set to None, delete) and, in the second machine, through ORM bulk INSERT as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import create_engine, delete, insert, select

from sqlalchemy_cmk import tenant_context

from .search_models import SearchBase, SrchProp, make_search_env

TENANTS = ("acme", "globex")
# Few distinct values, spelled several ways: searches hit, miss and collide all the time.
VALUES = st.sampled_from(["a", "b", "c", "d", "e", " A", "B ", "c\t", "xyz", "", " "])
MAYBE = st.one_of(st.none(), VALUES)
PROFILE = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def norm(v: str) -> str:
    return v.strip().lower()


class SearchMachine(RuleBasedStateMachine):
    bulk = False
    rows = Bundle("rows")

    def __init__(self, env: Any) -> None:
        super().__init__()
        self.env = env
        with env.engine.begin() as conn:
            conn.execute(delete(SrchProp.__table__))
        self.model: dict[int, tuple[str, str | None]] = {}

    def _insert(self, tenant: str, values: list[str | None]) -> list[int]:
        with tenant_context(tenant), self.env.Session.begin() as s:
            if self.bulk:
                before = set(s.scalars(select(SrchProp.id)))
                s.execute(insert(SrchProp), [{"code": v} for v in values])
                new = sorted(set(s.scalars(select(SrchProp.id))) - before)
            else:
                objs = [SrchProp(code=v) for v in values]
                s.add_all(objs)
                s.flush()
                new = [o.id for o in objs]
        for i, v in zip(new, values, strict=True):
            self.model[i] = (tenant, v)
        return new

    @rule(target=rows, tenant=st.sampled_from(TENANTS), value=MAYBE)
    def add(self, tenant: str, value: str | None) -> int:
        return self._insert(tenant, [value])[0]

    @rule(tenant=st.sampled_from(TENANTS), values=st.lists(MAYBE, min_size=1, max_size=4))
    def add_many(self, tenant: str, values: list[str | None]) -> None:
        self._insert(tenant, values)

    @rule(row=rows, value=MAYBE)
    def change(self, row: int, value: str | None) -> None:
        if row not in self.model:
            return
        tenant, _ = self.model[row]
        with tenant_context(tenant), self.env.Session.begin() as s:
            obj = s.get(SrchProp, row)
            assert obj is not None
            obj.code = value
        self.model[row] = (tenant, value)

    @rule(row=consumes(rows))
    def remove(self, row: int) -> None:
        if row not in self.model:
            return
        tenant, _ = self.model.pop(row)
        with tenant_context(tenant), self.env.Session.begin() as s:
            s.delete(s.get(SrchProp, row))

    def expect(self, tenant: str, terms: list[str]) -> list[int]:
        wanted = {norm(t) for t in terms}
        return sorted(
            i
            for i, (t, v) in self.model.items()
            if t == tenant and v is not None and norm(v) in wanted
        )

    @rule(tenant=st.sampled_from(TENANTS), term=VALUES)
    def search_eq(self, tenant: str, term: str) -> None:
        with tenant_context(tenant), self.env.Session() as s:
            got = sorted(p.id for p in s.scalars(select(SrchProp).where(SrchProp.code == term)))
            assert got == self.expect(tenant, [term])
            got = sorted(p.id for p in s.scalars(select(SrchProp).filter_by(code=term)))
            assert got == self.expect(tenant, [term])

    @rule(tenant=st.sampled_from(TENANTS), terms=st.lists(VALUES, max_size=3))
    def search_in(self, tenant: str, terms: list[str]) -> None:
        with tenant_context(tenant), self.env.Session() as s:
            got = sorted(p.id for p in s.scalars(select(SrchProp).where(SrchProp.code.in_(terms))))
        assert got == self.expect(tenant, terms)

    @rule(tenant=st.sampled_from(TENANTS))
    def search_null(self, tenant: str) -> None:
        with tenant_context(tenant), self.env.Session() as s:
            # IS NULL is plain SQL, not a search: scoped to the tenant by the query, as any other.
            stmt = select(SrchProp).where(SrchProp.code.is_(None), SrchProp.tenant_id == tenant)
            got = sorted(p.id for p in s.scalars(stmt))
        assert got == sorted(i for i, (t, v) in self.model.items() if t == tenant and v is None)


class BulkSearchMachine(SearchMachine):
    bulk = True


@pytest.mark.parametrize("machine", [SearchMachine, BulkSearchMachine])
def test_searches_match_a_model(tmp_path: Path, machine: type[SearchMachine]) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/search.db")
    SearchBase.metadata.create_all(engine)
    env = make_search_env(engine)
    try:
        run_state_machine_as_test(lambda: machine(env), settings=PROFILE)
    finally:
        engine.dispose()
