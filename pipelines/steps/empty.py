"""Empty documents: the `required` fields (or, without any, the text) are blank after repair.

Checking the required fields rather than the rendered text matters for templates: `"{title}\\n\\n{abstract}"` with an
empty abstract still renders the title.
"""

from __future__ import annotations

from typing import Optional

from textmill.pipelines.steps.base import Doc, Filter


class Empty(Filter):
    name = "empty"

    def __init__(self, required: list[str]):
        self.required = list(required)

    def keep(self, doc: Doc) -> Optional[str]:
        values = [doc.fields.get(f) for f in self.required] if self.required else [doc.text]
        return "empty" if any(not str(v or "").strip() for v in values) else None
