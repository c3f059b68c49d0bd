"""Blind index re-index throughput: rows per second of one worker building, then rotating, an
index over rows that exist (``python -m benchmarks.search_reindex --url URL --rows 100000``).

Method: a fresh table (``bench_sr_people``, dropped first) of ``rows`` rows over 4 tenants, each
with an encrypted e-mail (a unique exact index) written by a model without ``search=``, so the
index is empty; then one ``build_index`` (every row: decrypt, HMAC, compare-and-swap) and one
``rotate_index`` (every row: decrypt, HMAC of the new version, compare-and-swap), timed without
the settle waits (``settle=0``, nothing else runs) and with the KMS of
:class:`~sqlalchemy_cmk.testing.FakeKeyProvider` (no latency: data keys are unwrapped once per
envelope and cached, as in a real run). The rate is rows written by the walk / seconds of the
walk, one worker (one process, one connection).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from sqlalchemy import String, create_engine, insert
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from migrations_helpers import search_index
from sqlalchemy_cmk import CMK, EncryptedMixin, EncryptedType, tenant_column, tenant_context
from sqlalchemy_cmk.search import BlindIndex, search_tables
from sqlalchemy_cmk.testing import FakeKeyProvider

TABLE = "bench_sr_people"
TENANTS = ("t0", "t1", "t2", "t3")


class _PlainBase(DeclarativeBase):
    pass


class _Plain(EncryptedMixin, _PlainBase):
    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = tenant_column(String(40))
    email: Mapped[str | None] = mapped_column(EncryptedType(String(255)), nullable=True)


class Base(DeclarativeBase):
    pass


class Person(EncryptedMixin, Base):
    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = tenant_column(String(40))
    email: Mapped[str | None] = mapped_column(
        EncryptedType(String(255), search=BlindIndex(normalize="email", unique=True)),
        nullable=True,
    )


search_tables(Base.metadata)


def run(url: str, rows: int, batch_size: int) -> dict[str, Any]:
    engine = create_engine(url)
    # The run's own tables: the root keys of cmk_tenant_keys are wrapped by this run's fake KMS.
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    cmk = CMK(FakeKeyProvider(), tenant_keys={t: f"fake://{t}" for t in TENANTS})
    factory = sessionmaker(engine)
    cmk.install(factory)
    started = time.perf_counter()
    per = rows // len(TENANTS)
    for t in TENANTS:
        with tenant_context(t), factory.begin() as s:
            for lo in range(0, per, 5000):
                s.execute(
                    insert(_Plain),
                    [{"email": f"user{i}@{t}.example"} for i in range(lo, min(per, lo + 5000))],
                )
    seeded = time.perf_counter() - started
    out: dict[str, Any] = {"rows": per * len(TENANTS), "seed_seconds": round(seeded, 1)}
    index = f"{TABLE}.email_bidx"
    for name, call in (
        ("build", search_index.build_index),
        ("rotate", search_index.rotate_index),
    ):
        t0 = time.perf_counter()
        report = call(engine, cmk, Base.metadata, index, batch_size=batch_size, settle=0)
        seconds = time.perf_counter() - t0
        out[name] = {
            "rows": report.rows,
            "seconds": round(seconds, 2),
            "rows_per_second": round(report.rows / seconds),
            "phase": report.phase,
        }
    t0 = time.perf_counter()
    check = search_index.verify_index(engine, cmk, Base.metadata, index, batch_size=batch_size)
    out["verify"] = {
        "checked": check.checked,
        "clean": check.clean,
        "rows_per_second": round(check.checked / (time.perf_counter() - t0)),
    }
    Base.metadata.drop_all(engine)
    engine.dispose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/bench_search_reindex",
        help="a database of its own: the run drops and creates its tables, cmk_* included",
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()
    print(json.dumps(run(args.url, args.rows, args.batch_size), indent=2))


if __name__ == "__main__":
    main()
