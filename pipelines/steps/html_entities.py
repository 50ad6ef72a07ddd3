"""HTML entities (`&amp;`, `&#39;`, `&eacute;` ...) back to characters, only where a complete entity is present.

Each matched entity is unescaped on its own rather than `html.unescape(text)` on the whole text, which would also turn
legacy semicolon-less names inside ordinary text (`&copy2`, `&para`) into symbols.
"""

from __future__ import annotations

import html
import re

from textmill.pipelines.steps.base import Fixer

_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")


class HtmlEntities(Fixer):
    name = "html"

    def fix(self, text: str) -> tuple[str, bool]:
        if "&" not in text:
            return text, False
        new = _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
        return new, new != text
