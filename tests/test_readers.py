"""Raw readers: encodings, formats, zip in place, split modes, stable ids, and user mistakes as one-line UserErrors."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from textmill.pipelines.readers import ReadOptions, iter_records, resolve
from textmill.pipelines.readers.encoding import detect
from textmill.errors import UserError

REPO = Path(__file__).resolve().parent.parent
MANIFEST = json.loads((REPO / "tests/data/sample-corpora-MANIFEST.json").read_text(encoding="utf-8"))
LEGAL = REPO / "data/raw/legal"


def records(paths, **opts):
    files = [(Path(p), Path(p).name) for p in paths]
    return list(iter_records(files, ReadOptions(**opts)))


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("entry", MANIFEST["legal"]["files"], ids=lambda e: e["file"])
def test_legal_files_decode_exactly(entry):
    path = REPO / "data/raw" / entry["file"]
    [rec] = records([path], format="txt", split="file")
    text = rec.fields["text"].replace("\r\n", "\n")
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == entry["text_sha256_normalised_lf"]


def test_utf16_is_not_one_garbled_doc(tmp_path):
    text = "First paragraph of a licence.\r\n\r\nSecond paragraph, naïve café.\r\n"
    for name, data in {"le-bom.txt": b"\xff\xfe" + text.encode("utf-16-le"), "be-bom.txt": b"\xfe\xff" + text.encode("utf-16-be"),
                       "le-nobom.txt": text.encode("utf-16-le"), "be-nobom.txt": text.encode("utf-16-be")}.items():
        (tmp_path / name).write_bytes(data)
        recs = records([tmp_path / name], split="paragraph")
        assert [r.fields["text"] for r in recs] == ["First paragraph of a licence.\r\n", "Second paragraph, naïve café.\r\n"], name


def test_cp1252_fallback_and_bom(tmp_path):
    (tmp_path / "win.txt").write_bytes("Smart “quotes” — café, œuvre, €5".encode("cp1252"))
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + "Hello wörld".encode("utf-8"))
    assert detect(lambda: open(tmp_path / "win.txt", "rb"), "win.txt").codec == "cp1252"
    assert records([tmp_path / "win.txt"])[0].fields["text"] == "Smart “quotes” — café, œuvre, €5"
    assert records([tmp_path / "bom.txt"])[0].fields["text"] == "Hello wörld"


def test_utf8_detected_after_first_block(tmp_path):
    # a late non-UTF-8 byte (past the sniffed head) must still switch the whole file to cp1252
    (tmp_path / "late.txt").write_bytes(b"a" * (1 << 20) + b" caf\xe9")
    assert records([tmp_path / "late.txt"])[0].fields["text"].endswith(" café")


def test_csv_quoted_newlines_long_fields_bom_and_malformed_row(tmp_path):
    long = "x" * 300_000  # above the stdlib's 128 KiB default field limit
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerows([["id", "body"], ["a", "line one\nline two, with \"quotes\""], ["b", long]])
    data = "\ufeff" + buf.getvalue() + 'c,"unclosed quote\n'
    (tmp_path / "t.csv").write_text(data, encoding="utf-8")
    recs = records([tmp_path / "t.csv"], template="{body}", id_field="id")
    assert [r.id for r in recs[:2]] == ["a", "b"]
    assert recs[0].fields["body"] == 'line one\nline two, with "quotes"'
    assert len(recs[1].fields["body"]) == 300_000
    assert recs[2].malformed is not None and recs[2].malformed.reason == "malformed_row"


def test_csv_wrong_field_count_is_rejected_not_fatal(tmp_path):
    (tmp_path / "t.tsv").write_text("id\ttext\n1\tgood row\n2\tbad\textra\n3\tanother good row\n", encoding="utf-8")
    recs = records([tmp_path / "t.tsv"], id_field="id")
    assert [(r.id, r.malformed.reason if r.malformed else None) for r in recs] == [
        ("1", None), ("t.tsv:2", "malformed_row"), ("3", None)]


def test_json_sniff_array_vs_lines_and_stable_ids(tmp_path):
    rows = [{"text": f"row {i} " + "é" * i} for i in range(5000)]  # larger than one read block
    (tmp_path / "arr.json").write_text("\n  " + json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]) + "{broken\n", encoding="utf-8")
    arr = records([tmp_path / "arr.json"])
    assert [r.fields["text"] for r in arr] == [r["text"] for r in rows]
    assert arr[0].id == "arr.json:1" and arr[-1].id == "arr.json:5000"
    lines = records([tmp_path / "lines.json"])
    assert [r.id for r in lines] == ["lines.json:1", "lines.json:2", "lines.json:3", "lines.json:4"]
    assert lines[3].malformed.reason == "malformed_json"


def test_txt_split_modes(tmp_path):
    (tmp_path / "book.txt").write_text("one\nstill one\n\n\ntwo\n   \nthree\n", encoding="utf-8")
    assert len(records([tmp_path / "book.txt"], split="file")) == 1
    assert [r.fields["text"] for r in records([tmp_path / "book.txt"], split="paragraph")] == [
        "one\nstill one\n", "two\n", "three\n"]
    (tmp_path / "sep.txt").write_text("a\nb\n***\nc\n  ***  \nd\n", encoding="utf-8")
    assert [r.fields["text"] for r in records([tmp_path / "sep.txt"], split="***")] == ["a\nb\n", "c\n", "d\n"]


def test_parquet_streams_row_groups(tmp_path):
    table = pa.table({"uid": [f"u{i}" for i in range(2500)], "body": [f"text {i}" for i in range(2500)], "junk": list(range(2500))})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=1000)
    recs = records([tmp_path / "p.parquet"], template="{body}", id_field="uid")
    assert len(recs) == 2500 and recs[2499].id == "u2499" and set(recs[0].fields) == {"uid", "body"}


def test_zip_members_read_in_place(tmp_path):
    z = tmp_path / "bundle.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("b/data.jsonl", '{"text": "from jsonl"}\n')
        zf.writestr("a.csv", "text\nfrom csv\n")
        zf.writestr("__MACOSX/._a.csv", "junk")
    before = set(tmp_path.iterdir())
    recs = records([z])
    assert [(r.id, r.fields["text"]) for r in recs] == [("bundle.zip:a.csv:1", "from csv"), ("bundle.zip:b/data.jsonl:1", "from jsonl")]
    assert set(tmp_path.iterdir()) == before  # nothing extracted


# --- user mistakes: one UserError naming the file (and row), the raw files untouched ---------------------------------

def _raises(tmp_path, match, fn):
    before = hashes(tmp_path)
    with pytest.raises(UserError, match=match):
        fn()
    assert hashes(tmp_path) == before


def test_corrupt_zip(tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    _raises(tmp_path, r"bad\.zip: corrupt", lambda: records([tmp_path / "bad.zip"]))


def test_binary_file(tmp_path):
    (tmp_path / "img.txt").write_bytes(bytes(range(256)) * 8)
    _raises(tmp_path, r"img\.txt: looks like a binary file", lambda: records([tmp_path / "img.txt"]))


def test_undecodable_bytes(tmp_path):
    (tmp_path / "odd.txt").write_bytes(b"caf\xe9 then \x81\x8d undefined in cp1252")
    _raises(tmp_path, r"odd\.txt: undecodable bytes at offset 10", lambda: records([tmp_path / "odd.txt"]))


def test_missing_template_field(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"title": "t", "abstract": "a"}\n', encoding="utf-8")
    _raises(tmp_path, r"d\.jsonl:1: record has no field\(s\) \['abstrct'\]",
            lambda: records([tmp_path / "d.jsonl"], template="{title}\n{abstrct}"))


def test_missing_field_in_a_later_row_is_a_rejection(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"a": "x"}\n{"b": "y"}\n', encoding="utf-8")
    recs = records([tmp_path / "d.jsonl"], template="{a}")
    assert recs[1].malformed.reason == "missing_field"


def test_missing_path_and_no_matches(tmp_path):
    _raises(tmp_path, r"nope: no such raw corpus folder", lambda: resolve(tmp_path / "nope", ["*"]))
    _raises(tmp_path, r"no files match", lambda: resolve(tmp_path, ["*.csv"]))


def test_unknown_extension(tmp_path):
    (tmp_path / "notes.xyz").write_text("hello", encoding="utf-8")
    _raises(tmp_path, r"notes\.xyz: cannot tell the format", lambda: records([tmp_path / "notes.xyz"]))


def test_cli_errors_are_one_line_exit_2(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    before = hashes(tmp_path)
    for argv, needle in [(["--raw", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "out")], "no records"),
                         (["--raw", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "out")], "no such file")]:
        proc = subprocess.run(["textmill", "clean", *argv], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert hashes(tmp_path) == before
    assert not (tmp_path / "out").exists()  # nothing half-written
