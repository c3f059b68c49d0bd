"""Minimal reproductions of what the adversarial suites found, one test each.

Each was first found by the state machine (``test_stateful.py``); here it is pinned as a plain,
deterministic test on both dialects, so that its fix is checked on every run even when the
machine's random examples do not happen to reach it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_cmk import NoTenantError, TenantMismatchError, tenant_context

from .models import Base, Employee, Folder, Keys, Record, clear_tables, make_keys


@dataclass
class Env:
    engine: Engine
    maker: sessionmaker[Session]
    keys: Keys

    def stored(self, table: str) -> list[tuple[object, ...]]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(f"SELECT id, tenant_id FROM {table}"))]


@pytest.fixture
def env(engine: Engine) -> Iterator[Env]:
    Base.metadata.create_all(engine)
    clear_tables(engine)
    keys = make_keys()
    maker = sessionmaker(engine)
    keys.cmk.install(maker)
    yield Env(engine, maker, keys)
    keys.cmk.uninstall(maker)
    clear_tables(engine)


@pytest.mark.parametrize("model", [Folder, Record], ids=["folder", "record"])
def test_row_without_values_is_not_re_tenanted_by_the_flush_context(
    env: Env, model: type[Base]
) -> None:
    """Added under acme with no encrypted value and its tenant column left to the library,
    then committed under globex: the row was stored with tenant_id 'globex'."""
    with env.maker() as s:
        with tenant_context("acme"):
            s.add(model(id=1))  # type: ignore[call-arg]
        with tenant_context("globex"), pytest.raises(TenantMismatchError):
            s.commit()
    assert env.stored(model.__tablename__) == []


def test_refused_flush_leaves_the_tenant_column_as_it_was(env: Env) -> None:
    """A flush under the wrong tenant is refused, but it had already filled the tenant column
    with that tenant: the row then could not be committed under its own tenant either."""
    with env.maker() as s:
        with tenant_context("acme"):
            row = Record(id=1, s="found-tok-4kq9z2m1x7")
            s.add(row)
        with tenant_context("globex"), pytest.raises(TenantMismatchError):
            s.flush()
        assert row.tenant_id is None
        with tenant_context("acme"):
            s.commit()
    assert env.stored("adv_records") == [(1, "acme")]


def test_delete_of_an_expired_joined_row_is_refused_before_any_sql(env: Env) -> None:
    with tenant_context("acme"), env.maker() as s:
        s.add(Employee(id=1, tenant_id="acme", name="found-tok-8zr3k1q0w5", salary=812345678))
        s.commit()
    with env.maker() as s:
        with tenant_context("acme"):
            employee = s.get(Employee, 1)
            s.add(Record(id=5, tenant_id="acme", label="KEPT"))
            s.flush()  # flushed, not committed
            s.expire(employee)
            s.delete(employee)
        with pytest.raises(NoTenantError):
            s.flush()  # no tenant in context: refused, but the earlier flush must survive
        tx = s.get_transaction()
        assert tx is not None and tx.is_active
        with tenant_context("acme"):
            s.commit()
    assert env.stored("adv_records") == [(5, "acme")]
