"""Reading the docs as data: fenced blocks, links, heading anchors, and the generator.

Markdown is parsed only as far as these checks need: fenced code blocks
(``` fences, as every page here writes them), inline links outside code,
and ATX headings with GitHub's anchor rule.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
GENERATOR = DOCS / "generate_policy_reference.py"
INVALID_MARK = re.compile(r"^<!--\s*invalid\b.*-->$")


def doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


@cache
def generator() -> ModuleType:
    """docs/generate_policy_reference.py as a module (it is not in a package)."""
    spec = importlib.util.spec_from_file_location("generate_policy_reference", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Block:
    """A fenced code block: the page, the fence's line (1-based), its language and text."""

    page: Path
    line: int
    lang: str
    text: str
    marked_invalid: bool

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


_FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)")


def blocks(page: Path) -> list[Block]:
    """Every fenced block of a page, with whether `<!-- invalid -->` precedes it."""
    lines = page.read_text(encoding="utf-8").split("\n")
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
        body = "\n".join(line[len(m[1]) :] for line in lines[i + 1 : end]) + "\n"
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        out.append(Block(page, i + 1, m[2].lower(), body, bool(INVALID_MARK.match(before))))
        i = end + 1
    return out


def prose(text: str) -> str:
    """The text without fenced blocks and code spans (links there are not links)."""
    kept: list[str] = []
    fenced = False
    for line in text.split("\n"):
        if _FENCE.match(line):
            fenced = not fenced
            kept.append("")
            continue
        kept.append("" if fenced else line)
    return re.sub(r"`[^`\n]*`", "", "\n".join(kept))


_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)


def links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every inline and reference link on a page."""
    text = prose(page.read_text(encoding="utf-8"))
    found = [(m.start(), m[1]) for m in _LINK.finditer(text)]
    found += [(m.start(), m[1]) for m in _REF.finditer(text)]
    return sorted((text.count("\n", 0, at) + 1, target) for at, target in found)


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lowercase, punctuation dropped,
    each space a hyphen, `-1`, `-2`... for repeats."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in prose_keep_code(page.read_text(encoding="utf-8")).split("\n"):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m is None:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m[1])  # a link's text only
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def prose_keep_code(text: str) -> str:
    """The text without fenced blocks (headings keep their code spans)."""
    kept: list[str] = []
    fenced = False
    for line in text.split("\n"):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(line)
    return "\n".join(kept)
