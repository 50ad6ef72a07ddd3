"""Exact duplicates after normalisation (case, whitespace, Unicode compatibility forms), first occurrence kept.

The worker turns each text into a 16-byte BLAKE2 digest; the parent keeps those digests with the id of the document
each came from first (so a rejection names what it duplicates): memory grows by ~150 bytes per document, never by its
text.
"""

from __future__ import annotations

import hashlib
import unicodedata
from typing import Optional

from textmill.pipelines.steps.base import Doc, Filter


def signature(text: str) -> bytes:
    normal = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return hashlib.blake2b(normal.encode("utf-8"), digest_size=16).digest()


class ExactDedup(Filter):
    def __init__(self) -> None:
        self.seen: dict[bytes, str] = {}

    def original(self, doc: Doc) -> Optional[str]:
        """The id of the earlier document `doc` duplicates, or None (then `doc` is remembered as the first)."""
        first = self.seen.get(doc.signature)
        if first is None:
            self.seen[doc.signature] = doc.id
        return first

    def keep(self, doc: Doc) -> Optional[str]:
        return "duplicate" if self.original(doc) is not None else None
