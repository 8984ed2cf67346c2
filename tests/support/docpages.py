"""The README and the pages in docs/ as the tests read them: a page's text, the code block under a
heading, its headings' anchors and its relative links."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_FENCE = re.compile(r"^\s*(```|~~~)")
# [text](target) and ![alt](target), with an optional "title"; the text may hold `code` but no brackets.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def page(name: str) -> str:
    """The text of ``README.md`` or of a page under docs/ (``"docs/training.md"``)."""
    return (ROOT / name).read_text(encoding="utf-8")


def block_after(name: str, heading: str, lang: str) -> str:
    """The first fenced ``lang`` code block after the line ``heading`` of page ``name``."""
    text = page(name)
    after = text[text.index(heading + "\n") :]
    return re.search(rf"```{lang}\n(.*?)```", after, flags=re.DOTALL).group(1)


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked (links in code are not links)."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"`[^`]*`", lambda m: "`" + "x" * (len(m.group()) - 2) + "`", line))
    return out


def anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown text: lower case, punctuation other than ``-``
    and ``_`` dropped, spaces made ``-``; a repeated heading gets ``-1``, ``-2``, ..."""
    seen: Counter = Counter()
    out = set()
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return out


def relative_links(text: str) -> list[str]:
    """Every link and image target of a Markdown text that is not a URL (``path``, ``path#anchor``, ``#anchor``)."""
    targets = [t for line in prose_lines(text) for t in _LINK.findall(line)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]
