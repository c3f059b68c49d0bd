"""Golden vectors of stored format v2, leased keys (golden_v2.json, generated once by
make_golden_v2.py). If a test here fails, a change has broken the reading of data written with
``lease_period`` set: fix the change, never the vectors.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Column, Integer, LargeBinary, MetaData, Table, create_engine, insert, select
from sqlalchemy.orm import DeclarativeBase, mapped_column, sessionmaker

from sqlalchemy_cmk import (
    CMK,
    DecryptionError,
    EncryptedMixin,
    EncryptedType,
    tenant_context,
)
from sqlalchemy_cmk import _format as fmt
from sqlalchemy_cmk.providers.local import LocalKeyProvider

from .test_golden import TYPES, expected

HERE = Path(__file__).parent
V1 = json.loads((HERE / "golden_v1.json").read_text(encoding="utf-8"))["stack"]
GOLDEN = json.loads((HERE / "golden_v2.json").read_text(encoding="utf-8"))
F, S = GOLDEN["format"], GOLDEN["stack"]


def b64(text: str) -> bytes:
    return base64.b64decode(text)


class Counting(LocalKeyProvider):
    unwraps = 0

    def unwrap_key(self, key_ref: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        self.unwraps += 1
        return super().unwrap_key(key_ref, wrapped, context)


def golden_cmk(**kwargs: Any) -> tuple[CMK, Counting]:
    kms = Counting({n: b64(k) for n, k in V1["master_keys"].items()})
    return CMK(kms, tenant_keys={S["tenant"]: S["key_ref"]}, audit_sinks=[], **kwargs), kms


class Base(DeclarativeBase):
    pass


Patient: Any = type(
    "Patient",
    (EncryptedMixin, Base),
    {
        "__tablename__": "patients",
        "id": mapped_column(Integer, primary_key=True),
        **{c["name"]: mapped_column(EncryptedType(TYPES[c["type"]])) for c in S["columns"]},
    },
)


def test_local_wrap_and_envelope_give_the_committed_bytes() -> None:
    lease = AESGCM(bytes.fromhex(F["lease_key"]))
    local = fmt.wrap_local(lease, bytes.fromhex(F["nonce"]), F["tenant"], bytes.fromhex(F["dek"]))
    assert local.hex() == F["local_wrap"]
    envelope = fmt.encode_leased(bytes.fromhex(F["lease_envelope"]), local)
    assert envelope.hex() == F["envelope"]
    companion = fmt.encode_companion(bytes.fromhex(F["row_id"]), envelope)
    assert companion.hex() == F["companion"]
    assert fmt.split_companion(companion) == (bytes.fromhex(F["row_id"]), envelope)
    assert fmt.split_leased(envelope) == (bytes.fromhex(F["lease_envelope"]), local)
    assert fmt.unwrap_local(lease, F["tenant"], local).hex() == F["dek"]
    assert fmt.parse_envelope(envelope).key_ref == "local://acme"


def test_committed_bytes_follow_the_documented_layout() -> None:
    companion = bytes.fromhex(F["companion"])
    lease_env = bytes.fromhex(F["lease_envelope"])
    assert companion[0] == 2
    assert companion[1:17].hex() == F["row_id"]
    assert companion[17:19] == b"\x00\x00"
    assert struct.unpack(">H", companion[19:21])[0] == len(lease_env)
    assert companion[21 : 21 + len(lease_env)] == lease_env
    rest = companion[21 + len(lease_env) :]
    assert rest[:12].hex() == F["nonce"] and len(rest) == 12 + 32 + 16
    aad = b"sqlalchemy-cmk/lease-dek\x02" + struct.pack(">H", 4) + b"acme"
    dek = AESGCM(bytes.fromhex(F["lease_key"])).decrypt(rest[:12], rest[12:], aad)
    assert dek.hex() == F["dek"]


def test_the_local_wrap_binds_the_tenant() -> None:
    lease = AESGCM(bytes.fromhex(F["lease_key"]))
    with pytest.raises(DecryptionError):
        fmt.unwrap_local(lease, "globex", bytes.fromhex(F["local_wrap"]))


@pytest.mark.parametrize("lease_period", [None, 60.0])
def test_committed_v1_and_v2_rows_load_together_in_one_table(lease_period: float | None) -> None:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    rows: list[dict[str, Any]] = [
        {"id": 1, "cmk_edek": b64(V1["companion"])}
        | {c["name"]: b64(c["ciphertext"]) for c in V1["columns"]}
    ]
    for r in S["rows"]:
        rows.append({"id": r["id"], "cmk_edek": b64(r["companion"])})
        rows[-1].update({k: b64(v) for k, v in r["ciphertexts"].items()})
    raw = Table(  # the stored bytes, written as they are
        "patients",
        MetaData(),
        *[Column(n, Integer if n == "id" else LargeBinary) for n in rows[0]],
    )
    with engine.begin() as conn:
        conn.execute(insert(raw), rows)
    cmk, kms = golden_cmk(lease_period=lease_period)
    sessions = sessionmaker(engine)
    cmk.install(sessions)
    versions = [r["cmk_edek"][0] for r in rows]
    assert versions == [1, 2, 2, 2]
    envelopes = {r["cmk_edek"][17:] for r in rows[1:]}
    assert len(envelopes) == 2  # two write windows
    assert len({fmt.split_leased(e)[0] for e in envelopes}) == 1  # one lease
    with tenant_context(S["tenant"], actor="golden-test"), sessions() as s:
        loaded = s.scalars(select(Patient).order_by(Patient.id)).all()
        assert [p.id for p in loaded] == [1, 2, 3, 4]
        for p in loaded:
            for c in S["columns"]:
                want = expected(c["kind"], c["plaintext"])
                got = getattr(p, c["name"])
                assert got == want and type(got) is type(want), (p.id, c["name"])
    assert kms.unwraps == 2  # the v1 data key and the lease: not one per v2 data key
    engine.dispose()


def test_a_committed_v2_row_moved_into_a_v1_companion_fails() -> None:
    r = S["rows"][0]
    companion = b64(r["companion"])
    with pytest.raises(DecryptionError):
        fmt.split_companion(b"\x01" + companion[1:])
    with pytest.raises(DecryptionError):
        fmt.split_companion(b"\x02" + b64(V1["companion"])[1:])
