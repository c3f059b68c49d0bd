"""An attacker with write access to the database against the search tables (issue 10).

What each tampering does, on SQLite, PostgreSQL and MariaDB: it must fail closed (a typed
error) or, at worst, make searches miss rows; it must never return a row whose value does not
match, another tenant's row, or let the database alone decide a statement on a narrowed index.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text, update

from sqlalchemy_cmk import tenant_context
from sqlalchemy_cmk.errors import (
    CMKError,
    ConfigurationError,
    DecryptionError,
    TenantMismatchError,
    UnsupportedQueryError,
)

from .search_models import SearchEnv, SrchUser, make_search_env


@pytest.fixture
def env(engine: Engine) -> SearchEnv:
    env = make_search_env(engine)
    for tenant in ("acme", "globex"):
        with tenant_context(tenant), env.Session.begin() as s:
            s.add_all(
                [
                    SrchUser(email="ann@x", name="n1", note=tenant),
                    SrchUser(email="bob@x", name="n2", note=tenant),
                ]
            )
    return env


def tamper(env: SearchEnv, sql: str, **params: Any) -> None:
    with env.engine.begin() as conn:
        conn.execute(text(sql), params)
    env.cmk._search.forget()


def fresh(env: SearchEnv) -> SearchEnv:
    """Another process: nothing cached, the same database and KMS."""
    other = make_search_env(env.engine, ready=False)
    other.kms._keys = env.kms._keys
    return other


def found(env: SearchEnv, tenant: str, cond: Any) -> list[tuple[str, str | None]]:
    with tenant_context(tenant), env.Session() as s:
        return sorted((u.tenant_id, u.name) for u in s.scalars(select(SrchUser).where(cond)))


def count(env: SearchEnv, tenant: str, cond: Any) -> int | None:
    with tenant_context(tenant), env.Session() as s:
        return s.scalar(select(func.count()).select_from(SrchUser).where(cond))


def envelope(env: SearchEnv, tenant: str) -> bytes:
    (row,) = env.raw("select envelope from cmk_tenant_keys where tenant = :t", t=tenant)
    return bytes(row[0])


def test_another_tenants_root_key_is_refused(env: SearchEnv) -> None:
    """acme's root-key envelope replaced by globex's: acme would compute its index values with
    globex's key (globex's KMS unwraps it), so equal values of the two tenants would get equal
    index values. Refused, for searches and writes, in this process and a fresh one."""
    tamper(
        env,
        "update cmk_tenant_keys set envelope = :e where tenant = 'acme'",
        e=envelope(env, "globex"),
    )
    env.cmk.forget_tenant()
    for e in (env, fresh(env)):
        with pytest.raises(TenantMismatchError):
            found(e, "acme", SrchUser.name == "n1")
        with pytest.raises(TenantMismatchError):
            count(e, "acme", SrchUser.name == "n1")
        with tenant_context("acme"), e.Session() as s:
            s.add(SrchUser(email="carl@x"))
            with pytest.raises(TenantMismatchError):
                s.flush()
    assert found(env, "globex", SrchUser.name == "n1") == [("globex", "n1")]
    assert env.raw("select count(*) from srch_users where email_bidx is null") == [(0,)]


def test_forged_root_key_owner_is_refused(env: SearchEnv) -> None:
    """globex's wrapped root key re-labelled as acme's: the key reference is not one of acme's
    configured keys, so the key manager refuses it before any KMS call."""
    from sqlalchemy_cmk._format import encode_envelope, parse_envelope
    from sqlalchemy_cmk.errors import TenantNotConfiguredError

    g = parse_envelope(envelope(env, "globex"))
    forged = encode_envelope("acme", g.provider, g.key_ref, g.wrapped)
    tamper(env, "update cmk_tenant_keys set envelope = :e where tenant = 'acme'", e=forged)
    env.cmk.forget_tenant()
    with pytest.raises(TenantNotConfiguredError):
        found(env, "acme", SrchUser.name == "n1")


def test_a_data_key_as_root_key_fails_closed(env: SearchEnv) -> None:
    """One of acme's row data keys put in place of its root key: acme's KMS unwraps it, but
    it is not the key whose check value is stored with the row, so searches and writes are
    refused (typed) instead of indexing and searching under it, in this process and a fresh
    one; the other tenant is untouched."""
    from sqlalchemy_cmk._format import is_leased, split_companion, split_leased

    (edek,) = env.raw(
        "select cmk_edek from srch_users where tenant_id = 'acme' and name_bidx "
        "is not null order by id"
    )[0]
    envelope = split_companion(bytes(edek))[1]
    swap = "update cmk_tenant_keys set envelope = :e where tenant = 'acme'"
    if is_leased(envelope):  # SQLALCHEMY_CMK_TEST_LEASE=1: the rows are version 2
        tamper(env, swap, e=envelope)
        env.cmk.forget_tenant()
        with pytest.raises(DecryptionError, match="malformed"):  # before any KMS call
            found(fresh(env), "acme", SrchUser.name == "n1")
        # Its lease envelope is wrapped by the KMS as a root key is: it gets as far as the
        # check value, and its key (cached apart from the lease's entry) serves nothing.
        envelope = split_leased(envelope)[0]
    tamper(env, swap, e=envelope)
    env.cmk.forget_tenant()
    for e in (env, fresh(env)):
        with pytest.raises(DecryptionError, match="check value"):
            found(e, "acme", SrchUser.name == "n1")
        with tenant_context("acme"), e.Session() as s:
            s.add(SrchUser(email="carl@x", name="n9"))
            with pytest.raises(DecryptionError):
                s.flush()
    assert found(env, "globex", SrchUser.name == "n1") == [("globex", "n1")]


def test_a_root_key_the_kms_unwraps_differently_fails_closed(env: SearchEnv) -> None:
    """The stored check value altered (as if the KMS had answered another key): refused."""
    tamper(env, "update cmk_tenant_keys set check_value = :c where tenant = 'acme'", c=b"\0" * 32)
    env.cmk.forget_tenant()
    with pytest.raises(DecryptionError, match="check value"):
        found(fresh(env), "acme", SrchUser.name == "n1")


def test_garbage_root_key_fails_closed(env: SearchEnv) -> None:
    tamper(env, "update cmk_tenant_keys set envelope = :e where tenant = 'acme'", e=b"\x00" * 40)
    with pytest.raises(CMKError):
        found(fresh(env), "acme", SrchUser.name == "n1")


def test_deleted_root_key_misses_rows(env: SearchEnv) -> None:
    """Without its root key a tenant has no index values: searches find nothing (no error,
    no row), and the next write makes a new root key, under which old rows are not found."""
    tamper(env, "delete from cmk_tenant_keys where tenant = 'acme'")
    assert found(fresh(env), "acme", SrchUser.name == "n1") == []
    assert found(env, "globex", SrchUser.name == "n1") == [("globex", "n1")]


def test_copied_index_values_never_return_a_wrong_row(env: SearchEnv) -> None:
    (a1, a2, _g1, g2) = [r[0] for r in env.raw("select id from srch_users order by id")]
    # Within a tenant: row 2 now carries row 1's index value; the search drops it.
    tamper(
        env,
        "update srch_users set name_bidx = (select name_bidx from srch_users where id = :a) "
        "where id = :b",
        a=a1,
        b=a2,
    )
    assert found(env, "acme", SrchUser.name == "n1") == [("acme", "n1")]
    assert found(env, "acme", SrchUser.name == "n2") == []  # missed: its value was overwritten
    # On an exact index the database decides a COUNT alone: the copy is counted.
    assert count(env, "acme", SrchUser.name == "n1") == 2
    # Across tenants: globex's row with acme's index value is never found by either.
    tamper(
        env,
        "update srch_users set name_bidx = (select name_bidx from srch_users where id = :a) "
        "where id = :g",
        a=a1,
        g=g2,
    )
    assert found(env, "globex", SrchUser.name == "n1") == [("globex", "n1")]
    assert found(env, "acme", SrchUser.name == "n1") == [("acme", "n1")]
    # Moved into acme's tenant as well: its data key still names globex, so loading refuses.
    tamper(env, "update srch_users set tenant_id = 'acme' where id = :g", g=g2)
    with pytest.raises(TenantMismatchError):
        found(env, "acme", SrchUser.name == "n1")


@pytest.mark.parametrize(
    "change",
    [
        "phase = 'bogus'",
        "slot = 2",
        "slot = -1",
        "bits = 0",
        "bits = 999",
        "version = 0",
        "phase = 'rotating'",  # rotating without the other version and width
    ],
)
def test_a_malformed_state_fails_closed(env: SearchEnv, change: str) -> None:
    tamper(env, f"update cmk_search_indexes set {change} where domain = 'srch_users.name_bidx'")
    with pytest.raises(ConfigurationError):
        found(env, "acme", SrchUser.name == "n1")
    with tenant_context("acme"), env.Session() as s:
        s.add(SrchUser(name="n3"))
        with pytest.raises(ConfigurationError):
            s.flush()


def test_a_narrowed_state_is_not_exact(env: SearchEnv) -> None:
    """The state says 8 bits for an index declared exact (128): the database may no longer
    decide a statement from the index alone. Searches that filter after decryption still work
    (and miss the rows written at 128 bits); COUNT, !=, UPDATE ... WHERE are refused."""
    tamper(env, "update cmk_search_indexes set bits = 8 where domain = 'srch_users.name_bidx'")
    with tenant_context("acme"), env.Session.begin() as s:
        s.add_all([SrchUser(name=f"m{i}") for i in range(40)])  # written at 8 bits
    assert found(env, "acme", SrchUser.name == "m7") == [("acme", "m7")]
    with pytest.raises(UnsupportedQueryError):
        count(env, "acme", SrchUser.name == "m7")
    with tenant_context("acme"), env.Session() as s, pytest.raises(UnsupportedQueryError):
        s.execute(update(SrchUser).where(SrchUser.name == "m7").values(note="hit"))
    with tenant_context("acme"), env.Session() as s, pytest.raises(UnsupportedQueryError):
        s.scalars(select(SrchUser.id).where(SrchUser.name != "m7")).all()


def test_flipped_phases(env: SearchEnv) -> None:
    """building: refused; switched to an empty slot: misses (no wrong row); a changed
    fingerprint: refused."""
    from sqlalchemy_cmk.errors import IndexNotReadyError

    tamper(env, "update cmk_search_indexes set phase = 'building' where domain = 'srch.email'")
    with pytest.raises(IndexNotReadyError):
        found(env, "acme", SrchUser.email == "ann@x")
    tamper(
        env,
        "update cmk_search_indexes set phase = 'switched', slot = 1, version = 2, "
        "other_version = 1, other_bits = 128 where domain = 'srch.email'",
    )
    assert found(env, "acme", SrchUser.email == "ann@x") == []
    tamper(
        env,
        "update cmk_search_indexes set phase = 'ready', slot = 0, version = 1, "
        "other_version = null, other_bits = null, fingerprint = 'normalize=;transform=' "
        "where domain = 'srch.email'",
    )
    with pytest.raises(ConfigurationError):
        found(env, "acme", SrchUser.email == "ann@x")
