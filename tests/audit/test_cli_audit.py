"""``sqlalchemy-cmk audit status|tail|verify|replay`` on a real spool."""

from __future__ import annotations

import datetime
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from sqlalchemy_cmk import _spool
from sqlalchemy_cmk.audit import make_event
from sqlalchemy_cmk.cli import main
from sqlalchemy_cmk.context import TenantContext
from sqlalchemy_cmk.delivery import AuditDelivery, TenantAudit
from tests.audit.memory_kind import Receiver

SIEM = {"kind": "memory", "receiver": "a", "name": "siem"}


def record(delivery: AuditDelivery, n: int, start: int = 0) -> None:
    ctx = TenantContext("acme", actor="ops")
    for i in range(start, start + n):
        delivery.record(make_event(ctx, "decrypt", "ok", "acme", table="t", rows=i), ctx)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def spool(tmp_path: Path, memory_kind: dict[str, Receiver]) -> str:
    """A spool holding 10 undelivered events of acme (its SIEM down), the shipper stopped."""
    memory_kind["a"] = Receiver(down=True)
    audits = {"acme": TenantAudit([SIEM])}
    d = AuditDelivery(tmp_path / "spool", audits, poll=0.01, max_backoff=0.05)
    record(d, 10)
    d.flush(0.5)  # tries, and fails: the state records failures
    d.close()
    return str(tmp_path / "spool")


def test_status_shows_the_backlog_and_fails_as_a_probe(
    spool: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "audit", "status", "--spool", spool, "--json")
    assert code == 0
    (row,) = json.loads(out)["destinations"]
    assert (row["tenant"], row["destination"], row["backlog"]) == ("acme", "siem", 10)
    assert row["failures"] > 0 and "down" in row["last_error"]
    assert row["writer_alive"] is False
    code, _, _ = run(capsys, "audit", "status", "--spool", spool, "--max-lag", "0")
    assert code == 1
    code, out, _ = run(capsys, "audit", "status", "--spool", spool)
    assert "siem" in out and "(exited)" in out


def test_tail_prints_the_latest_events(spool: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "audit", "tail", "--spool", spool, "--tenant", "acme", "-n", "3")
    assert code == 0
    rows = [json.loads(line)["resources"][0]["data"]["rows"] for line in out.splitlines()]
    assert rows == [7, 8, 9]


def test_following_reads_only_what_is_new(tmp_path: Path, memory_kind: dict[str, Receiver]) -> None:
    """``tail --follow`` kept every event id it had printed and read the whole spool again each
    second. It now keeps where each writer was read to: new events once each, across a
    segment roll, a frame read while half written, a second writer and one removed."""
    from sqlalchemy_cmk.delivery import spool_events

    memory_kind["a"] = Receiver(down=True)
    audits = {"acme": TenantAudit([SIEM]), "other": TenantAudit([SIEM])}
    root = tmp_path / "spool"
    d = AuditDelivery(root, audits, start=False, segment_bytes=3000)

    def rows(cursors: dict[str, tuple[int, int]]) -> list[int]:
        got = spool_events(root, "acme", cursors=cursors)
        return [json.loads(r.body)["resources"][0]["data"]["rows"] for _, r in got]

    cursors: dict[str, tuple[int, int]] = {}
    record(d, 3)
    assert rows(cursors) == [0, 1, 2]
    assert rows(cursors) == []
    record(d, 20, start=3)  # several segments of 3,000 bytes
    ctx = TenantContext("other", actor="ops")
    d.record(make_event(ctx, "decrypt", "ok", "other", table="t"), ctx)
    assert rows(cursors) == list(range(3, 23))
    assert d._writer is not None
    w = d._writer
    seg = os.path.join(w.dir, _spool.segment_name(w.position.segment))
    whole = _spool.frame("acme", b"{}")
    with open(seg, "r+b") as f:  # a frame caught half written: not read, not skipped
        f.seek(w.position.offset)
        f.write(whole[:5])
    assert rows(cursors) == []
    record(d, 1, start=23)  # written over the half frame, as the writer would
    assert rows(cursors) == [23]
    second = AuditDelivery(root, audits, start=False)
    record(second, 2, start=100)
    assert rows(cursors) == [100, 101]
    assert len(cursors) == 2
    second.close()
    for name in os.listdir(root):
        if name.startswith("w-") and os.path.join(root, name) != w.dir:
            for f in os.listdir(root / name):
                os.unlink(root / name / f)
            os.rmdir(root / name)
    assert rows(cursors) == [] and len(cursors) == 1  # a removed writer is forgotten
    d.close()


def test_tail_follow_prints_each_new_event_once(
    spool: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy_cmk.cli import audit as cli_audit

    d = AuditDelivery(spool, {"acme": TenantAudit([SIEM])}, start=False)
    ticks = iter([lambda: record(d, 2, start=10), lambda: None, lambda: record(d, 1, start=12)])

    def sleep(_: float) -> None:
        step = next(ticks, None)
        if step is None:
            raise KeyboardInterrupt  # the operator's ^C
        step()

    monkeypatch.setattr(cli_audit.time, "sleep", sleep)
    main(["audit", "tail", "--spool", spool, "--tenant", "acme", "-n", "2", "--follow"])
    d.close()
    out = capsys.readouterr().out
    assert [json.loads(line)["resources"][0]["data"]["rows"] for line in out.splitlines()] == [
        8,
        9,
        10,
        11,
        12,
    ]


def test_verify_finds_an_edited_event(spool: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "audit", "verify", "--spool", spool)
    assert code == 0 and "10 events" in out
    # An attacker with the disk edits event 5's row count and fixes the frame's CRC.
    (wdir,) = [os.path.join(spool, n) for n in os.listdir(spool) if n.startswith("w-")]
    seg = os.path.join(wdir, _spool.segment_name(_spool.segments(wdir)[0]))
    frames = list(_spool.read_frames(seg))
    data = b""
    for i, (_, _, tenant, body) in enumerate(frames):
        if i == 4:
            body = body.replace(b'"rows":4', b'"rows":0')
        data += _spool.frame(tenant, body)
    Path(seg).write_bytes(data)
    code, _, err = run(capsys, "audit", "verify", "--spool", spool)
    assert code == 1 and "ChainError" in err and "changed" in err


def test_replay_sends_a_range_again(
    spool: str,
    tmp_path: Path,
    memory_kind: dict[str, Receiver],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    memory_kind["a"] = Receiver()
    app = tmp_path / "app"
    app.mkdir()
    (app / "cmk_app.py").write_text(
        textwrap.dedent(
            f"""
            from sqlalchemy_cmk import CMK
            from sqlalchemy_cmk.delivery import AuditDelivery, TenantAudit
            from sqlalchemy_cmk.testing import FakeKeyProvider

            cmk = CMK(
                FakeKeyProvider(),
                tenant_keys={{"acme": "fake://acme"}},
                audit_delivery=AuditDelivery(
                    {spool!r},
                    {{"acme": TenantAudit([{SIEM!r}])}},
                    start=False,
                ),
            )
            """
        )
    )
    monkeypatch.syspath_prepend(str(app))
    monkeypatch.delitem(sys.modules, "cmk_app", raising=False)
    code, out, err = run(
        capsys, "audit", "replay", "--spool", spool, "--tenant", "acme", "--cmk", "cmk_app:cmk"
    )
    assert code == 0, err
    assert "replayed 10 event(s)" in out
    assert [
        json.loads(r.body)["resources"][0]["data"]["rows"] for r in memory_kind["a"].records
    ] == list(range(10))
    # A range: nothing is older than now, so --until now-1h sends nothing.
    past = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)).isoformat()
    code, out, _ = run(
        capsys,
        "audit",
        "replay",
        "--spool",
        spool,
        "--tenant",
        "acme",
        "--cmk",
        "cmk_app:cmk",
        "--until",
        past,
        "--json",
    )
    assert code == 0 and json.loads(out)["sent"] == 0
    code, _, err = run(
        capsys,
        "audit",
        "replay",
        "--spool",
        spool,
        "--tenant",
        "acme",
        "--cmk",
        "cmk_app:cmk",
        "--since",
        "yesterday",
    )
    assert code == 2 and "ISO 8601" in err


def test_no_spool_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SQLALCHEMY_CMK_AUDIT_SPOOL", raising=False)
    code, _, err = run(capsys, "audit", "status")
    assert code == 2 and "--spool" in err


def test_verify_after_retention_pruned_the_oldest_segments(
    tmp_path: Path, memory_kind: dict[str, Receiver], capsys: pytest.CaptureFixture[str]
) -> None:
    """Past retention, a writer's first segments are deleted, so what the spool holds of a chain
    starts at some seq > 1. ``audit verify`` reported that as a gap (exit 1) on every spool old
    enough to have pruned, a false alarm on the tamper check; an edit or a gap after the first
    event present is still found."""
    audits = {"acme": TenantAudit([SIEM])}
    spool = tmp_path / "spool"
    d = AuditDelivery(spool, audits, poll=0.005, retention=0, segment_bytes=600)
    record(d, 30)
    assert d.flush(15)
    memory_kind["a"].down = True
    record(d, 30, start=30)  # undelivered: kept
    d.close()
    (wdir,) = [p for p in spool.iterdir() if p.name.startswith("w-")]
    assert _spool.segments(str(wdir))[0] > 1  # the oldest were pruned
    code, out, err = run(capsys, "audit", "verify", "--spool", str(spool))
    assert code == 0 and "chain intact" in out, err
    # A segment deleted in the middle is still a gap.
    segs = _spool.segments(str(wdir))
    assert len(segs) >= 3
    os.unlink(wdir / _spool.segment_name(segs[1]))
    code, _, err = run(capsys, "audit", "verify", "--spool", str(spool))
    assert code == 1 and "missing" in err
