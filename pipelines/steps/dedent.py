"""Per-line leading whitespace removed: hard-wrapped Debian descriptions and arXiv abstracts indent their lines."""

from __future__ import annotations

import re

from textmill.pipelines.steps.base import Fixer

_LEADING = re.compile(r"^[ \t]+", re.MULTILINE)


class Dedent(Fixer):
    name = "dedent"

    def fix(self, text: str) -> tuple[str, bool]:
        new = _LEADING.sub("", text)
        return new, new != text
