"""Per-file text encoding: BOM sniffing (UTF-8, UTF-16 LE/BE), UTF-8 validated by a streaming pass, cp1252 fallback.

UTF-16 without a BOM is recognised by its NUL byte pattern, so it never becomes one garbled document; other files with
NUL bytes are binary and refused. Validation streams the bytes in blocks, so a file larger than RAM is never held whole.
"""

from __future__ import annotations

import codecs
from typing import IO, Callable

from textmill.errors import UserError

BLOCK = 1 << 20
SNIFF = 4096
Opener = Callable[[], IO[bytes]]

_BOMS = [(codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")]


def _nul_pattern(head: bytes, label: str) -> str:
    """UTF-16 without BOM (ASCII-range text puts NULs in every other byte) or a binary file (UserError)."""
    even, odd = head[0::2].count(0), head[1::2].count(0)
    half = max(1, len(head) // 2)
    if odd / half > 0.3 and even / half < 0.05:
        return "utf-16-le"
    if even / half > 0.3 and odd / half < 0.05:
        return "utf-16-be"
    raise UserError(f"{label}: looks like a binary file (NUL bytes), not text; remove it or narrow the corpus `files:` globs")


def _first_bad_offset(opener: Opener, codec: str) -> int | None:
    """Byte offset of the first undecodable byte under `codec`, or None when the whole stream decodes."""
    decoder = codecs.getincrementaldecoder(codec)()
    offset = 0
    with opener() as f:
        while True:
            block = f.read(BLOCK)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                return offset + e.start
            if not block:
                return None
            offset += len(block)


def detect(opener: Opener, label: str, declared: str = "auto") -> str:
    """The codec to read this file with; UserError naming the file and the byte offset when nothing fits."""
    if declared != "auto":
        try:
            codecs.lookup(declared)
        except LookupError:
            raise UserError(f"{label}: unknown encoding {declared!r}; use a Python codec name (utf-8, cp1252, ...) or auto") from None
        bad = _first_bad_offset(opener, declared)
        if bad is not None:
            raise UserError(f"{label}: byte offset {bad} is not valid {declared}; fix the file or set encoding: auto")
        return declared
    with opener() as f:
        head = f.read(SNIFF)
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return codec
    if b"\x00" in head:
        return _nul_pattern(head, label)
    if _first_bad_offset(opener, "utf-8") is None:
        return "utf-8"
    bad = _first_bad_offset(opener, "cp1252")
    if bad is None:
        return "cp1252"
    raise UserError(f"{label}: undecodable bytes at offset {bad} (neither UTF-8 nor cp1252); "
                    "re-save the file as UTF-8 or set the corpus `encoding:` to its codec (e.g. latin-1)")
