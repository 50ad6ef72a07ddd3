"""Raw corpus files -> records: globbing, archives read in place, format by extension, encoding and CSV dialect per file,
values normalised, stable ids.

`RawCorpus` first plans every file (expands archives, applies include/exclude, decides format, encoding and dialect,
checks archive members) so a bad input stops the run with one line before any work; then it streams records one at a
time in sorted order, so the cleaner's memory does not grow with the corpus. Nothing under the raw folder is written.
"""

from __future__ import annotations

import io
import os
import string
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from textmill.pipelines.readers import archives, dialect as dialects, encoding, formats
from textmill.pipelines.readers.archives import Leaf
from textmill.pipelines.readers.formats import Malformed
from textmill.pipelines.readers.values import normalise_record
from textmill.errors import UserError

EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
              ".txt": "txt", ".text": "txt", ".md": "txt", ".parquet": "parquet", ".pq": "parquet"}
FORMATS = ("auto", "csv", "tsv", "json", "jsonl", "txt", "parquet")
FIELDLESS = ("txt",)  # formats whose records have no named fields but {text}: `id:` does not apply to them


@dataclass
class Record:
    """One raw record: `fields` parsed (text or None), or `malformed` saying why not (then it becomes a rejection).
    `fixes` are repairs the reader already made (`encoding_fallback`)."""

    id: str
    source: str
    fields: dict
    malformed: Optional[Malformed] = None
    fixes: list[str] = field(default_factory=list)


@dataclass
class ReadOptions:
    format: str = "auto"
    split: str = "file"
    encoding: str = "auto"
    template: str = "{text}"
    id_field: Optional[str] = None
    required: tuple[str, ...] = ()  # fields the empty check reads: columnar readers must load them too
    csv: dict[str, Any] = field(default_factory=dict)  # dialect settings; None or absent = sniffed
    include: tuple[str, ...] = ()   # globs over leaf labels (reaching inside archives); empty = all
    exclude: tuple[str, ...] = ()
    record_limit: int = 1 << 22     # characters one raw record may take while read; longer ones are `too_long`

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
    _check_path(root, "raw corpus folder")
    if not root.is_dir():
        raise UserError(f"{root}: no such raw corpus folder; put the corpus files there (or `dvc pull` it)")
    found = sorted({p for g in globs for p in root.glob(g) if p.is_file()})
    if not found:
        raise UserError(f"{root}: no files match {globs}; fix the corpus `files:` globs")
    return found


def _check_path(path: Path, what: str) -> None:
    """UserError for a path that cannot be opened at all (a symlink loop, no permission), naming it."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return  # the caller says what is missing
    except OSError as e:
        raise UserError(f"{path}: cannot open this {what} ({e.strerror}); point at the real file or folder") from None


def format_of(name: str, opts: ReadOptions, label: str) -> str:
    if opts.format != "auto":
        return opts.format
    fmt = EXTENSIONS.get(Path(name).suffix.lower())
    if fmt is None:
        raise UserError(f"{label}: cannot tell the format from the extension; set the corpus `format:` "
                        f"({', '.join(FORMATS[1:])}) or leave it out with `exclude:` (or `files:`)")
    return fmt


@dataclass
class Source:
    """A planned leaf: how to read it."""

    leaf: Leaf
    format: str
    decoding: Optional[encoding.Decoding] = None
    dialect: Optional[dialects.Dialect] = None


class RawCorpus:
    """The raw files of one corpus, planned on entry (all checks, before any work) and read with `records()`.

    After entry: `skipped` counts files left out (junk, links, excluded), `dialects` maps each CSV/TSV leaf to the dialect
    it is read with, `encodings` each text leaf to its codec (`+cp1252` when stray bytes fall back)."""

    def __init__(self, files: list[tuple[Path, str]], opts: ReadOptions):
        template_fields(opts.template)
        dialects.check(opts.csv, "csv")
        if opts.format not in FORMATS:
            raise UserError(f"unknown format {opts.format!r}; choose one of {', '.join(FORMATS)}")
        self.files, self.opts = files, opts
        self.skipped: dict[str, int] = {}
        self.sources: list[Source] = []
        self._stack = ExitStack()

    def __enter__(self) -> "RawCorpus":
        try:
            for path, label in self.files:
                _check_path(path, "file")
                if archives.is_junk(label):
                    self._skip("junk")
                    continue
                try:
                    for leaf in archives.expand(lambda p=path: open(p, "rb"), label, path.name, self._stack,
                                                self.skipped):
                        if not archives.selected(leaf.label, list(self.opts.include), list(self.opts.exclude)):
                            self._skip("excluded")
                            continue
                        self.sources.append(self._plan(leaf))
                except PermissionError as e:
                    raise UserError(f"{path}: cannot read it ({e.strerror}); fix its permissions or leave it out "
                                    "with `exclude:`") from None
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    @property
    def dialects(self) -> dict[str, dict]:
        return {s.leaf.label: s.dialect.report() for s in self.sources if s.dialect}

    @property
    def encodings(self) -> dict[str, str]:
        return {s.leaf.label: s.decoding.codec + ("+cp1252" if s.decoding.fallback else "")
                for s in self.sources if s.decoding}

    def _plan(self, leaf: Leaf) -> Source:
        """Format, encoding and dialect of one leaf; reading it whole once also checks archive members' CRCs."""
        fmt = format_of(leaf.name, self.opts, leaf.label)
        try:
            if fmt == "parquet":
                return Source(leaf, fmt)
            decoding = encoding.detect(leaf.opener, leaf.label, self.opts.encoding)
            src = Source(leaf, fmt, decoding)
            if fmt in ("json", "csv", "tsv"):
                with self._text(src) as text:
                    head = text.read(dialects.SNIFF_CHARS)
                if fmt == "json":
                    src.format = "json" if head.lstrip()[:1] == "[" else "jsonl"
                else:
                    src.dialect = dialects.sniff(head, fmt, self.opts.csv)
            return src
        except UnicodeDecodeError as e:
            raise UserError(f"{leaf.label}: undecodable bytes ({e.reason}); re-save it as UTF-8 or set the corpus "
                            "`encoding:`") from None
        except NotImplementedError as e:
            raise UserError(f"{leaf.label}: cannot read this archive member ({e}); extract the archive and point the "
                            "corpus at the extracted files") from None
        except archives.ARCHIVE_ERRORS as e:
            raise UserError(f"{leaf.label}: corrupt archive member ({type(e).__name__}: {e}); re-download the archive "
                            "or leave the member out with `exclude:`") from None

    @staticmethod
    def _text(src: Source) -> io.TextIOWrapper:
        codec = src.decoding.codec
        return io.TextIOWrapper(src.leaf.opener(), encoding=codec,
                                errors="textmill-cp1252" if src.decoding.fallback else "strict", newline="")

    def records(self) -> Iterator[Record]:
        """Records of every planned leaf in order; the label (path relative to the corpus root) prefixes derived ids."""
        for src in self.sources:
            yield from self._records(src)

    def _parse(self, src: Source, lines: Optional[encoding.Lines]) -> Iterator[tuple[int, dict | Malformed]]:
        opts, label = self.opts, src.leaf.label
        if src.format == "parquet":
            with src.leaf.opener() as raw:
                yield from formats.read_parquet(raw, label, opts.columns())
        elif src.format in ("csv", "tsv"):
            yield from formats.read_csv(lines, label, src.dialect, opts.record_limit)
        elif src.format == "jsonl":
            yield from formats.read_jsonl(lines, label)
        elif src.format == "json":
            yield from formats.read_json_array(lines, label, opts.record_limit)
        else:
            yield from formats.read_txt(lines, opts.split, opts.record_limit)

    def _records(self, src: Source) -> Iterator[Record]:
        opts, label = self.opts, src.leaf.label
        fieldless = src.format in FIELDLESS
        id_field = None if fieldless else opts.id_field
        needed = template_fields(opts.template) + ([id_field] if id_field else [])
        required = set(opts.required)
        normalise = src.format in ("json", "jsonl", "parquet")
        first = True
        with ExitStack() as stack:
            lines = None
            if src.decoding is not None:
                lines = encoding.Lines(stack.enter_context(src.leaf.opener()), src.decoding, opts.record_limit)
            parsed = self._parse(src, lines)
            fallbacks = 0
            try:
                for row, fields in parsed:
                    fixes = []
                    if lines is not None and lines.fallbacks != fallbacks:
                        fallbacks = lines.fallbacks
                        fixes.append("encoding_fallback")
                    if isinstance(fields, Malformed):
                        yield Record(f"{label}:{row}", label, {}, fields)
                        continue
                    if normalise:
                        fields, fell_back = normalise_record(fields)
                        if fell_back and not fixes:
                            fixes.append("encoding_fallback")
                    missing = [f for f in needed if f not in fields]
                    if missing and first:  # the file's first record: a misspelt template, not one odd record
                        raise UserError(f"{label}:{row}: record has no field(s) {missing} (it has {sorted(fields)}); "
                                        "fix the `text:` template / `id:` (or --text / --id)")
                    first = False
                    null = [f for f in required if fields.get(f) is None]
                    if missing or null:
                        why = f"no field(s) {missing}" if missing else f"null field(s) {sorted(null)}"
                        yield Record(f"{label}:{row}", label, {}, Malformed("missing_field", f"row {row}: {why}"), fixes)
                        continue
                    rid = fields.get(id_field) if id_field else None
                    yield Record(rid if rid not in (None, "") else f"{label}:{row}", label, fields, None, fixes)
            except UnicodeDecodeError as e:
                raise UserError(f"{label}: undecodable bytes ({e.reason}); re-save it as UTF-8 or set the corpus "
                                "`encoding:`") from None
            except archives.ARCHIVE_ERRORS as e:
                raise UserError(f"{label}: corrupt archive member ({e}); re-download the archive") from None


def iter_records(files: list[tuple[Path, str]], opts: ReadOptions) -> Iterator[Record]:
    """Records of every (path, label) in order (plans the files first: see `RawCorpus`)."""
    with RawCorpus(files, opts) as corpus:
        yield from corpus.records()
