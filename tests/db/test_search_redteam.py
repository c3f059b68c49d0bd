"""Searchable columns (issue 10) attacked from outside the paths the main suite walks: query
shapes, bound parameters, expressions over a searchable column, one statement under two
tenants, threads, revocation inside a session, and the term in exception chains."""

from __future__ import annotations

import traceback
from typing import Any

import pytest
from sqlalchemy import (
    Engine,
    bindparam,
    case,
    func,
    select,
    type_coerce,
)

from sqlalchemy_cmk import tenant_context
from sqlalchemy_cmk.errors import UnsupportedQueryError

from .search_models import SearchEnv, SrchContact, SrchUser, make_search_env

TERM = "ann@example.com"
OTHER = "bob@example.com"


@pytest.fixture
def env(engine: Engine) -> SearchEnv:
    env = make_search_env(engine)
    for tenant in ("acme", "globex"):
        with tenant_context(tenant), env.Session.begin() as s:
            s.add_all(
                [
                    SrchUser(email=TERM, ssn="123-45-6789", name="Ann"),
                    SrchUser(email=OTHER, name="Bob"),
                    SrchContact(email=TERM, label=tenant),
                ]
            )
    return env


def _chain(exc: BaseException) -> str:
    """Everything an exception would show in a log: message, traceback, causes, contexts."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


# -- bugs -----------------------------------------------------------------------------------


def test_a_named_bind_parameter_is_refused_not_silently_frozen(env: SearchEnv) -> None:
    """``col == bindparam("e", v)`` executed with ``{"e": other}``: plain SQLAlchemy compares
    with ``other``; a term built from the construction-time value would silently find ``v``."""
    u = SrchUser
    with tenant_context("acme"), env.Session() as s:
        with pytest.raises(UnsupportedQueryError, match="bindparam") as info:
            s.scalars(select(u).where(u.email == bindparam("e", TERM)), {"e": OTHER}).all()
        assert TERM not in _chain(info.value) and OTHER not in _chain(info.value)
        with pytest.raises(UnsupportedQueryError, match="bindparam"):
            s.scalars(select(u).where(u.email == bindparam("e")), {"e": TERM}).all()
        with pytest.raises(UnsupportedQueryError, match="bindparam"):
            select(u).where(u.ssn.blind("ssn_last4") == bindparam("d", "6789"))
        # An anonymous literal() is a value, not a parameter: still searched.
        from sqlalchemy import literal

        assert [x.email for x in s.scalars(select(u).where(u.email == literal(TERM)))] == [TERM]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: func.coalesce(SrchUser.email, "x") == TERM, id="coalesce"),
        pytest.param(lambda: type_coerce(SrchUser.email, SrchUser.email.type) == TERM, id="coerce"),
        pytest.param(
            lambda: case((SrchUser.id > 0, SrchUser.email), else_=SrchUser.email) == TERM,
            id="case",
        ),
        pytest.param(lambda: SrchUser.email.label("e") == TERM, id="label"),
        pytest.param(lambda: SrchUser.email.label("e").in_([TERM]), id="label-in"),
    ],
)
def test_an_expression_over_a_searchable_column_is_refused_typed(env: SearchEnv, make: Any) -> None:
    """A blind index answers for the column itself; any expression over it (whose value is
    not the column's) must be refused with the library's error, not an AttributeError."""
    with tenant_context("acme"), env.Session() as s:
        with pytest.raises(UnsupportedQueryError) as info:
            s.scalars(select(SrchUser).where(make())).all()
        assert TERM not in _chain(info.value)


def test_a_subquery_without_the_index_columns_is_refused_typed(env: SearchEnv) -> None:
    """Searching a subquery's column needs the tenant and index columns in the subquery; one
    without them is refused as an unsupported query, naming what to add, not a KeyError."""
    u = SrchUser
    with tenant_context("acme"), env.Session() as s:
        for cols in ((u.id, u.email), (u.id, u.email, u.tenant_id)):
            sq = select(*cols).subquery()
            with pytest.raises(UnsupportedQueryError, match=r"email_bidx|tenant"):
                s.execute(select(sq.c.id).where(sq.c.email == TERM)).all()
        # With them, it works.
        sq = select(u.id, u.email, u.tenant_id, u.email_bidx, u.email_bidx_alt).subquery()
        assert len(s.execute(select(sq.c.id).where(sq.c.email == TERM)).all()) == 1
