"""Costs at scale (``python -m benchmarks --scale``): what grows with keys and tenants.

Each measurement runs on the key manager directly, with the in-process
:class:`~sqlalchemy_cmk.testing.FakeKeyProvider` (no database: these are the key manager's
costs, not the rows'), at 1,000 / 10,000 / 40,000 keys or tenants:

* ``cold_read_keys``: one ``read_keys`` of N distinct data keys, none cached (each unwrap is a
  real provider call on the key manager's KMS threads, without latency), and the worst wait of
  a cached lookup that another thread makes every millisecond meanwhile.
* ``wraps_100_tenants``: write keys for 100 tenants at once, 30 ms per KMS call, no
  verification unwrap (as the issue measured it): ``write_keys`` where the code has it, else
  one ``write_key`` after another.
* ``reload_past_capacity``: ``cache_max_entries=1000``; N tenants' keys loaded 4 times, the
  hits of each reload after the first; and a hot set of 500 keys, used twice, then a load of
  the N others, then the hot set again: how many of its 500 were still cached.
* ``forget_tenant``: the cache holding one key of each of N tenants, ``forget`` of 1,000 of
  them one by one: microseconds per tenant.
* ``create_and_drop``: 500 cycles of a CMK installed on a new ``sessionmaker`` that is then
  dropped (one write key cached each), ``gc.collect()``: CMKs still alive, traced memory growth.

With ``--compare-main`` the same measurements run again in a subprocess on the ``main``
branch's library (``git archive``), for a before/after. Nothing is asserted: the numbers go to
the terminal and, with ``--json``, to a file; ``docs/performance.md`` ("Scale") records them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import weakref
from collections.abc import Sequence
from typing import Any

from sqlalchemy_cmk import _format
from sqlalchemy_cmk._keys import CachePolicy, KeyManager, RetryPolicy
from sqlalchemy_cmk.registry import TenantKeys
from sqlalchemy_cmk.testing import FakeKeyProvider

SIZES = (1_000, 10_000, 40_000)


def _manager(
    fake: FakeKeyProvider, tenants: Sequence[str], max_entries: int, concurrency: int = 16
) -> KeyManager:
    return KeyManager(
        {"fake": fake},
        {t: TenantKeys(f"fake://{t}", frozenset({f"fake://{t}"})) for t in tenants},
        CachePolicy(600.0, max_entries),
        RetryPolicy(3, 0.0, 60.0, concurrency),
        [],
        verify_write_keys=False,
    )


def _envelopes(fake: FakeKeyProvider, tenants: Sequence[str]) -> list[bytes]:
    """One envelope per entry of ``tenants``, wrapped directly (the setup is not measured)."""
    return [
        _format.encode_envelope(
            t, "fake", f"fake://{t}", fake.wrap_key(f"fake://{t}", os.urandom(32), {"tenant": t})
        )
        for t in tenants
    ]


def cold_read_keys(n: int) -> dict[str, float]:
    fake = FakeKeyProvider()
    tenants = [f"t{i % 100}" for i in range(n)]
    envs = _envelopes(fake, tenants)
    km = _manager(fake, [*sorted(set(tenants)), "hot"], max_entries=n + 10)
    (hot,) = _envelopes(fake, ["hot"])
    km.read_keys([hot], None)
    waits: list[float] = []
    done = threading.Event()

    def lookups() -> None:
        while not done.is_set():
            started = time.perf_counter()
            km.read_keys([hot], None)
            waits.append(time.perf_counter() - started)
            time.sleep(0.001)

    other = threading.Thread(target=lookups)
    other.start()
    started = time.perf_counter()
    km.read_keys(envs, None)
    seconds = time.perf_counter() - started
    done.set()
    other.join()
    return {
        "keys": n,
        "seconds": round(seconds, 3),
        "cached_lookup_worst_ms": round(max(waits) * 1000, 2),
        "cached_lookup_median_ms": round(statistics.median(waits) * 1000, 3),
    }


def wraps_100_tenants() -> dict[str, float]:
    fake = FakeKeyProvider(latency=0.03)
    tenants = [f"t{i}" for i in range(100)]
    km = _manager(fake, tenants, max_entries=1000)
    started = time.perf_counter()
    if hasattr(km, "write_keys"):
        km.write_keys([(t, 1) for t in tenants], None)
    else:  # the code before write_keys: one wrap after another
        for t in tenants:
            km.write_key(t, 1, None)
    return {"tenants": 100, "kms_ms": 30, "seconds": round(time.perf_counter() - started, 3)}


def reload_past_capacity(n: int) -> dict[str, Any]:
    fake = FakeKeyProvider()
    tenants = [f"t{i}" for i in range(n)]
    hot_tenants = [f"h{i}" for i in range(500)]
    envs = _envelopes(fake, tenants)
    hot = _envelopes(fake, hot_tenants)
    km = _manager(fake, tenants + hot_tenants, max_entries=1000)
    hits: list[int] = []
    for i in range(4):
        fake.reset_counts()
        km.read_keys(envs, None)
        if i:
            hits.append(n - fake.unwrap_count)
    km = _manager(fake, tenants + hot_tenants, max_entries=1000)
    km.read_keys(hot, None)
    km.read_keys(hot, None)
    km.read_keys(envs, None)
    fake.reset_counts()
    km.read_keys(hot, None)
    return {
        "tenants": n,
        "capacity": 1000,
        "reload_hit_rate": round(statistics.mean(hits) / n, 3),
        "hot_set_kept_after_scan": 500 - fake.unwrap_count,
    }


def forget_tenant(n: int) -> dict[str, float]:
    fake = FakeKeyProvider()
    tenants = [f"t{i}" for i in range(n)]
    envs = _envelopes(fake, tenants)
    km = _manager(fake, tenants, max_entries=n + 10)
    km.read_keys(envs, None)
    started = time.perf_counter()
    for t in tenants[:1000]:
        km.forget(t)
    per = (time.perf_counter() - started) / 1000
    return {"tenants": n, "us_per_forget": round(per * 1e6, 1)}


def create_and_drop(cycles: int = 500) -> dict[str, float]:
    from sqlalchemy.orm import sessionmaker

    from sqlalchemy_cmk import CMK

    fake = FakeKeyProvider()
    alive: weakref.WeakSet[Any] = weakref.WeakSet()

    def cycle() -> None:
        cmk = CMK(fake, tenant_keys={"acme": "fake://acme"}, audit_sinks=[])
        cmk.install(sessionmaker())
        cmk._keys.write_key("acme", 1, None)
        alive.add(cmk)

    for _ in range(20):
        cycle()
    for _ in range(3):
        gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(cycles):
        cycle()
    for _ in range(3):
        gc.collect()
    growth = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return {"cycles": cycles, "cmks_alive": len(alive), "growth_kb": round(growth / 1024)}


def measure(sizes: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["cold_read_keys"] = [cold_read_keys(n) for n in sizes]
    out["wraps_100_tenants"] = statistics.median_low(
        [wraps_100_tenants()["seconds"] for _ in range(3)]
    )
    out["reload_past_capacity"] = [reload_past_capacity(n) for n in sizes]
    out["forget_tenant"] = [forget_tenant(n) for n in sizes]
    out["create_and_drop"] = create_and_drop()
    return out


def _on_main(sizes: Sequence[int]) -> dict[str, Any]:
    """The same measurements on the main branch's library, in a subprocess."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "-C", here, "archive", "main", "sqlalchemy_cmk"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tmp, here]))
        args = [sys.executable, "-m", "benchmarks.scale", "--raw", "--sizes"]
        done = subprocess.run(
            [*args, *map(str, sizes)],
            env=env,
            cwd=tmp,  # -m puts the working directory first on sys.path: main's library there
            check=True,
            capture_output=True,
            text=True,
        )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _print(label: str, r: dict[str, Any]) -> None:
    print(f"== {label}")
    for c in r["cold_read_keys"]:
        print(
            f"cold read_keys {c['keys']:>6}: {c['seconds']:7.2f} s; cached lookup meanwhile: "
            f"worst {c['cached_lookup_worst_ms']:8.1f} ms, median {c['cached_lookup_median_ms']} ms"
        )
    print(f"write keys of 100 tenants, 30 ms per wrap: {r['wraps_100_tenants']:.2f} s")
    for c in r["reload_past_capacity"]:
        print(
            f"reload {c['tenants']:>6} tenants, capacity {c['capacity']}: hit rate "
            f"{c['reload_hit_rate']:.1%}; hot set kept after a scan: "
            f"{c['hot_set_kept_after_scan']}/500"
        )
    for c in r["forget_tenant"]:
        print(f"forget_tenant at {c['tenants']:>6} tenants: {c['us_per_forget']} µs each")
    m = r["create_and_drop"]
    print(
        f"create-and-drop x{m['cycles']}: {m['cmks_alive']} CMKs alive, +{m['growth_kb']} KB traced"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks --scale", description=__doc__)
    parser.add_argument("--scale", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--compare-main", action="store_true", help="also run main's library")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)  # subprocess
    args = parser.parse_args(argv)
    import sqlalchemy_cmk

    print(f"library: {os.path.dirname(sqlalchemy_cmk.__file__)}", file=sys.stderr)
    now = measure(args.sizes)
    if args.raw:
        print(json.dumps(now))
        return 0
    results = {"this": now}
    if args.compare_main:
        results["main"] = _on_main(args.sizes)
        _print("main (before)", results["main"])
    _print("this tree", now)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
