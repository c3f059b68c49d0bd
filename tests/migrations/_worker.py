"""A backfill worker run as a subprocess by test_backfill.py (killed with SIGKILL, or run twice
at once). Not a test module.

Usage: python _worker.py URL SCHEMA KEYFILE BATCH LATENCY [GOFILE]

SCHEMA is "-" for none (SQLite). LATENCY is seconds each KMS wrap sleeps; with a small
``write_key_max_uses`` every batch wraps, so a batch spends its time inside its transaction.
Prints ``ready``, waits for GOFILE if given, prints ``batch <rows done>`` after every batch and
finally the report as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping

from sqlalchemy import create_engine

from migrations_helpers.backfill import Progress, encrypt_columns
from sqlalchemy_cmk import CMK
from sqlalchemy_cmk.providers.local import LocalKeyProvider

TENANTS = ("acme", "globex", "initech")


class SlowProvider:
    """The local provider with a KMS round-trip's latency on every wrap."""

    scheme = "local"

    def __init__(self, inner: LocalKeyProvider, latency: float) -> None:
        self.inner = inner
        self.latency = latency

    def wrap_key(self, key_ref: str, data_key: bytes, context: Mapping[str, str]) -> bytes:
        time.sleep(self.latency)
        return self.inner.wrap_key(key_ref, data_key, context)

    def unwrap_key(self, key_ref: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        return self.inner.unwrap_key(key_ref, wrapped, context)


def main() -> None:
    url, schema, keyfile, batch, latency = sys.argv[1:6]
    go = sys.argv[6] if len(sys.argv) > 6 else None
    args = {} if schema == "-" else {"options": f"-csearch_path={schema}"}
    engine = create_engine(url, connect_args=args)
    cmk = CMK(
        SlowProvider(LocalKeyProvider.from_file(keyfile), float(latency)),
        tenant_keys={t: f"local://{t}" for t in TENANTS},
        write_key_max_uses=4,
        audit_sinks=[],
    )
    print("ready", flush=True)
    while go is not None and not os.path.exists(go):
        time.sleep(0.01)

    def progress(p: Progress) -> None:
        print(f"batch {p.done}", flush=True)

    report = encrypt_columns(
        engine,
        cmk,
        "bf_people",
        ["name", "note"],
        tenant_column="tenant_id",
        batch_size=int(batch),
        progress=progress,
    )
    print(json.dumps({"rows": report.rows, "conflicts": report.conflicts}), flush=True)
    engine.dispose()


if __name__ == "__main__":
    main()
