"""Whitespace layout of the rendered text: trailing spaces per line, runs of blank lines, page breaks (form feeds).

Kept apart from `newlines` so the report tells line-ending repairs (a decoding artefact) from layout tidying.
"""

from __future__ import annotations

import re

from textmill.pipelines.steps.base import Fixer

_TRAILING = re.compile(r"[ \t\u00a0]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


class Whitespace(Fixer):
    name = "whitespace"

    def fix(self, text: str) -> tuple[str, bool]:
        new = _BLANK_RUNS.sub("\n\n", _TRAILING.sub("", text.replace("\f", "\n\n")))
        return new, new != text
