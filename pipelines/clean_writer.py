"""Writing a clean corpus folder (the writer beside `clean_io`'s reader): docs (JSONL or Parquet) and rejected.jsonl.

Output is a pure function of the documents in order (fixed field order, no timestamps), so identical input and params
give byte-identical files and DVC's cache hits.
"""

from __future__ import annotations

import json
from pathlib import Path

from textmill.pipelines.clean_io import DOC_FIELDS, REJECTED_FIELDS
from textmill.pipelines.steps.base import Doc

PARQUET_ROW_GROUP = 10_000


def _line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


class CorpusWriter:
    """Streams kept documents and rejections into `folder` (a temp folder the caller renames into place)."""

    def __init__(self, folder: Path, output_format: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.format = folder, output_format
        self.rejected = (folder / "rejected.jsonl").open("w", encoding="utf-8", newline="\n")
        self.docs = (folder / "docs.jsonl").open("w", encoding="utf-8", newline="\n") if output_format == "jsonl" else None
        self._rows: list[dict] = []
        self._parquet = None

    def doc(self, doc: Doc) -> None:
        row = dict(zip(DOC_FIELDS, (doc.id, doc.text, doc.lang, doc.lang_prob, doc.source, list(doc.fixes), doc.langs)))
        if self.docs is not None:
            self.docs.write(_line(row))
            return
        self._rows.append(row)
        if len(self._rows) >= PARQUET_ROW_GROUP:
            self._flush_parquet()

    def reject(self, doc: Doc, reason: str, excerpt: str, duplicate_of: str | None = None,
               langs: dict[str, float] | None = None) -> None:
        values = (doc.id, doc.source, reason, excerpt, duplicate_of, langs or {})
        self.rejected.write(_line(dict(zip(REJECTED_FIELDS, values))))

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("lang", pa.string()), ("lang_prob", pa.float64()),
                            ("source", pa.string()), ("fixes", pa.list_(pa.string())),
                            ("langs", pa.map_(pa.string(), pa.float64()))])
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.folder / "docs.parquet", schema, compression="zstd")
        rows = [{**r, "langs": list(r["langs"].items())} for r in self._rows]
        self._parquet.write_table(pa.Table.from_pylist(rows, schema=schema))
        self._rows = []

    def close(self) -> None:
        self.rejected.close()
        if self.docs is not None:
            self.docs.close()
            return
        if self._rows or self._parquet is None:
            self._flush_parquet()
        self._parquet.close()

    @property
    def docs_path(self) -> Path:
        return self.folder / ("docs.jsonl" if self.format == "jsonl" else "docs.parquet")
