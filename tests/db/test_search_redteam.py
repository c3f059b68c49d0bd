"""Searchable columns (issue 10) attacked from outside the paths the main suite walks: query
shapes, bound parameters, expressions over a searchable column, one statement under two
tenants, threads, revocation inside a session, and the term in exception chains."""

from __future__ import annotations

import threading
import traceback
from typing import Any

import pytest
from sqlalchemy import (
    Engine,
    bindparam,
    case,
    exists,
    func,
    lambda_stmt,
    select,
    type_coerce,
    union,
)

from sqlalchemy_cmk import tenant_context
from sqlalchemy_cmk.errors import TenantRevokedError, UnsupportedQueryError

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


def test_a_variable_in_a_lambda_statement_is_refused_typed(env: SearchEnv) -> None:
    """In lambda_stmt, SQLAlchemy turns a variable into a parameter whose value it sets at
    each execution, while a term's index values are computed from the value it is built with:
    refused, typed and saying why, not an InvalidValueError about a "PyWrapper" (and never a
    statement cached with the first value)."""
    u = SrchUser
    with tenant_context("acme"), env.Session() as s:
        for build in (
            lambda: lambda_stmt(lambda: select(u).where(u.email == TERM)),
            lambda: lambda_stmt(lambda: select(u).where(u.email.in_([TERM, OTHER]))),
            lambda: lambda_stmt(lambda: select(u).where(u.ssn.blind("ssn_last4") == TERM)),
        ):
            with pytest.raises(UnsupportedQueryError, match="lambda") as info:
                s.scalars(build()).all()
            assert TERM not in _chain(info.value)


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


# -- what held --------------------------------------------------------------------------------


def test_one_statement_object_under_two_tenants_and_one_session(env: SearchEnv) -> None:
    """The rewrite happens per execution: a statement object (and SQLAlchemy's compiled
    cache) reused under another tenant, or in one session that switches tenants, finds that
    tenant's row only."""
    stmt = select(SrchUser).where(SrchUser.email == TERM)
    seen = []
    for tenant in ("acme", "globex", "acme"):
        with tenant_context(tenant), env.Session() as s:
            seen.append([u.tenant_id for u in s.scalars(stmt)])
    assert seen == [["acme"], ["globex"], ["acme"]]
    with env.Session() as s:
        with tenant_context("acme"):
            a = s.scalars(stmt).one()
        with tenant_context("globex"):
            b = s.scalars(stmt).one()
            assert s.scalars(select(SrchUser).where(SrchUser.ssn == "123-45-6789")).one() is not a
        assert (a.tenant_id, b.tenant_id) == ("acme", "globex") and a is not b


def test_threads_searching_two_tenants_on_one_cmk(env: SearchEnv) -> None:
    stmt = select(SrchUser).where(SrchUser.email == TERM)
    truncated = select(SrchUser).where(SrchUser.ssn == "123-45-6789")
    errors: list[BaseException] = []

    def work(tenant: str) -> None:
        try:
            for _ in range(15):
                with tenant_context(tenant), env.Session() as s:
                    assert [u.tenant_id for u in s.scalars(stmt)] == [tenant]
                    assert [u.tenant_id for u in s.scalars(truncated)] == [tenant]
        except BaseException as exc:  # reported below, with the thread's traceback
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in ("acme", "globex") * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_revocation_inside_a_session(env: SearchEnv) -> None:
    """Revoked between two searches of one session: the next one raises the typed error,
    returns nothing, and names no term anywhere in its chain."""
    stmt = select(SrchUser).where(SrchUser.email == TERM)
    with tenant_context("acme"), env.Session() as s:
        assert len(s.scalars(stmt).all()) == 1
        env.cmk.revoke("acme")
        with pytest.raises(TenantRevokedError) as info:
            s.scalars(stmt).all()
        assert TERM not in _chain(info.value)
        with pytest.raises(TenantRevokedError):
            s.scalars(select(SrchUser).where(SrchUser.ssn == "123-45-6789")).all()
    with tenant_context("globex"), env.Session() as s:
        assert len(s.scalars(stmt).all()) == 1  # the other tenant is untouched


def test_query_shapes_on_an_exact_index(env: SearchEnv) -> None:
    """Exact indexes are usable anywhere: EXISTS, scalar subqueries, IN (subquery), CTEs,
    UNION, labels, LIMIT, lambda_stmt with a literal; each per tenant."""
    u, c = SrchUser, SrchContact
    with tenant_context("acme"), env.Session() as s:
        got = s.scalars(
            select(c).where(c.tenant_id == "acme", exists().where(u.email == c.email))
        ).all()
        assert [x.label for x in got] == ["acme"]
        sub = select(u.id).where(u.email == TERM).scalar_subquery()
        assert len(s.scalars(select(c).where(c.tenant_id == "acme", c.id <= sub)).all()) == 1
        assert (
            len(s.scalars(select(u).where(u.id.in_(select(u.id).where(u.email == TERM)))).all())
            == 1
        )
        cte = select(u.id).where(u.email == TERM).cte()
        assert len(s.execute(select(cte)).all()) == 1
        both = union(select(u.id).where(u.email == TERM), select(u.id).where(u.email == OTHER))
        assert len(s.execute(both).all()) == 2
        assert len(s.execute(select(u.email.label("e")).where(u.email == TERM)).all()) == 1
        assert len(s.scalars(select(u).where(u.email == TERM).limit(1)).all()) == 1
        assert [
            x.email
            for x in s.scalars(lambda_stmt(lambda: select(u).where(u.email == "ann@example.com")))
        ] == [TERM]
        # A truncated index in one(): rows checked after decryption, the others refused.
        assert s.query(u).filter(u.ssn == "123-45-6789").one().ssn == "123-45-6789"
        with pytest.raises(UnsupportedQueryError):
            s.query(u).filter(u.ssn == "123-45-6789").first()  # LIMIT 1


@pytest.mark.parametrize("ttl", [float("nan"), float("inf"), -1.0])
def test_search_state_ttl_must_be_a_finite_number(ttl: float) -> None:
    """A process caching states for ever (inf) never sees a rotation move on and searches a
    slot the others stop writing; NaN never caches (and made the tools' default wait NaN)."""
    from sqlalchemy_cmk import CMK
    from sqlalchemy_cmk.errors import ConfigurationError
    from sqlalchemy_cmk.testing import FakeKeyProvider

    with pytest.raises(ConfigurationError, match="search_state_ttl"):
        CMK(FakeKeyProvider(), tenant_keys={"acme": "fake://acme"}, search_state_ttl=ttl)


def test_tenants_a_collation_calls_equal_stay_apart(engine: Engine) -> None:
    """ "ACME" and "acm\u00e9" are tenants other than "acme" (Python's ==), but MariaDB's usual
    collations fold case and accents: the rewrite's own tenant filter must not let a join
    (which compares stored index values, with no key of the tenant's) or a != search return
    another tenant's rows."""
    from sqlalchemy.orm import sessionmaker

    from sqlalchemy_cmk import CMK
    from sqlalchemy_cmk.testing import FakeKeyProvider

    from .search_models import SearchBase, set_phase

    SearchBase.metadata.create_all(engine)
    tenants = ("acme", "ACME", "acm\u00e9")
    cmk = CMK(FakeKeyProvider(), tenant_keys={t: f"fake://t{i}" for i, t in enumerate(tenants)})
    maker = sessionmaker(engine, expire_on_commit=False)
    cmk.install(maker)
    set_phase(engine, cmk, SrchUser, SrchContact)
    for t in tenants:
        with tenant_context(t), maker.begin() as s:
            s.add_all([SrchUser(email=f"{t}@x.org", note=t), SrchContact(email=TERM, label=t)])
    with tenant_context("acme"), maker.begin() as s:
        s.add_all([SrchUser(email=TERM, note="acme's"), SrchContact(email=OTHER, label="acme's")])
    u, c = SrchUser, SrchContact
    for t in tenants:
        with tenant_context(t), maker() as s:
            joined = s.execute(select(u.note, c.label).join(c, u.email == c.email)).all()
            assert joined == ([("acme's", "acme")] if t == "acme" else []), t
            notes = s.scalars(select(u.note).where(u.email != "nobody@x.org")).all()
            assert sorted(notes) == sorted(
                n for n in ([t] + (["acme's"] if t == "acme" else []))
            ), t


def test_a_search_in_a_loader_criteria_is_refused_as_a_search(env: SearchEnv) -> None:
    """with_loader_criteria() and relationship.and_() criteria are added where the rewrite
    never sees them: refused, saying that a search cannot go there, not that the column's
    comparisons "cannot match" (it is searchable)."""
    from sqlalchemy.orm import with_loader_criteria

    u = SrchUser
    with tenant_context("acme"), env.Session() as s:
        for opt in (
            with_loader_criteria(u, u.email == TERM),
            with_loader_criteria(u, lambda cls: cls.email == "ann@example.com"),
        ):
            with pytest.raises(UnsupportedQueryError, match="search") as info:
                s.scalars(select(u).options(opt)).all()
            assert "cannot match" not in str(info.value)
            assert TERM not in _chain(info.value)
