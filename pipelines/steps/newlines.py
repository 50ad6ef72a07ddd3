"""Line endings: `\\r\\n`, lone `\\r`, NEL, U+2028/U+2029 all become `\\n` (so every later step sees one newline kind)."""

from __future__ import annotations

import re

from textmill.pipelines.steps.base import Fixer

_BREAKS = re.compile("\r\n|[\r\u0085\u2028\u2029]")


class Newlines(Fixer):
    name = "newlines"

    def fix(self, text: str) -> tuple[str, bool]:
        new = _BREAKS.sub("\n", text)
        return new, new != text
