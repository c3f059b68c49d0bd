"""Audit delivery costs (issue 12): ``python -m benchmarks --audit``.

* ``spool``: events recorded per second (each one on disk before ``record`` returns) from 1 and
  4 threads, with the shipper running and delivering them;
* the ORM variants ``cmk, audit shipped`` of ``python -m benchmarks`` (``orm_load``,
  ``orm_insert``): the same CMK with every event also spooled and shipped.

The destination is a ``discard`` kind registered here: it takes each batch and drops it, so the
numbers are the spool's and the shipper's own cost in this process. A real sink adds its network
time in the shipper's threads, not on the access path.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy_cmk import sinks
from sqlalchemy_cmk.audit import make_event
from sqlalchemy_cmk.context import TenantContext
from sqlalchemy_cmk.delivery import AuditDelivery, TenantAudit
from sqlalchemy_cmk.sinks import Record, SinkEnv

TARGET_EVENTS_PER_SECOND = 5000  # from 4 threads
TARGET_SHIPPED_LOAD = 1.10  # ORM load with shipping / without, at most


class DiscardSink:
    kind = "discard"
    max_batch = 500
    delivered = 0

    def send(self, records: Sequence[Record]) -> None:
        DiscardSink.delivered += len(records)

    def close(self) -> None:
        pass


def check(spec: Mapping[str, Any]) -> dict[str, Any]:
    return dict(spec)


def build(spec: Mapping[str, Any], env: SinkEnv) -> DiscardSink:
    return DiscardSink()


def register() -> None:
    sinks._KINDS["discard"] = (__name__, None)


def delivery(spool: str, tenants: Sequence[str]) -> AuditDelivery:
    register()
    audit = TenantAudit([{"kind": "discard"}])
    return AuditDelivery(spool, dict.fromkeys(tenants, audit))


def spool_rate(threads: int, per_thread: int) -> dict[str, Any]:
    """Events/s recorded from ``threads`` threads, each for its own tenant."""
    with tempfile.TemporaryDirectory(prefix="cmk-bench-spool-") as tmp:
        tenants = [f"tenant-{i}" for i in range(threads)]
        d = delivery(tmp, tenants)
        try:

            def work(tenant: str) -> None:
                ctx = TenantContext(tenant, actor="bench", request_id="r")
                for i in range(per_thread):
                    d.record(make_event(ctx, "decrypt", "ok", tenant, table="t", rows=i), ctx)

            d.record(make_event(None, "decrypt", "ok", tenants[0], table="t"), None)  # warm
            before = DiscardSink.delivered
            workers = [threading.Thread(target=work, args=(t,)) for t in tenants]
            started = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            recorded = time.perf_counter() - started
            ok = d.flush(120)
            shipped = time.perf_counter() - started
            delivered = DiscardSink.delivered - before
        finally:
            d.close()
    n = threads * per_thread
    return {
        "threads": threads,
        "events": n,
        "recorded_per_second": round(n / recorded),
        "delivered_per_second": round(delivered / shipped),
        "all_delivered": ok and delivered >= n,
    }


def per_request(n: int) -> dict[str, Any]:
    """A web request's worth: one row loaded by id, ``n`` times, with and without shipping.

    The access waits for its event's ``fdatasync``: this is where the spool's cost shows, not in
    the bulk ``orm_load`` of ``python -m benchmarks``.
    """
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from sqlalchemy_cmk import CMK, tenant_context
    from sqlalchemy_cmk.testing import FakeKeyProvider

    from ._models import Base, CmkNote

    out: dict[str, Any] = {"requests": n}
    with tempfile.TemporaryDirectory(prefix="cmk-bench-req-") as tmp:
        engine = create_engine(f"sqlite:///{tmp}/db.sqlite")
        Base.metadata.create_all(engine)
        fake = FakeKeyProvider()
        keys = {"acme": "fake://acme"}
        d = delivery(os.path.join(tmp, "spool"), ["acme"])
        variants = {
            "off": CMK(fake, tenant_keys=keys, audit_sinks=[]),
            "shipped": CMK(fake, tenant_keys=keys, audit_sinks=[], audit_delivery=d),
        }
        makers = {}
        for k, cmk in variants.items():
            makers[k] = sessionmaker(engine)
            cmk.install(makers[k])
        with tenant_context("acme", actor="bench"), makers["off"].begin() as s:
            s.add(CmkNote(id=1, tenant_id="acme", title="t", body="b"))
        try:
            for k in ("off", "shipped", "off", "shipped"):  # the second round is timed
                started = time.perf_counter()
                for _ in range(n):
                    with tenant_context("acme", actor="bench"), makers[k]() as s:
                        assert s.get(CmkNote, 1) is not None
                out[k + "_us"] = round((time.perf_counter() - started) / n * 1e6, 1)
        finally:
            d.close()
            engine.dispose()
    out["ratio"] = round(out["shipped_us"] / out["off_us"], 2)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks --audit")
    parser.add_argument("--audit", action="store_true")
    parser.add_argument("--events", type=int, default=5000, help="events per thread")
    parser.add_argument("--requests", type=int, default=500, help="one-row loads per variant")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    results = [spool_rate(1, args.events), spool_rate(4, args.events)]
    for r in results:
        print(
            f"spool, {r['threads']} thread(s): {r['recorded_per_second']:,} events/s recorded "
            f"(fdatasync'd), {r['delivered_per_second']:,}/s delivered, "
            f"all delivered: {r['all_delivered']}"
        )
    req = per_request(args.requests)
    print(
        f"one-row load per request: {req['off_us']:.0f} µs without delivery, "
        f"{req['shipped_us']:.0f} µs with ({req['ratio']:.2f}x): the access waits for its event's "
        "fdatasync"
    )
    four = results[1]["recorded_per_second"]
    verdict = "met" if four >= TARGET_EVENTS_PER_SECOND else "MISSED"
    print(f"target >= {TARGET_EVENTS_PER_SECOND:,} events/s from 4 threads: {verdict}")
    print("ORM load with shipping: see the 'cmk, audit shipped' rows of python -m benchmarks")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"spool": results, "per_request": req}, f, indent=2)
    return 0
