"""Record readers, one per raw format, each streaming: they yield (row, fields) or (row, Malformed) one record at a time.

`row` is the 1-based record number in the file (for JSON Lines, the line number), used for stable ids and messages.
Text formats read from `encoding.Lines` (decoded line by line, each line bounded), so no record is held past the record
limit: a longer one becomes a `too_long` rejection while it is read.
"""

from __future__ import annotations

import csv
import decimal
import json
import sys
from dataclasses import dataclass
from typing import IO, Iterable, Iterator

from textmill.pipelines.readers.dialect import Dialect
from textmill.pipelines.readers.encoding import Overlong
from textmill.errors import UserError

JSON_BLOCK = 1 << 16
NO_LIMIT = 1 << 62
EXCERPT = 200


# Python's int() refuses a digit string over sys.get_int_max_str_digits() (4,300) with a ValueError, and its json module
# recurses once per nesting level (RecursionError near 1,000): valid JSON that must stay one record's problem, never a
# traceback. A long integer (an id of 5,000 digits) is kept exactly, as a Decimal (read back as its digits); a record
# nested too deep is `malformed_json`.
_MAX_INT_DIGITS = (sys.get_int_max_str_digits() or 4300) - 1


def _parse_int(digits: str) -> int | decimal.Decimal:
    return int(digits) if len(digits) <= _MAX_INT_DIGITS else decimal.Decimal(digits)


def _loads(text: str):
    return json.loads(text, parse_int=_parse_int)


@dataclass
class Malformed:
    """A record that could not be parsed (or was too long to hold): a rejection, the rest of the file still read."""

    reason: str
    excerpt: str


def read_csv(lines: Iterable[str], label: str, dialect: Dialect = Dialect(),
             limit: int = 1 << 31) -> Iterator[tuple[int, dict | Malformed]]:
    """Rows as dicts keyed by the header (or by column number "1", "2", ... when `dialect.header` is off)."""
    csv.field_size_limit(max(limit, 1024))  # a longer field is a csv.Error, turned into `too_long` below
    lines = _Watch(lines)
    reader = dialect.reader(lines)
    header = None
    if dialect.header:
        try:
            header = _unique_names([h.strip() for h in next(reader)])
        except StopIteration:
            return
        except csv.Error as e:
            raise UserError(f"{label}:1: cannot parse the CSV header ({e}); fix the file or set the corpus `csv:` "
                            "dialect (delimiter, quotechar, escapechar, quoting)") from None
    row = 0
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            row += 1
            reason = "too_long" if "field larger than field limit" in str(e) else "malformed_row"
            yield row, Malformed(reason, f"line {reader.line_num}: {e}")
            continue
        if lines.overlong():
            row += 1
            yield row, Malformed("too_long", f"line {reader.line_num}: a line longer than {limit} characters")
            continue
        if not values:
            continue  # a blank line
        row += 1
        if header is None:
            yield row, {str(i): v for i, v in enumerate(values, 1)}
        elif len(values) != len(header):
            yield row, Malformed("malformed_row", f"line {reader.line_num}: {len(values)} fields, header has {len(header)}")
        else:
            yield row, dict(zip(header, values))


def _unique_names(names: list[str]) -> list[str]:
    """Header names made unique the way pandas reads them (`text`, `text.1`, `text.2`): a repeated column name no longer
    lets its last column silently overwrite the first in the record (`{text}` took the wrong column)."""
    seen, out = set(names), []
    counts: dict[str, int] = {}
    for name in names:
        if name in counts:
            while f"{name}.{counts[name]}" in seen:
                counts[name] += 1
            unique = f"{name}.{counts[name]}"
            counts[name] += 1
            seen.add(unique)
            out.append(unique)
        else:
            counts[name] = 1
            out.append(name)
    return out


class _Watch:
    """Lines passed through, noting whether an over-long one went by since the last `overlong()` call."""

    def __init__(self, lines: Iterable[str]):
        self._it, self._seen = iter(lines), False

    def __iter__(self) -> "_Watch":
        return self

    def __next__(self) -> str:
        line = next(self._it)
        self._seen |= isinstance(line, Overlong)
        return line

    def overlong(self) -> bool:
        seen, self._seen = self._seen, False
        return seen


def read_jsonl(lines: Iterable[str], label: str) -> Iterator[tuple[int, dict | Malformed]]:
    parsed_any = False
    for line_no, line in enumerate(lines, 1):
        if isinstance(line, Overlong):
            yield line_no, Malformed("too_long", f"line {line_no}: longer than the record limit")
            continue
        if not line.strip():
            continue
        try:
            obj = _loads(line)
        except RecursionError:
            yield line_no, Malformed("malformed_json", f"line {line_no}: nested too deep: {line[:80]!r}")
            continue
        except json.JSONDecodeError as e:
            if not parsed_any and line_no == 1:
                raise UserError(f"{label}:1: not JSON Lines ({e.msg}); expected one JSON object per line "
                                "or a JSON array, or set the corpus `format:`") from None
            yield line_no, Malformed("malformed_json", f"line {line_no}: {e.msg}: {line[:80]!r}")
            continue
        parsed_any = True
        yield line_no, obj if isinstance(obj, dict) else Malformed("malformed_json", f"line {line_no}: not a JSON object")


def _read(lines: Iterator[str], n: int) -> str:
    """At least `n` characters (whole lines), or what is left."""
    parts, size = [], 0
    for line in lines:
        if isinstance(line, Overlong):
            raise UserError("a JSON array line is longer than the record limit; raise the corpus `max_chars` or "
                            "convert the file to JSON Lines")
        parts.append(line)
        size += len(line)
        if size >= n:
            break
    return "".join(parts)


def read_json_array(lines: Iterable[str], label: str, limit: int = NO_LIMIT) -> Iterator[tuple[int, dict | Malformed]]:
    """A top-level JSON array, decoded element by element from a sliding buffer (the array is never held whole)."""
    it = iter(lines)
    decoder = json.JSONDecoder(parse_int=_parse_int)
    buf, pos, eof, row, block = _read(it, JSON_BLOCK).lstrip(), 1, False, 0, JSON_BLOCK
    if not buf.startswith("["):
        raise UserError(f"{label}: expected a JSON array starting with '['")
    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n,":
            pos += 1
        if pos < len(buf) and buf[pos] == "]":
            return
        try:
            obj, end = decoder.raw_decode(buf, pos)
        except RecursionError:
            raise UserError(f"{label}: JSON array element {row + 1} is nested too deep to read (over about "
                            f"{sys.getrecursionlimit()} levels); fix the element or convert the file to JSON Lines, "
                            "where such a line is rejected as malformed_json") from None
        except json.JSONDecodeError as e:
            if eof:
                raise UserError(f"{label}: malformed JSON array near element {row + 1} ({e.msg}); "
                                "fix the file or convert it to JSON Lines") from None
            if len(buf) - pos > limit:
                raise UserError(f"{label}: JSON array element {row + 1} is longer than the record limit ({limit} "
                                "characters); raise the corpus `max_chars` or convert the file to JSON Lines") from None
            # An incomplete element: read more, doubling the block so a huge element is re-parsed O(log n) times.
            more = _read(it, block)
            block *= 2
            eof = not more
            buf, pos = buf[pos:] + more, 0
            continue
        row, pos, block = row + 1, end, JSON_BLOCK
        yield row, obj if isinstance(obj, dict) else Malformed("malformed_json", f"element {row}: not a JSON object")


def read_txt(lines: Iterable[str], split: str, limit: int = NO_LIMIT) -> Iterator[tuple[int, dict | Malformed]]:
    """`file`: the whole file is one record; `paragraph`: blank-line separated; anything else: that separator line.

    A record past `limit` characters stops being collected there and becomes a `too_long` rejection. A file or section
    with nothing but whitespace is no record (so an empty corpus fails like an empty CSV)."""
    row, parts, size, over = 0, [], 0, False

    def flush():
        text = "".join(parts)
        if over:
            return Malformed("too_long", f"more than {limit} characters: {text[:EXCERPT]!r}")
        return {"text": text} if text.strip() else None

    for line in lines:
        if isinstance(line, Overlong):
            over = True
            continue
        boundary = split != "file" and (not line.strip() if split == "paragraph" else line.strip() == split)
        if boundary:
            if (rec := flush()) is not None:
                row += 1
                yield row, rec
            parts, size, over = [], 0, False
        elif not over:
            size += len(line)
            if size > limit:
                over = True
                parts = parts[:1] if parts else [line[:EXCERPT]]
            else:
                parts.append(line)
    if (rec := flush()) is not None:
        yield row + 1, rec


def read_parquet(raw: IO[bytes], label: str, columns: list[str] | None) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(raw)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{label}: not a readable Parquet file ({e}); re-export it or fix the `files:` globs") from None
    missing = [c for c in columns or [] if c not in pf.schema_arrow.names]
    if missing:
        raise UserError(f"{label}: template/id fields {missing} are not columns ({pf.schema_arrow.names}); fix `text:`/`id:`")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        for rec in batch.to_pylist():
            row += 1
            yield row, rec
