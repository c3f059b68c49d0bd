"""Every code block of README.md (and the root's other pages) and docs/**/*.md runs, so an
example that stops working fails.

One test per page (new pages are found by the glob). The page's blocks run in order, in one
namespace, in a fresh working directory that holds what a reader of the docs has set up:

* ``$SQLALCHEMY_CMK_LOCAL_KEYS``: local keys of the names the pages use (:data:`KEY_NAMES`),
  in ``LocalKeyProvider.from_env``'s format (a page that reads a key file makes it itself, with
  ``sqlalchemy-cmk keys init``);
* ``$DATABASE_URL`` and ``$SQLALCHEMY_CMK_DATABASE_URL``: a SQLite database in that directory;
* ``$SQLALCHEMY_CMK_REGISTRY_SECRET``: a random registry secret;
* in the namespace, ``Base``: the application's declarative base (a page's models subclass it;
  a page may define its own). Everything else a block uses, it imports or defines.

What runs, by the fence's language:

* ``python``: executed; a failure names ``file:line`` of the block (and the traceback the line
  in the Markdown file). A ``test_*`` function of no arguments that a block defines is then
  called, as the reader's pytest would.
* ``sh``, ``bash``, ``shell``, ``console`` (its ``$`` lines): each ``sqlalchemy-cmk keys ...``
  command runs for real in the working directory and must exit 0; every other
  ``sqlalchemy-cmk`` command must be accepted by the command's argument parser (its options
  exist), since it needs the application's own ``--cmk`` module and tables. Shell variables set
  in the block (``T="..."``, ``export X=...``) are expanded. A block that runs any other
  program must be marked.
* ``json``: must parse.
* no language, ``text``: output or diagrams, not code.
* anything else (``hcl``, ...): must be marked.

A block may be marked, on the line before its fence, ``<!-- not-run: REASON -->`` (the reason
is required) or ``<!-- run-by: tests/FILE.py::test_name -->`` (a test that starts the local
server the block needs runs it through ``docblocks.doc_block``; that test must exist). See
``tests/docblocks.py``.
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import io
import json
import os
import re
import shlex
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from docblocks import ROOT, Block, blocks, pages
from sqlalchemy import Engine, text
from sqlalchemy.orm import DeclarativeBase

from sqlalchemy_cmk import CMK
from sqlalchemy_cmk.cli import _parser, main
from sqlalchemy_cmk.revocation import RevocationWatcher

KEY_NAMES = ["acme", "globex", "acme-2025", "acme-2026"]
SHELL = {"sh", "bash", "shell", "console"}
TEXT = {"", "text"}
# Where a command's own words end and the shell's plumbing begins.
PLUMBING = {"|", "||", "&&", ";", ">", ">>", "<", "2>", "&"}
# Shell commands that do nothing the docs runner needs to check.
HARMLESS = {"echo", "cd", "export", "unset"}


def _after_registry(ns: dict[str, Any], workdir: Path) -> None:
    # The key moved (first block) and the watcher stopped, its table holding the revocation
    # and the reinstatement (second block).
    assert ns["registry"].get("acme").primary == "local://acme-2026"
    assert not ns["watcher"].running
    with ns["engine"].connect() as conn:
        rows = conn.execute(text("SELECT tenant_id, revoked, version FROM cmk_revocations"))
        assert [(t, bool(r), v) for t, r, v in rows] == [("acme", False, 2)]


#: Checks of what a page's blocks left behind, beyond "it ran".
AFTER: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "docs/registry.md": _after_registry,
}


@pytest.fixture
def reader_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The working directory and environment a reader of the docs has (module docstring)."""
    monkeypatch.chdir(tmp_path)
    keys = {n: base64.b64encode(os.urandom(32)).decode() for n in KEY_NAMES}
    monkeypatch.setenv("SQLALCHEMY_CMK_LOCAL_KEYS", ",".join(f"{n}={k}" for n, k in keys.items()))
    url = f"sqlite:///{tmp_path / 'app.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("SQLALCHEMY_CMK_DATABASE_URL", url)
    monkeypatch.setenv("SQLALCHEMY_CMK_REGISTRY_SECRET", base64.b64encode(os.urandom(32)).decode())
    yield tmp_path


@pytest.mark.parametrize("page", pages(), ids=str)
def test_page_runs(page: Path, reader_setup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real module: SQLAlchemy resolves a model's annotations (Mapped[...]) in its module.
    module = types.ModuleType("docs_page")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace: dict[str, Any] = module.__dict__

    class Base(DeclarativeBase):
        pass

    namespace["Base"] = Base
    shell_vars: dict[str, str] = {}
    engines: list[Engine] = []
    try:
        for block in blocks(page):
            _run(block, namespace, shell_vars)
            engines += [v for v in namespace.values() if isinstance(v, Engine)]
        if str(page) in AFTER:
            AFTER[str(page)](namespace, reader_setup)
    finally:
        for value in list(namespace.values()):
            if isinstance(value, RevocationWatcher):  # a page that failed before its stop()
                value.stop()
        for engine in engines:
            engine.dispose()


def _run(block: Block, namespace: dict[str, Any], shell_vars: dict[str, str]) -> None:
    if block.mark is not None:
        _check_mark(block)
    elif block.lang == "python":
        # Blank lines in front: the traceback's line numbers are the Markdown file's.
        code = compile("\n" * (block.line - 1) + block.code, str(block.path), "exec")
        before = set(namespace)
        try:
            exec(code, namespace)
            for name in sorted(set(namespace) - before):
                test = namespace[name]
                if (
                    name.startswith("test_")
                    and callable(test)
                    and not inspect.signature(test).parameters
                ):
                    test()
        except Exception as exc:
            raise AssertionError(f"{block.where}: {type(exc).__name__}: {exc}") from exc
    elif block.lang in SHELL:
        for command in _commands(block, shell_vars):
            _run_command(block, command)
    elif block.lang == "json":
        try:
            json.loads(block.code)
        except ValueError as exc:
            raise AssertionError(f"{block.where}: not JSON: {exc}") from exc
    elif block.lang not in TEXT:
        raise AssertionError(
            f"{block.where}: the docs runner cannot run a {block.lang!r} block: mark it "
            "<!-- not-run: REASON --> or <!-- run-by: tests/FILE.py::test_name -->"
        )


def _check_mark(block: Block) -> None:
    if block.mark == "not-run":
        assert block.reason, f"{block.where}: <!-- not-run: --> needs a reason"
        return
    match = re.fullmatch(r"(tests/[\w/]+\.py)::(test_\w+)", block.reason)
    assert match, f"{block.where}: run-by needs tests/FILE.py::test_name, not {block.reason!r}"
    source = ROOT / match[1]
    assert source.exists(), f"{block.where}: {match[1]} does not exist"
    code = source.read_text()
    assert re.search(rf"^def {match[2]}\(", code, re.M), (
        f"{block.where}: {match[1]} has no test {match[2]}"
    )
    # The test reads its blocks from the page (docblocks.doc_block), so it names the page.
    assert block.path.name in code, f"{block.where}: {match[1]} never names {block.path.name}"


def _commands(block: Block, shell_vars: dict[str, str]) -> Iterator[list[str]]:
    """The block's commands as words, its variables expanded; assignments update the vars."""
    lines = block.code.replace("\\\n", " ").splitlines()
    if block.lang == "console":  # commands follow "$ "; the other lines are their output
        lines = [line.strip()[2:] for line in lines if line.strip().startswith("$ ")]
    for line in lines:
        line = re.sub(r"\$\([^)]*\)", "SUBSTITUTED", line)  # $(...): one opaque word
        # Variables the block set are expanded; others stay as written.
        line = re.sub(r"\$\{?(\w+)\}?", lambda m: shell_vars.get(m[1], m[0]), line)
        words = shlex.split(line, comments=True)
        cut = next((i for i, w in enumerate(words) if w in PLUMBING), len(words))
        words = words[:cut]
        if words[:1] == ["export"]:
            words = words[1:]
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            name, _, value = words.pop(0).partition("=")
            shell_vars[name] = value
        if words:
            yield words


def _run_command(block: Block, words: list[str]) -> None:
    if words[0] in HARMLESS:
        return
    if words[0] != "sqlalchemy-cmk":
        raise AssertionError(
            f"{block.where}: runs {words[0]!r}, which the docs runner does not run: mark the "
            "block <!-- not-run: REASON --> or <!-- run-by: tests/FILE.py::test_name -->"
        )
    args = words[1:]
    err = io.StringIO()
    if args[:1] == ["keys"]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(args)
        assert status == 0, f"{block.where}: {shlex.join(words)} exited {status}: {err.getvalue()}"
        return
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            _parser().parse_args(args)
        except SystemExit as exc:
            raise AssertionError(
                f"{block.where}: {shlex.join(words)} is refused by the command's parser: "
                f"{err.getvalue().strip()}"
            ) from exc


def test_usage_guide_documents_every_cmk_parameter() -> None:
    """The table of ``CMK(...)`` parameters in docs/usage.md names each parameter, in order, with
    its default: a parameter added, renamed or re-defaulted without the guide fails here."""
    page = (ROOT / "docs" / "usage.md").read_text()
    table = page.split("### `CMK(...)` parameters", 1)[1].split("\n\n", 2)[1]
    rows = [r.split("|")[1:3] for r in table.splitlines()[2:]]
    documented = {name.strip().strip("`"): default.strip().strip("`") for name, default in rows}
    parameters = inspect.signature(CMK).parameters.values()
    assert list(documented) == [p.name for p in parameters]
    for p in parameters:
        default = "" if p.default is inspect.Parameter.empty else repr(p.default)
        if p.name == "write_key_max_uses":
            default = "2**20" if p.default == 2**20 else default
        assert documented[p.name] == default, p.name


# -- the runner fails where it should ------------------------------------------------------------


def _page(tmp_path: Path, text: str) -> list[Block]:
    (tmp_path / "docs").mkdir(exist_ok=True)
    page = tmp_path / "docs" / "page.md"
    page.write_text(text)
    found = blocks(page)
    return [Block(Path("docs/page.md"), b.line, b.lang, b.code, b.mark, b.reason) for b in found]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("Intro.\n\n```python\nx = 1\nraise ValueError('no')\n```\n", "docs/page.md:4: ValueError"),
        ("```python\ndef test_it():\n    assert False\n```\n", "docs/page.md:2: AssertionError"),
        ("```sh\nsqlalchemy-cmk verify --no-such-option\n```\n", "refused by the command"),
        ("```sh\nT=--tabel\nsqlalchemy-cmk status $T t\n```\n", "refused by the command"),
        ("```console\n$ sqlalchemy-cmk keys list none.json\n```\n", "exited 2"),
        ("```sh\nrm -rf build\n```\n", "runs 'rm'"),
        ('```json\n{"a": }\n```\n', "not JSON"),
        ("```yaml\na: 1\n```\n", "cannot run a 'yaml' block"),
        ("<!-- not-run: -->\n```python\nx\n```\n", "needs a reason"),
        ("<!-- run-by: tests/test_docs.py::test_nothing -->\n```python\nx\n```\n", "has no test"),
        (
            "<!-- run-by: tests/test_examples.py::test_demo_runs_and_shows_revocation -->\n"
            "```python\nx\n```\n",
            "never names page.md",
        ),
    ],
)
def test_a_broken_block_fails_naming_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, says: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match=re.escape(says)):
        for block in _page(tmp_path, text):
            _run(block, {}, {})


def test_marked_and_text_blocks_are_not_run(tmp_path: Path) -> None:
    text = (
        "<!-- not-run: needs an AWS account -->\n```python\nraise SystemExit\n```\n\n"
        "<!-- run-by: tests/test_docs.py::test_page_runs -->\n```hcl\nx\n```\n\n"
        "```\nsome output\n```\n"
    )
    found = _page(tmp_path, text)
    assert [(b.mark, b.reason) for b in found] == [
        ("not-run", "needs an AWS account"),
        ("run-by", "tests/test_docs.py::test_page_runs"),
        (None, ""),
    ]
    for block in found:
        _run(block, {}, {})
