"""The README stays a front door, and every link in it and in docs/ leads somewhere.

- README.md is at most 300 lines; the long form lives in docs/.
- Every relative link and image in README.md and docs/*.md names a file or folder that exists, and
  a ``#anchor`` names a heading of the page it points into.
- The suite's time quoted in the README's two commands is the one docs/testing.md gives.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support.docpages import ROOT, anchors, page, relative_links

PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def test_readme_is_at_most_300_lines():
    n = len(page("README.md").splitlines())
    assert n <= 300, f"README.md has {n} lines; move the long form into docs/"


def broken_links(name: str, text: str) -> list[str]:
    """The relative links of ``text`` (page ``name``) that lead nowhere, each with the reason."""
    here = (ROOT / name).parent
    bad = []
    for target in relative_links(text):
        path, _, anchor = target.partition("#")
        if not path:  # an anchor in this page
            if anchor not in anchors(text):
                bad.append(f"{name}: {target} (no heading with that anchor in this page)")
            continue
        dest = (here / path).resolve()
        if not dest.exists():
            bad.append(f"{name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            bad.append(f"{name}: {target} (no heading with that anchor in {dest.relative_to(ROOT)})")
    return bad


@pytest.mark.parametrize("name", PAGES)
def test_relative_links_lead_somewhere(name):
    assert (ROOT / "docs").is_dir() and len(PAGES) > 5, PAGES
    text = page(name)
    assert relative_links(text) or name != "README.md", "the README links its docs pages"
    assert broken_links(name, text) == []


def test_a_broken_link_is_caught():
    """Negative control: a missing file, a missing anchor and a heading that only appears inside a
    code block are all reported; a good file link, a good anchor and a folder are not."""
    text = (
        "# A page\n\n## Two words: `code`\n\n```\n## not a heading\n```\n\n"
        "[ok](README.md) [ok](#two-words-code) [ok](docs/data/) [ok](https://example.org/x.md)\n"
        "[bad](docs/nowhere.md) [bad](#not-a-heading) [bad](README.md#no-such-heading) ![bad](docs/none.png)\n"
        "`[in code](docs/nowhere.md)`\n"
    )
    assert broken_links("PAGE.md", text) == [
        "PAGE.md: docs/nowhere.md (no such file)",
        "PAGE.md: #not-a-heading (no heading with that anchor in this page)",
        "PAGE.md: README.md#no-such-heading (no heading with that anchor in README.md)",
        "PAGE.md: docs/none.png (no such file)",
    ]


def test_anchors_follow_github():
    text = "# tp_ffn\n## Meta's Llama code on tp_ffn: `tp_ffn.fairscale`\n## Notes\n## Notes\n"
    assert anchors(text) == {"tp_ffn", "metas-llama-code-on-tp_ffn-tp_ffnfairscale", "notes", "notes-1"}


def test_the_suite_time_in_the_readme_is_the_one_in_docs_testing():
    (line,) = [ln for ln in page("README.md").splitlines() if ln.startswith("./scripts/test.sh ")]
    figures = re.search(r"(\d+ passed, \d+ skipped in [\d:]+ on [\d-]+)", line)
    assert figures, line
    testing = " ".join(page("docs/testing.md").split())  # the page wraps its lines
    assert figures.group(1) in testing, (figures.group(1), "docs/testing.md")


def test_pages_are_the_ones_the_readme_lists():
    readme = page("README.md")
    for name in PAGES[1:]:
        assert f"]({name})" in readme, f"README.md does not link {name}"
    assert Path(ROOT / "docs" / "benchmarks.md").exists()
