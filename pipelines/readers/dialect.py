"""CSV/TSV dialects: what the corpus config and flags set, the rest sniffed from the head of each file.

Kaggle dumps vary: `;`- or `|`-separated exports, backslash-escaped quotes (`\\"`, MySQL/PHP exports of reviews), TSV with
no quoting at all (IMDb's title.basics.tsv has bare `"` inside fields). The sniffer parses the head of the file under each
candidate dialect and keeps the first one under which every row has the header's field count, so an unquoted TSV is read
with quoting off instead of swallowing rows into one quoted field. The dialect used goes into the clean report.
"""

from __future__ import annotations

import csv
import re
from dataclasses import asdict, dataclass, field
from itertools import product
from typing import Any, Iterable, Iterator, Optional

from textmill.errors import UserError

SNIFF_CHARS = 1 << 16
QUOTING = {"minimal": csv.QUOTE_MINIMAL, "none": csv.QUOTE_NONE}


@dataclass(frozen=True)
class Dialect:
    """A resolved dialect (everything set). `sniffed` names the settings that came from the file, not the config."""

    delimiter: str = ","
    quotechar: str = '"'
    escapechar: Optional[str] = None
    doublequote: bool = True
    quoting: str = "minimal"
    header: bool = True
    comment: Optional[str] = None
    sep_line: bool = False   # the file starts with Excel's `sep=<delimiter>` line, which is not a row
    sniffed: tuple[str, ...] = field(default=())

    def reader(self, lines: Iterable[str]) -> Iterator[list[str]]:
        """`csv.reader` over lines (Excel's `sep=` line and comment lines dropped first)."""
        if self.sep_line:
            lines = _after_first(lines)
        if self.comment:
            lines = (line for line in lines if not line.startswith(self.comment))
        return csv.reader(lines, delimiter=self.delimiter, quotechar=self.quotechar, escapechar=self.escapechar,
                          doublequote=self.doublequote, quoting=QUOTING[self.quoting], strict=True)

    def report(self) -> dict[str, Any]:
        out = asdict(self)
        out["sniffed"] = list(self.sniffed)
        return out


def check(settings: dict[str, Any], where: str) -> None:
    """UserError naming `where` (config key prefix or flag) for a setting csv cannot use."""
    for key in ("delimiter", "quotechar", "escapechar", "comment"):
        value = settings.get(key)
        if value is not None and (not isinstance(value, str) or len(value) != 1 and key != "comment" or value == ""):
            raise UserError(f"{where}.{key}={value!r} must be a single character (e.g. ',' or '\\t')")
    if settings.get("quoting") not in (None, *QUOTING):
        raise UserError(f"{where}.quoting={settings['quoting']!r} is invalid; choose one of {sorted(QUOTING)}")


def _consistent(sample: list[str], d: Dialect) -> tuple[float, int]:
    """(share of rows with the first row's field count, that count) when the sample parses under `d`, else (0, 0).

    The sample is cut at a line end, which can fall inside a quoted multi-line field: running out of data there is not
    a parse failure, the rows before it count."""
    rows: list[int] = []
    reader = d.reader(sample)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            if "unexpected end of data" in str(e) and rows:
                break
            return 0.0, 0
        if row:
            rows.append(len(row))
    if not rows:
        return 0.0, 0
    return sum(n == rows[0] for n in rows) / len(rows), rows[0]


def _after_first(lines: Iterable[str]) -> Iterator[str]:
    it = iter(lines)
    next(it, None)
    return it


SEP_LINE = re.compile(r"sep=(.)(?:\r\n|\r|\n|$)", re.IGNORECASE)


def sniff(head: str, fmt: str, settings: dict[str, Any]) -> Dialect:
    """The dialect for a file whose text starts with `head`: `settings` (None = unset) win, the rest is sniffed.

    A first line `sep=;` (Excel writes it, and reads the file by it, in locales whose list separator is not a comma)
    names the delimiter unless one is set, and is not read as a row."""
    given = {k: v for k, v in settings.items() if v is not None}
    stripped = head.lstrip("\ufeff")
    sep = SEP_LINE.match(stripped)
    if sep:
        head = stripped[sep.end():]
        given.setdefault("delimiter", sep.group(1))
    sample = head.splitlines(keepends=True)
    if len(head) >= SNIFF_CHARS and len(sample) > 1:
        sample = sample[:-1]  # a partial last line would look inconsistent
    default_delim = "\t" if fmt == "tsv" else ","
    delimiters = [given["delimiter"]] if "delimiter" in given else list(dict.fromkeys([default_delim, ",", ";", "\t", "|"]))
    quotings = [given["quoting"]] if "quoting" in given else ["minimal", "none"]
    escapes = [given["escapechar"]] if "escapechar" in given else ([None, "\\"] if '\\"' in head else [None])
    fixed = {k: given[k] for k in ("quotechar", "doublequote", "header", "comment") if k in given}
    best, best_score = None, (False, -1.0)
    for delim, quoting, esc in product(delimiters, quotings, escapes):
        d = Dialect(delimiter=delim, quoting=quoting, escapechar=esc, **fixed)
        share, width = _consistent(sample, d)
        if share == 1.0 and width > 1:
            best = d
            break
        if (width > 1, share) > best_score:  # several columns beat one; then the most consistent; ties: the first
            best, best_score = d, (width > 1, share)
    assert best is not None
    sniffed = tuple(k for k in ("delimiter", "quoting", "escapechar") if k not in given or (k == "delimiter" and sep))
    return Dialect(**{**asdict(best), "sep_line": bool(sep), "sniffed": sniffed})
