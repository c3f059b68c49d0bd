"""Golden vectors of the audit event (``sqlalchemy-cmk.audit/1``) and of the spool frame
(version 1): a change to either is a new version, never a silent edit (tenants' SIEMs parse the
first; spools written by an older release must still ship)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sqlalchemy_cmk import _spool
from sqlalchemy_cmk.audit import AuditEvent
from sqlalchemy_cmk.context import TenantContext
from sqlalchemy_cmk.delivery import event_body, verify_chain

GOLDEN = json.loads((Path(__file__).parent / "golden_audit_v1.json").read_text())


def test_event_body_is_pinned() -> None:
    e = GOLDEN["event"]
    event = AuditEvent(
        **{**e, "columns": tuple(e["columns"])},
        actor="user-42",
        data_label="PHI",
        source_ip="203.0.113.7",
        object_id="patient/17",
        request_id="req-9f2c",
        extra={"app": "billing"},
    )
    ctx = TenantContext(**GOLDEN["context"])
    body = event_body(event, ctx, "acme", GOLDEN["id"], (GOLDEN["writer"], 1, GOLDEN["prev"]))
    assert body.decode() == GOLDEN["body"]
    assert hashlib.sha256(body).hexdigest() == GOLDEN["body_sha256"]
    assert verify_chain([body]) == {("acme", GOLDEN["writer"]): 1}


def test_spool_frame_is_pinned_and_read_back(tmp_path: Path) -> None:
    body = GOLDEN["body"].encode()
    assert _spool.frame("acme", body).hex() == GOLDEN["frame_hex"]
    seg = tmp_path / _spool.segment_name(1)
    # A frame, then a torn one (a crash mid-write): the reader yields the whole one only.
    seg.write_bytes(
        bytes.fromhex(GOLDEN["frame_hex"]) * 2 + bytes.fromhex(GOLDEN["frame_hex"])[:40]
    )
    frames = list(_spool.read_frames(str(seg)))
    assert [(t, b) for _, _, t, b in frames] == [("acme", body), ("acme", body)]
    # A flipped bit in the body: the frame and everything after it are not read.
    data = bytearray(bytes.fromhex(GOLDEN["frame_hex"]) * 2)
    data[60] ^= 1
    seg.write_bytes(bytes(data))
    assert list(_spool.read_frames(str(seg))) == []
