"""Kill and resume: every migration operation SIGKILLed at random moments, then run again.

For each operation (``encrypt_columns`` on text storage; ``rotate_data_keys``, ``rewrap_keys``
and ``decrypt_columns`` on text and binary storage at once; ``encrypt_columns(into=)`` moving
the decrypted text column back into binary storage), on SQLite, PostgreSQL and MariaDB, with
one worker process and (PostgreSQL, MariaDB) two: the operation runs in subprocesses that are
SIGKILLed at random moments while the application (another process, see
``_kill_resume_app.py``) updates,
inserts and deletes rows through the ORM with the session hooks installed, and checks every row
it loads against what it last wrote. Then the application pauses, the operation runs again to
completion (exit 0), and the test checks what an operator would: every row the application
wrote is there, no other; each decrypts to exactly what the application last wrote (a value
encrypted twice would read back as ``cmk:...``); ``verify`` is clean; no plaintext is left where
the column must be encrypted, no ciphertext where it must not; rotated rows have fresh data
keys, rewrapped rows the new key; the exit statuses. ``encrypt-column`` also runs through the
``sqlalchemy-cmk`` command with two workers, killed as a whole or one worker at a time.

The kill moments come from a seeded random generator; the seed is printed and is part of every
failure message. Replay with ``SQLALCHEMY_CMK_KILL_SEED=<seed>`` (timing still varies).

The short form (the default, for CI) does one round with two kill attempts per operation on a
small table. The long form, ``SQLALCHEMY_CMK_KILL_RUNS=N``, does N rounds per test with more
kills and a bigger table; ``SQLALCHEMY_CMK_KILL_LOG=path`` appends one JSON line per round.
The binary column ``c`` starts encrypted by the application; it reaches binary storage through
``encrypt_columns`` only in the last step, the move of ``c_plain`` (where decrypt put it) back.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, bindparam, select, text, update
from sqlalchemy.orm import sessionmaker

from migrations_helpers import backfill
from sqlalchemy_cmk import tenant_context
from sqlalchemy_cmk._format import parse_envelope
from sqlalchemy_cmk.providers.local import LocalKeyProvider

from ._kill_resume_app import (
    KEY_NAMES,
    TABLE,
    TENANTS,
    Base,
    Row,
    Truth,
    make_cmk,
    raw_rows,
    read_all,
    value,
)

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
APP = str(HERE / "_kill_resume_app.py")
CLI = str(Path(sys.executable).parent / "sqlalchemy-cmk")

RUNS = int(os.environ.get("SQLALCHEMY_CMK_KILL_RUNS") or 0)
LONG = RUNS > 0
ROUNDS = RUNS if LONG else 1
ROWS = 1500 if LONG else 150
KILLS = 4 if LONG else 2  # kill attempts per operation and round
BATCH = 25 if LONG else 8
LATENCY = 0.002  # seconds per KMS call of the migration: batches last long enough to be hit
SEED = int(os.environ.get("SQLALCHEMY_CMK_KILL_SEED") or random.SystemRandom().randrange(2**32))
SPLIT = 17  # companion = version | row id | envelope


@dataclass
class Tally:
    """What a test did, for its failure messages and the long form's log."""

    seed: int
    kills: int = 0  # runs that died by SIGKILL (one worker of the CLI counts once)
    finished_early: int = 0  # runs that ended before their kill moment (exit 0 checked)
    reruns: int = 0
    rows: int = 0  # rows in the table at the end of the rounds
    writes: int = 0  # application writes (updates, inserts, deletes)
    ops: dict[str, int] = field(default_factory=dict)  # kills by operation

    def __str__(self) -> str:
        return (
            f"seed={self.seed} kills={self.kills} early={self.finished_early} "
            f"reruns={self.reruns} rows={self.rows} writes={self.writes} by_op={self.ops}"
        )


class Proc:
    """One subprocess with its output in files (a pipe nobody reads could block it)."""

    def __init__(
        self, argv: list[str], out: Path, env: dict[str, str], group: bool, stdin: bool = False
    ) -> None:
        self.out, self.err = out.with_suffix(".out"), out.with_suffix(".err")
        with self.out.open("w") as o, self.err.open("w") as e:
            self.p = subprocess.Popen(
                argv,
                stdout=o,
                stderr=e,
                stdin=subprocess.PIPE if stdin else None,
                env=env,
                start_new_session=group,
                text=True,
            )
        self.started = time.monotonic()
        self.group = group
        self.seen = 0

    def text(self) -> str:
        return self.out.read_text()

    def line(self, prefix: str, timeout: float = 60) -> str:
        """The rest of the next output line starting with ``prefix`` (lines are read once)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.text().splitlines(keepends=True)
            for k in range(self.seen, len(lines)):
                if lines[k].endswith("\n") and lines[k].startswith(prefix):
                    self.seen = k + 1
                    return lines[k][len(prefix) :].strip()
            assert self.p.poll() is None, f"exited {self.p.returncode}: {self.err.read_text()}"
            assert time.monotonic() < deadline, f"no {prefix!r} line"
            time.sleep(0.002)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.text().startswith("ready"):
            assert self.p.poll() is None, f"exited {self.p.returncode}: {self.err.read_text()}"
            assert time.monotonic() < deadline, "no 'ready' line"
            time.sleep(0.005)

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise

    def kill_all(self) -> None:
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if self.group:
                    os.killpg(self.p.pid, signal.SIGKILL)
                else:
                    self.p.kill()
            self.p.wait()


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def schema_of(engine: Engine) -> str | None:
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as conn:
        return str(conn.execute(text("SELECT current_schema()")).scalar_one())


def raw(engine: Engine) -> dict[int, tuple[Any, ...]]:
    with engine.connect() as conn:
        return {
            r.id: (
                r.tenant_id,
                r.a,
                r.b,
                None if r.c is None else bytes(r.c),
                r.c_plain,
                None if r.cmk_edek is None else bytes(r.cmk_edek),
            )
            for r in conn.execute(select(raw_rows))
        }


def seed_rows(engine: Engine, keyfile: Path, rng: random.Random) -> Truth:
    """A fresh table: ``a`` and ``b`` plaintext, ``c`` encrypted by the application."""
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    truth: Truth = {}
    for i in range(ROWS):
        t = TENANTS[i % len(TENANTS)]
        truth[i] = (t, value(rng, f"#{i}a"), value(rng, f"#{i}b"), value(rng, f"#{i}c"))
    maker = sessionmaker(engine)
    make_cmk(str(keyfile), "v1").install(maker)
    for t in TENANTS:
        with tenant_context(t), maker() as s:
            s.add_all(Row(id=i, tenant_id=t, c=r[3]) for i, r in truth.items() if r[0] == t)
            s.commit()
    with engine.begin() as conn:  # the text columns as an old release left them: plaintext
        conn.execute(
            update(raw_rows).where(raw_rows.c.id == bindparam("k")),
            [{"k": i, "a": r[1], "b": r[2]} for i, r in truth.items()],
        )
    return truth


class Scenario:
    """One round: a fresh table, the application writing, each operation killed and rerun."""

    def __init__(
        self, engine: Engine, tmp: Path, keyfile: Path, workers: int, cli: bool, tally: Tally
    ) -> None:
        self.engine, self.tmp, self.keyfile, self.workers, self.cli = (
            engine,
            tmp,
            keyfile,
            workers,
            cli,
        )
        self.tally = tally
        self.rng = random.Random(tally.seed)
        self.url = engine.url.render_as_string(hide_password=False)
        self.schema = schema_of(engine)
        self.pids: list[int] = []
        self.forks = Proc([sys.executable, APP, "forks"], tmp / "forks", env(), False, stdin=True)
        self.n = 0
        self.control = tmp / "control"
        self.control.mkdir()
        self.phase = 0

    def msg(self, what: str) -> str:
        return f"{what} [{self.tally}; replay: SQLALCHEMY_CMK_KILL_SEED={SEED}]"

    # -- processes ----------------------------------------------------------------------------

    def start_op(self, op: str, keys: str, workers: int) -> list[Path]:
        """Start ``workers`` processes running ``op`` (forked by the runner); their outputs."""
        self.n += 1
        outs = [self.tmp / f"op{self.n}-{k}.out" for k in range(workers)]
        spec = {
            "op": op,
            "url": self.url,
            "schema": self.schema,
            "keyfile": str(self.keyfile),
            "keys": keys,
            "batch": BATCH,
            "latency": LATENCY,
            "outs": [str(o) for o in outs],
        }
        assert self.forks.p.stdin is not None
        self.forks.p.stdin.write(json.dumps(spec) + "\n")
        self.forks.p.stdin.flush()
        self.pids = json.loads(self.forks.line("pids "))
        return outs

    def end_op(self) -> list[int]:
        """The exit codes of the processes last started (-9: killed)."""
        return list(json.loads(self.forks.line("exit ", timeout=300)))

    def start_cli(self, progress: bool = False) -> Proc:
        self.n += 1
        argv = [CLI, "encrypt-column", "--database-url", self.url, "--table", TABLE]
        if self.schema:
            argv += ["--schema", self.schema]
        argv += ["--column", "a", "--column", "b", "--tenant-column", "tenant_id"]
        argv += ["--cmk", "_kill_resume_app:cli_cmk", "--app-dir", str(HERE)]
        argv += ["--workers", str(self.workers), "--batch-size", str(BATCH)]
        argv += ["--progress-every", "0"] if progress else ["--no-progress"]
        argv += ["--json"]
        e = dict(env(), KR_KEYFILE=str(self.keyfile), KR_KEYS="v1", KR_LATENCY=str(LATENCY))
        return Proc(argv, self.tmp / f"cli{self.n}", e, group=True)  # killpg takes the workers

    def kill_runs(self, op: str, keys: str, workers: int) -> None:
        """``KILLS`` attempts: start the operation, SIGKILL each process at a random moment:
        after a random number of its batches (from none to as many as its run is expected to
        have) and a random part of the next one."""
        for attempt in range(KILLS):
            if op == "encrypt" and self.cli and attempt % 2 == 0:
                self.kill_cli()  # and the Python API's workers on the odd attempts
                continue
            expected = max(1, self.remaining(op) // BATCH // workers)  # batches per worker
            plan = [
                (self.rng.randint(0, max(0, expected - 1)), self.rng.uniform(0, 0.05))
                for _ in range(workers)
            ]
            outs = self.start_op(op, keys, workers)
            pending = dict(enumerate(plan))
            reached: dict[int, float] = {}
            deadline = time.monotonic() + 120
            while pending and time.monotonic() < deadline:
                for k in list(pending):
                    out = outs[k].read_text() if outs[k].exists() else ""
                    err = Path(str(outs[k]) + ".err")
                    if "\nreport " in out or (err.exists() and err.stat().st_size):
                        del pending[k]  # finished (or failed) before its moment
                        continue
                    after, delay = pending[k]
                    if out.count("\nbatch ") >= after:
                        reached.setdefault(k, time.monotonic())
                        if time.monotonic() >= reached[k] + delay:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(self.pids[k], signal.SIGKILL)
                            del pending[k]
                time.sleep(0.002)
            codes = self.end_op()
            for k, rc in enumerate(codes):
                # A kill planned after no batch may land before the child opened its output.
                out = outs[k].read_text() if outs[k].exists() else ""
                if rc == -signal.SIGKILL:
                    self.tally.kills += 1
                    self.tally.ops[op] = self.tally.ops.get(op, 0) + 1
                    continue
                # Finished before its moment: it must have finished properly.
                failure = Path(str(outs[k]) + ".err").read_text()
                assert rc == 0, self.msg(f"{op} exited {rc}: {failure[-3000:]}")
                assert "\nreport " in out, self.msg(f"{op}: no report")
                self.tally.finished_early += 1

    def remaining(self, op: str) -> int:
        """Rows the next run of ``op`` has to change (rotate: every encrypted row)."""
        rows = raw(self.engine).values()
        if op == "encrypt":
            return sum(1 for r in rows if any(v and not v.startswith("cmk:") for v in r[1:3]))
        if op == "rewrap":
            return sum(1 for r in rows if r[5] and b"-v2" not in r[5][SPLIT:])
        if op == "move":
            return sum(1 for r in rows if r[4] is not None)
        encrypted = [
            r for r in rows if r[3] is not None or any(v and v.startswith("cmk:") for v in r[1:3])
        ]
        return len(encrypted)

    def kill_cli(self) -> None:
        """The command with its workers: killed as a whole (the process group), or one worker
        alone, after which the command must exit 1 naming it."""
        expected = max(1, self.remaining("encrypt") // BATCH)  # both workers' batches
        after, delay = self.rng.randint(0, expected - 1), self.rng.uniform(0, 0.05)
        one = self.rng.random() < 0.5
        p = self.start_cli(progress=True)
        reached = None
        deadline = time.monotonic() + 120
        while p.p.poll() is None and time.monotonic() < deadline:
            # One progress line a batch (--progress-every 0), whichever worker did it.
            if p.err.read_text().count(f"{TABLE}: ") >= after:
                reached = reached or time.monotonic()
                if time.monotonic() >= reached + delay and (not one or worker_pids(p.p.pid)):
                    break
            time.sleep(0.002)
        victims = worker_pids(p.p.pid) if one else []
        if p.p.poll() is not None:
            err = p.err.read_text()[-2000:]
            assert p.p.returncode == 0, self.msg(f"encrypt-column exited {p.p.returncode}: {err}")
            self.tally.finished_early += 1
            return
        if victims:
            os.kill(victims[0], signal.SIGKILL)
            rc = p.wait()
            err = p.err.read_text()
            if rc == 0:
                # The worker had finished its share and reported before the signal landed:
                # then the job must be done (the application writes no plaintext).
                left = self.remaining("encrypt")
                assert left == 0, self.msg(f"exit 0 with {left} rows left: {err[-2000:]}")
                self.tally.finished_early += 1
                return
            assert rc == 1, self.msg(f"one worker killed: exit {rc}: {err[-2000:]}")
            assert "died (exit status -9)" in err, self.msg(err[-2000:])
        else:
            os.killpg(p.p.pid, signal.SIGKILL)
            assert p.wait() == -signal.SIGKILL
            time.sleep(0.2)  # the orphaned workers die with their group: let PostgreSQL see it
        self.tally.kills += 1
        self.tally.ops["encrypt-cli"] = self.tally.ops.get("encrypt-cli", 0) + 1

    def finish(self, op: str, keys: str, workers: int) -> None:
        """Run the operation to completion: every process exits 0 with its report."""
        self.tally.reruns += 1
        if op == "encrypt" and self.cli:
            p = self.start_cli()
            rc = p.wait()
            assert rc == 0, self.msg(f"encrypt-column rerun exited {rc}: {p.err.read_text()}")
            doc = json.loads(p.text())
            assert doc["ok"] is True, self.msg(str(doc))
            return
        outs = self.start_op(op, keys, workers)
        for out, rc in zip(outs, self.end_op(), strict=True):
            err = Path(str(out) + ".err").read_text()
            assert rc == 0, self.msg(f"{op} rerun exited {rc}: {err[-3000:]}")
            assert "\nreport " in out.read_text(), self.msg(f"{op} rerun: no report")

    # -- the application ----------------------------------------------------------------------

    def start_writer(self, truth: Truth) -> Proc:
        (self.tmp / "truth-0.json").write_text(json.dumps({str(k): v for k, v in truth.items()}))
        spec = {
            "url": self.url,
            "schema": self.schema,
            "keyfile": str(self.keyfile),
            "truth": str(self.tmp / "truth-0.json"),
            "control": str(self.control),
            "seed": self.rng.randrange(2**32),
        }
        w = Proc(
            [sys.executable, APP, "writer", json.dumps(spec)], self.tmp / "writer", env(), False
        )
        w.wait_ready()
        return w

    def pause(self, writer: Proc) -> Truth:
        """Pause the application; what it last wrote, row by row."""
        (self.control / f"pause-{self.phase}").touch()
        deadline = time.monotonic() + 60
        while not (self.control / f"paused-{self.phase}").exists():
            if writer.p.poll() is not None or (self.control / "failed").exists():
                writer.wait()
                pytest.fail(
                    self.msg(f"the application failed: {writer.text()}{writer.err.read_text()}")
                )
            assert time.monotonic() < deadline, self.msg("the application did not pause")
            time.sleep(0.005)
        doc = json.loads((self.control / f"truth-{self.phase}.json").read_text())
        return {int(k): (v[0], v[1], v[2], v[3]) for k, v in doc.items()}

    def resume(self) -> None:
        (self.control / f"pause-{self.phase}").unlink()
        self.phase += 1

    # -- checks ---------------------------------------------------------------------------------

    def check(self, op: str, truth: Truth, before: dict[int, tuple[Any, ...]]) -> None:
        stored = raw(self.engine)
        msg = self.msg
        lost, extra = set(truth) - set(stored), set(stored) - set(truth)
        assert not lost and not extra, msg(
            f"after {op}: rows lost {sorted(lost)[:10]}, rows not written {sorted(extra)[:10]}"
        )
        cmk = make_cmk(str(self.keyfile), "v2")
        seen = read_all(self.engine, cmk)
        twice = [
            i
            for i, r in seen.items()
            if any(isinstance(v, str) and v.startswith("cmk:") for v in r[1:])
        ]
        assert not twice, msg(f"after {op}: encrypted twice: rows {twice[:10]}")
        wrong = [i for i in truth if seen.get(i) != truth[i]]
        assert not wrong, msg(
            f"after {op}: {len(wrong)} rows differ from what the application wrote, e.g. row "
            f"{wrong[0]}: {seen.get(wrong[0])!r} != {truth[wrong[0]]!r}"
        )
        if op == "decrypt":
            for i, (_t, a, b, c, c_plain, _) in stored.items():
                assert (a, b) == truth[i][1:3], msg(f"row {i}: text not restored in place")
                assert c is None and c_plain == truth[i][3], msg(f"row {i}: c not moved to c_plain")
            return
        if op == "move":
            for i, (_t, _a, _b, c, c_plain, _) in stored.items():
                assert c_plain is None, msg(f"row {i}: c_plain left after the move")
                assert (c is None) == (truth[i][3] is None), msg(f"row {i}: c not moved")
                assert c is None or truth[i][3] == "" or truth[i][3].encode() not in c, msg(
                    f"row {i}: plaintext in c"
                )
            report = backfill.verify(
                self.engine, cmk, TABLE, ["c"], tenant_column="tenant_id", metadata=Base
            )
            moved = sum(1 for r in stored.values() if r[3] is not None)
            assert report.ok and report.checked == moved, msg(f"verify after move: {report}")
            return
        plain = [
            i
            for i, r in stored.items()
            if any(v is not None and not v.startswith("cmk:") for v in r[1:3])
        ]
        assert not plain, msg(f"after {op}: plaintext left in rows {plain[:10]}")
        assert all(r[4] is None for r in stored.values()), msg("c_plain written")
        assert all((r[3] is None) == (truth[i][3] is None) for i, r in stored.items()), msg("c")
        report = backfill.verify(
            self.engine, cmk, TABLE, ["a", "b", "c"], tenant_column="tenant_id", metadata=Base
        )
        assert report.ok and not report.plaintext, msg(f"verify after {op}: {report}")
        encrypted = [i for i, r in stored.items() if any(v is not None for v in r[1:4])]
        assert report.checked == len(encrypted), msg(f"verify checked {report.checked}")
        if op == "rotate":
            old = {r[5][SPLIT:] for r in before.values() if r[5] is not None}
            stale = [i for i in encrypted if stored[i][5][SPLIT:] in old]
            assert not stale, msg(f"rotate left rows under their old data key: {stale[:10]}")
        if op == "rewrap":
            refs = {parse_envelope(r[5][SPLIT:]).key_ref for r in stored.values() if r[5]}
            assert refs == {f"local://{t}-v2" for t in TENANTS}, msg(f"rewrap left {refs}")
            only_new = read_all(self.engine, make_cmk(str(self.keyfile), "v2only"))
            assert only_new == truth, msg("rows unreadable without the old key")

    # -- the round ------------------------------------------------------------------------------

    def run(self) -> None:
        truth = seed_rows(self.engine, self.keyfile, self.rng)
        writer = self.start_writer(truth)
        try:
            for op, keys in (
                ("encrypt", "v1"),
                ("rotate", "v1"),
                ("rewrap", "v2"),
                ("decrypt", "v2"),
                ("move", "v2"),
            ):
                # rotate runs in one worker (documented: a rotation walks the rows that exist
                # when it starts, once); the others in as many as the test has.
                workers = 1 if op == "rotate" else self.workers
                before = raw(self.engine)
                self.kill_runs(op, keys, workers)
                truth = self.pause(writer)
                self.finish(op, keys, workers)
                self.check(op, truth, before)
                self.resume()
            (self.control / "stop").touch()
            assert writer.wait() == 0, self.msg(writer.err.read_text())
            counts = json.loads(writer.text().splitlines()[-1])
            assert not counts["errors"], self.msg(f"the application saw: {counts['errors']}")
            writes = counts["updates"] + counts["inserts"] + counts["deletes"]
            assert writes > 0 and counts["checked"] > 0, self.msg(str(counts))
            self.tally.writes += writes
            self.tally.rows += len(raw(self.engine))
        finally:
            writer.kill_all()
            if self.forks.p.stdin is not None:
                self.forks.p.stdin.close()  # the runner ends at the end of its input
            self.forks.wait()


def worker_pids(parent: int) -> list[int]:
    """The spawned workers of the command (not multiprocessing's resource tracker)."""
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return []
    out = []
    for pid in children:
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(int(pid))
        except OSError:
            pass
    return out


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    return LocalKeyProvider.generate_key_file(tmp_path / "keys.json", KEY_NAMES)


def run_rounds(engine: Engine, tmp_path: Path, keyfile: Path, workers: int, cli: bool) -> None:
    for k in range(ROUNDS):
        tally = Tally(seed=SEED + 1000 * workers + 10 * k + (engine.dialect.name == "sqlite"))
        print(
            f"kill-and-resume {engine.dialect.name} workers={workers} round {k}: seed {tally.seed}"
        )
        started = time.monotonic()
        tmp = tmp_path / f"round{k}"
        tmp.mkdir()
        Scenario(engine, tmp, keyfile, workers, cli, tally).run()
        line = {
            "dialect": engine.dialect.name,
            "workers": workers,
            "cli": cli,
            "round": k,
            "seconds": round(time.monotonic() - started, 1),
            **{
                f: getattr(tally, f)
                for f in ("seed", "kills", "finished_early", "reruns", "rows", "writes", "ops")
            },
        }
        print(json.dumps(line))
        log = os.environ.get("SQLALCHEMY_CMK_KILL_LOG")
        if log:
            with open(log, "a") as fh:
                fh.write(json.dumps(line) + "\n")
        assert tally.kills > 0, str(tally)


def test_kill_and_resume_one_worker(engine: Engine, tmp_path: Path, keyfile: Path) -> None:
    run_rounds(engine, tmp_path, keyfile, workers=1, cli=False)


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param("postgresql", marks=pytest.mark.postgresql),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
    indirect=True,
)  # SQLite: one worker
def test_kill_and_resume_two_workers_and_the_command(
    engine: Engine, tmp_path: Path, keyfile: Path
) -> None:
    run_rounds(engine, tmp_path, keyfile, workers=2, cli=True)
