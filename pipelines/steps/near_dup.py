"""Near-duplicates: MinHash of word n-gram shingles (worker) looked up in a MinHash LSH index (parent), first kept.

The index stores band hashes only, not texts. A document is a near-duplicate when LSH finds an earlier kept document
whose estimated Jaccard similarity reaches `threshold`; candidates are verified against their stored MinHash values so
band collisions below the threshold do not drop anything.
"""

from __future__ import annotations

import re
import zlib
from typing import Optional

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

from textmill.pipelines.steps.base import Doc, Filter

_WORD = re.compile(r"\w+")
SEED = 1
SCHEME = "affine32"   # datasketch 2 needs the scheme named when rebuilding a MinHash from its values


class Shingler:
    """Per-process MinHash builder; the permutations are drawn once (seeded) instead of per document."""

    def __init__(self, num_perm: int, ngram: int):
        self.num_perm, self.ngram = num_perm, ngram
        # crc32 (C, stable across processes) instead of datasketch's default sha1: the affine permutations that follow do
        # the mixing, and hashing every shingle through sha1 was the worker's second-largest cost after language detection.
        self._template = MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME, hashfunc=zlib.crc32)

    def signature(self, text: str) -> np.ndarray:
        words = _WORD.findall(text.casefold())
        n = self.ngram
        grams = {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}
        m = self._template
        m.clear()  # reused rather than copied per document: copy() cost as much as hashing the shingles
        m.update_batch([g.encode("utf-8") for g in grams])
        return m.hashvalues.copy()


class NearDedup(Filter):
    def __init__(self, threshold: float, num_perm: int):
        self.threshold, self.num_perm = threshold, num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.kept: dict[int, LeanMinHash] = {}
        self.ids: list[str] = []

    def original(self, doc: Doc) -> Optional[str]:
        """The id of the earliest indexed (kept) document similar enough to `doc`, or None; does not index `doc`."""
        m = LeanMinHash(seed=SEED, hashvalues=doc.minhash, scheme=SCHEME)
        for key in sorted(self.lsh.query(m)):
            if self.kept[key].jaccard(m) >= self.threshold:
                return self.ids[key]
        return None

    def find(self, doc: Doc) -> Optional[str]:
        """"near_duplicate" if an indexed (kept) document is similar enough; does not index `doc`."""
        return "near_duplicate" if self.original(doc) is not None else None

    def add(self, doc: Doc) -> None:
        """Index a document that was kept."""
        m = LeanMinHash(seed=SEED, hashvalues=doc.minhash, scheme=SCHEME)
        key = len(self.kept)
        self.kept[key] = m
        self.ids.append(doc.id)
        self.lsh.insert(key, m, check_duplication=False)

    def keep(self, doc: Doc) -> Optional[str]:
        reason = self.find(doc)
        if reason is None:
            self.add(doc)
        return reason
