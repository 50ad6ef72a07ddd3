"""Cleaning speed: textmill clean (langdetect, fasttext) vs a naive one-process baseline, on the sample corpus scaled up.

The abstracts sample (2.25 MB of JSON Lines) is repeated with id suffixes; each copy after the first shuffles the words of
every line (seeded), so copies are neither exact nor near duplicates but keep their language and their damage. The
baseline cleans the way writeup.ai did: pandas reads the file, `ftfy.fix_text` and `langdetect.detect` per row, one
process. Prints one JSON object: docs/s, MB/s, speedup over the baseline, agreement of the kept documents, and the
share of the input that is duplicates (so the dedup steps cannot be what makes textmill fast).

    .venv/bin/python bench/clean_bench.py [--copies 10] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from textmill.pipelines.clean import clean_files  # noqa: E402
from textmill.pipelines.clean_io import iter_docs  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from textmill.config import CleanConfig, CorpusConfig  # noqa: E402

OUT = REPO / "bench/out/clean"
SAMPLE = REPO / "data/raw/abstracts/package-descriptions.zip"


def shuffle_lines(text: str, rng: random.Random) -> str:
    out = []
    for line in text.split("\n"):
        lead = line[: len(line) - len(line.lstrip(" "))]
        words = line.split(" ")[len(lead):] if lead else line.split(" ")
        rng.shuffle(words)
        out.append(lead + " ".join(words))
    return "\n".join(out)


def build_corpus(copies: int) -> Path:
    path = OUT / f"raw/scaled-{copies}.jsonl"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in zipfile.ZipFile(SAMPLE).open("package-descriptions.json")]
    with path.open("w", encoding="utf-8") as f:
        for c in range(copies):
            for r in rows:
                if c:
                    rng = random.Random(f"{r['id']}:{c}")
                    r = {"id": f"{r['id']}#{c}", "title": shuffle_lines(r["title"], rng),
                         "abstract": shuffle_lines(r["abstract"], rng)}
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def baseline(path: Path, langs: list[str]) -> tuple[float, dict[str, str]]:
    """writeup.ai-style cleaning: pandas, ftfy.fix_text per row, langdetect per row, drop_duplicates; one process."""
    import ftfy
    import pandas as pd
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0

    def lang_of(text: str) -> str:
        try:
            return detect(text)
        except LangDetectException:
            return ""

    start = time.perf_counter()
    df = pd.read_json(path, lines=True, dtype={"id": str})
    df["abstract"] = df["abstract"].map(ftfy.fix_text)
    df["text"] = (df["title"].map(ftfy.fix_text) + "\n\n" + df["abstract"]).str.strip()
    df = df[df["abstract"].str.strip().str.len() >= 40]
    df = df.drop_duplicates("text")
    df["lang"] = df["text"].map(lang_of)
    df = df[df["lang"].isin(langs)]
    return time.perf_counter() - start, dict(zip(df["id"], df["lang"]))


def abstracts_corpus() -> CorpusConfig:
    """The abstracts corpus settings straight from configs/ (not params.yaml, which other stages' edits may be mid-way)."""
    corpus = OmegaConf.merge(OmegaConf.structured(CorpusConfig), OmegaConf.load(REPO / "configs/corpus/abstracts.yaml"))
    return OmegaConf.to_object(corpus)


def textmill(path: Path, detector: str, workers: int) -> tuple[float, dict[str, str], dict]:
    clean = CleanConfig(detector=detector, workers=workers)
    corpus = abstracts_corpus()
    corpus.files, corpus.format = [path.name], "jsonl"
    out = OUT / f"textmill-{detector}"
    start = time.perf_counter()
    report, _ = clean_files([(path, path.name)], corpus, clean, out, "bench")
    seconds = time.perf_counter() - start
    return seconds, {d["id"]: d["lang"] for d in iter_docs(out)}, report


def truth(doc_id: str) -> str:
    return doc_id.split("#")[0].rsplit("_", 1)[1]


def summary(name: str, seconds: float, kept: dict[str, str], n_docs: int, mb: float, base: float | None,
            ref: dict[str, str] | None) -> dict:
    row = {"name": name, "seconds": round(seconds, 2), "docs_per_s": round(n_docs / seconds, 1),
           "mb_per_s": round(mb / seconds, 3), "kept": len(kept),
           "lang_accuracy_of_kept": round(sum(truth(i) == lang for i, lang in kept.items()) / max(1, len(kept)), 5)}
    if base:
        row["speedup_vs_baseline"] = round(base / seconds, 2)
    if ref is not None:
        both = set(kept) & set(ref)
        row["kept_agreement_with_baseline"] = round(len(both) / len(set(kept) | set(ref)), 5)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    path = build_corpus(args.copies)
    mb = path.stat().st_size / 1e6
    n_docs = sum(1 for _ in path.open(encoding="utf-8"))
    langs = list(abstracts_corpus().lang)
    base_s, base_kept = baseline(path, langs)
    rows = [summary("baseline (pandas + ftfy + langdetect, 1 process)", base_s, base_kept, n_docs, mb, None, None)]
    drops = {}
    for detector in ("langdetect", "fasttext"):
        s, kept, report = textmill(path, detector, args.workers)
        rows.append(summary(f"textmill clean --detector {detector}", s, kept, n_docs, mb, base_s, base_kept))
        drops[detector] = report["drops"]
    # Honesty check on the input: how much of it the cheap filters (exact/near duplicates, empty, short) remove.
    dup_share = (drops["fasttext"].get("duplicate", 0) + drops["fasttext"].get("near_duplicate", 0)) / n_docs
    print(json.dumps({"corpus_mb": round(mb, 2), "docs": n_docs, "duplicate_share_of_input": round(dup_share, 5),
                      "drops": drops, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
