"""The demo in the README runs, and shows what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_and_shows_revocation() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "app reads ssn='123-45-6789'" in out
    # The raw bytes shown are ciphertext, never the plaintext (hex of the SSN would betray it).
    assert b"123-45-6789".hex() not in out
    assert "TenantMismatchError" in out
    assert "KeyAccessDeniedError" in out
    assert "globex is unaffected and still reads ['Grace']" in out
    assert "acme reads ['123-45-6789', '987-65-4321']" in out
    assert '"operation": "unwrap", "outcome": "denied"' in out


def test_demo_runs_without_greenlet() -> None:
    """``pip install sqlalchemy-cmk`` with SQLAlchemy 2.1 has no greenlet (it is no longer a
    default dependency there), and the demo failed in ``install()``, which imported SQLAlchemy's
    asyncio extension to tell async targets apart. ``.ci/run`` also runs the README's demo
    command in a venv without extras."""
    code = (
        "import runpy, sys; sys.modules['greenlet'] = None; "  # import greenlet now fails
        f"runpy.run_path({str(ROOT / 'examples' / 'demo.py')!r}, run_name='__main__')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert "globex is unaffected and still reads ['Grace']" in out
