"""Regressions found in review: each of these once lost data, gave wrong results, or crashed instead of a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from textmill.pipelines.clean import main as clean_main
from textmill.pipelines.steps.base import Doc
from textmill.pipelines.steps.near_dup import NearDedup, Shingler
from textmill import config as C
from textmill.errors import UserError
from textmill.storage import atomic_path
from tests.conftest import REPO

TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank today.",
         "A completely different sentence about software packages and their licences."]


def _write_txt(folder: Path) -> dict[Path, bytes]:
    folder.mkdir(parents=True)
    for i, t in enumerate(TEXTS):
        (folder / f"{i}.txt").write_text(t * 3, encoding="utf-8")
    (folder / "notes.md").write_text("not a corpus file, but the user's", encoding="utf-8")
    return {p: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("out", [".", "sub"])
def test_adhoc_out_inside_raw_is_refused_and_raw_is_untouched(tmp_path, out):
    raw = tmp_path / "corpus"
    before = _write_txt(raw)
    with pytest.raises(UserError, match="overlaps --raw"):
        clean_main(["--raw", str(raw), "--out", str(raw / out), "--set", "clean.workers=1"])
    assert {p: p.read_bytes() for p in raw.iterdir()} == before


def test_adhoc_out_that_contains_raw_is_refused(tmp_path):
    before = _write_txt(tmp_path / "data" / "raw")
    with pytest.raises(UserError, match="overlaps --raw"):
        clean_main(["--raw", str(tmp_path / "data" / "raw"), "--out", str(tmp_path / "data")])
    assert {p: p.read_bytes() for p in (tmp_path / "data" / "raw").iterdir()} == before


def test_adhoc_out_that_is_some_other_nonempty_folder_is_refused(tmp_path):
    _write_txt(tmp_path / "raw")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="non-empty folder"):
        clean_main(["--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "docs")])
    assert (tmp_path / "docs" / "thesis.tex").read_text() == "precious"


def test_adhoc_out_dot_works(tmp_path, monkeypatch):
    _write_txt(tmp_path / "raw")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    assert clean_main(["--raw", str(tmp_path / "raw"), "--out", ".", "--min-chars", "10", "--set", "clean.workers=1"]) == 0
    assert (tmp_path / "out" / "docs.jsonl").is_file()


def test_text_template_escapes_keep_non_ascii(tmp_path):
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"id": "a", "title": "Paket", "abstract": "Ein Werkzeug für Übersetzungen und mehr."}) + "\n",
                   encoding="utf-8")
    clean_main(["--raw", str(raw), "--out", str(tmp_path / "out"), "--text", "Résumé: {title}\\n{abstract}",
                "--min-chars", "5", "--set", "clean.workers=1"])
    doc = json.loads((tmp_path / "out/docs.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert doc["text"].startswith("Résumé: Paket\nEin Werkzeug für")


def test_parquet_reads_required_fields_outside_the_template(tmp_path):
    rows = {"id": ["a", "b"], "title": ["A real title", ""], "abstract": [TEXTS[0], TEXTS[1]]}
    pq.write_table(pa.table(rows), tmp_path / "x.parquet")
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(dict(zip(rows, v))) + "\n" for v in zip(*rows.values())))
    kept = {}
    for fmt in ("parquet", "jsonl"):
        clean_main(["--raw", str(tmp_path / f"x.{fmt}"), "--out", str(tmp_path / f"out-{fmt}"), "--text", "{abstract}",
                    "--id", "id", "--required", "title", "--min-chars", "5", "--set", "clean.workers=1"])
        kept[fmt] = [json.loads(l)["id"] for l in (tmp_path / f"out-{fmt}/docs.jsonl").read_text().splitlines()]
    assert kept["parquet"] == kept["jsonl"] == ["a"]


def test_near_duplicate_of_a_rejected_document_is_kept():
    sh = Shingler(128, 5)
    near = NearDedup(0.9, 128)
    a = Doc(id="a", source="s", fields={}, text=TEXTS[0] * 4)
    a.minhash = sh.signature(a.text)
    b = Doc(id="b", source="s", fields={}, text=TEXTS[0] * 4 + " ok")
    b.minhash = sh.signature(b.text)
    assert near.find(a) is None          # a is then rejected (say, wrong language) and never added
    assert near.find(b) is None          # so b is not a near-duplicate of anything kept
    near.add(b)
    assert near.find(a) == "near_duplicate"


def test_atomic_path_survives_a_leftover_from_a_killed_run(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("v1")
    # what the previous scheme left behind when killed while deleting the old folder
    leftover = tmp_path / f".out.old-{os.getpid()}"
    leftover.mkdir()
    (leftover / "x").write_text("stale")
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("v2")
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("override, key", [
    ("model.size=tinyy", "model.size"), ("clean.near_dup.threshold=1.5", "clean.near_dup.threshold"),
    ("clean.chunk_size=0", "clean.chunk_size"), ("corpora.legal.min_chars=900000", "min_chars"),
    ("model.n_ctx=0", "model.n_ctx"), ("training.eval_interval=0", "training.eval_interval"),
    ("training.checkpoint_interval=0", "training.checkpoint_interval"), ("training.warmup_steps=-1", "warmup_steps")])
def test_bad_values_fail_at_the_edge_naming_the_key(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        C.load(REPO / "params.yaml", [override])


def test_bad_log_level_is_one_line():
    r = subprocess.run([sys.executable, "-m", "textmill.cli", "params", "--check"], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "TEXTMILL_LOG_LEVEL": "verbose"})
    assert r.returncode == 2 and "TEXTMILL_LOG_LEVEL" in r.stderr and "Traceback" not in r.stderr


def test_missing_extra_names_the_pip_extra(tmp_path):
    # A serving-only node has no ftfy: simulate by shadowing it with a module that fails to import.
    (tmp_path / "ftfy.py").write_text("raise ModuleNotFoundError(\"No module named 'ftfy'\", name='ftfy')\n")
    r = subprocess.run([sys.executable, "-m", "textmill.cli", "clean", "x"], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert r.returncode == 2 and "pip install 'textmill[clean]'" in r.stderr and "Traceback" not in r.stderr


def test_json_array_elements_larger_than_the_read_block(tmp_path):
    import io

    from textmill.pipelines.readers.formats import JSON_BLOCK, read_json_array

    items = [{"id": "a", "text": "x" * (JSON_BLOCK * 5 + 7)}, {"id": "b", "text": "y"}, {"id": "c", "text": "é" * JSON_BLOCK}]
    rows = list(read_json_array(io.StringIO(json.dumps(items)), "t.json"))
    assert [r for _, r in rows] == items and [i for i, _ in rows] == [1, 2, 3]


def test_stop_string_completed_by_a_held_back_tail_is_not_leaked():
    from textmill.serving.sampling import TextTracker

    class Bytes:  # a byte-level tokenizer: id i decodes to the bytes in TABLE[i]
        TABLE = {0: b"a", 1: b"b\xe2"}

        def decode(self, ids, skip_special_tokens=True):
            return b"".join(self.TABLE[i] for i in ids).decode("utf-8", errors="replace")

    tracker = TextTracker(Bytes(), ("ab",))
    out = "".join(tracker.push(t)[0] for t in (0, 1))  # "b\xe2" ends in a partial character: held back
    out += tracker.flush()
    assert "ab" not in out and out == ""


def test_a_version_that_failed_to_load_is_retried_with_backoff():
    from textmill.serving.daemon import LoadFailures

    now = [0.0]
    f = LoadFailures(first_s=60, max_s=300, clock=lambda: now[0])
    assert not f.blocked("m", "v2")
    assert f.record("m", "v2") == 60 and f.blocked("m", "v2") and not f.blocked("m", "v3")
    now[0] = 61.0
    assert not f.blocked("m", "v2")              # retried after the backoff, not never
    assert f.record("m", "v2") == 120 and f.record("m", "v2") == 240 and f.record("m", "v2") == 300  # capped
