"""Control characters that carry no text: C0 (except tab, newline, form feed), DEL, leftover C1, stray BOMs and the
other invisible format marks ftfy's `remove_control_chars` knows, and whole ANSI terminal escape sequences (colours,
cursor moves: ftfy's `remove_terminal_escapes`) (it runs after the mojibake step, which has already turned
C1 controls that stood for cp1252 bytes back into characters)."""

from __future__ import annotations

import re

from ftfy.fixes import remove_control_chars, remove_terminal_escapes

from textmill.pipelines.steps.base import Fixer

_LEFTOVER = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")


class ControlChars(Fixer):
    name = "control"

    def fix(self, text: str) -> tuple[str, bool]:
        if text.isascii() and not _LEFTOVER.search(text):
            return text, False
        # terminal escape sequences go whole (removing only ESC left "[31m" in logs pasted into a corpus)
        new = _LEFTOVER.sub("", remove_control_chars(remove_terminal_escapes(text)))
        return new, new != text
