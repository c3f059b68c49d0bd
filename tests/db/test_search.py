"""Searchable encrypted columns (issue 10) on SQLite, PostgreSQL and MariaDB: what a search
finds, what it never finds, what it refuses, and that its term never reaches the database."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from sqlalchemy_cmk import tenant_context
from sqlalchemy_cmk.context import cross_tenant_context
from sqlalchemy_cmk.errors import (
    CMKError,
    IndexNotReadyError,
    KeyAccessDeniedError,
    PlaintextWriteError,
    TenantRevokedError,
    UnsupportedQueryError,
)

from .search_models import (
    SearchEnv,
    SrchContact,
    SrchTiny,
    SrchUser,
    make_search_env,
    set_phase,
)


@pytest.fixture
def env(engine: Engine) -> SearchEnv:
    return make_search_env(engine)


def add(env: SearchEnv, tenant: str, *rows: Any) -> list[int]:
    with tenant_context(tenant), env.Session.begin() as s:
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def emails(env: SearchEnv, tenant: str, stmt: Any) -> list[str | None]:
    with tenant_context(tenant), env.Session() as s:
        return sorted(u.email for u in s.scalars(stmt))


def ids(env: SearchEnv, tenant: str, stmt: Any) -> list[int]:
    with tenant_context(tenant), env.Session() as s:
        return sorted(r.id for r in s.scalars(stmt))


def raw_slot(env: SearchEnv, table: str, col: str, row_id: int) -> bytes | None:
    (value,) = env.raw(f"select {col} from {table} where id = :i", i=row_id)[0]
    return None if value is None else bytes(value)


# -- what a search finds --------------------------------------------------------------------


def test_equality_in_filter_by_and_query(env: SearchEnv) -> None:
    add(
        env,
        "acme",
        SrchUser(email="ann@example.com"),
        SrchUser(email="bob@example.com"),
        SrchUser(email="cy@example.com"),
    )
    u = SrchUser
    assert emails(env, "acme", select(u).where(u.email == "ann@example.com")) == ["ann@example.com"]
    assert emails(
        env, "acme", select(u).where(u.email.in_(["bob@example.com", "zz@x", "cy@example.com"]))
    ) == [
        "bob@example.com",
        "cy@example.com",
    ]
    assert emails(env, "acme", select(u).filter_by(email="bob@example.com")) == ["bob@example.com"]
    assert emails(env, "acme", select(u).where(u.email.in_([]))) == []
    assert emails(env, "acme", select(u).where(u.email == "nobody@example.com")) == []
    with tenant_context("acme"), env.Session() as s:
        assert [x.email for x in s.query(u).filter(u.email == "cy@example.com")] == [
            "cy@example.com"
        ]
        assert [x.email for x in s.query(u).filter_by(email="ann@example.com").all()] == [
            "ann@example.com"
        ]


def test_derived_index_with_collisions(env: SearchEnv) -> None:
    ssns = [f"{i:03d}-45-{i:04d}" for i in range(12)] + ["999-99-0003"]
    add(env, "acme", *(SrchUser(ssn=v) for v in ssns))
    with tenant_context("acme"), env.Session() as s:
        for v in ssns:
            got = sorted(x.ssn for x in s.scalars(select(SrchUser).where(SrchUser.ssn == v)))
            assert got == [v]
        got = sorted(
            x.ssn
            for x in s.scalars(select(SrchUser).where(SrchUser.ssn.blind("ssn_last4") == "0003"))
        )
        assert got == ["003-45-0003", "999-99-0003"]
        # The transform runs on the term too: any spelling with the same last four digits.
        got = sorted(
            x.ssn
            for x in s.scalars(
                select(SrchUser).where(SrchUser.ssn.blind("ssn_last4").in_(["x-0007", "0011"]))
            )
        )
        assert got == ["007-45-0007", "011-45-0011"]
        # A term with no last four digits has no index value: nothing, and nothing refused.
        assert (
            s.scalars(select(SrchUser).where(SrchUser.ssn.blind("ssn_last4") == "12")).all() == []
        )


def test_normalizers(env: SearchEnv) -> None:
    add(env, "acme", SrchUser(email="Ann.Lee@Example.COM", name="\uff46\uff4f\uff4f \u2168"))
    for term in [
        "ann.lee@example.com",
        "  ANN.LEE@example.com ",
        "\uff21\uff2e\uff2e.lee@example.com",
    ]:
        assert emails(env, "acme", select(SrchUser).where(SrchUser.email == term)) == [
            "Ann.Lee@Example.COM"
        ], term
    # NFKC folds compatibility forms, and only them: case still counts.
    with tenant_context("acme"), env.Session() as s:
        assert [x.name for x in s.scalars(select(SrchUser).where(SrchUser.name == "foo IX"))] == [
            "\uff46\uff4f\uff4f \u2168"
        ]
        assert s.scalars(select(SrchUser).where(SrchUser.name == "FOO IX")).all() == []


def test_join_on_a_shared_domain(env: SearchEnv) -> None:
    add(env, "acme", SrchUser(email="ann@example.com"), SrchUser(email="bob@example.com"))
    add(
        env,
        "acme",
        SrchContact(email=" ANN@example.com", label="a"),
        SrchContact(email="zed@example.com", label="z"),
    )
    add(env, "globex", SrchContact(email="bob@example.com", label="other tenant"))
    with tenant_context("acme"), env.Session() as s:
        rows = s.execute(
            select(SrchUser, SrchContact).join(SrchContact, SrchUser.email == SrchContact.email)
        ).all()
        assert [(u.email, c.label) for u, c in rows] == [("ann@example.com", "a")]
        # Also as a WHERE condition between two entities.
        rows = s.execute(
            select(SrchUser, SrchContact).where(SrchUser.email == SrchContact.email)
        ).all()
        assert [(u.email, c.label) for u, c in rows] == [("ann@example.com", "a")]
    with tenant_context("globex"), env.Session() as s:
        rows = s.execute(
            select(SrchUser, SrchContact).join(SrchContact, SrchUser.email == SrchContact.email)
        ).all()
        assert rows == []


def test_join_needs_a_shared_domain(env: SearchEnv) -> None:
    with tenant_context("acme"), env.Session() as s, pytest.raises(UnsupportedQueryError):
        s.execute(
            select(SrchUser, SrchContact).join(SrchContact, SrchUser.name == SrchContact.email)
        )


def test_uniqueness_per_tenant(env: SearchEnv) -> None:
    add(env, "acme", SrchUser(email="ann@example.com"))
    with tenant_context("acme"), env.Session() as s:
        s.add(SrchUser(email=" ANN@Example.com"))
        with pytest.raises(IntegrityError) as info:
            s.commit()
    # The database's error carries the statement's parameters: index values and ciphertext.
    assert "ann@" not in str(info.value).lower()
    add(env, "globex", SrchUser(email="ann@example.com"))  # another tenant: fine
    assert emails(env, "globex", select(SrchUser).where(SrchUser.email == "ann@example.com")) == [
        "ann@example.com"
    ]


def test_tenant_isolation(env: SearchEnv) -> None:
    (a,) = add(env, "acme", SrchUser(email="ann@example.com", ssn="123-45-6789", name="n"))
    (g,) = add(env, "globex", SrchUser(email="ann@example.com", ssn="123-45-6789", name="n"))
    for col in ("email_bidx", "name_bidx"):
        va, vg = raw_slot(env, "srch_users", col, a), raw_slot(env, "srch_users", col, g)
        assert va is not None and vg is not None and va != vg
        assert raw_slot(env, "srch_users", col + "_alt", a) is None
    for tenant, own in (("acme", a), ("globex", g)):
        with tenant_context(tenant), env.Session() as s:
            for cond in (
                SrchUser.email == "ann@example.com",
                SrchUser.ssn == "123-45-6789",
                SrchUser.ssn.blind("ssn_last4") == "6789",
                SrchUser.name == "n",
                SrchUser.email.in_(["ann@example.com"]),
            ):
                assert [x.id for x in s.scalars(select(SrchUser).where(cond))] == [own]
            # Exact index in Core-like positions: still only the tenant's own rows.
            n = s.scalar(select(func.count()).select_from(SrchUser).where(SrchUser.name == "n"))
            assert n == 1


def test_forced_collision_never_returns_a_colliding_row(env: SearchEnv) -> None:
    codes = [f"code-{i}" for i in range(16)]
    row_ids = add(env, "acme", *(SrchTiny(code=c) for c in codes))
    stored = {raw_slot(env, "srch_tiny", "code_bidx", i) for i in row_ids}
    assert len(stored) <= 2  # one bit: collisions are the rule
    with tenant_context("acme"), env.Session() as s:
        for c in codes:
            assert [x.code for x in s.scalars(select(SrchTiny).where(SrchTiny.code == c))] == [c]
        got = sorted(
            x.code for x in s.scalars(select(SrchTiny).where(SrchTiny.code.in_(codes[:3])))
        )
        assert got == sorted(codes[:3])
        assert s.scalars(select(SrchTiny).where(SrchTiny.code == "absent")).all() == []


def test_aliased_entities(env: SearchEnv) -> None:
    """An aliased entity searches like the entity; a self-join of a 2-bit index is filtered on
    both sides (collisions between the two sides dropped)."""
    from sqlalchemy.orm import aliased

    add(env, "acme", *(SrchUser(ssn=v) for v in ("111", "222", "333", "111", "444", "555")))
    add(env, "globex", SrchUser(ssn="111"))
    b = aliased(SrchUser)
    with tenant_context("acme"), env.Session() as s:
        assert sorted(x.ssn for x in s.scalars(select(b).where(b.ssn == "111"))) == ["111", "111"]
        assert [x.ssn for x in s.scalars(select(b).where(b.ssn.in_(["222"])))] == ["222"]
        rows = s.execute(select(SrchUser, b).join(b, SrchUser.ssn == b.ssn)).all()
        assert rows and all(x.ssn == y.ssn for x, y in rows)
        assert len(rows) == 4 + 4  # 222..555 with themselves; the two 111s, pairwise


# -- NULLs, updates, bulk insert --------------------------------------------------------------


def test_nulls(env: SearchEnv) -> None:
    (a, b) = add(env, "acme", SrchUser(email="ann@example.com", ssn="1"), SrchUser(email=None))
    assert ids(env, "acme", select(SrchUser).where(SrchUser.email.is_(None))) == [b]
    assert ids(env, "acme", select(SrchUser).where(SrchUser.email.is_not(None))) == [a]
    assert raw_slot(env, "srch_users", "email_bidx", b) is None
    with tenant_context("acme"), env.Session() as s:
        u = s.get(SrchUser, a)
        assert u is not None
        u.email = None
        u.ssn = None
        s.commit()
    for col in ("email_bidx", "email_bidx_alt", "ssn_bidx", "ssn_last4"):
        assert raw_slot(env, "srch_users", col, a) is None, col
    assert ids(env, "acme", select(SrchUser).where(SrchUser.email == "ann@example.com")) == []
    assert ids(env, "acme", select(SrchUser).where(SrchUser.email.is_(None))) == [a, b]
    with tenant_context("acme"), env.Session() as s:
        with pytest.raises(UnsupportedQueryError):
            s.scalars(select(SrchUser).where(SrchUser.email.in_([None])))
        with pytest.raises(UnsupportedQueryError):
            s.scalars(select(SrchUser).where(SrchUser.email.in_(["x@y", None])))


def test_update_reindexes(env: SearchEnv) -> None:
    (a,) = add(env, "acme", SrchUser(email="ann@example.com", ssn="123-45-6789"))
    before = raw_slot(env, "srch_users", "email_bidx", a)
    with tenant_context("acme"), env.Session() as s:
        u = s.scalars(select(SrchUser).where(SrchUser.email == "ann@example.com")).one()
        u.email = "anne@example.com"
        u.ssn = "000-00-0001"
        s.commit()
    assert raw_slot(env, "srch_users", "email_bidx", a) != before
    assert ids(env, "acme", select(SrchUser).where(SrchUser.email == "ann@example.com")) == []
    assert ids(env, "acme", select(SrchUser).where(SrchUser.email == "anne@example.com")) == [a]
    assert ids(env, "acme", select(SrchUser).where(SrchUser.ssn == "123-45-6789")) == []
    assert ids(env, "acme", select(SrchUser).where(SrchUser.ssn == "000-00-0001")) == [a]
    assert ids(env, "acme", select(SrchUser).where(SrchUser.ssn.blind("ssn_last4") == "0001")) == [
        a
    ]
    # The old value is free again for the unique index; a new row may take it.
    add(env, "acme", SrchUser(email="ANN@example.com"))


def test_orm_bulk_insert_writes_indexes(env: SearchEnv) -> None:
    rows = [
        {"email": "a@example.com", "ssn": "111-11-1111"},
        {"email": "b@example.com", "ssn": None},
        {"email": None, "ssn": "222-22-2222"},
    ]
    with tenant_context("acme"), env.Session.begin() as s:
        s.execute(insert(SrchUser), rows)
    assert emails(env, "acme", select(SrchUser).where(SrchUser.email == "A@example.com")) == [
        "a@example.com"
    ]
    with tenant_context("acme"), env.Session() as s:
        assert [
            x.email for x in s.scalars(select(SrchUser).where(SrchUser.ssn == "222-22-2222"))
        ] == [None]
        assert (
            len(s.scalars(select(SrchUser).where(SrchUser.ssn.blind("ssn_last4") == "1111")).all())
            == 1
        )
    with tenant_context("acme"), env.Session.begin() as s, pytest.raises(IntegrityError):
        s.execute(insert(SrchUser), [{"email": "x@example.com"}, {"email": "X@example.com"}])


# -- states, revocation -----------------------------------------------------------------------


def test_index_not_ready_before_the_state_says_ready(engine: Engine) -> None:
    env = make_search_env(engine, ready=False)
    add(env, "acme", SrchUser(email="ann@example.com"))
    with tenant_context("acme"), env.Session() as s, pytest.raises(IndexNotReadyError) as info:
        s.scalars(select(SrchUser).where(SrchUser.email == "ann@example.com"))
    assert "ann@" not in str(info.value)
    set_phase(engine, env.cmk, SrchUser, SrchContact, SrchTiny, phase="building")
    with tenant_context("acme"), env.Session() as s, pytest.raises(IndexNotReadyError):
        s.scalars(select(SrchUser).where(SrchUser.email == "ann@example.com"))
    env.ready()
    assert emails(env, "acme", select(SrchUser).where(SrchUser.email == "ann@example.com")) == [
        "ann@example.com"
    ]


def test_revoke_stops_search(env: SearchEnv) -> None:
    add(env, "acme", SrchUser(email="ann@example.com"))
    assert emails(env, "acme", select(SrchUser).where(SrchUser.email == "ann@example.com"))
    env.cmk.revoke("acme")
    with tenant_context("acme"), env.Session() as s, pytest.raises(TenantRevokedError):
        s.scalars(select(SrchUser).where(SrchUser.email == "ann@example.com")).all()
    with tenant_context("acme"), env.Session() as s, pytest.raises(TenantRevokedError):
        s.scalar(select(func.count()).select_from(SrchUser).where(SrchUser.name == "n"))
    # The other tenant is untouched.
    add(env, "globex", SrchUser(email="ann@example.com"))
    assert emails(env, "globex", select(SrchUser).where(SrchUser.email == "ann@example.com"))


def test_kms_revocation_after_forget_stops_search(env: SearchEnv) -> None:
    add(env, "acme", SrchUser(email="ann@example.com", name="n"))
    assert emails(env, "acme", select(SrchUser).where(SrchUser.email == "ann@example.com"))
    env.kms.deny("fake://acme")
    env.cmk.forget_tenant("acme")
    for cond in (SrchUser.email == "ann@example.com", SrchUser.name == "n"):
        with tenant_context("acme"), env.Session() as s, pytest.raises(KeyAccessDeniedError):
            s.scalars(select(SrchUser).where(cond)).all()
        with tenant_context("acme"), env.Session() as s, pytest.raises(KeyAccessDeniedError):
            s.scalar(select(func.count()).select_from(SrchUser).where(cond))


# -- refusals -----------------------------------------------------------------------------------

TERM = "secret.term@example.com"
SSN = "secret.term"


def refused(env: SearchEnv, stmt_or_fn: Any, error: type[CMKError] = UnsupportedQueryError) -> None:
    with tenant_context("acme"), env.Session() as s, pytest.raises(error) as info:
        if callable(stmt_or_fn):
            stmt_or_fn(s)
        else:
            s.execute(stmt_or_fn).all()
    for form in (TERM, TERM.upper(), "secret.term"):
        assert form not in str(info.value)


def test_refused_on_any_searchable_column(env: SearchEnv) -> None:
    add(env, "acme", SrchUser(email=TERM))
    u = SrchUser
    refused(env, select(u).order_by(u.email))
    refused(env, lambda s: s.scalars(select(u).where(u.email.like(TERM))).all())
    refused(env, lambda s: s.scalars(select(u).where(u.email < TERM)).all())
    refused(env, lambda s: s.scalars(select(u).where(u.email.startswith("secret.term"))).all())
    refused(env, lambda s: s.scalars(select(u).where(func.lower(u.email) == TERM)).all())
    refused(env, lambda s: s.scalars(select(u).where(u.email.is_not_distinct_from(TERM))).all())
    with cross_tenant_context(actor="test"):
        with env.Session() as s, pytest.raises(UnsupportedQueryError) as info:
            s.scalars(select(u).where(u.email == TERM)).all()
        assert TERM not in str(info.value)


def test_refused_on_a_truncated_index(env: SearchEnv) -> None:
    add(env, "acme", SrchUser(ssn=SSN))
    u = SrchUser
    refused(env, select(u).where(u.ssn == SSN).limit(1))
    refused(env, select(u).where(u.ssn == SSN).offset(1))
    refused(env, select(func.count()).select_from(u).where(u.ssn == SSN))
    refused(env, select(u.id).where(u.ssn == SSN))
    refused(env, select(u).where(u.ssn != SSN))
    refused(env, select(u).where(u.ssn.not_in([SSN])))
    refused(env, select(u).where((u.ssn == SSN) | (u.id == 1)))
    refused(env, select(u).where(~(u.ssn == SSN)))
    refused(env, select(u).where(u.ssn.blind("ssn_last4") == SSN).distinct())
    refused(env, select(u).where(u.id.in_(select(u.id).where(u.ssn == SSN))))
    refused(env, update(u).where(u.ssn == SSN).values(note="n"))
    refused(env, lambda s: s.query(u).filter(u.ssn == SSN).first())
    refused(
        env,
        lambda s: list(s.scalars(select(u).where(u.ssn == SSN).execution_options(yield_per=2))),
    )
    refused(
        env,
        lambda s: s.execute(
            select(SrchContact, u).outerjoin(u, (SrchContact.id == u.id) & (u.ssn == SSN))
        ).all(),
    )


def test_allowed_on_an_exact_index(env: SearchEnv) -> None:
    (a, b) = add(env, "acme", SrchUser(name=TERM, email="a@x"), SrchUser(name="other", email="b@x"))
    add(env, "globex", SrchUser(name=TERM))
    u = SrchUser
    with tenant_context("acme"), env.Session() as s:
        assert [x.id for x in s.scalars(select(u).where(u.name == TERM).limit(1))] == [a]
        assert s.scalar(select(func.count()).select_from(u).where(u.name == TERM)) == 1
        assert s.scalars(select(u.id).where(u.name == TERM)).all() == [a]
        assert s.scalars(select(u.id).where(u.name != TERM)).all() == [b]
        assert s.scalars(select(u.id).where(u.name.not_in([TERM, "zz"]))).all() == [b]
        assert sorted(s.scalars(select(u.id).where((u.name == TERM) | (u.id == b)))) == [a, b]
        assert s.query(u).filter(u.name == TERM).first().id == a  # type: ignore[union-attr]
        got = [
            x.id for x in s.scalars(select(u).where(u.name == TERM).execution_options(yield_per=1))
        ]
        assert got == [a]
        s.execute(update(u).where(u.name == TERM).values(note="n"))
        s.commit()
    # != never reaches the other tenant's rows, nor NULL ones.
    with tenant_context("globex"), env.Session() as s:
        assert s.scalars(select(u.id).where(u.name != "zz")).all() == [
            x for x in s.scalars(select(u.id).where(u.name == TERM))
        ]


def test_core_and_bulk_updates_of_a_searchable_column_refused(env: SearchEnv) -> None:
    (a,) = add(env, "acme", SrchUser(email="ann@example.com"))
    refused(env, update(SrchUser).values(email=None), PlaintextWriteError)
    refused(env, update(SrchUser).where(SrchUser.id == a).values(email=None), PlaintextWriteError)
    refused(
        env,
        lambda s: s.execute(update(SrchUser), [{"id": a, "email": None}]),
        PlaintextWriteError,
    )
    refused(
        env,
        lambda s: s.execute(update(SrchUser), [{"id": a, "email_bidx": None}]),
        PlaintextWriteError,
    )
    # Unchanged: still found.
    assert ids(env, "acme", select(SrchUser).where(SrchUser.email == "ann@example.com")) == [a]


# -- the term is never sent -------------------------------------------------------------------


@pytest.fixture
def sent(env: SearchEnv) -> Iterator[list[str]]:
    out: list[str] = []

    def listen(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: Any
    ) -> None:
        out.append(statement)
        out.append(repr(params))
        out.append(str(params))

    event.listen(env.engine, "before_cursor_execute", listen)
    yield out
    event.remove(env.engine, "before_cursor_execute", listen)


def test_the_term_is_absent_from_everything_sent(
    env: SearchEnv, sent: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    term = "Zelda.Quux@Example.org"
    forms = {term, term.lower(), term.upper(), "zelda.quux", "Zelda.Quux", "quux"}
    add(env, "acme", SrchUser(email=term, ssn="777-66-5555", name="\uff3aelda"))
    env.engine.echo = True
    sent.clear()
    stmts: list[Any] = []
    with (
        caplog.at_level(logging.DEBUG, logger="sqlalchemy"),
        tenant_context("acme"),
        env.Session() as s,
    ):
        for stmt in (
            select(SrchUser).where(SrchUser.email == term),
            select(SrchUser).where(SrchUser.email == " " + term.upper()),
            select(SrchUser).where(SrchUser.email.in_([term, "quux@x"])),
            select(SrchUser).filter_by(email=term),
            select(SrchUser).where(SrchUser.ssn == "777-66-5555"),
            select(SrchUser).where(SrchUser.ssn.blind("ssn_last4") == "5555"),
            select(SrchUser).where(SrchUser.name == "Zelda"),
            select(func.count()).select_from(SrchUser).where(SrchUser.name != "Zelda"),
            select(SrchUser, SrchContact).join(SrchContact, SrchUser.email == SrchContact.email),
        ):
            stmts.append(stmt)
            s.execute(stmt).all()
        s.query(SrchUser).filter(SrchUser.email == term).all()
        u = s.scalars(select(SrchUser).where(SrchUser.email == term)).one()
        u.email = term + "x"
        s.commit()
    env.engine.echo = False
    assert sent, "the listener saw the statements"
    text = "\n".join(sent) + "\n" + caplog.text + "\n" + "\n".join(str(x) for x in stmts)
    text += "\n".join(repr(ev) for ev in env.audit.events)  # audit events too
    assert env.audit.events
    assert "srch_users" in caplog.text
    for form in forms | {"777-66-5555", "Zelda", "\uff3aelda"}:
        assert form not in text, form
    # The last four digits alone: not as part of a longer number (an audit event's timestamp or
    # duration holds "5555" now and then, which is no leak).
    assert not re.search(r"(?<![0-9])5555(?![0-9])", text)
    assert "blind index search" in str(stmts[0])


# -- KMS calls --------------------------------------------------------------------------------


def test_kms_calls_of_a_search(env: SearchEnv) -> None:
    add(env, "acme", SrchUser(email="ann@example.com"))
    fresh = make_search_env(env.engine)  # a new process: nothing cached
    fresh.kms._keys = env.kms._keys  # the same KMS
    fresh.kms.reset_counts()
    assert emails(fresh, "acme", select(SrchUser).where(SrchUser.email == "ann@example.com"))
    assert fresh.kms.unwrap_count == 2  # the tenant's root key, and the row's data key
    assert fresh.kms.wrap_count == 0
    fresh.kms.reset_counts()
    assert emails(fresh, "acme", select(SrchUser).where(SrchUser.email == "ann@example.com"))
    assert (
        emails(fresh, "acme", select(SrchUser).where(SrchUser.email == "nobody@example.com")) == []
    )
    assert fresh.kms.calls == []
    # A search that matches nothing costs the root key only.
    fresh.cmk.forget_tenant("acme")
    fresh.kms.reset_counts()
    assert (
        emails(fresh, "acme", select(SrchUser).where(SrchUser.email == "nobody@example.com")) == []
    )
    assert fresh.kms.unwrap_count == 1


# -- rotation phases (the core's part: which slots are written and read) --------------------


def _state(env: SearchEnv, domain: str, **values: Any) -> None:
    from sqlalchemy import update as sql_update

    from .search_models import STATES_TABLE

    with env.engine.begin() as conn:
        conn.execute(
            sql_update(STATES_TABLE).where(STATES_TABLE.c.domain == domain).values(**values)
        )
    env.cmk._search.forget()


def test_rotation_phases_write_both_slots_and_read_one(env: SearchEnv) -> None:
    domain = "srch_users.name_bidx"
    (old,) = add(env, "acme", SrchUser(name="old"))
    _state(env, domain, phase="rotating", other_version=2, other_bits=128)
    (mid,) = add(env, "acme", SrchUser(name="mid"))
    v1 = raw_slot(env, "srch_users", "name_bidx", mid)
    v2 = raw_slot(env, "srch_users", "name_bidx_alt", mid)
    assert v1 is not None and v2 is not None and v1 != v2
    assert v1[:5] == b"\x01\x00\x00\x00\x01" and v2[:5] == b"\x01\x00\x00\x00\x02"
    assert raw_slot(env, "srch_users", "name_bidx_alt", old) is None  # the build tool's job
    # rotating reads the current slot: both rows found.
    assert ids(env, "acme", select(SrchUser).where(SrchUser.name.in_(["old", "mid"]))) == [
        old,
        mid,
    ]
    _state(env, domain, phase="switched", slot=1, version=2, other_version=1, other_bits=128)
    (new,) = add(env, "acme", SrchUser(name="new"))
    assert raw_slot(env, "srch_users", "name_bidx_alt", new) == _value_like(v2, env, new)
    # switched reads slot 1 (version 2): rows written since rotating began are found.
    assert ids(env, "acme", select(SrchUser).where(SrchUser.name.in_(["mid", "new"]))) == [
        mid,
        new,
    ]
    # Both slots still written, so a process one phase behind reads a complete slot 0.
    assert raw_slot(env, "srch_users", "name_bidx", new) is not None
    # An update in the switched phase rewrites both slots.
    with tenant_context("acme"), env.Session.begin() as s:
        row = s.get(SrchUser, mid)
        assert row is not None
        row.name = "mid2"
    assert raw_slot(env, "srch_users", "name_bidx_alt", mid) != v2
    assert raw_slot(env, "srch_users", "name_bidx", mid) != v1
    assert ids(env, "acme", select(SrchUser).where(SrchUser.name == "mid2")) == [mid]
    # Back to ready on slot 1: the other slot is cleared on the next write.
    _state(env, domain, phase="ready", other_version=None, other_bits=None)
    with tenant_context("acme"), env.Session.begin() as s:
        row = s.get(SrchUser, mid)
        assert row is not None
        row.name = "mid3"
    assert raw_slot(env, "srch_users", "name_bidx", mid) is None
    assert ids(env, "acme", select(SrchUser).where(SrchUser.name == "mid3")) == [mid]


def _value_like(v: bytes, env: SearchEnv, row_id: int) -> bytes | None:
    """The row's slot-1 value, checked to carry version 2 like ``v``."""
    got = raw_slot(env, "srch_users", "name_bidx_alt", row_id)
    assert got is not None and got[:5] == v[:5]
    return got


def test_first_searchable_write_after_other_writes(env: SearchEnv) -> None:
    """A tenant's root key is created on its first searchable write; the session may already
    have written in its transaction (on SQLite that holds the database's write lock)."""
    for tenant in ("acme", "globex"):
        with tenant_context(tenant), env.Session() as s:
            s.add(SrchContact(label="plain"))
            s.flush()
            s.add(SrchUser(email=f"first@{tenant}"))
            s.flush()
            s.rollback()  # the root key goes with the transaction, or stays: either works
        with tenant_context(tenant), env.Session.begin() as s:
            s.add(SrchContact(label="plain"))
            s.flush()
            s.add(SrchUser(email=f"first@{tenant}"))
    assert emails(env, "acme", select(SrchUser).where(SrchUser.email == "first@acme")) == [
        "first@acme"
    ]
    fresh = make_search_env(env.engine)
    fresh.kms._keys = env.kms._keys
    assert emails(fresh, "globex", select(SrchUser).where(SrchUser.email == "first@globex")) == [
        "first@globex"
    ]
    assert env.raw("select count(*) from cmk_tenant_keys") == [(2,)]


def test_bulk_insert_returning_the_entity(env: SearchEnv) -> None:
    """RETURNING a model with two searchable columns: SQLAlchemy tests ``column in list``,
    which compares columns with ``==``, a search term between two searchable columns."""
    with tenant_context("acme"), env.Session.begin() as s:
        got = s.scalars(
            insert(SrchUser).returning(SrchUser),
            [{"email": "r1@example.com", "name": "r"}, {"email": "r2@example.com"}],
        ).all()
        assert sorted(u.email for u in got) == ["r1@example.com", "r2@example.com"]
    assert emails(env, "acme", select(SrchUser).where(SrchUser.email == "r2@example.com")) == [
        "r2@example.com"
    ]
    c = SrchUser.__table__.c
    assert c.email in [c.name, c.email]
    assert c.ssn not in [c.name, c.email]


def test_kms_calls_of_writes(engine: Engine) -> None:
    env = make_search_env(engine)
    env.kms.reset_counts()
    # A tenant that never wrote a searchable value has no root key: a search costs nothing.
    assert emails(env, "acme", select(SrchUser).where(SrchUser.email == "a@example.com")) == []
    assert env.kms.calls == []
    add(env, "acme", SrchUser(email="a@example.com"))
    # The root key and the row's data key, each wrapped once and proved by an unwrap (plus,
    # today, one more unwrap of the root key: the proved key is not kept for reading).
    assert env.kms.wrap_count == 2
    assert 2 <= env.kms.unwrap_count <= 3
    env.kms.reset_counts()
    add(env, "acme", SrchUser(email="b@example.com"))
    assert env.kms.calls == []  # warm: the write key and the index key are cached


def test_core_on_an_installed_engine(env: SearchEnv) -> None:
    """Core statements on an installed engine: an exact index is searched (tenant scoped), a
    truncated one refused, and nothing is sent for it."""
    (a,) = add(env, "acme", SrchUser(name="n", ssn="1"))
    add(env, "globex", SrchUser(name="n", ssn="1"))
    t = SrchUser.__table__
    env.cmk.install(env.engine)
    try:
        with tenant_context("acme"), env.engine.connect() as conn:
            assert conn.execute(select(t.c.id).where(SrchUser.name == "n")).scalars().all() == [a]
            assert conn.scalar(select(func.count()).select_from(t).where(t.c.name == "n")) == 1
            with pytest.raises(UnsupportedQueryError):
                conn.execute(select(t.c.id).where(t.c.ssn == "1"))
        with pytest.raises(CMKError), env.engine.connect() as conn:  # no tenant
            conn.execute(select(t.c.id).where(SrchUser.name == "n"))
    finally:
        env.cmk.uninstall(env.engine)


def test_a_term_never_compiles_for_a_database() -> None:
    from sqlalchemy.dialects import mysql, postgresql, sqlite

    term = "Zelda.Quux@Example.org"
    stmt = select(SrchUser).where(SrchUser.email.in_([term, "x@y"]))
    assert term not in str(stmt)
    assert term not in str(stmt.compile(compile_kwargs={"literal_binds": True}))
    for dialect in (postgresql.dialect(), mysql.dialect(), sqlite.dialect()):
        for kw in ({}, {"compile_kwargs": {"literal_binds": True}}):
            with pytest.raises(UnsupportedQueryError) as info:
                stmt.compile(dialect=dialect, **kw)
            assert term not in str(info.value)
    assert term not in repr(stmt.whereclause)


def test_a_row_changed_elsewhere_is_found_by_its_new_value(env: SearchEnv) -> None:
    if env.engine.dialect.name in ("mysql", "mariadb"):
        pytest.skip("REPEATABLE READ: the session's snapshot does not see the change at all")
    (a,) = add(env, "acme", SrchUser(email="ann@example.com"))
    with tenant_context("acme"), env.Session() as s:
        # In this session's identity map (held, so the weak map keeps it), unexpired.
        held = s.scalars(select(SrchUser).where(SrchUser.email == "ann@example.com")).one()
        with env.Session.begin() as other:
            row = other.get(SrchUser, a)
            assert row is not None
            row.email = "anna@example.com"
        # The database matches the row by its new index value; the search refreshes the
        # objects it returns (populate_existing), so the check sees the value the database
        # holds and keeps the row, instead of dropping it as a collision.
        got = s.scalars(select(SrchUser).where(SrchUser.email == "anna@example.com")).all()
        assert [u.id for u in got] == [a]
        assert held.email == "anna@example.com"
        assert not s.scalars(select(SrchUser).where(SrchUser.email == "ann@example.com")).all()


@pytest.mark.parametrize("sync", ["auto", "fetch", False])
def test_orm_update_and_delete_where_on_an_exact_index(env: SearchEnv, sync: Any) -> None:
    from sqlalchemy import delete

    add(env, "acme", *(SrchUser(name=f"n{i}", note="x") for i in range(4)))
    add(env, "globex", SrchUser(name="n1", note="x"), SrchUser(name="n2", note="x"))
    opts = {"synchronize_session": sync}
    with tenant_context("acme"), env.Session() as s:
        held = s.scalars(select(SrchUser).where(SrchUser.tenant_id == "acme")).all()
        s.execute(
            update(SrchUser).where(SrchUser.name == "n1").values(note="hit"),
            **{"execution_options": opts},
        )
        if sync:
            assert sorted((u.name, u.note) for u in held)[1] == ("n1", "hit")
        r = s.execute(
            delete(SrchUser).where(SrchUser.name.in_(["n2", "n3"])), execution_options=opts
        )
        assert r.rowcount == 2  # type: ignore[attr-defined]
        s.commit()
    assert sorted(env.raw("select tenant_id, note from srch_users")) == [
        ("acme", "hit"),
        ("acme", "x"),
        ("globex", "x"),
        ("globex", "x"),
    ]
