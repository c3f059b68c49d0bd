"""The code blocks of README.md, the other root pages and docs/**/*.md, as the tests read them:
one parser for all.

A block is a fenced block (```lang ... ```), possibly indented inside a list. The nearest
non-blank line before its fence may carry one marker, an HTML comment that readers of the
rendered page do not see but readers of the source do:

* ``<!-- not-run: REASON -->``: the block is not executed (it needs a cloud account, is a
  fragment...); the reason is required.
* ``<!-- run-by: tests/FILE.py::test_name -->``: the block needs a local KMS server or similar
  that a dedicated test starts; that test runs it (through :func:`doc_block`).

``tests/test_docs.py`` runs every other block; the provider tests use :func:`doc_block`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>not-run|run-by)\s*:?(?P<reason>.*?)-->\s*$")
ANY_MARKER = re.compile(r"<!--\s*(not-run|run-by)\b")


@dataclass(frozen=True)
class Block:
    """One fenced code block.

    Attributes:
        path: The Markdown file, relative to the repository root.
        line: The 1-based line of the block's first line of code (the line after the fence).
        lang: The fence's language tag ("" when none).
        code: The block's text, the fence's indentation removed, ending in a newline.
        mark: "not-run", "run-by" or None.
        reason: The marker's text (the reason, or the test that runs the block).
    """

    path: Path
    line: int
    lang: str
    code: str
    mark: str | None = None
    reason: str = ""

    @property
    def where(self) -> str:
        """``file:line`` of the block, for failure messages."""
        return f"{self.path}:{self.line}"


def pages() -> list[Path]:
    """The Markdown files at the root (README.md first) and under docs/, relative to the root.

    Found by glob, so a new page is run without anyone listing it.
    """
    top = sorted(p.name for p in ROOT.glob("*.md") if p.name != "README.md")
    docs = sorted(p.relative_to(ROOT) for p in (ROOT / "docs").rglob("*.md"))
    return [Path("README.md"), *map(Path, top), *docs]


def blocks(page: str | Path) -> list[Block]:
    """The page's fenced blocks in order (``page`` relative to the root, or under docs/)."""
    path = Path(page)
    if not (ROOT / path).exists():
        path = next(p for p in pages() if p.name == path.name or str(p).endswith(str(path)))
    lines = (ROOT / path).read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        indent = len(fence["indent"])
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path}:{i + 1}: a code block that is never closed")
        inside = lines[i + 1 : end]
        body = [line[indent:] if line[:indent].strip() == "" else line for line in inside]
        previous = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.match(previous)
        if marker is None and ANY_MARKER.search(previous):
            raise AssertionError(f"{path}:{i}: a marker that does not parse: {previous.strip()}")
        found.append(
            Block(
                path=path,
                line=i + 2,
                lang=fence["lang"],
                code="\n".join(body) + "\n",
                mark=marker["kind"] if marker else None,
                reason=marker["reason"].strip() if marker else "",
            )
        )
        i = end + 1
    return found


def doc_block(page: str | Path, lang: str, containing: str) -> str:
    """The one ``lang`` block of ``page`` that contains ``containing`` (exactly one must)."""
    matching = [b for b in blocks(page) if b.lang == lang and containing in b.code]
    if len(matching) != 1:
        raise AssertionError(
            f"{page}: {len(matching)} {lang} blocks contain {containing!r}, expected one"
        )
    return matching[0].code
