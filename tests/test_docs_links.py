"""Every relative link in README.md and docs/*.md resolves inside the repository.

Stdlib only: no model, no torch. A link is `[text](target)` or `![alt](target)`, outside fenced code
blocks and inline code; http(s) and mailto links are not followed. A target with `#anchor` must name a
heading of the Markdown file it points to (GitHub's slugs). No page may point outside the repository
(`../shared/...`, a path escaping the root, an absolute path).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
EXTERNAL = ("http://", "https://", "mailto:")


def prose(text: str) -> str:
    """The page without fenced code blocks and inline code, where `[x](y)` is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    return LINK.findall(prose(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def problems(page: Path) -> list[str]:
    """Every broken or escaping link of one page, as readable messages."""
    text = page.read_text(encoding="utf-8")
    found = []
    if "../shared" in text:
        found.append(f"{page.name}: mentions ../shared, which a clone of this repository does not have")
    for target in links(text):
        if target.startswith(EXTERNAL):
            continue
        path, _, anchor = target.partition("#")
        path = unquote(path)
        if path.startswith("/") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", path):
            found.append(f"{page.name}: {target!r} is not a relative path inside the repository")
            continue
        resolved = (page.parent / path).resolve() if path else page
        if resolved != ROOT and ROOT not in resolved.parents:
            found.append(f"{page.name}: {target!r} points outside the repository")
            continue
        if not resolved.exists():
            found.append(f"{page.name}: {target!r} does not exist ({resolved.relative_to(ROOT)})")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            found.append(f"{page.name}: {target!r}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    return found


def test_pages_exist():
    assert (ROOT / "README.md").is_file()
    assert len(PAGES) > 1, "docs/*.md is missing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_inside_repository(page):
    found = problems(page)
    assert not found, "\n".join(found)


def test_every_docs_page_is_reachable_from_the_index():
    index = ROOT / "docs" / "README.md"
    named = {(index.parent / target.partition("#")[0]).resolve() for target in links(index.read_text())}
    missing = [p.name for p in PAGES if p.parent == index.parent and p != index and p.resolve() not in named]
    assert missing == [], f"docs/README.md does not link to {missing}"


def test_checker_catches_broken_and_escaping_links(tmp_path, monkeypatch):
    """The checker itself: a missing file, a bad anchor, ../shared and an escape are all reported."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "ok.md").write_text("# A heading: with `code`\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "[fine](ok.md) [anchor](ok.md#a-heading-with-code) [web](https://example.com)\n"
        "`[not a link](nowhere.md)`\n```\n[nor this](nowhere.md)\n```\n"
        "[missing](nowhere.md) [bad anchor](ok.md#nope) [escape](../../etc/passwd) [abs](/etc/passwd)\n"
        "see ../shared/ASSETS.md\n"
    )
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    found = problems(page)
    assert len(found) == 5, found
    assert any("nowhere.md" in f and "does not exist" in f for f in found)
    assert any("#nope" in f for f in found)
    assert any("outside the repository" in f for f in found)
    assert any("not a relative path" in f for f in found)
    assert any("../shared" in f for f in found)
