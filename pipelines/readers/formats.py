"""Record readers, one per raw format, each streaming: they yield (row, fields) or (row, Malformed) one record at a time.

`row` is the 1-based record number in the file (for JSON Lines, the line number), used for stable ids and messages.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from typing import IO, Iterator

from textmill.errors import UserError

JSON_BLOCK = 1 << 16


@dataclass
class Malformed:
    """A record that could not be parsed: recorded as a rejection, the rest of the file still read."""

    reason: str
    excerpt: str


def _raise_csv_limit() -> None:
    """Fields of many MB (whole books in one cell) are legal CSV; the stdlib's 128 KiB default is not a real limit."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 2


def read_csv(text: IO[str], label: str, delimiter: str) -> Iterator[tuple[int, dict | Malformed]]:
    _raise_csv_limit()
    reader = csv.reader(text, delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise UserError(f"{label}:1: cannot parse the CSV header ({e}); fix the file or set the corpus `format:`") from None
    header = [h.strip() for h in header]
    row = 0
    while True:
        row += 1
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield row, Malformed("malformed_row", f"line {reader.line_num}: {e}")
            continue
        if len(values) != len(header):
            yield row, Malformed("malformed_row", f"line {reader.line_num}: {len(values)} fields, header has {len(header)}")
            continue
        yield row, dict(zip(header, values))


def read_jsonl(text: IO[str], label: str) -> Iterator[tuple[int, dict | Malformed]]:
    parsed_any = False
    for line_no, line in enumerate(text, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if not parsed_any and line_no == 1:
                raise UserError(f"{label}:1: not JSON Lines ({e.msg}); expected one JSON object per line "
                                "or a JSON array, or set the corpus `format:`") from None
            yield line_no, Malformed("malformed_json", f"line {line_no}: {e.msg}: {line[:80]!r}")
            continue
        parsed_any = True
        yield line_no, obj if isinstance(obj, dict) else Malformed("malformed_json", f"line {line_no}: not a JSON object")


def read_json_array(text: IO[str], label: str) -> Iterator[tuple[int, dict | Malformed]]:
    """A top-level JSON array, decoded element by element from a sliding buffer (the array is never held whole)."""
    decoder = json.JSONDecoder()
    buf, pos, eof, row, block = text.read(JSON_BLOCK).lstrip(), 1, False, 0, JSON_BLOCK
    if not buf.startswith("["):
        raise UserError(f"{label}: expected a JSON array starting with '['")
    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n,":
            pos += 1
        if pos < len(buf) and buf[pos] == "]":
            return
        try:
            obj, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError as e:
            if eof:
                raise UserError(f"{label}: malformed JSON array near element {row + 1} ({e.msg}); "
                                "fix the file or convert it to JSON Lines") from None
            # An incomplete element: read more, doubling the block so a huge element is re-parsed O(log n) times.
            more = text.read(block)
            block *= 2
            eof = not more
            buf, pos = buf[pos:] + more, 0
            continue
        row, pos, block = row + 1, end, JSON_BLOCK
        yield row, obj if isinstance(obj, dict) else Malformed("malformed_json", f"element {row}: not a JSON object")


def read_txt(text: IO[str], split: str) -> Iterator[tuple[int, dict]]:
    """`file`: the whole file is one record; `paragraph`: blank-line separated; anything else: that separator line."""
    if split == "file":
        yield 1, {"text": text.read()}
        return
    row, lines = 0, []
    for line in text:
        boundary = not line.strip() if split == "paragraph" else line.strip() == split
        if boundary:
            if "".join(lines).strip():
                row += 1
                yield row, {"text": "".join(lines)}
            lines = []
        else:
            lines.append(line)
    if "".join(lines).strip():
        yield row + 1, {"text": "".join(lines)}


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


def text_stream(raw: IO[bytes], codec: str) -> IO[str]:
    # newline="": keep \r\n and lone \r as they are, so the newlines step sees (and counts) them.
    return io.TextIOWrapper(raw, encoding=codec, newline="")
