"""Relative links in docs/*.md and README.md point at files that exist, and at
headings that exist in them; every page is on the map in docs/index.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from docs_support import DOCS, REPO, anchors, doc_pages, links

PAGES = [*doc_pages(), REPO / "README.md"]


def broken_links(page: Path) -> list[str]:
    out: list[str] = []
    for line, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(REPO)}:{line}: {target}"
        if not dest.exists():
            out.append(f"{where}: no such file")
        elif REPO not in dest.parents and dest != REPO:
            out.append(f"{where}: outside the repository")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            out.append(f"{where}: no heading #{fragment} in {dest.relative_to(REPO)}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_every_page_is_on_the_map() -> None:
    index = DOCS / "index.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for _, t in links(index)}
    missing = [p.name for p in doc_pages() if p != index and p.resolve() not in linked]
    assert missing == [], "add these pages to the map in docs/index.md"


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("## Value types", "value-types"),
        ("### `load_balancer`", "load_balancer"),
        (
            "## Bootstrap: from a join token to a certificate",
            "bootstrap-from-a-join-token-to-a-certificate",
        ),
        ("### `lepton-mesh certs init [--dir certs/]`", "lepton-mesh-certs-init---dir-certs"),
        ("## Fed by the control daemon", "fed-by-the-control-daemon"),
        ("## What we do — and don't", "what-we-do--and-dont"),
    ],
)
def test_anchors_are_githubs(heading: str, anchor: str, tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\n{heading}\n\n```\n# not a heading\n```\n")
    assert anchor in anchors(page)
    assert "not-a-heading" not in anchors(page)


def test_links_in_code_are_not_links(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("See [a](a.md) and `[b](b.md)`.\n\n```\n[c](c.md)\n```\n\n[d]: d.md\n")
    assert [t for _, t in links(page)] == ["a.md", "d.md"]
