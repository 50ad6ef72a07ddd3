"""Raw corpus files -> records: globbing, `.zip` members read in place, format by extension, encoding per file, ids.

Everything streams: one record at a time from each file in sorted order, so the cleaner's memory does not grow with the
corpus. Raw files are opened read-only; nothing under the raw folder is ever written.
"""

from __future__ import annotations

import string
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Optional

from pipelines.readers import encoding, formats
from pipelines.readers.formats import Malformed
from textmill.errors import UserError

EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
              ".txt": "txt", ".text": "txt", ".md": "txt", ".parquet": "parquet", ".pq": "parquet"}
FORMATS = ("auto", "csv", "tsv", "json", "jsonl", "txt", "parquet")


@dataclass
class Record:
    """One raw record: `fields` parsed, or `malformed` saying why not (then it becomes a rejection)."""

    id: str
    source: str
    fields: dict
    malformed: Optional[Malformed] = None


@dataclass
class ReadOptions:
    format: str = "auto"
    split: str = "file"
    encoding: str = "auto"
    template: str = "{text}"
    id_field: Optional[str] = None
    required: tuple[str, ...] = ()  # fields the empty check reads: columnar readers must load them too

    def columns(self) -> list[str]:
        """Every field a record needs: template placeholders, the id field and the required fields."""
        return sorted(set(template_fields(self.template)) | ({self.id_field} if self.id_field else set())
                      | set(self.required))


def template_fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as e:
        raise UserError(f"text template {template!r} is malformed ({e}); use {{field}} placeholders, {{{{ for a brace") from None


def resolve(root: Path, globs: list[str]) -> list[Path]:
    """Files under `root` matching the globs, sorted and unique; UserError when the folder or every match is missing."""
    if not root.is_dir():
        raise UserError(f"{root}: no such raw corpus folder; put the corpus files there (or `dvc pull` it)")
    found = sorted({p for g in globs for p in root.glob(g) if p.is_file() and not p.name.startswith(".")})
    if not found:
        raise UserError(f"{root}: no files match {globs}; fix the corpus `files:` globs")
    return found


def _format_of(name: str, opts: ReadOptions, label: str) -> str:
    if opts.format != "auto":
        return opts.format
    fmt = EXTENSIONS.get(Path(name).suffix.lower())
    if fmt is None:
        raise UserError(f"{label}: cannot tell the format from the extension; set the corpus `format:` "
                        f"({', '.join(FORMATS[1:])}) or exclude it from `files:`")
    return fmt


def _sniff_json(text: IO[str]) -> str:
    """`.json` is a JSON array when its first non-blank character is `[`, otherwise JSON Lines."""
    while True:
        ch = text.read(1)
        if not ch or not ch.isspace():
            return "json" if ch == "[" else "jsonl"


def _parse(opener: Callable[[], IO[bytes]], label: str, fmt: str, opts: ReadOptions) -> Iterator[tuple[int, dict | Malformed]]:
    if fmt == "parquet":
        with opener() as raw:
            yield from formats.read_parquet(raw, label, opts.columns())
        return
    codec = encoding.detect(opener, label, opts.encoding)
    if fmt == "json":
        with formats.text_stream(opener(), codec) as text:
            fmt = _sniff_json(text)
    with formats.text_stream(opener(), codec) as text:
        if fmt in ("csv", "tsv"):
            yield from formats.read_csv(text, label, "\t" if fmt == "tsv" else ",")
        elif fmt == "jsonl":
            yield from formats.read_jsonl(text, label)
        elif fmt == "json":
            yield from formats.read_json_array(text, label)
        elif fmt == "txt":
            yield from formats.read_txt(text, opts.split)
        else:
            raise UserError(f"{label}: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _records(opener, label: str, name: str, opts: ReadOptions) -> Iterator[Record]:
    fmt = _format_of(name, opts, label)
    needed = template_fields(opts.template) + ([opts.id_field] if opts.id_field else [])
    first = True
    try:
        for row, fields in _parse(opener, label, fmt, opts):
            if isinstance(fields, Malformed):
                yield Record(f"{label}:{row}", label, {}, fields)
                continue
            missing = [f for f in needed if f not in fields]
            if missing and first:  # the file's first record: a misspelt template, not one odd record
                raise UserError(f"{label}:{row}: record has no field(s) {missing} (it has {sorted(fields)}); "
                                "fix the `text:` template / `id:` (or --text / --id)")
            first = False
            if missing:
                yield Record(f"{label}:{row}", label, {}, Malformed("missing_field", f"row {row}: no field(s) {missing}"))
                continue
            rid = fields.get(opts.id_field) if opts.id_field else None
            yield Record(str(rid) if rid not in (None, "") else f"{label}:{row}", label, fields)
    except UnicodeDecodeError as e:
        raise UserError(f"{label}: undecodable bytes ({e.reason}); re-save it as UTF-8 or set the corpus `encoding:`") from None
    except zipfile.BadZipFile as e:
        raise UserError(f"{label}: corrupt zip member ({e}); re-download the archive") from None


def _zip_records(path: Path, label: str, opts: ReadOptions) -> Iterator[Record]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise UserError(f"{label}: corrupt or not a zip archive ({e}); re-download it or remove it from `files:`") from None
    with archive:
        members = sorted(i.filename for i in archive.infolist()
                         if not i.is_dir() and not i.filename.startswith("__MACOSX/") and not Path(i.filename).name.startswith("."))
        for member in members:
            yield from _records(lambda m=member: archive.open(m), f"{label}:{member}", member, opts)


def iter_records(files: list[tuple[Path, str]], opts: ReadOptions) -> Iterator[Record]:
    """Records of every (path, label) in order; the label (path relative to the corpus root) prefixes derived ids."""
    template_fields(opts.template)
    for path, label in files:
        if path.suffix.lower() == ".zip":
            yield from _zip_records(path, label, opts)
        else:
            yield from _records(lambda p=path: open(p, "rb"), label, path.name, opts)
