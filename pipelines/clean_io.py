"""Reading a clean corpus folder (data/clean/<corpus>/): the contract between `clean` and its consumers (base, prepare)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from textmill.errors import UserError

DOC_FIELDS = ("id", "text", "lang", "lang_prob", "source", "fixes", "langs")
# duplicate_of: the id a `duplicate`/`near_duplicate` repeats (else null); langs: the language distribution where the
# language step decided (else {}); excerpt: the first 200 characters, or the whole text with clean.rejected_text=full
REJECTED_FIELDS = ("id", "source", "reason", "excerpt", "duplicate_of", "langs")


def docs_path(folder: str | Path) -> Path:
    folder = Path(folder)
    for name in ("docs.jsonl", "docs.parquet"):
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder}: no clean corpus here (expected docs.jsonl or docs.parquet); run `textmill clean` first")


def iter_docs(folder: str | Path) -> Iterator[dict]:
    """Kept documents in file order, one dict per document (fields DOC_FIELDS), streaming."""
    path = docs_path(folder)
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
        return
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            row["langs"] = dict(row.get("langs") or [])  # a Parquet map column reads back as (key, value) pairs
            yield row
