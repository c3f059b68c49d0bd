"""Shared by the tests of each provider page's "decrypting with the tenant's own tools".

Each page gives a script that takes a stored companion value apart and the command a tenant runs
with its own tools (az, gcloud, bao, PyKMIP); the tests run the script on a real companion and
the command's call against the local server.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import docblocks

from sqlalchemy_cmk._format import encode_envelope

DOCS = Path(__file__).resolve().parents[2] / "docs" / "providers"


def companion(tenant: str, scheme: str, key_ref: str, wrapped: bytes) -> bytes:
    """A companion value as the library stores it (``sqlalchemy_cmk/_format.py``)."""
    return b"\x01" + os.urandom(16) + encode_envelope(tenant, scheme, key_ref, wrapped)


def doc_block(page: str, lang: str, marker: str) -> str:
    """The one ``lang`` code block of ``docs/providers/<page>`` that contains ``marker``.

    Read by the docs runner's parser (``tests/docblocks.py``); the page marks the block
    ``<!-- run-by: ... -->`` so that ``tests/test_docs.py`` leaves it to the calling test.
    """
    return docblocks.doc_block(Path("docs/providers") / page, lang, marker)


def run_script(page: str, marker: str, cwd: Path) -> dict[str, Any]:
    """Execute the page's Python block containing ``marker`` in ``cwd``; returns its globals."""
    code = doc_block(page, "python", marker)
    namespace: dict[str, Any] = {}
    old = Path.cwd()
    os.chdir(cwd)
    try:
        exec(compile(code, str(DOCS / page), "exec"), namespace)
    finally:
        os.chdir(old)
    return namespace
