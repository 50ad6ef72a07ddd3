"""Length bounds in characters, measured on the document's body: its `required` fields joined (the abstract, not the
title the template adds), or the whole text when no field is required."""

from __future__ import annotations

from typing import Optional

from textmill.pipelines.steps.base import Doc, Filter


def body(doc: Doc, required: list[str]) -> str:
    if not required:
        return doc.text.strip()
    return "\n".join(str(doc.fields.get(f) or "").strip() for f in required)


class Length(Filter):
    def __init__(self, min_chars: int, max_chars: int, required: list[str]):
        self.min_chars, self.max_chars, self.required = min_chars, max_chars, list(required)

    def keep(self, doc: Doc) -> Optional[str]:
        n = len(body(doc, self.required))
        if n < self.min_chars:
            return "too_short"
        if n > self.max_chars:
            return "too_long"
        return None
