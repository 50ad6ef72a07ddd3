"""Per-file text encoding, decided on the whole file in one streaming pass, and text lines decoded per line.

BOM sniffing (UTF-8, UTF-16 LE/BE); UTF-16 without a BOM by its NUL byte pattern; then one pass counts valid non-ASCII
UTF-8 characters and invalid bytes. A file with no invalid byte is UTF-8; a mostly-UTF-8 file with a few stray bytes (a
cp1252 `é` pasted into a UTF-8 export) is UTF-8 with a per-line cp1252 fallback, so every record is kept and the ones
that needed it are counted as `encoding_fallback`; anything else is cp1252. A few NUL bytes do not make a file binary
wherever they are (the `control` repair strips them); a head full of control bytes does. Nothing is ever held whole.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import IO, Callable, Iterator

import ftfy.bad_codecs  # noqa: F401  registers "sloppy-windows-1252"

from textmill.errors import UserError

BLOCK = 1 << 20
SNIFF = 4096
Opener = Callable[[], IO[bytes]]

_BOMS = [(codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")]
# C0 controls that never occur in text (tab, LF, VT, FF, CR and ESC do)
_CONTROL = bytes(b for b in range(32) if b not in (9, 10, 11, 12, 13, 27))


def _fallback(e: UnicodeDecodeError) -> tuple[str, int]:
    bad = e.object[e.start:e.end]
    return bad.decode("sloppy-windows-1252"), e.end


codecs.register_error("textmill-cp1252", _fallback)


@dataclass(frozen=True)
class Decoding:
    """How to decode a file: `codec`, and whether undecodable bytes fall back to cp1252 per line (`fallback`)."""

    codec: str
    fallback: bool = False

    @property
    def line_safe(self) -> bool:
        """Whether lines can be split on b"\\n" before decoding (ASCII-compatible codecs; not UTF-16)."""
        return not self.codec.startswith("utf-16")


def _nul_pattern(head: bytes) -> str | None:
    """UTF-16 without BOM (ASCII-range text puts NULs in every other byte), else None."""
    even, odd = head[0::2].count(0), head[1::2].count(0)
    half = max(1, len(head) // 2)
    if odd / half > 0.3 and even / half < 0.05:
        return "utf-16-le"
    if even / half > 0.3 and odd / half < 0.05:
        return "utf-16-be"
    return None


def _binary(head: bytes) -> bool:
    """A head where control bytes are common (images, archives, executables): not a stray NUL in a text row."""
    controls = len(head) - len(head.translate(None, _CONTROL))
    return controls >= 4 and controls > 0.02 * len(head)


def first_bad_offset(opener: Opener, codec: str) -> int | None:
    """Byte offset of the first undecodable byte under `codec`, or None when the whole stream decodes.

    Bytes the incremental decoder holds back at a block boundary (a split multi-byte sequence) are counted where they
    are in the file, so the offset names the offending byte itself."""
    decoder = codecs.getincrementaldecoder(codec)()
    offset = 0
    with opener() as f:
        while True:
            block = f.read(BLOCK)
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                return offset - pending + e.start
            if not block:
                return None
            offset += len(block)


def _utf8_census(opener: Opener) -> tuple[int, int]:
    """(valid non-ASCII characters, invalid bytes) of the stream read as UTF-8."""
    bad = 0

    def count(e: UnicodeDecodeError) -> tuple[str, int]:
        nonlocal bad
        bad += e.end - e.start
        return "", e.end

    codecs.register_error("textmill-count", count)
    decoder = codecs.getincrementaldecoder("utf-8")("textmill-count")
    valid = 0
    with opener() as f:
        while True:
            block = f.read(BLOCK)
            text = decoder.decode(block, final=not block)
            valid += len(text) - len(text.encode("ascii", "ignore"))
            if not block:
                return valid, bad


# Share of non-blank bytes >= 0x80 above which a non-UTF-8 file is not taken for cp1252: accented letters are a few
# percent of French, German, Spanish or Portuguese text, while Chinese, Japanese, Korean, Cyrillic or Greek in their
# legacy codecs are mostly high bytes (every byte decodes in cp1252, so those became silent mojibake training text).
MAX_CP1252_HIGH_SHARE = 0.3


def _high_share(opener: Opener) -> float:
    """Bytes >= 0x80 as a share of the stream's non-whitespace bytes (0.0 for a blank stream)."""
    high = total = 0
    with opener() as f:
        while block := f.read(BLOCK):
            total += len(block.translate(None, b" \t\r\n"))
            high += len(block) - len(block.translate(None, _HIGH))
    return high / total if total else 0.0


_HIGH = bytes(range(0x80, 0x100))


def detect(opener: Opener, label: str, declared: str = "auto") -> Decoding:
    """How to decode this file; UserError naming the file and the offending byte offset when nothing fits."""
    if declared != "auto":
        try:
            info = codecs.lookup(declared)
        except LookupError:
            raise UserError(f"{label}: unknown encoding {declared!r}; use a Python codec name (utf-8, cp1252, ...) or auto") from None
        if not getattr(info, "_is_text_encoding", True):  # rot13, base64, zlib...: codecs, but not bytes -> text
            raise UserError(f"{label}: {declared!r} is not a text encoding (it does not turn bytes into text); use a "
                            "text codec name (utf-8, cp1252, gb18030, ...) or auto")
        try:
            bad = first_bad_offset(opener, declared)
        except UnicodeError as e:  # not a byte-level failure: e.g. utf-16 without a BOM on a file that has none
            raise UserError(f"{label}: cannot be read as {declared} ({e}); name the exact codec (e.g. utf-16-le) or set "
                            "encoding: auto") from None
        if bad is not None:
            raise UserError(f"{label}: byte offset {bad} is not valid {declared}; fix the file or set encoding: auto")
        return Decoding(declared)
    with opener() as f:
        head = f.read(SNIFF)
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return Decoding(codec)
    if b"\x00" in head and (codec := _nul_pattern(head)):
        return Decoding(codec)
    if _binary(head):
        raise UserError(f"{label}: looks like a binary file (control bytes), not text; remove it or narrow the corpus "
                        "`files:` globs / `exclude:`")
    valid, bad = _utf8_census(opener)
    if bad == 0:
        return Decoding("utf-8")
    if valid >= bad:  # mostly UTF-8: the stray bytes are decoded as cp1252, record by record
        return Decoding("utf-8", fallback=True)
    bad_at = first_bad_offset(opener, "cp1252")
    if bad_at is None:
        high = _high_share(opener)
        if high > MAX_CP1252_HIGH_SHARE:  # cp1252 decodes any byte: guard against reading GBK or cp1251 as Latin
            raise UserError(f"{label}: not UTF-8, and read as cp1252 {high:.0%} of its non-blank bytes would be accented "
                            "Latin letters or symbols (Western text has a few percent): it is most likely in another "
                            "encoding (GBK/GB18030 or Big5 for Chinese, Shift-JIS for Japanese, cp1251 for Cyrillic, "
                            "...); set the corpus `encoding:` (or --encoding) to its codec, or re-save it as UTF-8")
        return Decoding("cp1252")
    raise UserError(f"{label}: undecodable bytes at offset {bad_at} (neither UTF-8 nor cp1252); "
                    "re-save the file as UTF-8 or set the corpus `encoding:` to its codec (e.g. latin-1)")


_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")


class Overlong(str):
    """What `Lines` yields in place of a line longer than its limit: a bare newline (parsers stay in step) that readers
    recognise with `isinstance` and turn into a `too_long` rejection."""


OVERLONG = Overlong("\n")


class Lines:
    """Text lines of a byte stream, decoded line by line, each at most `limit` characters (about; bytes for ASCII-
    compatible codecs). Lines end at \\n, \\r\\n or a lone \\r, which are kept (the newlines repair counts them).

    `fallbacks` counts lines that needed the cp1252 fallback (the record reader compares it before and after each record
    to count `encoding_fallback`). A line longer than the limit is read to its end in blocks but never held, and yields
    as `OVERLONG`; `head` keeps its first characters for the rejection's excerpt."""

    def __init__(self, raw: IO[bytes], decoding: Decoding, limit: int):
        self.raw, self.decoding, self.limit = raw, decoding, max(limit, 1024)
        self.fallbacks = 0
        self.head = ""  # the first characters of the last over-long line (for the rejection's excerpt)

    def __iter__(self) -> Iterator[str]:
        if not self.decoding.line_safe:
            yield from self._text_lines()
            return
        codec = self.decoding.codec
        for n, line in enumerate(self._byte_lines()):
            if line is None:
                yield OVERLONG
                continue
            text = self._decode(line, codec if n == 0 or codec != "utf-8-sig" else "utf-8")
            if "\r" in text[:-1]:  # a lone CR ends a line too (classic Mac files)
                yield from _LINE.findall(text)
            else:
                yield text

    def _byte_lines(self) -> Iterator[bytes | None]:
        """Lines split on b"\n" from BLOCK-sized reads (a file object's own readline peeks a few hundred bytes at a time
        in zip members); None for a line longer than the limit, which is read through and dropped."""
        buf, pos, dropping = b"", 0, False
        while True:
            nl = buf.find(b"\n", pos)
            if nl >= 0:
                if dropping:
                    dropping = False
                    yield None
                else:
                    yield buf[pos:nl + 1]
                pos = nl + 1
                continue
            rest = buf[pos:]
            if len(rest) > self.limit:
                if not dropping:
                    self.head = rest[:400].decode(self.decoding.codec, "replace")
                dropping, rest = True, b""
            block = self.raw.read(BLOCK)
            if not block:
                if dropping:
                    yield None
                elif rest:
                    yield rest
                return
            buf, pos = rest + block, 0

    def _decode(self, line: bytes, codec: str) -> str:
        try:
            return line.decode(codec)
        except UnicodeDecodeError:
            if not self.decoding.fallback:
                raise
            self.fallbacks += 1
            return line.decode(codec, "textmill-cp1252")

    def _text_lines(self) -> Iterator[str]:
        import io

        text = io.TextIOWrapper(self.raw, encoding=self.decoding.codec, newline="")
        while line := text.readline(self.limit):
            if len(line) >= self.limit and not line.endswith(("\n", "\r")):
                self.head = line[:400]
                while (more := text.readline(BLOCK)) and not more.endswith(("\n", "\r")):
                    pass
                yield OVERLONG
                continue
            yield line
