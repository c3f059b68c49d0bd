"""Generate tests/unit/golden_v2.json, the stored-format vectors of format version 2 (leased
keys). Run ONCE, like make_golden.py: the vectors are committed and tests only read them; the
script refuses to overwrite the file unless given ``--force`` (before the format's release only).

The stack rows are written under the same master key, tenant and table as golden_v1.json's, so
that one table can hold rows of both versions (test_golden_v2.py loads them together).

    .venv/bin/python tests/unit/make_golden_v2.py
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from make_golden import COLUMNS, TYPES, b64, to_json  # type: ignore[import-not-found]
from sqlalchemy import Integer, create_engine, text
from sqlalchemy.orm import DeclarativeBase, mapped_column, sessionmaker

from sqlalchemy_cmk import CMK, EncryptedMixin, EncryptedType, _codecs, _format, tenant_context
from sqlalchemy_cmk.providers.local import LocalKeyProvider

OUT = Path(__file__).with_name("golden_v2.json")
V1 = json.loads(Path(__file__).with_name("golden_v1.json").read_text(encoding="utf-8"))


def deterministic_rng() -> Any:
    counter = 0

    def rng(n: int) -> bytes:
        nonlocal counter
        counter += 1
        return hashlib.shake_256(b"sqlalchemy-cmk golden v2 %d" % counter).digest(n)

    return rng


def format_vector() -> dict[str, Any]:
    lease_key, dek = bytes(range(32, 64)), bytes(range(32))
    nonce, row_id = bytes(range(120, 132)), bytes(range(200, 216))
    wrapped = bytes(range(61))  # the KMS's wrap of the lease key: opaque here
    lease_envelope = _format.encode_envelope("acme", "local", "local://acme", wrapped)
    local = _format.wrap_local(AESGCM(lease_key), nonce, "acme", dek)
    envelope = _format.encode_leased(lease_envelope, local)
    return {
        "lease_key": lease_key.hex(),
        "dek": dek.hex(),
        "nonce": nonce.hex(),
        "row_id": row_id.hex(),
        "tenant": "acme",
        "lease_envelope": lease_envelope.hex(),
        "local_wrap": local.hex(),
        "envelope": envelope.hex(),
        "companion": _format.encode_companion(row_id, envelope).hex(),
    }


def stack_vector() -> dict[str, Any]:
    """Three rows through the public ORM path with leases on: two write windows, one lease."""
    master = base64.b64decode(V1["stack"]["master_keys"]["golden"])
    now = [100.0]
    cmk = CMK(
        LocalKeyProvider({"golden": master}),
        tenant_keys={"acme": "local://golden"},
        audit_sinks=[],
        lease_period=60.0,
        write_key_max_age=1.0,
        clock=lambda: now[0],
    )
    cmk._keys.rng = deterministic_rng()  # the rng seam: reproducible keys, row ids and nonces

    class Base(DeclarativeBase):
        pass

    attrs: dict[str, Any] = {
        "__tablename__": "patients",
        "id": mapped_column(Integer, primary_key=True),
    }
    attrs.update({name: mapped_column(EncryptedType(TYPES[t])) for name, t, _, _ in COLUMNS})
    patient = type("Patient", (EncryptedMixin, Base), attrs)
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    sessions = sessionmaker(engine)
    cmk.install(sessions)
    values = {name: value for name, _, _, value in COLUMNS}
    with tenant_context("acme", actor="golden-generator"):
        with sessions() as s:
            s.add_all([patient(id=2, **values), patient(id=3, **values)])
            s.commit()
        now[0] += 2.0  # a second write window: a new data key under the same lease
        with sessions() as s:
            s.add(patient(id=4, **values))
            s.commit()
    names = ["id", "cmk_edek"] + [name for name, _, _, _ in COLUMNS]
    with engine.connect() as conn:
        raw = conn.execute(text(f"SELECT {', '.join(names)} FROM patients ORDER BY id")).all()
    return {
        "tenant": "acme",
        "key_ref": "local://golden",
        "table": "patients",
        "columns": [
            {"name": name, "type": t, "kind": kind, "plaintext": to_json(kind, value)}
            for name, t, kind, value in COLUMNS
        ],
        "rows": [
            {
                "id": r[0],
                "companion": b64(bytes(r[1])),
                "ciphertexts": {
                    name: b64(bytes(ct)) for (name, _, _, _), ct in zip(COLUMNS, r[2:], strict=True)
                },
            }
            for r in raw
        ],
        "encoded": {
            name: _codecs.encode(
                _codecs.codec_for(TYPES[t]), value, table="patients", column=name
            ).hex()
            for name, t, _, value in COLUMNS
        },
    }


def main() -> None:
    if OUT.exists() and "--force" not in sys.argv:
        sys.exit(f"{OUT} exists; golden vectors are never regenerated (see module docstring)")
    doc = {
        "comment": (
            "sqlalchemy-cmk stored format v2 (leased keys) vectors, generated once by "
            "make_golden_v2.py. Never regenerate: tests prove that data written in this format "
            "still decrypts. The stack rows use golden_v1.json's master key."
        ),
        "format": format_vector(),
        "stack": stack_vector(),
    }
    OUT.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
