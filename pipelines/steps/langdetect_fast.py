"""langdetect's scoring, same answers faster: its n-gram sampling loop runs on numpy rows instead of 55-float Python loops.

`langdetect.Detector._detect_block` spends ~90% of a document's time in two Python loops: `_extract_ngrams` (one
`NGram.add_char` call per character) and `_update_lang_prob` (a 55-language multiply loop per sampled n-gram, hundreds
per document). This file runs the same algorithm with the same random stream (seed, one `gauss` per trial, one
`choice` per sample), the same float operations in the same order (elementwise multiply, sequential sum, divide), and
the same convergence checks (after the 1st sample, then every 5th), so (language, probability) are bit-identical to
langdetect 1.0.9; tests compare the two on real documents. Text cleaning (`append`, `cleaning_text`) is langdetect's own.
"""

from __future__ import annotations

import random

import numpy as np
from langdetect.detector import Detector
from langdetect.utils.ngram import NGram

WORD_CACHE = 100_000   # words -> n-gram rows; cleared when full (bounded memory per worker)


class FastLangdetect:
    """Built from a loaded `DetectorFactory`; `__call__(text)` -> (lang, prob) exactly as `factory.create()` would give,
    or ("", 0.0) where langdetect finds no features (it raises) or no language above its 0.1 threshold."""

    def __init__(self, factory):
        self.factory = factory
        words = factory.word_lang_prob_map
        self.index = {w: i for i, w in enumerate(words)}
        self.table = np.array(list(words.values()), dtype=np.float64)   # n-grams x languages (~38 MB for 55 languages)
        self._char_map: dict[int, str] = {}
        self._known: set[str] = set()
        self._words: dict[str, list[int]] = {}

    def __call__(self, text: str) -> tuple[str, float]:
        best = self.scores(text)
        return best[0] if best else ("", 0.0)

    def scores(self, text: str) -> list[tuple[str, float]]:
        """Every language above langdetect's 0.1 reporting threshold, most probable first (`detect_langs`' answer)."""
        detector: Detector = self.factory.create()
        detector.append(text)
        detector.cleaning_text()
        rows = self._ngram_rows(detector.text)
        if not rows:  # no letters langdetect knows (it raises "No features in text")
            return []
        return [(x.lang, float(x.prob)) for x in detector._sort_probability(self._sample(detector, rows).tolist())]

    def _normalized(self, text: str) -> str:
        """`NGram.normalize` on every character, through a translate table that grows by the characters seen so far."""
        for ch in set(text).difference(self._known):
            self._char_map[ord(ch)] = NGram.normalize(ch)
            self._known.add(ch)
        return text.translate(self._char_map)

    def _ngram_rows(self, text: str) -> list[int]:
        """`Detector._extract_ngrams` as table rows, word by word: its n-gram window and capital-word state restart at every
        space, so a word's n-grams depend only on the word (and on whether a space follows it) and can be cached."""
        words = self._normalized(text).split(" ")
        rows: list[int] = []
        cache = self._words
        if len(cache) > WORD_CACHE:
            cache.clear()
        for n, word in enumerate(words):
            if word:
                key = word + " " if n < len(words) - 1 else word
                found = cache.get(key)
                if found is None:
                    found = cache[key] = self._window_rows(key)
                rows += found
        return rows

    def _window_rows(self, text: str) -> list[int]:
        """langdetect's per-character loop (`NGram.add_char` inlined) over already normalised text."""
        index, rows = self.index, []
        grams, capital = " ", False
        for ch in text:
            last = grams[-1]
            if last == " ":
                grams, capital = " ", False
                if ch == " ":
                    continue
            elif len(grams) >= NGram.N_GRAM:
                grams = grams[1:]
            grams += ch
            if ch.isupper():
                if last.isupper():
                    capital = True
            else:
                capital = False
            if capital:
                continue
            for n in range(1, min(len(grams), NGram.N_GRAM) + 1):
                w = grams[-n:]
                if w != " ":
                    i = index.get(w)
                    if i is not None:
                        rows.append(i)
        return rows

    def _sample(self, d: Detector, rows: list[int]) -> np.ndarray:
        """`Detector._detect_block`'s trials. Samples between convergence checks are drawn first, then applied as rows.

        `random.choice(seq)` is `seq[_randbelow(len(seq))]`, i.e. getrandbits(bit_length) redrawn while out of range;
        it is inlined here (same draws) because it is called hundreds of times per document."""
        rng = random.Random()
        rng.seed(d.seed)
        bits, n_rows, n_lang = len(rows).bit_length(), len(rows), len(d.langlist)
        getrandbits, table = rng.getrandbits, self.table
        langprob = np.zeros(n_lang)
        for _ in range(d.n_trial):
            prob = np.array(d.prior_map, dtype=np.float64) if d.prior_map is not None else np.full(n_lang, 1.0 / n_lang)
            weight = (d.alpha + rng.gauss(0.0, 1.0) * d.ALPHA_WIDTH) / d.BASE_FREQ
            i = 0
            while True:
                block = 1 if i == 0 else 5       # langdetect checks convergence at i = 0, 5, 10, ...
                picks = []
                for _ in range(block):
                    r = getrandbits(bits)
                    while r >= n_rows:
                        r = getrandbits(bits)
                    picks.append(rows[r])
                factors = table.take(picks, axis=0)
                np.add(factors, weight, out=factors)
                factors[0] *= prob
                prob = np.multiply.reduce(factors, axis=0)   # row by row: ((prob * f1) * f2) ... as langdetect
                i += block - 1
                values = prob.tolist()
                total = sum(values)              # Python's sum, in langdetect's order
                prob /= total
                # max(p / total) == max(p) / total: division by a positive number and its rounding are monotonic.
                if max(values) / total > d.CONV_THRESHOLD or i >= d.ITERATION_LIMIT:
                    break
                i += 1
            langprob += prob / d.n_trial
        return langprob
