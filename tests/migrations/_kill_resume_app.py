"""The application and the migration runs of test_kill_resume.py, as separate processes.

Not a test module. Three roles share the model and the CMK defined here:

* ``python _kill_resume_app.py op SPEC`` runs one migration operation through the Python API
  (SPEC is JSON: op, url, schema, keyfile, keys, batch, latency). It prints ``ready``, then
  ``batch <rows done>`` after every committed batch, then ``report <json>``; the test SIGKILLs
  it at a random moment.
* ``python _kill_resume_app.py writer SPEC`` is the application: through the ORM, with the
  session hooks installed, it updates, inserts and deletes rows, checking every row it loads
  against its own record of what it last wrote (the ground truth). It pauses when the test asks
  (a file ``pause-<n>`` in its control directory), saving the ground truth to ``truth-<n>.json``
  and creating ``paused-<n>``; it stops on ``stop`` and prints its counts as JSON.
* ``sqlalchemy-cmk ... --app-dir <here> --cmk _kill_resume_app:cli_cmk`` imports
  :func:`cli_cmk`, configured by ``KR_KEYFILE``, ``KR_KEYS`` and ``KR_LATENCY``.

The table ``kr_rows`` holds both storages: ``a`` and ``b`` are text-storage columns that start as
plaintext (the dual-read window of an in-place encryption), ``c`` is a binary-storage
(default) column the application encrypts from the start, and ``c_plain`` receives ``c``'s
plaintext when ``decrypt_columns(into={"c": "c_plain"})`` runs; ``encrypt_columns(["c_plain"],
into={"c_plain": "c"})`` moves it back (the move into binary storage). The value of ``c`` the
application sees is ``c`` where it is not NULL, else ``c_plain``; it writes ``c`` and empties
``c_plain`` (the dual-read recipe of docs/migrations.md).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.orm.attributes import flag_modified

from sqlalchemy_cmk import CMK, EncryptedMixin, EncryptedType, tenant_context
from sqlalchemy_cmk.providers.local import LocalKeyProvider

TABLE = "kr_rows"
TENANTS = ("acme", "globex", "initech")
KEY_NAMES = [*TENANTS, *(f"{t}-v2" for t in TENANTS)]
TEXT_COLS = ("a", "b")

# A row of the ground truth: tenant, a, b, c (c as the application sees it).
Truth = dict[int, tuple[str, str | None, str | None, str | None]]


class Base(DeclarativeBase):
    pass


class Row(EncryptedMixin, Base):
    """The application's model during the migrations: dual-read on the text columns."""

    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(String(20))
    a: Mapped[str | None] = mapped_column(EncryptedType(Text, storage="text", allow_plaintext=True))
    b: Mapped[str | None] = mapped_column(EncryptedType(Text, storage="text", allow_plaintext=True))
    c: Mapped[str | None] = mapped_column(EncryptedType(Text))  # binary storage
    c_plain: Mapped[str | None] = mapped_column(Text)

    def seen(self) -> tuple[str, str | None, str | None, str | None]:
        """The row as the application reads it (``c`` falls back to its decrypted copy)."""
        return (self.tenant_id, self.a, self.b, self.c if self.c is not None else self.c_plain)


raw_metadata = MetaData()
raw_rows = Table(  # the same table without the types: what is stored, byte for byte
    TABLE,
    raw_metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("tenant_id", String(20)),
    Column("a", Text),
    Column("b", Text),
    Column("c", LargeBinary),
    Column("c_plain", Text),
    Column("cmk_edek", LargeBinary),
)

SAMPLES: list[str | None] = [
    "Ada Lovelace",
    "Zoë Ünïcødé 😀 — ∑ 漢字",
    "",
    None,
    "CMK:upper-case marker is plaintext",
    "line\nbreak\t'single' \"double\" \\ back",
    "long " * 300,
]


def value(rng: random.Random, tag: str) -> str | None:
    """A value the application writes: a sample made unique by ``tag`` (or NULL, or empty)."""
    s = rng.choice(SAMPLES)
    return s if not s else f"{s} {tag}"


class SlowProvider:
    """The local provider with a KMS round-trip's latency on every call, so that a batch spends
    its time inside its transaction and a kill lands there."""

    scheme = "local"

    def __init__(self, inner: LocalKeyProvider, latency: float) -> None:
        self.inner = inner
        self.latency = latency

    def wrap_key(self, key_ref: str, data_key: bytes, context: Mapping[str, str]) -> bytes:
        time.sleep(self.latency)
        return self.inner.wrap_key(key_ref, data_key, context)

    def unwrap_key(self, key_ref: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        time.sleep(self.latency)
        return self.inner.unwrap_key(key_ref, wrapped, context)


def tenant_keys(keys: str) -> dict[str, Any]:
    """``v1``: each tenant's first key; ``v1+v2``: the first primary, the second read too (an
    application that has not yet picked up the move); ``v2``: the second primary, the first
    still read; ``v2only``: the second key alone."""
    if keys == "v1":
        return {t: f"local://{t}" for t in TENANTS}
    if keys == "v2":
        return {t: [f"local://{t}-v2", f"local://{t}"] for t in TENANTS}
    if keys == "v1+v2":  # still sealing under the first key, already reading the second
        return {t: [f"local://{t}", f"local://{t}-v2"] for t in TENANTS}
    if keys == "v2only":
        return {t: f"local://{t}-v2" for t in TENANTS}
    raise ValueError(keys)


def make_cmk(keyfile: str, keys: str, latency: float = 0.0) -> CMK:
    provider: Any = LocalKeyProvider.from_file(keyfile)
    if latency:
        provider = SlowProvider(provider, latency)
    # A small write-key window: batches wrap often, so kills land during KMS calls too.
    return CMK(provider, tenant_keys=tenant_keys(keys), write_key_max_uses=7, audit_sinks=[])


def cli_cmk() -> CMK:
    """The CMK of the ``sqlalchemy-cmk`` runs (``--cmk _kill_resume_app:cli_cmk``)."""
    return make_cmk(
        os.environ["KR_KEYFILE"], os.environ["KR_KEYS"], float(os.environ.get("KR_LATENCY", "0"))
    )


def make_engine(url: str, schema: str | None) -> Engine:
    if schema:
        return create_engine(url, connect_args={"options": f"-csearch_path={schema}"})
    if url.startswith("sqlite"):
        return create_engine(url, connect_args={"timeout": 30})  # wait for the writer lock
    return create_engine(url)  # MariaDB: the URL names the test's own database


def read_all(engine: Engine, cmk: CMK) -> Truth:
    """Every row as the application sees it, tenant by tenant."""
    maker = sessionmaker(engine)
    cmk.install(maker)
    out: Truth = {}
    for t in TENANTS:
        with tenant_context(t), maker() as s:
            for r in s.scalars(select(Row).where(Row.tenant_id == t)):
                out[r.id] = r.seen()
    return out


# -- the migration operation ------------------------------------------------------------------


def run_op(spec: dict[str, Any]) -> None:
    from migrations_helpers import backfill
    from migrations_helpers.backfill import Progress

    engine = make_engine(spec["url"], spec.get("schema"))
    cmk = make_cmk(spec["keyfile"], spec["keys"], spec.get("latency", 0.0))
    print("ready", flush=True)

    def progress(p: Progress) -> None:
        print(f"batch {p.done}", flush=True)

    kw: dict[str, Any] = {"batch_size": spec["batch"], "progress": progress}
    op = spec["op"]
    if op == "encrypt":
        report = backfill.encrypt_columns(
            engine, cmk, TABLE, list(TEXT_COLS), tenant_column="tenant_id", **kw
        )
    elif op == "rotate":  # every encrypted column, found from the model
        report = backfill.rotate_data_keys(
            engine, cmk, TABLE, None, tenant_column="tenant_id", metadata=Base, **kw
        )
    elif op == "rewrap":
        report = backfill.rewrap_keys(engine, cmk, TABLE, **kw)
    elif op == "decrypt":  # both storages in one call: a and b in place, c into c_plain
        report = backfill.decrypt_columns(
            engine,
            cmk,
            TABLE,
            ["a", "b", "c"],
            tenant_column="tenant_id",
            metadata=Base,
            into={"c": "c_plain"},
            **kw,
        )
    elif op == "move":  # c_plain's plaintext into the binary column c, c_plain left NULL
        report = backfill.encrypt_columns(
            engine,
            cmk,
            TABLE,
            ["c_plain"],
            tenant_column="tenant_id",
            metadata=Base,
            into={"c_plain": "c"},
            **kw,
        )
    else:
        raise ValueError(op)
    doc = {"rows": report.rows, "conflicts": report.conflicts, "batches": report.batches}
    print("report " + json.dumps(doc), flush=True)
    engine.dispose()


# -- the application --------------------------------------------------------------------------


def run_writer(spec: dict[str, Any]) -> None:
    """Write until told to stop; see the module docstring."""
    control = Path(spec["control"])
    rng = random.Random(spec["seed"])
    engine = make_engine(spec["url"], spec.get("schema"))
    # The application keeps sealing under the first key throughout (as a process does for up
    # to cache_ttl after a move), so rewrap's rerun has rows the killed runs did not see.
    cmk = make_cmk(spec["keyfile"], "v1+v2")
    maker = sessionmaker(engine)
    cmk.install(maker)
    truth: Truth = {
        int(k): (v[0], v[1], v[2], v[3])
        for k, v in json.loads(Path(spec["truth"]).read_text()).items()
    }
    next_id = max(truth) + 1
    counts = {"updates": 0, "inserts": 0, "deletes": 0, "checked": 0}
    errors: list[str] = []
    phase = 0

    def save(name: str) -> None:
        tmp = control / (name + ".tmp")
        tmp.write_text(json.dumps({str(k): list(v) for k, v in truth.items()}))
        tmp.replace(control / name)

    print("ready", flush=True)
    while True:
        if (control / "stop").exists():
            save("truth-final.json")
            print(json.dumps({**counts, "errors": errors}), flush=True)
            engine.dispose()
            return
        if (control / f"pause-{phase}").exists():
            save(f"truth-{phase}.json")
            (control / f"paused-{phase}").touch()
            while (control / f"pause-{phase}").exists() and not (control / "stop").exists():
                time.sleep(0.01)
            phase += 1
            continue
        n = counts["updates"] + counts["inserts"] + counts["deletes"]
        roll = rng.random()
        try:
            if roll < 0.75 or len(truth) < 10:
                i = rng.choice(sorted(truth))
                t = truth[i][0]
                with tenant_context(t), maker() as s:
                    r = s.get(Row, i)
                    seen = r.seen() if r is not None else None
                    counts["checked"] += 1
                    if seen != truth[i]:
                        errors.append(f"row {i}: loaded {seen!r}, last written {truth[i]!r}")
                        break
                    assert r is not None
                    new = list(truth[i])
                    for k, name in ((1, "a"), (2, "b"), (3, "c")):
                        if rng.random() < 0.5:
                            new[k] = value(rng, f"w{n}")
                            setattr(r, name, new[k])
                            if name == "c":
                                # A write of c supersedes a copy in c_plain, and both columns
                                # go in the UPDATE whatever this session saw: a migration may
                                # have moved the value between them since the load, and an
                                # UPDATE of one column alone leaves the other's copy to be read
                                # back (found by this suite: decrypt into c_plain, then the
                                # move back into c, each with the application writing NULL).
                                r.c_plain = None
                                flag_modified(r, "c")
                                flag_modified(r, "c_plain")
                    s.commit()
                truth[i] = (t, new[1], new[2], new[3])
                counts["updates"] += 1
            elif roll < 0.93:
                i, t = next_id, rng.choice(TENANTS)
                next_id += 1
                row = (t, value(rng, f"i{i}"), value(rng, f"i{i}b"), value(rng, f"i{i}c"))
                with tenant_context(t), maker() as s:
                    s.add(Row(id=i, tenant_id=t, a=row[1], b=row[2], c=row[3]))
                    s.commit()
                truth[i] = row
                counts["inserts"] += 1
            else:
                i = rng.choice(sorted(truth))
                with engine.begin() as conn:
                    conn.execute(delete(raw_rows).where(raw_rows.c.id == i))
                del truth[i]
                counts["deletes"] += 1
        except Exception:  # the application must keep working through every migration
            errors.append(traceback.format_exc(limit=3))
            break
        time.sleep(spec.get("pause", 0.005))
    # An error: wait for the test to ask, and hand over what was seen.
    save("truth-final.json")
    print(json.dumps({**counts, "errors": errors}), flush=True)
    (control / "failed").touch()
    engine.dispose()


# -- the runner: migration processes without an interpreter start each ---------------------


def run_forks() -> None:
    """Read one JSON spec a line from stdin; for each, fork ``spec["count"]`` children that run
    the operation (``run_op``) with stdout and stderr in the files ``spec["outs"]``, print
    ``pids [...]``, wait for them and print ``exit [...]`` (their exit codes, -9 for SIGKILL).

    Forking from a process that has imported everything but opened nothing (no engine, no
    connection, no thread) starts a migration process in milliseconds instead of the second an
    interpreter takes on a shared 2-core machine, so the suite can afford many kills.
    """
    print("ready", flush=True)
    for line in sys.stdin:
        spec = json.loads(line)
        pids = []
        for out in spec["outs"]:
            pid = os.fork()
            if pid == 0:  # the migration process
                code = 1
                try:
                    for fd, path in ((1, out), (2, out + ".err")):
                        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                        os.dup2(target, fd)
                        os.close(target)
                    run_op(spec)
                    code = 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)  # nothing of the runner's state runs in the child
            pids.append(pid)
        print("pids " + json.dumps(pids), flush=True)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        print("exit " + json.dumps(codes), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "forks":
        import migrations_helpers.backfill  # noqa: F401  (imported once, before the forks)

        run_forks()
    else:
        role, spec_json = sys.argv[1:3]
        (run_op if role == "op" else run_writer)(json.loads(spec_json))
