"""The docs' relative links: every image and page that README.md and docs/*.md point to is in the repo (a
results page once showed four broken figures, linked from the repo root instead of from docs/), and every
#anchor names a heading of its page (a contents line once pointed at a heading renamed since)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")  # [text](target) and ![alt](target), minus any #anchor
ANCHOR = re.compile(r"\]\(([^)\s#]*)#([^)\s]+)\)")  # [text](page.md#part) and [text](#part): (page, part)


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", t)]  # not http:, mailto:


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens (headings in
    fenced code, e.g. a shell comment, are not headings)."""
    anchors, fenced = set(), False
    for line in page.read_text().splitlines():
        fenced ^= line.startswith("```")
        if not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return anchors


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_link_in_the_docs_resolves():
    assert len(PAGES) > 5 and all(relative_links(p) for p in PAGES[:2])  # the pattern finds links at all
    broken = [f"{p.relative_to(ROOT)}: {t}" for p in PAGES for t in relative_links(p)
              if not (p.parent / t).exists()]
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def test_the_link_pattern_reads_images_pages_and_anchors(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("![a](x/a.png) [b](b.md#part) [c](https://e.org/c) [d](mailto:x@y) (not a link)")
    assert relative_links(page) == ["x/a.png", "b.md"]


def test_every_anchor_in_the_docs_names_a_heading():
    links = [(p, (p.parent / target if target else p), part) for p in PAGES
             for target, part in ANCHOR.findall(p.read_text()) if not re.match(r"[a-z]+:", target)]
    assert len(links) > 5  # the contents lines of docs/results.md alone have more
    broken = [f"{p.relative_to(ROOT)}: {t.name}#{part}" for p, t, part in links
              if t.suffix == ".md" and t.exists() and part not in heading_anchors(t)]
    assert not broken, "anchors with no heading:\n" + "\n".join(broken)


def test_heading_anchors_follow_github(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# A second data set, like DQN-Replay's (60,000 steps)\n```bash\n# not a heading\n```\n"
                    "## Why CQL: `td_only` vs CQL\n")
    want = {"a-second-data-set-like-dqn-replays-60000-steps", "why-cql-td_only-vs-cql"}
    assert heading_anchors(page) == want
