"""Running page headers and footers of a book (title, chapter, page number lines repeating on every page) removed.

Pages are the form-feed separated parts of the text, as pdftotext and most book dumps write them. A line counts as a
header/footer when, with digits masked (page numbers change), it is the first or last non-blank line of at least half
of the pages (and of 3 or more). Text without page breaks is left alone: without pages a repeated line is not a header.
"""

from __future__ import annotations

import re
from collections import Counter

from textmill.pipelines.steps.base import Fixer

_DIGITS = re.compile(r"\d+")
MIN_PAGES = 3


def _key(line: str) -> str:
    return _DIGITS.sub("#", line.strip()).casefold()


def _edges(page: list[str]) -> set[str]:
    body = [ln for ln in page if ln.strip()]
    return {_key(ln) for ln in body[:1] + body[-1:]}


class PageHeaders(Fixer):
    name = "page_headers"

    def fix(self, text: str) -> tuple[str, bool]:
        if text.count("\f") + 1 < MIN_PAGES:
            return text, False
        pages = [p.split("\n") for p in text.split("\f")]
        seen = Counter(k for page in pages for k in _edges(page))
        repeated = {k for k, n in seen.items() if k and n >= max(MIN_PAGES, len(pages) / 2)}
        if not repeated:
            return text, False
        kept = ["\n".join(ln for ln in page if _key(ln) not in repeated) for page in pages]
        return "\n\n".join(p.strip("\n") for p in kept), True
