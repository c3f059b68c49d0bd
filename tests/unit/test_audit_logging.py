"""The default audit sink as a new user meets it: silent under Python's default logging, one JSON
line per key use on stderr after the one line docs/usage.md and the README show.

Run in a fresh interpreter: pytest configures logging in its own process.
"""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import logging, sys
if sys.argv[1] == "basicConfig":
    logging.basicConfig(level=logging.INFO)
from sqlalchemy_cmk import CMK, tenant_context
from sqlalchemy_cmk.testing import FakeKeyProvider

cmk = CMK(FakeKeyProvider(), tenant_keys={"acme": "fake://acme"})  # the default sink
with tenant_context("acme", actor="user-42", request_id="r-1"):
    cmk.decrypt_documents(cmk.encrypt_documents([{"ssn": b"123-45-6789"}]))
print("done")
"""


def run(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_default_logging_shows_nothing_the_library_prints_nothing() -> None:
    out = run("default")
    assert out.stdout == "done\n"
    assert out.stderr == ""


def test_one_line_of_logging_shows_every_key_use() -> None:
    out = run("basicConfig")
    prefix = "INFO:sqlalchemy_cmk.audit:"
    lines = [line for line in out.stderr.splitlines() if line.startswith(prefix)]
    events = [json.loads(line[len(prefix) :]) for line in lines]
    assert [(e["operation"], e.get("purpose")) for e in events] == [
        ("wrap", None),
        ("unwrap", "verify"),
        ("encrypt", None),
        ("decrypt", None),
    ]
    assert {(e["tenant"], e["actor"], e["request_id"], e["outcome"]) for e in events} == {
        ("acme", "user-42", "r-1", "ok")
    }
    assert "123-45-6789" not in out.stderr
