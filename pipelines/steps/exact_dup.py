"""Exact duplicates after normalisation (case, whitespace, Unicode compatibility forms), first occurrence kept.

The worker turns each text into a 16-byte BLAKE2 digest; the parent keeps only those digests, so memory grows by a few
dozen bytes per document, never by its text.
"""

from __future__ import annotations

import hashlib
import unicodedata
from typing import Optional

from pipelines.steps.base import Doc, Filter


def signature(text: str) -> bytes:
    normal = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return hashlib.blake2b(normal.encode("utf-8"), digest_size=16).digest()


class ExactDedup(Filter):
    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def keep(self, doc: Doc) -> Optional[str]:
        if doc.signature in self.seen:
            return "duplicate"
        self.seen.add(doc.signature)
        return None
