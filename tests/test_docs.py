"""The docs' relative links: every image and page that README.md and docs/*.md point to is in the repo (a
results page once showed four broken figures, linked from the repo root instead of from docs/)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")  # [text](target) and ![alt](target), minus any #anchor


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", t)]  # not http:, mailto:


def test_every_relative_link_in_the_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 5 and all(relative_links(p) for p in pages[:2])  # the pattern finds links at all
    broken = [f"{p.relative_to(ROOT)}: {t}" for p in pages for t in relative_links(p)
              if not (p.parent / t).exists()]
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def test_the_link_pattern_reads_images_pages_and_anchors(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("![a](x/a.png) [b](b.md#part) [c](https://e.org/c) [d](mailto:x@y) (not a link)")
    assert relative_links(page) == ["x/a.png", "b.md"]
