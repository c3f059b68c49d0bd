"""Where an encrypted load's time goes, stage by stage (``python -m benchmarks.stages``).

Each stage is the full ORM load of ``--rows`` rows, every attribute touched, with one more part
of the library switched on than the stage before: the encrypted model without hooks (binary
columns wrapped in ``EncryptedValue``, the companion column), the hooks with ``CMK.open`` a
no-op, then ``CMK.open`` with its decrypt loop (``CMK._open``) a no-op (tenant checks, key
lookups), then everything. The ``floor`` (a hand-written AES-GCM type, see ``_models``) and
AES-GCM alone over the same values are measured beside them. The stages are interleaved, their
order rotated every round; medians and minimums of ``--repeat`` rounds. Stubbing a stage leaves
ciphertext in the objects: this is a measurement, never a way to run the library.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from sqlalchemy_cmk import CMK, tenant_context
from sqlalchemy_cmk._cmk import CMK as _CMK
from sqlalchemy_cmk.testing import FakeKeyProvider

from . import run
from ._models import Base, CmkNote, FloorNote, PlainNote, make_rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stages", description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--no-gc", action="store_true", help="collector off while timing")
    args = parser.parse_args(argv)
    n, keep_gc = args.rows, not args.no_gc
    engines = (
        run.sqlite_engine()
        if args.db == "sqlite"
        else run.postgresql_engine(os.environ.get(run.PG_ENV, run.LOCAL_PG))
    )
    with engines as engine:
        Base.metadata.create_all(engine)
        cmk = CMK(FakeKeyProvider(), tenant_keys={run.TENANT: "fake://acme"}, audit_sinks=[])
        installed = sessionmaker(engine)
        cmk.install(installed)
        bare = sessionmaker(engine)
        rows = make_rows(n, [run.TENANT])
        for model, sessions in ((PlainNote, bare), (CmkNote, installed), (FloorNote, bare)):
            with tenant_context(run.TENANT), sessions() as s:
                s.add_all([model(**r) for r in rows])
                s.commit()

        def load(model: type[Any], sessions: sessionmaker[Any], stub: str | None = None) -> float:
            gc.collect()
            if not keep_gc:
                gc.disable()
            patch = (
                mock.patch.object(_CMK, stub, lambda *a, **k: None)
                if stub
                else contextlib.nullcontext()
            )
            try:
                with tenant_context(run.TENANT), sessions() as s, patch:
                    started = time.perf_counter()
                    for o in s.scalars(select(model)).all():
                        o.title, o.body  # noqa: B018 - touch every attribute
                    return time.perf_counter() - started
            finally:
                gc.enable()

        stages: dict[str, Callable[[], float]] = {
            "plain": lambda: load(PlainNote, bare),
            "floor (hand-written AES-GCM type)": lambda: load(FloorNote, bare),
            "encrypted model, no hooks (EncryptedValue, companion column)": lambda: load(
                CmkNote, bare
            ),
            "+ hooks (load events, decrypt_states), CMK.open a no-op": lambda: load(
                CmkNote, installed, "open"
            ),
            "+ CMK.open's scan, tenant checks, key lookups; _open a no-op": lambda: load(
                CmkNote, installed, "_open"
            ),
            "+ _open (AES-GCM, AAD, codec decode, attribute set, audit event): all": lambda: load(
                CmkNote, installed
            ),
        }
        for f in stages.values():
            f()
        times: dict[str, list[float]] = {k: [] for k in stages}
        for i in range(args.repeat):
            keys = list(stages)
            for k in keys[i % len(keys) :] + keys[: i % len(keys)]:
                times[k].append(stages[k]())
        aead = AESGCM(AESGCM.generate_key(bit_length=256))
        nonce, aad = os.urandom(12), b"a" * 60
        cts = [aead.encrypt(nonce, r[c].encode(), aad) for r in rows for c in ("title", "body")]
        cipher: list[float] = []
        for _ in range(args.repeat):
            gc.collect()
            started = time.perf_counter()
            for ct in cts:
                aead.decrypt(nonce, ct, aad)
            cipher.append(time.perf_counter() - started)

    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    print(f"## {args.db}, gc {'on' if keep_gc else 'off'}, {n:,} rows, {args.repeat} rounds\n")
    print(
        "| stage | median ms | µs/row over plain | µs/row over the stage before | min ms "
        "| min: µs/row over plain |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    prev = None
    for k in stages:
        step = (
            ""
            if prev is None or k.startswith("floor")
            else f"{(med[k] - med[prev]) / n * 1e6:+.2f}"
        )
        print(
            f"| {k} | {med[k] * 1e3:.1f} | {(med[k] - med['plain']) / n * 1e6:.2f} | {step} "
            f"| {low[k] * 1e3:.1f} | {(low[k] - low['plain']) / n * 1e6:.2f} |"
        )
        if not k.startswith("floor"):
            prev = k
    print(
        f"| AES-GCM alone, {2 * n:,} decrypts | {statistics.median(cipher) * 1e3:.1f} "
        f"| {statistics.median(cipher) / n * 1e6:.2f} | | {min(cipher) * 1e3:.1f} "
        f"| {min(cipher) / n * 1e6:.2f} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
