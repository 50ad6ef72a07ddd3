"""Unicode repair with ftfy: mojibake (also doubly encoded), C1 controls standing for cp1252 bytes, surrogates.

ftfy is configured to repair damage only: everything that would rewrite valid text (curly quotes, ligatures, full-width
forms, NFC) is off, so typographic quotes, dashes, accents and Cyrillic in clean text survive byte-for-byte. HTML
entities, line breaks and control characters are left to their own steps so each fix is counted under its own kind.
"""

from __future__ import annotations

import re

import ftfy
import ftfy.bad_codecs  # noqa: F401  registers "sloppy-windows-1252" (cp1252 with its 5 undefined bytes as C1 controls)

from ftfy.badness import BADNESS_RE

from pipelines.steps.base import Fixer

CONFIG = ftfy.TextFixerConfig(
    unescape_html=False,
    remove_terminal_escapes=False,
    fix_encoding=True,
    restore_byte_a0=True,
    replace_lossy_sequences=True,
    decode_inconsistent_utf8=True,
    fix_c1_controls=True,
    fix_latin_ligatures=False,
    fix_character_width=False,
    uncurl_quotes=False,
    fix_line_breaks=False,
    fix_surrogates=True,
    remove_control_chars=False,
    normalization=None,
    explain=False,
)


def _undo_cp1252(text: str) -> str | None:
    """The whole text re-encoded as cp1252 decodes as UTF-8: it was UTF-8 read as cp1252 (at most twice over).

    All-or-nothing on the whole string, so it cannot touch valid text: real accents, quotes or Cyrillic do not survive
    that round trip. It catches what ftfy's per-sequence heuristics leave as plausible (`â„¢` for ™, `Ëš` for ˚).
    """
    fixed = None
    for _ in range(2):
        try:
            candidate = (fixed or text).encode("sloppy-windows-1252").decode("utf-8")
        except UnicodeError:
            break
        if candidate == (fixed or text):
            break
        fixed = candidate
    return fixed


# ftfy.fix_text changes nothing (with CONFIG) when none of its segments is_bad() (ftfy's own mojibake regex, which also
# matches C1 controls) and there are no surrogates: every other enabled fixer only acts on those. fix_text runs per line,
# and the regex's only context-dependent piece is `^[ÃÂ][ ]` (start of a segment, i.e. of a line), checked separately.
_SURROGATE = re.compile("[\ud800-\udfff]")
_LINE_START = re.compile("^[ÃÂ] ", re.MULTILINE)


def _ftfy_would_change(text: str) -> bool:
    if len(text) > CONFIG.max_decode_length:  # ftfy also splits inside very long lines
        return True
    return bool(BADNESS_RE.search(text) or _SURROGATE.search(text) or _LINE_START.search(text))


class Mojibake(Fixer):
    name = "mojibake"

    def fix(self, text: str) -> tuple[str, bool]:
        if text.isascii():  # nothing to repair; skips ftfy's per-call cost on most English text
            return text, False
        new = _undo_cp1252(text)
        if new is None:
            # One whole-text check instead of ftfy's per-line passes: ~90% of non-ASCII fields need no repair.
            new = ftfy.fix_text(text, CONFIG) if _ftfy_would_change(text) else text
        return new, new != text
