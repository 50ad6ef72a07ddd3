"""Unicode repair with ftfy: mojibake (also doubly encoded), C1 controls standing for cp1252 bytes, surrogates.

ftfy is configured to repair damage only: everything that would rewrite valid text (curly quotes, ligatures, full-width
forms, NFC) is off, so typographic quotes, dashes, accents and Cyrillic in clean text survive byte-for-byte. HTML
entities, line breaks and control characters are left to their own steps so each fix is counted under its own kind.
"""

from __future__ import annotations

import re
from collections import Counter
import unicodedata

import ftfy
import ftfy.bad_codecs  # noqa: F401  registers "sloppy-windows-1252" (cp1252 with its 5 undefined bytes as C1 controls)

from ftfy.badness import BADNESS_RE, badness

from textmill.pipelines.steps.base import Fixer

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
    """The whole text re-encoded as cp1252 decodes as UTF-8 *and* that is plausible: it was UTF-8 read as cp1252 (at
    most twice over).

    All-or-nothing on the whole string, and each round is accepted only when it is plausible (`_plausible`). The round
    trip alone is not enough: valid `NESTLÉ®` (cp1252 C9 AE) and `CAFÉ™` (C9 99 after `É`) are also
    valid UTF-8 (`ɮ`, `ə`), so any capital accented letter followed by a symbol would be rewritten. It catches what ftfy's
    per-sequence heuristics leave as plausible (`â„¢` for ™, `Ëš` for ˚).
    """
    fixed, current = None, text
    for _ in range(2):
        try:
            candidate = current.encode("sloppy-windows-1252").decode("utf-8")
        except UnicodeError:
            break
        if candidate == current or not _plausible(current, candidate):
            break
        fixed = current = candidate
    return fixed


# Characters a wrong re-decoding produces from valid "capital accented letter + symbol" pairs (É® -> ɮ, Ü° -> ܰ, Ý± -> ݱ)
# and that real text almost never holds: IPA, most spacing modifiers, lone combining marks, archaic Greek and Cyrillic,
# Latin Extended-B except the letters living languages use, Syriac/Thaana/NKo/Arabic Supplement.
_RARE = re.compile("[\u0180-\u0191\u0193-\u019f\u01a2-\u01ae\u01b1-\u01cc\u01dd-\u0217\u021c-\u02bb\u02bd-\u02c5"
                   "\u02c8-\u02d7\u02de-\u036f\u0370-\u0385\u03cf-\u03ff\u0460-\u048f\u0700-\u07ff]")


# Letters used alone as symbols in Latin text (10 kΩ, 5 μm, 2π): a repair may produce them without a same-script neighbour.
_SYMBOL_LETTERS = set("ΩΔμπ")


def _script(ch: str) -> str:
    """The script of a character in the two-byte UTF-8 range past Latin (U+0370-U+07FF: Greek, Cyrillic, Armenian, Hebrew,
    Arabic, Syriac, Thaana, NKo) by its Unicode name, else "" (Latin, digits, punctuation, symbols)."""
    if not "\u0370" <= ch <= "\u07ff":
        return ""
    name = unicodedata.name(ch, "UNKNOWN")
    return "ARABIC" if "ARABIC" in name else name.split(" ")[0]


def _implausible(after: str, new: set[str]) -> bool:
    """Whether a character the re-decoding introduced is out of place: a lower-case letter ending a word that started
    with an existing capital (valid `CAFÉ™` is the cp1252 bytes of `CAFə`), or the only character of its non-Latin script
    in the text (valid `Õ™` -> Armenian `ՙ`, `Ö®` -> a Hebrew point, `Û©` -> Arabic `۩`, each alone in Latin text)."""
    scripts = Counter(_script(ch) for ch in after)
    for i, ch in enumerate(after):
        if ch not in new:
            continue
        prev, nxt = after[i - 1] if i else " ", after[i + 1] if i + 1 < len(after) else " "
        if ch.islower() and prev.isupper() and prev not in new and not nxt.islower():
            return True
        script = _script(ch)
        if script and scripts[script] == 1 and ch not in _SYMBOL_LETTERS:
            return True
    return False


def _plausible(before: str, after: str) -> bool:
    """A re-decoding is a repair only when the result is no worse by ftfy's `badness` (counts of sequences rare in real
    text and common in mojibake) and every character it introduced is plausible: not rare (`_RARE`), not out of place
    (`_implausible`). This keeps valid "capital accented letter + symbol" pairs: `NESTLÉ®` is also the cp1252 bytes
    of `NESTLɮ`."""
    if badness(after) > badness(before):
        return False
    new = set(after) - set(before)
    return not _RARE.search("".join(new)) and not _implausible(after, new)


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
            if new != text and not _plausible(text, new):
                new = text
        return new, new != text
