"""Several allowed languages (probability mass, distribution recorded) and auditable rejects (issue 10 kinds 6 and 9)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from textmill.pipelines.clean import drops_csv, main as clean_main
from textmill.pipelines.steps.base import Doc
from textmill.pipelines.steps.language import Language, distributions, make_detector

REPO = Path(__file__).resolve().parent.parent
NOTICE = ("Notice to all visitors. The museum will be closed on Monday for maintenance work, and the garden will stay "
          "open as usual. Avis à tous les visiteurs. Le musée sera fermé lundi pour des travaux d'entretien.")
BASE = ("The committee reviewed the annual budget and approved funding for the new library wing, the park "
        "renovation and three additional bus routes serving the northern districts of the city next spring. Members "
        "also asked the finance office to publish quarterly reports on spending, to invite residents to open "
        "hearings before each vote, and to keep a reserve for repairs to schools, bridges and the old harbour wall.")


def clean(tmp_path: Path, rows: list[dict], *extra: str) -> tuple[dict, list[dict], list[dict]]:
    raw = tmp_path / "in.jsonl"
    raw.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    clean_main(["--raw", str(raw), "--out", str(out), "--id", "id", "--set", "clean.workers=1", *extra])
    read = lambda n: [json.loads(x) for x in (out / n).read_text(encoding="utf-8").splitlines()]  # noqa: E731
    return json.loads((out / "report.json").read_text(encoding="utf-8")), read("docs.jsonl"), read("rejected.jsonl")


# --- 6. several allowed languages ------------------------------------------------------------------------------------

def test_mass_on_allowed_languages_decides():
    bilingual = Doc("n", "s", {}, lang="en", lang_prob=0.57, langs={"en": 0.57, "fr": 0.43})
    assert Language(["en", "fr"], 0.8).keep(bilingual) is None
    assert Language(["en"], 0.8).keep(bilingual) == "low_confidence"
    de_it = Doc("m", "s", {}, lang="de", lang_prob=0.55, langs={"de": 0.55, "it": 0.3, "en": 0.15})
    assert Language(["it", "de"], 0.8).keep(de_it) is None
    assert Language(["it", "en"], 0.8).keep(de_it) == "wrong_language"   # top language not allowed, mass 0.45
    fr_top = Doc("f", "s", {}, lang="fr", lang_prob=0.6, langs={"fr": 0.6, "en": 0.4})
    assert Language(["en", "es"], 0.4).keep(fr_top) is None and fr_top.lang == "en"  # labelled as the allowed one


def test_bilingual_notice_detected_with_both_languages():
    [dist] = distributions(make_detector("langdetect", 0), [NOTICE])
    assert set(dist) >= {"en", "fr"} and max(dist.values()) < 0.8 and sum(dist.values()) > 0.95


def test_lang_list_keeps_bilingual_docs_and_records_the_distribution(tmp_path):
    rows = [{"id": "notice", "text": NOTICE}, {"id": "base", "text": BASE}]
    report, docs, rejected = clean(tmp_path, rows, "--lang", "en,fr")
    assert [d["id"] for d in docs] == ["notice", "base"]
    notice = docs[0]
    assert set(notice["langs"]) >= {"en", "fr"} and notice["lang"] in ("en", "fr")
    assert docs[1]["langs"] == {"en": docs[1]["lang_prob"]} and report["drops"] == {}
    report, docs, rejected = clean(tmp_path, rows, "--lang", "en")
    assert [d["id"] for d in docs] == ["base"]
    assert rejected[0]["id"] == "notice" and rejected[0]["reason"] == "low_confidence"
    assert set(rejected[0]["langs"]) >= {"en", "fr"}  # the reason is auditable


# --- 9. auditable rejects --------------------------------------------------------------------------------------------

def test_duplicates_name_what_they_repeat_and_full_text_switch(tmp_path):
    long_short = "Too short."
    near = BASE.replace("old harbour wall", "old harbour walls")
    rows = [{"id": "a", "text": BASE}, {"id": "b", "text": BASE.upper()}, {"id": "c", "text": near},
            {"id": "d", "text": long_short}, {"id": "e", "text": "  " + BASE + "  "}]
    report, docs, rejected = clean(tmp_path, rows)
    assert [d["id"] for d in docs] == ["a"]
    by_id = {r["id"]: r for r in rejected}
    assert (by_id["b"]["reason"], by_id["b"]["duplicate_of"]) == ("duplicate", "a")
    assert (by_id["e"]["reason"], by_id["e"]["duplicate_of"]) == ("duplicate", "a")
    assert (by_id["c"]["reason"], by_id["c"]["duplicate_of"]) == ("near_duplicate", "a")
    assert by_id["d"]["duplicate_of"] is None and by_id["d"]["reason"] == "too_short"
    assert len(by_id["c"]["excerpt"]) == 200                      # default: an excerpt
    _, _, rejected = clean(tmp_path, rows, "--set", "clean.rejected_text=full")
    assert {r["id"]: r["excerpt"] for r in rejected}["c"] == near   # the switch keeps the whole text


def test_drops_plot_leaves_out_zero_reasons_and_is_titled_by_corpus():
    csv_text = drops_csv({"drops": {"duplicate": 3, "too_short": 0, "empty": 2, "custom": 1}})
    assert csv_text == "reason,count\nempty,2\nduplicate,3\ncustom,1\n"
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]["clean"]
    [plot] = stage["do"]["plots"]
    assert plot["reports/clean/${key}-drops.csv"]["title"].startswith("${key}")
