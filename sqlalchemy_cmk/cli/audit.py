"""``sqlalchemy-cmk audit ...``: the audit spool seen by an operator.

    audit status [--tenant T] [--max-lag SECONDS] [--json]   backlog, last delivery, failures;
                                                             exit 1 past --max-lag (a probe)
    audit tail --tenant T [-n N] [--follow]                  the tenant's latest events (JSON)
    audit verify [--tenant T]                                the hash chains in the spool
    audit replay --tenant T --cmk module:attr [--since TIME] [--until TIME] [--destination NAME]
                                                             send a range again, with progress

All take ``--spool DIR`` (default ``$SQLALCHEMY_CMK_AUDIT_SPOOL``). Only ``replay`` needs the
application's CMK (``--cmk``): it sends through the destinations and network policy of its
``audit_delivery``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
import time
from typing import Any, TextIO

from .._cmk import load_cmk
from ..delivery import pruned_writers, spool_events, spool_status, verify_chain
from ._common import EXIT_FAILED, UsageError, _print_table, _printable
from ._progress import _ProgressView

SPOOL_ENV = "SQLALCHEMY_CMK_AUDIT_SPOOL"


def add_parsers(commands: Any, as_json: argparse.ArgumentParser) -> None:
    audit = commands.add_parser(
        "audit", help="the audit spool: status, tail, verify, replay (docs/audit.md)"
    )
    sub = audit.add_subparsers(dest="audit_command", required=True, metavar="AUDIT_COMMAND")
    spool = argparse.ArgumentParser(add_help=False)
    spool.add_argument("--spool", default=os.environ.get(SPOOL_ENV), help=f"default ${SPOOL_ENV}")

    status = sub.add_parser("status", parents=[spool, as_json], help="backlog and deliveries")
    status.add_argument("--tenant")
    status.add_argument(
        "--max-lag",
        type=float,
        help="exit 1 when an undelivered event is older than this many seconds (a probe)",
    )
    tail = sub.add_parser("tail", parents=[spool], help="a tenant's latest events, as JSON lines")
    tail.add_argument("--tenant", required=True)
    tail.add_argument("-n", type=int, default=20, help="how many (default 20)")
    tail.add_argument("--follow", action="store_true", help="keep printing new events")
    verify = sub.add_parser("verify", parents=[spool, as_json], help="check the hash chains")
    verify.add_argument("--tenant")
    replay = sub.add_parser("replay", parents=[spool, as_json], help="send a range again")
    replay.add_argument("--tenant", required=True)
    replay.add_argument("--cmk", required=True, help="module:attribute of the application's CMK")
    replay.add_argument("--since", help="ISO 8601 time (inclusive); default: the oldest kept")
    replay.add_argument("--until", help="ISO 8601 time (exclusive); default: now")
    replay.add_argument("--destination", help="one destination by name; default: all")
    replay.add_argument("--no-progress", action="store_true")
    replay.add_argument("--progress-every", type=float, default=5.0)


def _time_ns(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    try:
        t = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{what} must be an ISO 8601 time, like 2026-12-03T16:00:00Z") from None
    if t.tzinfo is None:
        raise UsageError(f"{what} needs a time zone (Z or +HH:MM)")
    return int(t.timestamp() * 1e9)


def run_audit(args: argparse.Namespace, out: TextIO) -> int:
    if not args.spool:
        raise UsageError(f"no spool: give --spool DIR or set ${SPOOL_ENV}")
    cmd = args.audit_command
    if cmd == "status":
        return _status(args, out)
    if cmd == "tail":
        return _tail(args, out)
    if cmd == "verify":
        return _verify(args, out)
    return _replay(args, out)


def _status(args: argparse.Namespace, out: TextIO) -> int:
    rows = [r for r in spool_status(args.spool) if args.tenant in (None, r["tenant"])]
    late = [
        r
        for r in rows
        if args.max_lag is not None
        and r["oldest_undelivered_seconds"] is not None
        and r["oldest_undelivered_seconds"] > args.max_lag
    ]
    if args.json:
        out.write(json.dumps({"destinations": rows, "late": len(late)}, indent=2) + "\n")
    else:
        _print_table(
            [
                "tenant",
                "destination",
                "backlog",
                "oldest",
                "delivered",
                "last delivery",
                "failures",
                "last error",
                "writer",
            ],
            [
                [
                    _printable(r["tenant"]),
                    _printable(r["destination"] or "(not shipped yet)"),
                    str(r["backlog"]),
                    "-"
                    if r["oldest_undelivered_seconds"] is None
                    else f"{r['oldest_undelivered_seconds']:.0f}s",
                    str(r["delivered"]),
                    "-"
                    if not r["delivered_at"]
                    else datetime.datetime.fromtimestamp(r["delivered_at"], datetime.UTC).isoformat(
                        timespec="seconds"
                    ),
                    str(r["failures"]),
                    _printable((r["last_error"] or "-")[:80]),
                    _printable(r["writer"]) + ("" if r["writer_alive"] else " (exited)"),
                ]
                for r in rows
            ],
            out,
        )
    return EXIT_FAILED if late else 0


def _tail(args: argparse.Namespace, out: TextIO) -> int:
    # Where each writer was read to, not the ids seen: following a busy spool for days must
    # not grow, nor read the whole spool again every second.
    cursors: dict[str, tuple[int, int]] = {}
    last: collections.deque[bytes] = collections.deque(maxlen=max(args.n, 0))
    for _, rec in spool_events(args.spool, args.tenant, cursors=cursors):
        last.append(rec.body)
    for body in last:
        out.write(body.decode() + "\n")
    out.flush()
    while args.follow:
        time.sleep(1.0)
        for _, rec in spool_events(args.spool, args.tenant, cursors=cursors):
            out.write(rec.body.decode() + "\n")
        out.flush()
    return 0


def _verify(args: argparse.Namespace, out: TextIO) -> int:
    # Listed first: a segment pruned after it would otherwise look like a tampered head.
    pruned = pruned_writers(args.spool)
    read = [(writer, rec.body) for writer, rec in spool_events(args.spool, args.tenant)]
    bodies = [body for _, body in read]
    # And after: those pruned or compacted meanwhile, or removed once delivered.
    pruned |= pruned_writers(args.spool, read={writer for writer, _ in read})
    counts = verify_chain(bodies, pruned=pruned)  # ChainError: one line, exit 1
    if args.json:
        out.write(
            json.dumps([{"tenant": t, "writer": w, "events": n} for (t, w), n in counts.items()])
            + "\n"
        )
    else:
        for (t, w), n in sorted(counts.items()):
            out.write(f"{_printable(t)}: {n} events from writer {_printable(w)}: chain intact\n")
    return 0


def _replay(args: argparse.Namespace, out: TextIO) -> int:
    cmk = load_cmk(args.cmk)
    delivery = cmk.audit_delivery
    if delivery is None:
        raise UsageError(f"{args.cmk} has no audit_delivery: nothing to replay through")
    since, until = _time_ns(args.since, "--since"), _time_ns(args.until, "--until")
    total = sum(1 for _ in spool_events(args.spool, args.tenant, since_ns=since, until_ns=until))
    view = _ProgressView(
        f"replay {args.tenant}",
        sys.stderr,
        enabled=not args.no_progress,
        every=max(0.0, args.progress_every),
    )
    try:
        sent = delivery.replay(
            args.tenant,
            since_ns=since,
            until_ns=until,
            destination=args.destination,
            progress=lambda n: view.update(n, total),
        )
    finally:
        view.close()
    if args.json:
        out.write(json.dumps({"tenant": args.tenant, "sent": sent}) + "\n")
    else:
        out.write(f"replayed {sent} event(s) of {_printable(args.tenant)}\n")
    return 0
