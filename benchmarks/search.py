"""The search scenarios: a point lookup by a searchable column, and the index's cost on insert.

* ``search_lookup``: ``select(SearchUser).where(SearchUser.email == x)`` (an exact, unique,
  128-bit blind index) against ``select(PlainUser).where(PlainUser.tenant_id == t,
  PlainUser.email == x)`` on a plain column under a unique (tenant_id, email) index, the same
  rows in both tables (``--search-rows``, 100 tenants). Each lookup runs in a fresh session
  under its tenant's context; only ``session.scalars(stmt).one()`` is timed. A run is
  ``LOOKUPS`` lookups of random existing addresses; its value is the median lookup. Warm: the
  index state, root keys, index keys and data keys are cached by the untimed warm-up run (their
  TTLs, 5 s for the state and 60 s for keys, expire during the runs as they do in an
  application, and the reads that follow are inside the timings).
* ``search_insert``: the ORM insert of ``run.py`` (one session, ``add_all``, commit) of ``n``
  users, plain, encrypted, and encrypted with the blind index.
"""

from __future__ import annotations

import cProfile
import datetime
import gc
import io
import pstats
import random
import statistics
import time
from typing import Any, cast

from sqlalchemy import Engine, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_cmk import CMK, tenant_context
from sqlalchemy_cmk.search import STATES_TABLE
from sqlalchemy_cmk.testing import FakeKeyProvider

from ._models import Base, CmkUser, PlainUser, SearchUser, make_users
from .run import (
    TENANT,
    Result,
    Sample,
    Timing,
    Variant,
    _result,
    interleaved,
    run_insert,
    truncate,
)

TENANTS = 100
LOOKUPS = 2000  # per timed run
LOAD_BATCH = 10_000
TARGET_LOOKUP = 1.3  # searchable lookup / plain lookup, at most
TARGET_INDEX_INSERT = 1.15  # insert with the index / encrypted insert without it, at most


def _tenants() -> list[str]:
    return [f"tenant{i:03d}" for i in range(TENANTS)]


def _cmk(tenants: list[str]) -> tuple[CMK, FakeKeyProvider]:
    fake = FakeKeyProvider()  # no latency: the point is the ratio to plain columns
    return CMK(fake, tenant_keys={t: f"fake://{t}" for t in tenants}, audit_sinks=[]), fake


def _installed(engine: Engine, cmk: CMK) -> sessionmaker[Session]:
    sessions = sessionmaker(engine)
    cmk.install(sessions)
    return sessions


def mark_ready(engine: Engine) -> None:
    """Record the index as built (phase ready), as ``search build`` does after its walk: every
    row was written with its index value by the flush, so there is nothing to build."""
    states = Base.metadata.tables[STATES_TABLE]
    (ix,) = cast(Any, SearchUser.__table__.c.email.type).search  # an EncryptedType
    with engine.begin() as conn:
        conn.execute(states.delete())
        conn.execute(
            insert(states).values(
                domain=f"{SearchUser.__tablename__}.email_bidx",
                phase="ready",
                slot=0,
                version=1,
                bits=ix.width,
                fingerprint=ix.fingerprint,
                updated_at=datetime.datetime.now(datetime.timezone.utc),
            )
        )


def load_users(engine: Engine, sessions: sessionmaker[Session], rows: int) -> float:
    """``rows`` users of 100 tenants into both tables: plain through Core, searchable through
    the ORM's bulk insert (which encrypts and computes the index values), per tenant, in
    batches. Returns the seconds the searchable load took."""
    tenants = _tenants()
    truncate(engine, PlainUser)
    truncate(engine, SearchUser)
    users = make_users(rows, tenants)
    for start in range(0, rows, LOAD_BATCH * 4):
        with engine.begin() as conn:
            conn.execute(insert(PlainUser), users[start : start + LOAD_BATCH * 4])
    started = time.perf_counter()
    by_tenant: dict[str, list[dict[str, Any]]] = {t: [] for t in tenants}
    for u in users:
        by_tenant[u["tenant_id"]].append(u)
    for t, mine in by_tenant.items():
        with tenant_context(t, actor="benchmark"), sessions() as session:
            for start in range(0, len(mine), LOAD_BATCH):
                session.execute(insert(SearchUser), mine[start : start + LOAD_BATCH])
            session.commit()
    took = time.perf_counter() - started
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"VACUUM ANALYZE {PlainUser.__tablename__}"))
            conn.execute(text(f"VACUUM ANALYZE {SearchUser.__tablename__}"))
    return took


def run_lookups(
    v: Variant, targets: list[dict[str, Any]], profiler: cProfile.Profile | None = None
) -> Sample:
    """One lookup per target, each in a fresh session under its tenant; the sample's seconds
    are the median lookup (``session.scalars(stmt).one()``, nothing else)."""
    model = v.model
    gc.collect()
    times: list[float] = []
    for u in targets:
        if model is PlainUser:
            stmt = select(PlainUser).where(
                PlainUser.tenant_id == u["tenant_id"], PlainUser.email == u["email"]
            )
        else:
            stmt = select(model).where(model.email == u["email"])
        with tenant_context(u["tenant_id"], actor="benchmark"), v.sessions() as session:
            if profiler is not None:
                profiler.enable()
            started = time.perf_counter()
            found = session.scalars(stmt).one()
            times.append(time.perf_counter() - started)
            if profiler is not None:
                profiler.disable()
            if found.email != u["email"]:
                raise RuntimeError(f"{v.key}: looked up {u['email']!r}, found another row")
    return Sample(seconds=statistics.median(times))


def lookup_scenario(engine: Engine, db: str, rows: int, repeats: int) -> list[Result]:
    """Point lookups by e-mail: searchable (exact blind index) against plain indexed."""
    cmk, fake = _cmk(_tenants())
    sessions = _installed(engine, cmk)
    load_s = load_users(engine, sessions, rows)
    mark_ready(engine)
    cmk._search.forget()  # the state was cached as "building" while loading
    rng = random.Random(20261203)
    every = make_users(rows, _tenants())
    targets = [every[i] for i in rng.sample(range(rows), min(LOOKUPS, rows))]
    variants = {
        "plain": Variant(
            "plain",
            PlainUser,
            sessionmaker(engine),
            note="String email, unique index (tenant_id, email), no CMK",
        ),
        "cmk, blind index": Variant(
            "cmk, blind index",
            SearchUser,
            sessions,
            fake,
            note=f"BlindIndex(normalize='email', unique=True), 128 bits; loaded through "
            f"the ORM bulk insert in {load_s:.0f} s",
        ),
    }
    t = interleaved(list(variants), repeats, lambda k: run_lookups(variants[k], targets))
    return [
        _result(
            "search_lookup",
            variants[k],
            db,
            rows,
            t[k],
            t["plain"],
            note=f"{t[k].median * 1e6:.0f} us per lookup (min {min(t[k].samples) * 1e6:.0f}); "
            f"{variants[k].note}; median of {len(targets):,} lookups per run, {TENANTS} tenants",
        )
        for k in variants
    ]


def insert_scenario(engine: Engine, db: str, n: int, repeats: int) -> list[Result]:
    """ORM insert of ``n`` users: plain, encrypted, encrypted with the exact blind index."""
    cmk, fake = _cmk([TENANT])
    sessions = _installed(engine, cmk)
    variants = {
        "plain": Variant("plain", PlainUser, sessionmaker(engine), note="String email, no CMK"),
        "cmk": Variant("cmk", CmkUser, sessions, fake, note="EncryptedType(String(255))"),
        "cmk, blind index": Variant(
            "cmk, blind index",
            SearchUser,
            sessions,
            fake,
            note="EncryptedType(String(255), search=BlindIndex(normalize='email', unique=True))",
        ),
    }
    users = make_users(n, [TENANT])
    t: dict[str, Timing] = interleaved(
        list(variants), repeats, lambda k: run_insert(engine, variants[k], users)
    )
    out = [_result("search_insert", variants[k], db, n, t[k], t["plain"]) for k in variants]
    out[-1].note += f"; {t['cmk, blind index'].median / t['cmk'].median:.2f}x the encrypted insert"
    return out


def run_search(db: str, engine: Engine, n: int, repeats: int, rows: int) -> list[Result]:
    results = insert_scenario(engine, db, n, repeats)
    if rows:
        results += lookup_scenario(engine, db, rows, repeats)
    return results


def verdicts(results: list[Result]) -> list[str]:
    lines = []
    for db in dict.fromkeys(r.db for r in results):
        by = {r.name: r for r in results if r.db == db}
        ins, enc = by.get("search_insert/cmk, blind index"), by.get("search_insert/cmk")
        if ins is not None and enc is not None:
            added = ins.seconds / enc.seconds
            lines.append(
                f"- {db}: ORM insert with a blind index {added:.2f}x the encrypted insert "
                f"without one, {ins.ratio_vs_plain:.2f}x plain (target <= {TARGET_INDEX_INSERT}x):"
                f" {'MET' if added <= TARGET_INDEX_INSERT else 'MISSED'}"
            )
        look, plain = by.get("search_lookup/cmk, blind index"), by.get("search_lookup/plain")
        if look is not None and plain is not None:
            assert look.ratio_vs_plain is not None
            lines.append(
                f"- {db}: point lookup by a searchable column on {look.rows:,} rows of {TENANTS} "
                f"tenants: {look.seconds * 1e6:.0f} us against {plain.seconds * 1e6:.0f} us plain"
                f" = {look.ratio_vs_plain:.2f}x (target <= {TARGET_LOOKUP}x): "
                f"{'MET' if look.ratio_vs_plain <= TARGET_LOOKUP else 'MISSED'}"
            )
    return lines


def profile_lookup(engine: Engine, rows: int, top: int) -> str:
    """cProfile of the searchable lookups (3 runs of ``LOOKUPS``, after a warm-up run)."""
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    cmk, fake = _cmk(_tenants())
    sessions = _installed(engine, cmk)
    load_users(engine, sessions, rows)
    mark_ready(engine)
    cmk._search.forget()
    rng = random.Random(20261203)
    every = make_users(rows, _tenants())
    targets = [every[i] for i in rng.sample(range(rows), min(LOOKUPS, rows))]
    v = Variant("cmk, blind index", SearchUser, sessions, fake)
    run_lookups(v, targets)
    prof = cProfile.Profile()
    for _ in range(3):
        run_lookups(v, targets, profiler=prof)
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).sort_stats("cumulative")
    out.write(f"== searchable lookup x{3 * len(targets):,}, {engine.dialect.name}, by cumtime ==\n")
    stats.print_stats(top)
    out.write("== the same, sorted by tottime ==\n")
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()
